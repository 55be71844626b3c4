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
//! firecracker.json  argv (argv[0] = the binary), version and time; written before start;
//!                   `adopt` compares it with /proc/<pid>/cmdline
//! vmm.pid           the Firecracker pid (written by us after spawning; removed once the
//!                   process we reaped or killed is gone)
//! vmm.log           Firecracker's stderr (appended across restarts)
//! console.log       the guest serial console = Firecracker's stdout (appended)
//! firecracker.log   Firecracker's logger (PUT /logger); the previous run's is kept as
//!                   firecracker.log.1
//! metrics.json      Firecracker's metrics (PUT /metrics), one JSON object per flush
//! api.sock          the API socket (server: Firecracker)
//! vsock.sock        hybrid vsock (server: Firecracker); `CONNECT 52` reaches the agent
//! disk.ext4         not ours: the VM's disk, from VmSpec::disk (virtio-blk, /dev/vda)
//! ```
//! Invariants:
//! - Firecracker runs in its own session (`setsid`), cwd = the VM directory, stdin
//!   `/dev/null`, every inherited fd above 2 close-on-exec.
//! - Paths inside the VM directory are given to Firecracker *relative* to its cwd
//!   (`vsock.sock`, `disk.ext4`, logs), so a snapshot restored into another VM directory
//!   refers to that directory's own files. The API socket is absolute in argv, which
//!   makes the command line name its VM (`adopt` relies on it).
//! - A process we spawned is reaped by a dedicated thread; for an adopted one `is_alive`
//!   reads `/proc/<pid>/stat` and checks the start time, as in the QEMU backend.
//! - `launch` returns after `InstanceStart` succeeded. Any failure before kills the
//!   process and reports `StartFailed` with Firecracker's `fault_message` verbatim, or,
//!   when the process died, the last lines of its stderr, logger and console.
//! - Every API call has a deadline (`api.rs`); `connect_agent` is callable any number of
//!   times (one fresh vsock connection each).
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::accel::{self, Accel, AccelKind};
use super::process::{write_atomic, VmmProcess};
use super::qemu::{check_socket_path, find_in_path, log_tail};
use super::{Backend, BackendKind, BoxedAgentStream, NetMode, VmSpec, VmmError, VmmInstance};

pub mod api;
pub mod jailer;
pub mod kernel;
pub mod model;
pub mod snapshot;
pub mod vsock;

use api::{ApiClient, ApiError};
use model::{
    ActionType, BootSource, CacheType, Drive, EntropyDevice, LogLevel, Logger,
    MachineConfiguration, Metrics, NetworkInterface, VmStateRequest, Vsock,
};

pub const FIRECRACKER_BINARY: &str = "firecracker";
/// Environment variable naming the Firecracker binary to use instead of the one on PATH.
pub const FIRECRACKER_ENV: &str = "BANDSOX_FIRECRACKER";
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
/// The guest's vsock context id (any value ≥ 3; each VM has its own device).
pub const GUEST_CID: u32 = 3;
/// The one network interface's id (`net=tap`); the guest sees it as `eth0`.
pub const NET_IFACE_ID: &str = "eth0";
/// The disk's drive id (and `/dev/vda` in the guest: the only drive).
pub const DRIVE_ID: &str = "vda";

/// How long `launch` waits for the API socket to answer.
const API_READY_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline of one API call during launch and control.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// `InstanceStart` loads the kernel and initramfs first: allow longer.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Window of one `connect_agent` call (the caller retries until its own deadline).
const AGENT_CONNECT_WINDOW: Duration = Duration::from_millis(1500);

/// A Firecracker release number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FcVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl std::fmt::Display for FcVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl FcVersion {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        FcVersion {
            major,
            minor,
            patch,
        }
    }

    /// `1.10.1`, `v1.10.1`, `1.17.0-dev`, `1.7.0-dirty`: the numeric part only.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim().trim_start_matches('v');
        let core = s.split(['-', '+', ' ']).next()?;
        let mut it = core.split('.');
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        let patch = it.next().map(|p| p.parse().ok()).unwrap_or(Some(0))?;
        if it.next().is_some() {
            return None;
        }
        Some(FcVersion::new(major, minor, patch))
    }

    /// The version in `firecracker --version` output (`Firecracker v1.10.1`, then
    /// possibly more lines).
    pub fn from_version_output(text: &str) -> Option<Self> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("Firecracker v"))
            .find_map(FcVersion::parse)
    }

    /// `network_overrides` on snapshot load.
    pub fn has_network_overrides(self) -> bool {
        self >= FcVersion::new(1, 12, 0)
    }

    /// `vsock_override` on snapshot load.
    pub fn has_vsock_override(self) -> bool {
        self >= FcVersion::new(1, 16, 0)
    }
}

