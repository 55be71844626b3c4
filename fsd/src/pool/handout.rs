//! Hand-out: a request whose machine matches a pool takes one of its ready clones, which
//! becomes the requesting user's VM under the requested name.
//!
//! Invariants:
//! - The user's VM is made afresh (`Vm::new` over the clone's directory, with the user's
//!   name, uid, gid and options) and takes over the clone's live VMM and agent; the
//!   clone's own handle gives them up first, so exactly one monitor watches the VMM.
//! - `vm.json` is written (as the user's) before the pool marker is removed: a daemon
//!   dying in between ends the clone rather than giving a user a half-made VM.
//! - Before the user's VM is visible the guest takes a new identity: hostname, entropy
//!   (the agent reseeds the kernel RNG with host bytes), machine-id and the host's clock.
//! - Any failure ends the clone and returns `None`: the caller boots cold.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::POOL_MARKER;
use crate::config::VmConfig;
use crate::error::{Error, Result};
use crate::manager::vm::{Desired, Phase, Vm, VmState};
use crate::manager::Manager;

impl Manager {
    /// A ready clone of the pool matching `config`, handed over to `uid` as VM `name`;
    /// `None` on a miss (counted) or when the hand-out failed (counted as a miss too).
    /// The caller has validated and reserved `name` and admitted the VM for `uid`.
    pub(crate) async fn take_pooled(
        self: &Arc<Self>,
        name: &str,
        config: &VmConfig,
        uid: u32,
        gid: u32,
    ) -> Option<Arc<Vm>> {
        let pool = self.pools.find(config)?;
        let clone = {
            let mut st = pool.state.lock();
            match st.ready.pop_front() {
                Some(vm) => {
                    st.hits += 1;
                    Some(vm)
                }
                None => {
                    st.misses += 1;
                    None
                }
            }
        };
        pool.wake.notify_one();
        let clone = clone?;
        let t0 = Instant::now();
        match self.hand_over(&clone, name, config, uid, gid).await {
            Ok(vm) => {
                self.events.emit(
                    name,
                    "created",
                    &format!(
                        "from pool {} image={} vcpus={} memory={} handout_ms={}",
                        pool.key,
                        config.image,
                        config.vcpus,
                        config.memory_mib,
                        t0.elapsed().as_millis()
                    ),
                );
                Some(vm)
            }
            Err(e) => {
                tracing::warn!(pool = %pool.key, "hand-out failed, booting cold: {e}");
                {
                    let mut st = pool.state.lock();
                    st.hits -= 1;
                    st.misses += 1;
                }
                self.events.emit(
                    &format!("pools/{}", pool.key),
                    "pool-handout-failed",
                    &e.message,
                );
                super::fill::end(&clone).await;
                None
            }
        }
    }

    async fn hand_over(
        self: &Arc<Self>,
        clone: &Arc<Vm>,
        name: &str,
        config: &VmConfig,
        uid: u32,
        gid: u32,
    ) -> Result<Arc<Vm>> {
        let _g = clone.op_lock.lock().await;
        // The clone's monitor stands down; its handle gives up the VMM and the agent.
        clone.generation.fetch_add(1, Ordering::SeqCst);
        let inst = clone
            .vmm
            .lock()
            .take()
            .ok_or_else(|| Error::host_down("the pooled clone has no VMM"))?;
        let agent = clone.agent.lock().take();
        let mut record = clone.record();
        record.name = name.to_string();
        record.uid = uid;
        record.gid = gid;
        record.config = VmConfig {
            // The machine is the pool's; the per-VM settings are the request's.
            ..config.clone()
        };
        record.created = crate::manager::now_secs();
        record.desired = Desired::Running;
        record.phase = Phase::Started;
        let vm = self.vm_of(record, clone.dir.clone(), clone.backend.clone());
        // Give it back to the clone's handle if anything below fails, so `end` kills it.
        let restore = |inst, agent| {
            *clone.vmm.lock() = Some(inst);
            *clone.agent.lock() = agent;
        };
        let moved = async {
            vm.save_record()?;
            std::fs::remove_file(clone.dir.join(POOL_MARKER))?;
            inst.resume().await.map_err(Error::from)?;
            let client = match agent.clone() {
                Some(a) if a.ping(std::time::Duration::from_secs(2)).await.is_ok() => a,
                _ => {
                    let c = vm.connect_agent(&inst, self.boot_timeout).await?;
                    *clone.agent.lock() = None;
                    c
                }
            };
            let spec = vm.spec()?;
            vm.take_new_identity(&client, &spec).await?;
            Ok::<_, Error>(client)
        }
        .await;
        let client = match moved {
            Ok(c) => c,
            Err(e) => {
                // Not the user's after all: the marker goes back, the handle too.
                let _ = std::fs::write(clone.dir.join(POOL_MARKER), b"");
                let _ = std::fs::remove_file(clone.dir.join("vm.json"));
                restore(inst, agent);
                return Err(e);
            }
        };
        *vm.vmm.lock() = Some(inst);
        *vm.agent.lock() = Some(client);
        let gen = vm.generation.fetch_add(1, Ordering::SeqCst) + 1;
        vm.set_state(VmState::Running);
        vm.spawn_monitor(gen);
        self.vms.write().insert(name.to_string(), vm.clone());
        Ok(vm)
    }
}
