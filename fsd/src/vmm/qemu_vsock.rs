//! Test-only QEMU variant whose agent channel is the guest's **virtio-vsock**, exactly as
//! on Firecracker, instead of virtio-serial: QEMU's `vhost-user-vsock-device` backed by
//! `vhost-device-vsock` (rust-vmm), whose host side is the same hybrid-vsock unix socket
//! Firecracker offers (`CONNECT 52\n` → `OK <port>\n`). The daemon reaches the agent with
//! the Firecracker backend's connector (`firecracker::vsock`), the guest runs its vsock
//! modules and the agent's vsock listener: everything on the Firecracker path except
//! Firecracker's own device model runs under TCG.
//!
//! Turned on by `BANDSOX_QEMU_VSOCK=1` in the daemon's environment (tests only; see
//! [`VSOCK_ENV`]); `vhost-device-vsock` from PATH or `$BANDSOX_VHOST_VSOCK`. `info` and
//! `events` show the variant (it is reported like a forced backend).
//!
//! Files in the VM directory besides QEMU's (`qemu.rs`):
//! ```text
//! vhost-vsock.sock  vhost-user control socket (server: vhost-device-vsock; QEMU connects)
//! vsock.sock        hybrid vsock (server: vhost-device-vsock); `CONNECT 52` reaches the agent
//! vhost-vsock.pid   the helper's pid (written by us; removed once it is gone)
//! vhost-vsock.log   the helper's stdout and stderr (appended)
//! ```
//! Invariants:
//! - The helper is started before QEMU (QEMU connects to it at start) and never outlives
//!   its QEMU: killed with it, and killed as soon as QEMU is seen gone (the helper would
//!   otherwise wait for another frontend forever).
//! - vhost-user needs guest memory QEMU can share with the helper: a memfd
//!   (`memory-backend-memfd,share=on`) of exactly the VM's size.
//! - No snapshots: a vhost-user-vsock device blocks migration in QEMU, so `can_snapshot`
//!   is false and `snapshot` answers EOPNOTSUPP with that reason.
//! - After a launch, nothing connects to `vsock.sock` before the guest's console shows the
//!   agent's `bandsox-agent: ready` line (printed once its vsock listener is bound).
//!   Measured with vhost-device-vsock 0.3.0 and QEMU 7.2: host connections made while the
//!   guest driver is still setting up its virtqueues ("Received a backend event before
//!   vring initialization") wedge the device in about one boot in six, after which every
//!   `CONNECT` times out for good; waiting for the ready line, 8 boots in 8 connected.
//!   Firecracker has no such race (an early `CONNECT` is simply reset).
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::firecracker::vsock;
use super::process::VmmProcess;
use super::qemu::{self, check_socket_path, QemuBackend, QemuInstance};
use super::{Backend, BackendKind, BoxedAgentStream, SavedState, VmSpec, VmmError, VmmInstance};
use crate::tools::find_tool;

/// `1`: every QEMU VM gets its agent channel over virtio-vsock (tests only).
pub const VSOCK_ENV: &str = "BANDSOX_QEMU_VSOCK";
/// The helper binary to use instead of `vhost-device-vsock` on PATH.
pub const HELPER_ENV: &str = "BANDSOX_VHOST_VSOCK";
pub const HELPER_BINARY: &str = "vhost-device-vsock";
pub const VHOST_SOCK: &str = "vhost-vsock.sock";
pub const VSOCK_SOCK: &str = "vsock.sock";
pub const HELPER_PID: &str = "vhost-vsock.pid";
pub const HELPER_LOG: &str = "vhost-vsock.log";
/// The guest's context id (the device is the VM's own; any value ≥ 3).
pub const GUEST_CID: u32 = 3;
/// QEMU's id of the shared guest memory object.
const MEM_ID: &str = "bxmem";
/// How long the helper gets to create its sockets.
const HELPER_DEADLINE: Duration = Duration::from_secs(5);

/// The QEMU backend with the agent on virtio-vsock.
pub struct QemuVsockBackend {
    qemu: QemuBackend,
    helper: PathBuf,
}

impl QemuVsockBackend {
    /// `Ok(None)` unless [`VSOCK_ENV`] is `1`; an error when it is but the helper is
    /// missing (a test asking for this variant must not silently get another).
    pub fn from_settings(
        qemu: QemuBackend,
        settings: &crate::settings::VmmSettings,
    ) -> Result<Result<Self, QemuBackend>, VmmError> {
        if !settings.qemu_vsock {
            return Ok(Err(qemu));
        }
        let helper = match settings.vhost_vsock.clone().filter(|v| !v.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => find_tool(HELPER_BINARY).ok_or_else(|| {
                VmmError::Unavailable(format!(
                    "{VSOCK_ENV}=1 needs {HELPER_BINARY} on PATH (cargo install \
                     {HELPER_BINARY}; mount-helpers/setup does) or {HELPER_ENV}"
                ))
            })?,
        };
        Ok(Ok(QemuVsockBackend { qemu, helper }))
    }

