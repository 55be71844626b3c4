//! The file service (see [`crate::proto::fs`]): the guest's filesystem by node and
//! handle ids.
//!
//! Modules, one concept each:
//! * [`nodes`]: the node table (identities and handles ↔ `O_PATH` descriptors, bounded).
//! * [`handles`]: open files and directories.
//! * [`ops`]: names, attributes and the namespace (lookup, setattr, mkdir, rename, ...).
//! * [`io`]: open/read/write/fsync/fallocate/lseek on handles.
//! * [`dir`]: directory listings.
//! * [`xattr`]: extended attributes.
//! * [`pseudo`]: opaque pseudo filesystems.
//! * [`watch`]: inotify coherence events.
//! * [`sys`]: syscall wrappers.
//!
//! Invariants:
//! * Every request runs on the blocking pool (`spawn_blocking`) and is answered with
//!   exactly one `Response::Fs` or `Response::Error { errno, message }` through the
//!   session's queue; the message names the operation (names printed lossily).
//! * The service state ([`FsCore`]) is shared by all sessions of an [`Agent`]; it is
//!   built once in [`FsService::new`], which also sets the process umask to 0 (so modes
//!   are applied exactly; commands get umask 022 in `exec`) and raises `RLIMIT_NOFILE`.
//! * Nodes that cannot be reopened are `ESTALE`, unknown handle ids `EBADF`.
mod dir;
mod handles;
mod io;
mod nodes;
mod ops;
mod pseudo;
mod sys;
mod watch;
mod xattr;

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Weak};

use nix::errno::Errno;

use crate::proto::fs::{FsRequest, FsResponse, NodeId};
use crate::proto::{Id, Message, Response};
use crate::server::{Agent, Out, OutTx};
use handles::HandleTable;
use nodes::NodeTable;
use watch::Watcher;

pub(crate) use sys::original_nofile_limit;

/// The shared state of the service.
pub(crate) struct FsCore {
    nodes: NodeTable,
    handles: HandleTable,
    proc: sys::ProcFd,
    watcher: Watcher,
    euid: u32,
    egid: u32,
}

/// The file service of one agent.
pub(crate) struct FsService {
    core: Result<Arc<FsCore>, (Errno, String)>,
}

impl FsService {
    /// Serve `root` as [`crate::proto::fs::ROOT_NODE`]. A failure (no such directory, no
    /// /proc) is logged and every request answers it.
    pub fn new(root: &Path) -> FsService {
        nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        sys::raise_nofile_limit();
        let core = FsCore::new(root, watch::DEFAULT_WATCH_LIMIT);
        if let Err((_, msg)) = &core {
            tracing::error!("file service unavailable: {msg}");
        }
        FsService { core }
    }

    /// Register a session for events; the registration ends when the guard drops.
    pub fn register_session(&self, out: &OutTx) -> Option<SessionEvents> {
        let core = self.core.as_ref().ok()?;
        core.watcher.ensure_task(Arc::downgrade(core));
        let id = core.watcher.register(out.clone());
        Some(SessionEvents {
            core: Arc::downgrade(core),
            id,
        })
    }

    /// Queue every event the kernel has so far to `out` (and the other sessions) before
    /// returning: called before a command's `Exited` is queued.
    pub async fn flush_events(&self, out: &OutTx) {
        if let Ok(core) = &self.core {
            core.watcher.flush(core, out).await;
        }
    }

    /// Read and deliver the pending events now (see [`crate::server::Agent::deliver_fs_events`]).
    pub async fn deliver_events(&self) {
        if let Ok(core) = &self.core {
            core.watcher.deliver_now(core).await;
        }
    }
}

// The service stays consistent across a panic in a request (every lock ignores poison
// and each mutation is one map operation), so an `Agent` may be used after one (init
// mode restarts serving after a panic).
impl std::panic::RefUnwindSafe for FsService {}
impl std::panic::UnwindSafe for FsService {}

/// A session's registration for events (removed on drop).
pub(crate) struct SessionEvents {
    core: Weak<FsCore>,
    id: u64,
}

impl Drop for SessionEvents {
    fn drop(&mut self) {
        if let Some(core) = self.core.upgrade() {
            core.watcher.unregister(self.id);
        }
    }
}

