//! Coherence: one inotify instance per agent watching the directories the host holds
//! nodes for, and the delivery of [`FsEvent`]s to every live session.
//!
//! Invariants:
//! * A directory node is watched from its registration until it is forgotten (or the
//!   kernel drops the watch, `IN_IGNORED`); watches are added/removed under the node
//!   table's lock ([`WatchSet`] lives inside it). At most `limit` watches exist; after
//!   the kernel says `ENOSPC` no more are tried until one is removed.
//! * Events are read from the inotify descriptor only under [`Watcher::pending`]'s lock
//!   and appended to one de-duplicated pending list (bounded: beyond
//!   [`MAX_PENDING`] raw events the list collapses to one `Overflow`).
//! * Pending events are taken, translated and queued to the sessions under the async
//!   `send_lock`, so batches reach every session in the order they were read.
//! * Delivery never blocks the watcher for long: each session gets a bounded wait
//!   ([`SEND_WAIT`]); a session that could not take a batch is marked and gets one
//!   `Overflow` as soon as it can, instead of the lost events.
//! * [`Watcher::flush`] (called before a command's `Exited` is queued) reads whatever is
//!   readable and queues it to the command's session before returning, so a command's
//!   changes are announced before its end.
//! * Events wait while no session is registered (the host is reconnecting): the next
//!   session gets them, so a change made while the host was away is still announced.
//!   They are bounded like all pending events (beyond [`MAX_PENDING`], one `Overflow`).
//! * A batch holds at most [`MAX_BATCH`] events (a few hundred bytes each), far below
//!   `MAX_FRAME_LEN`.
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::io::unix::AsyncFd;

use super::sys::{self, ProcFd};
use super::FsCore;
use crate::proto::fs::{Attr, FsEvent, NodeId};
use crate::proto::Message;
use crate::server::{Out, OutTx};

/// Default most directory watches.
pub(super) const DEFAULT_WATCH_LIMIT: usize = 8192;
/// Largest batch of events in one `FsEvents` message.
pub(super) const MAX_BATCH: usize = 4096;
/// Most raw events kept before they collapse into one `Overflow`.
pub(super) const MAX_PENDING: usize = 65_536;
/// How long events are gathered before they are sent.
pub(super) const COALESCE: Duration = Duration::from_millis(5);
/// How long delivery waits for one session's queue.
pub(super) const SEND_WAIT: Duration = Duration::from_millis(50);
/// How often a session that missed events is offered its `Overflow` again.
const OVERFLOW_RETRY: Duration = Duration::from_millis(100);
/// Least time between two sweeps for deleted nodes (see [`super::nodes::NodeTable::sweep_deleted`]).
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);

fn watch_mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::MODIFY
        | WatchMask::ATTRIB
        | WatchMask::CLOSE_WRITE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
        | WatchMask::EXCL_UNLINK
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Watch bookkeeping; lives inside the node table and is guarded by its lock.
pub(super) struct WatchSet {
    watches: Option<Watches>,
    by_wd: HashMap<i32, NodeId>,
    limit: usize,
    exhausted: bool,
}

impl WatchSet {
    pub fn new(watches: Option<Watches>, limit: usize) -> WatchSet {
        WatchSet {
            watches,
            by_wd: HashMap::new(),
            limit,
            exhausted: false,
        }
    }

    /// Watch directory node `node` (descriptor `fd`); `None` when not watched.
    pub fn add(&mut self, node: NodeId, fd: BorrowedFd<'_>) -> Option<WatchDescriptor> {
        let watches = self.watches.as_mut()?;
        if self.exhausted || self.by_wd.len() >= self.limit {
            return None;
        }
        let path = ProcFd::path(fd);
        match watches.add(Path::new(OsStr::from_bytes(path.as_bytes())), watch_mask()) {
            Ok(wd) => {
                self.by_wd.insert(wd.get_watch_descriptor_id(), node);
                Some(wd)
            }
            Err(e) => {
                if e.raw_os_error() == Some(libc::ENOSPC) {
                    tracing::warn!("inotify watch limit reached ({} watches)", self.by_wd.len());
                    self.exhausted = true;
                } else {
                    tracing::debug!(%node, "cannot watch directory: {e}");
                }
                None
            }
        }
    }

    /// Stop watching (the node is gone).
    pub fn remove(&mut self, wd: WatchDescriptor) {
        self.by_wd.remove(&wd.get_watch_descriptor_id());
        self.exhausted = false;
        if let Some(w) = self.watches.as_mut() {
            // EINVAL when the kernel already dropped it: fine.
            let _ = w.remove(wd);
        }
    }

