//! Guest boot artefacts: kernel, initramfs and the `base` image (`bandsox guest-build`).
//!
//! Output, under the state directory (every directory 0700, every file 0600):
//! ```text
//! boot/vmlinuz          copy of the kernel bzImage (newest boot/vmlinuz-* under kernel_root)
//! boot/initrd           uncompressed cpio: the agent as /init + the modules it loads
//!                       (see [`initramfs`])
//! boot/kernel.json      {"version", "kernel_sha256", "initrd_sha256", "agent_sha256",
//!                        "modules": [paths in load order], "module_deps_from",
//!                        "kernel_source", "package", "built" (RFC 3339), "inputs_sha256"}
//! images/base/disk.ext4 sparse ext4 (512 MiB apparent) from busybox-static (see [`image`])
//! images/base/info.json {"name": "base", "format": "ext4", "size_bytes", "created"
//!                        (RFC 3339), "source": "busybox-static", "busybox" (version line),
//!                        "busybox_package", "inputs_sha256"}
//! ```
//! Invariants:
//! - Idempotent: `inputs_sha256` hashes everything an output is made from (kernel, agent
//!   and module bytes for boot/; busybox bytes for the image, plus a format version each).
//!   When it matches the recorded one and the files exist, nothing is rewritten, unless
//!   `force`. The JSON file is written last, so an interrupted build is redone.
//! - Every output appears atomically (written as `*.tmp`, then renamed), so a daemon never
//!   boots a half-written kernel or initramfs.
//! - Only static executables are accepted as the agent and busybox: a dynamic `/init` would
//!   only fail inside the guest, as a kernel panic.
//! - Builds into one state directory are serialised with `flock` on `<state>/.guest-build.lock`.
pub mod elf;
pub mod image;
pub mod initramfs;
pub mod modules;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

/// Bump when the initramfs layout changes, so existing artefacts are rebuilt.
const BOOT_FORMAT: &str = "bandsox-boot-v1";
/// Bump when the base image layout changes.
const IMAGE_FORMAT: &str = "bandsox-base-image-v1";

#[derive(Debug, Clone)]
pub struct GuestBuildOptions {
    pub state_dir: PathBuf,
    /// The static `bandsox-agent` binary (becomes the initramfs's `/init`).
    pub agent: PathBuf,
    /// Where `boot/vmlinuz-*` and `lib/modules/<ver>/` live: `/` or an extracted .deb tree.
    pub kernel_root: PathBuf,
    /// Static busybox; `None` = [`default_busybox`].
    pub busybox: Option<PathBuf>,
    /// Rebuild even if the inputs are unchanged.
    pub force: bool,
}

#[derive(Debug, Clone)]
pub struct GuestArtifacts {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_version: String,
    pub base_image: PathBuf,
    /// Whether this call (re)wrote boot/ (false: it was up to date).
    pub boot_rebuilt: bool,
    /// Whether this call (re)wrote the base image.
    pub image_rebuilt: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no guest kernel: {0}")]
    NoKernel(String),
    #[error("kernel module {name} is neither built in nor present in {dir}")]
    MissingModule { name: String, dir: PathBuf },
    #[error("{what} {path} is not a static executable ({detail}); build it with crt-static (agent/build-static.sh)")]
    NotStatic {
        what: &'static str,
        path: PathBuf,
        detail: &'static str,
    },
    #[error("busybox: {0}")]
    Busybox(String),
    #[error("{tool} failed: {detail}")]
    Tool { tool: String, detail: String },
    #[error("{0}")]
    Invalid(String),
}

impl GuestError {
    pub fn io(path: PathBuf, source: std::io::Error) -> Self {
        GuestError::Io { path, source }
    }
}

/// Build (or confirm up to date) the boot files and the base image.
pub fn build_guest(opts: &GuestBuildOptions) -> Result<GuestArtifacts, GuestError> {
    let state = &opts.state_dir;
    let boot_dir = state.join("boot");
    let image_dir = state.join("images/base");
    for d in [
        state.clone(),
        boot_dir.clone(),
        state.join("images"),
        image_dir.clone(),
    ] {
        mkdir_private(&d)?;
    }
    let _lock = lock(&state.join(".guest-build.lock"))?;

    let (kernel_src, version) = find_kernel(&opts.kernel_root)?;
    let agent = read_static(&opts.agent, "agent")?;
    let boot = BootPaths {
        kernel: boot_dir.join("vmlinuz"),
        initrd: boot_dir.join("initrd"),
        json: boot_dir.join("kernel.json"),
    };
    let boot_rebuilt = build_boot(opts, &kernel_src, &version, &agent, &boot)?;

    let busybox_path = match &opts.busybox {
        Some(p) => p.clone(),
        None => default_busybox(&opts.kernel_root)?,
    };
    let busybox = read_static(&busybox_path, "busybox")?;
    let base_image = image_dir.join("disk.ext4");
    let image_rebuilt = build_image(opts, &busybox_path, &busybox, &base_image, &image_dir)?;

    Ok(GuestArtifacts {
        kernel: boot.kernel,
        initrd: boot.initrd,
        kernel_version: version,
        base_image,
        boot_rebuilt,
        image_rebuilt,
    })
}

