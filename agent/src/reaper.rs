//! The one child reaper of the process.
//!
//! A dedicated thread waits with `waitid(P_ALL, WEXITED | WNOWAIT)`, which reports that
//! *some* child has ended without reaping it; it then takes the table lock and reaps
//! exactly that pid with `waitpid(pid, WNOHANG)`. [`Reaper::spawn`] forks the child and
//! registers its pid while holding the same lock, so a child that exits immediately is
//! never reaped before it is registered and its status is never lost. Pids nobody
//! registered (orphans re-parented to PID 1, or children of a subreaper) are reaped and
//! dropped silently.
//!
//! Both waits are raw `libc` calls: nix's `WaitStatus` cannot represent a child killed by
//! a real-time signal (its `Signal` lacks them), so nix's `waitpid` would reap such a child
//! and return `EINVAL`, losing its status for good.
//!
//! The thread does not depend on any tokio runtime, so statuses are delivered even when
//! several runtimes come and go (tests); `waitpid(-1)`-style reaping means nothing else in
//! the process may wait for its own children.
use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::proto::ExitStatus;

struct Table {
    waiting: HashMap<u32, oneshot::Sender<ExitStatus>>,
    /// Number of spawns so far (so the thread never sleeps through a fresh spawn).
    spawns: u64,
}

pub struct Reaper {
    table: Mutex<Table>,
    /// Signalled when a child is spawned (the thread sleeps on it while there are none).
    spawned: Condvar,
}

static GLOBAL: OnceLock<Arc<Reaper>> = OnceLock::new();

impl Reaper {
    /// The process-wide reaper; starts its thread on first use.
    pub fn global() -> Arc<Reaper> {
        GLOBAL
            .get_or_init(|| {
                let r = Arc::new(Reaper {
                    table: Mutex::new(Table {
                        waiting: HashMap::new(),
                        spawns: 0,
                    }),
                    spawned: Condvar::new(),
                });
                let r2 = r.clone();
                let res = std::thread::Builder::new()
                    .name("reaper".into())
                    .spawn(move || r2.run());
                if let Err(e) = res {
                    tracing::error!("cannot start the reaper thread: {e}");
                }
                r
            })
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A poisoned lock only means a panic elsewhere; the table itself stays valid.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawn `cmd` and register its pid before anyone can reap it. The receiver yields the
    /// exit status (it is never dropped without a value unless the process is gone in a
    /// way `waitpid` cannot report).
    ///
    /// The returned `Child` must not be waited on (the reaper owns waiting).
    pub fn spawn(
        &self,
        cmd: &mut Command,
    ) -> std::io::Result<(Child, oneshot::Receiver<ExitStatus>)> {
        let mut table = self.lock();
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        table.waiting.insert(child.id(), tx);
        table.spawns += 1;
        drop(table);
        self.spawned.notify_all();
        Ok((child, rx))
    }

    /// Reap everything that has already exited (also used directly by PID 1 at power off).
    pub fn reap_now(&self) {
        loop {
            let mut status = 0;
            let table = self.lock();
            // SAFETY: waitpid with a valid pointer to a local int.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            self.route(table, pid.unsigned_abs(), status);
        }
    }

    fn route(&self, mut table: std::sync::MutexGuard<'_, Table>, pid: u32, status: i32) {
        let st = decode_status(status);
        match table.waiting.remove(&pid) {
            Some(tx) => {
                drop(table);
                tracing::debug!(pid, status = %st, "child exited");
                let _ = tx.send(st);
            }
            None => tracing::trace!(pid, status = %st, "reaped orphan"),
        }
    }

    fn run(&self) {
        loop {
            let spawns_before = self.lock().spawns;
            // SAFETY: zeroed siginfo_t is a valid out-parameter for waitid.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid with a valid pointer; WNOWAIT leaves the child reapable.
            let rc =
                unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
            if rc != 0 {
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::ECHILD) => {
                        // No children: sleep until one is spawned (timeout for safety).
                        let table = self.lock();
                        if table.spawns == spawns_before {
                            let _ = self.spawned.wait_timeout(table, Duration::from_millis(500));
                        }
                        continue;
                    }
                    _ => {
                        tracing::error!("waitid failed: {err}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                }
            }
            // SAFETY: waitid filled in a SIGCHLD siginfo; si_pid is valid for it.
            let pid = unsafe { info.si_pid() };
            if pid <= 0 {
                continue;
            }
            let table = self.lock();
            let mut status = 0;
            // SAFETY: waitpid with a valid pointer to a local int.
            let got = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if got == pid {
                self.route(table, pid.unsigned_abs(), status);
            } else {
                drop(table);
                // Someone else reaped it (e.g. std after a failed exec); sweep anyway.
                self.reap_now();
            }
        }
    }
}

/// Turn a raw wait status into an [`ExitStatus`].
pub fn decode_status(status: i32) -> ExitStatus {
    if libc::WIFSIGNALED(status) {
        ExitStatus::Signal(libc::WTERMSIG(status))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn immediate_exit_is_not_lost() {
        let r = Reaper::global();
        let mut rxs = Vec::new();
        for i in 0..20 {
            let (_c, rx) = r
                .spawn(Command::new("/bin/sh").arg("-c").arg(format!("exit {i}")))
                .unwrap();
            rxs.push((i, rx));
        }
        for (i, rx) in rxs {
            assert_eq!(rx.await.unwrap(), ExitStatus::Code(i));
        }
    }
}
