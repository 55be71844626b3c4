//! Snapshots on disk: one directory per snapshot under `<state>/snapshots/`.
//!
//! ```text
//! snapshots/<name>/info.json   SnapshotInfo: source, config, kernel identity, sizes,
//!                              what the backend needs to restore (e.g. QEMU's argv)
//! snapshots/<name>/state       VMM state + guest memory (QEMU migration stream;
//!                              Firecracker: the microVM state file)
//! snapshots/<name>/memory      guest memory (Firecracker only)
//! snapshots/<name>/disk.ext4   the disk as it was while the VM was paused (reflink or
//!                              sparse copy)
//! snapshots/.tmp-<name>-<rand>/  a snapshot being written; never listed
//! ```
//! Invariants:
//! - A snapshot becomes visible only complete: it is written into a `.tmp-*` directory
//!   and renamed into place as the last step. A failure removes the temporary directory;
//!   leftovers of a crashed daemon are removed at start ([`remove_leftovers`]).
//! - `info.json` is the snapshot's whole description; a directory without a readable
//!   one is not a snapshot.
//! - Snapshot names follow the VM-name rules ([`crate::names`]) and are never used for
//!   anything but the directory entry.
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::VmConfig;
use crate::error::{Error, Result};
use crate::vmm::{BackendKind, SavedState};

pub const INFO_FILE: &str = "info.json";
pub const DISK_FILE: &str = "disk.ext4";
/// Prefix of snapshot directories being written.
pub const TMP_PREFIX: &str = ".tmp-";

/// A file's identity: a restored guest must run the kernel and initramfs its memory holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

/// Sizes of a snapshot's files, in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sizes {
    /// VMM state (+ memory for QEMU), as stored.
    pub state_bytes: u64,
    /// Separate memory file (Firecracker), apparent size.
    pub memory_bytes: u64,
    /// The disk's apparent size.
    pub disk_bytes: u64,
    /// Blocks the disk copy allocates (0 extra for a reflink until either side writes).
    pub disk_allocated_bytes: u64,
    /// Everything the snapshot directory allocates.
    pub total_allocated_bytes: u64,
}

/// `info.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub source_vm: String,
    pub source_id: String,
    /// RFC 3339.
    pub created: String,
    pub backend: BackendKind,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u64,
    pub image: String,
    /// The source's configuration; clones get it unchanged.
    pub config: VmConfig,
    pub kernel: FileIdentity,
    pub initrd: FileIdentity,
    pub sizes: Sizes,
    /// `reflink` or `sparse copy`.
    pub disk_copy: String,
    /// Milliseconds from the freeze to the thaw (the guest's disk was frozen that long;
    /// its vCPUs were paused for `paused_ms` of it).
    pub create_ms: u64,
    pub paused_ms: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    /// What the backend needs to restore.
    pub saved: SavedState,
}

/// sha256 and size of a file (blocking; ~50 ms for a 14 MB kernel).
pub fn identify(path: &Path) -> std::io::Result<FileIdentity> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok(FileIdentity {
        path: path.to_path_buf(),
        size,
        sha256: h.finalize().iter().map(|b| format!("{b:02x}")).collect(),
    })
}

/// Why a snapshot cannot be restored with the current kernel and initramfs, if it cannot.
pub fn boot_mismatch(
    info: &SnapshotInfo,
    kernel: &FileIdentity,
    initrd: &FileIdentity,
) -> Option<String> {
    let short = |s: &str| s.chars().take(12).collect::<String>();
    for (what, then, now) in [
        ("kernel", &info.kernel, kernel),
        ("initramfs", &info.initrd, initrd),
    ] {
        if then.sha256 != now.sha256 {
            return Some(format!(
                "snapshot {} was taken with a different {what} (sha256 {}…, now {}…); \
                 a snapshot restores only with the kernel and initramfs it was taken with",
                info.name,
                short(&then.sha256),
                short(&now.sha256)
            ));
        }
    }
    None
}

/// Blocks a file or directory tree allocates, in bytes.
pub fn allocated(path: &Path) -> u64 {
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = m.blocks() * 512;
    if m.is_dir() {
        if let Ok(entries) = std::fs::read_dir(path) {
            for e in entries.flatten() {
                total += allocated(&e.path());
            }
        }
    }
    total
}

/// Apparent size of a file (0 when missing).
pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Names of complete snapshots, sorted.
pub fn list(root: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(root)
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.file_name().to_str().map(String::from))
                .filter(|n| !n.starts_with('.'))
                .filter(|n| root.join(n).join(INFO_FILE).is_file())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Read `<root>/<name>/info.json`; ENOENT naming the known snapshots when there is none.
pub fn load(root: &Path, name: &str) -> Result<SnapshotInfo> {
    crate::names::validate("snapshot", name)?;
    let p = root.join(name).join(INFO_FILE);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let known = list(root);
            return Err(Error::not_found(format!(
                "no snapshot {name:?}; snapshots: {}",
                if known.is_empty() {
                    "(none)".to_string()
                } else {
                    known.join(", ")
                }
            )));
        }
        Err(e) => return Err(e.into()),
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::io(format!("snapshot {name:?}: unreadable {INFO_FILE}: {e}")))
}

