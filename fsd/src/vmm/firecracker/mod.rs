//! Firecracker backend: one `firecracker` process per VM, driven over its API socket,
//! the agent reached through hybrid vsock.
//!
//! Supported versions: **1.8 and later**. The guest kernel (Debian's cloud kernel) lacks
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, so it finds virtio-mmio devices only through
//! ACPI, which Firecracker provides from 1.8 on; older releases describe devices on the
//! kernel command line and the guest would see no disk and no vsock. Every request body
//! used at launch exists unchanged from 1.8 on (see `model.rs`); snapshot-load fields
//! that came later (`network_overrides` 1.12, `vsock_override` 1.16) are gated by
//! [`FcVersion`]. Releases up to 1.16 boot only an ELF `vmlinux`, so the bzImage is
//! converted once ([`kernel`]); the ELF is also used with newer releases.
//!
//! Files in a VM directory (all created by this backend unless noted):
//! ```text
//! firecracker.json  argv (argv[0] = the binary or the jailer; jailed, `--exec-file` is
//!                   the binary with symlinks resolved, as the jailer resolves it),
//!                   version (as the binary prints it, suffix included), snapshot
//!                   format, time, jail; written before start; `adopt` compares it with
//!                   /proc/<pid>/cmdline, so a VM started before a `firecracker` link was
//!                   moved is recognised by what it was started with
//! vmm.pid           the Firecracker pid (written by us after spawning; removed once the
//!                   process we reaped or killed is gone)
//! vmm.log           Firecracker's stderr (appended across restarts): panics, fatal
//!                   start-up errors
//! console.log       the guest serial console = Firecracker's stdout (appended); only
//!                   guest output, because Firecracker's own log goes to firecracker.log
//!                   from its first line (`--log-path` on its command line)
//! firecracker.log   Firecracker's logger (level Info, with levels); the previous run's
//!                   is kept as firecracker.log.1
//! metrics.json      Firecracker's metrics, one JSON object per flush
//! api.sock          the API socket (server: Firecracker)            [jail root if jailed]
//! vsock.sock        hybrid vsock (server: Firecracker); `CONNECT 52` reaches the agent
//!                                                                   [jail root if jailed]
//! disk.ext4         not ours: the VM's disk, from VmSpec::disk (virtio-blk, /dev/vda)
//! jail/             jailer mode only: the jail, rebuilt at every start (see `jailer.rs`)
//! ```
//! The backend is split by concern: `version.rs` asks a binary what it is, `launch.rs`
//! starts one for a VM (argv, the VM directory, spawning, configuration through the API,
//! `firecracker.json`), `instance.rs` is a running one (adoption, control, what went
//! wrong); `api.rs`, `model.rs`, `jailer.rs`, `kernel.rs` and `vsock.rs` serve them. This
//! file holds the constants, detection and the `Backend` impl.
//!
//! Invariants:
//! - Firecracker runs in its own session (`setsid`), cwd = the VM directory (the jail
//!   root once jailed), stdin `/dev/null`, every inherited fd above 2 close-on-exec.
//! - Paths inside the VM directory are given to Firecracker *relative* to its cwd
//!   (`vsock.sock`, `disk.ext4`, logs), so a snapshot restored into another VM directory,
//!   or another jail, refers to that directory's own files. Unjailed, the API socket is
//!   absolute in argv, which makes the command line name its VM (`adopt` relies on it).
//! - Logger and metrics are configured on the command line, never through the API: so
//!   nothing but guest output ever reaches `console.log`, and a snapshot load needs no
//!   request before `/snapshot/load`.
//! - A process we spawned is reaped by a dedicated thread; for an adopted one `is_alive`
//!   reads `/proc/<pid>/stat` and checks the start time, as in the QEMU backend.
//! - `launch` returns after `InstanceStart` succeeded. Any failure before kills the
//!   process and reports `StartFailed` with Firecracker's `fault_message` verbatim, or,
//!   when the process died, its exit status and its last error line
//!   ([`FcInstance::exit_reason`]); the same reason is given when it dies later.
//! - Every API call has a deadline (`api.rs`); `connect_agent` is callable any number of
//!   times (one fresh vsock connection each).
//! - A snapshot records the Firecracker version that wrote it and its snapshot data
//!   format; a restore whose Firecracker cannot read that format is refused before any
//!   process starts ([`snapshot::check_loadable`]).
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

