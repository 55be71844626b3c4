//! The manager's image operations: `import`, `pull`, `build`, `rmdir images/NAME`, and the
//! image entrypoint run (`autostart=1` → `runs/main`).
//!
//! Invariants:
//! - An image name is being built by at most one operation (`images_busy`), and an
//!   existing image is never overwritten (EEXIST).
//! - A failed import or pull leaves nothing under `images/` (its `.tmp-*` directory is
//!   removed) and reports why in `ctl` and as an `import-failed`/`pull-failed` event.
//! - Imports from host paths are root-only: the daemon reads the source with its own
//!   privileges, so letting other users name host paths would let them read any file.
//! - An image is removable only when no VM was created from it and it is not the
//!   `image=` of `defaults` (EBUSY otherwise; this also protects `base` by default).
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bandsox_agent::proto::Program;

use super::vm::Vm;
use super::Manager;
use crate::error::{Error, Result};
use crate::images::{self, registry, ImageOptions, Progress, Unpacked, Work};

/// `<vm-dir>/autostart.json`: the argv started as `runs/main` at every boot.
const AUTOSTART_FILE: &str = "autostart.json";

/// Releases a reserved image name when dropped.
struct Reservation<'a> {
    mgr: &'a Manager,
    name: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.mgr.images_busy.lock().remove(&self.name);
    }
}

/// EPERM with `why` for anyone but root.
fn root_only(uid: u32, why: &'static str) -> Result<()> {
    if uid == 0 {
        Ok(())
    } else {
        Err(Error::new(libc::EPERM, why))
    }
}

// The parser of `image=` values lives with the image formats, below the manager.
pub use crate::images::registry::image_ref;

/// The local image a registry reference is pulled into: the reference with every
/// character outside `A-Z a-z 0-9 . _ -` replaced by `_` (`localhost:5000/t/app:v2` →
/// `localhost_5000_t_app_v2`), shortened with a hash suffix beyond 64 bytes.
pub fn image_name_for_ref(reference: &str) -> String {
    let r = reference
        .strip_prefix("http://")
        .or_else(|| reference.strip_prefix("https://"))
        .unwrap_or(reference);
    let mut name: String = r
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.starts_with(['.', '-']) {
        name.insert(0, 'r');
    }
    if name.len() > crate::names::MAX_NAME_LEN {
        use sha2::Digest as _;
        let h = sha2::Sha256::digest(reference.as_bytes());
        let hex: String = h.iter().take(6).map(|b| format!("{b:02x}")).collect();
        name.truncate(crate::names::MAX_NAME_LEN - 13);
        name.push('-');
        name.push_str(&hex);
    }
    name
}

