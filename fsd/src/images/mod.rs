//! Images: `import` from local sources and `pull` from OCI registries, each producing
//! `<state>/images/<name>/{disk.ext4,info.json}`.
//!
//! Pipeline: detect the source kind ([`source`]), unpack layers in order into a staging
//! tree ([`layers`]), write the image config for the agent to
//! [`bandsox_agent::image::IMAGE_CONFIG_PATH`] inside it, and build the ext4 with
//! `mkfs.ext4 -d` (no mounting; owners, modes, xattrs, hard links and device nodes are
//! copied from staging). The disk is sized content + headroom (`size=`/`headroom=`).
//!
//! The pipeline's parts: [`reading`] (progress events, the deadline, decompression),
//! [`unpack`] (sources into the staging tree), [`finish`] (the staging tree into
//! `disk.ext4` and `info.json`, then into place). This file holds the options, the
//! image record and the limits.
//!
//! Invariants:
//! - All work happens in `<state>/images/.tmp-<name>-<random>/`, renamed to
//!   `images/<name>` only when complete; any failure removes the temporary directory,
//!   so there is never a partial image (leftovers of a crash are removed at startup).
//! - Names starting with `.` are never images (the listing skips them).
//! - Every blob is verified against its digest; every archive member path is resolved
//!   inside its root; sizes from manifests and headers are never trusted (see [`Budget`]).
//! - Long work runs on blocking threads (never on FUSE threads) and is bounded by a
//!   deadline ([`IMAGE_TIMEOUT`]); progress is reported as events.
pub mod build;
mod finish;
pub mod layers;
pub mod oci;
mod reading;
pub mod registry;
pub mod source;
mod unpack;

pub use finish::{commit, finish};
pub use reading::{Decoder, Progress};
pub use unpack::{apply_manifest, unpack_local};

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use layers::Budget;
use oci::ContainerConfig;

/// Default free space added on top of the content.
pub const DEFAULT_HEADROOM_MIB: u64 = 256;
/// Overall deadline of one import or pull (override: `BANDSOX_IMAGE_TIMEOUT`, seconds).
pub const IMAGE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Most bytes one image may unpack to (override: `BANDSOX_IMAGE_MAX_MIB`).
pub const MAX_UNPACKED_MIB: u64 = 64 * 1024;
/// Most entries (files, dirs, links) one image may have.
pub const MAX_ENTRIES: u64 = 4_000_000;

pub fn image_timeout() -> Duration {
    std::env::var("BANDSOX_IMAGE_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(IMAGE_TIMEOUT)
}

fn new_budget() -> Budget {
    let mib = std::env::var("BANDSOX_IMAGE_MAX_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(MAX_UNPACKED_MIB);
    Budget::new(mib << 20, MAX_ENTRIES)
}

/// Options of `import` and `pull`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageOptions {
    /// Exact disk size in MiB (must hold the content).
    pub size_mib: Option<u64>,
    /// Free space on top of the content (default [`DEFAULT_HEADROOM_MIB`]).
    pub headroom_mib: Option<u64>,
    /// Which image of an OCI layout/archive holding several (its `ref.name` annotation).
    pub tag: Option<String>,
}

pub const OPTIONS_HELP: &str = "size=MiB headroom=MiB tag=NAME";

impl ImageOptions {
    pub fn parse(words: &[String]) -> Result<ImageOptions> {
        let mut o = ImageOptions::default();
        for w in words {
            let num = |v: &str| -> Result<u64> {
                v.parse::<u64>()
                    .ok()
                    .filter(|n| *n <= 1024 * 1024)
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "{}: expected MiB 0..1048576",
                            crate::lines::quote(w)
                        ))
                    })
            };
            match w.split_once('=') {
                Some(("size", v)) => o.size_mib = Some(num(v)?.max(16)),
                Some(("headroom", v)) => o.headroom_mib = Some(num(v)?),
                Some(("tag", v)) if !v.is_empty() && v.len() <= 128 => o.tag = Some(v.to_string()),
                _ => {
                    return Err(Error::invalid(format!(
                        "unknown option {}; accepted: {OPTIONS_HELP}",
                        crate::lines::quote(w)
                    )))
                }
            }
        }
        Ok(o)
    }
}

/// `info.json` of an image.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ImageInfo {
    pub name: String,
    /// What was imported: a host path or a registry reference.
    pub source: String,
    /// docker-save, oci-layout, oci-archive, rootfs-tar, directory, ext4 or registry.
    pub kind: String,
    /// The normalised registry reference (pull) or the archive's tag, if any.
    pub reference: Option<String>,
    /// The image manifest's digest (pull, OCI layouts and archives).
    pub digest: Option<String>,
    /// Apparent size of the disk image in bytes.
    pub size: u64,
    /// Bytes of file content unpacked.
    pub content_bytes: u64,
    pub layers: usize,
    /// The image config's `created` time, if any.
    pub created: Option<String>,
    /// When this image was imported (RFC 3339).
    pub imported: String,
    pub architecture: Option<String>,
    pub os: Option<String>,
    pub config: OciConfigView,
    /// The user who imported or pulled it (may remove it).
    pub owner_uid: u32,
}

/// The image config as shown in `info` (OCI's key names).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct OciConfigView {
    #[serde(rename = "Env")]
    pub env: Vec<String>,
    #[serde(rename = "WorkingDir")]
    pub working_dir: String,
    #[serde(rename = "User")]
    pub user: String,
    #[serde(rename = "Entrypoint")]
    pub entrypoint: Vec<String>,
    #[serde(rename = "Cmd")]
    pub cmd: Vec<String>,
}

impl From<&ContainerConfig> for OciConfigView {
    fn from(c: &ContainerConfig) -> Self {
        OciConfigView {
            env: c.env.clone(),
            working_dir: c.working_dir.clone(),
            user: c.user.clone(),
            entrypoint: c.entrypoint.clone(),
            cmd: c.cmd.clone(),
        }
    }
}

/// Where one image is being built.
pub struct Work {
    pub dir: PathBuf,
}

impl Work {
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    pub fn unpacked(&self) -> PathBuf {
        self.dir.join("unpacked")
    }
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.ext4")
    }
}

/// What the unpack step learned about the image.
#[derive(Debug, Default)]
pub struct Unpacked {
    pub kind: String,
    pub reference: Option<String>,
    pub digest: Option<String>,
    pub layers: usize,
    pub config: Option<oci::ImageConfigFile>,
    /// Build the disk from this directory instead of `rootfs` (directory imports).
    pub tree: Option<PathBuf>,
    /// A finished disk (ext4 imports).
    pub ext4: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse() {
        let o = ImageOptions::parse(&["size=300".into(), "headroom=10".into()]).unwrap();
        assert_eq!(o.size_mib, Some(300));
        assert_eq!(o.headroom_mib, Some(10));
        assert!(ImageOptions::parse(&["size=x".into()]).is_err());
        assert!(ImageOptions::parse(&["bogus=1".into()]).is_err());
    }
}
