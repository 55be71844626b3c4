//! The fuser adapter: converts kernel requests into calls of the core
//! ([`crate::vfs::Vfs`] for the control tree, [`crate::guestfs`] through [`guest`] for
//! inodes under a VM's `fs/`) and their results into replies. No filesystem logic and no
//! access policy live here: each operation picks the side, converts, calls and answers
//! through [`reply::Op`], which logs every errno sent to the kernel.
//!
//! Invariants: a FUSE thread never waits on a guest or a VMM. Anything that may wait
//! (ctl writes, exec, stream reads, mkdir/rmdir) is moved into a tokio task that owns
//! the reply; everything else answers inline from memory or local files.
pub mod guest;
pub mod notify;
pub mod reply;

use std::ffi::OsStr;
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

pub use notify::{invalidate_vm_entries, KernelInvalidator};
use reply::{Fail, Op};

use crate::error::Error;
use crate::guestfs::{GuestFs, Target, FS_INO_BASE};
use crate::vfs::{policy, Attr, Caller, DirEntry, Entry, Kind, OpenMode, Vfs, TTL};

pub struct BandsoxFs {
    vfs: Arc<Vfs>,
    guest: Arc<GuestFs>,
    rt: tokio::runtime::Handle,
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
    }
}

fn to_fuse_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.time,
        mtime: a.time,
        ctime: a.time,
        crtime: a.time,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        pid: req.pid(),
        uid: req.uid(),
        gid: req.gid(),
        session: crate::vfs::session_of(req.pid()),
    }
}

fn open_flags(mode: OpenMode) -> FopenFlags {
    let mut f = FopenFlags::empty();
    if mode.direct_io {
        f |= FopenFlags::FOPEN_DIRECT_IO;
    }
    if mode.nonseekable {
        f |= FopenFlags::FOPEN_NONSEEKABLE | FopenFlags::FOPEN_STREAM;
    }
    f
}

fn entry(reply: ReplyEntry, e: Entry) {
    reply.entry_with_ttls(
        &e.attr_ttl,
        &e.entry_ttl,
        &to_fuse_attr(&e.attr),
        Generation(0),
    );
}

fn ok(reply: ReplyEmpty, (): ()) {
    reply.ok();
}

type Plus = ReplyDirectoryPlus;

/// A listing reply: `readdir` and `readdirplus` share one implementation
/// ([`BandsoxFs::list`]) and differ only in what each entry carries.
trait Listing: Fail + Send + 'static {
    const OP: &'static str;
    /// Whether entries carry attributes (`readdirplus`).
    const PLUS: bool;
    /// Add a control-tree entry; true when the reply is full.
    fn add_tree(&mut self, vfs: &Vfs, next: u64, e: &DirEntry) -> bool;
    /// Add a guest entry; true when the reply is full.
    fn add_guest(&mut self, it: &crate::guestfs::DirItem) -> bool;
    fn done(self);
}

impl Listing for ReplyDirectory {
    const OP: &'static str = "readdir";
    const PLUS: bool = false;
    fn add_tree(&mut self, _vfs: &Vfs, next: u64, e: &DirEntry) -> bool {
        self.add(INodeNo(e.ino), next, file_type(e.kind), &e.name)
    }
    fn add_guest(&mut self, it: &crate::guestfs::DirItem) -> bool {
        guest::add_entry(self, it)
    }
    fn done(self) {
        self.ok();
    }
}

impl Listing for Plus {
    const OP: &'static str = "readdirplus";
    const PLUS: bool = true;
    /// Never cached (TTL 0). `.` and `..` are never looked up by the kernel; the rest
    /// count as lookups of control-tree inodes, which are never forgotten. An entry
    /// that went away since the listing is left out.
    fn add_tree(&mut self, vfs: &Vfs, next: u64, e: &DirEntry) -> bool {
        let Ok(a) = vfs.attr(e.ino) else {
            return false;
        };
        let attr = FileAttr {
            kind: file_type(e.kind),
            ..to_fuse_attr(&a)
        };
        self.add(INodeNo(e.ino), next, &e.name, &TTL, &attr, Generation(0))
    }
    fn add_guest(&mut self, it: &crate::guestfs::DirItem) -> bool {
        guest::add_entry_plus(self, it)
    }
    fn done(self) {
        self.ok();
    }
}