struct BootPaths {
    kernel: PathBuf,
    initrd: PathBuf,
    json: PathBuf,
}

fn build_boot(
    opts: &GuestBuildOptions,
    kernel_src: &Path,
    version: &str,
    agent: &[u8],
    out: &BootPaths,
) -> Result<bool, GuestError> {
    let moddir = opts.kernel_root.join("lib/modules").join(version);
    let tree = modules::ModuleTree::load(&moddir)?;
    let mods = tree.resolve(modules::GUEST_MODULES)?;
    let kernel = read(kernel_src)?;

    let mut h = Sha256::new();
    feed(&mut h, BOOT_FORMAT.as_bytes());
    feed(&mut h, version.as_bytes());
    feed(&mut h, &kernel);
    feed(&mut h, agent);
    for m in &mods {
        feed(&mut h, m.as_bytes());
        feed(&mut h, &read(&moddir.join(m))?);
    }
    let inputs = hex(&h.finalize());

    if !opts.force
        && out.kernel.is_file()
        && out.initrd.is_file()
        && recorded_inputs(&out.json).as_deref() == Some(inputs.as_str())
    {
        // Artefacts of earlier builds were owner-only: make them readable (see BOOT_MODE).
        for f in [&out.kernel, &out.initrd] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(BOOT_MODE))
                .map_err(|e| GuestError::io(f.to_path_buf(), e))?;
        }
        tracing::info!(version, "guest kernel and initramfs are up to date");
        return Ok(false);
    }

    let initrd = initramfs::write_initramfs(
        &initramfs::InitramfsContents {
            agent,
            kernel_version: version,
            module_dir: &moddir,
            modules: &mods,
        },
        Vec::new(),
    )?;
    write_atomic(&out.kernel, &kernel, BOOT_MODE)?;
    write_atomic(&out.initrd, &initrd, BOOT_MODE)?;
    let package = std::fs::read_to_string(opts.kernel_root.join(".bandsox-package"))
        .ok()
        .map(|s| s.trim().to_string());
    let json = serde_json::json!({
        "version": version,
        "kernel_sha256": hex(&Sha256::digest(&kernel)),
        "initrd_sha256": hex(&Sha256::digest(&initrd)),
        "agent_sha256": hex(&Sha256::digest(agent)),
        "modules": mods.iter().map(|m| format!("/lib/modules/{version}/{m}")).collect::<Vec<_>>(),
        "module_deps_from": tree.source,
        "kernel_source": kernel_src,
        "package": package,
        "built": now_rfc3339(),
        "inputs_sha256": inputs,
    });
    write_json(&out.json, &json)?;
    tracing::info!(
        version,
        modules = mods.len(),
        initrd_bytes = initrd.len(),
        "built the guest kernel and initramfs"
    );
    Ok(true)
}

fn build_image(
    opts: &GuestBuildOptions,
    busybox_path: &Path,
    busybox: &[u8],
    disk: &Path,
    dir: &Path,
) -> Result<bool, GuestError> {
    let mut h = Sha256::new();
    feed(&mut h, IMAGE_FORMAT.as_bytes());
    feed(&mut h, busybox);
    let inputs = hex(&h.finalize());
    let info_path = dir.join("info.json");
    if !opts.force
        && disk.is_file()
        && recorded_inputs(&info_path).as_deref() == Some(inputs.as_str())
    {
        tracing::info!("base image is up to date");
        return Ok(false);
    }
    let version = image::build_base_image(busybox_path, disk)?;
    let package = busybox_path
        .parent()
        .and_then(Path::parent)
        .and_then(|root| std::fs::read_to_string(root.join(".bandsox-package")).ok())
        .map(|s| s.trim().to_string());
    let json = serde_json::json!({
        "name": "base",
        "format": "ext4",
        "size_bytes": image::BASE_IMAGE_SIZE,
        "created": now_rfc3339(),
        "source": "busybox-static",
        "busybox": version,
        "busybox_package": package,
        "inputs_sha256": inputs,
    });
    write_json(&info_path, &json)?;
    tracing::info!(image = %disk.display(), "built the base image");
    Ok(true)
}

