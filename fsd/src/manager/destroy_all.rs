//! `destroy-all [all-users]` on the root `ctl`: delete every VM of the caller (root with
//! `all-users`: of everyone).
//!
//! Invariants:
//! - A VM still booting is waited for, not skipped: `delete` takes the VM's `op_lock`,
//!   which its boot holds until the VMM answers or is killed, so no VMM is left behind.
//! - A creation that has reserved its name but not yet registered its VM (its disk is
//!   being copied) is waited for too, and its VM deleted once it appears, up to
//!   [`Manager::boot_timeout`] plus [`SETTLE`]; whatever is left then is reported.
//! - The result counts what was removed and names each VM that could not be, with why.
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Manager;
use crate::error::{Error, Result};

/// Slack beyond the boot timeout for creations in flight to settle.
pub const SETTLE: Duration = Duration::from_secs(30);

impl Manager {
    /// Delete every VM of `uid` (every VM at all with `all_users`, root only). The text
    /// says how many were removed; EIO names the ones that failed.
    pub async fn destroy_all(self: &Arc<Self>, uid: u32, all_users: bool) -> Result<String> {
        if all_users && uid != 0 {
            return Err(Error::new(
                libc::EPERM,
                "destroy-all all-users: only root may remove other users' VMs",
            ));
        }
        let deadline = Instant::now() + self.boot_timeout + SETTLE;
        let mine = |owner: u32| all_users || owner == uid;
        let mut removed = 0usize;
        let mut failed: Vec<(String, String)> = Vec::new();
        loop {
            let victims: Vec<String> = self
                .list()
                .into_iter()
                .filter(|vm| mine(vm.uid) && !failed.iter().any(|(n, _)| *n == vm.name))
                .map(|vm| vm.name.clone())
                .collect();
            if victims.is_empty() {
                if !self.unregistered_creations() || Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let tasks: Vec<_> = victims
                .into_iter()
                .map(|name| {
                    let mgr = self.clone();
                    tokio::spawn(async move {
                        let r = tokio::time::timeout_at(deadline.into(), mgr.delete(&name)).await;
                        (name, r)
                    })
                })
                .collect();
            for t in tasks {
                match t.await {
                    Ok((_, Ok(Ok(())))) => removed += 1,
                    // Deleted meanwhile by someone else: not ours to count, not a failure.
                    Ok((_, Ok(Err(e)))) if e.errno == libc::ENOENT => {}
                    Ok((name, Ok(Err(e)))) => failed.push((name, e.message)),
                    Ok((name, Err(_))) => {
                        failed.push((name, "timed out waiting for its boot".into()))
                    }
                    Err(e) => failed.push(("?".into(), format!("task failed: {e}"))),
                }
            }
        }
        let who = if all_users { "all users'" } else { "your" };
        self.events.emit_for(
            uid,
            "-",
            "destroy-all",
            &format!("removed={removed} failed={}", failed.len()),
        );
        if failed.is_empty() {
            return Ok(format!("ok: destroyed {removed} of {who} VMs"));
        }
        let list: Vec<String> = failed
            .iter()
            .map(|(n, why)| format!("{n}: {why}"))
            .collect();
        Err(Error::io(format!(
            "destroy-all: destroyed {removed} of {who} VMs; {} failed: {}",
            failed.len(),
            list.join("; ")
        )))
    }

    /// Whether a creation has reserved a name whose VM is not registered yet.
    fn unregistered_creations(&self) -> bool {
        let vms = self.vms.read();
        self.creating.lock().iter().any(|n| !vms.contains_key(n))
    }
}
