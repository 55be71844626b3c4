//! Coherence: guest change events become kernel cache invalidations.
//!
//! Invariants:
//! - One pump per agent connection (the connection's event stream can be taken once);
//!   it ends when the connection does.
//! - Events are applied in arrival order, each batch completely (on a blocking thread,
//!   because the kernel's notify calls can wait for inode locks) before the next.
//! - The agent sends a command's events before its exit, so they are on their way before
//!   the host learns that the command ended.
//! - Events naming nodes the kernel does not hold are dropped: nothing is cached for them.
//! - When a connection ends and its VM incarnation is gone (stopped, rebooted, deleted),
//!   everything the kernel caches of that incarnation is invalidated, so nothing cached
//!   is served as live data: the next use asks, and gets ESTALE or EHOSTDOWN.
//! - A name event whose outcome the host itself made ([`Recent`]: the host's create,
//!   rename, unlink ... answered before the event arrived, on the same connection) and
//!   that still names what the host made is dropped: the kernel already knows, and
//!   invalidating would throw away a dentry that may be someone's working directory.
//!   Any other outcome invalidates the name.
//! - A name event that says what the name names now (a link or rename made in the guest)
//!   also drops that node's attributes: its link count or ctime changed, and inotify
//!   reports that on the directory only. (A name that went away cannot say which file
//!   lost a link: the link count of a hard-linked file's other names may lag until the
//!   cache expires.)
//! - Events may be lost between two connections of one incarnation (a guest change
//!   while the host reconnects, a channel that broke mid-batch): a pump that is not the
//!   incarnation's first treats its start as an overflow, so every cached attribute,
//!   page and listing of the incarnation goes before its first batch is applied.
//! - [`Pumps::applied`] resolves only once every batch a pump had received when it was
//!   called has been applied (its invalidations made): a pump answers the fence only
//!   when no batch is waiting. With an agent-side flush before it (a command's end), it
//!   tells a test that the host has acted on every change made so far.
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bandsox_agent::client::{AgentClient, FsEvents};
use bandsox_agent::proto::fs::{FsEvent, NodeId};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::inodes::{Incarnation, Inodes, VmNumbers};
use super::listings::Listings;
use crate::manager::vm::{Vm, VmState};

/// Where invalidations go (the FUSE notifier in the daemon; a recorder in tests).
/// Calls may block until the kernel has applied them.
pub trait Invalidate: Send + Sync {
    /// The cached entry `name` in directory `parent` may be stale: the kernel checks it
    /// again before its next use (or forgets it).
    fn entry(&self, parent: u64, name: &[u8]);
    /// Forget the attributes of `ino`, and its cached pages when `data`.
    fn inode(&self, ino: u64, data: bool);
}

/// Most remembered host changes; older ones are dropped first.
const RECENT_MAX: usize = 16_384;
/// How long a host change waits for its event.
const RECENT_TTL: Duration = Duration::from_secs(10);

/// A directory's number and a name in it.
type NameKey = (u64, Vec<u8>);

/// Names the host itself changed recently, what they name since, and when.
#[derive(Default)]
pub struct Recent {
    map: Mutex<HashMap<NameKey, (Option<NodeId>, Instant)>>,
}

impl Recent {
    /// The host made `name` in directory `parent` name `now`.
    pub fn note(&self, parent: u64, name: &[u8], now: Option<NodeId>) {
        let mut m = self.map.lock();
        if m.len() >= RECENT_MAX {
            m.retain(|_, (_, at)| at.elapsed() < RECENT_TTL);
            if m.len() >= RECENT_MAX {
                m.clear();
            }
        }
        m.insert((parent, name.to_vec()), (now, Instant::now()));
    }

    /// Does the host's own recent change of `name` in `parent` disagree with an event
    /// saying it names `now`? (An event about an earlier state can arrive after the
    /// host's later change: the host's answer is newer than it.) Leaves the note.
    pub fn disagrees(&self, parent: u64, name: &[u8], now: Option<NodeId>) -> bool {
        let key = (parent, name.to_vec());
        self.map
            .lock()
            .get(&key)
            .is_some_and(|(made, at)| *made != now && at.elapsed() < RECENT_TTL)
    }

