//! The control tree's core: namespace, open files and access policy, with no knowledge
//! of fuser. The kernel adapter ([`crate::fuse`]) converts requests into calls of
//! [`Vfs`] (or of [`crate::guestfs`] for inodes under a VM's `fs/`) and the answers into
//! replies; everything a user can observe of the control tree is decided here, so it can
//! be tested in process (`fsd/tests/inproc_vfs.rs`) without root, a mount or a VM.
//!
//! Parts:
//! - [`tree`]: which nodes exist, their inode numbers and attributes.
//! - [`files`]: open files (streams, logs, generated content) and their dispatch;
//!   [`ctlfile`]: control files (lines parsed into commands); [`exec`]: the exec
//!   transaction; [`streams`]: a command's output, input and terminal.
//! - [`journal`]: the one path by which outcomes reach `cat ctl`.
//! - [`policy`]: ownership checks and the errno of each operation the tree lacks.
//! - [`rootops`]: root `mkdir`/`rmdir` in flight (defers root-name invalidations).
//!
//! Invariants:
//! - The core's types ([`Attr`], [`Entry`], [`DirEntry`], [`Kind`], [`OpenMode`]) are its
//!   own; no fuser or wire type crosses this boundary.
//! - Nothing here blocks a caller's thread on a guest or a VMM: anything that may wait
//!   is an `async fn` or a [`Pending`] future the adapter runs in a task.
//! - Every `mkdir`/`rmdir` of the control tree that fails, is refused or is abandoned
//!   (interrupted) is recorded as the caller session's root `ctl` result through a
//!   [`journal::Journal`] (`cat ctl` says why, or `ok: rmdir NAME` once an abandoned one
//!   ended well).
pub mod ctlfile;
pub mod exec;
pub mod files;
pub mod journal;
pub mod policy;
pub mod rootops;
pub mod streams;
pub mod tree;

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::guestfs::{Target, FS_INO_BASE};
use crate::manager::{Manager, ManagerApi};
use files::Files;
pub use files::{Caller, OpenMode};
use journal::{Journal, Report, Scope};
pub use tree::{session_of, Attr, Kind, ROOT_INO};
use tree::{Node, Tree};

/// An answer still to come (a boot, a delete): run it in a task, reply when it ends.
pub type Pending<T> = futures_util::future::BoxFuture<'static, Result<T>>;

/// The control tree changes behind the kernel's back (VMs come and go through `ctl`,
/// runs appear), so names and attributes are not cached.
pub const TTL: Duration = Duration::ZERO;

/// Lifetime of the cached names of VM directories and their `fs/` entries.
pub const VM_ENTRY_TTL: Duration = Duration::from_secs(10);

/// Lifetime of the cached attributes of the root and of VM directories. Every path into
/// a guest crosses both, and the kernel checks a directory's permissions with its
/// attributes at each step of a path walk: uncached, each `stat` of a guest file cost two
/// extra requests. Changes made behind the kernel's back (`ctl`, clones, state changes)
/// invalidate them on the VM's event (`fuse::invalidate_vm_entries`); the lifetime
/// bounds what is left (a missed event).
pub const DIR_ATTR_TTL: Duration = Duration::from_secs(1);

/// A node's attributes and how long the kernel may keep them and its name.
#[derive(Debug, Clone)]
pub struct Entry {
    pub attr: Attr,
    pub attr_ttl: Duration,
    pub entry_ttl: Duration,
}

/// One name of a control-tree listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub kind: Kind,
    pub ino: u64,
}

/// How long the kernel may keep `node`'s attributes.
fn attr_ttl(node: &Node) -> Duration {
    match node {
        Node::Root | Node::Vm(_) => DIR_ATTR_TTL,
        _ => TTL,
    }
}

fn name_str(name: &OsStr) -> Result<&str> {
    name.to_str()
        .ok_or_else(|| Error::invalid("names in the control tree are UTF-8"))
}

/// What an admitted `rmdir` removes.
enum Removal {
    Image(String),
    Snapshot(String),
    Vm(String),
}

/// A `mkdir`'s success shows nothing in `cat ctl` (unless it came late).
impl Report for Entry {}

