//! Translation of kernel requests under a VM's `fs/` into [`GuestFs`] calls.
//!
//! Invariants: only conversions live here (fuser types ↔ protocol types); every call
//! that may wait on a guest runs in a tokio task that owns the reply, so FUSE threads
//! never block on the network; `forget`, `flush` and `release` answer at once.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "casts to audit once the concurrent rework of this file merges (issue 16)"
)]
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bandsox_agent::proto::fs::{fuse_dirent_size, Attr, Owner, SetAttrs, SetTime, Timespec};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
};

use super::{errno, BandsoxFs};
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
            .checked_add(Duration::from_secs(t.sec as u64))
            .and_then(|x| x.checked_add(nsec))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(t.sec.unsigned_abs()))
            .and_then(|x| x.checked_add(nsec))
    };
    res.unwrap_or(UNIX_EPOCH)
}

fn timespec(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            // Before the epoch: floor seconds, non-negative nanoseconds.
            let (sec, nsec) = if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            };
            Timespec { sec, nsec }
        }
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
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
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

fn reply_entry(reply: ReplyEntry, res: Result<Looked, Error>) {
    match res {
        Ok(l) => reply.entry(&l.ttl, &file_attr(l.ino, &l.attr), Generation(l.generation)),
        Err(e) => reply.error(errno(&e)),
    }
}

