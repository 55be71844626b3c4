//! Host programs the daemon runs (QEMU, Firecracker, the jailer, mkfs, ip, nft, ...):
//! where to find them.
//!
//! Invariant: one lookup rule for every program: the directories of `PATH` in order,
//! then the sbin and bin directories a daemon's `PATH` may lack; only regular files count.
use std::path::PathBuf;

/// The program `name` from `PATH` or the standard sbin/bin directories.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
