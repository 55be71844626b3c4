//! Host inode numbers for `fs/`, derived from guest identities, and what the kernel holds.
//!
//! A host inode number is a pure function of *which VM* and *which guest inode*:
//!
//! ```text
//!  63  62 61          48 47      40 39                        0
//! | 0 | 1 |  VM slot    | device   |  guest inode number        |
//! ```
//!
//! Invariants:
//! - Bit 62 is set and bit 63 clear in every number, so they are disjoint from the
//!   control tree's (small counters) and never negative as a signed 64-bit value.
//! - The VM slot is unique among VMs (kept in `vm.json`), and a slot is not given to a
//!   new VM while the kernel still holds numbers of the VM that had it, so no number ever
//!   names files of two VMs.
//! - The device index is the VM's own table of guest devices ([`DeviceTable`], kept in
//!   the VM directory). A device with a real major number (the VM's disk) keeps its index
//!   across boots; an anonymous one (tmpfs, ...; major 0) is indexed per guest boot
//!   (agent instance), because the guest may give the same number to another filesystem
//!   next time. Index [`OVERFLOW_DEV`] is for inodes whose numbers do not fit in 40 bits
//!   or whose device found no free index: those get numbers from a counter, stable only
//!   while the daemon runs.
//! - So a file keeps its number across renames, hard links, the kernel forgetting it,
//!   pause/resume, agent reconnects and daemon restarts; a file on the VM's disk also
//!   across reboots. Hard links share it.
//! - `nlookup` mirrors the kernel's lookup count: every entry handed to the kernel adds
//!   one, `forget` subtracts; at zero the number is dropped. `counted` mirrors the
//!   agent's count of the node (see `bandsox_agent::proto::fs`); it never exceeds
//!   `nlookup`, and what `forget` takes from it is forwarded to the agent.
//! - The `fs/` directory of a VM is not in this table: it is a control-tree inode per
//!   boot generation, known here only as the alias of the agent's root.
//! - Handles map a host `fh` to `(VM id, generation, agent handle)`; an agent handle is
//!   only ever used with the VM incarnation that issued it.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bandsox_agent::proto::fs::{Attr, HandleId, NodeId, NodeRef, XattrNames, ROOT_ID};
use serde::{Deserialize, Serialize};

/// Bit 62: a guest file.
pub const FS_INO_BASE: u64 = 1 << 62;
/// VM slots: 14 bits.
pub const MAX_SLOTS: u16 = 1 << 14;
const SLOT_SHIFT: u32 = 48;
const DEV_SHIFT: u32 = 40;
/// Guest inode numbers below this map directly.
const INO_LIMIT: u64 = 1 << DEV_SHIFT;
/// Device index of numbers handed out by counter.
pub const OVERFLOW_DEV: u8 = 255;
/// The file of a VM's device table.
const DEVICES_FILE: &str = "fs-devices.json";

/// Which VM incarnation a number belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Incarnation {
    pub vm_id: Arc<str>,
    pub generation: u64,
}

/// One guest device as the table knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceKey {
    pub dev: u64,
    /// The agent instance (guest boot) for anonymous devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<u64>,
}

impl DeviceKey {
    pub fn new(dev: u64, boot: u64) -> DeviceKey {
        // Linux's encoding of the major number (glibc gnu_dev_major).
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        DeviceKey {
            dev,
            boot: (major == 0).then_some(boot),
        }
    }
}

/// A VM's device indices (index = position; `None` = free).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceTable {
    devices: Vec<Option<DeviceKey>>,
}

