//! Host inode numbers for the files of a stopped VM's disk, and what the kernel holds.
//!
//! The reader names files by path (it gives no inode numbers), so a number is derived
//! from the path: `compose(slot, DISK_VIEW_DEV, hash(path))`, in the VM's slot and the
//! device index reserved for disk views (see `crate::guestfs::inodes`), so it never
//! names a live guest file or another VM's.
//!
//! Invariants:
//! - A path gets the same number every time while the daemon runs (also after the kernel
//!   forgets it), unless another path with the same 40-bit hash is held by the kernel at
//!   that moment: it then takes the next free number (open addressing, at most
//!   [`PROBES`] tries). Hard links show as distinct files.
//! - `nlookup` mirrors the kernel's lookup count; at zero the entry is dropped, so the
//!   table holds only what the kernel holds (bounded by the kernel's inode cache).
//! - Number 0 of the hash space is never used (0 is no inode for the kernel).
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::guestfs::inodes::{compose, DISK_VIEW_DEV};

/// Numbers tried for one path before giving up.
const PROBES: u64 = 64;
/// Bits of a number left for the path hash.
const HASH_BITS: u32 = 40;

#[derive(Debug)]
struct Held {
    path: Arc<[u8]>,
    nlookup: u64,
}

/// The numbers of one VM's disk view.
#[derive(Debug)]
pub struct Nodes {
    slot: u16,
    held: HashMap<u64, Held>,
}

fn hash(path: &[u8]) -> u64 {
    // SipHash with fixed keys: the same value for a path every time.
    let mut h = std::hash::DefaultHasher::new();
    path.hash(&mut h);
    h.finish()
}

impl Nodes {
    pub fn new(slot: u16) -> Nodes {
        Nodes {
            slot,
            held: HashMap::new(),
        }
    }

    /// The number `path` has or would get now (`None`: every probe taken).
    pub fn number(&self, path: &[u8]) -> Option<u64> {
        let space = (1u64 << HASH_BITS) - 1;
        let start = hash(path) % space;
        (0..PROBES)
            .map(|i| compose(self.slot, DISK_VIEW_DEV, (start + i) % space + 1))
            .find(|n| self.held.get(n).is_none_or(|h| &*h.path == path))
    }

    /// Hand `path` to the kernel: its number, with one more lookup counted.
    pub fn intern(&mut self, path: &[u8]) -> Option<u64> {
        let n = self.number(path)?;
        self.held
            .entry(n)
            .or_insert_with(|| Held {
                path: Arc::from(path),
                nlookup: 0,
            })
            .nlookup += 1;
        Some(n)
    }

    /// The path behind a number the kernel holds.
    pub fn path(&self, ino: u64) -> Option<Arc<[u8]>> {
        self.held.get(&ino).map(|h| h.path.clone())
    }

    /// The kernel dropped `n` lookups of `ino`.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if let Some(h) = self.held.get_mut(&ino) {
            h.nlookup = h.nlookup.saturating_sub(n);
            if h.nlookup == 0 {
                self.held.remove(&ino);
            }
        }
    }

    /// Numbers the kernel holds.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

/// `parent/name` as an absolute path of the image.
pub fn child(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
    p.extend_from_slice(parent);
    if !parent.ends_with(b"/") {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guestfs::inodes::{dev_index_of, slot_of};

    #[test]
    fn numbers_are_stable_and_in_the_views_space() {
        let mut t = Nodes::new(7);
        let a = t.intern(b"/etc/passwd").unwrap();
        assert_eq!(slot_of(a), 7);
        assert_eq!(dev_index_of(a), DISK_VIEW_DEV);
        assert_eq!(t.intern(b"/etc/passwd"), Some(a));
        assert_eq!(t.path(a).as_deref(), Some(&b"/etc/passwd"[..]));
        t.forget(a, 2);
        assert_eq!(t.held(), 0);
        assert_eq!(t.number(b"/etc/passwd"), Some(a));
        assert_ne!(t.number(b"/etc/group"), Some(a));
    }

    #[test]
    fn a_held_collision_probes_on() {
        let mut t = Nodes::new(1);
        let a = t.intern(b"/a").unwrap();
        // Pretend another path holds /b's number.
        let b = t.number(b"/b").unwrap();
        t.held.insert(
            b,
            Held {
                path: Arc::from(&b"/x"[..]),
                nlookup: 1,
            },
        );
        let b2 = t.intern(b"/b").unwrap();
        assert_ne!(b2, b);
        assert_ne!(b2, a);
        assert_eq!(t.path(b2).as_deref(), Some(&b"/b"[..]));
    }

    #[test]
    fn children_join() {
        assert_eq!(child(b"/", b"etc"), b"/etc");
        assert_eq!(child(b"/etc", b"passwd"), b"/etc/passwd");
    }
}