impl FsCore {
    fn new(root: &Path, watch_limit: usize) -> Result<Arc<FsCore>, (Errno, String)> {
        let fail = |e: Errno, what: &str| (e, format!("{what}: {}", e.desc()));
        let proc = sys::ProcFd::open().map_err(|e| fail(e, "cannot open /proc/self/fd"))?;
        let croot = sys::cstring(root.as_os_str().as_encoded_bytes())
            .map_err(|e| fail(e, "bad root path"))?;
        let root_fd = sys::openat(
            nix::fcntl::AT_FDCWD,
            &croot,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .map_err(|e| fail(e, &format!("cannot open root {}", root.display())))?;
        let st = sys::stat_fd(root_fd.as_fd())
            .map_err(|e| fail(e, &format!("cannot stat root {}", root.display())))?;
        let (watcher, watches) = Watcher::new(watch_limit);
        Ok(Arc::new(FsCore {
            nodes: NodeTable::new(root_fd, &st, &proc, watches),
            handles: HandleTable::new(),
            proc,
            watcher,
            euid: nix::unistd::geteuid().as_raw(),
            egid: nix::unistd::getegid().as_raw(),
        }))
    }

    /// Run one request.
    fn handle(&self, req: &FsRequest) -> Result<FsResponse, Errno> {
        use FsRequest as R;
        use FsResponse as A;
        Ok(match *req {
            R::Lookup {
                ref parent,
                ref name,
            } => A::Entry(self.lookup(parent, name)?),
            R::GetAttr { ref node, handle } => A::Attr(self.getattr(node, handle)?),
            R::SetAttr {
                ref node,
                handle,
                set,
            } => A::Attr(self.setattr(node, handle, &set)?),
            R::ReadLink { ref node } => A::Data(self.readlink(node)?),
            R::Mknod {
                ref parent,
                ref name,
                mode,
                rdev,
                owner,
            } => A::Entry(self.mknod(parent, name, mode, rdev, owner)?),
            R::Mkdir {
                ref parent,
                ref name,
                mode,
                owner,
            } => A::Entry(self.mkdir(parent, name, mode, owner)?),
            R::Symlink {
                ref parent,
                ref name,
                ref target,
                owner,
            } => A::Entry(self.symlink(parent, name, target, owner)?),
            R::Link {
                ref node,
                ref new_parent,
                ref new_name,
            } => A::Entry(self.link(node, new_parent, new_name)?),
            R::Unlink {
                ref parent,
                ref name,
            } => {
                self.unlink(parent, name, 0)?;
                A::Ok
            }
            R::Rmdir {
                ref parent,
                ref name,
            } => {
                self.unlink(parent, name, libc::AT_REMOVEDIR)?;
                A::Ok
            }
            R::Rename {
                ref parent,
                ref name,
                ref new_parent,
                ref new_name,
                flags,
            } => {
                let (node, attr) = self.rename(parent, name, new_parent, new_name, flags)?;
                A::Moved { node, attr }
            }
            R::Open { ref node, flags } => A::Opened {
                handle: self.open(node, flags)?,
            },
            R::Create {
                ref parent,
                ref name,
                mode,
                flags,
                owner,
            } => {
                let (entry, handle) = self.create(parent, name, mode, flags, owner)?;
                A::Created { entry, handle }
            }
            R::Read {
                handle,
                offset,
                size,
            } => A::Data(self.read(handle, offset, size)?),
            R::Write {
                handle,
                offset,
                ref data,
            } => A::Written(self.write(handle, offset, data)?),
            R::Release { handle } | R::ReleaseDir { handle } => {
                self.handles.remove(handle)?;
                A::Ok
            }
            R::Fsync { handle, datasync } => {
                self.fsync(handle, datasync)?;
                A::Ok
            }
            R::OpenDir { ref node } => A::Opened {
                handle: self.opendir(node)?,
            },
            R::ReadDir {
                handle,
                offset,
                plus,
                max_bytes,
            } => A::DirEntries(self.readdir(handle, offset, plus, max_bytes)?),
            R::StatFs { ref node } => A::StatFs(self.statfs(node)?),
            R::SetXattr {
                ref node,
                ref name,
                ref value,
                flags,
            } => {
                self.setxattr(node, name, value, flags)?;
                A::Ok
            }
            R::GetXattr {
                ref node,
                ref name,
                size,
            } => self.getxattr(node, name, size)?,
            R::ListXattr { ref node, size } => self.listxattr(node, size)?,
            R::RemoveXattr { ref node, ref name } => {
                self.removexattr(node, name)?;
                A::Ok
            }
            R::Fallocate {
                handle,
                offset,
                length,
                mode,
            } => {
                self.fallocate(handle, offset, length, mode)?;
                A::Ok
            }
            R::Lseek {
                handle,
                offset,
                whence,
            } => A::Offset(self.lseek(handle, offset, whence)?),
        })
    }
}

/// A name for messages.
fn lossy(name: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(name))
}

