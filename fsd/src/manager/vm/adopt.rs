//! Re-adopting a VM after a daemon restart, in the background, and ending VMMs a failed
//! start or adoption left behind.
//!
//! Invariants:
//! - Nothing here holds up the mount: `Manager::reload` calls [`Vm::begin_adopt`], which
//!   takes the VM's `op_lock` and sets `adopting` before the tree can show the VM, and
//!   leaves the work to a task of its own (every VM concurrently).
//! - While a VM is `adopting`, lifecycle operations wait for its `op_lock`, and requests
//!   that need its agent (exec, `ctl`, `fs/`) wait in [`Vm::wait_adopted`], at most
//!   [`ADOPT_WAIT`] (and, from the tree, interruptibly); they see the outcome, never a
//!   half-adopted VM.
//! - An adoption always ends in a settled state (running, paused, stopped or
//!   `failed: <why>`), also if its task dies, and then wakes every waiter.
//! - What is done with a live VMM depends on how far its last start got (`Phase`): a
//!   clone caught `restoring` has its VMM ended (it may be a QEMU waiting in `-incoming
//!   defer` or a half-loaded guest) and is `failed`; one caught `identity-pending` first
//!   takes its identity (thaw, hostname, entropy, machine id, address, clock) and is
//!   `running` only then, or is ended and `failed`; any other VM is adopted as it is.
//! - A VMM is ended only once the backend recognised it as this VM's own (`vmm.pid`
//!   against `/proc/<pid>/cmdline`, see `Backend::adopt`), never by pid alone.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;

use super::{Desired, Phase, Vm, VmState};
use crate::error::{Error, Result};
use crate::vmm::{VmSpec, VmmInstance};

/// How long the agent of an adopted VM has to answer.
pub const ADOPT_AGENT_DEADLINE: Duration = Duration::from_secs(15);
/// How long a request waits for a VM's adoption before it fails with ETIMEDOUT. Longer
/// than an adoption whose agent never answers takes ([`ADOPT_AGENT_DEADLINE`]).
pub const ADOPT_WAIT: Duration = Duration::from_secs(30);

/// One adoption in progress: holds the VM's `op_lock`; when dropped (the adoption ended,
/// or its task died) the VM is in a settled state and every waiter is woken.
struct Adoption {
    vm: Arc<Vm>,
    _lock: OwnedMutexGuard<()>,
}

impl Drop for Adoption {
    fn drop(&mut self) {
        if self.vm.state() == VmState::Adopting {
            // The record keeps its phase: a later daemon tries again.
            self.vm
                .fail("the daemon's adoption of this VM ended without a result");
        }
        self.vm.adopted.notify_waiters();
    }
}

impl Vm {
    /// After a daemon restart: adopt this VM in the background. A VM that should be
    /// stopped stays `stopped`; any other is `adopting` from now until its task is done.
    pub fn begin_adopt(self: &Arc<Self>) {
        if self.record().desired == Desired::Stopped {
            return;
        }
        let Ok(lock) = self.op_lock.clone().try_lock_owned() else {
            // Only a VM already in use could be locked; it needs no adoption.
            tracing::warn!(vm = %self.name, "busy before its adoption; left as it is");
            return;
        };
        // The incarnation the adoption re-attaches starts now, so what the tree hands out
        // meanwhile (the `fs/` inode) stays valid once it is adopted.
        let gen = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.set_state(VmState::Adopting);
        let adoption = Adoption {
            vm: self.clone(),
            _lock: lock,
        };
        tokio::spawn(async move {
            adoption.vm.adopt_locked(gen).await;
            drop(adoption);
        });
    }

