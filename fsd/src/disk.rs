//! Copies of disk images that cost (almost) nothing.
//!
//! [`clone_disk`] gives a VM or a snapshot its own copy of an image:
//! - a `FICLONE` reflink where the filesystem shares extents (btrfs, XFS, bcachefs, …):
//!   instant, no space used until either side writes;
//! - otherwise a sparse copy: only the data regions reported by `SEEK_DATA`/`SEEK_HOLE`
//!   are read, and blocks that read back as all zeros are not written either, so holes
//!   stay holes even where the filesystem reports everything as data.
//!
//! Invariants: the copy has exactly the source's length and contents; it is never a dense
//! full-size copy; on failure the half-written destination is removed. The destination is
//! created with mode 0600 (replaced if it exists).
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// How [`clone_disk`] made the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMethod {
    /// Shared extents (`FICLONE`); no data was copied.
    Reflink,
    /// Sparse copy; `bytes_written` bytes of non-zero data were written.
    SparseCopy { bytes_written: u64 },
}

/// `FICLONE` = `_IOW(0x94, 9, int)`.
const FICLONE: libc::c_ulong = 0x4004_9409;
/// Copy and zero-detection granularity.
const CHUNK: usize = 1 << 20;
/// Zero runs shorter than this are written rather than punched (one fs block).
const ZERO_BLOCK: usize = 4096;

/// Copy `src` to `dst` by reflink if possible, else sparsely (never densely).
pub fn clone_disk(src: &Path, dst: &Path) -> io::Result<CloneMethod> {
    let input = File::open(src)?;
    let output = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dst)?;
    let result = clone_open(&input, &output);
    if result.is_err() {
        drop(output);
        let _ = std::fs::remove_file(dst);
    }
    let method = result?;
    tracing::debug!(src = %src.display(), dst = %dst.display(), ?method, "disk cloned");
    Ok(method)
}

fn clone_open(input: &File, output: &File) -> io::Result<CloneMethod> {
    // SAFETY: FICLONE takes the source fd as its argument; both fds are open for the
    // duration of the call and no memory is passed.
    let rc = unsafe { libc::ioctl(output.as_raw_fd(), FICLONE as _, input.as_raw_fd()) };
    if rc == 0 {
        return Ok(CloneMethod::Reflink);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(
            libc::EOPNOTSUPP
            | libc::EXDEV
            | libc::EINVAL
            | libc::ENOTTY
            | libc::ENOSYS
            | libc::EPERM,
        ) => {}
        _ => return Err(err),
    }
    sparse_copy(input, output).map(|bytes_written| CloneMethod::SparseCopy { bytes_written })
}

/// Sparse copy of `input` into the (empty) `output`; returns the bytes written.
pub(crate) fn sparse_copy(input: &File, output: &File) -> io::Result<u64> {
    let len = input.metadata()?.len();
    output.set_len(len)?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    let mut pos = 0u64;
    while pos < len {
        let Some((start, end)) = next_data(input, pos, len)? else {
            break;
        };
        let mut off = start;
        while off < end {
            let n = usize::try_from(end - off).map_or(CHUNK, |n| n.min(CHUNK));
            let chunk = &mut buf[..n];
            input.read_exact_at(chunk, off)?;
            written += write_nonzero(output, chunk, off)?;
            off += n as u64;
        }
        pos = end;
    }
    Ok(written)
}

/// The next data region `[start, end)` at or after `pos`, or `None` when only a hole is left.
/// Filesystems without `SEEK_DATA` report the whole rest as data.
fn next_data(f: &File, pos: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    use nix::errno::Errno;
    use nix::unistd::{lseek, Whence};
    let pos_off =
        libc::off_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let start = match lseek(f, pos_off, Whence::SeekData) {
        Ok(start) => start,
        Err(Errno::ENXIO) => return Ok(None),
        Err(Errno::EINVAL | Errno::EOPNOTSUPP) => return Ok(Some((pos, len))),
        Err(e) => return Err(e.into()),
    };
    let end = lseek(f, start, Whence::SeekHole)?;
    // Both are non-negative (a successful lseek returns an offset).
    Ok(Some((start.unsigned_abs(), end.unsigned_abs().min(len))))
}

