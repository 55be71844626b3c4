//! One VMM process, as every process-based backend keeps it: spawned by us or adopted
//! from the VM directory's `vmm.pid`.
//!
//! Invariants:
//! - A spawned VMM runs in its own session (`setsid`) with every inherited fd above 2
//!   marked close-on-exec, so it survives the daemon and holds none of its files (no
//!   FUSE fd).
//! - A spawned VMM is reaped by a dedicated thread the moment it exits, so it never
//!   lingers as a zombie; `is_alive` is that thread's verdict. For an adopted VMM (not our
//!   child) `is_alive` reads `/proc/<pid>/stat`: not a zombie (or a zombie leader whose
//!   other threads, holding the process's files, are still exiting) and the same start
//!   time as when adopted, so a recycled pid is never mistaken for our VM.
//! - When the process is gone, its pid file is removed if it still names it, so a stale
//!   pid file never points at an unrelated process.
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::VmmError;

/// How long `kill` waits for the process to disappear after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// What the reaper thread reports about a process we spawned.
#[derive(Default)]
struct Reaped {
    exited: AtomicBool,
    status: parking_lot::Mutex<Option<ExitStatus>>,
}

pub struct VmmProcess {
    pid: u32,
    /// `QEMU`, `Firecracker`: for messages.
    name: &'static str,
    pid_file: PathBuf,
    /// Present when we spawned (and reap) the process.
    reaped: Option<Arc<Reaped>>,
    /// For adopted processes: start time from /proc, guarding against pid reuse.
    start_time: Option<u64>,
}

impl VmmProcess {
    /// Spawn `cmd` (arguments, working directory and stdio already set) in its own
    /// session and start its reaper. With `write_pid_file` the pid is written to
    /// `pid_file` (some VMMs write it themselves).
    pub fn spawn(
        mut cmd: Command,
        name: &'static str,
        pid_file: PathBuf,
        write_pid_file: bool,
    ) -> Result<Self, VmmError> {
        // SAFETY: the closure runs between fork and exec and only makes syscalls that are
        // async-signal-safe (setsid through nix's thin wrapper, close_range raw: nix has
        // none); it allocates nothing and touches no Rust state.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                // Mark every fd above stdio close-on-exec (std's own pipes already are).
                // Best effort: kernels before 5.11 lack the flag.
                libc::syscall(
                    libc::SYS_close_range,
                    3 as libc::c_uint,
                    libc::c_uint::MAX,
                    libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
                );
                Ok(())
            });
        }
        let program = cmd.get_program().to_string_lossy().into_owned();
        let mut child = cmd
            .spawn()
            .map_err(|e| VmmError::StartFailed(format!("cannot run {program}: {e}")))?;
        let pid = child.id();
        if write_pid_file {
            if let Err(e) = write_atomic(&pid_file, format!("{pid}\n").as_bytes()) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        }
        let reaped = Arc::new(Reaped::default());
        let reaper_state = reaped.clone();
        let reaper_pid_file = pid_file.clone();
        std::thread::Builder::new()
            .name(format!("vmm-reap-{pid}"))
            .spawn(move || {
                let status = child.wait();
                if let Ok(s) = &status {
                    *reaper_state.status.lock() = Some(*s);
                }
                reaper_state.exited.store(true, Ordering::SeqCst);
                remove_stale_pid_file(&reaper_pid_file, pid);
                tracing::debug!(pid, ?status, "{name} exited and was reaped");
            })
            .map_err(|e| VmmError::Io("reaper thread".into(), e))?;
        Ok(VmmProcess {
            pid,
            name,
            pid_file,
            reaped: Some(reaped),
            start_time: None,
        })
    }

    /// The live process named by `pid_file` and its command line, if there is one. The
    /// caller decides whether that command line is its VMM.
    pub fn adopt(pid_file: PathBuf, name: &'static str) -> Option<(Self, Vec<String>)> {
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let (state, start_time) = proc_stat(pid)?;
        if state == 'Z' || state == 'X' {
            return None;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let argv = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let p = VmmProcess {
            pid,
            name,
            pid_file,
            reaped: None,
            start_time: Some(start_time),
        };
        Some((p, argv))
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn is_alive(&self) -> bool {
        if let Some(r) = &self.reaped {
            return !r.exited.load(Ordering::SeqCst);
        }
        match proc_stat(self.pid) {
            Some((_, start)) if Some(start) != self.start_time => false,
            Some(('Z' | 'X', _)) => threads_left(self.pid),
            Some(_) => true,
            None => false,
        }
    }

    /// How a spawned process ended (`exited` when unknown), for error messages.
    pub fn exit_status(&self) -> String {
        self.reaped
            .as_ref()
            .and_then(|r| *r.status.lock())
            .map(|s| s.to_string())
            .unwrap_or_else(|| "exited".into())
    }

    /// How the process ended, as a clause for a reason line: `exited with status 1`,
    /// `was killed by signal 9 (SIGKILL)`; for an adopted process (not our child) the
    /// status is unknowable, and the clause says so.
    pub fn exit_description(&self) -> String {
        use std::os::unix::process::ExitStatusExt;
        let Some(reaped) = &self.reaped else {
            return "exited (its exit status is unknown: it was adopted after a daemon restart)"
                .into();
        };
        match *reaped.status.lock() {
            Some(s) => match (s.code(), s.signal()) {
                (Some(code), _) => format!("exited with status {code}"),
                (None, Some(sig)) => {
                    let name = nix::sys::signal::Signal::try_from(sig)
                        .map(|s| s.as_str())
                        .unwrap_or("unknown signal");
                    format!("was killed by signal {sig} ({name})")
                }
                (None, None) => format!("ended ({s})"),
            },
            None => "exited".into(),
        }
    }

    pub fn signal(&self, sig: Signal) -> Result<(), VmmError> {
        if !self.is_alive() {
            return Err(VmmError::NotRunning);
        }
        let pid = libc::pid_t::try_from(self.pid).map_err(|_| VmmError::NotRunning)?;
        // Our (still living, checked above) VMM process.
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::ESRCH) => Err(VmmError::NotRunning),
            Err(e) => Err(VmmError::Io(format!("kill {}", self.pid), e.into())),
        }
    }

    /// SIGKILL and wait until the process is gone; idempotent.
    pub async fn kill(&self) -> Result<(), VmmError> {
        match self.signal(Signal::SIGKILL) {
            Ok(()) | Err(VmmError::NotRunning) => {}
            Err(e) => return Err(e),
        }
        if self.wait_exit(KILL_WAIT).await {
            tracing::debug!(pid = self.pid, "{} killed", self.name);
            remove_stale_pid_file(&self.pid_file, self.pid);
            Ok(())
        } else {
            Err(VmmError::Timeout(
                KILL_WAIT,
                format!("{} {} to exit after SIGKILL", self.name, self.pid),
            ))
        }
    }

    pub async fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.is_alive() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