/// The control tree over a manager.
pub struct Vfs {
    files: Files,
}

impl Vfs {
    pub fn new(mgr: Arc<Manager>) -> Self {
        Vfs {
            files: Files::new(Tree::new(mgr)),
        }
    }

    fn tree(&self) -> &Tree {
        &self.files.tree
    }

    fn mgr(&self) -> &Arc<Manager> {
        self.tree().mgr()
    }

    fn node(&self, ino: u64) -> Result<Node> {
        self.tree().node(ino)
    }

    /// The `fs/` target an inode stands for, if it is one (then [`crate::guestfs`]
    /// answers, not the control tree).
    pub fn fs_target(&self, ino: u64) -> Option<Target> {
        if ino >= FS_INO_BASE {
            return Some(Target::Node(ino));
        }
        match self.tree().node(ino) {
            Ok(Node::VmFs(vm_id, generation)) => Some(Target::Root {
                vm_id,
                generation,
                ino,
            }),
            _ => None,
        }
    }

    /// The name of the VM an inode belongs to (for logs); `None` outside VMs.
    pub fn vm_name_of(&self, ino: u64) -> Option<String> {
        let vm = if ino >= FS_INO_BASE {
            let slot = crate::guestfs::inodes::slot_of(ino);
            self.mgr()
                .list()
                .into_iter()
                .find(|v| v.fs_slot() == Some(slot))
        } else {
            let node = self.tree().node(ino).ok()?;
            self.mgr().get_by_id(node.vm_id()?)
        };
        vm.map(|v| v.name.clone())
    }

    fn entry(&self, node: &Node) -> Result<Entry> {
        // VM directories and their `fs/` sit on every path into a guest: their names are
        // cached (and invalidated on every VM event), their attributes only briefly.
        let entry_ttl = match node {
            Node::Vm(_) | Node::VmFs(..) => VM_ENTRY_TTL,
            _ => TTL,
        };
        Ok(Entry {
            attr: self.tree().attr(node)?,
            attr_ttl: attr_ttl(node),
            entry_ttl,
        })
    }

