//! The fuser adapter: translates kernel requests into [`files::Files`] / [`tree::Tree`]
//! calls and their results into replies. No filesystem logic lives here.
//!
//! Requests for inodes under a VM's `fs/` go to [`guest`] (and from there to
//! [`crate::guestfs`]); everything else is the control tree.
//!
//! Invariants: a FUSE thread never waits on a guest or a VMM. Anything that may wait
//! (ctl writes, exec, stream reads, mkdir/rmdir) is moved into a tokio task that owns
//! the reply; everything else answers inline from memory or local files.
#![allow(
    clippy::cast_possible_truncation,
    reason = "casts to audit once the concurrent rework of this file merges (issue 16)"
)]
pub mod files;
pub mod guest;
pub mod rootops;
pub mod tree;

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::error::Error;
use crate::guestfs::{GuestFs, Target, FS_INO_BASE};
use files::{Caller, Files};
use tree::{Attr, Kind, Node};

/// The control tree changes behind the kernel's back (VMs come and go through `ctl`,
/// runs appear), so names and attributes are not cached.
const TTL: Duration = Duration::ZERO;

/// Lifetime of the cached names of VM directories and their `fs/` entries.
const VM_ENTRY_TTL: Duration = Duration::from_secs(10);

/// Lifetime of the cached attributes of the root and of VM directories. Every path into
/// a guest crosses both, and the kernel checks a directory's permissions with its
/// attributes at each step of a path walk: uncached, each `stat` of a guest file cost two
/// extra requests. Changes made behind the kernel's back (`ctl`, clones, state changes)
/// invalidate them on the VM's event (`invalidate_vm_entries`); the lifetime bounds what
/// is left (a missed event).
const DIR_ATTR_TTL: Duration = Duration::from_secs(1);

/// How long the kernel may keep `node`'s attributes.
fn attr_ttl(node: &Node) -> Duration {
    match node {
        Node::Root | Node::Vm(_) => DIR_ATTR_TTL,
        _ => TTL,
    }
}

pub struct BandsoxFs {
    files: Arc<Files>,
    guest: Arc<GuestFs>,
    rt: tokio::runtime::Handle,
}

/// The errno a failed call answers the kernel with. Every `Error` reply passes here, so
/// `BANDSOX_LOG=debug` shows each one, after fuser's own debug line naming the request
/// (`FUSE(unique) ino ... OP ...`) on the same thread.
fn errno(e: &Error) -> Errno {
    tracing::debug!(
        errno = e.errno,
        name = ?nix::errno::Errno::from_raw(e.errno),
        "fuse reply: {}",
        e.message
    );
    Errno::from_i32(e.errno)
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
        kind: match a.kind {
            Kind::Dir => FileType::Directory,
            Kind::File => FileType::RegularFile,
            Kind::Symlink => FileType::Symlink,
        },
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
        session: tree::session_of(req.pid()),
    }
}

fn name_str(name: &OsStr) -> Result<&str, Error> {
    name.to_str()
        .ok_or_else(|| Error::invalid("names in the control tree are UTF-8"))
}

impl BandsoxFs {
    pub fn new(files: Arc<Files>, guest: Arc<GuestFs>, rt: tokio::runtime::Handle) -> Self {
        BandsoxFs { files, guest, rt }
    }

    /// The `fs/` target an inode stands for, if it is one.
    fn target(&self, ino: INodeNo) -> Option<Target> {
        if ino.0 >= FS_INO_BASE {
            return Some(Target::Node(ino.0));
        }
        match self.files.tree.node(ino.0) {
            Ok(Node::VmFs(vm_id, generation)) => Some(Target::Root {
                vm_id,
                generation,
                ino: ino.0,
            }),
            _ => None,
        }
    }

    fn node(&self, ino: INodeNo) -> Result<Node, Error> {
        self.files.tree.node(ino.0)
    }

