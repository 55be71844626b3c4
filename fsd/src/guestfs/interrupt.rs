//! Ctrl-C for `fs/` requests.
//!
//! A request to a guest that does not answer (agent stopped, guest hung) would hold the
//! caller until its deadline (20 s), through SIGINT and even SIGKILL: fuser answers
//! FUSE_INTERRUPT with ENOSYS, after which the kernel waits for our answer. So every
//! request made on behalf of a process is registered with the [`Watcher`]; one task
//! looks, every [`POLL`], at the processes whose requests have waited at least that
//! long, and answers `EINTR` for those with a SIGINT, SIGTERM, SIGHUP, SIGQUIT or SIGKILL
//! pending ([`crate::interrupt`]). Registering costs a map insert, no task and no thread
//! hop, so fast requests stay fast.
//!
//! Invariants: a request's completion runs exactly once — the guest's answer and the
//! interrupt race for it through [`Pending::take`]; an answer that arrives after the
//! caller was told `EINTR` is given back ([`GuestFs::give_back`]: node references
//! forgotten, handles closed), so an interrupted `lookup` or `open` leaks nothing in
//! the guest or in the host's tables.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bandsox_agent::proto::fs::{FsRequest, FsResponse};
use parking_lot::Mutex;

use super::{GuestFs, Resolved, FS_DEADLINE};
use crate::error::Error;

/// How long a request may wait before its caller is watched, and how often.
pub const POLL: Duration = crate::interrupt::POLL;

tokio::task_local! {
    /// The pid of the process a task answers for (requests sent after a reconnect).
    pub static CALLER: u32;
}

thread_local! {
    /// The pid of the FUSE request this worker thread is dispatching (0: none).
    static REQUEST_PID: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Remember the caller of the FUSE request being dispatched on this thread.
pub fn note_caller(pid: u32) {
    REQUEST_PID.with(|p| p.set(pid));
}

/// The process the current request is made for (0: none known).
pub fn caller() -> u32 {
    CALLER
        .try_with(|p| *p)
        .unwrap_or_else(|_| REQUEST_PID.with(|p| p.get()))
}

struct Watched {
    pid: u32,
    since: Instant,
    interrupt: Box<dyn FnOnce() + Send>,
}

/// Requests waiting on behalf of processes (see the module docs).
#[derive(Default)]
pub struct Watcher {
    waiting: Mutex<HashMap<u64, Watched>>,
    next: AtomicU64,
    wake: tokio::sync::Notify,
}

impl Watcher {
    /// Start the watching task on `rt`.
    pub fn start(rt: &tokio::runtime::Handle) -> Arc<Watcher> {
        let w = Arc::new(Watcher::default());
        let me = w.clone();
        rt.spawn(async move {
            loop {
                if me.waiting.lock().is_empty() {
                    // A `watch` in between leaves a permit: no wakeup is lost.
                    me.wake.notified().await;
                    continue;
                }
                tokio::time::sleep(POLL).await;
                me.scan();
            }
        });
        w
    }

    fn watch(&self, pid: u32, interrupt: Box<dyn FnOnce() + Send>) -> u64 {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let was_empty = {
            let mut w = self.waiting.lock();
            w.insert(
                key,
                Watched {
                    pid,
                    since: Instant::now(),
                    interrupt,
                },
            );
            w.len() == 1
        };
        if was_empty {
            self.wake.notify_one();
        }
        key
    }

    fn unwatch(&self, key: u64) {
        self.waiting.lock().remove(&key);
    }

    /// Interrupt the requests whose callers have a watched signal pending.
    fn scan(&self) {
        let candidates: Vec<(u64, u32)> = self
            .waiting
            .lock()
            .iter()
            .filter(|(_, w)| w.since.elapsed() >= POLL)
            .map(|(k, w)| (*k, w.pid))
            .collect();
        let mut pending: HashMap<u32, bool> = HashMap::new();
        for (key, pid) in candidates {
            let hit = *pending
                .entry(pid)
                .or_insert_with(|| crate::interrupt::pending_signal(pid).is_some());
            if hit {
                let w = self.waiting.lock().remove(&key);
                if let Some(w) = w {
                    tracing::debug!(pid, "fs/ request interrupted by a signal");
                    (w.interrupt)();
                }
            }
        }
    }
}

/// One request's completion, raced for by the answer and the interrupt.
pub struct Pending<D> {
    slot: Arc<Mutex<Option<D>>>,
    key: Option<u64>,
    watcher: Arc<Watcher>,
}

impl<D> Pending<D> {
    /// Wrap `done`; registered with `watcher` when the request has a caller.
    pub fn new<T>(watcher: &Arc<Watcher>, done: D) -> Pending<D>
    where
        D: FnOnce(crate::error::Result<T>) + Send + 'static,
    {
        let slot = Arc::new(Mutex::new(Some(done)));
        let pid = caller();
        let key = (pid != 0).then(|| {
            let s = slot.clone();
            watcher.watch(
                pid,
                Box::new(move || {
                    let done = s.lock().take();
                    if let Some(done) = done {
                        done(Err(Error::interrupted()));
                    }
                }),
            )
        });
        Pending {
            slot,
            key,
            watcher: watcher.clone(),
        }
    }

    /// The completion, unless the caller was already told `EINTR`.
    pub fn take(&self) -> Option<D> {
        if let Some(k) = self.key {
            self.watcher.unwatch(k);
        }
        self.slot.lock().take()
    }
}

impl GuestFs {
    /// Give back what an answer nobody will see handed us (see the module docs).
    pub(super) fn give_back(&self, r: &Resolved, resp: FsResponse, dir: bool) {
        match resp {
            FsResponse::Entry(e) => self.unused_entry(r, &e),
            FsResponse::Created { entry, handle } => {
                self.unused_entry(r, &entry);
                self.release_unused(r, handle);
            }
            FsResponse::Opened { handle } if dir => {
                let client = r.client.clone();
                self.rt.spawn(async move {
                    let _ = client
                        .fs(FsRequest::ReleaseDir { handle }, FS_DEADLINE)
                        .await;
                });
            }
            FsResponse::Opened { handle } => self.release_unused(r, handle),
            FsResponse::DirEntries(entries) => {
                for e in entries.iter().filter_map(|d| d.entry.as_ref()) {
                    self.unused_entry(r, e);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answer_or_interrupt_completes_once() {
        let w = Watcher::start(&tokio::runtime::Handle::current());
        // No caller: nothing is registered.
        let p = Pending::new(&w, |_: crate::error::Result<()>| {});
        assert!(p.key.is_none());
        assert!(p.take().is_some());
        assert!(p.take().is_none());
        // A caller without a pending signal: the answer wins.
        note_caller(std::process::id());
        let (tx, rx) = std::sync::mpsc::channel();
        let p = Pending::new(&w, move |r: crate::error::Result<()>| tx.send(r).unwrap());
        note_caller(0);
        tokio::time::sleep(POLL * 3).await;
        assert!(rx.try_recv().is_err());
        (p.take().unwrap())(Ok(()));
        assert_eq!(rx.recv().unwrap(), Ok(()));
        assert!(w.waiting.lock().is_empty());
    }
}
