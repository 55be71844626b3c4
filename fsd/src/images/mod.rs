//! Images: `import` from local sources and `pull` from OCI registries, each producing
//! `<state>/images/<name>/{disk.ext4,info.json}`.
//!
//! Pipeline: detect the source kind ([`source`]), unpack layers in order into a staging
//! tree ([`layers`]), write the image config for the agent to
//! [`bandsox_agent::image::IMAGE_CONFIG_PATH`] inside it, and build the ext4 with
//! `mkfs.ext4 -d` (no mounting; owners, modes, xattrs, hard links and device nodes are
//! copied from staging). The disk is sized content + headroom (`size=`/`headroom=`).
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
pub mod layers;
pub mod oci;
pub mod registry;
pub mod source;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::events::{rfc3339, EventLog};
use layers::{Budget, Mode};
use oci::{BlobStore, ContainerConfig, Digest};
use source::SourceKind;

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

/// Reports progress of one image as events (at most one progress line per second).
pub struct Progress {
    events: Arc<EventLog>,
    subject: String,
    last: parking_lot::Mutex<Instant>,
    pub deadline: Instant,
}

impl Progress {
    pub fn new(events: Arc<EventLog>, image: &str, deadline: Instant) -> Progress {
        Progress {
            events,
            subject: format!("images/{image}"),
            last: parking_lot::Mutex::new(Instant::now() - Duration::from_secs(10)),
            deadline,
        }
    }
    pub fn event(&self, event: &str, detail: &str) {
        self.events.emit(&self.subject, event, detail);
    }
    /// A throttled progress line; `force` always emits (layer boundaries).
    pub fn progress(&self, event: &str, detail: &str, force: bool) {
        if force || self.due() {
            self.event(event, detail);
        }
    }
    /// Whether a throttled progress line is due now (and, if so, counts it as sent).
    pub fn due(&self) -> bool {
        let mut last = self.last.lock();
        if last.elapsed() >= Duration::from_secs(1) {
            *last = Instant::now();
            return true;
        }
        false
    }
    pub fn check_deadline(&self) -> Result<()> {
        if Instant::now() > self.deadline {
            return Err(Error::timed_out(
                "the image took longer than its deadline (BANDSOX_IMAGE_TIMEOUT)",
            ));
        }
        Ok(())
    }
}

/// A reader that reports bytes read as progress and enforces the deadline.
struct Counting<'a, R> {
    inner: R,
    progress: &'a Progress,
    label: String,
    total: Option<u64>,
    done: u64,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if Instant::now() > self.progress.deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the image took longer than its deadline (BANDSOX_IMAGE_TIMEOUT)",
            ));
        }
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.progress.due() {
            let total = self.total.map(|t| format!("/{t}")).unwrap_or_default();
            self.progress.event(
                "import-progress",
                &format!("{} bytes={}{total}", self.label, self.done),
            );
        }
        Ok(n)
    }
}

/// Decompressor chosen by sniffing the first bytes (gzip, zstd, or none).
pub enum Decoder<R: BufRead> {
    Plain(R),
    Gzip(Box<flate2::bufread::MultiGzDecoder<R>>),
    Zstd(Box<zstd::stream::read::Decoder<'static, R>>),
}

impl<R: BufRead> Decoder<R> {
    pub fn new(mut r: R) -> Result<Decoder<R>> {
        let head = r
            .fill_buf()
            .map_err(|e| Error::invalid(format!("cannot read: {e}")))?;
        if head.starts_with(&[0x1f, 0x8b]) {
            Ok(Decoder::Gzip(Box::new(
                flate2::bufread::MultiGzDecoder::new(r),
            )))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            let d = zstd::stream::read::Decoder::with_buffer(r)
                .map_err(|e| Error::invalid(format!("bad zstd stream: {e}")))?;
            Ok(Decoder::Zstd(Box::new(d)))
        } else {
            Ok(Decoder::Plain(r))
        }
    }
    pub fn compression(&self) -> &'static str {
        match self {
            Decoder::Plain(_) => "none",
            Decoder::Gzip(_) => "gzip",
            Decoder::Zstd(_) => "zstd",
        }
    }
    pub fn into_inner(self) -> R {
        match self {
            Decoder::Plain(r) => r,
            Decoder::Gzip(d) => d.into_inner(),
            Decoder::Zstd(d) => d.finish(),
        }
    }
}