impl DeviceTable {
    /// The table kept in `dir` (empty when there is none or it cannot be read).
    pub fn load(dir: &Path) -> DeviceTable {
        std::fs::read(dir.join(DEVICES_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<DeviceTable>(&b).ok())
            .map(|mut t| {
                t.devices.truncate(usize::from(OVERFLOW_DEV));
                t
            })
            .unwrap_or_default()
    }

    fn save(&self, dir: &Path) {
        let tmp = dir.join(format!("{DEVICES_FILE}.tmp"));
        let res = serde_json::to_vec(self)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, dir.join(DEVICES_FILE)));
        if let Err(e) = res {
            tracing::warn!("cannot save {}: {e}", dir.join(DEVICES_FILE).display());
        }
    }

    pub fn find(&self, key: &DeviceKey) -> Option<u8> {
        self.devices
            .iter()
            .position(|d| d.as_ref() == Some(key))
            .and_then(|i| u8::try_from(i).ok())
    }

    /// The index of `key`, adding it (and saving the table in `dir`) when new. A full
    /// table reuses the index of a device of an earlier boot that `in_use` says no live
    /// number refers to; `None` when there is none.
    pub fn index(
        &mut self,
        key: &DeviceKey,
        dir: &Path,
        in_use: impl Fn(u8) -> bool,
    ) -> Option<u8> {
        if let Some(i) = self.find(key) {
            return Some(i);
        }
        let free = self.devices.iter().position(Option::is_none);
        let slot = match free {
            Some(i) => i,
            None if self.devices.len() < usize::from(OVERFLOW_DEV) => {
                self.devices.push(None);
                self.devices.len() - 1
            }
            None => self.devices.iter().position(|d| {
                d.as_ref()
                    .is_some_and(|d| d.boot.is_some() && d.boot != key.boot)
            })?,
        };
        // The table never grows past OVERFLOW_DEV entries (load truncates, push checks).
        let index = u8::try_from(slot).ok()?;
        if in_use(index) && self.devices[slot].is_some() {
            return None;
        }
        self.devices[slot] = Some(key.clone());
        self.save(dir);
        Some(index)
    }
}

/// The number of guest inode `ino` on device index `dev` of VM slot `slot`.
pub fn compose(slot: u16, dev: u8, ino: u64) -> u64 {
    FS_INO_BASE
        | (u64::from(slot & (MAX_SLOTS - 1)) << SLOT_SHIFT)
        | (u64::from(dev) << DEV_SHIFT)
        | (ino & (INO_LIMIT - 1))
}

/// The VM slot and device index of a host number.
#[allow(
    clippy::cast_possible_truncation,
    reason = "masked to MAX_SLOTS - 1 (< 2^16) first"
)]
pub fn slot_of(ino: u64) -> u16 {
    ((ino >> SLOT_SHIFT) & u64::from(MAX_SLOTS - 1)) as u16
}

#[allow(clippy::cast_possible_truncation, reason = "masked to 8 bits first")]
fn dev_index_of(ino: u64) -> u8 {
    ((ino >> DEV_SHIFT) & 0xff) as u8
}

/// What `fs/` knows of one VM: its slot, devices, agent instance and root alias.
#[derive(Debug)]
pub struct VmNumbers {
    pub slot: u16,
    pub dir: PathBuf,
    pub devices: DeviceTable,
    /// Numbers given by counter (see [`OVERFLOW_DEV`]).
    overflow: HashMap<NodeId, u64>,
    next_overflow: u64,
    /// The root alias: generation → control-tree inode of `fs/`.
    pub root: Option<(u64, u64)>,
}

