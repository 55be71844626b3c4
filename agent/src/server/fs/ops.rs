//! Names, attributes and the namespace: lookup, getattr/setattr, readlink, mknod, mkdir,
//! symlink, link, unlink/rmdir, rename, create, statfs.
//!
//! Invariants:
//! * Names are checked with [`valid_name`] (`EINVAL` otherwise) and resolved only with
//!   `openat(parent, name, O_PATH | O_NOFOLLOW)` / `fstatat(.., AT_SYMLINK_NOFOLLOW)`
//!   relative to a node's descriptor: no symlink is ever followed, no path is built.
//! * A returned [`Entry`] added one reference to its node exactly when it says
//!   `counted` (see [`super::nodes`]).
//! * `Entry::coherent` is true when the parent directory is watched.
//! * Opaque nodes (see [`super::pseudo`]): lookups in them are `ENOENT`; creating,
//!   removing, renaming or linking in them, and changing their attributes, is `EACCES`.
//! * New nodes are chowned to the request's [`Owner`] when it differs from the agent's
//!   euid/egid (the gid is left alone in a setgid directory, like the kernel does); a
//!   failure is logged and ignored. Set-id bits the chown cleared are restored.
use std::ffi::CStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;

use super::handles::Handle;
use super::nodes::Node;
use super::{sys, FsCore};
use crate::proto::fs::{
    valid_name, Attr, Entry, HandleId, NodeId, NodeRef, Owner, SetAttrs, SetTime, StatFs,
};

const O_NODE: i32 = libc::O_PATH | libc::O_NOFOLLOW;

/// A validated name as a C string (`ENAMETOOLONG` past 255 bytes, as the kernel answers;
/// `EINVAL` for anything else that is not one path component).
pub(super) fn check_name(name: &[u8]) -> Result<std::ffi::CString, Errno> {
    if name.len() > crate::proto::fs::MAX_NAME {
        return Err(Errno::ENAMETOOLONG);
    }
    if !valid_name(name) {
        return Err(Errno::EINVAL);
    }
    sys::cstring(name)
}

impl FsCore {
    /// A directory node that may be changed (`EACCES` when opaque).
    fn writable_dir(&self, id: &NodeRef) -> Result<std::sync::Arc<Node>, Errno> {
        let n = self.nodes.get(id)?;
        if n.opaque {
            return Err(Errno::EACCES);
        }
        Ok(n)
    }

    /// Register the inode `fd` (found in `parent`) and answer its entry.
    pub(super) fn register_entry(&self, parent: &Node, fd: OwnedFd) -> Result<Entry, Errno> {
        let st = sys::stat_fd(fd.as_fd())?;
        let r = self.nodes.register(parent, fd, &st, &self.proc)?;
        Ok(Entry {
            node: r.node.node_ref(),
            attr: sys::to_attr(&st),
            coherent: self.nodes.is_watched(parent.id),
            counted: r.counted,
            watched: r.watched,
            xattrs: super::xattr::entry_names(&r.node),
        })
    }

    /// Look `name` (validated) up in `parent`.
    pub(super) fn lookup_in(&self, parent: &Node, name: &CStr) -> Result<Entry, Errno> {
        if parent.opaque {
            return Err(Errno::ENOENT);
        }
        let fd = sys::openat(parent.fd(), name, O_NODE, 0)?;
        self.register_entry(parent, fd)
    }

    pub(super) fn lookup(&self, parent: &NodeRef, name: &[u8]) -> Result<Entry, Errno> {
        let p = self.nodes.get(parent)?;
        let name = check_name(name)?;
        self.lookup_in(&p, &name)
    }

    pub(super) fn getattr(&self, node: &NodeRef, handle: Option<HandleId>) -> Result<Attr, Errno> {
        if let Some(h) = handle {
            let h = self.handles.get(h)?;
            let fd = h.stat_fd();
            let fd = fd.fd().ok_or(Errno::EBADF)?;
            return sys::stat_fd(fd).map(|st| sys::to_attr(&st));
        }
        let n = self.nodes.get(node)?;
        sys::stat_fd(n.fd()).map(|st| sys::to_attr(&st))
    }