use super::accel::{self, Accel, AccelKind};
use super::process::{locate_binary, require_file};
use super::{Backend, BackendKind, NetMode, VmSpec, VmmError, VmmInstance};

pub mod api;
mod instance;
pub mod jailer;
pub mod kernel;
mod launch;
pub mod model;
use crate::snapshots::firecracker as snapshot;
mod version;
pub mod vsock;

pub use instance::{adopt_dir, last_error_line, FcInstance};
pub(crate) use launch::prepare_dir;
pub use launch::{load_record, log_args, FcRecord};
pub use version::{format_text, run_binary, version_text, FcVersion};

pub const FIRECRACKER_BINARY: &str = "firecracker";
/// Environment variable naming the Firecracker binary to use instead of the one on PATH.
pub const FIRECRACKER_ENV: &str = "BANDSOX_FIRECRACKER";
/// Test-only: `1` offers the Firecracker backend even where KVM cannot run ordinary
/// guests (such a guest never boots; tests pause or kill it at once). Nothing else
/// changes; `info`, `events` and the daemon log say that it was forced.
pub const FORCE_ENV: &str = "BANDSOX_FORCE_FIRECRACKER";
/// Oldest supported release (ACPI device discovery; see the module docs).
pub const MIN_VERSION: FcVersion = FcVersion {
    major: 1,
    minor: 8,
    patch: 0,
};
pub const RECORD_FILE: &str = "firecracker.json";
pub const API_SOCK: &str = "api.sock";
pub const VSOCK_SOCK: &str = "vsock.sock";
pub const VMM_LOG: &str = "vmm.log";
pub const FC_LOG: &str = "firecracker.log";
pub const METRICS_FILE: &str = "metrics.json";
pub const CONSOLE_LOG: &str = "console.log";
/// The guest's vsock context id (any value ≥ 3; each VM has its own device).
pub const GUEST_CID: u32 = 3;
/// The one network interface's id (`net=tap`); the guest sees it as `eth0`.
pub const NET_IFACE_ID: &str = "eth0";
/// The disk's drive id (and `/dev/vda` in the guest: the only drive).
pub const DRIVE_ID: &str = "vda";

/// How long `launch` waits for the API socket to answer.
pub(crate) const API_READY_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline of one API call during launch and control.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// `InstanceStart` loads the kernel and initramfs first: allow longer.
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct FirecrackerBackend {
    binary: PathBuf,
    version: FcVersion,
    /// As the binary prints it, suffix included.
    version_text: String,
    /// The snapshot data format this binary writes and reads (`--snapshot-version`).
    snapshot_format: Option<FcVersion>,
    accel_reason: String,
    /// `Some(why)`: offered although KVM cannot run ordinary guests ([`FORCE_ENV`]).
    forced: Option<String>,
    /// `Some`: start every VM through the jailer ([`jailer`]).
    jailer: Option<jailer::JailerConfig>,
}

/// A jailed instance's jail (what snapshots and cleanup need).
#[derive(Debug, Clone)]
pub(crate) struct Jail {
    pub(crate) root: PathBuf,
    /// The binary the jailer runs (resolved), which named `root`.
    exec: jailer::ExecFile,
    uid: u32,
    gid: u32,
    id: String,
    cgroups: jailer::JailCgroups,
}

/// Where one launch's files are, as Firecracker is told them.
struct Runtime {
    /// Firecracker's cwd: its sockets (the VM directory, or the jail root).
    root: PathBuf,
    kernel: String,
    initrd: String,
    disk: Option<String>,
    jail: Option<Jail>,
}

impl FirecrackerBackend {
    /// Find Firecracker (`$BANDSOX_FIRECRACKER`, else `firecracker` on PATH), check its
    /// version and that KVM can run ordinary guests here (or that [`FORCE_ENV`] forces
    /// it), and whether to jail it ([`jailer::JailerConfig::from_env`]).
    pub fn detect() -> Result<Self, VmmError> {
        let binary = locate_binary(FIRECRACKER_ENV, FIRECRACKER_BINARY, None)?;
        let force = std::env::var(FORCE_ENV).is_ok_and(|v| v == "1");
        let mut b = Self::probe(binary)?.check_host(&accel::detect(), force)?;
        b.jailer = jailer::JailerConfig::from_env(&b.binary)?;
        Ok(b)
    }