/// What `firecracker.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FcRecord {
    /// Full argv; `argv[0]` is the binary's path.
    pub argv: Vec<String>,
    pub version: String,
    /// The ELF kernel booted.
    pub kernel: String,
    /// RFC 3339.
    pub created: String,
    /// Jailer mode: the jail root (Firecracker's `/`, holding its sockets and logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail_root: Option<String>,
}

pub fn load_record(dir: &Path) -> Option<FcRecord> {
    let text = std::fs::read_to_string(dir.join(RECORD_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

pub struct FirecrackerBackend {
    binary: PathBuf,
    version: FcVersion,
    accel_reason: String,
    /// `Some`: start every VM through the jailer ([`jailer`]).
    jailer: Option<jailer::JailerConfig>,
}

/// Where one launch's files are, as Firecracker is told them.
struct Runtime {
    /// Firecracker's cwd: sockets, logger and metrics files.
    root: PathBuf,
    kernel: String,
    initrd: String,
    disk: Option<String>,
    /// Jailer mode: files Firecracker opens must belong to this uid/gid.
    owner: Option<(u32, u32)>,
}

impl FirecrackerBackend {
    /// Find Firecracker (`$BANDSOX_FIRECRACKER`, else `firecracker` on PATH), check its
    /// version and that KVM can run ordinary guests here.
    pub fn detect() -> Result<Self, VmmError> {
        let binary = match std::env::var_os(FIRECRACKER_ENV).filter(|v| !v.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => find_in_path(FIRECRACKER_BINARY).ok_or_else(|| {
                VmmError::Unavailable(format!(
                    "{FIRECRACKER_BINARY} not found on PATH (or set {FIRECRACKER_ENV})"
                ))
            })?,
        };
        if !binary.is_file() {
            return Err(VmmError::Unavailable(format!(
                "{} does not exist",
                binary.display()
            )));
        }
        let out = Command::new(&binary)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                VmmError::Unavailable(format!("cannot run {} --version: {e}", binary.display()))
            })?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut b = Self::evaluate(binary, &text, &accel::detect())?;
        b.jailer = jailer::JailerConfig::from_env()?;
        Ok(b)
    }

    /// Start VMs through the jailer (or not, with `None`).
    pub fn with_jailer(mut self, jailer: Option<jailer::JailerConfig>) -> Self {
        self.jailer = jailer;
        self
    }

    /// The decision of [`detect`](Self::detect), from its inputs.
    pub fn evaluate(
        binary: PathBuf,
        version_output: &str,
        accel: &Accel,
    ) -> Result<Self, VmmError> {
        let version = FcVersion::from_version_output(version_output).ok_or_else(|| {
            VmmError::Unavailable(format!(
                "cannot read the version of {} from {:?}",
                binary.display(),
                version_output.lines().next().unwrap_or("")
            ))
        })?;
        if version < MIN_VERSION {
            return Err(VmmError::Unavailable(format!(
                "Firecracker {version} at {} is too old: BandSox needs {MIN_VERSION} or later \
                 (the guest kernel finds virtio devices only through ACPI, added in 1.8)",
                binary.display()
            )));
        }
        if accel.kind != AccelKind::Kvm {
            return Err(VmmError::Unavailable(format!(
                "Firecracker {version} needs KVM that runs ordinary guests, and this host has \
                 none: {}",
                accel.reason
            )));
        }
        Ok(FirecrackerBackend {
            binary,
            version,
            accel_reason: accel.reason.clone(),
            jailer: None,
        })
    }

    pub fn version(&self) -> FcVersion {
        self.version
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Firecracker's argv for the VM in `dir` (argv[0] = the binary).
    pub fn build_argv(&self, dir: &Path) -> Result<Vec<String>, VmmError> {
        let api = dir.join(API_SOCK);
        check_socket_path(&api)?;
        check_socket_path(&dir.join(VSOCK_SOCK))?;
        let mut argv = vec![utf8(&self.binary)?, "--api-sock".into(), utf8(&api)?];
        // The instance id shows in Firecracker's logs; its rule: 1-64 of [A-Za-z0-9-].
        if let Some(id) = dir.file_name().and_then(|n| n.to_str()) {
            if !id.is_empty()
                && id.len() <= 60
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                argv.extend(["--id".into(), format!("bx-{id}")]);
            }
        }
        Ok(argv)
    }

    /// Start Firecracker with `argv` in `spec.dir` and configure and start the VM
    /// booting `vmlinux`. Used by [`Backend::launch`] and by tests with fake processes.
    pub async fn launch_argv(
        &self,
        spec: &VmSpec,
        argv: Vec<String>,
        vmlinux: &Path,
    ) -> Result<FcInstance, VmmError> {
        let rt = Runtime {
            root: spec.dir.clone(),
            kernel: vmlinux.display().to_string(),
            initrd: spec.initrd.display().to_string(),
            disk: spec.disk.as_ref().map(|d| dir_relative(&spec.dir, d)),
            owner: None,
        };
        self.launch_runtime(spec, argv, vmlinux, rt).await
    }

    /// Jailer mode: link the boot files and disk into the jail and start the jailer.
    pub async fn launch_jailed(
        &self,
        spec: &VmSpec,
        jail: &jailer::JailerConfig,
        vmlinux: &Path,
    ) -> Result<FcInstance, VmmError> {
        let root = jail.root(&spec.dir, &self.binary)?;
        check_socket_path(&root.join(API_SOCK))?;
        check_socket_path(&root.join(VSOCK_SOCK))?;
        let mut files = vec![
            (vmlinux, jailer::JAIL_KERNEL),
            (spec.initrd.as_path(), jailer::JAIL_INITRD),
        ];
        if let Some(d) = &spec.disk {
            files.push((d.as_path(), jailer::JAIL_DISK));
        }
        jail.prepare(&root, &files)?;
        let rt = Runtime {
            root,
            kernel: jailer::JAIL_KERNEL.into(),
            initrd: jailer::JAIL_INITRD.into(),
            disk: spec.disk.as_ref().map(|_| jailer::JAIL_DISK.into()),
            owner: Some((jail.uid, jail.gid)),
        };
        let argv = jail.argv(&self.binary, &spec.dir)?;
        self.launch_runtime(spec, argv, vmlinux, rt).await
    }

    async fn launch_runtime(
        &self,
        spec: &VmSpec,
        argv: Vec<String>,
        vmlinux: &Path,
        rt: Runtime,
    ) -> Result<FcInstance, VmmError> {
        let t0 = Instant::now();
        let dir = &spec.dir;
        let logs = prepare_dir(dir, &rt)?;
        let record = FcRecord {
            argv: argv.clone(),
            version: self.version.to_string(),
            kernel: vmlinux.display().to_string(),
            created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            jail_root: rt.owner.map(|_| rt.root.display().to_string()),
        };
        write_atomic(
            &dir.join(RECORD_FILE),
            &serde_json::to_vec_pretty(&record).unwrap_or_default(),
        )?;
        let inst = spawn(dir, &rt.root, &argv)?;
        let result = async {
            inst.wait_api(t0 + API_READY_DEADLINE).await?;
            configure(&inst.api, spec, &rt).await?;
            inst.api
                .clone()
                .with_timeout(START_TIMEOUT)
                .action(ActionType::InstanceStart)
                .await
        }
        .await;
        if let Err(e) = result {
            // A refusal comes from a living process; any other failure may be its death
            // (the reaper may need a moment to notice it).
            let died = !matches!(e, ApiError::Fault { .. })
                && inst.wait_exit(Duration::from_millis(300)).await;
            let why = if died {
                inst.death_report(&logs)
            } else {
                match &e {
                    ApiError::Fault {
                        request, message, ..
                    } => format!("Firecracker refused {request}: {message}"),
                    other => format!(
                        "Firecracker API: {other}; stderr: {}",
                        log_tail(&dir.join(VMM_LOG), logs.vmm_log, 5)
                    ),
                }
            };
            let _ = inst.kill().await;
            tracing::warn!(dir = %dir.display(), "Firecracker launch failed: {why}");
            return Err(VmmError::StartFailed(why));
        }
        tracing::info!(
            pid = inst.pid(),
            dir = %dir.display(),
            version = %self.version,
            ms = t0.elapsed().as_millis() as u64,
            "Firecracker started"
        );
        Ok(inst)
    }
}

/// Where each log stood before this launch, so errors quote only this run's lines.
#[derive(Debug, Clone, Default)]
struct LogStarts {
    vmm_log: u64,
    console: u64,
}

/// Create the files Firecracker needs in its root (it opens its logger and metrics
/// files without creating them; jailed, they must be its own) and remove stale sockets.
fn prepare_dir(dir: &Path, rt: &Runtime) -> Result<LogStarts, VmmError> {
    let io = |p: &Path, e| VmmError::Io(p.display().to_string(), e);
    let root = &rt.root;
    for s in [API_SOCK, VSOCK_SOCK] {
        let p = root.join(s);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&p, e)),
        }
    }
    let fc_log = root.join(FC_LOG);
    if std::fs::metadata(&fc_log)
        .map(|m| m.len() > 0)
        .unwrap_or(false)
    {
        let old = root.join(format!("{FC_LOG}.1"));
        std::fs::rename(&fc_log, &old).map_err(|e| io(&fc_log, e))?;
    }
    for f in [FC_LOG, METRICS_FILE] {
        let p = root.join(f);
        std::fs::File::create(&p).map_err(|e| io(&p, e))?;
        if let Some((uid, gid)) = rt.owner {
            std::os::unix::fs::chown(&p, Some(uid), Some(gid)).map_err(|e| io(&p, e))?;
        }
    }
    let len = |f: &str| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0);
    Ok(LogStarts {
        vmm_log: len(VMM_LOG),
        console: len("console.log"),
    })
}