    /// Is an event saying `name` in `parent` names `now` the echo of a host change?
    pub fn echoes(&self, parent: u64, name: &[u8], now: Option<NodeId>) -> bool {
        let key = (parent, name.to_vec());
        let mut m = self.map.lock();
        match m.remove(&key) {
            Some((made, at)) => made == now && at.elapsed() < RECENT_TTL,
            None => false,
        }
    }
}

type VmMap = Arc<Mutex<HashMap<Arc<str>, VmNumbers>>>;

pub struct Pumps {
    vms: VmMap,
    inodes: Arc<Mutex<Inodes>>,
    recent: Arc<Recent>,
    listings: Arc<Listings>,
    inval: OnceLock<Arc<dyn Invalidate>>,
    /// One fence queue per running pump (see [`Pumps::applied`]).
    fences: Mutex<Vec<mpsc::UnboundedSender<Fence>>>,
    /// Incarnations that have had a pump (until they end).
    pumped: Arc<Mutex<HashSet<Incarnation>>>,
}

/// Answered by a pump once no batch waits for it.
type Fence = oneshot::Sender<()>;

/// What one event means for the kernel's caches.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    Entry(u64, Vec<u8>),
    Inode(u64, bool),
}

/// What the host knows without asking, which events keep true.
struct Known {
    recent: Arc<Recent>,
}

/// What translation needs to know about one connection.
struct Source {
    inc: Incarnation,
    boot: u64,
}

impl Pumps {
    pub fn new(
        vms: VmMap,
        inodes: Arc<Mutex<Inodes>>,
        recent: Arc<Recent>,
        listings: Arc<Listings>,
    ) -> Self {
        Pumps {
            vms,
            inodes,
            recent,
            listings,
            inval: OnceLock::new(),
            fences: Mutex::new(Vec::new()),
            pumped: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    /// Resolves once every pump has applied every batch it had received when this was
    /// called (a pump that ends meanwhile counts as done).
    pub async fn applied(&self) {
        let waits: Vec<oneshot::Receiver<()>> = {
            let mut fences = self.fences.lock();
            fences.retain(|f| !f.is_closed());
            fences
                .iter()
                .filter_map(|f| {
                    let (tx, rx) = oneshot::channel();
                    f.send(tx).ok().map(|()| rx)
                })
                .collect()
        };
        for w in waits {
            // An error means the pump ended: everything it received was applied.
            let _ = w.await;
        }
    }

    pub fn set_invalidator(&self, inv: Arc<dyn Invalidate>) {
        let _ = self.inval.set(inv);
    }

    /// Start the pump for `client` (of `vm`) unless one runs already.
    pub fn ensure(
        &self,
        inc: &Incarnation,
        vm: &Arc<Vm>,
        client: &AgentClient,
        rt: &tokio::runtime::Handle,
    ) {
        let Some(events) = client.take_fs_events() else {
            return;
        };
        // Not the incarnation's first connection: events may have been lost between.
        let lost = !self.pumped.lock().insert(inc.clone());
        if lost {
            tracing::debug!(vm = %inc.vm_id, "new agent connection: cached attributes and pages go");
            self.listings.forget_incarnation(inc);
        }
        let src = Source {
            inc: inc.clone(),
            boot: client.info().instance,
        };
        let (vms, inodes) = (self.vms.clone(), self.inodes.clone());
        let known = Known {
            recent: self.recent.clone(),
        };
        let inval = self.inval.get().cloned();
        let (fence_tx, fences) = mpsc::unbounded_channel();
        self.fences.lock().push(fence_tx);
        // Listings change on the reader itself, so a lookup after a command's end never
        // sees a listing that misses what the command made.
        let tap_src = Source {
            inc: inc.clone(),
            boot: src.boot,
        };
        let (tap_vms, tap_inodes, tap_listings, tap_recent) = (
            self.vms.clone(),
            self.inodes.clone(),
            self.listings.clone(),
            self.recent.clone(),
        );
        client.set_fs_event_tap(Box::new(move |batch| {
            let vms = tap_vms.lock();
            let inodes = tap_inodes.lock();
            if let Some(v) = vms.get(&tap_src.inc.vm_id) {
                apply_to_listings(batch, &tap_src, v, &inodes, &tap_listings, &tap_recent);
            }
        }));
        let vm = Arc::downgrade(vm);
        let pumped = self.pumped.clone();
        rt.spawn(async move {
            let pipes = Pipes { events, fences };
            pump(pipes, lost, &src, &vms, &inodes, &known, inval.as_ref()).await;
            let live = vm.upgrade().is_some_and(|vm| {
                vm.generation() == src.inc.generation
                    && matches!(vm.state(), VmState::Running | VmState::Paused)
            });
            if !live {
                pumped.lock().remove(&src.inc);
                let inos = inodes.lock().inos_of(&src.inc);
                if let (Some(inval), false) = (inval, inos.is_empty()) {
                    let _ = tokio::task::spawn_blocking(move || {
                        for ino in inos {
                            inval.inode(ino, true);
                        }
                    })
                    .await;
                }
            }
        });
    }
}

/// What a pump reads: the connection's events and its fences.
struct Pipes {
    events: FsEvents,
    fences: mpsc::UnboundedReceiver<Fence>,
}

/// Apply the events of one connection until it ends; with `lost`, events may have been
/// lost before it: everything cached of the incarnation goes first.
async fn pump(
    mut pipes: Pipes,
    lost: bool,
    src: &Source,
    vms: &VmMap,
    inodes: &Mutex<Inodes>,
    known: &Known,
    inval: Option<&Arc<dyn Invalidate>>,
) {
    // With `lost`, the first round applies no batch: it drops everything cached.
    let mut lost = lost;
    loop {
        let batch = if std::mem::take(&mut lost) {
            None
        } else {
            tokio::select! {
                // Batches first: a fence is answered only when none is waiting.
                biased;
                batch = pipes.events.next() => match batch {
                    Some(b) => Some(b),
                    None => break,
                },
                Some(fence) = pipes.fences.recv() => {
                    let _ = fence.send(());
                    continue;
                }
            }
        };
        let actions = {
            let vms = vms.lock();
            let mut inodes = inodes.lock();
            match (vms.get(&src.inc.vm_id), batch) {
                (Some(v), Some(batch)) => translate(&batch, src, v, &mut inodes, known),
                (Some(v), None) => everything(src, v, &inodes),
                (None, _) => Vec::new(),
            }
        };
        if let (Some(inval), false) = (inval, actions.is_empty()) {
            let inval = inval.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for a in actions {
                    match a {
                        Action::Entry(parent, name) => inval.entry(parent, &name),
                        Action::Inode(ino, data) => inval.inode(ino, data),
                    }
                }
            })
            .await;
        }
    }
    tracing::debug!(vm = %src.inc.vm_id, "file event pump ended");
}

