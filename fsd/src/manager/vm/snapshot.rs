//! A VM's side of snapshots: taking one of a running VM, and booting a new VM from one.
//!
//! Invariants:
//! - Both run under the VM's `op_lock`, like every lifecycle operation.
//! - Taking a snapshot never leaves the guest frozen or paused because of an error: after
//!   a successful freeze, resume (if paused) and thaw are always attempted, whatever
//!   failed in between; the agent also thaws by itself after [`FREEZE_TIMEOUT`].
//! - The order is freeze → pause → save → copy disk → resume → thaw: the agent cannot
//!   run while the vCPUs are paused, so the freeze comes first and the thaw last.
//! - The user-visible state stays `running` throughout a snapshot (requests just wait
//!   for the short pause); a VM that cannot be resumed afterwards shows `paused`.
//! - A restored VM is `running` only after its agent answered, thawed the filesystem
//!   the snapshot was taken under, and took its new identity (hostname, entropy,
//!   machine id); otherwise it is `failed: <why>` like a failed boot.
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bandsox_agent::proto::{Identity, Request};

use super::{Start, Vm, VmState};
use crate::disk::CloneMethod;
use crate::error::{Error, Result};
use crate::snapshots::DISK_FILE;
use crate::vmm::{SavedState, VmmInstance};
use bandsox_agent::client::AgentClient;

/// How long the guest's filesystem may stay frozen before the agent thaws it itself.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline of the freeze request (it syncs first, which may write a lot).
const FREEZE_RPC: Duration = Duration::from_secs(60);
/// Deadline of thaw and identity requests.
const THAW_RPC: Duration = Duration::from_secs(10);

/// What taking a snapshot produced (besides the files in the directory).
#[derive(Debug, Clone)]
pub struct Taken {
    pub saved: SavedState,
    pub disk: CloneMethod,
    /// Freeze to thaw.
    pub total_ms: u64,
    /// Pause to resume.
    pub paused_ms: u64,
}

impl Vm {
    /// EOPNOTSUPP unless this VM's backend can take snapshots.
    pub fn check_can_snapshot(&self) -> Result<()> {
        if self.backend.can_snapshot() {
            Ok(())
        } else {
            Err(Error::new(
                libc::EOPNOTSUPP,
                format!(
                    "VM {}'s backend ({}) cannot take snapshots",
                    self.name,
                    self.backend.describe()
                ),
            ))
        }
    }

    /// Take a snapshot of this running VM into the existing directory `dir`: VMM state and
    /// memory by the backend, the disk as `dir/disk.ext4`. The VM keeps running.
    #[tracing::instrument(level = "debug", name = "snapshot", skip_all, fields(vm = %self.name))]
    pub async fn snapshot_into(self: &Arc<Self>, dir: &Path) -> Result<Taken> {
        let _g = self.op_lock.lock().await;
        let state = self.state();
        if state != VmState::Running {
            return Err(Error::busy(format!(
                "VM {} is {}; snapshot needs a running VM",
                self.name,
                state.render()
            )));
        }
        let agent = self.require_agent()?;
        let inst = self
            .vmm
            .lock()
            .clone()
            .ok_or_else(|| Error::host_down("no VMM"))?;
        let t0 = Instant::now();
        let freeze = agent
            .request(
                Request::Freeze {
                    timeout_ms: u32::try_from(FREEZE_TIMEOUT.as_millis()).unwrap_or(u32::MAX),
                },
                FREEZE_RPC,
            )
            .await
            .map_err(|e| {
                Error::from(e).with_context("snapshot: cannot freeze the guest's filesystem")
            });
        if let Err(e) = freeze {
            // A freeze that timed out may still have happened: undo it now rather than
            // after the agent's own timeout.
            let _ = agent.request(Request::Thaw, THAW_RPC).await;
            return Err(e);
        }
        let paused_at = Instant::now();
        let result = self.save_paused(&inst, dir).await;
        let paused_ms = u64::try_from(paused_at.elapsed().as_millis()).unwrap_or(u64::MAX);
        // Thaw whatever happened above (the VM is running again unless resume failed).
        if self.state() == VmState::Running {
            let mut thawed = false;
            for _ in 0..2 {
                match agent.request(Request::Thaw, THAW_RPC).await {
                    Ok(_) => {
                        thawed = true;
                        break;
                    }
                    Err(e) => tracing::warn!(vm = %self.name, "thaw after snapshot failed: {e}"),
                }
            }
            if !thawed {
                tracing::warn!(
                    vm = %self.name,
                    "the guest thaws by itself within {}s",
                    FREEZE_TIMEOUT.as_secs()
                );
            }
        }
        let (saved, disk) = result?;
        Ok(Taken {
            saved,
            disk,
            total_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
            paused_ms,
        })
    }

