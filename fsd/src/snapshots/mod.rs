//! Snapshots, all in one place:
//!
//! ```text
//! format.rs       the on-disk snapshot directory (info.json, state, memory, disk.ext4),
//!                 written under `.tmp-*` and published by rename
//! manager.rs      the manager's operations: `snapshot NAME`, `clone SNAP NAME [count=N]`,
//!                 listing, `info` and `rmdir` of snapshots
//! vm.rs           a VM's side: freeze → pause → save → copy disk → resume → thaw, and
//!                 booting a new VM from a snapshot
//! qemu.rs         QEMU save/restore (migration to and from a file)
//! firecracker.rs  Firecracker save/restore (`/snapshot/create`, `/snapshot/load`)
//! clone_opts.rs   `clone … net= kernel=`: what clones may change of a snapshot
//! ```
//! The backends reach their save/restore through the `Backend`/`VmmInstance` traits
//! (`crate::vmm`); the rest of the daemon uses the manager's operations and the format.
//! Each file states its own invariants.
mod clone_opts;
pub mod firecracker;
mod format;
mod manager;
pub mod qemu;
mod vm;

pub use format::*;
pub use manager::clone_names;
pub use vm::{Taken, FREEZE_TIMEOUT};
