//! The `host` backend, for fast tests: the "VMM" is a `bandsox-agent` process in host mode
//! (`--listen unix:<dir>/agent.sock --root <dir>/root`), so the whole daemon — FUSE tree,
//! manager, runs, protocol — runs end to end without booting a VM.
//!
//! It is selected only by `BANDSOX_HOST_AGENT=<path to bandsox-agent>` and never by
//! `auto` on its own. Pause and resume are SIGSTOP/SIGCONT of the agent process; shutdown
//! is SIGTERM. Like a real VMM, the process runs in its own session and is re-adopted
//! from `vmm.pid` after a daemon restart.
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::process::VmmProcess;
use super::{Backend, BackendKind, BoxedAgentStream, VmSpec, VmmError, VmmInstance};

pub struct HostBackend {
    agent: PathBuf,
}

impl HostBackend {
    pub fn new(agent: PathBuf) -> Self {
        HostBackend { agent }
    }
}

struct HostInstance {
    proc: VmmProcess,
    sock: PathBuf,
}

#[async_trait]
impl Backend for HostBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn describe(&self) -> String {
        format!(
            "host-mode agent {} (test backend, no VM)",
            self.agent.display()
        )
    }

    fn needs_boot_files(&self) -> bool {
        false
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn VmmInstance>, VmmError> {
        let root = spec.dir.join("root");
        std::fs::create_dir_all(&root).map_err(|e| VmmError::Io("root dir".into(), e))?;
        let sock = spec.dir.join("agent.sock");
        let _ = std::fs::remove_file(&sock);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.console_path())
            .map_err(|e| VmmError::Io("console log".into(), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| VmmError::Io("console log".into(), e))?;
        let mut cmd = Command::new(&self.agent);
        cmd.arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--root")
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let proc = VmmProcess::spawn(cmd, "host agent", spec.pid_path(), true)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sock.exists() {
            if !proc.is_alive() {
                return Err(VmmError::StartFailed("the host agent exited".into()));
            }
            if Instant::now() > deadline {
                return Err(VmmError::Timeout(
                    Duration::from_secs(5),
                    "agent socket".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Box::new(HostInstance { proc, sock }))
    }

    async fn adopt(&self, spec: &VmSpec) -> Result<Option<Box<dyn VmmInstance>>, VmmError> {
        let Some((proc, argv)) = VmmProcess::adopt(spec.pid_path(), "host agent") else {
            return Ok(None);
        };
        // Ours only if its command line names this VM's directory.
        let dir = spec.dir.to_string_lossy();
        if !argv.iter().any(|a| a.contains(&*dir)) {
            return Ok(None);
        }
        Ok(Some(Box::new(HostInstance {
            proc,
            sock: spec.dir.join("agent.sock"),
        })))
    }
}

#[async_trait]
impl VmmInstance for HostInstance {
    fn pid(&self) -> u32 {
        self.proc.pid()
    }
    fn is_alive(&self) -> bool {
        self.proc.is_alive()
    }
    async fn connect_agent(&self) -> Result<BoxedAgentStream, VmmError> {
        let s = tokio::net::UnixStream::connect(&self.sock)
            .await
            .map_err(|e| VmmError::Io("connect agent".into(), e))?;
        Ok(Box::pin(s))
    }
    async fn pause(&self) -> Result<(), VmmError> {
        self.proc.signal(libc::SIGSTOP)
    }
    async fn resume(&self) -> Result<(), VmmError> {
        self.proc.signal(libc::SIGCONT)
    }
    async fn request_shutdown(&self) -> Result<(), VmmError> {
        self.proc.signal(libc::SIGTERM)
    }
    async fn kill(&self) -> Result<(), VmmError> {
        self.proc.kill().await
    }
    async fn wait_exit(&self, timeout: Duration) -> bool {
        self.proc.wait_exit(timeout).await
    }
    async fn save_snapshot(&self, _dir: &std::path::Path) -> Result<super::SavedState, VmmError> {
        Err(VmmError::Unsupported(
            "the host test backend runs no VM, so it cannot take snapshots (use backend=qemu)"
                .into(),
        ))
    }
}
