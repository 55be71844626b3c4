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
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::accel::{self, Accel, AccelKind};
use super::process::{locate_binary, require_file, write_atomic, VmmProcess};
use super::qemu::check_socket_path;
use super::{Backend, BackendKind, BoxedAgentStream, NetMode, VmSpec, VmmError, VmmInstance};
use crate::logcap::log_tail;

pub mod api;
pub mod jailer;
pub mod kernel;
pub mod model;
use crate::snapshots::firecracker as snapshot;
pub mod vsock;

use api::{ApiClient, ApiError};
use model::{
    ActionType, BootSource, CacheType, Drive, EntropyDevice, MachineConfiguration,
    NetworkInterface, VmStateRequest, Vsock,
};

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

/// A Firecracker release number (also used for snapshot data format versions, which
/// have the same `MAJOR.MINOR.PATCH` shape).
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
        version_text(text).as_deref().and_then(FcVersion::parse)
    }

    /// `network_overrides` on snapshot load.
    pub fn has_network_overrides(self) -> bool {
        self >= FcVersion::new(1, 12, 0)
    }

    /// `vsock_override` on snapshot load.
    pub fn has_vsock_override(self) -> bool {
        self >= FcVersion::new(1, 16, 0)
    }

    /// Read as a snapshot data format: can a Firecracker supporting format `self` load a
    /// snapshot written in format `snap`? Firecracker's rule (its snapshot versioning
    /// docs and the check in its snapshot loader): the same MAJOR, and a MINOR no newer
    /// than its own; any PATCH.
    pub fn can_load_format(self, snap: FcVersion) -> bool {
        snap.major == self.major && snap.minor <= self.minor
    }
}

/// The version as `firecracker --version` prints it, suffix included
/// (`Firecracker v1.17.0-dev` → `1.17.0-dev`).
pub fn version_text(output: &str) -> Option<String> {
    output
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Firecracker v"))
        .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
        .find(|v| FcVersion::parse(v).is_some())
}

/// The snapshot data format in `firecracker --snapshot-version` or
/// `--describe-snapshot` output (`v11.0.0`, then log lines).
pub fn format_text(output: &str) -> Option<FcVersion> {
    output.lines().find_map(|l| {
        let l = l.trim();
        l.strip_prefix('v')
            .filter(|rest| rest.split('.').count() == 3)
            .and_then(FcVersion::parse)
    })
}

/// How long a `firecracker --version`-style query may take.
const QUERY_DEADLINE: Duration = Duration::from_secs(5);

/// Run `binary args` (stdin /dev/null) and return whether it succeeded and its stdout
/// plus stderr; killed after [`QUERY_DEADLINE`] (a hung binary is an error, not a hang).
pub fn run_binary(binary: &Path, args: &[&std::ffi::OsStr]) -> std::io::Result<(bool, String)> {
    use std::io::Read;
    let mut child = Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // One reader per pipe, so a chatty stderr never blocks the child.
    fn drain<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut text);
            }
            text
        })
    }
    let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let deadline = Instant::now() + QUERY_DEADLINE;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {QUERY_DEADLINE:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut text = out.join().unwrap_or_default();
    text.extend(err.join().unwrap_or_default());
    Ok((
        status.success(),
        String::from_utf8_lossy(&text).into_owned(),
    ))
}

/// What `firecracker.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FcRecord {
    /// Full argv; `argv[0]` is the binary's path (the jailer's in jailer mode).
    pub argv: Vec<String>,
    /// As the binary prints it (`1.17.0-dev`).
    pub version: String,
    /// The snapshot data format this Firecracker writes (`11.0.0`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_format: Option<String>,
    /// The ELF kernel booted (or the snapshot restored).
    pub kernel: String,
    /// RFC 3339.
    pub created: String,
    /// Jailer mode: the jail root (Firecracker's `/`, holding its sockets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail_root: Option<String>,
    /// Jailer mode: the ids Firecracker runs as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail_ids: Option<(u32, u32)>,
}

impl FcRecord {
    /// Jailer mode: Firecracker's own arguments (after the jailer's `--`).
    pub fn firecracker_args(&self) -> &[String] {
        match self.argv.iter().position(|a| a == "--") {
            Some(i) => &self.argv[i + 1..],
            None => &[],
        }
    }

    /// Jailer mode: the binary the jailer exec'd (`--exec-file`, resolved at launch).
    pub fn exec_file(&self) -> Option<&str> {
        let i = self.argv.iter().position(|a| a == "--exec-file")?;
        self.argv.get(i + 1).map(String::as_str)
    }