/// The newest `boot/vmlinuz-<ver>` under `root` that has `lib/modules/<ver>/`.
pub fn find_kernel(root: &Path) -> Result<(PathBuf, String), GuestError> {
    let boot = root.join("boot");
    let entries = std::fs::read_dir(&boot)
        .map_err(|e| GuestError::NoKernel(format!("cannot list {}: {e}", boot.display())))?;
    let mut versions: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(String::from)
        })
        .filter(|v| root.join("lib/modules").join(v).is_dir())
        .collect();
    versions.sort_by(|a, b| version_cmp(a, b));
    let v = versions.pop().ok_or_else(|| {
        GuestError::NoKernel(format!(
            "no boot/vmlinuz-<version> with a matching lib/modules/<version> under {} \
             (mount-helpers/setup extracts Debian's linux-image-cloud-amd64 into /var/cache/bandsox/kernel)",
            root.display()
        ))
    })?;
    Ok((boot.join(format!("vmlinuz-{v}")), v))
}

/// Natural order: digit runs compare as numbers ("6.1.0-10" > "6.1.0-9").
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<(bool, String)> {
        let mut out: Vec<(bool, String)> = Vec::new();
        for c in s.chars() {
            let d = c.is_ascii_digit();
            match out.last_mut() {
                Some((kind, cur)) if *kind == d => cur.push(c),
                _ => out.push((d, c.to_string())),
            }
        }
        out
    }
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord.is_ne() {
            return ord;
        }
    }
    pa.len().cmp(&pb.len())
}

