//! A killed daemon never wedges its mount.
//!
//! When the daemon dies, the kernel ends its FUSE connection only once every thread of
//! the daemon has left the kernel. A thread blocked in a notification (an `inval_entry`
//! waits for the directory lock, which a `mkdir` waiting for our answer holds) never
//! leaves, so the daemon stays a zombie, the `mkdir` waits forever in D state, and so
//! does anything that touches the mount afterwards. Two things prevent that:
//!
//! - The **watchdog** (`bandsox watchdog`, started by `mount` before the session runs):
//!   a tiny separate process that polls the daemon every [`POLL`] and, as soon as it is
//!   gone, a zombie or exiting, aborts the daemon's FUSE connection through the fusectl
//!   filesystem (`/sys/fs/fuse/connections/<dev>/abort`; `umount -f` where fusectl is
//!   unavailable). Every waiting request then fails with `ECONNABORTED`, new ones with
//!   `ENOTCONN`, and the daemon's last threads can exit. It holds no descriptor of the
//!   connection (it could not, or the connection would outlive the daemon).
//! - **Clean-up without touching the mount**: a new `mount` (or `unmount`) finds an
//!   earlier mount through `/proc/self/mountinfo` (string compare, never a `stat` of the
//!   mount point, which would block on a dead connection), aborts that connection when
//!   its daemon is not alive, and detaches it.
//!
//! Invariants: the watchdog aborts only the connection it was told about, and only while
//! that connection is still mounted where it was (same device number and mount point);
//! after a clean unmount it simply exits. Device numbers are reused at once, so a new
//! daemon taking over a dead mount first ends the old daemon's watchdog (recorded in
//! `daemon.pid`), which could otherwise mistake the new mount for its own.
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often the watchdog looks at the daemon.
pub const POLL: Duration = Duration::from_millis(50);

/// Where the kernel exposes FUSE connections.
pub const FUSECTL: &str = "/sys/fs/fuse/connections";

/// One line of `/proc/self/mountinfo`, the parts we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted filesystem.
    pub dev: (u32, u32),
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

impl MountEntry {
    /// The fusectl name of this mount's connection (the device number).
    pub fn connection(&self) -> u64 {
        // FUSE devices are anonymous (major 0): the connection is named by the full dev_t.
        libc::makedev(self.dev.0, self.dev.1)
    }
}

/// Undo mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse `/proc/self/mountinfo` text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let (maj, min) = f.get(2)?.split_once(':')?;
            let r: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                dev: (maj.parse().ok()?, min.parse().ok()?),
                mountpoint: PathBuf::from(unescape(f.get(4)?)),
                fstype: r.first()?.to_string(),
                source: unescape(r.get(1)?),
            })
        })
        .collect()
}

/// The mounts of this process's namespace.
pub fn mounts() -> Vec<MountEntry> {
    parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// `path` made absolute and lexically normalised, without touching the filesystem
/// below its parent (the mount point itself may be a dead FUSE mount).
pub fn absolute(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    // Resolve symlinks in the parent (a live part of the tree), keep the last component.
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or(abs),
        _ => abs,
    }
}

/// The topmost mount at `mountpoint` (an absolute path as given by [`absolute`]).
pub fn mount_at(mountpoint: &Path) -> Option<MountEntry> {
    mounts().into_iter().rfind(|m| m.mountpoint == mountpoint)
}

/// Make sure fusectl is mounted (root only; best effort).
fn ensure_fusectl() -> bool {
    if mounts().iter().any(|m| m.fstype == "fusectl") {
        return true;
    }
    let r = nix::mount::mount(
        Some("fusectl"),
        FUSECTL,
        Some("fusectl"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    );
    match r {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!("cannot mount fusectl on {FUSECTL}: {e}");
            false
        }
    }
}

/// Abort the FUSE connection of `entry` (fusectl), or force-unmount it.
pub fn abort_connection(entry: &MountEntry) -> Result<(), String> {
    if ensure_fusectl() {
        let abort = Path::new(FUSECTL)
            .join(entry.connection().to_string())
            .join("abort");
        match std::fs::write(&abort, b"1") {
            Ok(()) => return Ok(()),
            // Already gone: nothing to abort.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => tracing::debug!("{}: {e}", abort.display()),
        }
    }
    // umount -f aborts the connection first (fuse_umount_begin).
    nix::mount::umount2(&entry.mountpoint, nix::mount::MntFlags::MNT_FORCE)
        .or_else(|e| {
            if e == nix::errno::Errno::EBUSY {
                Ok(())
            } else {
                Err(e)
            }
        })
        .map_err(|e| {
            format!(
                "cannot abort the FUSE connection at {}: {e}",
                entry.mountpoint.display()
            )
        })
}

/// `(state, flags, starttime)` of a process from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(char, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let state = f.first()?.chars().next()?;
    let flags = f.get(6)?.parse().ok()?;
    let start = f.get(19)?.parse().ok()?;
    Some((state, flags, start))
}