    pub fn node_of(&self, wd: i32) -> Option<NodeId> {
        self.by_wd.get(&wd).copied()
    }

    /// The kernel dropped `wd`; returns the node it watched.
    pub fn gone(&mut self, wd: i32) -> Option<NodeId> {
        let id = self.by_wd.remove(&wd)?;
        self.exhausted = false;
        Some(id)
    }
}

/// One raw inotify event, reduced to what translation needs (and de-duplicated on).
#[derive(Clone, PartialEq, Eq, Hash)]
enum Raw {
    /// A name in directory `wd` appeared/disappeared/moved.
    Entry {
        wd: i32,
        name: Vec<u8>,
    },
    /// The inode named `name` in directory `wd` changed (`data`: its contents).
    Child {
        wd: i32,
        name: Vec<u8>,
        data: bool,
    },
    /// Directory `wd` itself changed attributes (or was deleted or moved).
    SelfAttr {
        wd: i32,
    },
    /// The kernel dropped watch `wd`.
    Ignored {
        wd: i32,
    },
    Overflow,
}

#[derive(Default)]
struct Pending {
    list: Vec<Raw>,
    seen: HashSet<Raw>,
    overflow: bool,
}

impl Pending {
    fn push(&mut self, r: Raw) {
        if self.overflow && !matches!(r, Raw::Ignored { .. }) {
            return;
        }
        if matches!(r, Raw::Overflow) || self.list.len() >= MAX_PENDING {
            // Everything before is subsumed; keep only the bookkeeping events.
            self.overflow = true;
            self.list.retain(|r| matches!(r, Raw::Ignored { .. }));
            self.seen.clear();
            self.list.push(Raw::Overflow);
            return;
        }
        if self.seen.insert(r.clone()) {
            self.list.push(r);
        }
    }

    fn take(&mut self) -> Vec<Raw> {
        self.seen.clear();
        self.overflow = false;
        std::mem::take(&mut self.list)
    }
}

fn classify(wd: i32, mask: EventMask, name: Option<&OsStr>) -> Option<Raw> {
    if mask.contains(EventMask::Q_OVERFLOW) {
        return Some(Raw::Overflow);
    }
    if mask.contains(EventMask::IGNORED) {
        return Some(Raw::Ignored { wd });
    }
    match name {
        Some(n) => {
            let name = n.as_bytes().to_vec();
            if mask.intersects(
                EventMask::CREATE | EventMask::DELETE | EventMask::MOVED_FROM | EventMask::MOVED_TO,
            ) {
                Some(Raw::Entry { wd, name })
            } else if mask.intersects(EventMask::MODIFY | EventMask::CLOSE_WRITE) {
                Some(Raw::Child {
                    wd,
                    name,
                    data: true,
                })
            } else if mask.contains(EventMask::ATTRIB) {
                Some(Raw::Child {
                    wd,
                    name,
                    data: false,
                })
            } else {
                None
            }
        }
        None => mask
            .intersects(EventMask::ATTRIB | EventMask::DELETE_SELF | EventMask::MOVE_SELF)
            .then_some(Raw::SelfAttr { wd }),
    }
}

/// Translated events, de-duplicated. A node's data change and its attribute change stay
/// two events (see `FsEvent::Node`: a data event promises unchanged xattrs).
#[derive(Default)]
struct EventSet {
    events: Vec<FsEvent>,
    entries: HashSet<(NodeId, Vec<u8>)>,
    nodes: HashMap<(NodeId, bool), usize>,
    overflow: bool,
}

impl EventSet {
    fn entry(&mut self, parent: NodeId, name: Vec<u8>, now: Option<NodeId>) {
        if self.entries.insert((parent, name.clone())) {
            self.events.push(FsEvent::Entry { parent, name, now });
        }
    }
    fn node(&mut self, node: NodeId, data: bool, attr: Option<Attr>) {
        match self.nodes.get(&(node, data)) {
            Some(&i) => {
                if let Some(FsEvent::Node { attr: a, .. }) = self.events.get_mut(i) {
                    *a = attr;
                }
            }
            None => {
                self.nodes.insert((node, data), self.events.len());
                self.events.push(FsEvent::Node { node, data, attr });
            }
        }
    }
    fn finish(self) -> Vec<FsEvent> {
        if self.overflow {
            vec![FsEvent::Overflow]
        } else {
            self.events
        }
    }
}

struct Sink {
    out: OutTx,
    /// Missed a batch: owes this session an `Overflow`.
    overflowed: bool,
}