/// Where to find a static busybox when none is given: next to the kernel tree
/// (`<kernel_root>/../busybox/bin/busybox`, setup's layout), the setup cache, then
/// `/bin/busybox` and `/usr/bin/busybox` if static.
pub fn default_busybox(kernel_root: &Path) -> Result<PathBuf, GuestError> {
    let mut candidates = Vec::new();
    if let Some(parent) = kernel_root.parent() {
        candidates.push(parent.join("busybox/bin/busybox"));
    }
    candidates.extend(
        [
            "/var/cache/bandsox/busybox/bin/busybox",
            "/bin/busybox",
            "/usr/bin/busybox",
        ]
        .map(PathBuf::from),
    );
    candidates
        .iter()
        .find(|p| {
            std::fs::read(p)
                .map(|b| elf::is_static(&b) == Some(true))
                .unwrap_or(false)
        })
        .cloned()
        .ok_or_else(|| {
            GuestError::Busybox(format!(
                "no static busybox found (looked at {}); pass --busybox or run mount-helpers/setup",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

fn read(p: &Path) -> Result<Vec<u8>, GuestError> {
    std::fs::read(p).map_err(|e| GuestError::io(p.to_path_buf(), e))
}

fn read_static(p: &Path, what: &'static str) -> Result<Vec<u8>, GuestError> {
    let bytes = read(p)?;
    match elf::is_static(&bytes) {
        Some(true) => Ok(bytes),
        Some(false) => Err(GuestError::NotStatic {
            what,
            path: p.to_path_buf(),
            detail: "it is dynamically linked",
        }),
        None => Err(GuestError::NotStatic {
            what,
            path: p.to_path_buf(),
            detail: "not an x86-64 ELF file",
        }),
    }
}

/// Length-prefixed, so concatenations cannot collide.
fn feed(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn recorded_inputs(json: &Path) -> Option<String> {
    let text = std::fs::read_to_string(json).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("inputs_sha256")?.as_str().map(String::from)
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn mkdir_private(d: &Path) -> Result<(), GuestError> {
    std::fs::create_dir_all(d).map_err(|e| GuestError::io(d.to_path_buf(), e))?;
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| GuestError::io(d.to_path_buf(), e))
}

/// Write `bytes` to `<path>.tmp` (0600), fsync, rename over `path`.
/// Mode of `boot/vmlinuz` and `boot/initrd`: readable by anyone who can reach them. The
/// state directory and `boot/` are owner-only (0700), so nobody reaches them by path; a
/// jailed Firecracker (an unprivileged uid) gets them as hard links in its jail, and
/// this mode lets it read them without anyone changing their owner or mode per launch.
pub const BOOT_MODE: u32 = 0o644;

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), GuestError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(GuestError::io(path.to_path_buf(), e));
    }
    Ok(())
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), GuestError> {
    let mut text =
        serde_json::to_string_pretty(v).map_err(|e| GuestError::Invalid(e.to_string()))?;
    text.push('\n');
    write_atomic(path, text.as_bytes(), 0o600)
}

/// An exclusive `flock` held until dropped.
struct Lock {
    _file: nix::fcntl::Flock<File>,
}

fn lock(path: &Path) -> Result<Lock, GuestError> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| GuestError::io(path.to_path_buf(), e))?;
    // Blocks until the lock is ours; released on drop.
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive) {
        Ok(locked) => Ok(Lock { _file: locked }),
        Err((_, e)) => Err(GuestError::io(path.to_path_buf(), e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering;

    #[test]
    fn versions_sort_naturally() {
        assert_eq!(
            version_cmp("6.1.0-10-cloud-amd64", "6.1.0-9-cloud-amd64"),
            Ordering::Greater
        );
        assert_eq!(version_cmp("6.10.0", "6.9.12"), Ordering::Greater);
        assert_eq!(version_cmp("6.1.0", "6.1.0"), Ordering::Equal);
        assert_eq!(version_cmp("6.1.0-1", "6.1.0"), Ordering::Greater);
    }

    #[test]
    fn find_kernel_picks_newest_with_modules() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("boot")).unwrap();
        for v in [
            "6.1.0-9-cloud-amd64",
            "6.1.0-10-cloud-amd64",
            "6.1.0-11-cloud-amd64",
        ] {
            std::fs::write(root.join(format!("boot/vmlinuz-{v}")), b"k").unwrap();
        }
        // -11 has no modules: not usable.
        for v in ["6.1.0-9-cloud-amd64", "6.1.0-10-cloud-amd64"] {
            std::fs::create_dir_all(root.join("lib/modules").join(v)).unwrap();
        }
        let (path, v) = find_kernel(root).unwrap();
        assert_eq!(v, "6.1.0-10-cloud-amd64");
        assert_eq!(path, root.join("boot/vmlinuz-6.1.0-10-cloud-amd64"));
        assert!(matches!(
            find_kernel(&root.join("nope")),
            Err(GuestError::NoKernel(_))
        ));
    }

    #[test]
    fn dynamic_agent_is_refused() {
        if !Path::new("/bin/sh").exists() {
            return;
        }
        assert!(matches!(
            read_static(Path::new("/bin/sh"), "agent"),
            Err(GuestError::NotStatic {
                detail: "it is dynamically linked",
                ..
            })
        ));
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("x");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert!(matches!(
            read_static(&script, "agent"),
            Err(GuestError::NotStatic { .. })
        ));
    }

    /// The whole build against the real kernel tree and busybox, when setup extracted them
    /// (the agent is stood in for by busybox: any static binary will do for the layout).
    #[test]
    fn full_build_is_idempotent() {
        let kroot = Path::new("/var/cache/bandsox/kernel");
        let bb = Path::new("/var/cache/bandsox/busybox/bin/busybox");
        if !kroot.is_dir() || !bb.is_file() || crate::tools::find_tool("mkfs.ext4").is_none() {
            eprintln!(
                "SKIP full_build_is_idempotent: needs /var/cache/bandsox/{{kernel,busybox}} and mkfs.ext4 \
                 (run mount-helpers/setup --deps-only)"
            );
            return;
        }
        let state = tempfile::tempdir().unwrap();
        let opts = GuestBuildOptions {
            state_dir: state.path().join("state"),
            agent: bb.to_path_buf(),
            kernel_root: kroot.to_path_buf(),
            busybox: Some(bb.to_path_buf()),
            force: false,
        };
        let a = build_guest(&opts).unwrap();
        assert!(a.boot_rebuilt && a.image_rebuilt);
        let kjson: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(state.path().join("state/boot/kernel.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(kjson["version"], a.kernel_version.as_str());
        let mods: Vec<String> = kjson["modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap().to_string())
            .collect();
        assert!(mods.iter().any(|m| m.ends_with("/virtio_mmio.ko")));
        let meta = std::fs::metadata(&a.base_image).unwrap();
        assert_eq!(meta.len(), image::BASE_IMAGE_SIZE);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < 64 << 20,
            "base image not sparse: {}",
            meta.blocks() * 512
        );
        assert_eq!(
            std::fs::metadata(state.path().join("state/boot"))
                .unwrap()
                .mode()
                & 0o777,
            0o700
        );
        let info: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(state.path().join("state/images/base/info.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(info["name"], "base");
        assert_eq!(info["size_bytes"], image::BASE_IMAGE_SIZE);

        // The image's contents, read back without mounting.
        let out = std::process::Command::new(crate::tools::find_tool("debugfs").unwrap())
            .args(["-R", "ls -l /bin"])
            .arg(&a.base_image)
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            listing.contains("busybox") && listing.contains(" sh"),
            "{listing}"
        );

        let b = build_guest(&opts).unwrap();
        assert!(
            !b.boot_rebuilt && !b.image_rebuilt,
            "second build should be a no-op"
        );
        let c = build_guest(&GuestBuildOptions {
            force: true,
            ..opts
        })
        .unwrap();
        assert!(c.boot_rebuilt && c.image_rebuilt);
    }
}