/// Write `info.json` into `dir` (a snapshot being built).
pub fn write_info(dir: &Path, info: &SnapshotInfo) -> Result<()> {
    let mut json = serde_json::to_vec_pretty(info).map_err(|e| Error::io(e.to_string()))?;
    json.push(b'\n');
    std::fs::write(dir.join(INFO_FILE), json)?;
    Ok(())
}

/// A fresh temporary directory name for building snapshot `name`.
pub fn tmp_dir(root: &Path, name: &str) -> PathBuf {
    root.join(format!("{TMP_PREFIX}{name}-{:08x}", rand::random::<u32>()))
}

/// Remove half-written snapshots left by a daemon that died while taking one.
pub fn remove_leftovers(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if name.to_string_lossy().starts_with(TMP_PREFIX) {
            tracing::info!("removing unfinished snapshot {}", e.path().display());
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                tracing::warn!("cannot remove {}: {err}", e.path().display());
            }
        }
    }
}

/// Move the finished snapshot in `tmp` to `<root>/<name>`; EEXIST if that appeared.
pub fn publish(root: &Path, tmp: &Path, name: &str) -> Result<()> {
    let dst = root.join(name);
    if dst.exists() {
        return Err(Error::exists(format!("snapshot {name:?} already exists")));
    }
    std::fs::rename(tmp, &dst).map_err(|e| match e.raw_os_error() {
        Some(libc::EEXIST | libc::ENOTEMPTY) => {
            Error::exists(format!("snapshot {name:?} already exists"))
        }
        _ => Error::from(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, k: &FileIdentity, i: &FileIdentity) -> SnapshotInfo {
        SnapshotInfo {
            name: name.into(),
            source_vm: "a".into(),
            source_id: "0123456789ab".into(),
            created: "2026-11-25T12:00:00Z".into(),
            backend: BackendKind::Qemu,
            vcpus: 1,
            memory_mib: 256,
            disk_mib: 512,
            image: "base".into(),
            config: VmConfig::default(),
            kernel: k.clone(),
            initrd: i.clone(),
            sizes: Sizes::default(),
            disk_copy: "sparse copy".into(),
            create_ms: 1,
            paused_ms: 1,
            owner_uid: 0,
            owner_gid: 0,
            saved: SavedState {
                state_file: "state".into(),
                memory_file: None,
                restore: serde_json::json!({"argv": ["q"], "source_dir": "/x"}),
            },
        }
    }

    #[test]
    fn identity_hashes_contents() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        std::fs::write(&p, b"abc").unwrap();
        let id = identify(&p).unwrap();
        assert_eq!(id.size, 3);
        assert_eq!(
            id.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(identify(&d.path().join("none")).is_err());
    }

    #[test]
    fn kernel_or_initrd_change_is_reported() {
        let d = tempfile::tempdir().unwrap();
        let (k, i) = (d.path().join("k"), d.path().join("i"));
        std::fs::write(&k, b"kernel").unwrap();
        std::fs::write(&i, b"initrd").unwrap();
        let (ki, ii) = (identify(&k).unwrap(), identify(&i).unwrap());
        let s = info("s1", &ki, &ii);
        assert_eq!(boot_mismatch(&s, &ki, &ii), None);
        std::fs::write(&k, b"kernel2").unwrap();
        let why = boot_mismatch(&s, &identify(&k).unwrap(), &ii).unwrap();
        assert!(why.contains("different kernel"), "{why}");
        let why = boot_mismatch(&s, &ki, &identify(&k).unwrap()).unwrap();
        assert!(why.contains("different initramfs"), "{why}");
    }

    #[test]
    fn store_lists_only_complete_snapshots_and_publishes_atomically() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let f = root.join("f");
        std::fs::write(&f, b"x").unwrap();
        let idf = identify(&f).unwrap();
        assert!(list(root).is_empty());
        let e = load(root, "s1").unwrap_err();
        assert_eq!(e.errno, libc::ENOENT);
        assert!(e.message.contains("(none)"), "{}", e.message);
        assert_eq!(load(root, "../x").unwrap_err().errno, libc::EINVAL);

        let tmp = tmp_dir(root, "s1");
        std::fs::create_dir(&tmp).unwrap();
        write_info(&tmp, &info("s1", &idf, &idf)).unwrap();
        assert!(
            list(root).is_empty(),
            "a snapshot being written is not listed"
        );
        publish(root, &tmp, "s1").unwrap();
        assert_eq!(list(root), ["s1"]);
        assert_eq!(load(root, "s1").unwrap(), info("s1", &idf, &idf));

        // Publishing over an existing name fails and leaves the temporary directory.
        let tmp2 = tmp_dir(root, "s1");
        std::fs::create_dir(&tmp2).unwrap();
        write_info(&tmp2, &info("s1", &idf, &idf)).unwrap();
        assert_eq!(publish(root, &tmp2, "s1").unwrap_err().errno, libc::EEXIST);
        assert!(tmp2.exists());
        // A directory without info.json is not a snapshot; leftovers are removed.
        std::fs::create_dir(root.join("junk")).unwrap();
        assert_eq!(list(root), ["s1"]);
        remove_leftovers(root);
        assert!(!tmp2.exists());
        assert!(root.join("s1").exists());
        assert!(allocated(&root.join("s1")) > 0);
    }
}
