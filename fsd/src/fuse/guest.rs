//! Translation of kernel requests under a VM's `fs/` into [`GuestFs`] calls.
//!
//! Invariants: only conversions live here (fuser types ↔ the proxy's types); every call
//! that may wait on a guest runs in a tokio task that owns the reply, so FUSE threads
//! never block on the network; `forget`, `flush` and `release` answer at once. Every
//! answer goes through [`Op::reply`], which logs the errnos.
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::guestfs::{fuse_dirent_size, Attr, Owner, SetAttrs, SetTime, Timespec};
use fuser::{
    FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
};

use super::reply::Op;
use super::{BandsoxFs, Listing};
use crate::error::Error;
use crate::guestfs::{DirItem, GuestFs, Looked, Opened, Target, XattrReply};

/// `st_mode` type bits → fuser's file type (callers pass validated modes).
pub fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// A guest timestamp; out-of-range values clamp to the epoch instead of panicking.
fn system_time(t: Timespec) -> SystemTime {
    let nsec = Duration::from_nanos(u64::from(t.nsec.min(999_999_999)));
    let res = if t.sec >= 0 {
        UNIX_EPOCH
            .checked_add(Duration::from_secs(t.sec.unsigned_abs()))
            .and_then(|x| x.checked_add(nsec))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(t.sec.unsigned_abs()))
            .and_then(|x| x.checked_add(nsec))
    };
    res.unwrap_or(UNIX_EPOCH)
}

fn timespec(t: SystemTime) -> Timespec {
    // Seconds past `i64::MAX` (292 billion years) clamp.
    let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            sec: secs(d),
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            // Before the epoch: floor seconds, non-negative nanoseconds.
            let (sec, nsec) = if d.subsec_nanos() == 0 {
                (-secs(d), 0)
            } else {
                (-secs(d) - 1, 1_000_000_000 - d.subsec_nanos())
            };
            Timespec { sec, nsec }
        }
    }
}

/// The changes a `setattr` asks of a guest file (`mode` keeps only permission bits).
pub(super) fn set_attrs(
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
) -> SetAttrs {
    SetAttrs {
        mode: mode.map(|m| m & 0o7777),
        uid,
        gid,
        size,
        atime: set_time(atime),
        mtime: set_time(mtime),
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(timespec(t)),
    })
}

pub fn file_attr(ino: u64, a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: a.size,
        blocks: a.blocks,
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: system_time(a.ctime),
        kind: file_type(a.mode),
        perm: u16::try_from(a.mode & 0o7777).unwrap_or(0),
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        // fuser carries 32 bits: the low half, as the kernel's `new_encode_dev` keeps.
        rdev: u32::try_from(a.rdev & u64::from(u32::MAX)).unwrap_or(0),
        blksize: a.blksize,
        flags: 0,
    }
}

fn fopen_flags(o: &Opened) -> FopenFlags {
    if o.keep_cache {
        FopenFlags::FOPEN_KEEP_CACHE
    } else {
        FopenFlags::empty()
    }
}

