//! The options of `clone SNAP NAME … net=MODE kernel=NAME`: what the clones change of
//! the snapshot's configuration.
//!
//! Invariants: a restored guest keeps the devices its memory holds, so `net=` may move
//! a clone between the two networked modes (`user` and `tap`: the same virtio-net
//! device, re-addressed at restore) but never add or remove the network device
//! (EINVAL); `kernel=` must name the kernel the snapshot was taken with (checked by
//! file identity before anything is created: `format::boot_mismatch`).
use super::format::SnapshotInfo;
use crate::error::{Error, Result};
use crate::vmm::{BackendKind, NetMode};

/// Apply the clone's `options` (validated by `ctl::parse_global`) to `info.config`.
pub fn apply(info: &mut SnapshotInfo, options: &[String]) -> Result<()> {
    let from = info.config.net;
    let config = info
        .config
        .with_options(options.iter().map(String::as_str))
        .map_err(|e| e.with_context("clone"))?;
    let to = config.net;
    if (from == NetMode::None) != (to == NetMode::None) {
        return Err(Error::invalid(format!(
            "clone net={}: snapshot {:?} was taken with net={}; a clone keeps the \
             snapshot's devices, so it may switch between user and tap but not add or \
             remove the network",
            mode(to),
            info.name,
            mode(from)
        )));
    }
    if to == NetMode::User && info.backend == BackendKind::Firecracker {
        return Err(Error::new(
            libc::EOPNOTSUPP,
            "clone net=user needs the qemu backend (Firecracker has no user-mode networking)",
        ));
    }
    if to == NetMode::Tap && from != NetMode::Tap {
        crate::net::check_tap_possible()?;
    }
    info.config = config;
    Ok(())
}

fn mode(m: NetMode) -> &'static str {
    match m {
        NetMode::None => "none",
        NetMode::User => "user",
        NetMode::Tap => "tap",
    }
}
