//! The node table: which guest inodes the agent has open, and which it must keep.
//!
//! Nodes are named by identity (`st_dev`, `st_ino`) plus a kernel file handle (see
//! [`crate::proto::fs`]). Invariants:
//! * Descriptors (`O_PATH`) are held only for: the served root; counted nodes, each until
//!   the host forgets it (watched directories, at most the watch limit, and nodes on
//!   filesystems without file handles, at most [`MAX_PINNED`]); one directory per
//!   device (to reopen handles against); and a cache of recently used nodes of at most
//!   [`CACHE_SIZE`], least recently used evicted. So descriptors and memory are bounded
//!   by `1 + watch limit + MAX_PINNED + devices + CACHE_SIZE` however many nodes the
//!   host remembers.
//! * Any other node is reopened from its handle (`open_by_handle_at`), and what opens
//!   must have the identity asked for, else `ESTALE`: a handle never yields another file.
//! * The root is always reported as [`ROOT_ID`]; nothing else ever is (listings' `.`
//!   and `..` carry the numbers `getdents` gives, see `proto::fs::DirEntry`).
//! * Deleted inodes are let go of: after names disappear, [`NodeTable::sweep_deleted`]
//!   closes cached nodes whose link count is 0 and unwatches deleted directories.
//! * A counted node's references mirror the host's: each `Entry` answer with `counted`
//!   added one, `forget` subtracts, and at zero the node is dropped (its watch removed).
//!   Watches are added and removed under the table's lock (see [`WatchSet`]), so a
//!   dropped node never keeps a watch and a watch never names a dropped node.
//! * Without the privilege to open handles (`CAP_DAC_READ_SEARCH`), every node is
//!   counted and kept open, bounded by [`MAX_PINNED`] plus the watch limit.
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use inotify::WatchDescriptor;
use lru::LruCache;
use nix::errno::Errno;
use nix::sys::stat::FileStat;

use super::pseudo;
use super::sys::{self, ProcFd};
use super::watch::WatchSet;
use crate::proto::fs::{FileHandle, NodeId, NodeRef, ROOT_ID};

/// Most uncounted nodes kept open for reuse.
pub(super) const CACHE_SIZE: usize = 4096;
/// Most nodes kept open because their filesystem has no file handles.
pub(super) const MAX_PINNED: usize = 65_536;

/// One open guest inode.
pub(super) struct Node {
    /// As reported to the host ([`ROOT_ID`] for the root).
    pub id: NodeId,
    fd: OwnedFd,
    pub dev: u64,
    /// `st_mode & S_IFMT` (an inode's type never changes).
    pub kind: u32,
    /// On a pseudo filesystem (proc, sysfs, ...): shown, but never entered (see
    /// [`super::pseudo`]).
    pub opaque: bool,
    pub fh: FileHandle,
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
    /// How the host names this node.
    pub fn node_ref(&self) -> NodeRef {
        NodeRef {
            id: self.id,
            fh: self.fh.clone(),
        }
    }
}

/// A counted node.
struct Held {
    node: Arc<Node>,
    refs: u64,
    wd: Option<WatchDescriptor>,
}

/// What the table knows of one filesystem (by `st_dev`).
struct Device {
    /// A directory on it, to reopen handles against (`None`: nodes on it are pinned).
    mount: Option<Arc<OwnedFd>>,
    opaque: bool,
}

struct Inner {
    root: Arc<Node>,
    /// The root's real identity.
    root_key: NodeId,
    root_wd: Option<WatchDescriptor>,
    held: HashMap<NodeId, Held>,
    pinned: usize,
    cache: LruCache<NodeId, Arc<Node>>,
    devices: HashMap<u64, Device>,
    watches: WatchSet,
}

pub(super) struct NodeTable {
    inner: Mutex<Inner>,
    /// Handles can be opened (checked once on the root).
    handles_ok: bool,
}

/// What [`NodeTable::register`] did.
pub(super) struct Registered {
    pub node: Arc<Node>,
    /// The answer adds a reference the host must forget.
    pub counted: bool,
    pub watched: bool,
}

/// Lock ignoring poison: the table stays consistent across a panicking holder because
/// every mutation is a single map operation.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn identity(st: &FileStat) -> NodeId {
    NodeId {
        dev: st.st_dev,
        ino: st.st_ino,
    }
}