    /// `name` in directory `parent`. `runs/last` is a symlink resolved per caller in
    /// [`Vfs::readlink`], so lookup is caller-free.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Entry> {
        let node = self.tree().lookup(&self.node(parent)?, name_str(name)?)?;
        self.entry(&node)
    }

    /// Attributes of `ino` as `uid` sees them (`events` files are per reader: their
    /// size is the caller's view).
    pub fn getattr(&self, ino: u64, uid: u32) -> Result<Entry> {
        let node = self.node(ino)?;
        let mut attr = self.tree().attr(&node)?;
        if let Some(len) = self.files.events_len(&node, uid) {
            attr.size = len;
        }
        Ok(Entry {
            attr,
            attr_ttl: attr_ttl(&node),
            entry_ttl: TTL,
        })
    }

    /// Attributes of `ino`, never cached.
    pub fn attr(&self, ino: u64) -> Result<Attr> {
        self.tree().attr(&self.node(ino)?)
    }

    /// `setattr`: truncation (`echo x > ctl` opens with `O_TRUNC`) and time updates are
    /// accepted and ignored, since control files have no stored content to cut;
    /// ownership and mode are fixed.
    pub fn setattr(&self, ino: u64, chown_or_chmod: bool) -> Result<Attr> {
        if chown_or_chmod {
            return Err(policy::chown_chmod());
        }
        self.attr(ino)
    }

    /// The target of a symlink (`runs/last`: the caller session's last run).
    pub fn readlink(&self, ino: u64, caller: Caller) -> Result<String> {
        match self.node(ino)? {
            Node::RunsLast(id) => self
                .tree()
                .last_run(&id, caller.session)
                .map(|n| n.to_string()),
            _ => Err(Error::invalid("not a symlink")),
        }
    }

    /// A directory's entries as user `uid` lists them, with `.` and `..` first. Per call:
    /// other users' VMs and snapshots are left out of the root's and `snapshots/`'s
    /// listings (root sees all; see [`policy::lists`]), and the kernel does not cache
    /// control-tree listings (no `FOPEN_CACHE_DIR`), so each `readdir` asks again.
    pub fn listing(&self, ino: u64, uid: u32) -> Result<Vec<DirEntry>> {
        let node = self.node(ino)?;
        let entries = self.tree().readdir(&node, uid)?;
        let dot = |name: &str, ino| DirEntry {
            name: name.to_string(),
            kind: Kind::Dir,
            ino,
        };
        let mut all = vec![dot(".", ino), dot("..", ROOT_INO)];
        all.extend(entries.into_iter().map(|(name, child)| DirEntry {
            name,
            kind: child.kind(),
            ino: self.tree().ino(&child),
        }));
        Ok(all)
    }

    /// `opendir`: the directory still exists.
    pub fn opendir(&self, ino: u64) -> Result<()> {
        self.tree().check(&self.node(ino)?)
    }

    /// A journal of the caller's root `ctl` result for the operation `what`.
    fn journal(&self, c: Caller, what: String) -> Journal {
        let mgr = self.mgr().clone() as Arc<dyn ManagerApi>;
        Journal::new(Scope::Root(mgr), c.session, Some(what))
    }

    /// `mkdir NAME` in the root creates and boots a VM. The checks answer at once; the
    /// boot is the returned future. Interruptible: the boot goes on, and its outcome
    /// lands in the caller's `ctl` result, like every refusal and failure.
    pub fn mkdir(self: &Arc<Self>, parent: u64, name: &OsStr, c: Caller) -> Result<Pending<Entry>> {
        let journal = self.journal(c, format!("mkdir {}", name.to_string_lossy()));
        let checked = self.node(parent).and_then(|p| {
            if p != Node::Root {
                return Err(policy::mkdir_outside_root());
            }
            name_str(name)
        });
        let name = match checked {
            Ok(name) => name.to_string(),
            Err(e) => return Err(journal.refuse(e)),
        };
        let busy = self.files.root_ops.begin();
        let vfs = self.clone();
        Ok(Box::pin(async move {
            let _busy = busy;
            let m = vfs.mgr().clone();
            let boot = m.create(name, c.uid, c.gid);
            let res = journal.detach(c.pid, boot).await.and_then(|vm| {
                Ok(Entry {
                    attr: vfs.tree().attr(&Node::Vm(vm.id.clone()))?,
                    attr_ttl: TTL,
                    entry_ttl: TTL,
                })
            });
            journal.finish(res)
        }))
    }

    /// `rmdir`: a VM (stop and delete it), an image or a snapshot, by its owner or
    /// root. The checks answer at once; the deletion is the returned future. Every
    /// refusal and failure, and the outcome of an interrupted deletion, lands in the
    /// caller's `ctl` result.
    pub fn rmdir(&self, parent: u64, name: &OsStr, c: Caller) -> Result<Pending<()>> {
        let shown = name.to_string_lossy();
        let (journal, checked) = match self.node(parent) {
            Ok(Node::Images) => (
                self.journal(c, format!("rmdir images/{shown}")),
                self.rmdir_checks(&Node::Images, name, c),
            ),
            Ok(Node::Snapshots) => (
                self.journal(c, format!("rmdir snapshots/{shown}")),
                self.rmdir_checks(&Node::Snapshots, name, c),
            ),
            other => (
                self.journal(c, format!("rmdir {shown}")),
                other.and_then(|p| self.rmdir_checks(&p, name, c)),
            ),
        };
        let removal = match checked {
            Ok(removal) => removal,
            Err(e) => return Err(journal.refuse(e)),
        };
        let mgr = self.mgr().clone();
        let busy = matches!(removal, Removal::Vm(_)).then(|| self.files.root_ops.begin());
        Ok(Box::pin(async move {
            let _busy = busy;
            let res = match removal {
                Removal::Image(name) => mgr.remove_image(&name),
                Removal::Snapshot(name) => journal.detach(c.pid, mgr.delete_snapshot(name)).await,
                Removal::Vm(name) => journal.detach(c.pid, mgr.delete(name)).await,
            };
            journal.finish(res)
        }))
    }

    /// What an `rmdir` of `name` in `parent` would remove, if the caller may.
    fn rmdir_checks(&self, parent: &Node, name: &OsStr, c: Caller) -> Result<Removal> {
        let name = name_str(name)?.to_string();
        let mgr = self.mgr();
        match parent {
            Node::Root => {}
            Node::Images => {
                if !mgr.images().contains(&name) {
                    return Err(Error::not_found(format!("no image {name:?}")));
                }
                policy::may_remove(c.uid, mgr.image_owner(&name), &format!("image {name}"))?;
                return Ok(Removal::Image(name));
            }
            Node::Snapshots => {
                let Some((owner, _)) = mgr.snapshot_owner(&name) else {
                    return Err(Error::not_found(format!("no snapshot {name:?}")));
                };
                policy::may_remove(c.uid, owner, &format!("snapshot {name}"))?;
                return Ok(Removal::Snapshot(name));
            }
            Node::Runs(_) => return Err(policy::rmdir_run()),
            _ => return Err(Error::new(libc::ENOTDIR, "not a directory")),
        }
        let Some(vm) = mgr.get(&name) else {
            return Err(if self.tree().lookup(&Node::Root, &name).is_ok() {
                Error::new(libc::ENOTDIR, format!("{name} is not a VM"))
            } else {
                Error::not_found(format!("no VM {name:?}"))
            });
        };
        policy::may_remove(c.uid, vm.uid, &format!("VM {name}"))?;
        Ok(Removal::Vm(name))
    }

    /// Open a control file; `read`/`write` say what the open flags ask for.
    pub fn open(&self, ino: u64, read: bool, write: bool, c: Caller) -> Result<(u64, OpenMode)> {
        self.files.open(&self.node(ino)?, read, write, c)
    }

    /// See [`Files::read`].
    pub async fn read(&self, fh: u64, offset: u64, size: u32, c: Caller) -> Result<Vec<u8>> {
        self.files.read(fh, offset, size, c).await
    }

    /// See [`Files::write`].
    pub async fn write(&self, fh: u64, offset: u64, data: &[u8], c: Caller) -> Result<u32> {
        self.files.write(fh, offset, data, c).await
    }

    /// See [`Files::flush`].
    pub async fn flush(&self, fh: u64, c: Caller) -> Result<()> {
        self.files.flush(fh, c).await
    }

    /// See [`Files::fsync`].
    pub async fn fsync(&self, fh: u64) -> Result<()> {
        self.files.fsync(fh).await
    }

    /// See [`Files::release`]; call within the runtime (it may start a task).
    pub fn release(&self, fh: u64) {
        self.files.release(fh);
    }

    /// Root `mkdir`/`rmdir` in flight (root-name invalidations wait for them).
    pub fn root_ops(&self) -> &Arc<rootops::RootOps> {
        &self.files.root_ops
    }

    /// The names of VMs with news, as they happen (see [`crate::events`]).
    pub fn vm_events(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.mgr().events.subscribe()
    }

    /// The event log as `filter`'s reader sees it (what `events` and `<vm>/events` show),
    /// opened for reading at offsets of that view.
    pub fn open_events(&self, filter: &crate::eventview::Filter) -> crate::eventview::EventsHandle {
        self.files.event_views().open(filter)
    }

    /// The current size of `filter`'s view of the event log.
    pub fn events_len(&self, filter: &crate::eventview::Filter) -> u64 {
        self.files.event_views().len(filter)
    }

    /// The `fs/` root of VM `name` in its current boot (what `<vm>/fs` names).
    pub fn fs_root(&self, name: &str) -> Result<Target> {
        let vm_ino = self
            .vm_ino(name)
            .ok_or_else(|| Error::not_found(format!("no VM {name:?}")))?;
        let fs = self.lookup(vm_ino, OsStr::new("fs"))?;
        self.fs_target(fs.attr.ino)
            .ok_or_else(|| Error::io("the VM's fs/ is not a guest root"))
    }

    /// The inode of VM `name`'s directory, if it exists.
    pub fn vm_ino(&self, name: &str) -> Option<u64> {
        let vm = self.mgr().get(name)?;
        Some(self.tree().ino(&Node::Vm(vm.id.clone())))
    }
}
