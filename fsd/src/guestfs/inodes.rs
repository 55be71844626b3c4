//! Host inode and handle numbers for `fs/` and what they stand for in the guest.
//!
//! Invariants:
//! - A host inode number names one `(VM id, boot generation, agent node)` triple; numbers
//!   start at [`FS_INO_BASE`] (disjoint from the control tree's) and are never reused,
//!   so a number the kernel still holds can never come to mean another file.
//! - `nlookup` mirrors the kernel's lookup count: every entry handed to the kernel adds
//!   one, `forget` subtracts; at zero the number is dropped. The agent keeps one
//!   reference per entry it answered, so the counts forwarded to it match.
//! - The `fs/` directory of a VM is not in this table: it is a control-tree inode per
//!   boot generation, registered here as a pinned alias of the agent's root node so
//!   events about the root can be translated.
//! - Handles likewise map a host `fh` to `(VM id, generation, agent handle)`; an agent
//!   handle is only ever used with the VM incarnation that issued it.
use std::collections::HashMap;
use std::sync::Arc;

use bandsox_agent::proto::fs::{HandleId, NodeId};

/// First host inode number used for guest files.
pub const FS_INO_BASE: u64 = 1 << 40;

/// Which VM incarnation a number belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Incarnation {
    pub vm_id: Arc<str>,
    pub generation: u64,
}

#[derive(Debug, Clone)]
pub struct InodeInfo {
    pub inc: Incarnation,
    pub node: NodeId,
    /// The entry's parent directory is watched by the agent (see `proto::fs::Entry`).
    pub coherent: bool,
    nlookup: u64,
}

#[derive(Default)]
pub struct Inodes {
    by_ino: HashMap<u64, InodeInfo>,
    by_node: HashMap<(Incarnation, NodeId), u64>,
    next: u64,
}

impl Inodes {
    pub fn new() -> Self {
        Inodes {
            next: FS_INO_BASE,
            ..Default::default()
        }
    }

    /// Record one more kernel reference to `node` and return its host number.
    pub fn intern(&mut self, inc: &Incarnation, node: NodeId, coherent: bool) -> u64 {
        if let Some(&ino) = self.by_node.get(&(inc.clone(), node)) {
            if let Some(info) = self.by_ino.get_mut(&ino) {
                info.nlookup += 1;
                info.coherent = coherent;
                return ino;
            }
        }
        let ino = self.next;
        self.next += 1;
        self.by_ino.insert(
            ino,
            InodeInfo {
                inc: inc.clone(),
                node,
                coherent,
                nlookup: 1,
            },
        );
        self.by_node.insert((inc.clone(), node), ino);
        ino
    }

    /// Register the pinned root alias (the VM's `fs/` directory inode).
    pub fn set_root(&mut self, inc: &Incarnation, root_node: NodeId, ino: u64) {
        self.by_node.insert((inc.clone(), root_node), ino);
    }

    pub fn get(&self, ino: u64) -> Option<&InodeInfo> {
        self.by_ino.get(&ino)
    }

    /// The host number of an agent node, if the kernel holds one.
    pub fn ino_of(&self, inc: &Incarnation, node: NodeId) -> Option<u64> {
        self.by_node.get(&(inc.clone(), node)).copied()
    }

    /// Drop `n` kernel references. Returns what to forward to the agent.
    pub fn forget(&mut self, ino: u64, n: u64) -> Option<(Incarnation, NodeId, u64)> {
        let info = self.by_ino.get_mut(&ino)?;
        let n = n.min(info.nlookup);
        info.nlookup -= n;
        let out = (info.inc.clone(), info.node, n);
        if info.nlookup == 0 {
            let key = (info.inc.clone(), info.node);
            self.by_ino.remove(&ino);
            self.by_node.remove(&key);
        }
        Some(out)
    }

    /// All host numbers of one incarnation (for overflow invalidation).
    pub fn inos_of(&self, inc: &Incarnation) -> Vec<u64> {
        self.by_ino
            .iter()
            .filter(|(_, i)| &i.inc == inc)
            .map(|(ino, _)| *ino)
            .collect()
    }

    /// Drop every number of VM incarnations other than `keep` for `vm_id` (after a
    /// reboot the agent's nodes are gone; the kernel's later forgets find nothing).
    pub fn drop_stale(&mut self, vm_id: &str, keep: u64) {
        self.by_ino
            .retain(|_, i| &*i.inc.vm_id != vm_id || i.inc.generation == keep);
        self.by_node
            .retain(|(inc, _), _| &*inc.vm_id != vm_id || inc.generation == keep);
    }

    pub fn len(&self) -> usize {
        self.by_ino.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ino.is_empty()
    }
}

/// One open guest file or directory.
#[derive(Debug, Clone)]
pub struct OpenHandle {
    pub inc: Incarnation,
    pub handle: HandleId,
    pub node: NodeId,
}

#[derive(Default)]
pub struct Handles {
    map: HashMap<u64, OpenHandle>,
    next: u64,
}

impl Handles {
    pub fn insert(&mut self, h: OpenHandle) -> u64 {
        self.next += 1;
        self.map.insert(self.next, h);
        self.next
    }
    pub fn get(&self, fh: u64) -> Option<&OpenHandle> {
        self.map.get(&fh)
    }
    pub fn remove(&mut self, fh: u64) -> Option<OpenHandle> {
        self.map.remove(&fh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inc(g: u64) -> Incarnation {
        Incarnation {
            vm_id: Arc::from("vm1"),
            generation: g,
        }
    }

    #[test]
    fn lookup_counts_mirror_the_kernel() {
        let mut t = Inodes::new();
        let a = t.intern(&inc(1), 7, true);
        assert!(a >= FS_INO_BASE);
        assert_eq!(t.intern(&inc(1), 7, true), a);
        assert_eq!(t.forget(a, 1), Some((inc(1), 7, 1)));
        assert!(t.get(a).is_some());
        assert_eq!(t.forget(a, 5), Some((inc(1), 7, 1)), "clamped to the count");
        assert!(t.get(a).is_none());
        assert_eq!(t.forget(a, 1), None);
        let b = t.intern(&inc(1), 7, false);
        assert_ne!(a, b, "numbers are never reused");
    }

    #[test]
    fn generations_are_separate() {
        let mut t = Inodes::new();
        let a = t.intern(&inc(1), 7, true);
        let b = t.intern(&inc(2), 7, true);
        assert_ne!(a, b);
        t.drop_stale("vm1", 2);
        assert!(t.get(a).is_none());
        assert!(t.get(b).is_some());
        assert_eq!(t.ino_of(&inc(2), 7), Some(b));
    }

    #[test]
    fn root_alias_translates_but_is_not_counted() {
        let mut t = Inodes::new();
        t.set_root(&inc(1), 1, 42);
        assert_eq!(t.ino_of(&inc(1), 1), Some(42));
        assert!(t.is_empty());
    }
}