    /// A control-tree directory's entries: `(name, type, ino)`, with `.` and `..`.
    fn tree_listing(&self, ino: INodeNo) -> Result<Vec<(String, FileType, u64)>, Error> {
        let node = self.node(ino)?;
        let entries = self.files.tree.readdir(&node)?;
        let mut all = vec![
            (".".to_string(), FileType::Directory, ino.0),
            ("..".to_string(), FileType::Directory, tree::ROOT_INO),
        ];
        for (name, child) in entries {
            let kind = match child {
                Node::RunsLast(_) => FileType::Symlink,
                Node::Root
                | Node::Images
                | Node::Image(_)
                | Node::Snapshots
                | Node::Snapshot(_)
                | Node::Vm(_)
                | Node::VmFs(..)
                | Node::Runs(_)
                | Node::Run(..) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            all.push((name, kind, self.files.tree.ino(&child)));
        }
        Ok(all)
    }

    fn entry(&self, node: &Node, reply: ReplyEntry) {
        // VM directories and their `fs/` sit on every path into a guest: their names are
        // cached (and invalidated on every VM event, see `invalidate_vm_entries`), their
        // attributes are not.
        let entry_ttl = match node {
            Node::Vm(_) | Node::VmFs(..) => VM_ENTRY_TTL,
            _ => TTL,
        };
        match self.files.tree.attr(node) {
            Ok(a) => reply.entry_with_ttls(
                &attr_ttl(node),
                &entry_ttl,
                &to_fuse_attr(&a),
                Generation(0),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

impl fuser::Filesystem for BandsoxFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let abi = config.kernel_abi();
        EXPIRE_ONLY.store(
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
        guest::note_caller(req);
        if let Some(t) = self.target(parent) {
            return self.g_lookup(t, name, reply);
        }
        // `runs/last` is a symlink resolved per caller in `readlink`, so lookup is caller-free.
        let res = self
            .node(parent)
            .and_then(|p| self.files.tree.lookup(&p, name_str(name)?));
        match res {
            Ok(node) => self.entry(&node, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        guest::note_caller(req);
        if let Some(t) = self.target(ino) {
            return self.g_getattr(t, fh, reply);
        }
        let res = self.node(ino).and_then(|n| {
            let mut a = self.files.tree.attr(&n)?;
            // `events` files are per reader: their size is the caller's view.
            if let Some(len) = self.files.events_len(&n, req.uid()) {
                a.size = len;
            }
            Ok((attr_ttl(&n), a))
        });
        match res {
            Ok((ttl, a)) => reply.attr(&ttl, &to_fuse_attr(&a)),
            Err(e) => reply.error(errno(&e)),
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
        guest::note_caller(req);
        if let Some(t) = self.target(ino) {
            return self.g_setattr(t, mode, uid, gid, size, atime, mtime, fh, reply);
        }
        // Truncation (`echo x > ctl` opens with O_TRUNC) and time updates are accepted
        // and ignored: control files have no stored content to cut. Ownership and mode
        // are fixed.
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::from_i32(libc::EPERM));
        }
        match self.node(ino).and_then(|n| self.files.tree.attr(&n)) {
            Ok(a) => reply.attr(&TTL, &to_fuse_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        guest::note_caller(req);
        if let Some(t) = self.target(ino) {
            return self.g_readlink(t, reply);
        }
        let res = self.node(ino).and_then(|n| match n {
            Node::RunsLast(id) => self
                .files
                .tree
                .last_run(&id, tree::session_of(req.pid()))
                .map(|n| n.to_string()),
            _ => Err(Error::invalid("not a symlink")),
        });
        match res {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(errno(&e)),
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
        guest::note_caller(req);
        if let Some(t) = self.target(parent) {
            return self.g_mkdir(req, t, name, mode, reply);
        }
        let parent = match self.node(parent) {
            Ok(p) => p,
            Err(e) => return reply.error(errno(&e)),
        };
        if parent != Node::Root {
            return reply.error(Errno::from_i32(libc::EPERM));
        }
        let name = match name_str(name) {
            Ok(n) => n.to_string(),
            Err(e) => return reply.error(errno(&e)),
        };
        let c = caller(req);
        let files = self.files.clone();
        let busy = files.root_ops.begin();
        self.rt.spawn(async move {
            let _busy = busy;
            let mgr = files.tree.mgr.clone();
            // Interruptible: the boot goes on, its failure lands in the caller's ctl result.
            let (m, n) = (mgr.clone(), name.clone());
            let boot = async move { m.create(&n, &[], c.uid, c.gid).await };
            let (m, n) = (mgr.clone(), name.clone());
            let abandoned = move |res: Result<_, Error>| {
                if let Err(e) = res {
                    let e = e.with_context(&format!("mkdir {n}"));
                    let _ = m.ctl_results().record(c.session, Err(e));
                }
            };
            let res = crate::interrupt::detachable(c.pid, boot, abandoned)
                .await
                .and_then(|r| r);
            match res {
                Ok(vm) => match files.tree.attr(&Node::Vm(vm.id.clone())) {
                    Ok(a) => reply.entry(&TTL, &to_fuse_attr(&a), Generation(0)),
                    Err(e) => reply.error(errno(&e)),
                },
                Err(e) => {
                    let e = e.with_context(&format!("mkdir {name}"));
                    let _ = mgr.ctl_results().record(c.session, Err(e.clone()));
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guest::note_caller(req);
        if let Some(t) = self.target(parent) {
            return self.g_unlink(t, name, true, reply);
        }
        let parent = match self.node(parent) {
            Ok(p) => p,
            Err(e) => return reply.error(errno(&e)),
        };
        let name = match name_str(name) {
            Ok(n) => n.to_string(),
            Err(e) => return reply.error(errno(&e)),
        };
        match parent {
            Node::Root => {}
            Node::Images => {
                let c = caller(req);
                let mgr = self.files.tree.mgr.clone();
                let res = mgr.remove_image(&name, c.uid);
                if let Err(e) = &res {
                    let _ = mgr.ctl_results().record(c.session, Err(e.clone()));
                }
                return match res {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(errno(&e)),
                };
            }
            Node::Snapshots => {
                let c = caller(req);
                let Some((owner, _)) = self.files.tree.mgr.snapshot_owner(&name) else {
                    return reply.error(Errno::from_i32(libc::ENOENT));
                };
                if c.uid != 0 && c.uid != owner {
                    return reply.error(Errno::from_i32(libc::EPERM));
                }
                let mgr = self.files.tree.mgr.clone();
                self.rt.spawn(async move {
                    let delete = async move { mgr.delete_snapshot(&name).await };
                    match crate::interrupt::detachable(c.pid, delete, drop)
                        .await
                        .and_then(|r| r)
                    {
                        Ok(()) => reply.ok(),
                        Err(e) => reply.error(errno(&e)),
                    }
                });
                return;
            }
            Node::Runs(_) => return reply.error(Errno::from_i32(libc::EPERM)),
            _ => return reply.error(Errno::from_i32(libc::ENOTDIR)),
        }
        let Some(vm) = self.files.tree.mgr.get(&name) else {
            let errno = if self.files.tree.lookup(&Node::Root, &name).is_ok() {
                libc::ENOTDIR
            } else {
                libc::ENOENT
            };
            return reply.error(Errno::from_i32(errno));
        };
        let c = caller(req);
        if c.uid != 0 && c.uid != vm.uid {
            return reply.error(Errno::from_i32(libc::EPERM));
        }
        let files = self.files.clone();
        let busy = files.root_ops.begin();
        self.rt.spawn(async move {
            let _busy = busy;
            let mgr = files.tree.mgr.clone();
            let delete = async move { mgr.delete(&name).await };
            match crate::interrupt::detachable(c.pid, delete, drop)
                .await
                .and_then(|r| r)
            {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guest::note_caller(req);
        if let Some(t) = self.target(parent) {
            return self.g_unlink(t, name, false, reply);
        }
        reply.error(Errno::from_i32(libc::EPERM));
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
        guest::note_caller(req);
        match self.target(parent) {
            Some(t) => self.g_mknod(req, t, name, mode, rdev, reply),
            None => reply.error(Errno::from_i32(libc::EPERM)),
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
        guest::note_caller(req);
        match self.target(parent) {
            Some(t) => self.g_symlink(req, t, link_name, target, reply),
            None => reply.error(Errno::from_i32(libc::EPERM)),
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
        guest::note_caller(req);
        match (self.target(ino), self.target(newparent)) {
            (Some(t), Some(p)) => self.g_link(t, p, newname, reply),
            (None, None) => reply.error(Errno::from_i32(libc::EPERM)),
            _ => reply.error(Errno::from_i32(libc::EXDEV)),
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
        guest::note_caller(req);
        match (self.target(parent), self.target(newparent)) {
            (Some(p), Some(np)) => self.g_rename(p, name, np, newname, flags.bits(), reply),
            (None, None) => reply.error(Errno::from_i32(libc::EPERM)),
            _ => reply.error(Errno::from_i32(libc::EXDEV)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        guest::note_caller(req);
        if let Some(t) = self.target(ino) {
            return self.g_open(t, flags.0, reply);
        }
        let (read, write) = match flags.acc_mode() {
            OpenAccMode::O_RDONLY => (true, false),
            OpenAccMode::O_WRONLY => (false, true),
            _ => (true, true),
        };
        let res = self
            .node(ino)
            .and_then(|n| self.files.open(&n, read, write, caller(req)));
        match res {
            Ok((fh, mode)) => {
                let mut f = FopenFlags::empty();
                if mode.direct_io {
                    f |= FopenFlags::FOPEN_DIRECT_IO;
                }
                if mode.nonseekable {
                    f |= FopenFlags::FOPEN_NONSEEKABLE | FopenFlags::FOPEN_STREAM;
                }
                reply.opened(FileHandle(fh), f)
            }
            Err(e) => reply.error(errno(&e)),
        }
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
        guest::note_caller(req);
        if let Some(t) = self.target(ino) {
            return self.g_read(t, fh, offset, size, reply);
        }
        let c = caller(req);
        let files = self.files.clone();
        self.rt.spawn(async move {
            match files.read(fh.0, offset, size, c).await {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(errno(&e)),
            }
        });
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
        guest::note_caller(req);
        if let Some(t) = self.target(ino) {
            return self.g_write(t, fh, offset, data, reply);
        }
        let c = caller(req);
        let files = self.files.clone();
        let data = data.to_vec();
        self.rt.spawn(async move {
            match files.write(fh.0, offset, &data, c).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        guest::note_caller(req);
        // Guest files buffer nothing on the host: close has nothing to flush.
        if self.target(ino).is_some() {
            return reply.ok();
        }
        let c = caller(req);
        let files = self.files.clone();
        self.rt.spawn(async move {
            match files.flush(fh.0, c).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
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
        if let Some(t) = self.target(ino) {
            return self.g_release(t, fh, false, reply);
        }
        let _guard = self.rt.enter();
        self.files.release(fh.0);
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
        guest::note_caller(req);
        match self.target(ino) {
            Some(t) => self.g_fsync(t, fh, datasync, reply),
            None => {
                let files = self.files.clone();
                self.rt.spawn(async move {
                    match files.fsync(fh.0).await {
                        Ok(()) => reply.ok(),
                        Err(e) => reply.error(errno(&e)),
                    }
                });
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
        guest::note_caller(req);
        match self.target(ino) {
            Some(t) => self.g_fsync(t, fh, datasync, reply),
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
        match self.target(ino) {
            Some(t) => self.g_release(t, fh, true, reply),
            None => reply.ok(),
        }
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        guest::note_caller(req);
        match self.target(ino) {
            Some(t) => self.g_statfs(t, reply),
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
        guest::note_caller(req);
        match self.target(ino) {
            Some(t) => self.g_setxattr(t, name, value, flags, reply),
            None => reply.error(Errno::from_i32(libc::ENOTSUP)),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guest::note_caller(req);
        match self.target(ino) {
            Some(t) => self.g_removexattr(t, name, reply),
            None => reply.error(Errno::from_i32(libc::ENODATA)),
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
        guest::note_caller(req);
        match self.target(ino) {
            Some(t) => self.g_fallocate(t, fh, offset, length, mode, reply),
            None => reply.error(Errno::from_i32(libc::EOPNOTSUPP)),
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
        guest::note_caller(req);
        match self.target(ino) {
            Some(t) => self.g_lseek(t, fh, offset, whence, reply),
            None => reply.error(Errno::from_i32(libc::EINVAL)),
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        guest::note_caller(req);
        if let Some(t) = self.target(ino) {
            return self.g_readdirplus(t, fh, offset, reply);
        }
        // Control tree: the same listing with attributes, never cached (TTL 0).
        let all = match self.tree_listing(ino) {
            Ok(a) => a,
            Err(e) => return reply.error(errno(&e)),
        };
        for (i, (name, kind, child)) in all.into_iter().enumerate().skip(offset as usize) {
            let mut attr = match self
                .files
                .tree
                .node(child)
                .and_then(|n| self.files.tree.attr(&n))
            {
                Ok(a) => to_fuse_attr(&a),
                Err(_) => continue,
            };
            attr.kind = kind;
            // `.` and `..` are never looked up by the kernel; the rest count as lookups
            // of control-tree inodes, which are never forgotten.
            if reply.add(
                INodeNo(child),
                (i + 1) as u64,
                &name,
                &TTL,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        guest::note_caller(req);
        if let Some(t) = self.target(ino) {
            return self.g_opendir(t, reply);
        }
        match self.node(ino).and_then(|n| self.files.tree.check(&n)) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        guest::note_caller(req);
        if let Some(t) = self.target(ino) {
            return self.g_readdir(t, fh, offset, reply);
        }
        let all = match self.tree_listing(ino) {
            Ok(a) => a,
            Err(e) => return reply.error(errno(&e)),
        };
        for (i, (name, kind, ino)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        guest::note_caller(req);
        if let Some(t) = self.target(ino) {
            return self.g_getxattr(t, name, size, reply);
        }
        // Control files carry no extended attributes.
        reply.error(Errno::from_i32(libc::ENODATA));
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        guest::note_caller(req);
        if let Some(t) = self.target(ino) {
            return self.g_listxattr(t, size, reply);
        }
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
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
        guest::note_caller(req);
        if let Some(t) = self.target(parent) {
            return self.g_create(req, t, name, mode, flags, reply);
        }
        reply.error(Errno::from_i32(libc::EACCES));
    }
}

/// The kernel expires entries on request (`FUSE_EXPIRE_ONLY`, FUSE 7.38, Linux 6.2):
/// set at INIT from the version the kernel speaks.
static EXPIRE_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Guest change events → the kernel's caches, through the FUSE notify channel.
///
/// A name event *expires* the kernel's entry where the kernel can do that: its next use
/// looks the name up again and keeps the dentry when the answer is the same inode, so a
/// directory that is someone's working directory is never unhashed while it still
/// exists. Older kernels get a plain invalidation.
pub struct KernelInvalidator {
    pub notifier: fuser::Notifier,
    /// A duplicate of the session's `/dev/fuse` descriptor, for the notification fuser
    /// has no call for.
    pub dev: Option<std::os::fd::OwnedFd>,
}

/// `FUSE_NOTIFY_INVAL_ENTRY` with `FUSE_EXPIRE_ONLY`, written as one message.
fn expire_entry(dev: std::os::fd::BorrowedFd<'_>, parent: u64, name: &[u8]) -> std::io::Result<()> {
    const FUSE_NOTIFY_INVAL_ENTRY: i32 = 3;
    const FUSE_EXPIRE_ONLY: u32 = 1;
    let namelen = u32::try_from(name.len()).map_err(std::io::Error::other)?;
    // fuse_out_header (len, error = notify code, unique = 0), then
    // fuse_notify_inval_entry_out (parent, namelen, flags), then the name and a NUL.
    let len = 16 + 16 + name.len() + 1;
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&FUSE_NOTIFY_INVAL_ENTRY.to_ne_bytes());
    msg.extend_from_slice(&0u64.to_ne_bytes());
    msg.extend_from_slice(&parent.to_ne_bytes());
    msg.extend_from_slice(&namelen.to_ne_bytes());
    msg.extend_from_slice(&FUSE_EXPIRE_ONLY.to_ne_bytes());
    msg.extend_from_slice(name);
    msg.push(0);
    let n = nix::unistd::write(dev, &msg).map_err(std::io::Error::from)?;
    if n != len {
        return Err(std::io::Error::other("short notification write"));
    }
    Ok(())
}

impl crate::guestfs::Invalidate for KernelInvalidator {
    fn entry(&self, parent: u64, name: &[u8]) {
        use std::os::fd::AsFd;
        use std::os::unix::ffi::OsStrExt;
        let res = match &self.dev {
            Some(dev) if EXPIRE_ONLY.load(std::sync::atomic::Ordering::Relaxed) => {
                expire_entry(dev.as_fd(), parent, name)
            }
            _ => self
                .notifier
                .inval_entry(INodeNo(parent), OsStr::from_bytes(name)),
        };
        // ENOENT: the kernel holds no such entry, which is fine.
        if let Err(e) = res {
            if e.raw_os_error() != Some(libc::ENOENT) {
                tracing::debug!("invalidate entry {parent}/{name:?}: {e}");
            }
        }
    }

    fn inode(&self, ino: u64, data: bool) {
        // offset -1: attributes only; 0 with length 0: attributes and all pages.
        let offset = if data { 0 } else { -1 };
        if let Err(e) = self.notifier.inval_inode(INodeNo(ino), offset, 0) {
            if e.raw_os_error() != Some(libc::ENOENT) {
                tracing::debug!("invalidate inode {ino}: {e}");
            }
        }
    }
}

/// Keep the cached VM-directory and `fs/` names right: after any event of a VM (boot,
/// exit, delete, ...) drop the kernel's entries for its name and for its `fs/`, whose
/// inode changes with every boot. Runs until the event log goes away. Root names are
/// deferred while a root `mkdir`/`rmdir` is in flight (see [`rootops`]).
pub fn invalidate_vm_entries(files: Arc<Files>, notifier: fuser::Notifier) {
    let mut rx = files.tree.mgr.events.subscribe();
    {
        let (files, notifier) = (files.clone(), notifier.clone());
        tokio::spawn(async move {
            loop {
                let names = files.root_ops.take_deferred_when_idle().await;
                let n = notifier.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    use crate::guestfs::Invalidate;
                    let inv = KernelInvalidator {
                        notifier: n,
                        dev: None,
                    };
                    for name in names {
                        inv.entry(tree::ROOT_INO, name.as_bytes());
                    }
                    inv.inode(tree::ROOT_INO, false);
                })
                .await;
            }
        });
    }
    tokio::spawn(async move {
        loop {
            let name = match rx.recv().await {
                Ok(n) => n,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            };
            let vm_ino = files
                .tree
                .mgr
                .get(&name)
                .map(|vm| files.tree.ino(&Node::Vm(vm.id.clone())));
            let root_names = files.root_ops.invalidate_now(&name).unwrap_or_default();
            let n = notifier.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let inv = KernelInvalidator {
                    notifier: n,
                    dev: None,
                };
                use crate::guestfs::Invalidate;
                // Root names and attributes only when no root mkdir/rmdir holds the
                // root's lock (`root_ops`); otherwise after it, by the task above.
                let root_now = !root_names.is_empty();
                for name in root_names {
                    inv.entry(tree::ROOT_INO, name.as_bytes());
                }
                if root_now {
                    inv.inode(tree::ROOT_INO, false);
                }
                if let Some(ino) = vm_ino {
                    inv.entry(ino, b"fs");
                    inv.inode(ino, false);
                }
            })
            .await;
        }
    });
}