    /// The binary at `binary`: its version (1.8 or later) and snapshot format, without
    /// looking at KVM (contract tests drive real binaries on hosts whose KVM cannot run
    /// guests).
    pub fn probe(binary: PathBuf) -> Result<Self, VmmError> {
        require_file(&binary)?;
        let run = |arg: &str| -> Result<String, VmmError> {
            let (_, out) = run_binary(&binary, &[arg.as_ref()]).map_err(|e| {
                VmmError::Unavailable(format!("cannot run {} {arg}: {e}", binary.display()))
            })?;
            Ok(out)
        };
        let text = run("--version")?;
        // `--snapshot-version` exists in every supported release; an older or odd build
        // without it just leaves the format unknown (restores then are not pre-checked).
        let format = run("--snapshot-version").ok().and_then(|t| format_text(&t));
        let mut b = Self::evaluate(binary, &text)?;
        b.snapshot_format = format;
        Ok(b)
    }

    /// The version part of [`probe`](Self::probe), from `--version` output.
    pub fn evaluate(binary: PathBuf, version_output: &str) -> Result<Self, VmmError> {
        let (version, version_text) = version_text(version_output)
            .and_then(|t| FcVersion::parse(&t).map(|v| (v, t)))
            .ok_or_else(|| {
                VmmError::Unavailable(format!(
                    "cannot read the version of {} from {:?}",
                    binary.display(),
                    version_output.lines().next().unwrap_or("")
                ))
            })?;
        if version < MIN_VERSION {
            return Err(VmmError::Unavailable(format!(
                "Firecracker {version_text} at {} is too old: BandSox needs {MIN_VERSION} or \
                 later (the guest kernel finds virtio devices only through ACPI, added in 1.8)",
                binary.display()
            )));
        }
        Ok(FirecrackerBackend {
            binary,
            version,
            version_text,
            snapshot_format: None,
            accel_reason: "not checked".into(),
            forced: None,
            jailer: None,
        })
    }

    /// Accept this host's KVM: it must run ordinary guests, unless `force` (test only).
    pub fn check_host(mut self, accel: &Accel, force: bool) -> Result<Self, VmmError> {
        self.accel_reason = accel.reason.clone();
        if accel.kind != AccelKind::Kvm {
            if !force {
                return Err(VmmError::Unavailable(format!(
                    "Firecracker {} needs KVM that runs ordinary guests, and this host has \
                     none: {} ({FORCE_ENV}=1 forces it, for tests only)",
                    self.version_text, accel.reason
                )));
            }
            let why = format!(
                "{FORCE_ENV}=1 (test only: KVM here cannot run ordinary guests, {})",
                accel.reason
            );
            tracing::warn!("Firecracker backend forced: {why}");
            self.forced = Some(why);
        }
        Ok(self)
    }

    /// Start VMs through the jailer (or not, with `None`).
    pub fn with_jailer(mut self, jailer: Option<jailer::JailerConfig>) -> Self {
        self.jailer = jailer;
        self
    }

    pub fn version(&self) -> FcVersion {
        self.version
    }

    /// The version as the binary prints it (`1.17.0-dev`).
    pub fn version_text(&self) -> &str {
        &self.version_text
    }

