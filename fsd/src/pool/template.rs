//! A pool's template: a VM booted once, snapshotted when its agent answered, then ended.
//!
//! ```text
//! <state>/pools/<key>/template/   a snapshot directory (info.json, state, memory, disk.ext4)
//! <state>/pools/<key>/template.json  format version + SHA-256 of every file clones read
//! <state>/pools/<key>/.build-<id>/   the template VM while it is being built
//! ```
//! Invariants:
//! - A template is used only after [`verify`] passed: its format version is ours, every
//!   file it lists has the recorded size and SHA-256, and it was taken with the kernel and
//!   initramfs installed now. Anything else is removed and rebuilt, never handed out.
//! - The template VM runs with its RAM in a shared file (`VmRecord::template`), so its
//!   snapshot's stream holds device state only and clones map its `memory` privately.
//! - `template.json` is written last: a build interrupted at any point leaves no usable
//!   template, and its leftovers are removed by the next build.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::PoolSpec;
use crate::error::{Error, Result};
use crate::layout::mkdir_private;
use crate::manager::Manager;
use crate::snapshots::{self, FileIdentity, SnapshotInfo};

/// Version of the template layout; a template of another version is rebuilt.
pub const FORMAT_VERSION: u32 = 1;
const SNAP_NAME: &str = "template";
const META: &str = "template.json";
/// The template VM's name (its events are root's only: no user has a VM of that name).
const BUILD_NAME: &str = "pool-template";

/// `template.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    pub version: u32,
    /// Every file of the template's snapshot directory but `info.json`.
    pub files: Vec<FileIdentity>,
}

/// A verified template.
#[derive(Debug)]
pub struct Template {
    /// The snapshot directory clones restore from.
    pub dir: PathBuf,
    pub info: SnapshotInfo,
}

/// The pool's directory in the state directory.
pub fn pool_dir(mgr: &Manager, key: &str) -> PathBuf {
    mgr.layout.root().join("pools").join(key)
}

/// Why the template in `root` cannot be used, or the template.
pub fn verify(
    root: &Path,
    spec: &PoolSpec,
    boot: &(FileIdentity, FileIdentity),
) -> Result<Template> {
    let meta: Meta = std::fs::read(root.join(META))
        .map_err(|e| Error::not_found(format!("no template ({e})")))
        .and_then(|b| {
            serde_json::from_slice(&b).map_err(|e| Error::invalid(format!("{META}: {e}")))
        })?;
    if meta.version != FORMAT_VERSION {
        return Err(Error::invalid(format!(
            "template format {} (this daemon writes {FORMAT_VERSION})",
            meta.version
        )));
    }
    let info = snapshots::load(root, SNAP_NAME)?;
    if !spec.matches(&info.config) {
        return Err(Error::invalid("the template is of another machine"));
    }
    if let Some(why) = snapshots::boot_mismatch(&info, &boot.0, &boot.1) {
        return Err(Error::invalid(why));
    }
    let dir = root.join(SNAP_NAME);
    if meta.files.is_empty() {
        return Err(Error::invalid("the template lists no files"));
    }
    for want in &meta.files {
        let name = want
            .path
            .file_name()
            .ok_or_else(|| Error::invalid("a template file without a name"))?;
        let have = snapshots::identify(&dir.join(name))
            .map_err(|e| Error::invalid(format!("{}: {e}", want.path.display())))?;
        if have.size != want.size || have.sha256 != want.sha256 {
            return Err(Error::invalid(format!(
                "{} does not match its checksum",
                want.path.display()
            )));
        }
    }
    Ok(Template { dir, info })
}