fn owner(req: &Request) -> Owner {
    Owner {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn looked(reply: ReplyEntry, l: Looked) {
    reply.entry(&l.ttl, &file_attr(l.ino, &l.attr), Generation(l.generation));
}

fn done(reply: ReplyEmpty, (): ()) {
    reply.ok();
}

fn xattr(reply: ReplyXattr, x: XattrReply) {
    match x {
        XattrReply::Size(n) => reply.size(n),
        XattrReply::Data(d) => reply.data(&d),
    }
}

/// Add a guest entry to a `readdir` reply; true when it is full.
pub(super) fn add_entry(r: &mut ReplyDirectory, it: &DirItem) -> bool {
    let name = OsStr::from_bytes(&it.name);
    r.add(INodeNo(it.ino), it.next_offset, file_type(it.kind), name)
}

/// Add a guest entry to a `readdirplus` reply; true when it is full.
pub(super) fn add_entry_plus(r: &mut ReplyDirectoryPlus, it: &DirItem) -> bool {
    let (ttl, attr, generation) = match &it.looked {
        Some(l) => (l.ttl, file_attr(l.ino, &l.attr), l.generation),
        None => {
            let mut a = file_attr(it.ino, &Attr::default());
            a.kind = file_type(it.kind);
            (Duration::ZERO, a, 0)
        }
    };
    let name = OsStr::from_bytes(&it.name);
    r.add(
        attr.ino,
        it.next_offset,
        name,
        &ttl,
        &attr,
        Generation(generation),
    )
}

/// Put `items` into a listing reply with `add` until it says the reply is full; tell
/// the proxy how much the kernel took. Returns the items the kernel did not receive.
fn fill(
    g: &GuestFs,
    items: Vec<DirItem>,
    plus: bool,
    mut add: impl FnMut(&DirItem) -> bool,
) -> Vec<DirItem> {
    let mut used = 0;
    let mut items = items.into_iter();
    for it in items.by_ref() {
        let size = fuse_dirent_size(it.name.len(), plus);
        if add(&it) {
            g.readdir_filled(used, size);
            return std::iter::once(it).chain(items).collect();
        }
        used += size;
    }
    Vec::new()
}

/// Remember the caller of the request being dispatched on this thread: requests sent
/// for it can then be interrupted (see [`crate::guestfs::interrupt`]).
pub fn note_caller(req: &Request) {
    crate::guestfs::interrupt::note_caller(req.pid());
}

impl BandsoxFs {
    fn guest(&self) -> Arc<GuestFs> {
        self.guest.clone()
    }

    pub(super) fn g_lookup(&self, op: Op, parent: Target, name: &OsStr, reply: ReplyEntry) {
        let name = name.as_bytes().to_vec();
        self.guest()
            .lookup(parent, name, move |r| op.reply(reply, r, looked));
    }

    pub(super) fn g_getattr(&self, op: Op, t: Target, fh: Option<FileHandle>, reply: ReplyAttr) {
        let vfs = self.vfs.clone();
        let ino = t.ino();
        let root = matches!(t, Target::Root { .. });
        self.guest().getattr(t, fh.map(|f| f.0), move |r| match r {
            // An unreachable guest's `fs/` still shows as an empty directory.
            Err(e) if e.errno == libc::EHOSTDOWN && root => {
                op.reply(reply, vfs.attr(ino), |r, a| {
                    r.attr(&Duration::ZERO, &super::to_fuse_attr(&a))
                })
            }
            r => op.reply(reply, r, |r, (a, ttl)| r.attr(&ttl, &file_attr(ino, &a))),
        });
    }

    pub(super) fn g_setattr(
        &self,
        op: Op,
        t: Target,
        set: SetAttrs,
        fh: Option<FileHandle>,
        reply: ReplyAttr,
    ) {
        let ino = t.ino();
        self.guest().setattr(t, fh.map(|f| f.0), set, move |r| {
            op.reply(reply, r, |r, (a, ttl)| r.attr(&ttl, &file_attr(ino, &a)))
        });
    }

    pub(super) fn g_readlink(&self, op: Op, t: Target, reply: ReplyData) {
        self.guest()
            .readlink(t, move |r| op.reply(reply, r, |r, d| r.data(&d)));
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn g_mknod(
        &self,
        op: Op,
        req: &Request,
        parent: Target,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let name = name.as_bytes().to_vec();
        self.guest()
            .mknod(parent, name, mode, rdev.into(), owner(req), move |r| {
                op.reply(reply, r, looked)
            });
    }

    pub(super) fn g_mkdir(
        &self,
        op: Op,
        req: &Request,
        parent: Target,
        name: &OsStr,
        mode: u32,
        reply: ReplyEntry,
    ) {
        let name = name.as_bytes().to_vec();
        self.guest()
            .mkdir(parent, name, mode, owner(req), move |r| {
                op.reply(reply, r, looked)
            });
    }

    pub(super) fn g_symlink(
        &self,
        op: Op,
        req: &Request,
        parent: Target,
        name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let name = name.as_bytes().to_vec();
        let target = target.as_os_str().as_bytes().to_vec();
        self.guest()
            .symlink(parent, name, target, owner(req), move |r| {
                op.reply(reply, r, looked)
            });
    }

    pub(super) fn g_link(
        &self,
        op: Op,
        t: Target,
        new_parent: Target,
        name: &OsStr,
        reply: ReplyEntry,
    ) {
        let name = name.as_bytes().to_vec();
        self.guest()
            .link(t, new_parent, name, move |r| op.reply(reply, r, looked));
    }

    pub(super) fn g_unlink(
        &self,
        op: Op,
        parent: Target,
        name: &OsStr,
        dir: bool,
        reply: ReplyEmpty,
    ) {
        let name = name.as_bytes().to_vec();
        self.guest()
            .unlink(parent, name, dir, move |r| op.reply(reply, r, done));
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn g_rename(
        &self,
        op: Op,
        parent: Target,
        name: &OsStr,
        new_parent: Target,
        new_name: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        let (name, new_name) = (name.as_bytes().to_vec(), new_name.as_bytes().to_vec());
        self.guest()
            .rename(parent, name, new_parent, new_name, flags, move |r| {
                op.reply(reply, r, done)
            });
    }

    pub(super) fn g_open(&self, op: Op, t: Target, flags: i32, reply: ReplyOpen) {
        self.guest().open(t, flags, move |r| {
            op.reply(reply, r, |r, o| r.opened(FileHandle(o.fh), fopen_flags(&o)))
        });
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn g_create(
        &self,
        op: Op,
        req: &Request,
        parent: Target,
        name: &OsStr,
        mode: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let name = name.as_bytes().to_vec();
        self.guest()
            .create(parent, name, mode, flags, owner(req), move |r| {
                op.reply(reply, r, |r, (l, opened)| {
                    r.created(
                        &l.ttl,
                        &file_attr(l.ino, &l.attr),
                        Generation(l.generation),
                        FileHandle(opened.fh),
                        fopen_flags(&opened),
                    )
                })
            });
    }

    pub(super) fn g_read(
        &self,
        op: Op,
        t: Target,
        fh: FileHandle,
        off: u64,
        size: u32,
        reply: ReplyData,
    ) {
        self.guest().read(t, fh.0, off, size, move |r| {
            op.reply(reply, r, |r, d| r.data(&d))
        });
    }

    pub(super) fn g_write(
        &self,
        op: Op,
        t: Target,
        fh: FileHandle,
        off: u64,
        data: &[u8],
        reply: ReplyWrite,
    ) {
        self.guest().write(t, fh.0, off, data.to_vec(), move |r| {
            op.reply(reply, r, |r, n| r.written(n))
        });
    }

    pub(super) fn g_fsync(
        &self,
        op: Op,
        t: Target,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.guest()
            .fsync(t, fh.0, datasync, move |r| op.reply(reply, r, done));
    }

    pub(super) fn g_opendir(&self, op: Op, t: Target, reply: ReplyOpen) {
        self.guest().opendir(t, move |r| {
            op.reply(reply, r, |r, o| {
                let flags = if o.keep_cache {
                    // The kernel keeps the listing: events drop it when it changes.
                    FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                r.opened(FileHandle(o.fh), flags)
            })
        });
    }

    /// `readdir`/`readdirplus` under `fs/`: the proxy's listing into the reply.
    pub(super) fn g_list<R: Listing>(&self, op: Op, t: Target, fh: FileHandle, off: u64, r: R) {
        let g = self.guest();
        g.clone().readdir(t, fh.0, off, R::PLUS, move |res| {
            op.reply(r, res, |mut r, items| {
                let rest = fill(&g, items, R::PLUS, |it| r.add_guest(it));
                // Entries the kernel never received must not keep references.
                if R::PLUS {
                    g.unused_entries(&rest);
                }
                r.done();
            })
        });
    }

    pub(super) fn g_statfs(&self, op: Op, t: Target, reply: ReplyStatfs) {
        self.guest().statfs(t, move |r| {
            op.reply(reply, r, |r, s| {
                r.statfs(
                    s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
                )
            })
        });
    }

    pub(super) fn g_setxattr(
        &self,
        op: Op,
        t: Target,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        reply: ReplyEmpty,
    ) {
        let (name, value) = (name.as_bytes().to_vec(), value.to_vec());
        self.guest()
            .setxattr(t, name, value, flags, move |r| op.reply(reply, r, done));
    }

    pub(super) fn g_getxattr(&self, op: Op, t: Target, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.as_bytes().to_vec();
        self.guest()
            .getxattr(t, name, size, move |r| op.reply(reply, r, xattr));
    }

    pub(super) fn g_listxattr(&self, op: Op, t: Target, size: u32, reply: ReplyXattr) {
        self.guest()
            .listxattr(t, size, move |r| op.reply(reply, r, xattr));
    }

    pub(super) fn g_removexattr(&self, op: Op, t: Target, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        self.guest()
            .removexattr(t, name, move |r| op.reply(reply, r, done));
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn g_fallocate(
        &self,
        op: Op,
        t: Target,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.guest()
            .fallocate(t, fh.0, offset, length, mode, move |r| {
                op.reply(reply, r, done)
            });
    }

    pub(super) fn g_lseek(
        &self,
        op: Op,
        t: Target,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let Ok(offset) = u64::try_from(offset) else {
            let e = Error::new(libc::ENXIO, "a negative offset");
            return op.reply(reply, Err(e), |_, ()| {});
        };
        self.guest().lseek(t, fh.0, offset, whence, move |r| {
            let r = r.and_then(|o| {
                i64::try_from(o).map_err(|_| Error::new(libc::EOVERFLOW, "offset past 2^63"))
            });
            op.reply(reply, r, |r, o| r.offset(o))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_with_nanoseconds() {
        for ts in [
            Timespec { sec: 0, nsec: 0 },
            Timespec {
                sec: 1_700_000_000,
                nsec: 123_456_789,
            },
            Timespec {
                sec: -5,
                nsec: 250_000_000,
            },
        ] {
            assert_eq!(timespec(system_time(ts)), ts);
        }
    }

    #[test]
    fn hostile_timestamps_do_not_panic() {
        let _ = system_time(Timespec {
            sec: i64::MAX,
            nsec: u32::MAX,
        });
        let _ = system_time(Timespec {
            sec: i64::MIN,
            nsec: 0,
        });
    }

    #[test]
    fn file_types_map() {
        assert_eq!(file_type(libc::S_IFDIR | 0o755), FileType::Directory);
        assert_eq!(file_type(libc::S_IFIFO), FileType::NamedPipe);
        assert_eq!(file_type(libc::S_IFLNK), FileType::Symlink);
        assert_eq!(file_type(libc::S_IFREG | 0o4755), FileType::RegularFile);
    }
}
