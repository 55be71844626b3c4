//! Ctrl-C for parked FUSE requests.
//!
//! fuser answers FUSE_INTERRUPT with ENOSYS, after which the kernel waits for our reply
//! even through SIGKILL. So while a request waits on a guest, we watch the waiting process
//! ourselves: every [`POLL`] we read `/proc/<pid>/status` and, if one of
//! [`WATCHED`] is pending (`SigPnd | ShdPnd`, minus `SigBlk | SigIgn` except for SIGKILL),
//! we stop waiting and answer EINTR. SIGCHLD and friends are deliberately not watched:
//! shells receive them all the time.
use std::future::Future;
use std::time::Duration;

use crate::error::{Error, Result};

pub const POLL: Duration = Duration::from_millis(100);

/// Signals that mean "the user wants out".
pub const WATCHED: [i32; 5] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGKILL,
];

fn mask_of(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

/// The first watched signal pending for the process described by `status`
/// (the text of `/proc/<pid>/status`).
pub fn pending_in_status(status: &str) -> Option<i32> {
    let pending = mask_of(status, "SigPnd:") | mask_of(status, "ShdPnd:");
    let blocked = mask_of(status, "SigBlk:") | mask_of(status, "SigIgn:");
    WATCHED.into_iter().find(|&sig| {
        let bit = 1u64 << (sig - 1);
        pending & bit != 0 && (sig == libc::SIGKILL || blocked & bit == 0)
    })
}

/// The first watched signal pending for `pid`; `None` also when the process is gone.
pub fn pending_signal(pid: u32) -> Option<i32> {
    if pid == 0 {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    pending_in_status(&status)
}

/// The thread-group id (process id) of thread `tid`.
fn tgid_of(tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether threads `a` and `b` (FUSE requests carry thread ids) belong to one process.
pub fn same_process(a: u32, b: u32) -> bool {
    a == b || matches!((tgid_of(a), tgid_of(b)), (Some(x), Some(y)) if x == y)
}

/// `PF_EXITING` in the flags word of `/proc/<pid>/stat`.
const PF_EXITING: u64 = 0x4;

/// Whether the `/proc/<pid>/stat` text describes a task that is exiting because a
/// signal killed it (as opposed to one that called `exit`): `do_exit` sets `exit_code`
/// before it closes the task's files, so a `close` made on the way out can tell.
pub fn stat_killed_by_signal(stat: &str) -> bool {
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    // Fields after the command name, starting with field 3 (state).
    let f: Vec<&str> = rest.split_whitespace().collect();
    let flags = f.get(6).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let exit_code = f.get(49).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    flags & PF_EXITING != 0 && exit_code & 0x7f != 0
}

/// Whether `pid` is being killed by a signal right now (see [`stat_killed_by_signal`]);
/// also true when it has a SIGKILL pending.
pub fn killed_by_signal(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        if stat_killed_by_signal(&stat) {
            return true;
        }
    }
    pending_signal(pid) == Some(libc::SIGKILL)
}

/// Run `fut` until it completes or `pid` has a watched signal pending (then EINTR).
/// A `pid` of 0 (kernel-internal request) is never interrupted. The first look at the
/// process is after [`POLL`], so short waits cost no `/proc` read.
pub async fn interruptible<T>(pid: u32, fut: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::pin!(fut);
    if pid == 0 {
        return fut.await;
    }
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + POLL, POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            out = &mut fut => return out,
            _ = tick.tick() => {
                if let Some(sig) = pending_signal(pid) {
                    tracing::debug!(pid, sig, "waiting process has a signal pending; answering EINTR");
                    return Err(Error::interrupted());
                }
            }
        }
    }
}

/// Run `fut` as a task of its own and wait for it like [`interruptible`]. When the
/// waiting process is interrupted it gets EINTR at once while the task goes on (an
/// operation half done is not cut off), and `on_abandon` receives the task's output.
pub async fn detachable<T, F, A>(pid: u32, fut: F, on_abandon: A) -> Result<T>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
    A: FnOnce(T) + Send + 'static,
{
    if pid == 0 {
        return Ok(fut.await);
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Err(out) = tx.send(fut.await) {
            on_abandon(out);
        }
    });
    interruptible(pid, async {
        rx.await
            .map_err(|_| Error::io("the operation ended without an answer"))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "Name:\tcat\nShdPnd:\t0000000000000000\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n";

    #[test]
    fn detects_pending_sigint() {
        let s = format!("{BASE}SigPnd:\t0000000000000002\n");
        assert_eq!(pending_in_status(&s), Some(libc::SIGINT));
    }

    #[test]
    fn ignores_sigchld_and_blocked() {
        let chld = format!("{BASE}SigPnd:\t0000000000010000\n");
        assert_eq!(pending_in_status(&chld), None);
        let blocked =
            "SigPnd:\t0000000000000002\nShdPnd:\t0\nSigBlk:\t0000000000000002\nSigIgn:\t0\n";
        assert_eq!(pending_in_status(blocked), None);
        let kill = "SigPnd:\t0\nShdPnd:\t0000000000000100\nSigBlk:\tffffffffffffffff\nSigIgn:\t0\n";
        assert_eq!(pending_in_status(kill), Some(libc::SIGKILL));
    }

    #[test]
    fn recognises_a_killed_task() {
        // 52 fields; flags (field 9) and exit_code (field 52) set as do_exit leaves them.
        let stat = |flags: u64, code: i64| {
            let mut f: Vec<String> = (3..=52).map(|_| "0".to_string()).collect();
            f[0] = "R".into();
            f[9 - 3] = flags.to_string();
            f[52 - 3] = code.to_string();
            format!("123 (sh (x)) {}", f.join(" "))
        };
        assert!(stat_killed_by_signal(&stat(0x4 | 0x400000, 9)));
        assert!(!stat_killed_by_signal(&stat(0x4, 3 << 8)));
        assert!(!stat_killed_by_signal(&stat(0x400000, 0)));
        assert!(!stat_killed_by_signal("garbage"));
        assert!(!killed_by_signal(std::process::id()));
        assert!(same_process(std::process::id(), std::process::id()));
    }

    #[tokio::test]
    async fn completes_when_not_interrupted() {
        let me = std::process::id();
        let v = interruptible(me, async { Ok(5) }).await.unwrap();
        assert_eq!(v, 5);
    }
}