/// Checksums of the files clones read (all but `info.json`, which `load` checks).
fn checksums(dir: &Path) -> std::io::Result<Vec<FileIdentity>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.file_name().is_some_and(|n| n != snapshots::INFO_FILE) && p.is_file() {
            out.push(snapshots::identify(&p)?);
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Build the template of `spec` in `root` (replacing whatever is there): boot, wait for
/// the agent, snapshot, end the VM, checksum.
pub async fn build(mgr: &Arc<Manager>, spec: &PoolSpec, root: &Path) -> Result<Template> {
    let backend = mgr.backends.choose(spec.config.backend)?;
    if !backend.can_snapshot() {
        return Err(Error::new(
            libc::EOPNOTSUPP,
            format!("backend {} cannot take snapshots", backend.kind()),
        ));
    }
    let image = mgr.layout.image_disk(&spec.config.image);
    let image_mib = std::fs::metadata(&image)
        .map_err(|e| Error::not_found(format!("image {:?}: {e}", spec.config.image)))?
        .len()
        .div_ceil(1024 * 1024);
    let disk_mib = spec.config.disk_mib.map(u64::from).unwrap_or(image_mib);
    // Start clean: an older or broken template and any interrupted build go.
    let _ = std::fs::remove_dir_all(root);
    mkdir_private(root)?;
    let id = crate::manager::new_id();
    let dir = root.join(format!(".build-{id}"));
    mkdir_private(&dir)?;
    let result = async {
        crate::manager::prepare_disk(&image, &dir.join("disk.ext4"), disk_mib, image_mib).await?;
        let record = super::pool_record(
            &id,
            BUILD_NAME.into(),
            spec.config.clone(),
            backend.kind(),
            disk_mib,
            true,
        );
        let vm = mgr.vm_of(record, dir.clone(), backend);
        let built = async {
            vm.first_boot(mgr.boot_timeout).await?;
            let tmp = snapshots::tmp_dir(root, SNAP_NAME);
            mkdir_private(&tmp)?;
            mgr.snapshot_files(&vm, SNAP_NAME, &tmp).await?;
            snapshots::publish(root, &tmp, SNAP_NAME)
        }
        .await;
        let _ = vm.destroy().await;
        crate::cgroup::remove(&id);
        built
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    let snap = root.join(SNAP_NAME);
    let files = tokio::task::spawn_blocking(move || checksums(&snap))
        .await
        .map_err(|e| Error::io(e.to_string()))??;
    let meta = Meta {
        version: FORMAT_VERSION,
        files,
    };
    let tmp = root.join(format!("{META}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(&meta).map_err(|e| Error::io(e.to_string()))?,
    )?;
    std::fs::rename(&tmp, root.join(META))?;
    let info = snapshots::load(root, SNAP_NAME)?;
    Ok(Template {
        dir: root.join(SNAP_NAME),
        info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(dir: &Path) -> (FileIdentity, FileIdentity) {
        std::fs::write(dir.join("k"), b"kernel").unwrap();
        std::fs::write(dir.join("i"), b"initrd").unwrap();
        (
            snapshots::identify(&dir.join("k")).unwrap(),
            snapshots::identify(&dir.join("i")).unwrap(),
        )
    }

    #[test]
    fn no_or_bad_meta_is_never_a_template() {
        let t = tempfile::tempdir().unwrap();
        let b = boot(t.path());
        let spec = PoolSpec::parse("size=1").unwrap();
        let e = verify(t.path(), &spec, &b).unwrap_err();
        assert_eq!(e.errno, libc::ENOENT);
        std::fs::write(t.path().join(META), b"{").unwrap();
        assert_eq!(verify(t.path(), &spec, &b).unwrap_err().errno, libc::EINVAL);
        let meta = Meta {
            version: FORMAT_VERSION + 1,
            files: vec![],
        };
        std::fs::write(t.path().join(META), serde_json::to_vec(&meta).unwrap()).unwrap();
        let e = verify(t.path(), &spec, &b).unwrap_err();
        assert!(e.message.contains("template format"), "{}", e.message);
    }

    #[test]
    fn checksums_cover_every_file_but_info() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("state"), b"s").unwrap();
        std::fs::write(t.path().join("memory"), b"m").unwrap();
        std::fs::write(t.path().join(snapshots::INFO_FILE), b"{}").unwrap();
        let c = checksums(t.path()).unwrap();
        let names: Vec<_> = c
            .iter()
            .map(|f| f.path.file_name().unwrap().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, ["memory", "state"]);
    }
}
