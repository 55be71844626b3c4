//! QEMU `microvm` backend: KVM where it really runs guests, TCG emulation otherwise.
//!
//! Files in a VM directory (all created by this backend unless noted):
//! ```text
//! qemu.args.json  the exact argv (argv[0] = the QEMU binary) plus accelerator and time;
//!                 written before QEMU starts; `adopt` compares it with /proc/<pid>/cmdline,
//!                 snapshot restore rebuilds the command line from it
//! vmm.pid         written (and locked, and removed at a clean exit) by QEMU's -pidfile;
//!                 removed by us once a QEMU we reaped or killed is gone
//! vmm.log         QEMU's stdout and stderr (appended across restarts)
//! console.log     the guest's serial console (chardev file, append=on)
//! qmp.sock        QMP control socket (server)
//! agent.sock      the agent's virtio-serial port `org.bandsox.agent` (server)
//! disk.ext4       not ours: the VM's disk, from VmSpec::disk (virtio-blk, /dev/vda)
//! ```
//! Invariants:
//! - QEMU runs as a [`VmmProcess`]: own session, no inherited fds, reaped at once,
//!   adopted only with a matching start time; stdin is `/dev/null`.
//! - Socket paths must fit `sun_path` (107 bytes); longer ones fail the launch clearly.
//! - Every QMP request has a deadline; QMP errors surface as `VmmError::Refused` carrying
//!   QEMU's `desc` verbatim.
//! - `launch` returns only once QMP answers; if QEMU dies first the error carries the last
//!   lines of `vmm.log`.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::accel::{self, Accel, AccelKind};
use super::process::{locate_binary, write_atomic, VmmProcess};
use super::qmp::{Qmp, QmpError};
use super::{Backend, BackendKind, BoxedAgentStream, SavedState, VmSpec, VmmError, VmmInstance};
use crate::logcap::log_tail;
use crate::settings::VmmSettings;

pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// Environment variable naming the QEMU binary to use instead of the one on PATH.
pub const QEMU_ENV: &str = "BANDSOX_QEMU";
pub const ARGS_FILE: &str = "qemu.args.json";
pub const VMM_LOG: &str = "vmm.log";
pub const QMP_SOCK: &str = "qmp.sock";
pub const AGENT_SOCK: &str = "agent.sock";
/// The virtio-serial port name the agent looks for.
pub const AGENT_PORT: &str = "org.bandsox.agent";
/// Longest usable unix socket path (sun_path is 108 bytes including the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// How long `launch` waits for QMP to answer.
const LAUNCH_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline of one QMP command.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of connecting to QMP (greeting + capabilities).
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What `qemu.args.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QemuArgs {
    /// Full argv; `argv[0]` is the QEMU binary's path.
    pub argv: Vec<String>,
    pub accel: String,
    pub accel_reason: String,
    /// RFC 3339.
    pub created: String,
}

/// Read `<dir>/qemu.args.json`.
pub fn load_args(dir: &Path) -> Result<QemuArgs, VmmError> {
    let p = dir.join(ARGS_FILE);
    let text = std::fs::read_to_string(&p).map_err(|e| VmmError::Io(p.display().to_string(), e))?;
    serde_json::from_str(&text).map_err(|e| {
        VmmError::Io(
            p.display().to_string(),
            std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        )
    })
}

pub struct QemuBackend {
    binary: PathBuf,
    accel: Accel,
    version: String,
    /// Host TSC rate passed to TCG guests as `tsc_early_khz=`.
    tsc_khz: Option<u64>,
}

impl QemuBackend {
    /// Find QEMU (`$BANDSOX_QEMU`, else `qemu-system-x86_64` on PATH) and decide the
    /// accelerator for this host.
    pub fn detect(settings: &VmmSettings) -> Result<Self, VmmError> {
        let binary = locate_binary(
            QEMU_ENV,
            settings.qemu.as_deref(),
            QEMU_BINARY,
            Some("install qemu-system-x86"),
        )?;
        let b = Self::new(binary, accel::detect(settings.accel.as_deref()));
        tracing::info!("qemu backend: {}", b.describe());
        Ok(b)
    }

    /// A backend with an explicit binary and accelerator (tests, callers that know).
    pub fn new(binary: PathBuf, accel: Accel) -> Self {
        let version = Command::new(&binary)
            .arg("-version")
            .stdin(Stdio::null())
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .and_then(|l| l.split("version ").nth(1))
                    .and_then(|v| v.split_whitespace().next())
                    .map(String::from)
            })
            .unwrap_or_else(|| "?".into());
        let tsc_khz = match accel.kind {
            AccelKind::Tcg => accel::host_tsc_khz(),
            AccelKind::Kvm => None,
        };
        QemuBackend {
            binary,
            accel,
            version,
            tsc_khz,
        }
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    pub fn accel(&self) -> &Accel {
        &self.accel
    }

    /// The TSC rate given to TCG guests (`tsc_early_khz=`), if any.
    pub fn tsc_khz(&self) -> Option<u64> {
        self.tsc_khz
    }

    /// Start QEMU with an explicit argv (argv[0] = binary) in `dir`, e.g. one rebuilt from
    /// `qemu.args.json` plus `-incoming defer` for a snapshot restore. Writes the argv to
    /// `qemu.args.json` first; returns once QMP answers.
    pub async fn launch_argv(
        &self,
        dir: &Path,
        argv: Vec<String>,
    ) -> Result<QemuInstance, VmmError> {
        let t0 = Instant::now();
        let (program, rest) = argv
            .split_first()
            .ok_or_else(|| VmmError::StartFailed("empty QEMU command line".into()))?;
        let qmp_sock = dir.join(QMP_SOCK);
        let agent_sock = dir.join(AGENT_SOCK);
        for s in [&qmp_sock, &agent_sock] {
            check_socket_path(s)?;
            // A stale socket file from an earlier run would make QEMU's bind fail.
            match std::fs::remove_file(s) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(VmmError::Io(s.display().to_string(), e)),
            }
        }
        let args = QemuArgs {
            argv: argv.clone(),
            accel: self.accel.kind.to_string(),
            accel_reason: self.accel.reason.clone(),
            created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        };
        write_atomic(
            &dir.join(ARGS_FILE),
            &serde_json::to_vec_pretty(&args).unwrap_or_default(),
        )?;

        let log_path = dir.join(VMM_LOG);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| VmmError::Io(log_path.display().to_string(), e))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log2 = log
            .try_clone()
            .map_err(|e| VmmError::Io(log_path.display().to_string(), e))?;
        let mut cmd = Command::new(program);
        cmd.args(rest)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // QEMU writes `vmm.pid` itself (`-pidfile`).
        let proc = VmmProcess::spawn(cmd, "QEMU", dir.join("vmm.pid"), false)?;
        let pid = proc.pid();
        let inst = QemuInstance {
            proc,
            dir: dir.to_path_buf(),
            qmp: tokio::sync::Mutex::new(()),
        };
        let deadline = t0 + LAUNCH_DEADLINE;
        loop {
            if !inst.is_alive() {
                return Err(VmmError::StartFailed(format!(
                    "QEMU {}: {}",
                    inst.proc.exit_status(),
                    log_tail(&log_path, log_start, 12)
                )));
            }
            if qmp_sock.exists() {
                match Qmp::connect(&qmp_sock, QMP_CONNECT_TIMEOUT).await {
                    Ok(q) => {
                        drop(q);
                        break;
                    }
                    Err(e) => tracing::debug!(pid, "QMP not ready yet: {e}"),
                }
            }
            if Instant::now() >= deadline {
                let _ = inst.kill().await;
                return Err(VmmError::StartFailed(format!(
                    "QMP did not answer within {LAUNCH_DEADLINE:?}: {}",
                    log_tail(&log_path, log_start, 12)
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!(
            pid,
            dir = %dir.display(),
            accel = %self.accel.kind,
            ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
            "QEMU started"
        );
        Ok(inst)
    }
}

#[async_trait]
impl Backend for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn describe(&self) -> String {
        let tsc = match self.tsc_khz {
            Some(khz) => format!("; guest TSC {khz} kHz"),
            None => String::new(),
        };
        format!(
            "QEMU {} microvm ({}) with {}: {}{tsc}",
            self.version,
            self.binary.display(),
            self.accel.kind,
            self.accel.reason
        )
    }

    fn vmm_overhead_mib(&self, memory_mib: u32) -> Option<u64> {
        Some(crate::cgroup::overhead_mib(
            "qemu",
            self.accel.kind == AccelKind::Tcg,
            memory_mib,
        ))
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn VmmInstance>, VmmError> {
        spec.check_files()?;
        let argv = build_argv(&self.binary, spec, self.accel.kind, self.tsc_khz)?;
        tracing::debug!(name = %spec.name, ?argv, "launching QEMU");
        Ok(Box::new(self.launch_argv(&spec.dir, argv).await?))
    }

    async fn adopt(&self, spec: &VmSpec) -> Result<Option<Box<dyn VmmInstance>>, VmmError> {
        Ok(adopt_dir(&spec.dir).map(|i| Box::new(i) as Box<dyn VmmInstance>))
    }

    fn can_snapshot(&self) -> bool {
        true
    }

    async fn restore(
        &self,
        spec: &VmSpec,
        snap_dir: &Path,
        saved: &SavedState,
    ) -> Result<Box<dyn VmmInstance>, VmmError> {
        let inst = super::qemu_snapshot::restore(self, spec, snap_dir, saved).await?;
        Ok(Box::new(inst))
    }
}

/// Re-attach to the QEMU whose pid is in `<dir>/vmm.pid`, if it is alive and its command
/// line is exactly the one recorded in `<dir>/qemu.args.json`.
pub fn adopt_dir(dir: &Path) -> Option<QemuInstance> {
    let (proc, running) = VmmProcess::adopt(dir.join("vmm.pid"), "QEMU")?;
    let pid = proc.pid();
    let matches = match load_args(dir) {
        Ok(args) => args.argv == running,
        // No record: accept only a command line that names this directory's QMP socket.
        Err(_) => running.iter().any(|a| {
            a.contains(&format!(
                "path={}",
                opt_escape(&dir.join(QMP_SOCK).to_string_lossy())
            ))
        }),
    };
    if !matches {
        tracing::warn!(pid, dir = %dir.display(), "vmm.pid names a process that is not this VM's QEMU");
        return None;
    }
    tracing::info!(pid, dir = %dir.display(), "adopted a running QEMU");
    Some(QemuInstance {
        proc,
        dir: dir.to_path_buf(),
        qmp: tokio::sync::Mutex::new(()),
    })
}

/// The full QEMU argv for `spec` (argv[0] = `binary`).
pub fn build_argv(
    binary: &Path,
    spec: &VmSpec,
    accel: AccelKind,
    tsc_khz: Option<u64>,
) -> Result<Vec<String>, VmmError> {
    if spec.name.is_empty()
        || spec
            .name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == ',')
    {
        return Err(VmmError::StartFailed(format!(
            "VM name {:?} cannot be passed on the kernel command line",
            spec.name
        )));
    }
    if spec.vcpus == 0 || spec.memory_mib == 0 {
        return Err(VmmError::StartFailed(
            "vcpus and memory must be at least 1".into(),
        ));
    }
    let dir = &spec.dir;
    let qmp = dir.join(QMP_SOCK);
    let agent = dir.join(AGENT_SOCK);
    check_socket_path(&qmp)?;
    check_socket_path(&agent)?;
    let s = |p: &Path| utf8(p);
    let e = |p: &Path| utf8(p).map(|s| opt_escape(&s));

    let mut a: Vec<String> = vec![s(binary)?];
    let mut push = |items: &[&str]| a.extend(items.iter().map(|x| x.to_string()));
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
    ]);
    push(&["-msg", "timestamp=on"]);
    push(&["-name", &format!("bandsox-{}", spec.name)]);
    let shared_memory = match &spec.memory_file {
        Some(f) => Some(
            super::qemu_memory::shared_memory_args(f, spec.memory_mib).ok_or_else(|| {
                VmmError::StartFailed(format!("path {} is not UTF-8", f.display()))
            })?,
        ),
        None => None,
    };
    let machine_suffix = shared_memory.as_ref().map(|m| m.1.as_str()).unwrap_or("");
    push(&["-machine", &format!("microvm,rtc=on{machine_suffix}")]);
    if let Some((object, _)) = &shared_memory {
        push(&["-object", object]);
    }
    match accel {
        AccelKind::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        AccelKind::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
    }
    push(&[
        "-m",
        &spec.memory_mib.to_string(),
        "-smp",
        &spec.vcpus.to_string(),
    ]);
    push(&["-kernel", &s(&spec.kernel)?, "-initrd", &s(&spec.initrd)?]);
    push(&["-append", &kernel_cmdline(spec, accel, tsc_khz)]);
    push(&[
        "-chardev",
        &format!(
            "file,id=console,path={},append=on",
            e(&spec.console_path())?
        ),
        "-serial",
        "chardev:console",
    ]);
    push(&[
        "-chardev",
        &format!("socket,id=qmp,path={},server=on,wait=off", e(&qmp)?),
        "-mon",
        "chardev=qmp,mode=control",
    ]);
    push(&[
        "-device",
        "virtio-serial-device",
        "-chardev",
        &format!("socket,id=agent,path={},server=on,wait=off", e(&agent)?),
        "-device",
        &format!("virtserialport,chardev=agent,name={AGENT_PORT}"),
    ]);
    if let Some(disk) = &spec.disk {
        push(&[
            "-drive",
            &format!(
                "id=vda,file={},format=raw,if=none,cache=writeback,discard=unmap",
                e(disk)?
            ),
            "-device",
            "virtio-blk-device,drive=vda",
        ]);
    }
    if let Some(net) = &spec.net {
        push(&[
            "-netdev",
            &netdev_arg(net),
            "-device",
            &format!("virtio-net-device,netdev=net0,mac={}", net.mac),
        ]);
    }
    push(&["-pidfile", &s(&spec.pid_path())?]);
    Ok(a)
}

/// The `-netdev` value for the VM's network (also what a restored clone is given).
pub fn netdev_arg(net: &crate::net::NetPlan) -> String {
    match &net.tap {
        // slirp's defaults are the addresses `net::user_mode_config` gives the guest.
        None => "user,id=net0".to_string(),
        Some(tap) => format!(
            "tap,id=net0,ifname={},script=no,downscript=no",
            opt_escape(&tap.ifname)
        ),
    }
}

/// The guest kernel command line.
/// The guest kernel command line.
///
/// - `tsc_khz` (TCG only) skips the guest's TSC calibration, which fails on a busy host and
///   then hangs the boot (see [`accel::host_tsc_khz`]).
/// - `mitigations=off` only under TCG: emulated CPUs do not speculate, so the guest's
///   Spectre/Meltdown workarounds cost time and protect nothing.
/// - `cryptomgr.notests`, `8250.nr_uarts=1`, `pci=off`: skip work that microvm never needs.
pub fn kernel_cmdline(spec: &VmSpec, accel: AccelKind, tsc_khz: Option<u64>) -> String {
    let mut s = String::from(
        "console=ttyS0 panic=-1 loglevel=4 reboot=t pci=off 8250.nr_uarts=1 cryptomgr.notests",
    );
    if accel == AccelKind::Tcg {
        s.push_str(" mitigations=off");
        if let Some(khz) = tsc_khz {
            s.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    s.push_str(&spec.net_cmdline());
    s.push_str(&format!(" bandsox.name={}", spec.name));
    s
}

/// QEMU option values separate fields with `,`; a literal comma is written `,,`.
pub fn opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

fn utf8(p: &Path) -> Result<String, VmmError> {
    p.to_str()
        .map(String::from)
        .ok_or_else(|| VmmError::StartFailed(format!("path {} is not UTF-8", p.display())))
}

/// Fail clearly when a unix socket path is too long for `sun_path`.
pub fn check_socket_path(p: &Path) -> Result<(), VmmError> {
    let len = p.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(VmmError::StartFailed(format!(
            "socket path {} is {len} bytes; unix sockets allow at most {MAX_SOCKET_PATH} \
             (use a shorter state directory)",
            p.display()
        )));
    }
    Ok(())
}

/// One QEMU process, spawned by us or adopted.
pub struct QemuInstance {
    proc: VmmProcess,
    dir: PathBuf,
    /// Serialises this instance's QMP commands (one connection each).
    qmp: tokio::sync::Mutex<()>,
}

impl QemuInstance {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Run one QMP command on a fresh QMP connection and return its `return` value. QMP
    /// errors become `Refused` with QEMU's description verbatim.
    ///
    /// QEMU's monitor serves one client at a time, so no connection is kept between
    /// commands: another instance (an adopting daemon, a snapshot helper, an operator with
    /// socat) can always get in. Commands from this instance are serialised.
    pub async fn qmp_execute(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, VmmError> {
        let _serial = self.qmp.lock().await;
        if !self.is_alive() {
            return Err(VmmError::NotRunning);
        }
        let mut q = match Qmp::connect(&self.dir.join(QMP_SOCK), QMP_CONNECT_TIMEOUT).await {
            Ok(q) => q,
            Err(_) if !self.is_alive() => return Err(VmmError::NotRunning),
            Err(QmpError::Timeout(_, d)) => {
                return Err(VmmError::Timeout(d, "QMP connection".into()))
            }
            Err(e) => return Err(VmmError::Io("QMP connect".into(), to_io(e))),
        };
        match q.execute(command, arguments, timeout).await {
            Ok(v) => Ok(v),
            Err(QmpError::Command { desc, .. }) => Err(VmmError::Refused {
                op: command.to_string(),
                message: desc,
            }),
            Err(QmpError::Timeout(_, d)) => Err(VmmError::Timeout(d, format!("QMP {command}"))),
            // `quit` and a guest dying mid-command close the connection.
            Err(_) if !self.is_alive() => Err(VmmError::NotRunning),
            Err(e) => Err(VmmError::Io(format!("QMP {command}"), to_io(e))),
        }
    }
}

fn to_io(e: QmpError) -> std::io::Error {
    match e {
        QmpError::Io(e) => e,
        other => std::io::Error::other(other.to_string()),
    }
}

#[async_trait]
impl VmmInstance for QemuInstance {
    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn is_alive(&self) -> bool {
        self.proc.is_alive()
    }

    fn exit_reason(&self) -> Option<String> {
        if self.is_alive() {
            return None;
        }
        let tail = |f: &str, n| log_tail(&self.dir.join(f), 0, n).into_text();
        let mut why = format!("QEMU {}", self.proc.exit_description());
        if let Some(l) = tail(VMM_LOG, 1) {
            why.push_str(&format!("; stderr: {l}"));
        }
        // QEMU's own output is in vmm.log; the console is the guest's (a panic shows there).
        if let Some(c) = tail("console.log", 5) {
            why.push_str(&format!("; console: {c}"));
        }
        Some(why)
    }

    /// Connect to the agent's virtio-serial port. QEMU serves one client at a time: while
    /// an earlier connection is open, a new one is accepted by the kernel but carries no
    /// data until the earlier one closes, so callers drop the old stream first.
    async fn connect_agent(&self) -> Result<BoxedAgentStream, VmmError> {
        if !self.is_alive() {
            return Err(VmmError::NotRunning);
        }
        let s = tokio::net::UnixStream::connect(self.dir.join(AGENT_SOCK))
            .await
            .map_err(|e| VmmError::Io("connect to the agent socket".into(), e))?;
        Ok(Box::pin(s))
    }

    async fn pause(&self) -> Result<(), VmmError> {
        self.qmp_execute("stop", None, QMP_TIMEOUT).await.map(drop)
    }

    async fn resume(&self) -> Result<(), VmmError> {
        self.qmp_execute("cont", None, QMP_TIMEOUT).await.map(drop)
    }

    async fn request_shutdown(&self) -> Result<(), VmmError> {
        self.qmp_execute("system_powerdown", None, QMP_TIMEOUT)
            .await
            .map(drop)
    }

    async fn kill(&self) -> Result<(), VmmError> {
        self.proc.kill().await
    }

    async fn wait_exit(&self, timeout: Duration) -> bool {
        self.proc.wait_exit(timeout).await
    }

    async fn save_snapshot(&self, dir: &Path) -> Result<SavedState, VmmError> {
        super::qemu_snapshot::save(self, dir).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::process::proc_stat;
    use crate::vmm::testkit::spec;
    use crate::vmm::NetMode;

    fn after<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn argv_for_tcg_with_disk() {
        let d = Path::new("/var/lib/bandsox/vms/ab12");
        let argv = build_argv(
            Path::new("/usr/bin/qemu-system-x86_64"),
            &spec(d),
            AccelKind::Tcg,
            Some(2_445_404),
        )
        .unwrap();
        assert_eq!(argv[0], "/usr/bin/qemu-system-x86_64");
        for f in ["-nodefaults", "-no-user-config", "-no-reboot"] {
            assert!(argv.iter().any(|a| a == f), "{f} missing");
        }
        assert_eq!(after(&argv, "-machine"), ["microvm,rtc=on"]);
        assert_eq!(after(&argv, "-accel"), ["tcg"]);
        assert_eq!(after(&argv, "-cpu"), ["max"]);
        assert_eq!(after(&argv, "-m"), ["256"]);
        assert_eq!(after(&argv, "-smp"), ["2"]);
        assert_eq!(after(&argv, "-kernel"), ["/s/boot/vmlinuz"]);
        assert_eq!(after(&argv, "-initrd"), ["/s/boot/initrd"]);
        let append = after(&argv, "-append")[0];
        assert!(append.starts_with("console=ttyS0 panic=-1"), "{append}");
        assert!(append.ends_with(" bandsox.name=web-1"), "{append}");
        assert!(append.contains(" tsc_early_khz=2445404 "), "{append}");
        assert_eq!(
            after(&argv, "-chardev"),
            [
                "file,id=console,path=/var/lib/bandsox/vms/ab12/console.log,append=on",
                "socket,id=qmp,path=/var/lib/bandsox/vms/ab12/qmp.sock,server=on,wait=off",
                "socket,id=agent,path=/var/lib/bandsox/vms/ab12/agent.sock,server=on,wait=off",
            ]
        );
        assert_eq!(after(&argv, "-serial"), ["chardev:console"]);
        assert_eq!(after(&argv, "-mon"), ["chardev=qmp,mode=control"]);
        assert_eq!(
            after(&argv, "-device"),
            [
                "virtio-serial-device",
                "virtserialport,chardev=agent,name=org.bandsox.agent",
                "virtio-blk-device,drive=vda"
            ]
        );
        assert_eq!(
            after(&argv, "-drive"),
            ["id=vda,file=/var/lib/bandsox/vms/ab12/disk.ext4,format=raw,if=none,cache=writeback,discard=unmap"]
        );
        assert_eq!(
            after(&argv, "-pidfile"),
            ["/var/lib/bandsox/vms/ab12/vmm.pid"]
        );
        assert!(after(&argv, "-netdev").is_empty());
    }

    #[test]
    fn argv_variants() {
        let d = Path::new("/tmp/v,1");
        let mut s = spec(d);
        s.disk = None;
        s.net = crate::net::plan(NetMode::User, "ab12", None, None).unwrap();
        let argv = build_argv(Path::new("/q"), &s, AccelKind::Kvm, Some(2_445_404)).unwrap();
        assert_eq!(after(&argv, "-accel"), ["kvm"]);
        assert_eq!(after(&argv, "-cpu"), ["host"]);
        assert!(
            !after(&argv, "-append")[0].contains("tsc_early_khz"),
            "KVM guests have kvm-clock"
        );
        assert!(after(&argv, "-drive").is_empty());
        assert_eq!(after(&argv, "-netdev"), ["user,id=net0"]);
        let mac = crate::net::mac_for("ab12");
        assert!(after(&argv, "-device")
            .contains(&format!("virtio-net-device,netdev=net0,mac={mac}").as_str()));
        assert!(after(&argv, "-append")[0]
            .contains(" bandsox.net=10.0.2.15/24,10.0.2.2,10.0.2.3 bandsox.name="));
        // Commas in paths are doubled inside option strings.
        assert!(after(&argv, "-chardev")
            .contains(&"socket,id=qmp,path=/tmp/v,,1/qmp.sock,server=on,wait=off"));

        s.net = crate::net::plan(NetMode::Tap, "0123456789ab", Some(0), None).unwrap();
        let argv = build_argv(Path::new("/q"), &s, AccelKind::Tcg, None).unwrap();
        assert_eq!(
            after(&argv, "-netdev"),
            ["tap,id=net0,ifname=bsx0123456789ab,script=no,downscript=no"]
        );
        assert!(after(&argv, "-append")[0].contains(" bandsox.net=172.30.0.2/30,172.30.0.1"));
        s.net = None;
        // A template's RAM is a shared file the machine names.
        s.memory_file = Some(d.join("mem.ram"));
        let argv = build_argv(Path::new("/q"), &s, AccelKind::Tcg, None).unwrap();
        assert_eq!(
            after(&argv, "-machine"),
            ["microvm,rtc=on,memory-backend=mem"]
        );
        assert_eq!(
            after(&argv, "-object"),
            ["memory-backend-file,id=mem,size=256M,mem-path=/tmp/v,,1/mem.ram,share=on"]
        );
        s.memory_file = None;
        s.name = "bad name".into();
        assert!(matches!(
            build_argv(Path::new("/q"), &s, AccelKind::Tcg, None),
            Err(VmmError::StartFailed(_))
        ));
    }

    #[test]
    fn long_socket_paths_fail_clearly() {
        let long = PathBuf::from(format!("/{}", "d".repeat(100)));
        match build_argv(Path::new("/q"), &spec(&long), AccelKind::Tcg, None) {
            Err(VmmError::StartFailed(m)) => assert!(m.contains("at most 107"), "{m}"),
            other => panic!("expected StartFailed, got {other:?}"),
        }
        let ok = PathBuf::from(format!("/{}", "d".repeat(107 - 1 - "/agent.sock".len())));
        assert_eq!(ok.join("agent.sock").as_os_str().len(), 107);
        assert!(build_argv(Path::new("/q"), &spec(&ok), AccelKind::Tcg, None).is_ok());
    }

    /// A process that is not QEMU (a shell running a fake QMP server) exercises launch's
    /// error path, pause/resume through QMP errors, kill and reaping, and adopt's cmdline
    /// check, without needing QEMU.
    #[tokio::test]
    async fn launch_failure_reports_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let b = QemuBackend {
            binary: "/bin/sh".into(),
            accel: Accel {
                kind: AccelKind::Tcg,
                reason: "test".into(),
            },
            version: "test".into(),
            tsc_khz: None,
        };
        let argv = vec![
            "/bin/sh".to_string(),
            "-c".into(),
            "echo 'qemu-system-x86_64: -drive file=x: Could not open x' >&2; exit 1".into(),
        ];
        let err = b.launch_argv(dir.path(), argv.clone()).await.err().unwrap();
        match err {
            VmmError::StartFailed(m) => assert!(m.contains("Could not open x"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(load_args(dir.path()).unwrap().argv, argv);
    }

    #[tokio::test]
    async fn fake_qemu_lifecycle_and_adopt() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let b = QemuBackend {
            binary: "/bin/sleep".into(),
            accel: Accel {
                kind: AccelKind::Tcg,
                reason: "test".into(),
            },
            version: "test".into(),
            tsc_khz: None,
        };
        // The "VMM" is `sleep`; a fake QMP server on its socket answers for it.
        let sock2 = d.join(QMP_SOCK);
        let server = tokio::spawn(async move {
            // Bind once launch_argv has removed stale sockets and started the process.
            tokio::time::sleep(Duration::from_millis(100)).await;
            super::super::qmp::tests::fake_server(&sock2, |cmd, _| match cmd {
                "qmp_capabilities" | "stop" => Some(serde_json::json!({"return": {}})),
                _ => Some(serde_json::json!({"error": {"class": "GenericError",
                    "desc": "Resetting the Virtual Machine is required"}})),
            })
        });
        let argv = vec!["/bin/sleep".to_string(), "30".into()];
        let inst = b.launch_argv(&d, argv.clone()).await.unwrap();
        assert!(inst.is_alive());
        inst.pause().await.unwrap();
        match inst.resume().await {
            Err(VmmError::Refused { op, message }) => {
                assert_eq!(op, "cont");
                assert_eq!(message, "Resetting the Virtual Machine is required");
            }
            other => panic!("{other:?}"),
        }

        // Adopt: needs vmm.pid (QEMU writes it; sleep does not) and a matching cmdline.
        std::fs::write(d.join("vmm.pid"), format!("{}\n", inst.pid())).unwrap();
        let adopted = adopt_dir(&d).expect("adopt");
        let record = d.join(ARGS_FILE);
        let adopt_again = || adopt_dir(&d).is_some();
        crate::vmm::testkit::check_adoption(&inst, &adopted, &record, adopt_again).await;
        assert!(
            proc_stat(inst.pid()).is_none_or(|(s, _)| s != 'Z'),
            "zombie left"
        );
        let (task, seen) = server.await.unwrap();
        task.abort();
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "qmp_capabilities",
                "qmp_capabilities",
                "stop",
                "qmp_capabilities",
                "cont"
            ]
        );
    }
}
