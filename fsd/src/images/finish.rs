//! Finishing an image: the staging tree made bootable (the image config for the agent),
//! `disk.ext4` built with `mkfs.ext4 -d`, `info.json` written, and the work directory
//! moved into place.
//!
//! Invariants:
//! - The disk is sized content + headroom (or `size=`, refused when too small).
//! - `commit` renames only a complete work directory, and never over an existing image.
use std::path::Path;
use std::time::SystemTime;

use super::layers;
use super::oci::ContainerConfig;
use super::reading::Progress;
use super::{ImageInfo, ImageOptions, OciConfigView, Unpacked, Work, DEFAULT_HEADROOM_MIB};
use crate::error::{Error, Result};
use crate::events::rfc3339;

/// Make the staging tree bootable and hand the image config to the agent.
fn finish_rootfs(rootfs: &Path, config: Option<&ContainerConfig>) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    for (d, mode) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
        ("tmp", 0o1777),
    ] {
        let p = rootfs.join(d);
        if p.symlink_metadata().is_err() {
            std::fs::DirBuilder::new().mode(0o755).create(&p)?;
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        }
    }
    let Some(c) = config else { return Ok(()) };
    if !c.working_dir.is_empty() {
        // Docker creates a missing WorkingDir; resolve it inside the root like a layer.
        let comps = layers::clean_components(c.working_dir.as_bytes())?;
        layers::resolve_in_root(rootfs, &comps, true, true)?;
    }
    let dir = rootfs.join(".bandsox");
    // Whatever the image had there (even a symlink) is replaced, never followed.
    layers::remove_any(&dir)?;
    std::fs::DirBuilder::new().mode(0o755).create(&dir)?;
    let agent_cfg = bandsox_agent::image::ImageConfig {
        env: c.env.clone(),
        working_dir: c.working_dir.clone(),
        user: c.user.clone(),
        entrypoint: c.entrypoint.clone(),
        cmd: c.cmd.clone(),
    };
    let json = serde_json::to_vec_pretty(&agent_cfg).map_err(|e| Error::io(e.to_string()))?;
    std::fs::write(dir.join("image.json"), json)?;
    Ok(())
}

/// Build `work/disk.ext4` from `tree`; returns (disk bytes, content bytes).
fn build_disk(
    tree: &Path,
    work: &Work,
    opts: &ImageOptions,
    progress: &Progress,
) -> Result<(u64, u64)> {
    let (content, inodes) = layers::tree_usage(tree);
    let mib = 1u64 << 20;
    let needed_mib = (content + content / 10).div_ceil(mib) + inodes.div_ceil(2048) + 32;
    let size_mib = match opts.size_mib {
        Some(s) if s < needed_mib => {
            return Err(Error::new(
                libc::ENOSPC,
                format!("size={s} is too small: the content needs about {needed_mib} MiB"),
            ))
        }
        Some(s) => s,
        None => needed_mib + opts.headroom_mib.unwrap_or(DEFAULT_HEADROOM_MIB),
    };
    let inode_count = (size_mib * mib / 16384).max(inodes + inodes / 4 + 1024);
    progress.event(
        "import-mkfs",
        &format!("size_mib={size_mib} content_bytes={content} inodes={inodes}"),
    );
    crate::bootfiles::image::make_ext4_with(
        tree,
        &work.disk(),
        size_mib * mib,
        "bandsox-image",
        Some(inode_count),
        Some(progress.deadline),
    )
    .map_err(|e| Error::io(format!("building the ext4 failed: {e}")))?;
    Ok((size_mib * mib, content))
}

/// Turn an unpacked image into `work/disk.ext4` and its info; returns the info.
pub fn finish(
    work: &Work,
    unpacked: Unpacked,
    name: &str,
    source: &str,
    opts: &ImageOptions,
    owner_uid: u32,
    progress: &Progress,
) -> Result<ImageInfo> {
    progress.check_deadline()?;
    let container = unpacked.config.as_ref().map(|c| c.config.clone());
    let (size, content) = if unpacked.ext4 {
        let len = std::fs::metadata(work.disk())?.len();
        (len, len)
    } else if let Some(tree) = &unpacked.tree {
        build_disk(tree, work, opts, progress)?
    } else {
        finish_rootfs(&work.rootfs(), container.as_ref())?;
        let r = build_disk(&work.rootfs(), work, opts, progress)?;
        let _ = std::fs::remove_dir_all(work.rootfs());
        r
    };
    let cfg = unpacked.config.unwrap_or_default();
    let info = ImageInfo {
        name: name.to_string(),
        source: source.to_string(),
        kind: unpacked.kind,
        reference: unpacked.reference,
        digest: unpacked.digest,
        size,
        content_bytes: content,
        layers: unpacked.layers,
        created: cfg.created.clone(),
        imported: rfc3339(SystemTime::now()),
        architecture: Some(cfg.architecture.clone()).filter(|s| !s.is_empty()),
        os: Some(cfg.os.clone()).filter(|s| !s.is_empty()),
        config: OciConfigView::from(&cfg.config),
        owner_uid,
    };
    let json = serde_json::to_vec_pretty(&info).map_err(|e| Error::io(e.to_string()))?;
    std::fs::write(work.dir.join("info.json"), json)?;
    Ok(info)
}

/// Move a finished work directory into place as `final_dir` (which must not exist).
pub fn commit(work: &Work, final_dir: &Path) -> Result<()> {
    for leftover in [work.rootfs(), work.unpacked()] {
        if leftover.exists() {
            std::fs::remove_dir_all(&leftover)?;
        }
    }
    if final_dir.exists() {
        return Err(Error::exists(format!(
            "image {} appeared meanwhile",
            final_dir.display()
        )));
    }
    std::fs::rename(&work.dir, final_dir)?;
    Ok(())
}
