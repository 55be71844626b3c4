//! The manager's side of the limits (`crate::limits`): what each user uses now, and the
//! admission of `create`, `clone` and `snapshot` before they do any work.
//!
//! Invariant: every admission counts the VMs in `vms` and the snapshots on disk, plus the
//! reservations of requests admitted but not finished; the caller keeps its
//! [`Reservation`] until what it creates is in `vms` (or on disk).
use crate::error::Result;
use crate::limits::{Amounts, Reservation, Usage};
use crate::snapshots;

use super::Manager;

/// A snapshot's size as counted against `snapshot_mib` (MiB, rounded up).
fn snapshot_mib(info: &snapshots::SnapshotInfo) -> u64 {
    info.sizes.total_allocated_bytes.div_ceil(1024 * 1024)
}

impl Manager {
    /// What every user uses now: VMs (whatever their state) and snapshots.
    pub fn usage(&self) -> Usage {
        let mut u = Usage::default();
        for vm in self.list() {
            let rec = vm.record();
            u.add(
                vm.uid,
                &Amounts::vm(rec.config.vcpus, rec.config.memory_mib, rec.disk_mib),
            );
        }
        let root = self.layout.snapshots();
        for name in snapshots::list(&root) {
            if let Ok(info) = snapshots::load(&root, &name) {
                u.add(info.owner_uid, &Amounts::snapshot(snapshot_mib(&info)));
            }
        }
        u
    }

    /// The `usage` file as `uid` sees it.
    pub fn usage_text(&self, uid: u32) -> String {
        self.limits.render_usage(uid, &self.usage())
    }

    /// Admit `count` VMs of this size for `uid`, or refuse (EDQUOT/EAGAIN/ENOSPC).
    pub(crate) fn admit_vms(
        &self,
        uid: u32,
        count: u64,
        vcpus: u32,
        memory_mib: u32,
        disk_mib: u64,
    ) -> Result<Reservation> {
        self.limits.admit(
            uid,
            Amounts::vm(vcpus, memory_mib, disk_mib).times(count),
            || self.usage(),
        )
    }

    /// Admit one snapshot of a VM with `memory_mib` of memory and a disk occupying
    /// `disk_bytes` on the host: its size is estimated as both together (the memory
    /// state is at most the guest's memory; the disk copy at most its allocated bytes).
    pub(crate) fn admit_snapshot(
        &self,
        uid: u32,
        memory_mib: u32,
        disk_bytes: u64,
    ) -> Result<Reservation> {
        let mib = u64::from(memory_mib) + disk_bytes.div_ceil(1024 * 1024);
        self.limits
            .admit(uid, Amounts::snapshot(mib), || self.usage())
    }
}
