//! The fuser adapter: translates kernel requests into [`files::Files`] / [`tree::Tree`]
//! calls and their results into replies. No filesystem logic lives here.
//!
//! Invariants: a FUSE thread never waits on a guest or a VMM. Anything that may wait
//! (ctl writes, exec, stream reads, mkdir/rmdir) is moved into a tokio task that owns
//! the reply; everything else answers inline from memory or local files.
pub mod files;
pub mod tree;

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::error::Error;
use files::{Caller, Files};
use tree::{Attr, Kind, Node};

/// The control tree changes behind the kernel's back (VMs come and go through `ctl`,
/// runs appear), so names and attributes are not cached.
const TTL: Duration = Duration::ZERO;

pub struct BandsoxFs {
    files: Arc<Files>,
    rt: tokio::runtime::Handle,
}

fn errno(e: &Error) -> Errno {
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
    pub fn new(files: Arc<Files>, rt: tokio::runtime::Handle) -> Self {
        BandsoxFs { files, rt }
    }

    fn node(&self, ino: INodeNo) -> Result<Node, Error> {
        self.files.tree.node(ino.0)
    }

    fn entry(&self, node: &Node, reply: ReplyEntry) {
        match self.files.tree.attr(node) {
            Ok(a) => reply.entry(&TTL, &to_fuse_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

impl fuser::Filesystem for BandsoxFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1024 * 1024);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        // `runs/last` is a symlink resolved per caller in `readlink`, so lookup is caller-free.
        let res = self
            .node(parent)
            .and_then(|p| self.files.tree.lookup(&p, name_str(name)?));
        match res {
            Ok(node) => self.entry(&node, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino).and_then(|n| self.files.tree.attr(&n)) {
            Ok(a) => reply.attr(&TTL, &to_fuse_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
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
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
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
        self.rt.spawn(async move {
            let mgr = files.tree.mgr.clone();
            let res = mgr.create(&name, &[], c.uid, c.gid).await;
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
            Node::Images | Node::Snapshots | Node::Runs(_) => {
                return reply.error(Errno::from_i32(libc::EPERM))
            }
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
        self.rt.spawn(async move {
            match files.tree.mgr.delete(&name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::from_i32(libc::EPERM));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
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
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
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
        _ino: INodeNo,
        fh: FileHandle,
        _offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let c = caller(req);
        let files = self.files.clone();
        let data = data.to_vec();
        self.rt.spawn(async move {
            match files.write(fh.0, &data, c).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
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
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _guard = self.rt.enter();
        self.files.release(fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino).and_then(|n| self.files.tree.check(&n)) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(errno(&e)),
        };
        let entries = match self.files.tree.readdir(&node) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(&e)),
        };
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
                | Node::Vm(_)
                | Node::Runs(_)
                | Node::Run(..) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            all.push((name, kind, self.files.tree.ino(&child)));
        }
        for (i, (name, kind, ino)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        // Control files carry no extended attributes.
        reply.error(Errno::from_i32(libc::ENODATA));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(Errno::from_i32(libc::EACCES));
    }
}