    /// `chmod` of a node (not for symlinks: `EOPNOTSUPP`, as Linux does).
    fn chmod_node(&self, n: &Node, mode: u32) -> Result<(), Errno> {
        if n.is_symlink() {
            return Err(Errno::EOPNOTSUPP);
        }
        nix::sys::stat::fchmodat(
            self.proc.fd(),
            sys::ProcFd::name(n.fd()).as_c_str(),
            nix::sys::stat::Mode::from_bits_retain(mode & 0o7777),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
    }

    pub(super) fn setattr(
        &self,
        node: &NodeRef,
        handle: Option<HandleId>,
        set: &SetAttrs,
    ) -> Result<Attr, Errno> {
        let n = self.nodes.get(node)?;
        if n.opaque {
            return Err(Errno::EACCES);
        }
        let h = handle.map(|h| self.handles.get(h)).transpose()?;
        // chown before chmod: a chown may clear set-id bits an explicit mode sets.
        if set.uid.is_some() || set.gid.is_some() {
            sys::chown_fd(n.fd(), set.uid, set.gid)?;
        }
        if let Some(mode) = set.mode {
            self.chmod_node(&n, mode)?;
        }
        if let Some(size) = set.size {
            let size = i64::try_from(size).map_err(|_| Errno::EFBIG)?;
            match h.as_deref() {
                Some(Handle::File(file)) => {
                    nix::unistd::ftruncate(file, size)?;
                }
                _ => {
                    if n.is_dir() {
                        return Err(Errno::EISDIR);
                    }
                    if !n.is_reg() {
                        return Err(Errno::EINVAL);
                    }
                    let fd = self.proc.reopen(n.fd(), libc::O_WRONLY | libc::O_NOCTTY)?;
                    nix::unistd::ftruncate(&fd, size)?;
                }
            }
        }
        if set.atime.is_some() || set.mtime.is_some() {
            self.utimens(&n, set.atime, set.mtime)?;
        }
        sys::stat_fd(n.fd()).map(|st| sys::to_attr(&st))
    }

    /// Set times with `UTIME_NOW`/`UTIME_OMIT` semantics, symlinks included.
    fn utimens(
        &self,
        n: &Node,
        atime: Option<SetTime>,
        mtime: Option<SetTime>,
    ) -> Result<(), Errno> {
        let ts = |t: Option<SetTime>| -> Result<libc::timespec, Errno> {
            Ok(match t {
                None => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                Some(SetTime::Now) => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                },
                Some(SetTime::At(t)) => {
                    if t.nsec >= 1_000_000_000 {
                        return Err(Errno::EINVAL);
                    }
                    libc::timespec {
                        tv_sec: t.sec,
                        tv_nsec: i64::from(t.nsec),
                    }
                }
            })
        };
        let times = [ts(atime)?, ts(mtime)?];
        match sys::utimens_fd(n.fd(), &times) {
            // Kernels before 5.8 reject AT_EMPTY_PATH here: go through /proc (which
            // cannot name a symlink without following it).
            Err(Errno::EINVAL) if !n.is_symlink() => {
                sys::utimens_at(self.proc.fd(), &sys::ProcFd::name(n.fd()), &times)
            }
            other => other,
        }
    }

    pub(super) fn readlink(&self, node: &NodeRef) -> Result<Vec<u8>, Errno> {
        let n = self.nodes.get(node)?;
        if !n.is_symlink() {
            return Err(Errno::EINVAL);
        }
        use std::os::unix::ffi::OsStringExt;
        nix::fcntl::readlinkat(n.fd(), c"").map(|t| t.into_vec())
    }