impl VmNumbers {
    pub fn new(slot: u16, dir: PathBuf) -> VmNumbers {
        VmNumbers {
            slot,
            devices: DeviceTable::load(&dir),
            dir,
            overflow: HashMap::new(),
            next_overflow: 1,
            root: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct InodeInfo {
    pub inc: Incarnation,
    pub node: NodeRef,
    /// `S_IFMT` bits.
    pub kind: u32,
    /// Changes to this entry and its data are announced (its parent is watched).
    pub coherent: bool,
    /// A directory the agent watches: entries in it are coherent.
    pub watched: bool,
    /// Its xattr names, while known to be current (coherent entries only; an
    /// attribute change event or the host's own xattr change forgets them, a data
    /// change event does not: see `FsEvent::Node`).
    pub xattrs: Option<XattrNames>,
    /// The attributes the last answer about it gave (what the kernel was told).
    pub attr: Option<Attr>,
    nlookup: u64,
    counted: u64,
}

/// What a forget gives back to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub inc: Incarnation,
    pub node: NodeId,
    pub count: u64,
}

#[derive(Default)]
pub struct Inodes {
    by_ino: HashMap<u64, InodeInfo>,
    /// Live numbers per VM slot (a slot is reused only at zero).
    per_slot: HashMap<u16, usize>,
}

/// What a new entry says about its node.
#[derive(Debug, Clone)]
pub struct EntryFacts {
    pub attr: Attr,
    pub kind: u32,
    pub coherent: bool,
    pub counted: bool,
    pub watched: bool,
    pub xattrs: Option<XattrNames>,
}

impl Inodes {
    pub fn new() -> Self {
        Self::default()
    }

    /// The host number of `id` in VM `v` for the agent instance `boot`, assigning a
    /// device index when needed (`None`: the root alias is not known yet).
    pub fn number(&self, v: &mut VmNumbers, boot: u64, id: NodeId) -> Option<u64> {
        if id == ROOT_ID {
            return v.root.map(|(_, ino)| ino);
        }
        let key = DeviceKey::new(id.dev, boot);
        let slot = v.slot;
        let dev = if id.ino < INO_LIMIT {
            let dir = v.dir.clone();
            v.devices.index(&key, &dir, |i| {
                self.by_ino
                    .keys()
                    .any(|&ino| slot_of(ino) == slot && dev_index_of(ino) == i)
            })
        } else {
            None
        };
        Some(match dev {
            Some(d) => compose(slot, d, id.ino),
            None => {
                let n = match v.overflow.get(&id) {
                    Some(&n) => n,
                    None => {
                        let n = v.next_overflow;
                        v.next_overflow += 1;
                        v.overflow.insert(id, n);
                        n
                    }
                };
                compose(slot, OVERFLOW_DEV, n)
            }
        })
    }

    /// The host number of `id` only if one is known (no index is assigned).
    pub fn known_number(v: &VmNumbers, boot: u64, id: NodeId) -> Option<u64> {
        if id == ROOT_ID {
            return v.root.map(|(_, ino)| ino);
        }
        if id.ino < INO_LIMIT {
            if let Some(d) = v.devices.find(&DeviceKey::new(id.dev, boot)) {
                return Some(compose(v.slot, d, id.ino));
            }
        }
        v.overflow
            .get(&id)
            .map(|&n| compose(v.slot, OVERFLOW_DEV, n))
    }

    /// Record one more kernel reference to `ino` (node `node` of `inc`).
    pub fn intern(&mut self, ino: u64, inc: &Incarnation, node: &NodeRef, facts: &EntryFacts) {
        match self.by_ino.get_mut(&ino) {
            Some(info) if info.inc == *inc => {
                info.nlookup += 1;
                info.counted += u64::from(facts.counted);
                info.coherent = facts.coherent;
                info.watched = facts.watched;
                info.xattrs = facts.xattrs.clone().filter(|_| facts.coherent);
                info.attr = Some(facts.attr);
                if info.node.fh.0.is_empty() {
                    info.node.fh = node.fh.clone();
                }
            }
            _ => {
                // New, or left over from an earlier boot (which the kernel may still hold
                // under the same number): the entry now names this incarnation's node.
                if self.by_ino.contains_key(&ino) {
                    self.by_ino.remove(&ino);
                } else {
                    *self.per_slot.entry(slot_of(ino)).or_default() += 1;
                }
                self.by_ino.insert(
                    ino,
                    InodeInfo {
                        inc: inc.clone(),
                        node: node.clone(),
                        kind: facts.kind,
                        coherent: facts.coherent,
                        watched: facts.watched,
                        xattrs: facts.xattrs.clone().filter(|_| facts.coherent),
                        attr: Some(facts.attr),
                        nlookup: 1,
                        counted: u64::from(facts.counted),
                    },
                );
            }
        }
    }

    pub fn get(&self, ino: u64) -> Option<&InodeInfo> {
        self.by_ino.get(&ino)
    }

    /// Drop `n` kernel references. Returns what to forward to the agent.
    pub fn forget(&mut self, ino: u64, n: u64) -> Option<Release> {
        let info = self.by_ino.get_mut(&ino)?;
        info.nlookup = info.nlookup.saturating_sub(n);
        let give = info.counted.saturating_sub(info.nlookup);
        info.counted -= give;
        let out = Release {
            inc: info.inc.clone(),
            node: info.node.id,
            count: give,
        };
        if info.nlookup == 0 {
            self.by_ino.remove(&ino);
            let slot = slot_of(ino);
            if let Some(c) = self.per_slot.get_mut(&slot) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    self.per_slot.remove(&slot);
                }
            }
        }
        Some(out)
    }