/// Whether the process `pid` (started at `start`, in clock ticks since boot) is still a
/// live daemon: present, not a zombie, not exiting, and not a recycled pid.
pub fn alive(pid: u32, start: Option<u64>) -> bool {
    const PF_EXITING: u64 = 0x4;
    match proc_stat(pid) {
        None => false,
        Some((state, flags, st)) => {
            !matches!(state, 'Z' | 'X' | 'x')
                && flags & PF_EXITING == 0
                && start.is_none_or(|s| s == st)
        }
    }
}

/// The start time of process `pid` (for [`alive`]).
pub fn start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, _, s)| s)
}

/// `daemon.pid` in the state directory: `<pid> <starttime> <watchdog pid>` of the daemon
/// serving it.
pub fn pid_file(state_dir: &Path) -> PathBuf {
    state_dir.join("daemon.pid")
}

/// Record this daemon (and its watchdog) in `daemon.pid`.
pub fn write_pid_file(state_dir: &Path, watchdog: Option<u32>) {
    let pid = std::process::id();
    let start = start_time(pid).unwrap_or(0);
    let wd = watchdog.unwrap_or(0);
    if let Err(e) = std::fs::write(pid_file(state_dir), format!("{pid} {start} {wd}\n")) {
        tracing::warn!("cannot write {}: {e}", pid_file(state_dir).display());
    }
}

/// Remove `daemon.pid` if it still names this process (a daemon that replaced us
/// keeps its own).
pub fn remove_pid_file(state_dir: &Path) {
    let path = pid_file(state_dir);
    let mine = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| t.split_whitespace().next().map(str::to_string))
        == Some(std::process::id().to_string());
    if mine {
        let _ = std::fs::remove_file(path);
    }
}

/// The state directory's daemon lock (`daemon.lock`), held for the daemon's lifetime.
pub type StateLock = nix::fcntl::Flock<std::fs::File>;

/// How long `mount` waits for the lock of a daemon that is dying (killed, its last
/// threads still leaving the kernel) before giving up.
const DYING_DAEMON_WAIT: Duration = Duration::from_secs(10);

/// What `daemon.pid` records: the daemon's pid, its start time (0: unknown) and its
/// watchdog's pid (0: none). `None` when there is no readable record.
fn recorded(state_dir: &Path) -> Option<(u32, Option<u64>, Option<u32>)> {
    let text = std::fs::read_to_string(pid_file(state_dir)).ok()?;
    let mut it = text.split_whitespace().map(|w| w.parse::<u64>().ok());
    // A pid that does not fit is no process (a damaged file).
    let pid = u32::try_from(it.next().flatten()?).ok()?;
    let start = it.next().flatten().filter(|&s| s != 0);
    let wd = it
        .next()
        .flatten()
        .filter(|&w| w != 0)
        .and_then(|w| u32::try_from(w).ok());
    Some((pid, start, wd))
}

/// The daemon `daemon.pid` records, if that process still lives.
fn recorded_live_daemon(state_dir: &Path) -> Option<u32> {
    let (pid, start, _) = recorded(state_dir)?;
    alive(pid, start).then_some(pid)
}

