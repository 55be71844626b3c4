//! Snapshots on disk: the one format every layer shares (format.rs: `info.json`, the
//! VMM's state and memory files, `disk.ext4`, written under `.tmp-*` and published by
//! rename). This module names no VMM and no manager, so both use it without a cycle.
//!
//! The rest of snapshots lives with what it acts on:
//!
//! ```text
//! manager/snapshots.rs         the manager's operations: `snapshot NAME`, `clone SNAP
//!                              NAME [count=N]`, listing, `info` and `rmdir` of snapshots
//! manager/vm/snapshot.rs       a VM's side: freeze → pause → save → copy disk → resume →
//!                              thaw, and booting a new VM from a snapshot
//! vmm/qemu_snapshot.rs         QEMU save/restore (migration to and from a file)
//! vmm/firecracker/snapshot.rs  Firecracker save/restore (`/snapshot/create`, `/load`)
//! snapshots/clone_opts.rs      `clone … net= kernel=`: what clones may change of a snapshot
//! ```
//! The manager reaches a backend's save/restore only through `Backend::restore` and
//! `VmmInstance::save_snapshot` (`crate::vmm`). Each file states its own invariants.
pub mod clone_opts;
mod format;

pub use format::*;