impl BandsoxFs {
    pub fn new(vfs: Arc<Vfs>, guest: Arc<GuestFs>, rt: tokio::runtime::Handle) -> Self {
        BandsoxFs { vfs, guest, rt }
    }

    /// Start answering `name` on `ino`; remembers the caller so that requests sent to a
    /// guest for it can be interrupted (see [`crate::guestfs::interrupt`]).
    fn op(&self, name: &'static str, req: &Request, ino: INodeNo) -> Op {
        guest::note_caller(req);
        Op::new(name, ino.0, self.vfs.clone())
    }

    fn target(&self, ino: INodeNo) -> Option<Target> {
        self.vfs.fs_target(ino.0)
    }

    /// The `fs/` target of `ino`, or the control tree's `refusal` answered.
    fn fs_only<R: Fail>(
        &self,
        op: &Op,
        ino: INodeNo,
        reply: R,
        refusal: impl FnOnce() -> Error,
    ) -> Option<(Target, R)> {
        match self.target(ino) {
            Some(t) => Some((t, reply)),
            None => {
                op.reply(reply, Err::<(), _>(refusal()), |_, ()| {});
                None
            }
        }
    }

    /// `readdir` and `readdirplus`: one listing (from the core or the guest), numbered
    /// from `offset` on, each entry with the offset of the next.
    fn list<R: Listing>(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, r: R) {
        let op = self.op(R::OP, req, ino);
        if let Some(t) = self.target(ino) {
            return self.g_list(op, t, fh, offset, r);
        }
        op.reply(r, self.vfs.listing(ino.0, req.uid()), |mut r, all| {
            let skip = usize::try_from(offset).unwrap_or(usize::MAX);
            for (next, e) in (1u64..).zip(all).skip(skip) {
                if r.add_tree(&self.vfs, next, &e) {
                    break;
                }
            }
            r.done();
        });
    }

