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
use std::sync::{Arc, OnceLock};

use bandsox_agent::client::{AgentClient, FsEvents};
use bandsox_agent::proto::fs::FsEvent;
use parking_lot::Mutex;

use super::inodes::{Incarnation, Inodes};

/// Where invalidations go (the FUSE notifier in the daemon; a recorder in tests).
/// Calls may block until the kernel has applied them.
pub trait Invalidate: Send + Sync {
    /// Forget the cached entry `name` in directory `parent`.
    fn entry(&self, parent: u64, name: &[u8]);
    /// Forget the attributes of `ino`, and its cached pages when `data`.
    fn inode(&self, ino: u64, data: bool);
}

pub struct Pumps {
    inodes: Arc<Mutex<Inodes>>,
    inval: OnceLock<Arc<dyn Invalidate>>,
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
        self.inodes.lock().drop_stale(&inc.vm_id, inc.generation);
        let inodes = self.inodes.clone();
        let inval = self.inval.get().cloned();
        let inc = inc.clone();
        rt.spawn(pump(events, inc, inodes, inval));
    }
}

async fn pump(
    mut events: FsEvents,
    inc: Incarnation,
    inodes: Arc<Mutex<Inodes>>,
    inval: Option<Arc<dyn Invalidate>>,
) {
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
