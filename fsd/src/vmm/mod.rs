//! VMM backends: how a VM process is started, controlled and reached.
//!
//! A backend turns a [`VmSpec`] into a running VMM process and hands back a [`VmmInstance`]
//! that controls exactly that process. Invariants every backend keeps:
//! - Everything a VM's VMM needs or produces (sockets, pid file, console log, VMM logs)
//!   lives in the VM's own state directory [`VmSpec::dir`]; two VMs never share a path.
//! - The VMM runs in its own session (`setsid`) so it survives a daemon restart, and its
//!   pid is written to `<dir>/vmm.pid`; [`Backend::adopt`] re-attaches to it from that
//!   directory alone.
//! - No method blocks for long: each has a deadline and reports a [`VmmError`].
//! - The agent channel is returned as a plain byte stream; the protocol on top of it
//!   is the agent client's business, not the backend's.
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

pub mod accel;
pub mod firecracker;
pub mod host;
pub mod process;
pub mod qemu;
pub mod qemu_memory;
pub mod qemu_snapshot;
pub mod qemu_vsock;
pub mod qmp;
#[cfg(test)]
pub(crate) mod testkit;

/// A duplex byte stream to the guest agent.
pub trait AgentStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AgentStream for T {}
pub type BoxedAgentStream = Pin<Box<dyn AgentStream>>;

/// Which VMM drives a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Qemu,
    Firecracker,
    /// The test backend (`BANDSOX_HOST_AGENT`): the agent as a host process, no VM.
    Host,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Qemu => "qemu",
            BackendKind::Firecracker => "firecracker",
            BackendKind::Host => "host",
        })
    }
}

/// Guest networking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    None,
    User,
    Tap,
}

/// Everything a backend needs to start one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The VM's name; also the guest hostname (passed as `bandsox.name=` on the cmdline).
    pub name: String,
    /// The VM's state directory (exists, owner-only). All VMM files go here.
    pub dir: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The VM's own writable disk image (ext4), attached as the first virtio-blk disk
    /// (`/dev/vda` in the guest). `None` = no disk: the agent stays in the initramfs.
    pub disk: Option<PathBuf>,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The guest's network; `None` = `net=none` (no NIC at all).
    pub net: Option<crate::net::NetPlan>,
    /// Guest RAM in this file, mapped shared, so that a snapshot can leave RAM out of the
    /// device state and clones can map a copy of the file copy-on-write (a pool's
    /// template, see `crate::pool`). `None`: anonymous memory.
    pub memory_file: Option<PathBuf>,
}

impl VmSpec {
    /// `StartFailed` unless the kernel, initramfs and disk (if any) to boot exist.
    pub fn check_files(&self) -> Result<(), VmmError> {
        for (what, p) in [("kernel", &self.kernel), ("initramfs", &self.initrd)] {
            if !p.is_file() {
                return Err(VmmError::StartFailed(format!(
                    "guest {what} {} is missing (run `bandsox guest-build` or mount-helpers/setup)",
                    p.display()
                )));
            }
        }
        if let Some(d) = &self.disk {
            if !d.is_file() {
                return Err(VmmError::StartFailed(format!(
                    "disk {} is missing",
                    d.display()
                )));
            }
        }
        Ok(())
    }

