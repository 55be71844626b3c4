//! A running Firecracker: adopting one a previous daemon started, controlling it through
//! the API (pause, resume, shutdown, snapshot), and saying why it failed or ended.
//!
//! Invariants:
//! - A process is adopted only when it is provably this VM's (its command line, or its
//!   jail and binary, match `firecracker.json`).
//! - Failure reasons quote only this run's log lines ([`LogStarts`]).
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::api::{ApiClient, ApiError};
use super::launch::{load_record, LogStarts};
use super::model::{ActionType, VmStateRequest};
use super::{
    jailer, snapshot, vsock, Jail, API_SOCK, API_TIMEOUT, CONSOLE_LOG, FC_LOG, VMM_LOG, VSOCK_SOCK,
};
use crate::logcap::log_tail;
use crate::vmm::process::VmmProcess;
use crate::vmm::{BoxedAgentStream, VmmError, VmmInstance};

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
    pub(super) proc: VmmProcess,
    /// The VM directory (pid file, console, stderr, logs).
    pub(super) dir: PathBuf,
    /// Firecracker's cwd: its sockets (the VM directory, or the jail root).
    pub(super) root: PathBuf,
    pub(crate) jail: Option<Jail>,
    /// Where the logs stood when this process started (or was adopted).
    pub(super) logs: LogStarts,
    pub(super) api: ApiClient,
}

impl FcInstance {
    pub(super) fn new(
        proc: VmmProcess,
        dir: &Path,
        root: &Path,
        jail: Option<Jail>,
        logs: LogStarts,
    ) -> Self {
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