/// The event side: reads inotify, translates, delivers.
pub(super) struct Watcher {
    inotify: Option<Mutex<Inotify>>,
    /// A duplicate of the inotify descriptor for readiness polling.
    poll_fd: Option<OwnedFd>,
    pending: Mutex<Pending>,
    send_lock: tokio::sync::Mutex<()>,
    sessions: Mutex<HashMap<u64, Sink>>,
    next_session: AtomicU64,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Wakes the reader task: a session registered, events may be waiting for it.
    kick: Arc<tokio::sync::Notify>,
    /// Names disappeared since the last sweep for deleted nodes, and when it ran.
    sweep: Mutex<(bool, Option<std::time::Instant>)>,
}

impl Watcher {
    /// A watcher and the watch set for the node table; without inotify (init failed)
    /// nothing is watched and no events are sent.
    pub fn new(limit: usize) -> (Watcher, WatchSet) {
        let (inotify, watches, poll_fd) = match Inotify::init() {
            Ok(i) => {
                let w = i.watches();
                let dup = i.as_fd().try_clone_to_owned();
                match dup {
                    Ok(d) => (Some(Mutex::new(i)), Some(w), Some(d)),
                    Err(e) => {
                        tracing::warn!("cannot duplicate the inotify descriptor: {e}");
                        (None, None, None)
                    }
                }
            }
            Err(e) => {
                tracing::warn!("inotify unavailable, no coherence events: {e}");
                (None, None, None)
            }
        };
        (
            Watcher {
                inotify,
                poll_fd,
                pending: Mutex::new(Pending::default()),
                send_lock: tokio::sync::Mutex::new(()),
                sessions: Mutex::new(HashMap::new()),
                next_session: AtomicU64::new(1),
                task: Mutex::new(None),
                kick: Arc::new(tokio::sync::Notify::new()),
                sweep: Mutex::new((false, None)),
            },
            WatchSet::new(watches, limit),
        )
    }

    /// Register a session's queue; events go to it until [`Watcher::unregister`].
    pub fn register(&self, out: OutTx) -> u64 {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        lock(&self.sessions).insert(
            id,
            Sink {
                out,
                overflowed: false,
            },
        );
        // Events kept while no session was registered go out now.
        self.kick.notify_one();
        id
    }

    pub fn unregister(&self, id: u64) {
        lock(&self.sessions).remove(&id);
    }