    pub fn new(qemu: QemuBackend, helper: PathBuf) -> Self {
        QemuVsockBackend { qemu, helper }
    }

    /// Start the helper for the VM in `dir`; returns once its vhost-user socket exists.
    async fn start_helper(&self, dir: &Path) -> Result<VmmProcess, VmmError> {
        let (vhost, uds) = (dir.join(VHOST_SOCK), dir.join(VSOCK_SOCK));
        for s in [&vhost, &uds] {
            check_socket_path(s)?;
            match std::fs::remove_file(s) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(VmmError::Io(s.display().to_string(), e)),
            }
        }
        let log_path = dir.join(HELPER_LOG);
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|e| VmmError::Io(log_path.display().to_string(), e))
        };
        let mut cmd = Command::new(&self.helper);
        cmd.arg("--vm")
            .arg(helper_vm_arg(dir)?)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(open()?)
            .stderr(open()?);
        let helper = VmmProcess::spawn(cmd, "vhost-device-vsock", dir.join(HELPER_PID), true)?;
        let deadline = Instant::now() + HELPER_DEADLINE;
        while !vhost.exists() {
            if !helper.is_alive() || Instant::now() >= deadline {
                let why = format!(
                    "{HELPER_BINARY} {} without creating {}: {}",
                    if helper.is_alive() {
                        "did not answer in time"
                    } else {
                        "exited"
                    },
                    vhost.display(),
                    crate::logcap::log_tail(&log_path, 0, 5)
                );
                let _ = helper.signal(nix::sys::signal::Signal::SIGKILL);
                return Err(VmmError::StartFailed(why));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(helper)
    }
}

/// The helper's `--vm` value for the VM in `dir`.
pub fn helper_vm_arg(dir: &Path) -> Result<String, VmmError> {
    let s = |p: PathBuf| {
        p.to_str()
            .map(String::from)
            .ok_or_else(|| VmmError::StartFailed(format!("{} is not UTF-8", p.display())))
    };
    let (vhost, uds) = (s(dir.join(VHOST_SOCK))?, s(dir.join(VSOCK_SOCK))?);
    if vhost.contains(',') || uds.contains(',') {
        return Err(VmmError::StartFailed(format!(
            "{HELPER_BINARY} cannot take a path with a comma: {}",
            dir.display()
        )));
    }
    Ok(format!(
        "guest-cid={GUEST_CID},socket={vhost},uds-path={uds}"
    ))
}

/// QEMU's argv for `spec` with the virtio-serial agent port replaced by a
/// vhost-user-vsock device on shared (memfd) memory. `argv` is `qemu::build_argv`'s.
pub fn vsock_argv(argv: &[String], spec: &VmSpec) -> Result<Vec<String>, VmmError> {
    let bad = |what: &str| {
        VmmError::StartFailed(format!(
            "the QEMU command line has no {what} to replace (qemu::build_argv changed?)"
        ))
    };
    let i = argv
        .windows(2)
        .position(|w| w[0] == "-device" && w[1] == "virtio-serial-device")
        .ok_or_else(|| bad("virtio-serial device"))?;
    // -device virtio-serial-device -chardev socket,id=agent,... -device virtserialport,...
    let serial = argv.get(i..i + 6).ok_or_else(|| bad("agent port"))?;
    if !serial[3].starts_with("socket,id=agent,") || !serial[5].starts_with("virtserialport,") {
        return Err(bad("agent port"));
    }
    let mut out: Vec<String> = argv[..i].to_vec();
    out.extend(argv[i + 6..].iter().cloned());
    let m = out
        .iter()
        .position(|a| a == "-machine")
        .ok_or_else(|| bad("-machine"))?;
    out[m + 1] = format!("{},memory-backend={MEM_ID}", out[m + 1]);
    let vhost = spec
        .dir
        .join(VHOST_SOCK)
        .to_str()
        .map(qemu::opt_escape)
        .ok_or_else(|| bad("UTF-8 directory"))?;
    let extra = [
        "-object".to_string(),
        format!(
            "memory-backend-memfd,id={MEM_ID},size={}M,share=on",
            spec.memory_mib
        ),
        "-chardev".into(),
        format!("socket,id=vsock,path={vhost}"),
        "-device".into(),
        "vhost-user-vsock-device,chardev=vsock".into(),
    ];
    // Before `-pidfile` (last), so the layout stays recognisable.
    let at = out
        .iter()
        .position(|a| a == "-pidfile")
        .unwrap_or(out.len());
    out.splice(at..at, extra);
    Ok(out)
}

