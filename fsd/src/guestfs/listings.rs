//! Complete listings of directories the host made, so that a name which cannot exist is
//! answered "no such file" without asking the guest.
//!
//! Copying a tree into `fs/` (`cp -r`, `rsync`, `tar x`) looks up every name before
//! creating it, and `rsync` also its temporary name: each a round trip that can only say
//! ENOENT. A directory the host just created is known to be empty, and stays known while
//! its changes are seen: the host's own creates, renames and removals, and the guest's
//! change events.
//!
//! Invariants:
//! - A listing exists only for a directory the host created through `fs/` and that the
//!   agent watches, for the VM incarnation that created it. It is dropped when it could
//!   stop being true: events lost (overflow), the directory no longer watched, the kernel
//!   forgetting it, or more than [`MAX_NAMES`] names.
//! - A name absent from a listing is answered ENOENT; the answer is as fresh as the
//!   change events (milliseconds behind the guest), exactly like the negative entries
//!   the kernel itself caches for watched directories.
use std::collections::{HashMap, HashSet};

use parking_lot::Mutex;

use super::inodes::Incarnation;

/// Most names a listing holds; a larger directory is simply not listed.
pub const MAX_NAMES: usize = 8192;
/// Most directories listed at once (the oldest are not evicted: new ones are not listed).
pub const MAX_LISTINGS: usize = 4096;

struct Listing {
    inc: Incarnation,
    names: HashSet<Vec<u8>>,
}

#[derive(Default)]
pub struct Listings {
    map: Mutex<HashMap<u64, Listing>>,
}

impl Listings {
    /// The host created directory `ino` (empty) in incarnation `inc`.
    pub fn made_dir(&self, ino: u64, inc: &Incarnation) {
        let mut m = self.map.lock();
        if m.len() < MAX_LISTINGS {
            m.insert(
                ino,
                Listing {
                    inc: inc.clone(),
                    names: HashSet::new(),
                },
            );
        }
    }

    /// `name` in directory `parent` now names something (`true`) or nothing.
    pub fn changed(&self, parent: u64, name: &[u8], exists: bool) {
        let mut m = self.map.lock();
        let Some(l) = m.get_mut(&parent) else { return };
        if exists {
            l.names.insert(name.to_vec());
            if l.names.len() > MAX_NAMES {
                m.remove(&parent);
            }
        } else {
            l.names.remove(name);
        }
    }

    /// Is `name` known not to exist in directory `parent` of incarnation `inc`?
    pub fn absent(&self, parent: u64, inc: &Incarnation, name: &[u8]) -> bool {
        self.map
            .lock()
            .get(&parent)
            .is_some_and(|l| l.inc == *inc && !l.names.contains(name))
    }

    /// Directory `ino`'s listing may no longer be true.
    pub fn forget(&self, ino: u64) {
        self.map.lock().remove(&ino);
    }

    /// Events of `inc` were lost: no listing of it can be trusted.
    pub fn forget_incarnation(&self, inc: &Incarnation) {
        self.map.lock().retain(|_, l| l.inc != *inc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn inc(g: u64) -> Incarnation {
        Incarnation {
            vm_id: Arc::from("v"),
            generation: g,
        }
    }

    #[test]
    fn a_made_directory_knows_its_names() {
        let l = Listings::default();
        assert!(
            !l.absent(7, &inc(1), b"x"),
            "unknown directories know nothing"
        );
        l.made_dir(7, &inc(1));
        assert!(l.absent(7, &inc(1), b"x"));
        assert!(
            !l.absent(7, &inc(2), b"x"),
            "another boot's listing is not used"
        );
        l.changed(7, b"x", true);
        assert!(!l.absent(7, &inc(1), b"x"));
        assert!(l.absent(7, &inc(1), b"y"));
        l.changed(7, b"x", false);
        assert!(l.absent(7, &inc(1), b"x"));
        l.forget_incarnation(&inc(1));
        assert!(!l.absent(7, &inc(1), b"x"));
    }

    #[test]
    fn big_directories_are_not_listed() {
        let l = Listings::default();
        l.made_dir(1, &inc(1));
        for i in 0..=MAX_NAMES {
            l.changed(1, format!("n{i}").as_bytes(), true);
        }
        assert!(!l.absent(1, &inc(1), b"other"));
    }
}