/// Remove `path` if it still names `pid` (a VMM may leave it behind when killed); a stale
/// pid file could later name an unrelated process.
pub(crate) fn remove_stale_pid_file(path: &Path, pid: u32) {
    let names_pid = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        == Some(pid);
    if names_pid {
        let _ = std::fs::remove_file(path);
    }
}

/// A VMM binary: `$env` if set (and not empty), else `name` on PATH. It must be a file;
/// otherwise `Unavailable` says what is missing and how to get it (`install`, e.g.
/// "install qemu-system-x86").
pub(crate) fn locate_binary(
    env: &str,
    name: &str,
    install: Option<&str>,
) -> Result<std::path::PathBuf, VmmError> {
    let binary = match std::env::var_os(env).filter(|v| !v.is_empty()) {
        Some(p) => std::path::PathBuf::from(p),
        None => crate::tools::find_tool(name).ok_or_else(|| {
            let how = match install {
                Some(i) => format!("{i}, or set {env}"),
                None => format!("or set {env}"),
            };
            VmmError::Unavailable(format!("{name} not found on PATH ({how})"))
        })?,
    };
    require_file(&binary)?;
    Ok(binary)
}

/// `Unavailable` unless `binary` is an existing file.
pub(crate) fn require_file(binary: &std::path::Path) -> Result<(), VmmError> {
    if binary.is_file() {
        Ok(())
    } else {
        Err(VmmError::Unavailable(format!(
            "{} does not exist",
            binary.display()
        )))
    }
}

/// A zombie thread-group leader can outlive its other threads for a moment: they still
/// hold the process's files (a TAP device, sockets) until the last one is gone. True
/// while `/proc/<pid>/task` lists more than the leader.
fn threads_left(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count() > 1)
        .unwrap_or(false)
}

/// State char and start time (clock ticks since boot) from `/proc/<pid>/stat`.
pub(crate) fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and ')'; fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 (starttime) is the 20th after the ')': index 19.
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), VmmError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| VmmError::Io(path.display().to_string(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_of_self() {
        let (state, start) = proc_stat(std::process::id()).unwrap();
        assert!(state == 'R' || state == 'S', "{state}");
        assert!(start > 0);
        assert!(proc_stat(u32::MAX).is_none());
    }

    #[tokio::test]
    async fn exit_descriptions() {
        for (script, want) in [
            ("exit 3", "exited with status 3"),
            ("kill -9 $$", "was killed by signal 9 (SIGKILL)"),
        ] {
            let mut cmd = Command::new("/bin/sh");
            cmd.args(["-c", script]);
            let dir = tempfile::tempdir().unwrap();
            let p = VmmProcess::spawn(cmd, "test", dir.path().join("pid"), false).unwrap();
            assert!(p.wait_exit(Duration::from_secs(5)).await);
            // The reaper stores the status just before it flags the exit.
            assert_eq!(p.exit_description(), want);
        }
    }
}