    /// An answer told the kernel these attributes of `ino`.
    pub fn told(&mut self, ino: u64, attr: Attr) {
        if let Some(info) = self.by_ino.get_mut(&ino) {
            info.attr = Some(attr);
        }
    }

    /// The attributes of `ino` changed in a way no answer told the kernel.
    pub fn changed(&mut self, ino: u64) {
        if let Some(info) = self.by_ino.get_mut(&ino) {
            info.attr = None;
            info.xattrs = None;
        }
    }

    /// The contents of `ino` changed (and so its size and times, not its xattr names).
    pub fn data_changed(&mut self, ino: u64) {
        if let Some(info) = self.by_ino.get_mut(&ino) {
            info.attr = None;
        }
    }

    /// A name of `ino` appeared or moved in the guest: its link count or ctime changed
    /// (not its xattrs).
    pub fn relinked(&mut self, ino: u64) {
        if let Some(info) = self.by_ino.get_mut(&ino) {
            info.attr = None;
        }
    }

    /// The xattr names of `ino` may have changed.
    pub fn forget_xattrs(&mut self, ino: u64) {
        if let Some(info) = self.by_ino.get_mut(&ino) {
            info.xattrs = None;
        }
    }

    /// The agent stopped watching directory `ino` (it no longer counts it either).
    pub fn unwatched(&mut self, ino: u64) {
        if let Some(info) = self.by_ino.get_mut(&ino) {
            info.watched = false;
            info.counted = 0;
        }
    }

    /// All host numbers of one incarnation (for overflow invalidation).
    pub fn inos_of(&self, inc: &Incarnation) -> Vec<u64> {
        self.by_ino
            .iter()
            .filter(|(_, i)| &i.inc == inc)
            .map(|(ino, _)| *ino)
            .collect()
    }

