//! The `host` backend, for fast tests: the "VMM" is a `bandsox-agent` process in host mode
//! (`--listen unix:<dir>/agent.sock --root <dir>/root`), so the whole daemon — FUSE tree,
//! manager, runs, protocol — runs end to end without booting a VM.
//!
//! It is selected only by `BANDSOX_HOST_AGENT=<path to bandsox-agent>` and never by
//! `auto` on its own. Pause and resume are SIGSTOP/SIGCONT of the agent process; shutdown
//! is SIGTERM. Like a real VMM, the process runs in its own session and is re-adopted
//! from `vmm.pid` after a daemon restart.
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Backend, BackendKind, BoxedAgentStream, VmSpec, VmmError, VmmInstance};

pub struct HostBackend {
    agent: PathBuf,
}

impl HostBackend {
    pub fn new(agent: PathBuf) -> Self {
        HostBackend { agent }
    }
}

/// True while `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .map(|state| state != "Z" && state != "X")
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Does `/proc/<pid>/cmdline` mention `needle` (our VM directory)?
pub fn cmdline_mentions(pid: u32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(needle))
        .unwrap_or(false)
}

struct HostInstance {
    pid: u32,
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
        // SAFETY: setsid is async-signal-safe and touches no Rust state in the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| VmmError::StartFailed(format!("{}: {e}", self.agent.display())))?;
        let pid = child.id();
        // Reap our child when it exits so `is_alive` sees it gone (no zombies).
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        std::fs::write(spec.pid_path(), format!("{pid}\n"))
            .map_err(|e| VmmError::Io("pid file".into(), e))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sock.exists() {
            if !pid_alive(pid) {
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
        Ok(Box::new(HostInstance { pid, sock }))
    }

    async fn adopt(&self, spec: &VmSpec) -> Result<Option<Box<dyn VmmInstance>>, VmmError> {
        let Ok(text) = std::fs::read_to_string(spec.pid_path()) else {
            return Ok(None);
        };
        let Ok(pid) = text.trim().parse::<u32>() else {
            return Ok(None);
        };
        if !pid_alive(pid) || !cmdline_mentions(pid, &spec.dir.to_string_lossy()) {
            return Ok(None);
        }
        Ok(Some(Box::new(HostInstance {
            pid,
            sock: spec.dir.join("agent.sock"),
        })))
    }
}

impl HostInstance {
    fn signal(&self, sig: i32) -> Result<(), VmmError> {
        // SAFETY: kill(2) with a pid we started; no memory is involved.
        if unsafe { libc::kill(self.pid as i32, sig) } != 0 {
            return Err(VmmError::NotRunning);
        }
        Ok(())
    }
}

#[async_trait]
impl VmmInstance for HostInstance {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn is_alive(&self) -> bool {
        pid_alive(self.pid)
    }
    async fn connect_agent(&self) -> Result<BoxedAgentStream, VmmError> {
        let s = tokio::net::UnixStream::connect(&self.sock)
            .await
            .map_err(|e| VmmError::Io("connect agent".into(), e))?;
        Ok(Box::pin(s))
    }
    async fn pause(&self) -> Result<(), VmmError> {
        self.signal(libc::SIGSTOP)
    }
    async fn resume(&self) -> Result<(), VmmError> {
        self.signal(libc::SIGCONT)
    }
    async fn request_shutdown(&self) -> Result<(), VmmError> {
        self.signal(libc::SIGTERM)
    }
    async fn kill(&self) -> Result<(), VmmError> {
        if self.is_alive() {
            let _ = self.signal(libc::SIGCONT);
            let _ = self.signal(libc::SIGKILL);
        }
        self.wait_exit(Duration::from_secs(5)).await;
        Ok(())
    }
    async fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.is_alive() {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}