#[async_trait]
impl Backend for QemuVsockBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn describe(&self) -> String {
        format!(
            "{}; agent over virtio-vsock through {} ({VSOCK_ENV}=1, test only: no snapshots)",
            self.qemu.describe(),
            self.helper.display()
        )
    }

    fn forced(&self) -> Option<String> {
        Some(format!(
            "{VSOCK_ENV}=1 (test only: the agent on virtio-vsock through {HELPER_BINARY}; \
             no snapshots)"
        ))
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn VmmInstance>, VmmError> {
        for (what, p) in [("kernel", &spec.kernel), ("initramfs", &spec.initrd)] {
            if !p.is_file() {
                return Err(VmmError::StartFailed(format!(
                    "guest {what} {} is missing (run `bandsox guest-build` or mount-helpers/setup)",
                    p.display()
                )));
            }
        }
        let argv = qemu::build_argv(
            self.qemu.binary(),
            spec,
            self.qemu.accel().kind,
            self.qemu.tsc_khz(),
        )?;
        let argv = vsock_argv(&argv, spec)?;
        let helper = self.start_helper(&spec.dir).await?;
        let console_from = std::fs::metadata(spec.console_path())
            .map(|m| m.len())
            .unwrap_or(0);
        match self.qemu.launch_argv(&spec.dir, argv).await {
            Ok(qemu) => Ok(Box::new(VsockInstance::new(
                qemu,
                Some(helper),
                &spec.dir,
                Some(console_from),
            ))),
            Err(e) => {
                let _ = helper.kill().await;
                Err(e)
            }
        }
    }

    async fn adopt(&self, spec: &VmSpec) -> Result<Option<Box<dyn VmmInstance>>, VmmError> {
        let Some(qemu) = qemu::adopt_dir(&spec.dir) else {
            return Ok(None);
        };
        let want = helper_vm_arg(&spec.dir)?;
        let helper = match VmmProcess::adopt(spec.dir.join(HELPER_PID), "vhost-device-vsock") {
            Some((p, argv)) if argv.contains(&want) => p,
            _ => {
                // QEMU runs but its helper is gone: the agent is unreachable; a restart
                // (stop, start) brings both back.
                tracing::warn!(dir = %spec.dir.display(), "adopted QEMU has no live {HELPER_BINARY}");
                return Ok(Some(Box::new(VsockInstance::new(
                    qemu, None, &spec.dir, None,
                ))));
            }
        };
        // Adopted after a daemon restart: the guest booted long ago.
        Ok(Some(Box::new(VsockInstance::new(
            qemu,
            Some(helper),
            &spec.dir,
            None,
        ))))
    }

    fn can_snapshot(&self) -> bool {
        false
    }
}

/// The agent's line on the console once it listens (see the module docs).
pub const READY_LINE: &[u8] = b"bandsox-agent: ready";

/// QEMU plus its vhost-device-vsock helper.
pub struct VsockInstance {
    qemu: QemuInstance,
    /// `None`: adopted while its helper was gone: controllable, but its agent is
    /// unreachable (a restart brings both back).
    helper: Option<VmmProcess>,
    dir: PathBuf,
    /// Launched by us: the console length at launch, until the ready line came after it.
    console_from: Option<u64>,
    guest_ready: std::sync::atomic::AtomicBool,
}

impl VsockInstance {
    fn new(
        qemu: QemuInstance,
        helper: Option<VmmProcess>,
        dir: &Path,
        console_from: Option<u64>,
    ) -> Self {
        VsockInstance {
            qemu,
            helper,
            dir: dir.to_path_buf(),
            console_from,
            guest_ready: std::sync::atomic::AtomicBool::new(console_from.is_none()),
        }
    }

    /// Has the guest's agent announced itself on the console since launch?
    fn guest_ready(&self) -> bool {
        use std::io::{Read, Seek, SeekFrom};
        use std::sync::atomic::Ordering;
        if self.guest_ready.load(Ordering::Relaxed) {
            return true;
        }
        let from = self.console_from.unwrap_or(0);
        let seen = (|| -> std::io::Result<bool> {
            let mut f = std::fs::File::open(self.dir.join("console.log"))?;
            f.seek(SeekFrom::Start(from))?;
            let mut buf = Vec::new();
            f.take(4 << 20).read_to_end(&mut buf)?;
            Ok(buf.windows(READY_LINE.len()).any(|w| w == READY_LINE))
        })()
        .unwrap_or(false);
        if seen {
            self.guest_ready.store(true, Ordering::Relaxed);
        }
        seen
    }

