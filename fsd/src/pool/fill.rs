//! A pool's refill task: make sure the template exists (building it, with backoff on
//! failure), then restore clones one at a time until `size` are ready.
//!
//! Invariants:
//! - One task per pool; it ends after the pool is removed, having ended its clones.
//! - A clone is ready only once restored, given an identity and paused; a clone that
//!   fails any step is ended and its directory removed.
//! - Every wait has a deadline (boot and restore take the manager's boot timeout).
//! - Repeated failures wait with exponential backoff (2 s doubling to 5 min) and say why
//!   in `cat pools` and in `events` (root's).
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::template::{self, Template};
use super::{Pool, POOL_MARKER};
use crate::error::{Error, Result};
use crate::layout::mkdir_private;
use crate::manager::vm::Vm;
use crate::manager::Manager;

const BACKOFF_MIN: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// How often an idle pool looks again (a clone may have died meanwhile).
const IDLE_CHECK: Duration = Duration::from_secs(30);
/// Restores in a row that may fail before the template itself is rebuilt.
const FAILS_BEFORE_REBUILD: u32 = 3;

/// The event subject of a pool (root's events: no VM has this name).
fn subject(pool: &Pool) -> String {
    format!("pools/{}", pool.key)
}

pub(super) async fn run(mgr: Arc<Manager>, pool: Arc<Pool>) {
    let mut backoff = BACKOFF_MIN;
    let mut template: Option<Arc<Template>> = None;
    let mut fails = 0u32;
    loop {
        if pool.removed() {
            drain(&pool).await;
            return;
        }
        let tpl = match &template {
            Some(t) => t.clone(),
            None => match ensure_template(&mgr, &pool).await {
                Ok(t) => {
                    backoff = BACKOFF_MIN;
                    template = Some(t.clone());
                    t
                }
                Err(e) => {
                    wait_after_failure(&mgr, &pool, "template build failed", &e, &mut backoff)
                        .await;
                    continue;
                }
            },
        };
        let size = pool.spec.lock().size as usize;
        drop_dead(&pool);
        if pool.ready_len() >= size {
            pool.set_refill("idle");
            let _ = tokio::time::timeout(IDLE_CHECK, pool.wake.notified()).await;
            continue;
        }
        pool.set_refill(format!("filling {}/{size}", pool.ready_len() + 1));
        match fill_one(&mgr, &pool, &tpl).await {
            Ok(vm) => {
                fails = 0;
                backoff = BACKOFF_MIN;
                let orphan = {
                    let mut st = pool.state.lock();
                    if st.removed {
                        Some(vm)
                    } else {
                        st.ready.push_back(vm);
                        None
                    }
                };
                if let Some(vm) = orphan {
                    end(&vm).await;
                }
            }
            Err(e) => {
                fails += 1;
                if fails >= FAILS_BEFORE_REBUILD {
                    // A template every restore fails from is rebuilt (it may be damaged
                    // in a way the checksums cannot see, e.g. made by another QEMU).
                    let _ = std::fs::remove_file(
                        template::pool_dir(&mgr, &pool.key).join("template.json"),
                    );
                    template = None;
                    fails = 0;
                }
                wait_after_failure(&mgr, &pool, "clone restore failed", &e, &mut backoff).await;
            }
        }
    }
}

async fn wait_after_failure(
    mgr: &Manager,
    pool: &Pool,
    what: &str,
    e: &Error,
    backoff: &mut Duration,
) {
    let why = format!("{what}: {} (retry in {}s)", e.message, backoff.as_secs());
    tracing::warn!(pool = %pool.key, "{why}");
    mgr.events.emit(&subject(pool), "pool-failed", &why);
    pool.set_refill(format!("failed: {why}"));
    let _ = tokio::time::timeout(*backoff, pool.wake.notified()).await;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
}