impl<R: BufRead> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(d) => d.read(buf),
            Decoder::Zstd(d) => d.read(buf),
        }
    }
}

fn drain(r: &mut impl Read, what: &str) -> Result<()> {
    std::io::copy(r, &mut std::io::sink())
        .map(|_| ())
        .map_err(|e| Error::invalid(format!("{what}: {e}")))
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

/// Apply the layers of `manifest` from `store` into `rootfs`.
pub fn apply_manifest(
    store: &dyn BlobStore,
    manifest: &oci::Manifest,
    rootfs: &Path,
    progress: &Progress,
) -> Result<oci::ImageConfigFile> {
    let cdigest = manifest.config.digest()?;
    let config: oci::ImageConfigFile = oci::parse_json(
        &store.read_json_blob(&cdigest, &format!("config {cdigest}"))?,
        "image config",
    )?;
    let mut budget = new_budget();
    let n = manifest.layers.len();
    for (i, d) in manifest.layers.iter().enumerate() {
        progress.check_deadline()?;
        let digest = d.digest()?;
        let what = format!("layer {}/{n} ({digest})", i + 1);
        let verified = store.open_verified(&digest, d.size(), &what)?;
        let counting = Counting {
            inner: verified,
            progress,
            label: format!("layer={}/{n}", i + 1),
            total: d.size(),
            done: 0,
        };
        apply_one(
            BufReader::with_capacity(256 * 1024, counting),
            rootfs,
            &mut budget,
            &what,
            None,
        )?;
        progress.progress(
            "import-progress",
            &format!("layer={}/{n} done bytes={}", i + 1, budget.bytes),
            true,
        );
    }
    Ok(config)
}

/// Decompress and apply one layer stream, then read it to its end so its digest is
/// checked. `diff_id`, when given, is verified over the uncompressed stream.
fn apply_one<R: BufRead>(
    r: R,
    rootfs: &Path,
    budget: &mut Budget,
    what: &str,
    diff_id: Option<Digest>,
) -> Result<()> {
    let ctx = |e: Error| e.with_context(what);
    let dec = Decoder::new(r).map_err(ctx)?;
    match diff_id {
        Some(id) => {
            let v = oci::VerifyingReader::new(dec, id, None, what);
            let (_, mut v) = layers::apply_tar(rootfs, v, Mode::Layer, budget).map_err(ctx)?;
            drain(&mut v, what)?;
        }
        None => {
            let (_, mut dec) = layers::apply_tar(rootfs, dec, Mode::Layer, budget).map_err(ctx)?;
            drain(&mut dec, what)?;
            drain(&mut dec.into_inner(), what)?;
        }
    }
    Ok(())
}

/// Unpack a local `source` of `kind` into `work`.
pub fn unpack_local(
    source: &Path,
    kind: SourceKind,
    work: &Work,
    tag: Option<&str>,
    progress: &Progress,
) -> Result<Unpacked> {
    let mut out = Unpacked {
        kind: kind.name().to_string(),
        ..Default::default()
    };
    match kind {
        SourceKind::Ext4 => {
            crate::disk::clone_disk(source, &work.disk())
                .map_err(|e| Error::io(format!("cannot copy {}: {e}", source.display())))?;
            out.ext4 = true;
        }
        SourceKind::Directory => out.tree = Some(source.to_path_buf()),
        SourceKind::RootfsTar => {
            let f = std::fs::File::open(source)?;
            let total = f.metadata().ok().map(|m| m.len());
            let counting = Counting {
                inner: f,
                progress,
                label: "rootfs".into(),
                total,
                done: 0,
            };
            let dec = Decoder::new(BufReader::with_capacity(256 * 1024, counting))?;
            out.kind = match dec.compression() {
                "gzip" => "rootfs-tar.gz",
                "zstd" => "rootfs-tar.zst",
                _ => "rootfs-tar",
            }
            .into();
            let (_, mut dec) =
                layers::apply_tar(&work.rootfs(), dec, Mode::Plain, &mut new_budget())?;
            drain(&mut dec, "rootfs tarball")?;
            out.layers = 1;
        }
        SourceKind::OciLayout => {
            unpack_oci_layout(source, &work.rootfs(), tag, progress, &mut out)?
        }
        SourceKind::DockerSaveDir => {
            unpack_docker_save(source, &work.rootfs(), progress, &mut out)?
        }
        SourceKind::OciArchive | SourceKind::DockerSave => {
            // Unpack the archive (plain files only, paths checked), then read it as a dir.
            let dir = work.unpacked();
            std::fs::create_dir_all(&dir)?;
            let f = std::fs::File::open(source)?;
            let dec = Decoder::new(BufReader::with_capacity(256 * 1024, f))?;
            let (_, mut dec) = layers::apply_tar(&dir, dec, Mode::Plain, &mut new_budget())
                .map_err(|e| e.with_context("image archive"))?;
            drain(&mut dec, "image archive")?;
            if kind == SourceKind::OciArchive {
                unpack_oci_layout(&dir, &work.rootfs(), tag, progress, &mut out)?;
            } else {
                unpack_docker_save(&dir, &work.rootfs(), progress, &mut out)?;
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(out)
}

fn unpack_oci_layout(
    dir: &Path,
    rootfs: &Path,
    tag: Option<&str>,
    progress: &Progress,
    out: &mut Unpacked,
) -> Result<()> {
    let index_bytes = oci::read_limited(layers::open_in_root(dir, "index.json")?, "index.json")?;
    let index: oci::AnyManifest = oci::parse_json(&index_bytes, "index.json")?;
    let entries = index.manifests.clone().unwrap_or_default();
    if entries.is_empty() {
        return Err(Error::invalid("index.json lists no manifests"));
    }
    let store = oci::DirStore {
        dir: dir.to_path_buf(),
    };
    let ref_name = |d: &oci::Descriptor| {
        d.annotations
            .as_ref()
            .and_then(|a| a.get("org.opencontainers.image.ref.name").cloned())
    };
    let tags: Vec<String> = entries.iter().filter_map(ref_name).collect();
    let entries: Vec<oci::Descriptor> = match tag {
        Some(t) => {
            let hit: Vec<_> = entries
                .iter()
                .filter(|d| ref_name(d).as_deref() == Some(t))
                .cloned()
                .collect();
            if hit.is_empty() {
                return Err(Error::not_found(format!(
                    "no image tagged {t:?} in the layout (tags: {})",
                    tags.join(", ")
                )));
            }
            hit
        }
        None => entries,
    };
    let chosen = oci::choose_from_index(&entries).map_err(|e| {
        if entries.len() > 1 && tags.len() > 1 {
            Error::invalid(format!(
                "the layout holds several images (tags: {}); choose one with tag=NAME",
                tags.join(", ")
            ))
        } else {
            e
        }
    })?;
    out.reference = chosen
        .annotations
        .as_ref()
        .and_then(|a| a.get("org.opencontainers.image.ref.name").cloned());
    let digest = chosen.digest()?;
    let bytes = store.read_json_blob(&digest, &format!("manifest {digest}"))?;
    let manifest = oci::resolve_manifest(&store, bytes, digest)?;
    out.digest = Some(manifest.digest.to_string());
    out.layers = manifest.layers.len();
    out.config = Some(apply_manifest(&store, &manifest, rootfs, progress)?);
    Ok(())
}

#[derive(Deserialize)]
struct DockerSaveEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// The digest a docker-save member path encodes (`<hex>.json`, `blobs/sha256/<hex>`).
fn digest_from_member(path: &str) -> Option<Digest> {
    let base = path.rsplit('/').next()?;
    let hex = base.strip_suffix(".json").unwrap_or(base);
    Digest::parse(&format!("sha256:{hex}")).ok()
}

fn unpack_docker_save(
    dir: &Path,
    rootfs: &Path,
    progress: &Progress,
    out: &mut Unpacked,
) -> Result<()> {
    let bytes = oci::read_limited(layers::open_in_root(dir, "manifest.json")?, "manifest.json")?;
    let entries: Vec<DockerSaveEntry> = oci::parse_json(&bytes, "manifest.json")?;
    let [entry] = entries.as_slice() else {
        return Err(Error::invalid(format!(
            "manifest.json lists {} images; import takes archives of exactly one",
            entries.len()
        )));
    };
    out.reference = entry.repo_tags.as_ref().and_then(|t| t.first().cloned());
    let cfg_file = layers::open_in_root(dir, &entry.config)?;
    let cfg_bytes = match digest_from_member(&entry.config) {
        Some(d) => oci::read_limited(
            oci::VerifyingReader::new(cfg_file, d.clone(), None, "image config"),
            "image config",
        )?,
        None => oci::read_limited(cfg_file, "image config")?,
    };
    let config: oci::ImageConfigFile = oci::parse_json(&cfg_bytes, "image config")?;
    out.digest = Some(Digest::of(&cfg_bytes).to_string());
    let diff_ids = &config.rootfs.diff_ids;
    if !diff_ids.is_empty() && diff_ids.len() != entry.layers.len() {
        return Err(Error::invalid(format!(
            "the config lists {} layers, manifest.json {}",
            diff_ids.len(),
            entry.layers.len()
        )));
    }
    let mut budget = new_budget();
    let n = entry.layers.len();
    for (i, member) in entry.layers.iter().enumerate() {
        progress.check_deadline()?;
        let what = format!("layer {}/{n} ({member})", i + 1);
        let f = layers::open_in_root(dir, member).map_err(|e| e.with_context(&what))?;
        let total = f.metadata().ok().map(|m| m.len());
        let counting = Counting {
            inner: f,
            progress,
            label: format!("layer={}/{n}", i + 1),
            total,
            done: 0,
        };
        let diff_id = diff_ids.get(i).map(|d| Digest::parse(d)).transpose()?;
        apply_one(
            BufReader::with_capacity(256 * 1024, counting),
            rootfs,
            &mut budget,
            &what,
            diff_id,
        )?;
        progress.progress(
            "import-progress",
            &format!("layer={}/{n} done bytes={}", i + 1, budget.bytes),
            true,
        );
    }
    out.layers = n;
    out.config = Some(config);
    Ok(())
}

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

    #[test]
    fn decoder_sniffs() {
        let data = b"hello world".repeat(100);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &data).unwrap();
        let gz = gz.finish().unwrap();
        let zs = zstd::encode_all(&data[..], 1).unwrap();
        for (input, kind) in [(&data[..], "none"), (&gz[..], "gzip"), (&zs[..], "zstd")] {
            let mut d = Decoder::new(input).unwrap();
            assert_eq!(d.compression(), kind);
            let mut out = Vec::new();
            d.read_to_end(&mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    fn layer(files: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (n, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, n, data.as_bytes()).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn progress(dir: &Path) -> Progress {
        let log = Arc::new(EventLog::open(&dir.join("events.log")).unwrap());
        Progress::new(log, "t", Instant::now() + Duration::from_secs(60))
    }

    fn work(dir: &Path) -> Work {
        let w = Work {
            dir: dir.join("work"),
        };
        std::fs::create_dir_all(w.rootfs()).unwrap();
        w
    }

    #[test]
    fn docker_save_dir_applies_layers_and_checks_diff_ids() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("save");
        std::fs::create_dir_all(src.join("l1")).unwrap();
        std::fs::create_dir_all(src.join("l2")).unwrap();
        let l1 = layer(&[("etc/a", "1"), ("etc/b", "2")]);
        let l2 = layer(&[("etc/.wh.a", ""), ("etc/b", "3")]);
        std::fs::write(src.join("l1/layer.tar"), &l1).unwrap();
        std::fs::write(src.join("l2/layer.tar"), &l2).unwrap();
        let config = |ids: &[String]| {
            serde_json::json!({"architecture":"amd64","os":"linux",
                "config":{"Env":["X=1"],"User":"1:2"},
                "rootfs":{"type":"layers","diff_ids":ids}})
            .to_string()
        };
        let good = [Digest::of(&l1).to_string(), Digest::of(&l2).to_string()];
        std::fs::write(src.join("cfg.json"), config(&good)).unwrap();
        std::fs::write(
            src.join("manifest.json"),
            r#"[{"Config":"cfg.json","RepoTags":["x:1"],"Layers":["l1/layer.tar","l2/layer.tar"]}]"#,
        )
        .unwrap();
        let w = work(d.path());
        let p = progress(d.path());
        let u = unpack_local(&src, SourceKind::DockerSaveDir, &w, None, &p).unwrap();
        assert_eq!(u.layers, 2);
        assert_eq!(u.reference.as_deref(), Some("x:1"));
        assert_eq!(u.config.unwrap().config.user, "1:2");
        assert!(!w.rootfs().join("etc/a").exists());
        assert_eq!(
            std::fs::read_to_string(w.rootfs().join("etc/b")).unwrap(),
            "3"
        );
        // A wrong diff_id fails the import.
        let bad = [good[0].clone(), Digest::of(b"x").to_string()];
        std::fs::write(src.join("cfg.json"), config(&bad)).unwrap();
        let w2 = Work {
            dir: d.path().join("work2"),
        };
        std::fs::create_dir_all(w2.rootfs()).unwrap();
        let e = unpack_local(&src, SourceKind::DockerSaveDir, &w2, None, &p).unwrap_err();
        assert!(e.message.contains("digest mismatch"), "{}", e.message);
        // Member paths cannot leave the archive directory.
        std::fs::write(
            src.join("manifest.json"),
            r#"[{"Config":"../../etc/passwd","Layers":[]}]"#,
        )
        .unwrap();
        assert!(unpack_local(&src, SourceKind::DockerSaveDir, &w2, None, &p).is_err());
    }

    #[test]
    fn oci_layout_with_gzip_and_zstd_layers() {
        let d = tempfile::tempdir().unwrap();
        let lay = d.path().join("lay");
        std::fs::create_dir_all(lay.join("blobs/sha256")).unwrap();
        let put = |bytes: &[u8]| -> (String, usize) {
            let dg = Digest::of(bytes);
            std::fs::write(lay.join(dg.blob_path()), bytes).unwrap();
            (dg.to_string(), bytes.len())
        };
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &layer(&[("a/one", "1")])).unwrap();
        let (g, gl) = put(&gz.finish().unwrap());
        let (z, zl) = put(&zstd::encode_all(&layer(&[("a/two", "2")])[..], 1).unwrap());
        let (c, cl) = put(br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/x"]}}"#);
        let manifest = serde_json::json!({"schemaVersion":2,"mediaType":oci::MT_OCI_MANIFEST,
            "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":c,"size":cl},
            "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":g,"size":gl},
                      {"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":z,"size":zl}]})
        .to_string();
        let (m, ml) = put(manifest.as_bytes());
        std::fs::write(lay.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        std::fs::write(
            lay.join("index.json"),
            serde_json::json!({"schemaVersion":2,"manifests":[{"mediaType":oci::MT_OCI_MANIFEST,
                "digest":m,"size":ml,"annotations":{"org.opencontainers.image.ref.name":"v1"}}]})
            .to_string(),
        )
        .unwrap();
        let w = work(d.path());
        let p = progress(d.path());
        let u = unpack_local(&lay, SourceKind::OciLayout, &w, Some("v1"), &p).unwrap();
        assert_eq!((u.layers, u.reference.as_deref()), (2, Some("v1")));
        assert_eq!(u.digest.as_deref(), Some(m.as_str()));
        assert!(w.rootfs().join("a/one").exists() && w.rootfs().join("a/two").exists());
        // Corrupt the zstd layer (same size): the import fails on its digest.
        let zp = lay.join(Digest::parse(&z).unwrap().blob_path());
        let mut bytes = std::fs::read(&zp).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&zp, bytes).unwrap();
        let w2 = Work {
            dir: d.path().join("w2"),
        };
        std::fs::create_dir_all(w2.rootfs()).unwrap();
        assert!(unpack_local(&lay, SourceKind::OciLayout, &w2, None, &p).is_err());
        std::fs::remove_file(&zp).unwrap();
        let e = unpack_local(&lay, SourceKind::OciLayout, &w2, None, &p).unwrap_err();
        assert_eq!(e.errno, libc::ENOENT, "{}", e.message);
    }

    #[test]
    fn docker_save_member_digests() {
        let hex = "a".repeat(64);
        assert!(digest_from_member(&format!("{hex}.json")).is_some());
        assert!(digest_from_member(&format!("blobs/sha256/{hex}")).is_some());
        assert!(digest_from_member("config.json").is_none());
    }
}