/// Spawn `argv` in its own session in `dir`, stdout → console.log, stderr → vmm.log; write
/// the pid file and start the reaper. `root` is where Firecracker's sockets will be.
fn spawn(dir: &Path, root: &Path, argv: &[String]) -> Result<FcInstance, VmmError> {
    let (program, rest) = argv
        .split_first()
        .ok_or_else(|| VmmError::StartFailed("empty Firecracker command line".into()))?;
    let open_append = |p: PathBuf| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(|e| VmmError::Io(p.display().to_string(), e))
    };
    let console = open_append(dir.join("console.log"))?;
    let vmm_log = open_append(dir.join(VMM_LOG))?;
    let mut cmd = Command::new(program);
    cmd.args(rest)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(vmm_log);
    let proc = VmmProcess::spawn(cmd, "Firecracker", dir.join("vmm.pid"), true)?;
    Ok(FcInstance::new(proc, dir, root))
}

/// Logger and metrics: the only configuration allowed before a snapshot load.
async fn configure_logging(api: &ApiClient) -> Result<(), ApiError> {
    api.put_logger(&Logger {
        log_path: Some(FC_LOG.into()),
        level: Some(LogLevel::Info),
        show_level: Some(true),
        show_log_origin: Some(false),
    })
    .await?;
    api.put_metrics(&Metrics {
        metrics_path: METRICS_FILE.into(),
    })
    .await
}