    /// Chown a new node to `owner` (see module docs). `mode` is what it was created with.
    fn chown_new(&self, parent: &Node, fd: BorrowedFd<'_>, owner: Owner, kind: u32, mode: u32) {
        let uid = (owner.uid != self.euid).then_some(owner.uid);
        let mut gid = (owner.gid != self.egid).then_some(owner.gid);
        if gid.is_some() {
            let setgid_dir = sys::stat_fd(parent.fd())
                .map(|st| st.st_mode & libc::S_ISGID != 0)
                .unwrap_or(false);
            if setgid_dir {
                gid = None;
            }
        }
        if uid.is_none() && gid.is_none() {
            return;
        }
        match sys::chown_fd(fd, uid, gid) {
            Ok(()) => {
                // The kernel clears set-id bits of non-directories on chown.
                if kind != libc::S_IFDIR && kind != libc::S_IFLNK && mode & 0o6000 != 0 {
                    let name = sys::ProcFd::name(fd);
                    if let Err(e) = nix::sys::stat::fchmodat(
                        self.proc.fd(),
                        name.as_c_str(),
                        nix::sys::stat::Mode::from_bits_retain(mode & 0o7777),
                        nix::sys::stat::FchmodatFlags::FollowSymlink,
                    ) {
                        tracing::debug!("cannot restore mode {mode:o} after chown: {e}");
                    }
                }
            }
            Err(Errno::EPERM) if self.euid != 0 => {}
            Err(e) => tracing::warn!("cannot chown new node to {}:{}: {e}", owner.uid, owner.gid),
        }
    }

    /// After creating `name` in `p`: open it, chown it, register it.
    fn made(&self, p: &Node, name: &CStr, owner: Owner, mode: u32) -> Result<Entry, Errno> {
        let fd = sys::openat(p.fd(), name, O_NODE, 0)?;
        let st = sys::stat_fd(fd.as_fd())?;
        self.chown_new(p, fd.as_fd(), owner, st.st_mode & libc::S_IFMT, mode);
        self.register_entry(p, fd)
    }

    pub(super) fn mknod(
        &self,
        parent: &NodeRef,
        name: &[u8],
        mode: u32,
        rdev: u64,
        owner: Owner,
    ) -> Result<Entry, Errno> {
        let p = self.writable_dir(parent)?;
        let name = check_name(name)?;
        use nix::sys::stat::{Mode, SFlag};
        // The type bits and the permission bits together are `mode` again, unchanged.
        let kind = SFlag::from_bits_retain(mode & libc::S_IFMT);
        let perm = Mode::from_bits_retain(mode & !libc::S_IFMT);
        nix::sys::stat::mknodat(p.fd(), name.as_c_str(), kind, perm, rdev)?;
        self.made(&p, &name, owner, mode)
    }

    pub(super) fn mkdir(
        &self,
        parent: &NodeRef,
        name: &[u8],
        mode: u32,
        owner: Owner,
    ) -> Result<Entry, Errno> {
        let p = self.writable_dir(parent)?;
        let name = check_name(name)?;
        nix::sys::stat::mkdirat(
            p.fd(),
            name.as_c_str(),
            nix::sys::stat::Mode::from_bits_retain(mode & 0o7777),
        )?;
        self.made(&p, &name, owner, mode)
    }

    pub(super) fn symlink(
        &self,
        parent: &NodeRef,
        name: &[u8],
        target: &[u8],
        owner: Owner,
    ) -> Result<Entry, Errno> {
        let p = self.writable_dir(parent)?;
        let name = check_name(name)?;
        if target.is_empty() {
            return Err(Errno::ENOENT);
        }
        if target.len() >= usize::try_from(libc::PATH_MAX).unwrap_or(4096) {
            return Err(Errno::ENAMETOOLONG);
        }
        let target = sys::cstring(target)?;
        nix::unistd::symlinkat(target.as_c_str(), p.fd(), name.as_c_str())?;
        self.made(&p, &name, owner, 0o777)
    }

    pub(super) fn link(
        &self,
        node: &NodeRef,
        new_parent: &NodeRef,
        new_name: &[u8],
    ) -> Result<Entry, Errno> {
        let n = self.nodes.get(node)?;
        let p = self.writable_dir(new_parent)?;
        if n.opaque {
            return Err(Errno::EACCES);
        }
        let name = check_name(new_name)?;
        // Through /proc so CAP_DAC_READ_SEARCH is not needed (AT_EMPTY_PATH would);
        // following the magic link names the inode itself, symlinks included.
        nix::unistd::linkat(
            self.proc.fd(),
            sys::ProcFd::name(n.fd()).as_c_str(),
            p.fd(),
            name.as_c_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
        )?;
        self.lookup_in(&p, &name)
    }