    /// Does the kernel hold numbers of VM slot `slot`?
    pub fn slot_in_use(&self, slot: u16) -> bool {
        self.per_slot.contains_key(&slot)
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
    use bandsox_agent::proto::fs::FileHandle;

    fn inc(g: u64) -> Incarnation {
        Incarnation {
            vm_id: Arc::from("vm1"),
            generation: g,
        }
    }

    fn node(dev: u64, ino: u64) -> NodeRef {
        NodeRef {
            id: NodeId { dev, ino },
            fh: FileHandle(vec![1, 0, 0, 0, 9]),
        }
    }

    fn facts(counted: bool) -> EntryFacts {
        EntryFacts {
            attr: Attr::default(),
            kind: libc::S_IFREG,
            coherent: true,
            counted,
            watched: false,
            xattrs: None,
        }
    }

    /// `makedev` as glibc encodes it.
    fn makedev(major: u64, minor: u64) -> u64 {
        ((major & 0xfff) << 8) | ((major & !0xfff) << 32) | (minor & 0xff) | ((minor & !0xff) << 12)
    }

    #[test]
    fn numbers_are_a_function_of_vm_device_and_inode() {
        let dir = tempfile::tempdir().unwrap();
        let t = Inodes::new();
        let mut v = VmNumbers::new(3, dir.path().to_path_buf());
        let disk = makedev(254, 0);
        let a = t.number(&mut v, 1, NodeId { dev: disk, ino: 12 }).unwrap();
        assert_eq!(a, compose(3, 0, 12));
        assert!(a & FS_INO_BASE != 0 && i64::try_from(a).is_ok_and(|a| a > 0));
        assert_eq!(slot_of(a), 3);
        // Same again, and the disk keeps its index on another boot and after a reload.
        assert_eq!(t.number(&mut v, 1, NodeId { dev: disk, ino: 12 }), Some(a));
        let mut v2 = VmNumbers::new(3, dir.path().to_path_buf());
        assert_eq!(t.number(&mut v2, 2, NodeId { dev: disk, ino: 12 }), Some(a));
        // An anonymous device is indexed per boot: another boot gets another index.
        let tmpfs = makedev(0, 25);
        let b1 = t.number(&mut v2, 1, NodeId { dev: tmpfs, ino: 5 }).unwrap();
        let b2 = t.number(&mut v2, 2, NodeId { dev: tmpfs, ino: 5 }).unwrap();
        assert_ne!(b1, b2);
        // Other VMs (slots) never collide.
        let mut w = VmNumbers::new(4, tempfile::tempdir().unwrap().path().to_path_buf());
        assert_ne!(t.number(&mut w, 1, NodeId { dev: disk, ino: 12 }), Some(a));
        // Inode numbers beyond 40 bits get counter numbers, stable while kept.
        let big = NodeId {
            dev: disk,
            ino: 1 << 45,
        };
        let c = t.number(&mut v2, 2, big).unwrap();
        assert_eq!(dev_index_of(c), OVERFLOW_DEV);
        assert_eq!(t.number(&mut v2, 2, big), Some(c));
        assert_eq!(Inodes::known_number(&v2, 2, big), Some(c));
    }

    #[test]
    fn lookup_counts_mirror_the_kernel_and_the_agent() {
        let mut t = Inodes::new();
        let n = node(1, 7);
        t.intern(100 | FS_INO_BASE, &inc(1), &n, &facts(true));
        t.intern(100 | FS_INO_BASE, &inc(1), &n, &facts(false));
        t.intern(100 | FS_INO_BASE, &inc(1), &n, &facts(true));
        // nlookup 3, counted 2: forgetting 1 leaves counted ≤ nlookup (nothing to give).
        let r = t.forget(100 | FS_INO_BASE, 1).unwrap();
        assert_eq!(r.count, 0);
        let r = t.forget(100 | FS_INO_BASE, 1).unwrap();
        assert_eq!(r.count, 1);
        assert!(t.slot_in_use(0));
        let r = t.forget(100 | FS_INO_BASE, 5).unwrap();
        assert_eq!(r.count, 1);
        assert!(t.get(100 | FS_INO_BASE).is_none());
        assert!(!t.slot_in_use(0));
        assert_eq!(t.forget(100 | FS_INO_BASE, 1), None);
    }

    #[test]
    fn a_new_boot_takes_over_a_number() {
        let mut t = Inodes::new();
        let ino = compose(1, 0, 5);
        t.intern(ino, &inc(1), &node(1, 5), &facts(false));
        t.intern(ino, &inc(2), &node(1, 5), &facts(false));
        assert_eq!(t.get(ino).unwrap().inc, inc(2));
        assert_eq!(t.len(), 1);
        assert!(t.forget(ino, 1).is_some());
        assert!(t.is_empty());
    }

    #[test]
    fn a_full_device_table_reuses_only_free_earlier_boot_indices() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = DeviceTable::default();
        for i in 0..255u64 {
            d.index(&DeviceKey::new(makedev(0, i), 1), dir.path(), |_| false);
        }
        // Full; boot 1's devices are reusable for boot 2 only when unused.
        assert_eq!(
            d.index(&DeviceKey::new(makedev(0, 999), 2), dir.path(), |_| true),
            None
        );
        assert!(d
            .index(&DeviceKey::new(makedev(0, 999), 2), dir.path(), |_| false)
            .is_some());
    }
}