/// The pool's verified template, built when missing, corrupt or stale.
async fn ensure_template(mgr: &Arc<Manager>, pool: &Pool) -> Result<Arc<Template>> {
    let root = template::pool_dir(mgr, &pool.key);
    let spec = pool.spec.lock().clone();
    let boot = mgr.boot_identity(None).await?;
    let (r, s) = (root.clone(), spec.clone());
    let verified = tokio::task::spawn_blocking(move || template::verify(&r, &s, &boot))
        .await
        .map_err(|e| Error::io(e.to_string()))?;
    match verified {
        Ok(t) => return Ok(Arc::new(t)),
        Err(e) if e.errno == libc::ENOENT => {}
        Err(e) => {
            mgr.events.emit(
                &subject(pool),
                "pool-template-rebuild",
                &format!("the template cannot be used: {}", e.message),
            );
        }
    }
    pool.set_refill("building template");
    mgr.events
        .emit(&subject(pool), "pool-template-build", &spec.render());
    let t0 = std::time::Instant::now();
    let t = template::build(mgr, &spec, &root).await?;
    mgr.events.emit(
        &subject(pool),
        "pool-template-ready",
        &format!(
            "build_ms={} state_bytes={} memory_bytes={}",
            t0.elapsed().as_millis(),
            t.info.sizes.state_bytes,
            t.info.sizes.memory_bytes
        ),
    );
    Ok(Arc::new(t))
}

/// Restore one clone of `tpl`, paused, in its own VM directory (marked as pooled).
async fn fill_one(mgr: &Arc<Manager>, pool: &Pool, tpl: &Template) -> Result<Arc<Vm>> {
    let backend = mgr
        .backends
        .by_kind(tpl.info.backend)
        .ok_or_else(|| Error::new(libc::EOPNOTSUPP, "the template's backend is gone"))?;
    let id = crate::manager::new_id();
    let dir = mgr.layout.vm_dir(&id);
    mkdir_private(&dir)?;
    let made = async {
        std::fs::write(dir.join(POOL_MARKER), pool.key.as_bytes())?;
        let (src, dst) = (
            tpl.dir.join(crate::snapshots::DISK_FILE),
            dir.join("disk.ext4"),
        );
        tokio::task::spawn_blocking(move || crate::disk::clone_disk(&src, &dst))
            .await
            .map_err(|e| Error::io(e.to_string()))?
            .map_err(|e| Error::io(format!("cannot copy the template's disk: {e}")))?;
        let record = super::pool_record(
            &id,
            format!("pool-{id}"),
            tpl.info.config.clone(),
            backend.kind(),
            tpl.info.disk_mib,
            false,
        );
        let vm = mgr.vm_of(record, dir.clone(), backend);
        let timeout = mgr.boot_timeout.max(Duration::from_secs(30));
        let restored = async {
            vm.restore_boot(
                &format!("pools/{}", pool.key),
                &tpl.dir,
                &tpl.info.saved,
                timeout,
            )
            .await?;
            vm.pause().await
        }
        .await;
        match restored {
            Ok(()) => Ok(vm),
            Err(e) => {
                end(&vm).await;
                Err(e)
            }
        }
    }
    .await;
    if made.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    made
}

/// Forget ready clones whose VMM died.
fn drop_dead(pool: &Pool) {
    let dead: Vec<Arc<Vm>> = {
        let mut st = pool.state.lock();
        let (alive, dead) = st.ready.drain(..).partition(|vm| {
            vm.vmm
                .lock()
                .as_ref()
                .map(|i| i.is_alive())
                .unwrap_or(false)
        });
        st.ready = alive;
        dead.into()
    };
    for vm in dead {
        tokio::spawn(async move { end(&vm).await });
    }
}

/// End a pooled clone: its VMM, cgroup and directory.
pub(super) async fn end(vm: &Arc<Vm>) {
    let _ = vm.destroy().await;
    crate::cgroup::remove(&vm.id);
    if let Err(e) = tokio::fs::remove_dir_all(&vm.dir).await {
        tracing::warn!(vm = %vm.name, "cannot remove {}: {e}", vm.dir.display());
    }
}

/// End every ready clone of a removed pool.
async fn drain(pool: &Pool) {
    let clones: Vec<_> = pool.state.lock().ready.drain(..).collect();
    for vm in clones {
        end(&vm).await;
    }
    pool.set_refill("removed");
}

/// At daemon start: end the VMMs of pooled clones an earlier daemon left and remove
/// their directories (a pool refills; nothing of a user's is in them).
pub(super) fn end_leftovers(vms: &Path) {
    let Ok(entries) = std::fs::read_dir(vms) else {
        return;
    };
    for e in entries.flatten() {
        let dir = e.path();
        if !dir.join(POOL_MARKER).exists() {
            continue;
        }
        if let Some(pid) = crate::manager::vmm_pid_in(&dir) {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        tracing::info!(
            "removing the pooled clone {} of an earlier daemon",
            dir.display()
        );
        if let Some(id) = dir.file_name().and_then(|n| n.to_str()) {
            crate::cgroup::remove(id);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
