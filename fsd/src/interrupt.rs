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

/// Run `fut` until it completes or `pid` has a watched signal pending (then EINTR).
/// A `pid` of 0 (kernel-internal request) is never interrupted.
pub async fn interruptible<T>(pid: u32, fut: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::pin!(fut);
    let mut tick = tokio::time::interval(POLL);
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

    #[tokio::test]
    async fn completes_when_not_interrupted() {
        let me = std::process::id();
        let v = interruptible(me, async { Ok(5) }).await.unwrap();
        assert_eq!(v, 5);
    }
}