    pub(super) fn unlink(&self, parent: &NodeRef, name: &[u8], flags: i32) -> Result<(), Errno> {
        let p = self.writable_dir(parent)?;
        let name = check_name(name)?;
        use nix::unistd::UnlinkatFlags;
        // The kernel refuses any flag but AT_REMOVEDIR with EINVAL before the lookup.
        let flags = match flags {
            0 => UnlinkatFlags::NoRemoveDir,
            libc::AT_REMOVEDIR => UnlinkatFlags::RemoveDir,
            _ => return Err(Errno::EINVAL),
        };
        nix::unistd::unlinkat(p.fd(), name.as_c_str(), flags)
    }

    pub(super) fn rename(
        &self,
        parent: &NodeRef,
        name: &[u8],
        new_parent: &NodeRef,
        new_name: &[u8],
        flags: u32,
    ) -> Result<(NodeId, Attr), Errno> {
        let p = self.writable_dir(parent)?;
        let np = self.writable_dir(new_parent)?;
        let name = check_name(name)?;
        let new_name = check_name(new_name)?;
        // Flags are passed to the kernel as they are; it rejects unknown ones.
        nix::fcntl::renameat2(
            p.fd(),
            name.as_c_str(),
            np.fd(),
            new_name.as_c_str(),
            nix::fcntl::RenameFlags::from_bits_retain(flags),
        )?;
        // What the new name names now, for the host's own bookkeeping (a race with the
        // guest only costs the host a refresh).
        let moved = sys::stat_at(np.fd(), &new_name)?;
        Ok((
            self.nodes.reported(moved.st_dev, moved.st_ino),
            sys::to_attr(&moved),
        ))
    }

    /// Create and open `name`: (entry, handle).
    pub(super) fn create(
        &self,
        parent: &NodeRef,
        name: &[u8],
        mode: u32,
        flags: i32,
        owner: Owner,
    ) -> Result<(Entry, HandleId), Errno> {
        let p = self.writable_dir(parent)?;
        let name = check_name(name)?;
        let tmpfile = libc::O_TMPFILE & !libc::O_DIRECTORY;
        // O_DIRECT: see io.rs (unaligned buffers; the host kernel does direct I/O).
        let base = (flags
            & !(libc::O_NOFOLLOW | libc::O_CREAT | tmpfile | libc::O_PATH | libc::O_DIRECT))
            | libc::O_NOFOLLOW
            | libc::O_NOCTTY;
        let perm = mode & 0o7777;
        // Learn whether we created the file (only then is it chowned): try O_EXCL first.
        let mut attempts = 0;
        let (file_fd, created) = loop {
            attempts += 1;
            match sys::openat(p.fd(), &name, base | libc::O_CREAT | libc::O_EXCL, perm) {
                Ok(fd) => break (fd, true),
                Err(Errno::EEXIST) if flags & libc::O_EXCL == 0 => {
                    match sys::openat(p.fd(), &name, base & !libc::O_EXCL, 0) {
                        Ok(fd) => break (fd, false),
                        // Removed in between: try creating again (a few times).
                        Err(Errno::ENOENT) if attempts < 5 => continue,
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        };
        let node_fd = self.proc.reopen(file_fd.as_fd(), libc::O_PATH)?;
        if created {
            self.chown_new(&p, node_fd.as_fd(), owner, libc::S_IFREG, perm);
        }
        let entry = self.register_entry(&p, node_fd)?;
        let regular = entry.attr.mode & libc::S_IFMT == libc::S_IFREG;
        match self
            .handles
            .insert_file(std::fs::File::from(file_fd), regular)
        {
            Ok(h) => Ok((entry, h)),
            Err(e) => {
                if entry.counted {
                    self.nodes.forget(entry.node.id, 1);
                }
                Err(e)
            }
        }
    }

    pub(super) fn statfs(&self, node: &NodeRef) -> Result<StatFs, Errno> {
        let n = self.nodes.get(node)?;
        let st = sys::fstatfs(n.fd())?;
        Ok(StatFs {
            blocks: st.f_blocks,
            bfree: st.f_bfree,
            bavail: st.f_bavail,
            files: st.f_files,
            ffree: st.f_ffree,
            bsize: clamp_u32(st.f_bsize),
            namelen: clamp_u32(st.f_namelen),
            frsize: clamp_u32(st.f_frsize),
        })
    }
}

/// A statfs size field clamped into a `u32` (negative: 0).
fn clamp_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}
