//! A VM's activity: auto-resume of a paused VM when a request needs its guest, idle
//! pause, and the lifecycle fields of `info` (ttl, idle pause, autoresume).
//!
//! Invariants:
//! - Every request that needs the guest (an exec, a ctl command that talks to the
//!   agent, an `fs/` request) calls [`Vm::wake`] first: it marks the VM active and, for a
//!   paused VM with `autoresume=1`, resumes it (at most [`AUTORESUME_DEADLINE`]); with
//!   `autoresume=0` nothing changes and the caller sees EHOSTDOWN as before.
//! - An idle pause ([`Vm::pause_if_idle`]) decides under `op_lock`, so it never pauses a
//!   VM that a request woke, or that has a live run (a terminal is a run), meanwhile.
//! - Each pause and resume event says why (`reason=idle|ctl|exec|fs`).
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{Vm, VmState};
use crate::error::{Error, Result};

/// Longest a request waits for the auto-resume of a paused VM.
pub const AUTORESUME_DEADLINE: Duration = Duration::from_secs(30);

/// What woke a VM (the `reason=` of its `resumed` event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    Exec,
    Ctl,
    Fs,
    /// The reaper, to snapshot a VM whose ttl ran out.
    Ttl,
}

impl Wake {
    fn as_str(self) -> &'static str {
        match self {
            Wake::Exec => "exec",
            Wake::Ctl => "ctl",
            Wake::Fs => "fs",
            Wake::Ttl => "ttl",
        }
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    ms_of(SystemTime::now())
}

fn ms_of(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Vm {
    /// Mark the VM as just used (what `idle_pause` counts from).
    pub fn touch(&self) {
        self.last_active_ms.fetch_max(now_ms(), Ordering::SeqCst);
    }

    /// Whether a request to this paused VM resumes it (rather than failing).
    pub fn will_autoresume(&self) -> bool {
        self.state() == VmState::Paused && self.record.lock().config.lifecycle.autoresume
    }

    /// A request that needs the guest is coming (`why`): mark the VM active and, when it
    /// is paused with `autoresume=1`, resume it first. Other states are left for the
    /// request to report as it always did.
    pub async fn wake(self: &Arc<Self>, why: Wake) -> Result<()> {
        self.touch();
        if !self.will_autoresume() {
            return Ok(());
        }
        self.resume_for(why).await
    }

    /// Resume the VM if it is paused (whatever `autoresume` says), waiting at most
    /// [`AUTORESUME_DEADLINE`]; the `resumed` event says `reason=<why>`.
    pub async fn resume_for(self: &Arc<Self>, why: Wake) -> Result<()> {
        let resume = async {
            let _g = self.op_lock.lock().await;
            // Another request (or a ctl `resume`) may have resumed it meanwhile.
            if self.state() != VmState::Paused {
                return Ok(());
            }
            self.resume_locked(why.as_str()).await
        };
        match tokio::time::timeout(AUTORESUME_DEADLINE, resume).await {
            Ok(r) => r.map_err(|e| e.with_context("auto-resume")),
            Err(_) => Err(Error::timed_out(format!(
                "VM {} is paused and did not resume within {}s",
                self.name,
                AUTORESUME_DEADLINE.as_secs()
            ))),
        }
    }

    /// Whether any run (command or terminal) is still running.
    pub fn has_live_run(&self) -> bool {
        self.runs.lock().values().any(|r| r.status().is_running())
    }

    /// Whether, at `now`, the VM has been running without a request or a live run for
    /// at least its `idle_pause` (false without one).
    pub fn is_idle(&self, now: SystemTime) -> bool {
        let Some(idle) = self.record.lock().config.lifecycle.idle_pause_s else {
            return false;
        };
        let since = self.last_active_ms.load(Ordering::SeqCst);
        self.state() == VmState::Running
            && ms_of(now).saturating_sub(since) >= idle.saturating_mul(1000)
            && !self.has_live_run()
    }

    /// Pause the VM if it is idle at `now` (checked again under `op_lock`); returns
    /// whether it paused.
    pub async fn pause_if_idle(self: &Arc<Self>, now: SystemTime) -> Result<bool> {
        if !self.is_idle(now) {
            return Ok(false);
        }
        let _g = self.op_lock.lock().await;
        if !self.is_idle(now) {
            return Ok(false);
        }
        self.pause_locked("idle").await?;
        Ok(true)
    }

    /// Seconds left of the VM's ttl at `now` (0 once past), if it has one.
    pub fn ttl_remaining(&self, now: SystemTime) -> Option<u64> {
        let deadline = self.record.lock().ttl_deadline?;
        Some(deadline.saturating_sub(ms_of(now) / 1000))
    }

    /// Set (`Some`: from now) or clear the VM's ttl; kept in `vm.json`.
    pub fn set_ttl(&self, ttl_s: Option<u64>) -> Result<()> {
        {
            let mut rec = self.record.lock();
            rec.config.lifecycle.ttl_s = ttl_s;
            rec.ttl_deadline = ttl_s.map(|t| now_ms() / 1000 + t);
        }
        self.save_record()
    }

    /// Change one lifecycle option (`key` one of `config::lifecycle::KEYS`) on the live
    /// VM; `ttl` restarts the countdown from now. Kept in `vm.json`.
    pub fn set_lifecycle(&self, key: &str, value: &str) -> Result<()> {
        let mut opts = self.record.lock().config.lifecycle.clone();
        if !opts.set(key, value)? {
            return Err(Error::invalid(format!(
                "{key}: not a lifecycle option; accepted: {}",
                crate::config::lifecycle::HELP
            )));
        }
        if key == "ttl" {
            return self.set_ttl(opts.ttl_s);
        }
        self.record.lock().config.lifecycle = opts;
        self.touch();
        self.save_record()
    }

    /// Add the lifecycle fields to the `info` JSON.
    pub(super) fn lifecycle_info(&self, info: &mut serde_json::Value) {
        let rec = self.record();
        let l = &rec.config.lifecycle;
        info["ttl_s"] = serde_json::json!(l.ttl_s);
        info["ttl_remaining_s"] = serde_json::json!(self.ttl_remaining(SystemTime::now()));
        info["ttl_action"] = serde_json::json!(l.ttl_action.as_str());
        info["idle_pause_s"] = serde_json::json!(l.idle_pause_s);
        info["autoresume"] = serde_json::json!(l.autoresume);
        info["kernel"] = serde_json::json!(rec.config.kernel.as_deref().unwrap_or("default"));
    }
}
