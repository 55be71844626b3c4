//! BandSox-FS daemon library: FUSE adapter, filesystem core, VM manager, VMM backends.
//!
//! Layers, top to bottom: `fuse` (thin kernel adapter: converts and replies, no policy)
//! → `vfs` (the control tree's fuser-free core: `tree` namespace, `files` open files,
//! `policy` access rules) and `guestfs` (a VM's `fs/`) → `manager` (VMs, runs,
//! lifecycle, snapshot and clone operations) → below it, modules that never import the
//! manager: `settings` (every `BANDSOX_*` variable, read once), the parsers (`config`,
//! `ctl`, `execopts`), `limits`, `snapshots` (the on-disk format), `vmm` (backends, with
//! their own save/restore), `bootfiles` (kernel, initramfs, base image), `images` and
//! the agent client from `bandsox_agent::client`. `mount-helpers/check-layers` checks
//! these layers.
//! `error` is the one error type, with explicit errnos. See docs/architecture.md.
pub mod backends;
pub mod bootfiles;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod disk;
pub mod diskfs;
pub mod doctor;
pub mod error;
pub mod events;
pub mod eventview;
pub mod execopts;
pub mod fuse;
pub mod guestfs;
pub mod http;
pub mod images;
pub mod interrupt;
pub mod layout;
pub mod limits;
pub mod lines;
pub mod logcap;
pub mod manager;
pub mod mcp;
pub mod memtrim;
pub mod names;
pub mod net;
pub mod pool;
pub mod sessions;
pub mod settings;
pub mod snapshots;
pub mod testhook;
pub mod tools;
pub mod vfs;
pub mod vmm;
pub mod watchdog;