/// What a request was doing, for error messages.
fn describe(req: &FsRequest) -> String {
    use FsRequest as R;
    match req {
        R::Lookup { parent, name } => format!("lookup {} in node {parent}", lossy(name)),
        R::GetAttr { node, .. } => format!("getattr of node {node}"),
        R::SetAttr { node, .. } => format!("setattr of node {node}"),
        R::ReadLink { node } => format!("readlink of node {node}"),
        R::Mknod { parent, name, .. } => format!("mknod {} in node {parent}", lossy(name)),
        R::Mkdir { parent, name, .. } => format!("mkdir {} in node {parent}", lossy(name)),
        R::Symlink { parent, name, .. } => format!("symlink {} in node {parent}", lossy(name)),
        R::Link {
            node,
            new_parent,
            new_name,
        } => format!(
            "link of node {node} as {} in node {new_parent}",
            lossy(new_name)
        ),
        R::Unlink { parent, name } => format!("unlink {} in node {parent}", lossy(name)),
        R::Rmdir { parent, name } => format!("rmdir {} in node {parent}", lossy(name)),
        R::Rename {
            parent,
            name,
            new_parent,
            new_name,
            ..
        } => format!(
            "rename {} in node {parent} to {} in node {new_parent}",
            lossy(name),
            lossy(new_name)
        ),
        R::Open { node, .. } => format!("open of node {node}"),
        R::Create { parent, name, .. } => format!("create {} in node {parent}", lossy(name)),
        R::Read { handle, .. } => format!("read of handle {handle}"),
        R::Write { handle, .. } => format!("write to handle {handle}"),
        R::Release { handle } => format!("release of handle {handle}"),
        R::Fsync { handle, .. } => format!("fsync of handle {handle}"),
        R::OpenDir { node } => format!("opendir of node {node}"),
        R::ReadDir { handle, .. } => format!("readdir of handle {handle}"),
        R::ReleaseDir { handle } => format!("releasedir of handle {handle}"),
        R::StatFs { node } => format!("statfs of node {node}"),
        R::SetXattr { node, name, .. } => format!("setxattr {} of node {node}", lossy(name)),
        R::GetXattr { node, name, .. } => format!("getxattr {} of node {node}", lossy(name)),
        R::ListXattr { node, .. } => format!("listxattr of node {node}"),
        R::RemoveXattr { node, name } => {
            format!("removexattr {} of node {node}", lossy(name))
        }
        R::Fallocate { handle, .. } => format!("fallocate of handle {handle}"),
        R::Lseek { handle, .. } => format!("lseek of handle {handle}"),
    }
}

/// Writes of at most this many bytes to a regular file are answered inline.
const INLINE_WRITE_MAX: usize = 128 * 1024;

/// Truncating a file of at most this size is cheap enough to run inline (an `O_TRUNC`
/// open of a small or missing file, as shells' `>` and `cp` do).
const INLINE_TRUNCATE_MAX: i64 = 1 << 20;

impl FsCore {
    /// Is `req` answered on the session task itself? Metadata operations on one inode or
    /// name, which never wait for data I/O, run inline: handing them to another thread
    /// costs more than the syscalls (on a one-vCPU emulated guest, milliseconds of thread
    /// switches). So do small writes to regular files (page-cache copies) and `O_TRUNC`
    /// opens of small or missing files. Reads, larger writes, writes to FIFOs and
    /// devices, listings, fsync and large truncations run on the blocking pool so that
    /// a slow disk or a blocked pipe never stalls the session.
    fn runs_inline(&self, req: &FsRequest) -> bool {
        use FsRequest as R;
        match req {
            R::SetAttr { set, .. } => set.size.is_none(),
            R::Open { flags, .. } | R::Create { flags, .. } if flags & libc::O_TRUNC == 0 => true,
            R::Open { .. } | R::Create { .. } => self.truncation_is_cheap(req),
            R::Write { handle, data, .. } => {
                data.len() <= INLINE_WRITE_MAX && self.handles.is_regular(*handle)
            }
            R::Read { .. } | R::Fsync { .. } | R::ReadDir { .. } | R::Fallocate { .. } => false,
            _ => true,
        }
    }

    /// Would the `O_TRUNC` open or create `req` free at most [`INLINE_TRUNCATE_MAX`]
    /// bytes? One `fstat` decides; anything unclear goes to the pool.
    fn truncation_is_cheap(&self, req: &FsRequest) -> bool {
        let st = match req {
            FsRequest::Open { node, .. } => self.nodes.get(node).and_then(|n| sys::stat_fd(n.fd())),
            FsRequest::Create { parent, name, .. } => {
                let Ok(p) = self.nodes.get(parent) else {
                    return false;
                };
                let Ok(name) = ops::check_name(name) else {
                    return true;
                };
                match sys::stat_at(p.fd(), &name) {
                    Err(Errno::ENOENT) => return true,
                    other => other,
                }
            }
            _ => return false,
        };
        st.is_ok_and(|st| {
            st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_size <= INLINE_TRUNCATE_MAX
        })
    }
}