/// Write `chunk` at `off`, skipping whole all-zero blocks; returns the bytes written.
fn write_nonzero(out: &File, chunk: &[u8], off: u64) -> io::Result<u64> {
    let mut written = 0u64;
    let mut run_start: Option<usize> = None;
    let mut i = 0;
    while i < chunk.len() {
        let j = (i + ZERO_BLOCK).min(chunk.len());
        let zero = chunk[i..j].iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(s)) => {
                out.write_all_at(&chunk[s..i], off + s as u64)?;
                written += (i - s) as u64;
                run_start = None;
            }
            _ => {}
        }
        i = j;
    }
    if let Some(s) = run_start {
        out.write_all_at(&chunk[s..], off + s as u64)?;
        written += (chunk.len() - s) as u64;
    }
    Ok(written)
}

#[allow(
    clippy::cast_possible_truncation,
    reason = "test code: sizes, offsets and ids are small values the test constructs"
)]
#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const MIB: u64 = 1 << 20;

    /// A 64 MiB file with 1 MiB of data at 0, 3 bytes at 40 MiB, an explicitly written
    /// (allocated) 2 MiB run of zeros at 50 MiB, and a hole at the end.
    fn make_source(path: &Path) -> File {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap();
        f.set_len(64 * MIB).unwrap();
        let data: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 + 1).collect();
        f.write_all_at(&data, 0).unwrap();
        f.write_all_at(b"abc", 40 * MIB).unwrap();
        f.write_all_at(&vec![0u8; 2 * MIB as usize], 50 * MIB)
            .unwrap();
        f.sync_all().unwrap();
        f
    }

    fn allocated(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn clone_preserves_contents_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
        make_source(&src);
        let method = clone_disk(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert_eq!(std::fs::metadata(&dst).unwrap().len(), 64 * MIB);
        let (a_src, a_dst) = (allocated(&src), allocated(&dst));
        assert!(a_src < 8 * MIB, "source should be sparse: {a_src}");
        if let CloneMethod::SparseCopy { bytes_written } = method {
            // 1 MiB + one 4 KiB block holding "abc"; the zero run is not written.
            assert_eq!(bytes_written, MIB + ZERO_BLOCK as u64);
            assert!(a_dst <= a_src, "copy allocates {a_dst}, source {a_src}");
            assert!(a_dst >= MIB, "copy allocates {a_dst}");
        }
        assert_eq!(
            std::fs::metadata(&dst).unwrap().mode() & 0o777,
            0o600,
            "copy is owner-only"
        );
    }

    #[test]
    fn sparse_path_even_where_reflink_works() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
        let input = make_source(&src);
        let output = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dst)
            .unwrap();
        let written = sparse_copy(&input, &output).unwrap();
        assert_eq!(written, MIB + ZERO_BLOCK as u64);
        output.sync_all().unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert!(allocated(&dst) <= allocated(&src));
        assert!(allocated(&dst) < 2 * MIB);
    }

    #[test]
    fn empty_and_fully_sparse_files() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
        File::create(&src).unwrap().set_len(0).unwrap();
        clone_disk(&src, &dst).unwrap();
        assert_eq!(std::fs::metadata(&dst).unwrap().len(), 0);
        File::create(&src).unwrap().set_len(100 * MIB).unwrap();
        clone_disk(&src, &dst).unwrap();
        assert_eq!(std::fs::metadata(&dst).unwrap().len(), 100 * MIB);
        assert!(allocated(&dst) < MIB);
    }

    #[test]
    fn missing_source_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("dst.img");
        assert!(clone_disk(&dir.path().join("nope"), &dst).is_err());
        assert!(!dst.exists());
    }
}