    /// The snapshot data format this binary writes and loads, when known.
    pub fn snapshot_format(&self) -> Option<FcVersion> {
        self.snapshot_format
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    pub fn jailer(&self) -> Option<&jailer::JailerConfig> {
        self.jailer.as_ref()
    }
}

/// The guest kernel command line: QEMU's essentials plus Firecracker's usual
/// `reboot=k panic=1` (a guest reboot or panic ends the Firecracker process).
pub fn kernel_cmdline(spec: &VmSpec) -> String {
    format!(
        "console=ttyS0 reboot=k panic=1 pci=off loglevel=4 8250.nr_uarts=1 cryptomgr.notests{} \
         bandsox.name={}",
        spec.net_cmdline(),
        spec.name
    )
}

pub(crate) fn validate(spec: &VmSpec) -> Result<(), VmmError> {
    if spec.name.is_empty()
        || spec
            .name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"')
    {
        return Err(VmmError::StartFailed(format!(
            "VM name {:?} cannot be passed on the kernel command line",
            spec.name
        )));
    }
    if !(1..=32).contains(&spec.vcpus) || spec.memory_mib == 0 {
        return Err(VmmError::StartFailed(
            "Firecracker needs 1-32 vcpus and at least 1 MiB of memory".into(),
        ));
    }
    match spec.net_mode() {
        NetMode::None | NetMode::Tap => Ok(()),
        NetMode::User => Err(VmmError::Unavailable(
            "net=user needs the qemu backend (Firecracker has no user-mode networking); \
             use net=tap (root) or net=none"
                .into(),
        )),
    }
}

#[async_trait]
impl Backend for FirecrackerBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Firecracker
    }

    fn describe(&self) -> String {
        // A link shows what it resolves to now (what a jailed start runs).
        let binary = match std::fs::canonicalize(&self.binary) {
            Ok(r) if r != self.binary => format!("{} -> {}", self.binary.display(), r.display()),
            _ => self.binary.display().to_string(),
        };
        format!(
            "Firecracker {} ({binary}, snapshot format {}) with kvm: {}; guest kernel: ELF \
             vmlinux extracted from the bzImage; {}{}",
            self.version_text,
            self.snapshot_format
                .map(|f| format!("v{f}"))
                .unwrap_or_else(|| "unknown".into()),
            self.accel_reason,
            match &self.jailer {
                Some(j) => format!("jailed by {} as {}:{}", j.binary.display(), j.uid, j.gid),
                None => "unjailed".into(),
            },
            match &self.forced {
                Some(why) => format!("; FORCED by {why}"),
                None => String::new(),
            }
        )
    }

    fn forced(&self) -> Option<String> {
        self.forced.clone()
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn VmmInstance>, VmmError> {
        validate(spec)?;
        spec.check_files()?;
        let kernel = spec.kernel.clone();
        let vmlinux = tokio::task::spawn_blocking(move || kernel::ensure_vmlinux(&kernel))
            .await
            .map_err(|e| VmmError::StartFailed(format!("kernel extraction: {e}")))?
            .map_err(|e| VmmError::StartFailed(e.to_string()))?;
        if let Some(jail) = &self.jailer {
            tracing::debug!(name = %spec.name, "launching Firecracker through the jailer");
            return Ok(Box::new(self.launch_jailed(spec, jail, &vmlinux).await?));
        }
        let argv = self.build_argv(&spec.dir)?;
        tracing::debug!(name = %spec.name, ?argv, "launching Firecracker");
        Ok(Box::new(self.launch_argv(spec, argv, &vmlinux).await?))
    }

    fn can_snapshot(&self) -> bool {
        true
    }

    fn check_restore(
        &self,
        snap_dir: &Path,
        saved: &crate::vmm::SavedState,
    ) -> Result<(), VmmError> {
        snapshot::check_loadable(self, snap_dir, saved)
    }

    async fn restore(
        &self,
        spec: &VmSpec,
        snap_dir: &Path,
        saved: &crate::vmm::SavedState,
    ) -> Result<Box<dyn VmmInstance>, VmmError> {
        Ok(Box::new(
            snapshot::restore(self, spec, snap_dir, saved).await?,
        ))
    }

    async fn adopt(&self, spec: &VmSpec) -> Result<Option<Box<dyn VmmInstance>>, VmmError> {
        let Some(inst) = adopt_dir(&spec.dir) else {
            return Ok(None);
        };
        match inst.api.instance_info().await {
            Ok(info) => {
                tracing::info!(pid = inst.pid(), state = %info.state, "adopted Firecracker answers")
            }
            Err(e) => tracing::warn!(
                pid = inst.pid(),
                "adopted Firecracker's API does not answer: {e}"
            ),
        }
        Ok(Some(Box::new(inst)))
    }
}

fn utf8(p: &Path) -> Result<String, VmmError> {
    p.to_str()
        .map(String::from)
        .ok_or_else(|| VmmError::StartFailed(format!("path {} is not UTF-8", p.display())))
}

#[cfg(test)]
mod tests;