impl NodeTable {
    /// A table holding only the root (`fd`, an `O_PATH` descriptor of a directory).
    pub fn new(root_fd: OwnedFd, st: &FileStat, proc: &ProcFd, watches: WatchSet) -> NodeTable {
        let handles_ok = sys::name_to_handle(root_fd.as_fd())
            .and_then(|fh| {
                let dir = proc.reopen(root_fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
                let fd = sys::open_by_handle(dir.as_fd(), &fh)?;
                let back = sys::stat_fd(fd.as_fd())?;
                (identity(&back) == identity(st))
                    .then_some(())
                    .ok_or(Errno::ESTALE)
            })
            .inspect_err(|e| {
                tracing::warn!("file handles unusable ({e}): every node the host holds stays open")
            })
            .is_ok();
        let root = Arc::new(Node {
            id: ROOT_ID,
            fd: root_fd,
            dev: st.st_dev,
            kind: st.st_mode & libc::S_IFMT,
            opaque: false,
            fh: FileHandle::default(),
        });
        let mut inner = Inner {
            root_key: identity(st),
            root_wd: None,
            held: HashMap::new(),
            pinned: 0,
            cache: LruCache::new(NonZeroUsize::new(CACHE_SIZE).unwrap_or(NonZeroUsize::MIN)),
            devices: HashMap::new(),
            watches,
            root: root.clone(),
        };
        inner.root_wd = inner.watches.add(ROOT_ID, root.fd());
        NodeTable {
            inner: Mutex::new(inner),
            handles_ok,
        }
    }

    /// The node `r` names (`ESTALE` when it is gone or the handle does not name it).
    pub fn get(&self, r: &NodeRef) -> Result<Arc<Node>, Errno> {
        let mount = {
            let mut g = lock(&self.inner);
            if r.id == ROOT_ID {
                return Ok(g.root.clone());
            }
            if let Some(h) = g.held.get(&r.id) {
                return Ok(h.node.clone());
            }
            if let Some(n) = g.cache.get(&r.id) {
                return Ok(n.clone());
            }
            if r.fh.0.is_empty() {
                return Err(Errno::ESTALE);
            }
            match g.devices.get(&r.id.dev) {
                Some(Device {
                    mount: Some(m),
                    opaque,
                }) => (m.clone(), *opaque),
                _ => return Err(Errno::ESTALE),
            }
        };
        // Reopen without the lock: it may read the inode from disk.
        let (mount, opaque) = mount;
        let fd = sys::open_by_handle(mount.as_fd(), &r.fh.0).map_err(|e| match e {
            Errno::ENOENT | Errno::EINVAL => Errno::ESTALE,
            e => e,
        })?;
        let st = sys::stat_fd(fd.as_fd())?;
        if identity(&st) != r.id {
            return Err(Errno::ESTALE);
        }
        let node = Arc::new(Node {
            id: r.id,
            fd,
            dev: st.st_dev,
            kind: st.st_mode & libc::S_IFMT,
            opaque,
            fh: r.fh.clone(),
        });
        lock(&self.inner).cache.put(r.id, node.clone());
        Ok(node)
    }

    /// What the table knows of device `dev`, learning it from `fd` (an inode on it) and
    /// `parent` (the directory it was found in) the first time.
    fn device(&self, dev: u64, fd: BorrowedFd<'_>, parent: &Node, proc: &ProcFd) -> (bool, bool) {
        if let Some(d) = lock(&self.inner).devices.get(&dev) {
            return (d.opaque, d.mount.is_some());
        }
        let opaque = if dev == parent.dev {
            parent.opaque
        } else {
            pseudo::is_opaque(fd)
        };
        // A real (not O_PATH) directory descriptor: older kernels refuse O_PATH ones
        // as the mount argument of open_by_handle_at.
        let dir = if dev == parent.dev { parent.fd() } else { fd };
        let mount = (self.handles_ok && !opaque)
            .then(|| proc.reopen(dir, libc::O_RDONLY | libc::O_DIRECTORY).ok())
            .flatten()
            .map(Arc::new);
        let has_mount = mount.is_some();
        lock(&self.inner)
            .devices
            .entry(dev)
            .or_insert(Device { mount, opaque });
        (opaque, has_mount)
    }

    /// Answer one more entry for the inode `fd` refers to (`st` is its stat), found in
    /// directory `parent`.
    pub fn register(
        &self,
        parent: &Node,
        fd: OwnedFd,
        st: &FileStat,
        proc: &ProcFd,
    ) -> Result<Registered, Errno> {
        let id = identity(st);
        let (opaque, reopenable) = self.device(st.st_dev, fd.as_fd(), parent, proc);
        {
            let mut g = lock(&self.inner);
            if id == g.root_key {
                let watched = g.root_wd.is_some();
                return Ok(Registered {
                    node: g.root.clone(),
                    counted: false,
                    watched,
                });
            }
            if let Some(h) = g.held.get_mut(&id) {
                h.refs = h.refs.saturating_add(1);
                return Ok(Registered {
                    node: h.node.clone(),
                    counted: true,
                    watched: h.wd.is_some(),
                });
            }
        }
        let fh = if reopenable {
            match sys::name_to_handle(fd.as_fd()) {
                Ok(fh) => FileHandle(fh),
                Err(_) => FileHandle::default(),
            }
        } else {
            FileHandle::default()
        };
        let kind = st.st_mode & libc::S_IFMT;
        let node = Arc::new(Node {
            id,
            fd,
            dev: st.st_dev,
            kind,
            opaque,
            fh,
        });
        let mut g = lock(&self.inner);
        let inner = &mut *g;
        // Registered meanwhile by another request: share its node.
        if let Some(h) = inner.held.get_mut(&id) {
            h.refs = h.refs.saturating_add(1);
            return Ok(Registered {
                node: h.node.clone(),
                counted: true,
                watched: h.wd.is_some(),
            });
        }
        let wd = if kind == libc::S_IFDIR && !opaque {
            inner.watches.add(id, node.fd())
        } else {
            None
        };
        let pinned = node.fh.0.is_empty();
        if wd.is_none() && !pinned {
            inner.cache.put(id, node.clone());
            return Ok(Registered {
                node,
                counted: false,
                watched: false,
            });
        }
        if pinned {
            if inner.pinned >= MAX_PINNED {
                if let Some(wd) = wd {
                    inner.watches.remove(wd);
                }
                return Err(Errno::ENFILE);
            }
            inner.pinned += 1;
        }
        let watched = wd.is_some();
        inner.cache.pop(&id);
        inner.held.insert(
            id,
            Held {
                node: node.clone(),
                refs: 1,
                wd,
            },
        );
        Ok(Registered {
            node,
            counted: true,
            watched,
        })
    }

    /// The identity to report for inode `(dev, ino)` ([`ROOT_ID`] for the root).
    pub fn reported(&self, dev: u64, ino: u64) -> NodeId {
        let id = NodeId { dev, ino };
        if id == lock(&self.inner).root_key {
            ROOT_ID
        } else {
            id
        }
    }

    /// Let go of deleted inodes: cached nodes whose link count is 0 are closed, and
    /// watched directories that were deleted lose their watch and descriptor (returned,
    /// for `Unwatched` events). Nodes without handles stay (nothing else could reopen
    /// them). Runs the `fstat`s without the lock.
    pub fn sweep_deleted(&self) -> Vec<NodeId> {
        let (cached, held): (Vec<Arc<Node>>, Vec<Arc<Node>>) = {
            let g = lock(&self.inner);
            (
                g.cache.iter().map(|(_, n)| n.clone()).collect(),
                g.held
                    .values()
                    .filter(|h| h.wd.is_some() && !h.node.fh.0.is_empty())
                    .map(|h| h.node.clone())
                    .collect(),
            )
        };
        let gone = |n: &Arc<Node>| sys::stat_fd(n.fd()).is_ok_and(|st| st.st_nlink == 0);
        let dead_cached: Vec<NodeId> = cached.iter().filter(|n| gone(n)).map(|n| n.id).collect();
        let dead_held: Vec<NodeId> = held.iter().filter(|n| gone(n)).map(|n| n.id).collect();
        drop((cached, held));
        let mut g = lock(&self.inner);
        let inner = &mut *g;
        for id in &dead_cached {
            inner.cache.pop(id);
        }
        for id in &dead_held {
            if let Some(h) = inner.held.remove(id) {
                if let Some(wd) = h.wd {
                    inner.watches.remove(wd);
                }
            }
        }
        dead_held
    }

    /// Is directory `id` watched (its entries coherent)?
    pub fn is_watched(&self, id: NodeId) -> bool {
        let g = lock(&self.inner);
        if id == ROOT_ID {
            return g.root_wd.is_some();
        }
        g.held.get(&id).is_some_and(|h| h.wd.is_some())
    }

    /// Drop `count` references of counted node `id`; at zero it goes away (a node with
    /// a handle stays in the cache). Uncounted and unknown nodes are ignored.
    pub fn forget(&self, id: NodeId, count: u64) {
        if id == ROOT_ID {
            return;
        }
        let mut g = lock(&self.inner);
        let inner = &mut *g;
        let Some(h) = inner.held.get_mut(&id) else {
            return;
        };
        h.refs = h.refs.saturating_sub(count);
        if h.refs > 0 {
            return;
        }
        if let Some(h) = inner.held.remove(&id) {
            if let Some(wd) = h.wd {
                inner.watches.remove(wd);
            }
            if h.node.fh.0.is_empty() {
                inner.pinned = inner.pinned.saturating_sub(1);
            } else {
                inner.cache.put(id, h.node);
            }
        }
    }

    /// The directory node watched by watch descriptor `wd`.
    pub fn watched_dir(&self, wd: i32) -> Option<Arc<Node>> {
        let g = lock(&self.inner);
        let id = g.watches.node_of(wd)?;
        if id == ROOT_ID {
            return Some(g.root.clone());
        }
        g.held.get(&id).map(|h| h.node.clone())
    }

    /// The kernel dropped watch `wd` (`IN_IGNORED`: directory deleted or unmounted).
    /// Returns the directory that is no longer watched.
    pub fn watch_gone(&self, wd: i32) -> Option<NodeId> {
        let mut g = lock(&self.inner);
        let inner = &mut *g;
        let id = inner.watches.gone(wd)?;
        if id == ROOT_ID {
            inner.root_wd = None;
            return Some(id);
        }
        // A directory counted only for its watch is no longer counted: the host is told
        // (`Unwatched`) and its later forgets find nothing.
        if let Some(h) = inner.held.get_mut(&id) {
            h.wd = None;
            if !h.node.fh.0.is_empty() {
                if let Some(h) = inner.held.remove(&id) {
                    inner.cache.put(id, h.node);
                }
            }
        }
        Some(id)
    }
}
