//! Starting Firecracker for a VM: the argv (jailed or not), the VM directory made ready,
//! the process spawned, and the VM configured through the API up to `InstanceStart`;
//! and `firecracker.json`, the record of what was started.
//!
//! Invariants:
//! - `firecracker.json` is written before the process starts, so adoption can always
//!   compare a running process with what was started.
//! - Paths inside the VM directory are given to Firecracker relative to its cwd.
//! - Any failure before `InstanceStart` succeeded kills the process (see the module docs
//!   of `firecracker`).
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::api::{ApiClient, ApiError};
use super::instance::FcInstance;
use super::model::{
    ActionType, BootSource, CacheType, Drive, EntropyDevice, MachineConfiguration,
    NetworkInterface, Vsock,
};
use super::{
    jailer, kernel_cmdline, utf8, FirecrackerBackend, Jail, Runtime, API_READY_DEADLINE, API_SOCK,
    CONSOLE_LOG, DRIVE_ID, FC_LOG, GUEST_CID, METRICS_FILE, NET_IFACE_ID, RECORD_FILE,
    START_TIMEOUT, VMM_LOG, VSOCK_SOCK,
};
use crate::vmm::process::{write_atomic, VmmProcess};
use crate::vmm::qemu::check_socket_path;
use crate::vmm::{VmSpec, VmmError, VmmInstance};
use std::process::{Command, Stdio};

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

impl FirecrackerBackend {
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
    pub(super) vmm_log: u64,
    pub(super) console: u64,
}

impl LogStarts {
    /// The logs' current ends (for an adopted process: only what it writes from now on).
    pub(super) fn now(dir: &Path) -> Self {
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
pub(super) fn spawn(
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
pub(super) fn dir_relative(dir: &Path, p: &Path) -> String {
    match p.strip_prefix(dir) {
        Ok(rel) if rel.components().count() == 1 => rel.display().to_string(),
        _ => p.display().to_string(),
    }
}