/// The host number of `id` if the kernel holds it for this incarnation.
fn held(src: &Source, v: &VmNumbers, inodes: &Inodes, id: NodeId) -> Option<u64> {
    if id == bandsox_agent::proto::fs::ROOT_ID {
        return match v.root {
            Some((generation, ino)) if generation == src.inc.generation => Some(ino),
            _ => None,
        };
    }
    let ino = Inodes::known_number(v, src.boot, id)?;
    inodes
        .get(ino)
        .filter(|i| i.inc == src.inc && i.node.id == id)
        .map(|_| ino)
}

/// What a batch means for the listings of directories the host made.
fn apply_to_listings(
    batch: &[FsEvent],
    src: &Source,
    v: &VmNumbers,
    inodes: &Inodes,
    listings: &Listings,
    recent: &Recent,
) {
    for ev in batch {
        match ev {
            FsEvent::Entry { parent, name, now } => {
                if let Some(p) = held(src, v, inodes, *parent) {
                    if recent.disagrees(p, name, *now) {
                        // Which of the two is newer is unknown here: the listing stops
                        // answering for this directory, so lookups ask the guest.
                        listings.forget(p);
                    } else {
                        listings.changed(p, name, now.is_some());
                    }
                }
            }
            FsEvent::Unwatched { node } => {
                if let Some(ino) = held(src, v, inodes, *node) {
                    listings.forget(ino);
                }
            }
            FsEvent::Overflow => listings.forget_incarnation(&src.inc),
            FsEvent::Node { .. } => {}
        }
    }
}