    /// Path of the serial console log every backend writes.
    pub fn console_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// Path of the pid file every backend writes.
    pub fn pid_path(&self) -> PathBuf {
        self.dir.join("vmm.pid")
    }
    /// The network mode this spec asks for.
    pub fn net_mode(&self) -> NetMode {
        match &self.net {
            None => NetMode::None,
            Some(p) if p.tap.is_some() => NetMode::Tap,
            Some(_) => NetMode::User,
        }
    }
    /// ` bandsox.net=...` for the guest kernel command line ("" without a network).
    pub fn net_cmdline(&self) -> String {
        match &self.net {
            Some(p) => format!(" {}{}", bandsox_agent::guestnet::CMDLINE_NET_KEY, p.guest),
            None => String::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The VMM binary is missing or unusable.
    #[error("{0}")]
    Unavailable(String),
    /// The VMM process could not be started or died during start.
    #[error("VMM failed to start: {0}")]
    StartFailed(String),
    /// The VMM process is gone.
    #[error("VMM process is not running")]
    NotRunning,
    /// The VMM answered a control request with an error.
    #[error("VMM refused {op}: {message}")]
    Refused { op: String, message: String },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The backend cannot do this at all (e.g. snapshots of the host test backend).
    #[error("{0}")]
    Unsupported(String),
    /// The input cannot be used by this backend as it is (e.g. a snapshot in a format
    /// this VMM cannot load); nothing was started.
    #[error("{0}")]
    Incompatible(String),
}

/// What [`VmmInstance::save_snapshot`] wrote (file names relative to the snapshot dir).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// The VMM state (QEMU: the migration stream, which also holds guest memory;
    /// Firecracker: the microVM state file).
    pub state_file: String,
    /// Guest memory when kept apart from the state (Firecracker).
    pub memory_file: Option<String>,
    /// Backend-specific data the restore needs (QEMU: the command line).
    pub restore: serde_json::Value,
}

/// A backend: knows how to start and adopt VMM processes of one kind.
#[async_trait]
pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// One line describing the backend's configuration (e.g. accelerator and why).
    fn describe(&self) -> String;
    /// `Some(why)` when this backend was offered only because a test-only switch forced
    /// it (shown in `info` and `events`).
    fn forced(&self) -> Option<String> {
        None
    }
    /// Whether VMs need the guest kernel and initramfs (false only for test backends).
    fn needs_boot_files(&self) -> bool {
        true
    }
    /// Host memory the VMM process needs beyond the guest's (MiB), for its cgroup's
    /// `memory.max` (see `crate::cgroup`); `None`: its processes are not confined.
    fn vmm_overhead_mib(&self, memory_mib: u32) -> Option<u64> {
        Some(crate::cgroup::overhead_mib(
            &self.kind().to_string(),
            false,
            memory_mib,
        ))
    }
    /// Start the VMM for `spec`; returns once the process runs and its control channel
    /// answers (not when the guest has booted).
    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn VmmInstance>, VmmError>;
    /// Re-attach to a VMM left running by an earlier daemon, from `spec.dir` alone.
    /// `Ok(None)` when no live VMM belongs to that directory.
    async fn adopt(&self, spec: &VmSpec) -> Result<Option<Box<dyn VmmInstance>>, VmmError>;
    /// Whether VMs of this backend can be snapshotted and restored (false only for test
    /// backends).
    fn can_snapshot(&self) -> bool {
        false
    }
    /// Refuse, before anything is created, a snapshot this backend cannot restore (e.g. a
    /// VMM version that cannot read its format): [`VmmError::Incompatible`] saying why.
    fn check_restore(
        &self,
        snap_dir: &std::path::Path,
        saved: &SavedState,
    ) -> Result<(), VmmError> {
        let _ = (snap_dir, saved);
        Ok(())
    }
    /// Start a VMM for `spec` from the snapshot in `snap_dir` (saved by
    /// [`VmmInstance::save_snapshot`]); returns once the guest runs again. Every path the
    /// new VMM uses is in `spec.dir` (its own disk copy, sockets, logs); nothing of the
    /// snapshot's source VM is touched.
    async fn restore(
        &self,
        spec: &VmSpec,
        snap_dir: &std::path::Path,
        saved: &SavedState,
    ) -> Result<Box<dyn VmmInstance>, VmmError> {
        let _ = (spec, snap_dir, saved);
        Err(VmmError::Unsupported(format!(
            "the {} backend cannot restore snapshots",
            self.kind()
        )))
    }
}

/// One running VMM process.
#[async_trait]
pub trait VmmInstance: Send + Sync {
    fn pid(&self) -> u32;
    /// True while the VMM process exists (not a zombie).
    fn is_alive(&self) -> bool;
    /// Once the process is gone: how it ended and the VMM's own last error, in one line
    /// (`None` while it runs, or when the backend knows nothing beyond the console).
    fn exit_reason(&self) -> Option<String> {
        None
    }
    /// Open a fresh byte stream to the guest agent. May fail while the guest boots;
    /// callers retry until their own deadline.
    async fn connect_agent(&self) -> Result<BoxedAgentStream, VmmError>;
    /// Freeze all vCPUs.
    async fn pause(&self) -> Result<(), VmmError>;
    /// Continue after `pause`.
    async fn resume(&self) -> Result<(), VmmError>;
    /// Ask the guest to power off (ACPI or equivalent); does not wait for exit.
    async fn request_shutdown(&self) -> Result<(), VmmError>;
    /// Kill the VMM process now and reap it; idempotent.
    async fn kill(&self) -> Result<(), VmmError>;
    /// Wait until the VMM process has exited, at most `timeout`; true when it exited.
    async fn wait_exit(&self, timeout: Duration) -> bool;
    /// Save the paused VM's VMM state and memory into the existing directory `dir`. The
    /// caller paused the VM and resumes it afterwards; the disk is the caller's business.
    async fn save_snapshot(&self, dir: &std::path::Path) -> Result<SavedState, VmmError> {
        let _ = dir;
        Err(VmmError::Unsupported(
            "this backend cannot take snapshots".into(),
        ))
    }
}
