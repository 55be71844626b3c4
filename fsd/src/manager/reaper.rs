//! The lifecycle reaper: once a second, every VM past its `ttl` is destroyed (or
//! snapshotted first, `ttl_action=snapshot`) and every running VM idle for its
//! `idle_pause` is paused.
//!
//! Invariants:
//! - The reaper holds only a weak reference: it ends with the manager.
//! - A tick decides from the records alone (`ttl_deadline` is in `vm.json`), so a
//!   deadline that passed while the daemon was down is acted on by the first tick
//!   after the restart.
//! - A VM whose ttl snapshot fails is kept (stopped work is better than lost work): its
//!   deadline is cleared and a `ttl-expired` event says why; it is never retried in a
//!   loop.
//! - Each VM is handled in a task of its own, at most one at a time per VM, so a slow
//!   snapshot or a VM waiting on its boot never holds up the others.
use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

use super::vm::Vm;
use super::Manager;
use crate::config::TtlAction;

/// How often the reaper looks.
pub const TICK: Duration = Duration::from_secs(1);

/// VMs a reaper task is handling right now (by name).
#[derive(Default)]
pub struct Reaping(Mutex<HashSet<String>>);

impl Manager {
    /// Start the reaper (once; see the module docs).
    pub fn start_reaper(self: &Arc<Self>) {
        if self
            .reaper_started
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let weak: Weak<Manager> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(TICK).await;
                let Some(mgr) = weak.upgrade() else { return };
                mgr.lifecycle_tick(SystemTime::now()).await;
            }
        });
    }

    /// One pass of the reaper as of `now`: start handling each VM whose ttl has passed
    /// or that is idle. Returns the handling tasks (tests wait for them).
    pub async fn lifecycle_tick(
        self: &Arc<Self>,
        now: SystemTime,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        for vm in self.list() {
            if vm.has_live_run() {
                // Idle time counts from a run's end (to within a tick), not its start.
                vm.touch();
            }
            let expired = vm.ttl_remaining(now) == Some(0);
            if !expired && !vm.is_idle(now) {
                continue;
            }
            if !self.reaping.0.lock().insert(vm.name.clone()) {
                continue;
            }
            let mgr = self.clone();
            tasks.push(tokio::spawn(async move {
                if expired {
                    mgr.expire(&vm).await;
                } else if let Err(e) = vm.pause_if_idle(now).await {
                    tracing::warn!(vm = %vm.name, "idle pause failed: {e}");
                    vm.events.emit(&vm.name, "idle-pause-failed", &e.message);
                    // Not again at once: count idleness from now.
                    vm.touch();
                }
                mgr.reaping.0.lock().remove(&vm.name);
            }));
        }
        tasks
    }

    /// The VM's ttl ran out: snapshot it if asked, then delete it.
    async fn expire(self: &Arc<Self>, vm: &Arc<Vm>) {
        // Deleted or replaced meanwhile: nothing to do.
        match self.get(&vm.name) {
            Some(v) if Arc::ptr_eq(&v, vm) => {}
            _ => return,
        }
        let action = vm.record().config.lifecycle.ttl_action;
        if action == TtlAction::Snapshot {
            let snap = ttl_snapshot_name(&vm.name, super::now_secs());
            let taken = async {
                vm.resume_for(super::vm::Wake::Ttl).await?;
                vm.wait_adopted().await?;
                self.snapshot(vm, &snap).await
            }
            .await;
            if let Err(e) = taken {
                vm.events.emit(
                    &vm.name,
                    "ttl-expired",
                    &format!("action=snapshot failed: {}; the VM is kept", e.message),
                );
                if let Err(e) = vm.set_ttl(None) {
                    tracing::warn!(vm = %vm.name, "cannot clear the ttl: {e}");
                }
                return;
            }
            vm.events.emit(
                &vm.name,
                "ttl-expired",
                &format!("action=snapshot snapshot={snap}"),
            );
        } else {
            vm.events.emit(&vm.name, "ttl-expired", "action=destroy");
        }
        if let Err(e) = self.delete(&vm.name).await {
            if e.errno != libc::ENOENT {
                vm.events.emit(
                    &vm.name,
                    "ttl-expired",
                    &format!("delete failed: {}; the VM is kept", e.message),
                );
                if let Err(e) = vm.set_ttl(None) {
                    tracing::warn!(vm = %vm.name, "cannot clear the ttl: {e}");
                }
            }
        }
    }
}

/// `<vm>-ttl-<unix time>`, the VM's name shortened so the whole stays a valid name (VM
/// names are ASCII, so any byte is a character boundary).
fn ttl_snapshot_name(vm: &str, secs: u64) -> String {
    let suffix = format!("-ttl-{secs}");
    let keep = crate::names::MAX_NAME_LEN.saturating_sub(suffix.len());
    format!("{}{suffix}", &vm[..vm.len().min(keep)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_snapshot_names_are_valid_names() {
        assert_eq!(ttl_snapshot_name("a", 1_700_000_000), "a-ttl-1700000000");
        let long = "v".repeat(crate::names::MAX_NAME_LEN);
        let n = ttl_snapshot_name(&long, 1_700_000_000);
        assert_eq!(n.len(), crate::names::MAX_NAME_LEN);
        crate::names::validate("snapshot", &n).unwrap();
    }
}