fn translate(
    batch: &[FsEvent],
    src: &Source,
    v: &VmNumbers,
    inodes: &mut Inodes,
    known: &Known,
) -> Vec<Action> {
    let mut out = Vec::new();
    for ev in batch {
        match ev {
            FsEvent::Entry { parent, name, now } => {
                if let Some(p) = held(src, v, inodes, *parent) {
                    if !known.recent.echoes(p, name, *now) {
                        out.push(Action::Entry(p, name.clone()));
                        // The kernel's cached listing of the directory goes too (it may
                        // hold no entry for the name, and then only this tells it).
                        let listing = Action::Inode(p, true);
                        if !out.contains(&listing) {
                            out.push(listing);
                        }
                        // A new link or a move changed the named node's link count or
                        // ctime; nothing else reports that.
                        if let Some(ino) = now.and_then(|id| held(src, v, inodes, id)) {
                            inodes.relinked(ino);
                            let attrs = Action::Inode(ino, false);
                            if !out.contains(&attrs) {
                                out.push(attrs);
                            }
                        }
                    }
                }
            }
            FsEvent::Node { node, data, attr } => {
                if let Some(ino) = held(src, v, inodes, *node) {
                    // An attribute change whose outcome an answer already told the kernel
                    // (the host's own chmod, utime, rename ...) changes nothing it knows.
                    // Data changes always go: equal attributes do not prove equal bytes.
                    let known = inodes.get(ino).and_then(|i| i.attr);
                    if !*data && attr.is_some() && known == *attr {
                        continue;
                    }
                    if *data {
                        inodes.data_changed(ino);
                    } else {
                        inodes.changed(ino);
                    }
                    out.push(Action::Inode(ino, *data));
                }
            }
            FsEvent::Unwatched { node } => {
                if let Some(ino) = held(src, v, inodes, *node) {
                    inodes.unwatched(ino);
                    out.push(Action::Inode(ino, true));
                }
            }
            FsEvent::Overflow => {
                tracing::warn!(vm = %src.inc.vm_id, "guest file events were lost; dropping cached pages");
                out.extend(everything(src, v, inodes));
            }
        }
    }
    out
}