    /// Jailer mode: the file name of the binary the jailer exec'd (its jail's directory
    /// name and the jailed process's `argv[0]`).
    pub fn exec_name(&self) -> Option<&str> {
        self.exec_file()?.rsplit('/').next()
    }
}

pub fn load_record(dir: &Path) -> Option<FcRecord> {
    let text = std::fs::read_to_string(dir.join(RECORD_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Firecracker's own command-line arguments besides `--api-sock` and `--id`: the logger
/// and metrics files (relative to its cwd), so it never logs to stdout (the console) and
/// nothing has to be configured through the API before a snapshot load.
pub fn log_args() -> Vec<String> {
    [
        "--log-path",
        FC_LOG,
        "--level",
        "Info",
        "--show-level",
        "--metrics-path",
        METRICS_FILE,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

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

    /// Firecracker's argv for the VM in `dir`, unjailed (argv[0] = the binary).
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
        argv.extend(log_args());
        Ok(argv)
    }

    /// The jailer's argv for the VM in `dir`, jailed in `j` (from [`Self::prepare_jail`]).
    pub(crate) fn jailed_argv(
        &self,
        jail: &jailer::JailerConfig,
        j: &Jail,
        dir: &Path,
    ) -> Result<Vec<String>, VmmError> {
        let mut fc_args = vec!["--api-sock".to_string(), API_SOCK.into()];
        fc_args.extend(log_args());
        jail.argv(&j.exec, dir, &fc_args)
    }

    /// An empty jail for the VM in `dir`, with its log and metrics files and (if any) its
    /// disk linked in; the TAP device of `spec` handed to the jailed ids. The binary is
    /// resolved here, once, as the jailer will resolve it (see [`jailer::ExecFile`]).
    pub(crate) fn prepare_jail(
        &self,
        spec: &VmSpec,
        jail: &jailer::JailerConfig,
    ) -> Result<(Jail, LogStarts), VmmError> {
        let dir = &spec.dir;
        let exec = jailer::ExecFile::resolve(&self.binary)?;
        if exec.path() != self.binary {
            tracing::debug!(binary = %self.binary.display(), resolved = %exec.path().display(), "the jailer runs the resolved Firecracker binary");
        }
        let root = jail.root(dir, &exec)?;
        check_socket_path(&root.join(API_SOCK))?;
        check_socket_path(&root.join(VSOCK_SOCK))?;
        jail.reset(dir, &root)?;
        let logs = prepare_dir(dir, &root)?;
        for f in [FC_LOG, METRICS_FILE] {
            jail.link_private(&root, &dir.join(f), f)?;
        }
        if let Some(d) = &spec.disk {
            jail.link_private(&root, d, jailer::JAIL_DISK)?;
        }
        if let Some(tap) = spec.net.as_ref().and_then(|n| n.tap.as_ref()) {
            crate::net::set_tap_owner(&tap.ifname, jail.uid, jail.gid)
                .map_err(|e| VmmError::StartFailed(e.message))?;
        }
        let id = jailer::JailerConfig::jail_id(dir)?;
        jail.cgroups.remove(&id);
        Ok((
            Jail {
                root,
                exec,
                uid: jail.uid,
                gid: jail.gid,
                id,
                cgroups: jail.cgroups.clone(),
            },
            logs,
        ))
    }

    /// Start Firecracker with `argv` in `spec.dir` and configure and start the VM
    /// booting `vmlinux`. Used by [`Backend::launch`] and by tests with fake processes.
    pub async fn launch_argv(
        &self,
        spec: &VmSpec,
        argv: Vec<String>,
        vmlinux: &Path,
    ) -> Result<FcInstance, VmmError> {
        let logs = prepare_dir(&spec.dir, &spec.dir)?;
        let rt = Runtime {
            root: spec.dir.clone(),
            kernel: vmlinux.display().to_string(),
            initrd: spec.initrd.display().to_string(),
            disk: spec.disk.as_ref().map(|d| dir_relative(&spec.dir, d)),
            jail: None,
        };
        self.launch_runtime(spec, argv, vmlinux, rt, logs).await
    }

    /// Jailer mode: build the jail (boot files and disk linked in) and start the jailer.
    pub async fn launch_jailed(
        &self,
        spec: &VmSpec,
        jail: &jailer::JailerConfig,
        vmlinux: &Path,
    ) -> Result<FcInstance, VmmError> {
        let (j, logs) = self.prepare_jail(spec, jail)?;
        jail.link_shared(&j.root, vmlinux, jailer::JAIL_KERNEL)?;
        jail.link_shared(&j.root, &spec.initrd, jailer::JAIL_INITRD)?;
        let argv = self.jailed_argv(jail, &j, &spec.dir)?;
        let rt = Runtime {
            root: j.root.clone(),
            kernel: jailer::JAIL_KERNEL.into(),
            initrd: jailer::JAIL_INITRD.into(),
            disk: spec.disk.as_ref().map(|_| jailer::JAIL_DISK.into()),
            jail: Some(j),
        };
        self.launch_runtime(spec, argv, vmlinux, rt, logs).await
    }

    /// Write the record and spawn `argv` for a VM whose files `prepare_dir` (and, jailed,
    /// `prepare_jail`) made ready.
    pub(crate) fn start_process(
        &self,
        dir: &Path,
        argv: &[String],
        what: String,
        root: &Path,
        jail: Option<Jail>,
        logs: LogStarts,
    ) -> Result<FcInstance, VmmError> {
        let record = FcRecord {
            argv: argv.to_vec(),
            version: self.version_text.clone(),
            snapshot_format: self.snapshot_format.map(|f| f.to_string()),
            kernel: what,
            created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            jail_root: jail.as_ref().map(|j| j.root.display().to_string()),
            jail_ids: jail.as_ref().map(|j| (j.uid, j.gid)),
        };
        write_atomic(
            &dir.join(RECORD_FILE),
            &serde_json::to_vec_pretty(&record).unwrap_or_default(),
        )?;
        spawn(dir, root, argv, jail, logs)
    }

    async fn launch_runtime(
        &self,
        spec: &VmSpec,
        argv: Vec<String>,
        vmlinux: &Path,
        rt: Runtime,
        logs: LogStarts,
    ) -> Result<FcInstance, VmmError> {
        let t0 = Instant::now();
        let dir = &spec.dir;
        let inst = self.start_process(
            dir,
            &argv,
            vmlinux.display().to_string(),
            &rt.root,
            rt.jail.clone(),
            logs,
        )?;
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
            let why = inst.failure_reason(&e).await;
            let _ = inst.kill().await;
            tracing::warn!(dir = %dir.display(), "Firecracker launch failed: {why}");
            return Err(VmmError::StartFailed(why));
        }
        tracing::info!(
            pid = inst.pid(),
            dir = %dir.display(),
            version = %self.version_text,
            jailed = inst.jail.is_some(),
            ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
            "Firecracker started"
        );
        Ok(inst)
    }
}

/// Where each log stood before this start, so reasons quote only this run's lines.
#[derive(Debug, Clone, Default)]
pub(crate) struct LogStarts {
    vmm_log: u64,
    console: u64,
}

impl LogStarts {
    /// The logs' current ends (for an adopted process: only what it writes from now on).
    fn now(dir: &Path) -> Self {
        let len = |f: &str| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0);
        LogStarts {
            vmm_log: len(VMM_LOG),
            console: len(CONSOLE_LOG),
        }
    }
}

/// Make the VM directory ready for a start: a fresh `firecracker.log` (the previous one
/// kept as `.1`) and `metrics.json` (Firecracker opens both without creating them), and
/// no stale sockets in `root`, Firecracker's cwd.
pub(crate) fn prepare_dir(dir: &Path, root: &Path) -> Result<LogStarts, VmmError> {
    let io = |p: &Path, e| VmmError::Io(p.display().to_string(), e);
    for s in [API_SOCK, VSOCK_SOCK] {
        let p = root.join(s);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&p, e)),
        }
    }
    let fc_log = dir.join(FC_LOG);
    if std::fs::metadata(&fc_log)
        .map(|m| m.len() > 0)
        .unwrap_or(false)
    {
        let old = dir.join(format!("{FC_LOG}.1"));
        std::fs::rename(&fc_log, &old).map_err(|e| io(&fc_log, e))?;
    }
    for f in [FC_LOG, METRICS_FILE] {
        let p = dir.join(f);
        // A new file each time (never truncate one a jailed run still holds open).
        let _ = std::fs::remove_file(&p);
        std::fs::File::create(&p).map_err(|e| io(&p, e))?;
    }
    Ok(LogStarts::now(dir))
}

