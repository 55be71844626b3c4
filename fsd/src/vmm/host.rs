//! The `host` backend, for fast tests: the "VMM" is a `bandsox-agent` process in host mode
//! (`--listen unix:<dir>/agent.sock --root <dir>/root`), so the whole daemon — FUSE tree,
//! manager, runs, protocol — runs end to end without booting a VM.
//!
//! It is selected only by `BANDSOX_HOST_AGENT=<path to bandsox-agent>` and never by
//! `auto` on its own. Pause and resume are SIGSTOP/SIGCONT of the agent process; shutdown
//! is SIGTERM. Like a real VMM, the process runs in its own session and is re-adopted
//! from `vmm.pid` after a daemon restart.
//!
//! Safety: a "guest" command here is a host process. So that no user ever runs commands
//! as anyone but themselves:
//! - when the daemon is root, each VM's agent runs as the VM's owner (uid and gid from
//!   `vm.json`, no supplementary groups); its files live in `<vm>/host/` (owned by that
//!   user: `agent.sock`, and `root/`, the "guest" filesystem), and it is started with
//!   that directory as its working directory and relative paths, because the user cannot
//!   traverse the root-only state directory above it;
//! - a daemon that is not root runs every agent as itself, so it refuses to mount with
//!   `allow_other` ([`check_mount`]): only the mounting user can use that mount.
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::Signal;
use nix::unistd::{chdir, setgid, setgroups, setuid, Gid, Uid};

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

/// The host backend's own directory inside a VM directory.
pub const HOST_DIR: &str = "host";

/// May a daemon with the host backend mount this way? Refused when the mount would be
/// shared (`allow_other`) but the daemon cannot run each VM's commands as its owner.
pub fn check_mount(allow_other: bool, daemon_is_root: bool) -> Result<(), String> {
    if allow_other && !daemon_is_root {
        return Err(
            "BANDSOX_HOST_AGENT selects the host test backend, whose commands run as host \
             processes of the daemon's user; a daemon that is not root cannot run them as \
             each VM's owner, so it refuses a mount other users can use (allow_other). \
             Mount with --private (mount option: no allow_other), or run the daemon as root"
                .into(),
        );
    }
    Ok(())
}

/// The owner (uid, gid) recorded in `<dir>/vm.json`.
fn owner_of(dir: &Path) -> Option<(u32, u32)> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("vm.json")).ok()?).ok()?;
    let uid = u32::try_from(v.get("uid")?.as_u64()?).ok()?;
    let gid = u32::try_from(v.get("gid")?.as_u64()?).ok()?;
    Some((uid, gid))
}

/// Make `dir` (and its `root/`) exist and belong to `owner`.
fn prepare_host_dir(dir: &Path, owner: Option<(u32, u32)>) -> Result<(), VmmError> {
    use std::os::unix::fs::DirBuilderExt;
    let root = dir.join("root");
    for d in [dir, &root] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)
            .map_err(|e| VmmError::Io(format!("create {}", d.display()), e))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(d, Some(uid), Some(gid))
                .map_err(|e| VmmError::Io(format!("chown {}", d.display()), e))?;
        }
    }
    Ok(())
}

struct HostInstance {
    proc: VmmProcess,
    sock: PathBuf,
}

#[async_trait]
impl Backend for HostBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Host
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

    /// Test backend: its processes run as the VM's owner, not confined.
    fn vmm_overhead_mib(&self, _memory_mib: u32) -> Option<u64> {
        None
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn VmmInstance>, VmmError> {
        let host_dir = spec.dir.join(HOST_DIR);
        // As root: the agent runs as the VM's owner. Otherwise it runs as we do.
        let owner = if nix::unistd::geteuid().is_root() {
            Some(owner_of(&spec.dir).ok_or_else(|| {
                VmmError::StartFailed(format!(
                    "no owner in {}/vm.json: the host backend will not run commands as root for an unknown user",
                    spec.dir.display()
                ))
            })?)
        } else {
            None
        };
        prepare_host_dir(&host_dir, owner)?;
        let sock = host_dir.join("agent.sock");
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
            .arg("unix:agent.sock")
            .arg("--root")
            .arg("root")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let cwd = CString::new(host_dir.as_os_str().as_bytes())
            .map_err(|_| VmmError::StartFailed("VM directory path contains NUL".into()))?;
        let ids = owner
            .filter(|(uid, _)| *uid != 0)
            .map(|(uid, gid)| (Uid::from_raw(uid), Gid::from_raw(gid)));
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // syscalls (chdir, setgroups, setgid, setuid: nix's thin wrappers, which pass a
        // `CStr` through as it is and allocate nothing) on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                chdir(cwd.as_c_str())?;
                if let Some((uid, gid)) = ids {
                    setgroups(&[])?;
                    setgid(gid)?;
                    setuid(uid)?;
                }
                Ok(())
            });
        }
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
        // Ours only if it is an agent listening on agent.sock in this VM's host directory.
        let host_dir = spec.dir.join(HOST_DIR);
        let cwd = std::fs::read_link(format!("/proc/{}/cwd", proc.pid())).ok();
        if cwd.as_deref() != Some(host_dir.as_path())
            || !argv.iter().any(|a| a == "unix:agent.sock")
        {
            return Ok(None);
        }
        Ok(Some(Box::new(HostInstance {
            proc,
            sock: host_dir.join("agent.sock"),
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
        self.proc.signal(Signal::SIGSTOP)
    }
    async fn resume(&self) -> Result<(), VmmError> {
        self.proc.signal(Signal::SIGCONT)
    }
    async fn request_shutdown(&self) -> Result<(), VmmError> {
        self.proc.signal(Signal::SIGTERM)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_mounts_need_a_root_daemon() {
        assert!(check_mount(true, false).is_err());
        assert!(check_mount(true, true).is_ok());
        assert!(check_mount(false, false).is_ok());
        assert!(check_mount(false, true).is_ok());
    }

    #[test]
    fn owner_comes_from_the_record() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(owner_of(d.path()), None);
        std::fs::write(d.path().join("vm.json"), r#"{"uid": 1000, "gid": 100}"#).unwrap();
        assert_eq!(owner_of(d.path()), Some((1000, 100)));
    }
}