    /// Answer in a task: `fut` may wait on a guest or a VMM.
    fn spawn<R, T, F>(&self, op: Op, reply: R, fut: F, ok: impl FnOnce(R, T) + Send + 'static)
    where
        R: Fail + Send + 'static,
        T: Send + 'static,
        F: Future<Output = Result<T, Error>> + Send + 'static,
    {
        self.rt.spawn(async move {
            let res = fut.await;
            op.reply(reply, res, ok);
        });
    }
}

impl fuser::Filesystem for BandsoxFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let abi = config.kernel_abi();
        notify::EXPIRE_ONLY.store(
            abi.0 > 7 || (abi.0 == 7 && abi.1 >= 38),
            std::sync::atomic::Ordering::Relaxed,
        );
        let _ = config.set_max_write(1024 * 1024);
        let _ = config.set_max_readahead(1024 * 1024);
        let _ = config.set_max_background(64);
        // Each capability is optional: ask for every one the kernel offers.
        for cap in [
            // Always plus (no FUSE_READDIRPLUS_AUTO): a listing's attributes come in
            // bulk, where the kernel's heuristic would often send one lookup per entry.
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_AUTO_INVAL_DATA,
        ] {
            let _ = config.add_capabilities(cap);
        }
        Ok(())
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if ino.0 >= FS_INO_BASE {
            self.guest.forget(ino.0, nlookup);
        }
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let op = self.op("lookup", req, parent);
        match self.target(parent) {
            Some(t) => self.g_lookup(op, t, name, reply),
            None => op.reply(reply, self.vfs.lookup(parent.0, name), entry),
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let op = self.op("getattr", req, ino);
        match self.target(ino) {
            Some(t) => self.g_getattr(op, t, fh, reply),
            None => op.reply(reply, self.vfs.getattr(ino.0, req.uid()), |r, e| {
                r.attr(&e.attr_ttl, &to_fuse_attr(&e.attr))
            }),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let op = self.op("setattr", req, ino);
        if let Some(t) = self.target(ino) {
            let set = guest::set_attrs(mode, uid, gid, size, atime, mtime);
            return self.g_setattr(op, t, set, fh, reply);
        }
        let owner_or_mode = mode.is_some() || uid.is_some() || gid.is_some();
        op.reply(reply, self.vfs.setattr(ino.0, owner_or_mode), |r, a| {
            r.attr(&TTL, &to_fuse_attr(&a))
        });
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let op = self.op("readlink", req, ino);
        match self.target(ino) {
            Some(t) => self.g_readlink(op, t, reply),
            None => op.reply(reply, self.vfs.readlink(ino.0, caller(req)), |r, t| {
                r.data(t.as_bytes())
            }),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let op = self.op("mkdir", req, parent);
        if let Some(t) = self.target(parent) {
            return self.g_mkdir(op, req, t, name, mode, reply);
        }
        match self.vfs.mkdir(parent.0, name, caller(req)) {
            Ok(boot) => self.spawn(op, reply, boot, entry),
            Err(e) => op.reply(reply, Err(e), entry),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let op = self.op("rmdir", req, parent);
        if let Some(t) = self.target(parent) {
            return self.g_unlink(op, t, name, true, reply);
        }
        match self.vfs.rmdir(parent.0, name, caller(req)) {
            Ok(delete) => self.spawn(op, reply, delete, ok),
            Err(e) => op.reply(reply, Err(e), ok),
        }
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let op = self.op("unlink", req, parent);
        let refusal = || policy::no_such_change("unlink");
        if let Some((t, reply)) = self.fs_only(&op, parent, reply, refusal) {
            self.g_unlink(op, t, name, false, reply);
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let op = self.op("mknod", req, parent);
        let refusal = || policy::no_such_change("mknod");
        if let Some((t, reply)) = self.fs_only(&op, parent, reply, refusal) {
            self.g_mknod(op, req, t, name, mode, rdev, reply);
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let op = self.op("symlink", req, parent);
        let refusal = || policy::no_such_change("symlink");
        if let Some((t, reply)) = self.fs_only(&op, parent, reply, refusal) {
            self.g_symlink(op, req, t, link_name, target, reply);
        }
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let op = self.op("link", req, ino);
        match (self.target(ino), self.target(newparent)) {
            (Some(t), Some(p)) => self.g_link(op, t, p, newname, reply),
            (None, None) => op.reply(reply, Err(policy::no_such_change("link")), entry),
            _ => op.reply(reply, Err(policy::cross_device("link")), entry),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let op = self.op("rename", req, parent);
        match (self.target(parent), self.target(newparent)) {
            (Some(p), Some(np)) => self.g_rename(op, p, name, np, newname, flags.bits(), reply),
            (None, None) => op.reply(reply, Err(policy::no_such_change("rename")), ok),
            _ => op.reply(reply, Err(policy::cross_device("rename")), ok),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let op = self.op("open", req, ino);
        if let Some(t) = self.target(ino) {
            return self.g_open(op, t, flags.0, reply);
        }
        let (read, write) = match flags.acc_mode() {
            OpenAccMode::O_RDONLY => (true, false),
            OpenAccMode::O_WRONLY => (false, true),
            _ => (true, true),
        };
        let res = self.vfs.open(ino.0, read, write, caller(req));
        op.reply(reply, res, |r, (fh, mode)| {
            r.opened(FileHandle(fh), open_flags(mode))
        });
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let op = self.op("read", req, ino);
        if let Some(t) = self.target(ino) {
            return self.g_read(op, t, fh, offset, size, reply);
        }
        let (c, vfs) = (caller(req), self.vfs.clone());
        let read = async move { vfs.read(fh.0, offset, size, c).await };
        self.spawn(op, reply, read, |r, d| r.data(&d));
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let op = self.op("write", req, ino);
        if let Some(t) = self.target(ino) {
            return self.g_write(op, t, fh, offset, data, reply);
        }
        let (c, vfs, data) = (caller(req), self.vfs.clone(), data.to_vec());
        let write = async move { vfs.write(fh.0, offset, &data, c).await };
        self.spawn(op, reply, write, |r, n| r.written(n));
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let op = self.op("flush", req, ino);
        // Guest files buffer nothing on the host: close has nothing to flush.
        if self.target(ino).is_some() {
            return reply.ok();
        }
        let (c, vfs) = (caller(req), self.vfs.clone());
        self.spawn(op, reply, async move { vfs.flush(fh.0, c).await }, ok);
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        guest::note_caller(req);
        let _guard = self.rt.enter();
        match self.target(ino) {
            Some(t) => self.guest.release(&t, fh.0, false),
            None => self.vfs.release(fh.0),
        }
        reply.ok();
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let op = self.op("fsync", req, ino);
        match self.target(ino) {
            Some(t) => self.g_fsync(op, t, fh, datasync, reply),
            None => {
                let vfs = self.vfs.clone();
                self.spawn(op, reply, async move { vfs.fsync(fh.0).await }, ok);
            }
        }
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let op = self.op("fsyncdir", req, ino);
        match self.target(ino) {
            Some(t) => self.g_fsync(op, t, fh, datasync, reply),
            None => reply.ok(),
        }
    }

    fn releasedir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        guest::note_caller(req);
        if let Some(t) = self.target(ino) {
            let _guard = self.rt.enter();
            self.guest.release(&t, fh.0, true);
        }
        reply.ok();
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let op = self.op("statfs", req, ino);
        match self.target(ino) {
            Some(t) => self.g_statfs(op, t, reply),
            None => reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let op = self.op("setxattr", req, ino);
        if let Some((t, reply)) = self.fs_only(&op, ino, reply, policy::set_xattr) {
            self.g_setxattr(op, t, name, value, flags, reply);
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let op = self.op("removexattr", req, ino);
        if let Some((t, reply)) = self.fs_only(&op, ino, reply, policy::no_xattr) {
            self.g_removexattr(op, t, name, reply);
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let op = self.op("fallocate", req, ino);
        if let Some((t, reply)) = self.fs_only(&op, ino, reply, policy::fallocate) {
            self.g_fallocate(op, t, fh, offset, length, mode, reply);
        }
    }

    fn lseek(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let op = self.op("lseek", req, ino);
        if let Some((t, reply)) = self.fs_only(&op, ino, reply, policy::lseek) {
            self.g_lseek(op, t, fh, offset, whence, reply);
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let op = self.op("opendir", req, ino);
        match self.target(ino) {
            Some(t) => self.g_opendir(op, t, reply),
            None => op.reply(reply, self.vfs.opendir(ino.0), |r, ()| {
                r.opened(FileHandle(0), FopenFlags::empty())
            }),
        }
    }

    fn readdir(&self, req: &Request, ino: INodeNo, fh: FileHandle, at: u64, r: ReplyDirectory) {
        self.list(req, ino, fh, at, r);
    }

    fn readdirplus(&self, req: &Request, ino: INodeNo, fh: FileHandle, at: u64, r: Plus) {
        self.list(req, ino, fh, at, r);
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let op = self.op("getxattr", req, ino);
        if let Some((t, reply)) = self.fs_only(&op, ino, reply, policy::no_xattr) {
            self.g_getxattr(op, t, name, size, reply);
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let op = self.op("listxattr", req, ino);
        match self.target(ino) {
            Some(t) => self.g_listxattr(op, t, size, reply),
            // Control files carry no extended attributes: an empty list.
            None if size == 0 => reply.size(0),
            None => reply.data(&[]),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let op = self.op("create", req, parent);
        if let Some((t, reply)) = self.fs_only(&op, parent, reply, policy::create) {
            self.g_create(op, req, t, name, mode, flags, reply);
        }
    }
}