    /// Pause, save state, copy the disk, resume. Resume is attempted whenever pause
    /// succeeded; if it fails the VM shows `paused` (the user may `resume` it).
    async fn save_paused(
        &self,
        inst: &Arc<dyn VmmInstance>,
        dir: &Path,
    ) -> Result<(SavedState, CloneMethod)> {
        inst.pause()
            .await
            .map_err(|e| Error::from(e).with_context("snapshot: cannot pause the VM"))?;
        let saved = match inst.save_snapshot(dir).await {
            Ok(s) => {
                let (src, dst) = (self.dir.join("disk.ext4"), dir.join(DISK_FILE));
                tokio::task::spawn_blocking(move || crate::disk::clone_disk(&src, &dst))
                    .await
                    .map_err(|e| Error::io(e.to_string()))
                    .and_then(|r| {
                        r.map_err(|e| Error::io(format!("snapshot: cannot copy the disk: {e}")))
                    })
                    .map(|m| (s, m))
            }
            Err(e) => Err(Error::from(e).with_context("snapshot: cannot save the VM state")),
        };
        if let Err(e) = inst.resume().await {
            let err = Error::from(e);
            tracing::error!(vm = %self.name, "cannot resume after a snapshot: {err}");
            self.set_state(VmState::Paused);
            self.events.emit(
                &self.name,
                "paused",
                &format!("resume after snapshot failed: {}", err.message),
            );
            return Err(err.with_context("snapshot: cannot resume the VM afterwards"));
        }
        saved
    }

    /// Adopting a VM that should run: resume it in case a daemon died between pause and
    /// resume of a snapshot (resuming a running VM is a no-op on every backend).
    pub(crate) async fn undo_interrupted_snapshot(&self, inst: &Arc<dyn VmmInstance>) {
        if let Err(e) = inst.resume().await {
            tracing::debug!(vm = %self.name, "resume on adopt: {e}");
        }
    }

    /// After adopting: thaw a freeze an interrupted snapshot may have left (a no-op
    /// otherwise; the agent would also thaw by itself after [`FREEZE_TIMEOUT`]).
    pub(crate) async fn thaw_after_adopt(&self, client: &bandsox_agent::client::AgentClient) {
        if let Err(e) = client.request(Request::Thaw, THAW_RPC).await {
            tracing::warn!(vm = %self.name, "thaw on adopt failed: {e}");
        }
    }

    /// First boot of a clone: start its VMM from the snapshot in `snap_dir`, reconnect
    /// the agent, thaw, give it its identity. On failure the VM is `failed: <why>`.
    #[tracing::instrument(level = "debug", name = "restore", skip_all, fields(vm = %self.name))]
    pub async fn restore_boot(
        self: &Arc<Self>,
        snap_name: &str,
        snap_dir: &Path,
        saved: &SavedState,
        timeout: Duration,
    ) -> Result<()> {
        let _g = self.op_lock.lock().await;
        let how = Start::Restore {
            snap_name,
            snap_dir,
            saved,
        };
        self.start_locked(how, timeout).await
    }

    /// The end of a restore: thaw the filesystem the snapshot was taken under, give the
    /// guest its own identity (hostname, entropy, machine id, TAP address) and the time.
    pub(crate) async fn take_new_identity(
        &self,
        client: &AgentClient,
        spec: &crate::vmm::VmSpec,
    ) -> Result<()> {
        client
            .request(Request::Thaw, THAW_RPC)
            .await
            .map_err(|e| Error::from(e).with_context("cannot thaw the restored guest"))?;
        let identity = Identity {
            hostname: self.name.clone(),
            entropy: (0..64).map(|_| rand::random::<u8>()).collect(),
            machine_id: Some(format!(
                "{:016x}{:016x}",
                rand::random::<u64>(),
                rand::random::<u64>()
            )),
            // A clone on its own TAP device must leave the source's address behind, and
            // one moved between user and tap (`clone … net=`) takes its new mode's.
            net: spec.net.as_ref().map(|n| n.guest.to_string()),
        };
        client
            .request(Request::SetIdentity(identity), THAW_RPC)
            .await
            .map_err(|e| Error::from(e).with_context("cannot set the clone's identity"))?;
        // The restored guest's clock says when the snapshot was taken.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let clock = Request::SetClock {
            sec: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
            nsec: now.subsec_nanos(),
        };
        client
            .request(clock, THAW_RPC)
            .await
            .map_err(|e| Error::from(e).with_context("cannot set the clone's clock"))?;
        Ok(())
    }
}
