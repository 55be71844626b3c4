//! A VM's disk image read through `ext4-view`, a userspace ext4 reader: the host kernel
//! never mounts a guest image (a crafted image is a classic kernel attack surface).
//!
//! Invariants:
//! - The image is hostile. Every read the library makes goes through [`Bounded`], which
//!   refuses ranges past the image's end (so a truncated image fails, never reads
//!   garbage or blocks), and before the library sees the image, [`check_superblock`]
//!   bounds what it will allocate from superblock fields: the block count must fit in
//!   the file and the blocks per group must be in mke2fs's range, so the block group
//!   table (16 bytes a group in memory) is at most a 64 KiB-th of the image.
//! - Library calls that allocate a whole file's size (symlink targets) are only made
//!   after the size was checked ([`MAX_LINK`]); file data is read in caller-sized chunks.
//! - Every library error becomes one errno with a readable message: EIO for a corrupt
//!   image or one using features the reader lacks, ENODATA for a disk with no ext4
//!   filesystem at its start (partitioned or unformatted).
//! - `Ext4` is `!Send` (it shares its block cache through `Rc`): an [`Image`] lives on
//!   one thread (see `worker`).
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bandsox_agent::proto::fs::{Attr, Timespec};
use ext4_view::{Ext4, Ext4Error, Ext4Read, FileType, Metadata};

use crate::error::{Error, Result};

/// Longest symlink target read (the kernel's PATH_MAX).
pub const MAX_LINK: u64 = 4096;
/// Where the ext4 superblock starts, and its size.
const SB_AT: u64 = 1024;
const SB_LEN: usize = 1024;
const EXT4_MAGIC: u16 = 0xef53;

/// The image file as the library reads it: bounded to the file's length.
struct Bounded {
    file: File,
    len: u64,
}

impl Ext4Read for Bounded {
    fn read(
        &mut self,
        start: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let end = u64::try_from(dst.len())
            .ok()
            .and_then(|n| start.checked_add(n));
        match end {
            Some(end) if end <= self.len => Ok(self.file.read_exact_at(dst, start)?),
            _ => Err(format!(
                "read of {} bytes at {start} past the image's end ({} bytes): truncated image",
                dst.len(),
                self.len
            )
            .into()),
        }
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Refuse what is not ext4, and superblocks whose sizes do not fit the image, before
/// the library allocates from them.
fn check_superblock(file: &File, len: u64) -> Result<()> {
    let mut sb = [0u8; SB_LEN];
    if len < SB_AT + SB_LEN as u64 || file.read_exact_at(&mut sb, SB_AT).is_err() {
        return Err(Error::new(
            libc::ENODATA,
            format!("the disk ({len} bytes) is too small to hold an ext4 filesystem"),
        ));
    }
    if le16(&sb, 0x38) != EXT4_MAGIC {
        let mut mbr = [0u8; 2];
        let partitioned = file.read_exact_at(&mut mbr, 510).is_ok() && mbr == [0x55, 0xaa];
        return Err(Error::new(
            libc::ENODATA,
            if partitioned {
                "the disk has a partition table, not an ext4 filesystem: only a whole-disk ext4 can be read while the VM is stopped"
            } else {
                "the disk holds no ext4 filesystem (unformatted or another format)"
            },
        ));
    }
    let log = le32(&sb, 0x18);
    if log > 6 {
        return Err(corrupt(format!("block size 2^{} is invalid", log + 10)));
    }
    let block = 1024u64 << log;
    let blocks = u64::from(le32(&sb, 0x4)) | (u64::from(le32(&sb, 0x150)) << 32);
    if blocks.checked_mul(block).is_none_or(|b| b > len) {
        return Err(corrupt(format!(
            "the superblock claims {blocks} blocks of {block} bytes but the image has {len} bytes (truncated?)"
        )));
    }
    let per_group = u64::from(le32(&sb, 0x20));
    if !(256..=8 * block).contains(&per_group) {
        return Err(corrupt(format!(
            "{per_group} blocks per group is out of range"
        )));
    }
    Ok(())
}

fn corrupt(what: String) -> Error {
    Error::io(format!("the disk image is corrupt: {what}"))
}

/// One library error as an errno and a message.
pub fn ext4_error(e: Ext4Error) -> Error {
    match e {
        Ext4Error::NotFound => Error::not_found("no such file on the disk"),
        Ext4Error::NotADirectory => Error::new(libc::ENOTDIR, "not a directory"),
        Ext4Error::IsADirectory => Error::new(libc::EISDIR, "is a directory"),
        Ext4Error::NotASymlink | Ext4Error::IsASpecialFile => {
            Error::invalid("not a file of that type")
        }
        Ext4Error::PathTooLong => Error::new(libc::ENAMETOOLONG, "path longer than 4096 bytes"),
        Ext4Error::TooManySymlinks => Error::new(libc::ELOOP, "too many symlinks"),
        Ext4Error::Encrypted => Error::new(
            libc::EACCES,
            "the file is encrypted: start the VM to read it",
        ),
        Ext4Error::FileTooLarge => Error::new(libc::EFBIG, "file too large"),
        Ext4Error::Io(e) => Error::io(format!("reading the disk image: {e}")),
        Ext4Error::Incompatible(i) => Error::io(format!(
            "the disk uses ext4 features the stopped-VM reader lacks ({i}): start the VM to read it"
        )),
        Ext4Error::Corrupt(c) => corrupt(c.to_string()),
        other => Error::io(format!("reading the disk image: {other}")),
    }
}

/// What a directory entry tells without reading its inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: Vec<u8>,
    /// `S_IFMT` bits.
    pub kind: u32,
}

/// A directory being listed: the entries in the order the disk has them.
pub struct Listing {
    it: ext4_view::ReadDir,
    /// Entries returned so far.
    at: u64,
    /// An entry given back by [`Listing::unread`].
    back: Option<Listed>,
}

impl Listing {
    /// How many entries were returned so far.
    pub fn position(&self) -> u64 {
        self.at
    }