/// Take `state_dir`'s daemon lock, or say which daemon holds it. Two daemons over one
/// state directory would both adopt its VMs and write its records, so a second `mount`
/// is refused rather than taking over a live daemon's tree; a killed daemon's lock is
/// waited for while it finishes dying. The lock is an `flock` on an open file
/// description: inherited across the daemonizing `fork`, never by the VMMs (the
/// descriptor is close-on-exec), and released by the kernel when the daemon dies,
/// however it dies.
pub fn lock_state_dir(state_dir: &Path) -> Result<StateLock, String> {
    use nix::fcntl::{Flock, FlockArg};
    let path = state_dir.join("daemon.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let t0 = std::time::Instant::now();
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((_, errno)) if errno != nix::errno::Errno::EWOULDBLOCK => {
                return Err(format!("{}: flock: {errno}", path.display()))
            }
            Err((f, _)) => file = f,
        }
        let live = recorded_live_daemon(state_dir);
        if live.is_some() || t0.elapsed() >= DYING_DAEMON_WAIT {
            let who = live.map_or_else(String::new, |pid| format!(" (pid {pid})"));
            return Err(format!(
                "another bandsox daemon{who} serves the state directory {}; stop it first \
                 (`bandsox unmount MOUNTPOINT`, or stop its service)",
                state_dir.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the daemon recorded in `state_dir` is alive. When it is not, its watchdog
/// (if still there) is ended first, so it cannot act on a mount made after this.
pub fn recorded_daemon_alive(state_dir: &Path) -> bool {
    match recorded(state_dir) {
        Some((pid, start, wd)) if pid != std::process::id() => {
            if alive(pid, start) {
                return true;
            }
            if let Some(wd) = wd {
                end_watchdog(wd, pid);
            }
            false
        }
        _ => false,
    }
}

/// SIGKILL the watchdog `wd` of daemon `daemon` (checked by its command line) and wait
/// (at most a second) until it is gone.
fn end_watchdog(wd: u32, daemon: u32) {
    let Ok(wd_pid) = i32::try_from(wd) else {
        return;
    };
    let Ok(cmdline) = std::fs::read(format!("/proc/{wd}/cmdline")) else {
        return;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let ours = args.contains(&&b"watchdog"[..])
        && args
            .windows(2)
            .any(|w| w[0] == b"--pid" && w[1] == daemon.to_string().as_bytes());
    if !ours {
        return;
    }
    tracing::info!("ending watchdog {wd} of the dead daemon {daemon}");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(wd_pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let t0 = std::time::Instant::now();
    while alive(wd, None) && t0.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Clear an earlier mount at `mountpoint` without ever blocking on it: abort its
/// connection when `dead` (its daemon is gone), then detach it. Returns whether there
/// was one.
pub fn clear_mount(mountpoint: &Path, dead: bool) -> Result<bool, String> {
    let Some(entry) = mount_at(mountpoint) else {
        return Ok(false);
    };
    if dead && entry.fstype.starts_with("fuse") {
        tracing::warn!(
            "the daemon of the FUSE mount at {} is gone; aborting its connection",
            mountpoint.display()
        );
        abort_connection(&entry)?;
    }
    nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH)
        .map_err(|e| format!("cannot unmount {}: {e}", mountpoint.display()))?;
    Ok(true)
}

/// The watchdog process (`bandsox watchdog --pid P`). Reads `<dev> <mountpoint>` (the
/// connection's device number, decimal, and where it is mounted) from stdin, then
/// watches `pid` and aborts that connection when the daemon dies. Exits when the daemon
/// is gone or the connection unmounted.
pub fn run(pid: u32) -> Result<(), String> {
    let start = start_time(pid);
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("watchdog: {e}"))?;
    let line = line.trim_end_matches('\n');
    let Some((dev, mountpoint)) = line
        .split_once(' ')
        .and_then(|(d, m)| Some((d.parse::<u64>().ok()?, PathBuf::from(m))))
    else {
        // The daemon exited before mounting: nothing to watch.
        return Ok(());
    };
    let mine = |m: &MountEntry| {
        m.fstype.starts_with("fuse") && m.connection() == dev && m.mountpoint == mountpoint
    };
    loop {
        std::thread::sleep(POLL);
        if alive(pid, start) {
            continue;
        }
        // Still mounted? (A clean unmount removes it; then there is nothing to do.)
        if let Some(entry) = mounts().into_iter().find(mine) {
            eprintln!(
                "bandsox watchdog: daemon {pid} died; aborting the FUSE connection at {}",
                entry.mountpoint.display()
            );
            if let Err(e) = abort_connection(&entry) {
                eprintln!("bandsox watchdog: {e}");
            }
        }
        return Ok(());
    }
}

/// Start the watchdog for this process; returns the child and the pipe to send it the
/// connection device number once mounted.
pub fn spawn() -> Option<(std::process::Child, std::process::ChildStdin)> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().ok()?;
    let mut child = std::process::Command::new(exe)
        .arg("watchdog")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        // Its own process group: a signal to the daemon's group must not end it too.
        .process_group(0)
        .spawn()
        .map_err(|e| tracing::warn!("cannot start the watchdog: {e}"))
        .ok()?;
    let stdin = child.stdin.take()?;
    Some((child, stdin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_daemon_per_state_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = std::process::id();
        let start = start_time(me).expect("own start time");
        std::fs::write(pid_file(dir.path()), format!("{me} {start} 0\n")).expect("pid file");
        let first = lock_state_dir(dir.path()).expect("the first daemon gets the lock");
        // A live recorded daemon: refused at once, naming it.
        let err = lock_state_dir(dir.path()).expect_err("a second daemon is refused");
        assert!(err.contains(&format!("pid {me}")), "{err}");
        drop(first);
        lock_state_dir(dir.path()).expect("free again once the first is gone");
    }

    #[test]
    fn parses_mountinfo() {
        let text = "36 35 98:0 /mnt1 /mnt/parent\\040dir rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    80 25 0:63 / /var/tmp/x/mnt rw,nosuid,nodev,relatime shared:40 - fuse.bandsox bandsox rw,user_id=0\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mountpoint, PathBuf::from("/mnt/parent dir"));
        assert_eq!(m[0].fstype, "ext3");
        assert_eq!(m[1].dev, (0, 63));
        assert_eq!(m[1].connection(), 63);
        assert_eq!(m[1].fstype, "fuse.bandsox");
        assert_eq!(m[1].source, "bandsox");
    }

    #[test]
    fn liveness() {
        let me = std::process::id();
        assert!(alive(me, start_time(me)));
        assert!(!alive(me, start_time(me).map(|s| s + 1)));
        assert!(!alive(u32::MAX - 1, None));
    }

    #[test]
    fn absolute_paths_are_lexical_at_the_end() {
        let p = absolute(Path::new("/tmp/../tmp/nonexistent-bsx"));
        assert_eq!(p, PathBuf::from("/tmp/nonexistent-bsx"));
    }
}
