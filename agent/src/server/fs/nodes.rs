//! The node table: node ids the host holds, each with an `O_PATH | O_NOFOLLOW`
//! descriptor of the guest inode.
//!
//! Invariants:
//! * One node per inode: `(st_dev, st_ino)` → node id, so hard links share a node. The
//!   descriptor pins the inode, so its number cannot be reused while the node exists.
//! * Node ids come from a counter starting at 2 and are never reused. [`ROOT_NODE`] is
//!   the served root; it is never removed and `Forget` of it is ignored.
//! * `refs` counts the `Entry` replies the host has not forgotten yet; at 0 the slot is
//!   removed (its directory watch too) and the descriptor is closed once no request in
//!   flight still holds the `Arc<Node>`.
//! * At most [`MAX_NODES`] nodes exist; registering a new one beyond that is `ENFILE`.
//! * Watches are added and removed under the table's lock (see [`WatchSet`]), so a
//!   forgotten node never keeps a watch and a watch never names a removed node.
//! * Unknown node ids are `ESTALE`.
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use inotify::WatchDescriptor;
use nix::errno::Errno;
use nix::sys::stat::FileStat;

use super::watch::WatchSet;
use crate::proto::fs::{NodeId, ROOT_NODE};

/// Most nodes the table holds.
pub(super) const MAX_NODES: usize = 1_000_000;

/// One guest inode the host holds.
pub(super) struct Node {
    pub id: NodeId,
    fd: OwnedFd,
    pub dev: u64,
    pub ino: u64,
    /// `st_mode & S_IFMT` (an inode's type never changes).
    pub kind: u32,
    /// On a pseudo filesystem (proc, sysfs, ...): shown, but never entered (see
    /// [`super::pseudo`]).
    pub opaque: bool,
}

impl Node {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }
    pub fn is_symlink(&self) -> bool {
        self.kind == libc::S_IFLNK
    }
    pub fn is_reg(&self) -> bool {
        self.kind == libc::S_IFREG
    }
}

struct Slot {
    node: Arc<Node>,
    refs: u64,
    wd: Option<WatchDescriptor>,
}

struct Inner {
    slots: HashMap<NodeId, Slot>,
    by_inode: HashMap<(u64, u64), NodeId>,
    next: NodeId,
    watches: WatchSet,
}

pub(super) struct NodeTable {
    inner: Mutex<Inner>,
}

/// Lock ignoring poison: the table stays consistent across a panicking holder because
/// every mutation is a single map operation.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NodeTable {
    /// A table holding only the root (`fd`, an `O_PATH` descriptor of a directory).
    pub fn new(root_fd: OwnedFd, st: &FileStat, watches: WatchSet) -> NodeTable {
        let root = Arc::new(Node {
            id: ROOT_NODE,
            fd: root_fd,
            dev: st.st_dev,
            ino: st.st_ino,
            kind: st.st_mode & libc::S_IFMT,
            opaque: false,
        });
        let mut inner = Inner {
            slots: HashMap::new(),
            by_inode: HashMap::new(),
            next: ROOT_NODE + 1,
            watches,
        };
        let wd = inner.watches.add(ROOT_NODE, root.fd());
        inner.by_inode.insert((root.dev, root.ino), ROOT_NODE);
        inner.slots.insert(
            ROOT_NODE,
            Slot {
                node: root,
                refs: 1,
                wd,
            },
        );
        NodeTable {
            inner: Mutex::new(inner),
        }
    }

    /// The node `id` (`ESTALE` when unknown).
    pub fn get(&self, id: NodeId) -> Result<Arc<Node>, Errno> {
        lock(&self.inner)
            .slots
            .get(&id)
            .map(|s| s.node.clone())
            .ok_or(Errno::ESTALE)
    }

    /// Add one reference to the node of the inode `fd` refers to (`st` is its stat),
    /// creating the node (and, for a directory that is not `opaque`, its watch) when
    /// the inode has none yet. `fd` is dropped when the inode already has a node.
    pub fn register(&self, fd: OwnedFd, st: &FileStat, opaque: bool) -> Result<Arc<Node>, Errno> {
        let mut g = lock(&self.inner);
        let inner = &mut *g;
        if let Some(id) = inner.by_inode.get(&(st.st_dev, st.st_ino)) {
            if let Some(slot) = inner.slots.get_mut(id) {
                slot.refs = slot.refs.saturating_add(1);
                return Ok(slot.node.clone());
            }
        }
        if inner.slots.len() >= MAX_NODES {
            return Err(Errno::ENFILE);
        }
        let id = inner.next;
        inner.next += 1;
        let node = Arc::new(Node {
            id,
            fd,
            dev: st.st_dev,
            ino: st.st_ino,
            kind: st.st_mode & libc::S_IFMT,
            opaque,
        });
        let wd = if node.is_dir() && !opaque {
            inner.watches.add(id, node.fd())
        } else {
            None
        };
        inner.by_inode.insert((node.dev, node.ino), id);
        inner.slots.insert(
            id,
            Slot {
                node: node.clone(),
                refs: 1,
                wd,
            },
        );
        Ok(node)
    }

    /// Is directory node `id` watched (its entries coherent)?
    pub fn is_watched(&self, id: NodeId) -> bool {
        lock(&self.inner)
            .slots
            .get(&id)
            .is_some_and(|s| s.wd.is_some())
    }

    /// Drop `count` references of `id`; at zero the node goes away.
    pub fn forget(&self, id: NodeId, count: u64) {
        if id == ROOT_NODE {
            return;
        }
        let mut g = lock(&self.inner);
        let inner = &mut *g;
        let Some(slot) = inner.slots.get_mut(&id) else {
            tracing::debug!(node = id, "forget of unknown node");
            return;
        };
        slot.refs = slot.refs.saturating_sub(count);
        if slot.refs > 0 {
            return;
        }
        if let Some(slot) = inner.slots.remove(&id) {
            let key = (slot.node.dev, slot.node.ino);
            if inner.by_inode.get(&key) == Some(&id) {
                inner.by_inode.remove(&key);
            }
            if let Some(wd) = slot.wd {
                inner.watches.remove(wd);
            }
        }
    }

    /// The node of inode `(dev, ino)`, if the host holds one.
    pub fn find_inode(&self, dev: u64, ino: u64) -> Option<NodeId> {
        lock(&self.inner).by_inode.get(&(dev, ino)).copied()
    }

    /// The directory node watched by watch descriptor `wd`.
    pub fn watched_dir(&self, wd: i32) -> Option<Arc<Node>> {
        let g = lock(&self.inner);
        let id = g.watches.node_of(wd)?;
        g.slots.get(&id).map(|s| s.node.clone())
    }

    /// The kernel dropped watch `wd` (`IN_IGNORED`: directory deleted or unmounted).
    pub fn watch_gone(&self, wd: i32) {
        let mut g = lock(&self.inner);
        let inner = &mut *g;
        if let Some(id) = inner.watches.gone(wd) {
            if let Some(slot) = inner.slots.get_mut(&id) {
                slot.wd = None;
            }
        }
    }
}