    /// Give back the entry just returned: the next call returns it again.
    pub fn unread(&mut self, e: Listed) {
        self.at -= 1;
        self.back = Some(e);
    }

    /// The next entry (`None` at the end).
    pub fn next_entry(&mut self) -> Result<Option<Listed>> {
        if let Some(e) = self.back.take() {
            self.at += 1;
            return Ok(Some(e));
        }
        for e in self.it.by_ref() {
            let e = e.map_err(ext4_error)?;
            let name = e.file_name();
            let name = name.as_ref();
            if name == b"." || name == b".." {
                continue;
            }
            self.at += 1;
            return Ok(Some(Listed {
                name: name.to_vec(),
                kind: kind_bits(e.file_type().map_err(ext4_error)?),
            }));
        }
        Ok(None)
    }
}

/// An open disk image.
pub struct Image {
    fs: Ext4,
    len: u64,
}

fn kind_bits(t: FileType) -> u32 {
    if t.is_dir() {
        libc::S_IFDIR
    } else if t.is_symlink() {
        libc::S_IFLNK
    } else if t.is_fifo() {
        libc::S_IFIFO
    } else if t.is_socket() {
        libc::S_IFSOCK
    } else if t.is_char_dev() {
        libc::S_IFCHR
    } else if t.is_block_dev() {
        libc::S_IFBLK
    } else {
        libc::S_IFREG
    }
}

fn timespec(t: ext4_view::Timestamp) -> Timespec {
    Timespec {
        sec: t.seconds(),
        nsec: t.nanoseconds().min(999_999_999),
    }
}

/// The attributes of `m` as `fs/` shows them. The reader gives no inode number, link
/// count, change time or device number: links show as 1 (what `find` takes for
/// "unknown"), the change time as the modification time.
pub fn attr(m: &Metadata) -> Attr {
    let mtime = timespec(m.modified());
    Attr {
        ino: 0,
        size: m.len(),
        blocks: m.len().div_ceil(512),
        atime: timespec(m.accessed()),
        mtime,
        ctime: mtime,
        mode: kind_bits(m.file_type()) | u32::from(m.mode() & 0o7777),
        nlink: 1,
        uid: m.uid(),
        gid: m.gid(),
        rdev: 0,
        blksize: 4096,
    }
}

impl Image {
    /// Open the image at `path` (read-only).
    pub fn open(path: &Path) -> Result<Image> {
        let file = File::open(path)
            .map_err(|e| Error::from(e).with_context(&format!("{}", path.display())))?;
        Image::from_file(file)
    }

    pub fn from_file(file: File) -> Result<Image> {
        let len = file.metadata()?.len();
        check_superblock(&file, len)?;
        let fs = Ext4::load(Box::new(Bounded { file, len })).map_err(ext4_error)?;
        Ok(Image { fs, len })
    }

    /// Bytes in the image.
    pub fn bytes(&self) -> u64 {
        self.len
    }

    /// The entry at absolute `path` itself (symlinks not followed).
    pub fn stat(&self, path: &[u8]) -> Result<Metadata> {
        self.fs.symlink_metadata(path).map_err(ext4_error)
    }

    /// The entries of directory `path`, `.` and `..` left out.
    pub fn list(&self, path: &[u8]) -> Result<Listing> {
        let it = self.fs.read_dir(path).map_err(ext4_error)?;
        Ok(Listing {
            it,
            at: 0,
            back: None,
        })
    }

    /// The target of symlink `path`.
    pub fn read_link(&self, path: &[u8]) -> Result<Vec<u8>> {
        let m = self.stat(path)?;
        if !m.is_symlink() {
            return Err(Error::invalid("not a symlink"));
        }
        // The library reads the whole target into memory: check its size first.
        if m.len() == 0 || m.len() > MAX_LINK {
            return Err(corrupt(format!("a symlink target of {} bytes", m.len())));
        }
        let t = self.fs.read_link(path).map_err(ext4_error)?;
        Ok(AsRef::<[u8]>::as_ref(&t).to_vec())
    }

    /// Open regular file `path` for reading.
    pub fn open_file(&self, path: &[u8]) -> Result<ext4_view::File> {
        if !self.stat(path)?.file_type().is_regular_file() {
            return Err(Error::invalid("only regular files can be opened"));
        }
        self.fs.open(path).map_err(ext4_error)
    }
}

/// Up to `size` bytes of `f` at `offset` (fewer at its end). Seeks only when `offset`
/// is not where the last read ended: the library's seek walks the file's blocks from
/// the start, so sequential reads stay linear.
pub fn read_at(f: &mut ext4_view::File, offset: u64, size: usize) -> Result<Vec<u8>> {
    let len = f.metadata().len();
    if offset >= len {
        return Ok(Vec::new());
    }
    let want = usize::try_from(len - offset).map_or(size, |left| left.min(size));
    if f.position() != offset {
        f.seek_to(offset).map_err(ext4_error)?;
    }
    let mut buf = vec![0u8; want];
    let mut got = 0;
    while got < want {
        let n = f.read_bytes(&mut buf[got..]).map_err(ext4_error)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
    Ok(buf)
}