fn reply_empty(reply: ReplyEmpty, res: Result<(), Error>) {
    match res {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn reply_xattr(reply: ReplyXattr, res: Result<XattrReply, Error>) {
    match res {
        Ok(XattrReply::Size(n)) => reply.size(n),
        Ok(XattrReply::Data(d)) => reply.data(&d),
        Err(e) => reply.error(errno(&e)),
    }
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

    pub(super) fn g_lookup(&self, parent: Target, name: &OsStr, reply: ReplyEntry) {
        self.guest()
            .lookup(parent, name.as_bytes().to_vec(), move |r| {
                reply_entry(reply, r)
            });
    }

    pub(super) fn g_getattr(&self, t: Target, fh: Option<FileHandle>, reply: ReplyAttr) {
        let files = self.files.clone();
        let ino = t.ino();
        let root = matches!(t, Target::Root { .. });
        self.guest().getattr(t, fh.map(|f| f.0), move |r| match r {
            Ok((a, ttl)) => reply.attr(&ttl, &file_attr(ino, &a)),
            // An unreachable guest's `fs/` still shows as an empty directory.
            Err(e) if e.errno == libc::EHOSTDOWN && root => {
                match files.tree.node(ino).and_then(|n| files.tree.attr(&n)) {
                    Ok(a) => reply.attr(&Duration::ZERO, &super::to_fuse_attr(&a)),
                    Err(e) => reply.error(errno(&e)),
                }
            }
            Err(e) => reply.error(errno(&e)),
        });
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn g_setattr(
        &self,
        t: Target,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
        reply: ReplyAttr,
    ) {
        let set = SetAttrs {
            mode: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        let ino = t.ino();
        self.guest()
            .setattr(t, fh.map(|f| f.0), set, move |r| match r {
                Ok((a, ttl)) => reply.attr(&ttl, &file_attr(ino, &a)),
                Err(e) => reply.error(errno(&e)),
            });
    }

    pub(super) fn g_readlink(&self, t: Target, reply: ReplyData) {
        self.guest().readlink(t, move |r| match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        });
    }

    pub(super) fn g_mknod(
        &self,
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
                reply_entry(reply, r)
            });
    }

    pub(super) fn g_mkdir(
        &self,
        req: &Request,
        parent: Target,
        name: &OsStr,
        mode: u32,
        reply: ReplyEntry,
    ) {
        let name = name.as_bytes().to_vec();
        self.guest()
            .mkdir(parent, name, mode, owner(req), move |r| {
                reply_entry(reply, r)
            });
    }

    pub(super) fn g_symlink(
        &self,
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
                reply_entry(reply, r)
            });
    }

    pub(super) fn g_link(&self, t: Target, new_parent: Target, name: &OsStr, reply: ReplyEntry) {
        let name = name.as_bytes().to_vec();
        self.guest()
            .link(t, new_parent, name, move |r| reply_entry(reply, r));
    }

    pub(super) fn g_unlink(&self, parent: Target, name: &OsStr, dir: bool, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        self.guest()
            .unlink(parent, name, dir, move |r| reply_empty(reply, r));
    }

    pub(super) fn g_rename(
        &self,
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
                reply_empty(reply, r)
            });
    }

    pub(super) fn g_open(&self, t: Target, flags: i32, reply: ReplyOpen) {
        self.guest().open(t, flags, move |r| match r {
            Ok(o) => reply.opened(FileHandle(o.fh), fopen_flags(&o)),
            Err(e) => reply.error(errno(&e)),
        });
    }

    pub(super) fn g_create(
        &self,
        req: &Request,
        parent: Target,
        name: &OsStr,
        mode: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let name = name.as_bytes().to_vec();
        self.guest()
            .create(parent, name, mode, flags, owner(req), move |r| match r {
                Ok((l, opened)) => {
                    let f = fopen_flags(&opened);
                    reply.created(
                        &l.ttl,
                        &file_attr(l.ino, &l.attr),
                        Generation(l.generation),
                        FileHandle(opened.fh),
                        f,
                    )
                }
                Err(e) => reply.error(errno(&e)),
            });
    }

    pub(super) fn g_read(&self, t: Target, fh: FileHandle, off: u64, size: u32, reply: ReplyData) {
        self.guest().read(t, fh.0, off, size, move |r| match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        });
    }

    pub(super) fn g_write(
        &self,
        t: Target,
        fh: FileHandle,
        off: u64,
        data: &[u8],
        reply: ReplyWrite,
    ) {
        self.guest()
            .write(t, fh.0, off, data.to_vec(), move |r| match r {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(&e)),
            });
    }

    pub(super) fn g_release(&self, t: Target, fh: FileHandle, dir: bool, reply: ReplyEmpty) {
        let _guard = self.rt.enter();
        self.guest.release(&t, fh.0, dir);
        reply.ok();
    }

    pub(super) fn g_fsync(&self, t: Target, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        self.guest()
            .fsync(t, fh.0, datasync, move |r| reply_empty(reply, r));
    }

    pub(super) fn g_opendir(&self, t: Target, reply: ReplyOpen) {
        self.guest().opendir(t, move |r| match r {
            Ok(o) => {
                let flags = if o.keep_cache {
                    // The kernel keeps the listing: events drop it when it changes.
                    FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                reply.opened(FileHandle(o.fh), flags)
            }
            Err(e) => reply.error(errno(&e)),
        });
    }

    pub(super) fn g_readdir(&self, t: Target, fh: FileHandle, off: u64, mut reply: ReplyDirectory) {
        let g = self.guest();
        g.clone().readdir(t, fh.0, off, false, move |r| match r {
            Ok(items) => {
                let mut used = 0;
                for it in items {
                    let name = OsStr::from_bytes(&it.name);
                    let size = fuse_dirent_size(it.name.len(), false);
                    if reply.add(INodeNo(it.ino), it.next_offset, file_type(it.kind), name) {
                        g.readdir_filled(used, size);
                        break;
                    }
                    used += size;
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        });
    }

    pub(super) fn g_readdirplus(
        &self,
        t: Target,
        fh: FileHandle,
        off: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let g = self.guest();
        g.clone().readdir(t, fh.0, off, true, move |r| match r {
            Ok(items) => {
                let mut rest: Vec<DirItem> = Vec::new();
                let mut full = false;
                let mut used = 0;
                for it in items {
                    if full {
                        rest.push(it);
                        continue;
                    }
                    let name = OsStr::from_bytes(&it.name);
                    let (ttl, attr, generation) = match &it.looked {
                        Some(l) => (l.ttl, file_attr(l.ino, &l.attr), l.generation),
                        None => {
                            let mut a = file_attr(it.ino, &Attr::default());
                            a.kind = file_type(it.kind);
                            (Duration::ZERO, a, 0)
                        }
                    };
                    let size = fuse_dirent_size(it.name.len(), true);
                    if reply.add(
                        INodeNo(attr.ino.0),
                        it.next_offset,
                        name,
                        &ttl,
                        &attr,
                        Generation(generation),
                    ) {
                        full = true;
                        g.readdir_filled(used, size);
                        rest.push(it);
                    }
                    used += size;
                }
                // Entries the kernel never received must not keep references.
                g.unused_entries(&rest);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        });
    }

    pub(super) fn g_statfs(&self, t: Target, reply: ReplyStatfs) {
        self.guest().statfs(t, move |r| match r {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(errno(&e)),
        });
    }

    pub(super) fn g_setxattr(
        &self,
        t: Target,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        reply: ReplyEmpty,
    ) {
        let (name, value) = (name.as_bytes().to_vec(), value.to_vec());
        self.guest()
            .setxattr(t, name, value, flags, move |r| reply_empty(reply, r));
    }

    pub(super) fn g_getxattr(&self, t: Target, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.as_bytes().to_vec();
        self.guest()
            .getxattr(t, name, size, move |r| reply_xattr(reply, r));
    }

    pub(super) fn g_listxattr(&self, t: Target, size: u32, reply: ReplyXattr) {
        self.guest()
            .listxattr(t, size, move |r| reply_xattr(reply, r));
    }

    pub(super) fn g_removexattr(&self, t: Target, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        self.guest()
            .removexattr(t, name, move |r| reply_empty(reply, r));
    }

    pub(super) fn g_fallocate(
        &self,
        t: Target,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.guest()
            .fallocate(t, fh.0, offset, length, mode, move |r| {
                reply_empty(reply, r)
            });
    }

    pub(super) fn g_lseek(
        &self,
        t: Target,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if offset < 0 {
            return reply.error(Errno::from_i32(libc::ENXIO));
        }
        self.guest()
            .lseek(t, fh.0, offset as u64, whence, move |r| match r {
                Ok(o) => reply.offset(o as i64),
                Err(e) => reply.error(errno(&e)),
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