    /// Wait until the VM is no longer `adopting` (at once when it is not): ETIMEDOUT
    /// after [`ADOPT_WAIT`].
    pub async fn wait_adopted(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + ADOPT_WAIT;
        loop {
            // Registered before the state is read, so the wake-up cannot be missed.
            let notified = self.adopted.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.state() != VmState::Adopting {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::timed_out(format!(
                    "VM {} is still being adopted after a daemon restart ({}s)",
                    self.name,
                    ADOPT_WAIT.as_secs()
                )));
            }
        }
    }

    /// The adoption of incarnation `gen`; the caller holds `op_lock` and the VM is
    /// `adopting`. A failure that leaves the VMM's fate unknown keeps the record's phase.
    #[tracing::instrument(level = "debug", name = "adopt", skip_all, fields(vm = %self.name))]
    async fn adopt_locked(self: &Arc<Self>, gen: u64) {
        let rec = self.record();
        let spec = match self.spec() {
            Ok(s) => s,
            Err(e) => return self.fail(&e.message),
        };
        let inst: Arc<dyn VmmInstance> = match self.backend.adopt(&spec).await {
            Ok(Some(inst)) => Arc::from(inst),
            Ok(None) => {
                self.release_network();
                self.set_state(VmState::Stopped);
                let detail = match rec.phase {
                    Phase::Started | Phase::Failed => String::new(),
                    p => format!(" (the previous daemon ended {})", p.describe()),
                };
                self.events.emit(
                    &self.name,
                    "stopped",
                    &format!("its VMM was gone when the daemon started{detail}"),
                );
                return;
            }
            Err(e) => return self.fail(&format!("cannot adopt its VMM: {e}")),
        };
        match rec.phase {
            Phase::Restoring => {
                let why = format!("the daemon restarted {}", Phase::Restoring.describe());
                self.end_and_fail(&inst, &why).await;
            }
            Phase::IdentityPending => self.finish_identity(&inst, &spec, gen).await,
            _ => self.adopt_as_it_is(&inst, rec.desired, gen).await,
        }
    }

    /// A VM whose last start finished (or a booting one): re-attach its agent.
    async fn adopt_as_it_is(
        self: &Arc<Self>,
        inst: &Arc<dyn VmmInstance>,
        desired: Desired,
        gen: u64,
    ) {
        *self.vmm.lock() = Some(inst.clone());
        if desired == Desired::Paused {
            // The agent cannot answer while paused; connect on resume.
            self.set_state(VmState::Paused);
            self.events.emit(&self.name, "adopted", "paused");
            self.spawn_monitor(gen);
            return;
        }
        // A daemon that died mid-snapshot leaves the VM paused and frozen.
        self.undo_interrupted_snapshot(inst).await;
        match self.connect_agent(inst, ADOPT_AGENT_DEADLINE).await {
            Ok(c) => {
                self.thaw_after_adopt(&c).await;
                *self.agent.lock() = Some(c);
                self.set_state(VmState::Running);
                self.events
                    .emit(&self.name, "adopted", &format!("pid={}", inst.pid()));
            }
            Err(e) => {
                // The VMM is left running: the guest may be busy rather than gone, and
                // `kill`, `start`, `restart` and `rmdir` all end it.
                self.fail(&format!(
                    "adopted its VMM (pid {}) but the agent did not answer: {}",
                    inst.pid(),
                    e.message
                ));
            }
        }
        self.spawn_monitor(gen);
    }

    /// A clone whose daemon died after the restore and before its identity step: do that
    /// step now; a clone that cannot take its identity must not run with the snapshot's.
    async fn finish_identity(
        self: &Arc<Self>,
        inst: &Arc<dyn VmmInstance>,
        spec: &VmSpec,
        gen: u64,
    ) {
        *self.vmm.lock() = Some(inst.clone());
        let ready = async {
            let client = self.connect_agent(inst, ADOPT_AGENT_DEADLINE).await?;
            self.take_new_identity(&client, spec).await?;
            Ok::<_, Error>(client)
        }
        .await;
        match ready {
            Ok(client) => {
                *self.agent.lock() = Some(client);
                self.record.lock().phase = Phase::Started;
                self.set_state(VmState::Running);
                if let Err(e) = self.save_record() {
                    tracing::warn!(vm = %self.name, "cannot save record: {e}");
                }
                self.events.emit(
                    &self.name,
                    "adopted",
                    &format!("pid={} (its identity step was finished)", inst.pid()),
                );
                self.spawn_monitor(gen);
            }
            Err(e) => {
                let why = format!(
                    "the daemon restarted {}, and finishing that step failed: {}",
                    Phase::IdentityPending.describe(),
                    e.message
                );
                self.end_and_fail(inst, &why).await;
            }
        }
    }

    /// End this VM's own VMM `inst` and mark the VM `failed: <why>`. A VMM that will not
    /// die stays known (and watched), so `kill`, `start` and `rmdir` can try again, and
    /// the record keeps its phase, so a later daemon does not adopt it as it is.
    async fn end_and_fail(self: &Arc<Self>, inst: &Arc<dyn VmmInstance>, why: &str) {
        let pid = inst.pid();
        match inst.kill().await {
            Ok(()) => {
                self.cleanup_after_exit(why);
                self.fail_start(&format!("{why}; its VMM (pid {pid}) was ended"));
            }
            Err(e) => {
                *self.agent.lock() = None;
                *self.vmm.lock() = Some(inst.clone());
                self.fail(&format!(
                    "{why}; its VMM (pid {pid}) could not be ended: {e}"
                ));
                self.spawn_monitor(self.generation());
            }
        }
    }

    /// Before a boot: end a VMM of this VM that is still running (a failed adoption
    /// leaves one, a kill that failed too), known in memory or found through the VM's
    /// directory and recognised by the backend as this VM's own.
    pub(crate) async fn end_leftover_vmm(&self) -> Result<()> {
        let known = self.vmm.lock().clone();
        let inst = match known {
            Some(inst) => Some(inst),
            None => match self.spec() {
                Ok(spec) => match self.backend.adopt(&spec).await {
                    Ok(found) => found.map(Arc::from),
                    Err(e) => {
                        tracing::warn!(vm = %self.name, "looking for a leftover VMM: {e}");
                        None
                    }
                },
                Err(_) => None,
            },
        };
        let Some(inst) = inst else {
            return Ok(());
        };
        if inst.is_alive() {
            let pid = inst.pid();
            inst.kill()
                .await
                .map_err(|e| Error::from(e).with_context("cannot end the VM's leftover VMM"))?;
            self.events.emit(
                &self.name,
                "killed",
                &format!("its leftover VMM (pid {pid}) before the start"),
            );
        }
        self.cleanup_after_exit("a leftover VMM was ended before the start");
        Ok(())
    }
}