impl Manager {
    /// Names of the installed images, sorted.
    pub fn images(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.layout.images())
            .map(|it| {
                it.flatten()
                    // `.tmp-*` are builds in progress, never images.
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .filter(|e| e.path().join("disk.ext4").exists())
                    .filter_map(|e| e.file_name().to_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// `images/NAME/info`: the image's info.json (or just its name), newline-ended.
    pub fn image_info(&self, name: &str) -> Result<String> {
        if !self.images().iter().any(|i| i == name) {
            return Err(Error::not_found(format!("no image {name:?}")));
        }
        let mut s = std::fs::read_to_string(self.layout.image_info(name))
            .unwrap_or_else(|_| serde_json::json!({ "name": name }).to_string());
        if !s.ends_with('\n') {
            s.push('\n');
        }
        Ok(s)
    }

    /// Remove `.tmp-*` build directories left by a crash.
    pub(super) fn clean_image_leftovers(&self) {
        let Ok(rd) = std::fs::read_dir(self.layout.images()) else {
            return;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                tracing::info!("removing the unfinished image build {}", e.path().display());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    fn reserve_image(&self, name: &str) -> Result<Reservation<'_>> {
        crate::names::validate("image", name)?;
        let mut busy = self.images_busy.lock();
        if busy.contains(name) {
            return Err(Error::exists(format!(
                "image {name:?} is being imported right now"
            )));
        }
        if self.layout.image_dir(name).exists() {
            return Err(Error::exists(format!(
                "image {name:?} already exists; rmdir images/{name} first"
            )));
        }
        busy.insert(name.to_string());
        Ok(Reservation {
            mgr: self,
            name: name.to_string(),
        })
    }

    fn new_work(&self, name: &str) -> Result<Work> {
        let dir = self
            .layout
            .images()
            .join(format!(".tmp-{name}-{:08x}", rand::random::<u32>()));
        crate::layout::mkdir_private(&dir)?;
        let work = Work {
            dir,
            max_unpacked_mib: self.settings.images.max_unpacked_mib,
        };
        // The image's `/`: world-traversable like any root directory (mkfs copies it).
        std::fs::create_dir(work.rootfs())?;
        std::fs::set_permissions(
            work.rootfs(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        Ok(work)
    }

    /// `import NAME SOURCE`: build an image from a host path (root only).
    pub async fn import_image(
        self: &Arc<Self>,
        name: &str,
        source: &str,
        opts: ImageOptions,
        uid: u32,
    ) -> Result<String> {
        root_only(
            uid,
            "import reads host paths with the daemon's privileges, so only root may \
             import; other users can pull from a registry",
        )?;
        let path = PathBuf::from(source);
        if !path.is_absolute() {
            return Err(Error::invalid(format!(
                "import: SOURCE must be an absolute path, got {source:?}"
            )));
        }
        let kind = images::source::detect(&path)?;
        let (n, src) = (name.to_string(), source.to_string());
        let detail = format!("kind={} source={source}", kind.name());
        self.build_locally(name, "import", &detail, move |work, p| {
            let unpacked = images::unpack_local(&path, kind, work, opts.tag.as_deref(), p)?;
            images::finish(work, unpacked, &n, &src, &opts, uid, p)
        })
        .await
    }

    /// `build NAME DIR [file=F]`: build DIR's Dockerfile with the host's builder
    /// (buildah or docker), then import its archive (root only, like `import`).
    pub async fn build_image(
        self: &Arc<Self>,
        name: &str,
        context: &str,
        file: Option<&str>,
        opts: ImageOptions,
        uid: u32,
    ) -> Result<String> {
        root_only(
            uid,
            "build runs a builder on host paths with the daemon's privileges, so only \
             root may build; other users can pull from a registry",
        )?;
        let (ctx, dockerfile) = images::build::resolve(context, file)?;
        let builder = images::build::Builder::detect(self.settings.images.builder.as_deref())?;
        let n = name.to_string();
        let source = format!("build:{}", ctx.display());
        let detail = format!("builder={} context={context}", builder.name());
        self.build_locally(name, "build", &detail, move |work, p| {
            let archive = work.dir.join("build.tar");
            // Builders want lowercase repository names.
            let tag = format!(
                "localhost/bandsox-build-{}-{:08x}",
                n.to_ascii_lowercase(),
                rand::random::<u32>()
            );
            let log = work.dir.join("build.log");
            images::build::run(&builder, &ctx, &dockerfile, &tag, &archive, &log, p)?;
            p.event("build-finished", &format!("builder={}", builder.name()));
            let kind = images::source::detect(&archive)?;
            let mut unpacked = images::unpack_local(&archive, kind, work, None, p)?;
            std::fs::remove_file(&archive)?;
            unpacked.kind = "build".into();
            unpacked.reference = Some(source.clone());
            images::finish(work, unpacked, &n, &source, &opts, uid, p)
        })
        .await
    }

    /// The frame of an image built on this host (`import`, `build`): reserve the name,
    /// report `{op}-start`, run `job` in a fresh work directory on a blocking thread,
    /// move the result into place, and conclude.
    async fn build_locally<F>(
        self: &Arc<Self>,
        name: &str,
        op: &str,
        detail: &str,
        job: F,
    ) -> Result<String>
    where
        F: FnOnce(&Work, &Progress) -> Result<images::ImageInfo> + Send + 'static,
    {
        let _reservation = self.reserve_image(name)?;
        let progress = Arc::new(Progress::new(
            self.events.clone(),
            name,
            Instant::now() + self.settings.images.timeout,
        ));
        progress.event(&format!("{op}-start"), detail);
        let work = self.new_work(name)?;
        let t0 = Instant::now();
        let (p, final_dir) = (progress.clone(), self.layout.image_dir(name));
        let dir = work.dir.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<images::ImageInfo> {
            let info = job(&work, &p)?;
            images::commit(&work, &final_dir)?;
            Ok(info)
        })
        .await
        .map_err(|e| Error::io(format!("{op} task failed: {e}")))
        .and_then(|r| r);
        self.conclude(name, op, &dir, &progress, t0, result)
    }

    /// `pull NAME REFERENCE`: fetch from a registry (through the blob cache) and build.
    pub async fn pull_image(
        self: &Arc<Self>,
        name: &str,
        reference: &str,
        opts: ImageOptions,
        uid: u32,
    ) -> Result<String> {
        let pref = registry::PullRef::parse(reference)?;
        let _reservation = self.reserve_image(name)?;
        let deadline = Instant::now() + self.settings.images.timeout;
        let progress = Arc::new(Progress::new(self.events.clone(), name, deadline));
        let shown = pref.display();
        progress.event("pull-start", &shown);
        let work = self.new_work(name)?;
        let dir = work.dir.clone();
        let t0 = Instant::now();
        let cache = self.layout.blob_cache();
        let result = async {
            crate::layout::mkdir_private(&cache)?;
            let puller = registry::Puller::new(pref);
            let fetch_t0 = Instant::now();
            let pulled = tokio::time::timeout_at(deadline.into(), puller.pull(&cache, &progress))
                .await
                .map_err(|_| {
                    Error::timed_out(
                        "the pull took longer than its deadline (BANDSOX_IMAGE_TIMEOUT)",
                    )
                })??;
            progress.event(
                "pull-fetched",
                &format!(
                    "downloaded_bytes={} cached_blobs={} digest={} fetch_ms={}",
                    pulled.downloaded,
                    pulled.cached,
                    pulled.manifest.digest,
                    fetch_t0.elapsed().as_millis()
                ),
            );
            let (p, final_dir, n) = (
                progress.clone(),
                self.layout.image_dir(name),
                name.to_string(),
            );
            tokio::task::spawn_blocking(move || -> Result<images::ImageInfo> {
                let store = registry::cache_store(&cache);
                let config = images::apply_manifest(&store, &pulled.manifest, &work, &p)?;
                let unpacked = Unpacked {
                    kind: "registry".into(),
                    reference: Some(shown.clone()),
                    digest: Some(pulled.manifest.digest.to_string()),
                    layers: pulled.manifest.layers.len(),
                    config: Some(config),
                    ..Default::default()
                };
                let info = images::finish(&work, unpacked, &n, &shown, &opts, uid, &p)?;
                images::commit(&work, &final_dir)?;
                Ok(info)
            })
            .await
            .map_err(|e| Error::io(format!("pull task failed: {e}")))?
        }
        .await;
        self.conclude(name, "pull", &dir, &progress, t0, result)
    }

    /// Report the outcome of an import or pull; on failure remove its work directory.
    fn conclude(
        &self,
        name: &str,
        op: &str,
        work_dir: &Path,
        progress: &Progress,
        t0: Instant,
        result: Result<images::ImageInfo>,
    ) -> Result<String> {
        match result {
            Ok(info) => {
                let ms = t0.elapsed().as_millis();
                progress.event(
                    "imported",
                    &format!(
                        "kind={} layers={} size_mib={} content_bytes={} ms={ms}",
                        info.kind,
                        info.layers,
                        info.size >> 20,
                        info.content_bytes
                    ),
                );
                Ok(format!(
                    "ok: image {name} ({}, {} layers, {} MiB disk, {ms} ms)",
                    info.kind,
                    info.layers,
                    info.size >> 20
                ))
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(work_dir);
                progress.event(&format!("{op}-failed"), &e.message);
                Err(e.with_context(&format!("{op} {name}")))
            }
        }
    }

    /// The uid that imported or pulled image `name` (0 when unknown: root's).
    pub fn image_owner(&self, name: &str) -> u32 {
        std::fs::read(self.layout.image_info(name))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("owner_uid").and_then(|u| u.as_u64()))
            .and_then(|u| u32::try_from(u).ok())
            .unwrap_or(0)
    }

    /// `rmdir images/NAME` (who may remove it is `vfs::policy`'s decision, made before).
    pub fn remove_image(&self, name: &str) -> Result<()> {
        if !self.images().iter().any(|i| i == name) {
            return Err(Error::not_found(format!("no image {name:?}")));
        }
        let users: Vec<String> = self
            .list()
            .iter()
            .filter(|v| v.record().config.image == name)
            .map(|v| v.name.clone())
            .collect();
        if !users.is_empty() {
            return Err(Error::busy(format!(
                "image {name} is used by VM(s) {}",
                users.join(", ")
            )));
        }
        if self.defaults().image == name {
            return Err(Error::busy(format!(
                "image {name} is the default image (image= in defaults)"
            )));
        }
        let _reservation = self.reserve_busy(name)?;
        // Rename first so the image disappears at once, then delete.
        let doomed = self
            .layout
            .images()
            .join(format!(".tmp-rm-{name}-{:08x}", rand::random::<u32>()));
        std::fs::rename(self.layout.image_dir(name), &doomed)?;
        if let Err(e) = std::fs::remove_dir_all(&doomed) {
            tracing::warn!("cannot remove {}: {e}", doomed.display());
        }
        self.events
            .emit(&format!("images/{name}"), "image-removed", "");
        Ok(())
    }

    fn reserve_busy(&self, name: &str) -> Result<Reservation<'_>> {
        let mut busy = self.images_busy.lock();
        if !busy.insert(name.to_string()) {
            return Err(Error::busy(format!("image {name} is being worked on")));
        }
        Ok(Reservation {
            mgr: self,
            name: name.to_string(),
        })
    }

    /// Remember the image's Entrypoint+Cmd for a VM created with `autostart=1`.
    pub(super) fn save_autostart(&self, vm: &Vm) -> Result<()> {
        let rec = vm.record();
        if !rec.config.autostart {
            return Ok(());
        }
        let info: images::ImageInfo = std::fs::read(self.layout.image_info(&rec.config.image))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let argv: Vec<String> = info
            .config
            .entrypoint
            .iter()
            .chain(&info.config.cmd)
            .cloned()
            .collect();
        if argv.is_empty() {
            return Err(Error::invalid(format!(
                "autostart=1: image {} has no Entrypoint or Cmd",
                rec.config.image
            )));
        }
        let json = serde_json::to_vec(&argv).map_err(|e| Error::io(e.to_string()))?;
        std::fs::write(vm.dir.join(AUTOSTART_FILE), json)?;
        Ok(())
    }

    /// Start the image's entrypoint as `runs/main` if the VM was created with autostart.
    pub(super) async fn autostart(&self, vm: &Arc<Vm>) -> Result<()> {
        let Ok(bytes) = std::fs::read(vm.dir.join(AUTOSTART_FILE)) else {
            return Ok(());
        };
        let argv: Vec<String> = serde_json::from_slice(&bytes)
            .map_err(|e| Error::io(format!("bad {AUTOSTART_FILE}: {e}")))?;
        let shown = argv
            .iter()
            .map(|a| {
                if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"\\$".contains(c)) {
                    format!("'{}'", a.replace('\'', "'\\''"))
                } else {
                    a.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        let program = Program::Argv(argv.into_iter().map(String::into_bytes).collect());
        match vm.start_program(shown.into_bytes(), program, 0).await {
            Ok(run) => {
                vm.set_main_run(run.n)?;
                self.events
                    .emit(&vm.name, "autostart", &format!("run={}", run.n));
                Ok(())
            }
            Err(e) => {
                // The run exists (status `lost: <why>`); `runs/main` shows it.
                if let Some(n) = vm.run_numbers().last() {
                    let _ = vm.set_main_run(*n);
                }
                self.events.emit(&vm.name, "autostart-failed", &e.message);
                Err(e.with_context("autostart"))
            }
        }
    }
}

#[cfg(test)]
mod ref_tests {
    use super::*;

    #[test]
    fn references_and_their_image_names() {
        assert!(image_ref("alpine").is_none());
        assert!(image_ref("base").is_none());
        assert!(image_ref("alpine:3.20").is_some());
        assert!(image_ref("ghcr.io/o/r").is_some());
        assert!(image_ref("a//b").is_none());
        assert_eq!(image_name_for_ref("alpine:3.20"), "alpine_3.20");
        assert_eq!(
            image_name_for_ref("http://localhost:5000/t/app:v2"),
            "localhost_5000_t_app_v2"
        );
        let long = format!("ghcr.io/o/r@sha256:{}", "a".repeat(64));
        let n = image_name_for_ref(&long);
        assert!(n.len() <= 64);
        assert!(crate::names::validate("image", &n).is_ok(), "{n}");
    }
}
