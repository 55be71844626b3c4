//! Test helpers shared by the backends' unit tests.
//!
//! Invariants: test-only (`#[cfg(test)]`); each helper checks a contract every backend
//! keeps, so a backend's tests state only what is its own.
use std::path::Path;

use super::{VmSpec, VmmError, VmmInstance};

/// A two-vCPU, 256 MiB VM named `web-1` in `dir`, with a disk and no network.
pub(crate) fn spec(dir: &Path) -> VmSpec {
    VmSpec {
        name: "web-1".into(),
        dir: dir.to_path_buf(),
        vcpus: 2,
        memory_mib: 256,
        disk: Some(dir.join("disk.ext4")),
        kernel: "/s/boot/vmlinuz".into(),
        initrd: "/s/boot/initrd".into(),
        net: None,
        memory_file: None,
    }
}

/// The adoption contract, on an instance whose "VMM" was launched as `sleep 30` and on
/// `adopted`, the same process adopted from the VM directory: both are the same live
/// process; once `record` (the JSON record of the command line, with an `argv` array)
/// names another command line, `adopt_again` finds nothing; after a kill neither handle
/// is alive, a second kill is a no-op and control fails with `NotRunning`.
pub(crate) async fn check_adoption(
    inst: &dyn VmmInstance,
    adopted: &dyn VmmInstance,
    record: &Path,
    adopt_again: impl Fn() -> bool,
) {
    assert_eq!(adopted.pid(), inst.pid());
    assert!(adopted.is_alive());
    let mut other: serde_json::Value =
        serde_json::from_slice(&std::fs::read(record).unwrap()).unwrap();
    other["argv"][1] = "31".into();
    std::fs::write(record, serde_json::to_vec(&other).unwrap()).unwrap();
    assert!(!adopt_again(), "a different command line is not ours");

    inst.kill().await.unwrap();
    assert!(!inst.is_alive());
    assert!(!adopted.is_alive());
    inst.kill().await.unwrap(); // idempotent
    assert!(matches!(inst.pause().await, Err(VmmError::NotRunning)));
}