    /// Once QEMU is gone, the helper goes too (best effort, no waiting).
    fn reap_helper_if_orphaned(&self) {
        if let Some(helper) = self.helper.as_ref().filter(|h| h.is_alive()) {
            if !self.qemu.is_alive() {
                let _ = helper.signal(nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

#[async_trait]
impl VmmInstance for VsockInstance {
    fn pid(&self) -> u32 {
        self.qemu.pid()
    }

    fn is_alive(&self) -> bool {
        let alive = self.qemu.is_alive();
        if !alive {
            self.reap_helper_if_orphaned();
        }
        alive
    }

    fn exit_reason(&self) -> Option<String> {
        // Without its helper, as before the merge of the two instance kinds: none.
        self.helper.as_ref().and_then(|_| self.qemu.exit_reason())
    }

    async fn connect_agent(&self) -> Result<BoxedAgentStream, VmmError> {
        if self.helper.is_none() {
            return Err(VmmError::Io(
                "connect to the agent".into(),
                std::io::Error::other(format!(
                    "{HELPER_BINARY} is gone (restart the VM to start it again)"
                )),
            ));
        }
        if !self.is_alive() {
            return Err(VmmError::NotRunning);
        }
        if !self.guest_ready() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            return Err(VmmError::Io(
                "connect to the agent over vsock".into(),
                std::io::Error::other("the guest's agent is not listening yet (console)"),
            ));
        }
        vsock::connect_agent(
            &self.dir.join(VSOCK_SOCK),
            || self.qemu.is_alive() && self.helper.as_ref().is_some_and(VmmProcess::is_alive),
            || self.is_alive(),
            "vsock (vhost-device-vsock)",
        )
        .await
    }

    async fn pause(&self) -> Result<(), VmmError> {
        self.qemu.pause().await
    }

    async fn resume(&self) -> Result<(), VmmError> {
        self.qemu.resume().await
    }

    async fn request_shutdown(&self) -> Result<(), VmmError> {
        self.qemu.request_shutdown().await
    }

    async fn kill(&self) -> Result<(), VmmError> {
        let r = self.qemu.kill().await;
        if let Some(helper) = &self.helper {
            helper.kill().await?;
        }
        r
    }

    async fn wait_exit(&self, timeout: Duration) -> bool {
        let exited = self.qemu.wait_exit(timeout).await;
        if exited {
            self.reap_helper_if_orphaned();
        }
        exited
    }

    async fn save_snapshot(&self, _dir: &Path) -> Result<SavedState, VmmError> {
        let why = match self.helper {
            Some(_) => {
                "this VM's agent runs over vhost-user-vsock, which blocks QEMU's migration: \
                 no snapshots in the vsock test variant"
            }
            None => "this backend cannot take snapshots",
        };
        Err(VmmError::Unsupported(why.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::accel::AccelKind;

    fn spec(dir: &Path) -> VmSpec {
        VmSpec {
            name: "v".into(),
            dir: dir.to_path_buf(),
            vcpus: 1,
            memory_mib: 256,
            disk: Some(dir.join("disk.ext4")),
            kernel: "/b/vmlinuz".into(),
            initrd: "/b/initrd".into(),
            net: None,
            memory_file: None,
        }
    }

    #[test]
    fn the_agent_port_becomes_a_vhost_user_vsock_device() {
        let s = spec(Path::new("/vms/0123"));
        let base =
            qemu::build_argv(Path::new("/usr/bin/qemu"), &s, AccelKind::Tcg, Some(1)).unwrap();
        let v = vsock_argv(&base, &s).unwrap();
        let joined = v.join(" ");
        assert!(!joined.contains("virtio-serial"), "{joined}");
        assert!(!joined.contains("agent.sock"), "{joined}");
        assert!(
            joined.contains("-machine microvm,rtc=on,memory-backend=bxmem"),
            "{joined}"
        );
        assert!(
            joined.contains("-object memory-backend-memfd,id=bxmem,size=256M,share=on"),
            "{joined}"
        );
        assert!(
            joined.contains(
                "-chardev socket,id=vsock,path=/vms/0123/vhost-vsock.sock -device \
                 vhost-user-vsock-device,chardev=vsock -pidfile"
            ),
            "{joined}"
        );
        assert_eq!(v.len(), base.len() - 6 + 6);
        assert_eq!(
            helper_vm_arg(Path::new("/vms/0123")).unwrap(),
            "guest-cid=3,socket=/vms/0123/vhost-vsock.sock,uds-path=/vms/0123/vsock.sock"
        );
        assert!(helper_vm_arg(Path::new("/vms/a,b")).is_err());
        assert!(vsock_argv(&v, &s).is_err(), "no agent port left to replace");
    }
}