/// The launch-time configuration, in Firecracker's documented order.
async fn configure(api: &ApiClient, spec: &VmSpec, rt: &Runtime) -> Result<(), ApiError> {
    configure_logging(api).await?;
    api.put_boot_source(&BootSource {
        kernel_image_path: rt.kernel.clone(),
        boot_args: Some(kernel_cmdline(spec)),
        initrd_path: Some(rt.initrd.clone()),
    })
    .await?;
    api.put_machine_config(&MachineConfiguration {
        vcpu_count: spec.vcpus,
        mem_size_mib: spec.memory_mib,
        smt: None,
        track_dirty_pages: None,
    })
    .await?;
    if let Some(disk) = &rt.disk {
        api.put_drive(&Drive {
            drive_id: DRIVE_ID.into(),
            path_on_host: disk.clone(),
            // The agent mounts /dev/vda itself from the initramfs.
            is_root_device: false,
            is_read_only: false,
            // Honour guest flushes (Firecracker's default `Unsafe` drops them).
            cache_type: Some(CacheType::Writeback),
            io_engine: None,
            partuuid: None,
        })
        .await?;
    }
    api.put_vsock(&Vsock {
        guest_cid: GUEST_CID,
        uds_path: VSOCK_SOCK.into(),
    })
    .await?;
    if let Some(tap) = spec
        .net
        .as_ref()
        .and_then(|n| n.tap.as_ref().map(|t| (n, t)))
    {
        let (net, tap) = tap;
        api.put_network_interface(&NetworkInterface {
            iface_id: NET_IFACE_ID.into(),
            host_dev_name: tap.ifname.clone(),
            guest_mac: Some(net.mac.clone()),
        })
        .await?;
    }
    api.put_entropy(&EntropyDevice {}).await?;
    Ok(())
}

