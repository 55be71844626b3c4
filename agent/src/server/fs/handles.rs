//! Open files and directories (`Open`/`Create`/`OpenDir` until `Release`/`ReleaseDir`).
//!
//! Invariants:
//! * Handle ids come from a counter starting at 1 and are never reused.
//! * At most [`MAX_HANDLES`] handles are open; opening more is `EMFILE`.
//! * A handle is independent of its node's reference count: the host's `Forget` may drop
//!   the node while the file stays open (like an unlinked open file). A directory handle
//!   keeps its node's `Arc` for `plus` lookups.
//! * Unknown handle ids are `EBADF`; using a directory handle for file I/O is `EISDIR`,
//!   a file handle for `ReadDir` is `ENOTDIR`.
//! * A directory handle's state is behind its own mutex, so concurrent `ReadDir`s of one
//!   handle are serialised and the kernel position always matches `DirState::pos`.
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;

use super::nodes::Node;
use crate::proto::fs::HandleId;

/// Most handles open at once.
pub(super) const MAX_HANDLES: usize = 65_536;

/// Where a directory handle's descriptor is.
pub(super) struct DirState {
    /// `None` for an opaque (pseudo filesystem) directory: only `.` and `..` are listed.
    pub fd: Option<OwnedFd>,
    /// The kernel's position of `fd` when known (the `d_off` of the last entry consumed).
    pub pos: Option<u64>,
    pub buf: Vec<u8>,
}

pub(super) enum Handle {
    File(File),
    Dir {
        node: Arc<Node>,
        state: Mutex<DirState>,
    },
}

impl Handle {
    /// The open file (`EISDIR` for directory handles).
    pub fn file(&self) -> Result<&File, Errno> {
        match self {
            Handle::File(file) => Ok(file),
            Handle::Dir { .. } => Err(Errno::EISDIR),
        }
    }

    /// The descriptor to `fstat`/`fsync` (a directory handle of an opaque directory
    /// falls back to the node's `O_PATH` descriptor).
    pub fn stat_fd(&self) -> StatFd<'_> {
        match self {
            Handle::File(file) => StatFd::Borrowed(file.as_fd()),
            Handle::Dir { node, state } => {
                let st = lock(state);
                if st.fd.is_some() {
                    StatFd::Dir(st)
                } else {
                    StatFd::Borrowed(node.fd())
                }
            }
        }
    }
}

/// A descriptor borrowed from a handle (holding the directory lock when needed).
pub(super) enum StatFd<'a> {
    Borrowed(BorrowedFd<'a>),
    Dir(MutexGuard<'a, DirState>),
}

impl StatFd<'_> {
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            StatFd::Borrowed(fd) => Some(*fd),
            StatFd::Dir(st) => st.fd.as_ref().map(|f| f.as_fd()),
        }
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) struct HandleTable {
    /// Each handle, and whether it is an open regular file (whose small writes are
    /// answered inline: they never block on a pipe or device).
    map: Mutex<HashMap<HandleId, (Arc<Handle>, bool)>>,
    next: AtomicU64,
}

impl HandleTable {
    pub fn new() -> HandleTable {
        HandleTable {
            map: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    pub fn insert(&self, h: Handle) -> Result<HandleId, Errno> {
        self.insert_as(h, false)
    }

    /// Insert an open file; `regular` says it is a regular file (not a FIFO or device).
    pub fn insert_file(&self, file: File, regular: bool) -> Result<HandleId, Errno> {
        self.insert_as(Handle::File(file), regular)
    }

    fn insert_as(&self, h: Handle, regular: bool) -> Result<HandleId, Errno> {
        let mut map = lock(&self.map);
        if map.len() >= MAX_HANDLES {
            return Err(Errno::EMFILE);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        map.insert(id, (Arc::new(h), regular));
        Ok(id)
    }

    pub fn get(&self, id: HandleId) -> Result<Arc<Handle>, Errno> {
        lock(&self.map)
            .get(&id)
            .map(|(h, _)| h.clone())
            .ok_or(Errno::EBADF)
    }

    /// Is `id` an open regular file? (Unknown ids are not.)
    pub fn is_regular(&self, id: HandleId) -> bool {
        lock(&self.map)
            .get(&id)
            .is_some_and(|&(_, regular)| regular)
    }

    /// Close the handle (once no request in flight still uses it).
    pub fn remove(&self, id: HandleId) -> Result<(), Errno> {
        lock(&self.map).remove(&id).map(drop).ok_or(Errno::EBADF)
    }
}