/// Spawn `argv` in its own session in `dir`, stdout → console.log, stderr → vmm.log; write
/// the pid file and start the reaper. `root` is where Firecracker's sockets will be.
fn spawn(
    dir: &Path,
    root: &Path,
    argv: &[String],
    jail: Option<Jail>,
    logs: LogStarts,
) -> Result<FcInstance, VmmError> {
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
    let console = open_append(dir.join(CONSOLE_LOG))?;
    let vmm_log = open_append(dir.join(VMM_LOG))?;
    let mut cmd = Command::new(program);
    cmd.args(rest)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(vmm_log);
    let proc = VmmProcess::spawn(cmd, "Firecracker", dir.join("vmm.pid"), true)?;
    Ok(FcInstance::new(proc, dir, root, jail, logs))
}

/// The launch-time configuration, in Firecracker's documented order (logger and metrics
/// are on the command line).
async fn configure(api: &ApiClient, spec: &VmSpec, rt: &Runtime) -> Result<(), ApiError> {
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

/// Re-attach to the Firecracker whose pid is in `<dir>/vmm.pid`, if it is alive and is
/// this VM's: unjailed, its command line is exactly the recorded one and its cwd is
/// `dir`; jailed, it is the recorded binary exec'd by the jailer for this VM's jail id
/// with our arguments (its cwd is the jail, in another mount namespace).
pub fn adopt_dir(dir: &Path) -> Option<FcInstance> {
    let (proc, running) = VmmProcess::adopt(dir.join("vmm.pid"), "Firecracker")?;
    let pid = proc.pid();
    let record = load_record(dir)?;
    let (ours, root, jail) = match &record.jail_root {
        Some(root) => {
            let id = jailer::JailerConfig::jail_id(dir).ok()?;
            let ours = record.exec_name().is_some_and(|exec| {
                jailer::is_jailed_firecracker(&running, exec, &id, record.firecracker_args())
            });
            let (uid, gid) = record
                .jail_ids
                .unwrap_or((jailer::DEFAULT_ID, jailer::DEFAULT_ID));
            let exec = jailer::ExecFile::recorded(Path::new(record.exec_file()?)).ok()?;
            let jail = Jail {
                root: PathBuf::from(root),
                exec,
                uid,
                gid,
                cgroups: jailer::JailCgroups::parse(&cgroup_settings(&record.argv))
                    .unwrap_or_default(),
                id,
            };
            (ours, PathBuf::from(root), Some(jail))
        }
        None => {
            let cwd_ok = std::fs::read_link(format!("/proc/{pid}/cwd"))
                .ok()
                .zip(std::fs::canonicalize(dir).ok())
                .is_some_and(|(a, b)| a == b);
            (record.argv == running && cwd_ok, dir.to_path_buf(), None)
        }
    };
    if !ours {
        tracing::warn!(pid, dir = %dir.display(), ?running, "vmm.pid names a process that is not this VM's Firecracker");
        return None;
    }
    tracing::info!(pid, dir = %dir.display(), jailed = jail.is_some(), "adopted a running Firecracker");
    Some(FcInstance::new(proc, dir, &root, jail, LogStarts::now(dir)))
}

/// The `--cgroup` values of a recorded jailer argv, comma-joined.
fn cgroup_settings(argv: &[String]) -> String {
    argv.windows(2)
        .filter(|w| w[0] == "--cgroup")
        .map(|w| w[1].as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// One Firecracker process, spawned by us or adopted.
pub struct FcInstance {
    proc: VmmProcess,
    /// The VM directory (pid file, console, stderr, logs).
    dir: PathBuf,
    /// Firecracker's cwd: its sockets (the VM directory, or the jail root).
    root: PathBuf,
    pub(crate) jail: Option<Jail>,
    /// Where the logs stood when this process started (or was adopted).
    logs: LogStarts,
    api: ApiClient,
}

impl FcInstance {
    fn new(proc: VmmProcess, dir: &Path, root: &Path, jail: Option<Jail>, logs: LogStarts) -> Self {
        FcInstance {
            proc,
            dir: dir.to_path_buf(),
            root: root.to_path_buf(),
            jail,
            logs,
            api: ApiClient::new(root.join(API_SOCK)).with_timeout(API_TIMEOUT),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Firecracker's cwd (the jail root when jailed).
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn is_jailed(&self) -> bool {
        self.jail.is_some()
    }

    /// The API client of this instance (snapshots, balloon, ...).
    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    /// Wait until the API socket answers `GET /version`.
    pub(crate) async fn wait_api(&self, deadline: Instant) -> Result<(), ApiError> {
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

    /// Why a start failed with `e`: Firecracker's refusal verbatim, or, when the process
    /// died (the reaper may need a moment to notice), how it ended and its last error.
    /// A jailed start whose API socket never appeared also says which jail was expected
    /// and what exists instead ([`Self::jail_report`]).
    pub(crate) async fn failure_reason(&self, e: &ApiError) -> String {
        let died = !matches!(e, ApiError::Fault { .. })
            && self.proc.wait_exit(Duration::from_millis(300)).await;
        let jail = self
            .jail_report()
            .map(|r| format!("; {r}"))
            .unwrap_or_default();
        match e {
            ApiError::Fault {
                request, message, ..
            } => format!("Firecracker refused {request}: {message}"),
            _ if died => format!("{}{jail}", self.exit_report()),
            other => format!(
                "Firecracker API: {other}{jail}; stderr: {}",
                log_tail(&self.dir.join(VMM_LOG), self.logs.vmm_log, 5)
            ),
        }
    }

    /// Jailed, with no API socket in the jail: the jail root that was expected and what
    /// the VM's jail directory holds instead (a jailer that resolved the binary to
    /// another name made another directory).
    pub(crate) fn jail_report(&self) -> Option<String> {
        let j = self.jail.as_ref()?;
        if j.root.join(API_SOCK).exists() {
            return None;
        }
        let base = self.dir.join(jailer::JAIL_DIR);
        let found = jailer::found_jails(&base);
        Some(format!(
            "expected the jail {} (for {}), and {} holds {}",
            j.root.display(),
            j.exec.path().display(),
            base.display(),
            if found.is_empty() {
                "nothing".to_string()
            } else {
                found.join(", ")
            }
        ))
    }

    /// How the (dead) process ended: its exit status, Firecracker's last error line of
    /// this run (its logger; its stderr), and the guest console's last lines when there
    /// are any.
    pub fn exit_report(&self) -> String {
        let mut why = format!("Firecracker {}", self.proc.exit_description());
        if let Some(line) = last_error_line(&self.dir.join(FC_LOG)) {
            why.push_str(&format!("; error: {line}"));
        }
        if let Some(line) = last_line(&self.dir.join(VMM_LOG), self.logs.vmm_log) {
            why.push_str(&format!("; stderr: {line}"));
        }
        if let Some(line) = last_line(&self.dir.join(CONSOLE_LOG), self.logs.console) {
            why.push_str(&format!("; console: {line}"));
        }
        why
    }

    pub(crate) fn map_api(&self, op: &str, e: ApiError) -> VmmError {
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

/// The last non-empty line of `path` after byte `from` (at most the last 8 KiB read).
fn last_line(path: &Path, from: u64) -> Option<String> {
    log_tail(path, from, 1).into_text()
}

/// The most telling error line of Firecracker's log `path` (one run: the log is fresh at
/// every start): the last `:ERROR]` line other than the generic "exiting with error"
/// one, else that one; the timestamp is dropped.
pub fn last_error_line(path: &Path) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&text[text.len().saturating_sub(64 * 1024)..]).into_owned();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(":ERROR]") || l.contains(":ERROR ") || l.contains(":error]"))
        .collect();
    let pick = errors
        .iter()
        .rev()
        .find(|l| !l.contains("exiting with error"))
        .or(errors.last())?;
    // `2026-12-01T07:45:14.83 [bx-1:main:ERROR] text` → `[bx-1:main:ERROR] text`.
    let line = match pick.find(" [") {
        Some(i) if pick[..i].contains('T') && !pick[..i].contains(' ') => &pick[i + 1..],
        _ => pick,
    };
    Some(line.trim().chars().take(300).collect())
}

#[async_trait]
impl VmmInstance for FcInstance {
    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn is_alive(&self) -> bool {
        self.proc.is_alive()
    }

    fn exit_reason(&self) -> Option<String> {
        (!self.is_alive()).then(|| self.exit_report())
    }

    /// A fresh hybrid-vsock connection to the agent's port 52. Retries for a short
    /// window while the guest is not listening yet; callers retry beyond that.
    async fn connect_agent(&self) -> Result<BoxedAgentStream, VmmError> {
        if !self.is_alive() {
            return Err(VmmError::NotRunning);
        }
        let alive = || self.is_alive();
        vsock::connect_agent(&self.root.join(VSOCK_SOCK), alive, alive, "vsock").await
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
        self.proc.kill().await?;
        if let Some(j) = &self.jail {
            j.cgroups.remove(&j.id);
        }
        Ok(())
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