/// `p` relative to `dir` when it lies directly in it, else `p` as it is.
fn dir_relative(dir: &Path, p: &Path) -> String {
    match p.strip_prefix(dir) {
        Ok(rel) if rel.components().count() == 1 => rel.display().to_string(),
        _ => p.display().to_string(),
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

fn validate(spec: &VmSpec) -> Result<(), VmmError> {
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
        format!(
            "Firecracker {} ({}) with kvm: {}; guest kernel: ELF vmlinux extracted from the bzImage{}",
            self.version,
            self.binary.display(),
            self.accel_reason,
            match &self.jailer {
                Some(j) => format!(
                    "; jailed by {} as {}:{}",
                    j.binary.display(),
                    j.uid,
                    j.gid
                ),
                None => String::new(),
            }
        )
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn VmmInstance>, VmmError> {
        validate(spec)?;
        for (what, p) in [("kernel", &spec.kernel), ("initramfs", &spec.initrd)] {
            if !p.is_file() {
                return Err(VmmError::StartFailed(format!(
                    "guest {what} {} is missing (run `bandsox guest-build` or mount-helpers/setup)",
                    p.display()
                )));
            }
        }
        if let Some(d) = &spec.disk {
            if !d.is_file() {
                return Err(VmmError::StartFailed(format!(
                    "disk {} is missing",
                    d.display()
                )));
            }
        }
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

/// Re-attach to the Firecracker whose pid is in `<dir>/vmm.pid`, if it is alive, runs
/// in `dir` and its command line is exactly the one recorded in `firecracker.json`.
pub fn adopt_dir(dir: &Path) -> Option<FcInstance> {
    let (proc, running) = VmmProcess::adopt(dir.join("vmm.pid"), "Firecracker")?;
    let pid = proc.pid();
    let record = load_record(dir)?;
    let (ours, root) = match &record.jail_root {
        // Jailed: the jailer exec'd Firecracker with its own argv, in another mount
        // namespace; the jail id in that argv names the VM.
        Some(root) => {
            let id = jailer::JailerConfig::jail_id(dir).ok()?;
            (
                jailer::is_jailed_firecracker(&running, &id),
                PathBuf::from(root),
            )
        }
        None => {
            let cwd_ok = std::fs::read_link(format!("/proc/{pid}/cwd"))
                .ok()
                .zip(std::fs::canonicalize(dir).ok())
                .is_some_and(|(a, b)| a == b);
            (record.argv == running && cwd_ok, dir.to_path_buf())
        }
    };
    if !ours {
        tracing::warn!(pid, dir = %dir.display(), "vmm.pid names a process that is not this VM's Firecracker");
        return None;
    }
    tracing::info!(pid, dir = %dir.display(), "adopted a running Firecracker");
    Some(FcInstance::new(proc, dir, &root))
}

/// One Firecracker process, spawned by us or adopted.
pub struct FcInstance {
    proc: VmmProcess,
    /// The VM directory (pid file, console, stderr).
    dir: PathBuf,
    /// Firecracker's cwd: its sockets, logger and metrics (the VM directory, or the
    /// jail root in jailer mode).
    root: PathBuf,
    api: ApiClient,
}

impl FcInstance {
    fn new(proc: VmmProcess, dir: &Path, root: &Path) -> Self {
        FcInstance {
            proc,
            dir: dir.to_path_buf(),
            root: root.to_path_buf(),
            api: ApiClient::new(root.join(API_SOCK)).with_timeout(API_TIMEOUT),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The API client of this instance (snapshots, balloon, ...).
    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    /// Wait until the API socket answers `GET /version`.
    async fn wait_api(&self, deadline: Instant) -> Result<(), ApiError> {
        let sock = self.root.join(API_SOCK);
        let quick = self.api.clone().with_timeout(Duration::from_secs(1));
        loop {
            let err = if sock.exists() {
                match quick.version().await {
                    Ok(v) => {
                        tracing::debug!(pid = self.pid(), version = %v.firecracker_version, "API up");
                        return Ok(());
                    }
                    Err(e) => e,
                }
            } else {
                ApiError::Connect {
                    path: sock.display().to_string(),
                    source: std::io::ErrorKind::NotFound.into(),
                }
            };
            if !self.is_alive() || Instant::now() >= deadline {
                return Err(err);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Why the process died during launch: exit status and the last lines of its logs.
    fn death_report(&self, starts: &LogStarts) -> String {
        format!(
            "Firecracker {}: stderr: {}; log: {}; console: {}",
            self.proc.exit_status(),
            log_tail(&self.dir.join(VMM_LOG), starts.vmm_log, 8),
            log_tail(&self.root.join(FC_LOG), 0, 8),
            log_tail(&self.dir.join("console.log"), starts.console, 5),
        )
    }

    fn map_api(&self, op: &str, e: ApiError) -> VmmError {
        match e {
            ApiError::Fault { message, .. } => VmmError::Refused {
                op: op.to_string(),
                message,
            },
            _ if !self.is_alive() => VmmError::NotRunning,
            ApiError::Timeout { timeout, request } => VmmError::Timeout(timeout, request),
            ApiError::Connect { path, source } => VmmError::Io(format!("{op}: {path}"), source),
            other => VmmError::Io(op.to_string(), std::io::Error::other(other.to_string())),
        }
    }
}

#[async_trait]
impl VmmInstance for FcInstance {
    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn is_alive(&self) -> bool {
        self.proc.is_alive()
    }

    /// A fresh hybrid-vsock connection to the agent's port 52. Retries for a short
    /// window while the guest is not listening yet; callers retry beyond that.
    async fn connect_agent(&self) -> Result<BoxedAgentStream, VmmError> {
        if !self.is_alive() {
            return Err(VmmError::NotRunning);
        }
        let deadline = tokio::time::Instant::now() + AGENT_CONNECT_WINDOW;
        match vsock::connect(
            &self.root.join(VSOCK_SOCK),
            vsock::AGENT_PORT,
            deadline,
            || self.is_alive(),
        )
        .await
        {
            Ok(s) => Ok(Box::pin(s)),
            Err(_) if !self.is_alive() => Err(VmmError::NotRunning),
            Err(e) => Err(VmmError::Io(
                "connect to the agent over vsock".into(),
                std::io::Error::other(e.to_string()),
            )),
        }
    }

    async fn pause(&self) -> Result<(), VmmError> {
        if !self.is_alive() {
            return Err(VmmError::NotRunning);
        }
        self.api
            .patch_vm(VmStateRequest::Paused)
            .await
            .map_err(|e| self.map_api("pause", e))
    }

    async fn resume(&self) -> Result<(), VmmError> {
        if !self.is_alive() {
            return Err(VmmError::NotRunning);
        }
        self.api
            .patch_vm(VmStateRequest::Resumed)
            .await
            .map_err(|e| self.map_api("resume", e))
    }

    /// Ctrl+Alt+Del on the emulated keyboard; with `reboot=k` the guest's reboot ends
    /// the Firecracker process.
    async fn request_shutdown(&self) -> Result<(), VmmError> {
        if !self.is_alive() {
            return Err(VmmError::NotRunning);
        }
        self.api
            .action(ActionType::SendCtrlAltDel)
            .await
            .map_err(|e| self.map_api("shutdown", e))
    }

    async fn kill(&self) -> Result<(), VmmError> {
        self.proc.kill().await
    }

    async fn wait_exit(&self, timeout: Duration) -> bool {
        self.proc.wait_exit(timeout).await
    }

    async fn save_snapshot(&self, dir: &Path) -> Result<crate::vmm::SavedState, VmmError> {
        snapshot::save(self, dir).await
    }
}

fn utf8(p: &Path) -> Result<String, VmmError> {
    p.to_str()
        .map(String::from)
        .ok_or_else(|| VmmError::StartFailed(format!("path {} is not UTF-8", p.display())))
}

#[cfg(test)]
mod tests;