    /// Start the reader task on the current runtime unless it runs already.
    pub fn ensure_task(&self, core: Weak<FsCore>) {
        let Some(fd) = self.poll_fd.as_ref() else {
            return;
        };
        let mut task = lock(&self.task);
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let fd = match fd.try_clone() {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!("cannot duplicate the inotify descriptor: {e}");
                return;
            }
        };
        *task = Some(tokio::spawn(run(core, fd, self.kick.clone())));
    }

    /// Read everything readable into the pending list (non-blocking).
    fn read_available(&self) {
        let Some(inotify) = self.inotify.as_ref() else {
            return;
        };
        let mut pending = lock(&self.pending);
        let mut inotify = lock(inotify);
        let mut buf = [0u8; 16 * 1024];
        loop {
            match inotify.read_events(&mut buf) {
                Ok(events) => {
                    for ev in events {
                        if let Some(r) = classify(ev.wd.get_watch_descriptor_id(), ev.mask, ev.name)
                        {
                            pending.push(r);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("reading inotify events: {e}");
                    return;
                }
            }
        }
    }

    /// A sweep is owed (names disappeared) but was held back by [`SWEEP_INTERVAL`].
    fn sweep_owed(&self) -> bool {
        lock(&self.sweep).0
    }

    /// Drop what the node table keeps open of deleted inodes, at most every
    /// [`SWEEP_INTERVAL`] after names disappeared: a deleted file's space is freed and a
    /// deleted watched directory is reported `Unwatched` (a held descriptor would keep
    /// the kernel from ever saying so).
    fn sweep_if_due(&self, core: &FsCore, set: &mut EventSet) {
        {
            let mut sw = lock(&self.sweep);
            let due = sw.0 && sw.1.is_none_or(|at| at.elapsed() >= SWEEP_INTERVAL);
            if !due {
                return;
            }
            *sw = (false, Some(std::time::Instant::now()));
        }
        for node in core.nodes.sweep_deleted() {
            set.events.push(FsEvent::Unwatched { node });
        }
    }

    /// Take the pending events and translate them into `FsEvent`s.
    fn translate(&self, core: &FsCore) -> Vec<FsEvent> {
        let raws = lock(&self.pending).take();
        let mut set = EventSet::default();
        for r in raws {
            match r {
                Raw::Overflow => set.overflow = true,
                Raw::Ignored { wd } => {
                    if let Some(node) = core.nodes.watch_gone(wd) {
                        set.events.push(FsEvent::Unwatched { node });
                    }
                }
                Raw::Entry { wd, name } => {
                    if let Some(p) = core.nodes.watched_dir(wd) {
                        // What the name names now, so the host keeps what is still true.
                        let now = sys::cstring(&name)
                            .and_then(|c| sys::stat_at(p.fd(), &c))
                            .ok()
                            .map(|st| core.nodes.reported(st.st_dev, st.st_ino));
                        if now.is_none() {
                            lock(&self.sweep).0 = true;
                        }
                        set.entry(p.id, name, now);
                    }
                }
                Raw::SelfAttr { wd } => {
                    if let Some(p) = core.nodes.watched_dir(wd) {
                        let attr = sys::stat_fd(p.fd()).ok().map(|st| sys::to_attr(&st));
                        set.node(p.id, false, attr);
                    }
                }
                Raw::Child { wd, name, data } => {
                    let Some(p) = core.nodes.watched_dir(wd) else {
                        continue;
                    };
                    let Ok(cname) = sys::cstring(&name) else {
                        continue;
                    };
                    if let Ok(st) = sys::stat_at(p.fd(), &cname) {
                        let id = core.nodes.reported(st.st_dev, st.st_ino);
                        set.node(id, data, Some(sys::to_attr(&st)));
                    }
                }
            }
        }
        self.sweep_if_due(core, &mut set);
        set.finish()
    }

    fn overflow_owed(&self) -> bool {
        lock(&self.sessions).values().any(|s| s.overflowed)
    }

    /// Read, translate and deliver what is pending. With `own`, that session gets the
    /// events with an unbounded wait (and is skipped in the bounded broadcast).
    async fn deliver(&self, core: &FsCore, own: Option<&OutTx>) {
        let guard = self.send_lock.lock().await;
        self.read_available();
        if own.is_none() && lock(&self.sessions).is_empty() {
            // Nobody to tell: keep them for the next session.
            return;
        }
        let events = self.translate(core);
        let batches: Vec<Vec<FsEvent>> = events.chunks(MAX_BATCH).map(|c| c.to_vec()).collect();
        let mut own_owes_overflow = false;
        let mut sinks: Vec<(u64, OutTx, bool)> = Vec::new();
        for (id, s) in lock(&self.sessions).iter_mut() {
            if own.is_some_and(|o| o.same_channel(&s.out)) {
                if s.overflowed {
                    // It missed a batch earlier: the Overflow must come before its
                    // command's end, and subsumes everything else.
                    s.overflowed = false;
                    own_owes_overflow = true;
                }
            } else {
                sinks.push((*id, s.out.clone(), s.overflowed));
            }
        }
        for (id, tx, overflowed) in sinks {
            let ok = if overflowed {
                send_bounded(&tx, vec![FsEvent::Overflow]).await
            } else {
                let mut ok = true;
                for b in &batches {
                    if !send_bounded(&tx, b.clone()).await {
                        ok = false;
                        break;
                    }
                }
                ok
            };
            if let Some(s) = lock(&self.sessions).get_mut(&id) {
                s.overflowed = !ok;
                if !ok {
                    tracing::debug!(session = id, "session queue full: events dropped");
                }
            }
        }
        drop(guard);
        if let Some(out) = own {
            let own_batches = if own_owes_overflow {
                vec![vec![FsEvent::Overflow]]
            } else {
                batches
            };
            for b in own_batches {
                if out.send(Out::Msg(Message::FsEvents(b))).await.is_err() {
                    break;
                }
            }
        }
    }

    /// Deliver everything the kernel has queued so far; the session `out` has them
    /// queued (before anything it queues after this returns).
    pub async fn flush(&self, core: &FsCore, out: &OutTx) {
        if self.inotify.is_none() {
            return;
        }
        self.deliver(core, Some(out)).await;
    }

    /// Deliver what is pending now, as the reader task does after [`COALESCE`].
    pub async fn deliver_now(&self, core: &FsCore) {
        if self.inotify.is_some() {
            self.deliver(core, None).await;
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // The task holds its own duplicate of the inotify descriptor: stop it, so a
        // dropped agent (in-process tests) does not keep an inotify instance alive.
        if let Some(t) = lock(&self.task).take() {
            t.abort();
        }
    }
}

/// Queue a batch with a bounded wait; false when it was dropped (full for too long).
/// A closed queue counts as delivered (the session is ending).
async fn send_bounded(tx: &OutTx, batch: Vec<FsEvent>) -> bool {
    match tx
        .send_timeout(Out::Msg(Message::FsEvents(batch)), SEND_WAIT)
        .await
    {
        Ok(()) => true,
        Err(tokio::sync::mpsc::error::SendTimeoutError::Closed(_)) => true,
        Err(tokio::sync::mpsc::error::SendTimeoutError::Timeout(_)) => false,
    }
}

/// The reader task: wait for events (or a new session), gather for [`COALESCE`],
/// deliver.
async fn run(core: Weak<FsCore>, fd: OwnedFd, kick: Arc<tokio::sync::Notify>) {
    // SAFETY: the AsyncFd owns `fd` (an OwnedFd), which stays open and refers to the
    // same inotify instance until the AsyncFd is dropped.
    let afd = match unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) } {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!("cannot poll inotify: {e}");
            return;
        }
    };
    loop {
        let owed = match core.upgrade() {
            Some(c) => c.watcher.overflow_owed() || c.watcher.sweep_owed(),
            None => return,
        };
        let readable = async {
            if owed {
                tokio::time::timeout(OVERFLOW_RETRY, afd.readable())
                    .await
                    .ok()
            } else {
                Some(afd.readable().await)
            }
        };
        let ready = tokio::select! {
            ready = readable => ready,
            () = kick.notified() => None,
        };
        match ready {
            Some(Ok(mut guard)) => {
                let Some(c) = core.upgrade() else { return };
                c.watcher.read_available();
                // Everything was read until EAGAIN; tokio keeps readiness that arrived
                // after the guard was taken.
                guard.clear_ready();
            }
            Some(Err(e)) => {
                tracing::warn!("polling inotify failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            None => {}
        }
        tokio::time::sleep(COALESCE).await;
        let Some(c) = core.upgrade() else { return };
        c.watcher.deliver(&c, None).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_of_raw_events() {
        let n = Some(OsStr::new("a"));
        assert!(matches!(
            classify(3, EventMask::CREATE, n),
            Some(Raw::Entry { wd: 3, .. })
        ));
        assert!(matches!(
            classify(3, EventMask::MOVED_TO | EventMask::ISDIR, n),
            Some(Raw::Entry { .. })
        ));
        assert!(matches!(
            classify(3, EventMask::CLOSE_WRITE, n),
            Some(Raw::Child { data: true, .. })
        ));
        assert!(matches!(
            classify(3, EventMask::ATTRIB, n),
            Some(Raw::Child { data: false, .. })
        ));
        assert!(matches!(
            classify(3, EventMask::ATTRIB | EventMask::ISDIR, None),
            Some(Raw::SelfAttr { wd: 3 })
        ));
        assert!(matches!(
            classify(3, EventMask::IGNORED, None),
            Some(Raw::Ignored { wd: 3 })
        ));
        assert!(matches!(
            classify(-1, EventMask::Q_OVERFLOW, None),
            Some(Raw::Overflow)
        ));
    }

    #[test]
    fn pending_dedups_and_collapses_into_overflow() {
        let mut p = Pending::default();
        let e = |i: usize| Raw::Entry {
            wd: 1,
            name: i.to_string().into_bytes(),
        };
        p.push(e(1));
        p.push(e(1));
        p.push(Raw::Ignored { wd: 9 });
        assert_eq!(p.take().len(), 2);
        for i in 0..MAX_PENDING + 10 {
            p.push(e(i));
        }
        p.push(Raw::Ignored { wd: 9 });
        let v = p.take();
        assert!(v.contains(&Raw::Overflow));
        assert!(v.contains(&Raw::Ignored { wd: 9 }));
        assert_eq!(v.len(), 2);
        assert!(p.take().is_empty());
    }

    #[test]
    fn event_set_merges_node_events() {
        let id = |ino| NodeId { dev: 1, ino };
        let mut s = EventSet::default();
        s.node(id(5), false, None);
        s.node(id(5), true, None);
        s.node(id(5), false, None);
        s.node(id(5), true, None);
        s.entry(id(1), b"x".to_vec(), None);
        s.entry(id(1), b"x".to_vec(), Some(id(3)));
        assert_eq!(
            s.finish(),
            vec![
                // An attribute change and a data change of one node stay apart.
                FsEvent::Node {
                    node: id(5),
                    data: false,
                    attr: None,
                },
                FsEvent::Node {
                    node: id(5),
                    data: true,
                    attr: None,
                },
                FsEvent::Entry {
                    parent: id(1),
                    name: b"x".to_vec(),
                    now: None,
                }
            ]
        );
        let s = EventSet {
            overflow: true,
            ..Default::default()
        };
        assert_eq!(s.finish(), vec![FsEvent::Overflow]);
    }
}
