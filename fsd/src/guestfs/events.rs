//! Coherence: guest change events become kernel cache invalidations.
//!
//! Invariants:
//! - One pump per agent connection (the connection's event stream can be taken once);
//!   it ends when the connection does.
//! - Events are applied in arrival order, each batch completely (on a blocking thread,
//!   because the kernel's notify calls can wait for inode locks) before the next.
//! - A pump publishes how many of its connection's batches have been applied, so
//!   [`Pumps::settle`] can wait until everything that had arrived is applied — the agent
//!   sends a command's events before its exit, so a finished `exec` never leaves the host
//!   with stale pages of files the command wrote.
//! - Events naming nodes the kernel does not hold are dropped: nothing is cached for them.
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bandsox_agent::client::{AgentClient, FsEvents};
use bandsox_agent::proto::fs::FsEvent;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::inodes::{Incarnation, Inodes};

/// Where invalidations go (the FUSE notifier in the daemon; a recorder in tests).
/// Calls may block until the kernel has applied them.
pub trait Invalidate: Send + Sync {
    /// Forget the cached entry `name` in directory `parent`.
    fn entry(&self, parent: u64, name: &[u8]);
    /// Forget the attributes of `ino`, and its cached pages when `data`.
    fn inode(&self, ino: u64, data: bool);
}

struct PumpState {
    generation: u64,
    /// Batches of the current connection applied so far.
    applied: watch::Sender<u64>,
}

pub struct Pumps {
    inodes: Arc<Mutex<Inodes>>,
    inval: OnceLock<Arc<dyn Invalidate>>,
    by_vm: Mutex<HashMap<Arc<str>, Arc<PumpState>>>,
}

/// What one event means for the kernel's caches.
enum Action {
    Entry(u64, Vec<u8>),
    Inode(u64, bool),
}

impl Pumps {
    pub fn new(inodes: Arc<Mutex<Inodes>>) -> Self {
        Pumps {
            inodes,
            inval: OnceLock::new(),
            by_vm: Mutex::new(HashMap::new()),
        }
    }

    pub fn set_invalidator(&self, inv: Arc<dyn Invalidate>) {
        let _ = self.inval.set(inv);
    }

    /// Start the pump for `client` unless one runs already.
    pub fn ensure(&self, inc: &Incarnation, client: &AgentClient, rt: &tokio::runtime::Handle) {
        let Some(events) = client.take_fs_events() else {
            return;
        };
        let (applied, _) = watch::channel(0);
        let state = Arc::new(PumpState {
            generation: inc.generation,
            applied,
        });
        self.by_vm.lock().insert(inc.vm_id.clone(), state.clone());
        self.inodes.lock().drop_stale(&inc.vm_id, inc.generation);
        let inodes = self.inodes.clone();
        let inval = self.inval.get().cloned();
        let inc = inc.clone();
        rt.spawn(pump(events, inc, inodes, inval, state));
    }

    /// Wait until the batches `vm_id`'s connection had received when `received` was read
    /// are applied (at most `timeout`).
    pub async fn settle(&self, vm_id: &str, generation: u64, received: u64, timeout: Duration) {
        let state = self.by_vm.lock().get(vm_id).cloned();
        let Some(state) = state else { return };
        if state.generation != generation {
            return;
        }
        let mut rx = state.applied.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|a| *a >= received)).await;
    }
}

async fn pump(
    mut events: FsEvents,
    inc: Incarnation,
    inodes: Arc<Mutex<Inodes>>,
    inval: Option<Arc<dyn Invalidate>>,
    state: Arc<PumpState>,
) {
    let mut applied = 0u64;
    while let Some(batch) = events.next().await {
        let actions = translate(&batch, &inc, &inodes.lock());
        if let (Some(inval), false) = (&inval, actions.is_empty()) {
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
        // Everything received is applied once the queue is empty (dropped batches were
        // replaced by an overflow, which invalidates everything).
        applied = if events.is_empty() {
            events.received().max(applied + 1)
        } else {
            applied + 1
        };
        state.applied.send_replace(applied);
    }
    tracing::debug!(vm = %inc.vm_id, "file event pump ended");
}

fn translate(batch: &[FsEvent], inc: &Incarnation, inodes: &Inodes) -> Vec<Action> {
    let mut out = Vec::new();
    for ev in batch {
        match ev {
            FsEvent::Entry { parent, name } => {
                if let Some(p) = inodes.ino_of(inc, *parent) {
                    out.push(Action::Entry(p, name.clone()));
                }
            }
            FsEvent::Node { node, data } => {
                if let Some(ino) = inodes.ino_of(inc, *node) {
                    out.push(Action::Inode(ino, *data));
                }
            }
            FsEvent::Overflow => {
                tracing::warn!(vm = %inc.vm_id, "guest file events were lost; dropping cached pages");
                for ino in inodes.inos_of(inc) {
                    out.push(Action::Inode(ino, true));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_for_unknown_nodes_are_dropped() {
        let inc = Incarnation {
            vm_id: Arc::from("v"),
            generation: 1,
        };
        let mut t = Inodes::new();
        t.set_root(&inc, 1, 99);
        let f = t.intern(&inc, 5, true);
        let batch = vec![
            FsEvent::Entry {
                parent: 1,
                name: b"x".to_vec(),
            },
            FsEvent::Entry {
                parent: 77,
                name: b"y".to_vec(),
            },
            FsEvent::Node {
                node: 5,
                data: true,
            },
            FsEvent::Node {
                node: 6,
                data: true,
            },
        ];
        let acts = translate(&batch, &inc, &t);
        assert_eq!(acts.len(), 2);
        assert!(matches!(&acts[0], Action::Entry(99, n) if n == b"x"));
        assert!(matches!(acts[1], Action::Inode(i, true) if i == f));
        let acts = translate(&[FsEvent::Overflow], &inc, &t);
        assert_eq!(acts.len(), 1);
    }
}