/// Is `req` answered on the session task itself? (See [`FsCore::runs_inline`]; a
/// service that failed to start answers everything at once.)
pub(crate) fn runs_inline(agent: &Agent, req: &FsRequest) -> bool {
    agent
        .fs
        .core
        .as_ref()
        .map_or(true, |core| core.runs_inline(req))
}

/// Run one file request and make its answer.
pub(crate) fn answer(agent: &Agent, req: &FsRequest) -> Response {
    match &agent.fs.core {
        Err((errno, message)) => Response::Error {
            errno: *errno as i32,
            message: format!("file service unavailable: {message}"),
        },
        // A panic answers EIO instead of ending the session (the service stays
        // consistent, see `FsService`'s unwind-safety note).
        Ok(core) => {
            let t0 = tracing::enabled!(target: "bandsox_agent::fs_timing", tracing::Level::DEBUG)
                .then(std::time::Instant::now);
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| core.handle(req)));
            if let Some(t0) = t0 {
                tracing::debug!(
                    target: "bandsox_agent::fs_timing",
                    op = req.name(),
                    us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX),
                    "file request handled"
                );
            }
            match res {
                Ok(Ok(r)) => Response::Fs(r),
                Ok(Err(errno)) => Response::Error {
                    errno: errno as i32,
                    message: format!("{}: {}", describe(req), errno.desc()),
                },
                Err(_) => {
                    tracing::error!("file request panicked: {}", describe(req));
                    Response::Error {
                        errno: libc::EIO,
                        message: format!("{}: internal error", describe(req)),
                    }
                }
            }
        }
    }
}

/// Run one file request on the blocking pool; the answer goes to `out` from the pool
/// thread itself (no async task in between: one thread switch fewer per request).
pub(crate) fn spawn_request(agent: &Arc<Agent>, id: Id, req: FsRequest, out: OutTx) {
    let agent = agent.clone();
    tokio::task::spawn_blocking(move || {
        let resp = answer(&agent, &req);
        // The session may have ended meanwhile: its answer has nowhere to go.
        let _ = out.blocking_send(Out::Msg(Message::Response { id, resp }));
    });
}

/// Drop references to counted nodes (`Message::Forget`).
pub(crate) fn forget(agent: &Arc<Agent>, nodes: &[(NodeId, u64)]) {
    if let Ok(core) = &agent.fs.core {
        for &(node, count) in nodes {
            core.nodes.forget(node, count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::fs::{Owner, ROOT_NODE};

    fn create(name: &str, flags: i32) -> FsRequest {
        FsRequest::Create {
            parent: ROOT_NODE,
            name: name.as_bytes().to_vec(),
            mode: 0o644,
            flags,
            owner: Owner { uid: 0, gid: 0 },
        }
    }

    #[test]
    fn what_runs_inline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let core = FsCore::new(dir.path(), 16).expect("core");
        let trunc = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC;
        // A missing or small file's O_TRUNC create is cheap; a large one's is not.
        assert!(core.runs_inline(&create("new", trunc)));
        std::fs::write(dir.path().join("small"), b"x").expect("write");
        assert!(core.runs_inline(&create("small", trunc)));
        let big = std::fs::File::create(dir.path().join("big")).expect("create");
        big.set_len(2 << 20).expect("set_len");
        assert!(!core.runs_inline(&create("big", trunc)));
        // A FIFO is never truncated or written inline (opening it may block).
        nix::unistd::mkfifo(
            &dir.path().join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .expect("mkfifo");
        assert!(!core.runs_inline(&create("fifo", trunc)));
        // Small writes to an open regular file are inline; large ones and unknown
        // handles are not.
        let FsResponse::Created { handle, .. } = core
            .handle(&create("w", libc::O_WRONLY | libc::O_CREAT))
            .expect("create w")
        else {
            panic!("not Created")
        };
        let write = |len: usize, handle| FsRequest::Write {
            handle,
            offset: 0,
            data: vec![0; len],
        };
        assert!(core.runs_inline(&write(4096, handle)));
        assert!(!core.runs_inline(&write(INLINE_WRITE_MAX + 1, handle)));
        assert!(!core.runs_inline(&write(1, handle + 1000)));
    }
}