/// Drop every cached attribute and page of the incarnation (events were lost).
fn everything(src: &Source, v: &VmNumbers, inodes: &Inodes) -> Vec<Action> {
    let mut out: Vec<Action> = inodes
        .inos_of(&src.inc)
        .into_iter()
        .map(|ino| Action::Inode(ino, true))
        .collect();
    if let Some((generation, ino)) = v.root {
        if generation == src.inc.generation {
            out.push(Action::Inode(ino, true));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_event_disagrees_with_a_newer_host_change() {
        let r = Recent::default();
        let id = NodeId { dev: 1, ino: 9 };
        r.note(5, b"config.lock", Some(id));
        // The removal of an earlier `config.lock`, arriving after the new one was made.
        assert!(r.disagrees(5, b"config.lock", None));
        assert!(!r.disagrees(5, b"config.lock", Some(id)));
        assert!(!r.disagrees(5, b"other", None));
        // Asking leaves the note for the echo check.
        assert!(r.echoes(5, b"config.lock", Some(id)));
    }
    use crate::guestfs::inodes::EntryFacts;
    use bandsox_agent::proto::fs::{FileHandle, NodeRef, XattrNames, ROOT_ID};

    /// A VM's numbers with one coherent regular file (guest inode 5) the kernel holds.
    struct OneFile {
        src: Source,
        v: VmNumbers,
        t: Inodes,
        f_id: NodeId,
        f: u64,
        _dir: tempfile::TempDir,
    }

    fn one_file(xattrs: Option<XattrNames>) -> OneFile {
        let dir = tempfile::tempdir().unwrap();
        let inc = Incarnation {
            vm_id: Arc::from("v"),
            generation: 1,
        };
        let src = Source {
            inc: inc.clone(),
            boot: 9,
        };
        let mut v = VmNumbers::new(2, dir.path().to_path_buf());
        let mut t = Inodes::new();
        let f_id = NodeId {
            dev: (254u64 << 8) | 1,
            ino: 5,
        };
        let f = t.number(&mut v, 9, f_id).unwrap();
        t.intern(
            f,
            &inc,
            &NodeRef {
                id: f_id,
                fh: FileHandle(vec![0; 8]),
            },
            &EntryFacts {
                attr: Default::default(),
                kind: libc::S_IFREG,
                coherent: true,
                counted: false,
                watched: false,
                xattrs,
            },
        );
        OneFile {
            src,
            v,
            t,
            f_id,
            f,
            _dir: dir,
        }
    }

    #[test]
    fn events_become_invalidations_except_echoes_of_host_changes() {
        let OneFile {
            src,
            mut v,
            mut t,
            f_id,
            f,
            _dir,
        } = one_file(None);
        v.root = Some((1, 99));
        let disk = f_id.dev;
        let known = Known {
            recent: Arc::new(Recent::default()),
        };
        let recent = &known.recent;
        recent.note(99, b"made", Some(f_id));
        recent.note(99, b"gone", None);
        let batch = vec![
            FsEvent::Entry {
                parent: ROOT_ID,
                name: b"x".to_vec(),
                now: None,
            },
            // Echoes of the host's own changes: dropped.
            FsEvent::Entry {
                parent: ROOT_ID,
                name: b"made".to_vec(),
                now: Some(f_id),
            },
            FsEvent::Entry {
                parent: ROOT_ID,
                name: b"gone".to_vec(),
                now: None,
            },
            // A parent the kernel does not hold.
            FsEvent::Entry {
                parent: NodeId { dev: disk, ino: 77 },
                name: b"y".to_vec(),
                now: None,
            },
            // Attributes an answer already gave: nothing to drop.
            FsEvent::Node {
                node: f_id,
                data: false,
                attr: Some(Default::default()),
            },
            FsEvent::Node {
                node: f_id,
                data: true,
                attr: None,
            },
            FsEvent::Node {
                node: NodeId { dev: disk, ino: 6 },
                data: true,
                attr: None,
            },
            // After a change no answer told, the same attributes are news.
            FsEvent::Node {
                node: f_id,
                data: false,
                attr: Some(Default::default()),
            },
        ];
        let acts = translate(&batch, &src, &v, &mut t, &known);
        assert_eq!(
            acts,
            vec![
                Action::Entry(99, b"x".to_vec()),
                Action::Inode(99, true),
                Action::Inode(f, true),
                Action::Inode(f, false)
            ]
        );
        // A host change the guest changed again afterwards is not an echo.
        recent.note(99, b"made", Some(f_id));
        let acts = translate(
            &[FsEvent::Entry {
                parent: ROOT_ID,
                name: b"made".to_vec(),
                now: Some(NodeId { dev: disk, ino: 8 }),
            }],
            &src,
            &v,
            &mut t,
            &known,
        );
        assert_eq!(
            acts,
            vec![Action::Entry(99, b"made".to_vec()), Action::Inode(99, true)]
        );
        let acts = translate(&[FsEvent::Overflow], &src, &v, &mut t, &known);
        assert_eq!(acts.len(), 2);
    }

    #[test]
    fn a_name_made_in_the_guest_drops_the_named_nodes_attributes() {
        let mut one = one_file(None);
        one.v.root = Some((1, 99));
        let known = Known {
            recent: Arc::new(Recent::default()),
        };
        // A hard link made in the guest: the file's link count changed.
        let link = FsEvent::Entry {
            parent: ROOT_ID,
            name: b"link".to_vec(),
            now: Some(one.f_id),
        };
        let acts = translate(&[link], &one.src, &one.v, &mut one.t, &known);
        let f = one.f;
        assert_eq!(
            acts,
            vec![
                Action::Entry(99, b"link".to_vec()),
                Action::Inode(99, true),
                Action::Inode(f, false)
            ]
        );
        assert_eq!(one.t.get(f).and_then(|i| i.attr), None);
    }

    #[test]
    fn xattr_names_survive_data_events_not_attribute_events() {
        let names = XattrNames(b"user.a\0".to_vec());
        let OneFile {
            src,
            v,
            mut t,
            f_id,
            f,
            _dir,
        } = one_file(Some(names.clone()));
        let known = Known {
            recent: Arc::new(Recent::default()),
        };
        let node = |data| FsEvent::Node {
            node: f_id,
            data,
            attr: None,
        };
        let acts = translate(&[node(true)], &src, &v, &mut t, &known);
        assert_eq!(acts, vec![Action::Inode(f, true)]);
        assert_eq!(t.get(f).and_then(|i| i.xattrs.clone()), Some(names));
        assert_eq!(t.get(f).and_then(|i| i.attr), None);
        translate(&[node(false)], &src, &v, &mut t, &known);
        assert_eq!(t.get(f).and_then(|i| i.xattrs.clone()), None);
    }
}
