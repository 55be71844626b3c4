//! Warm pools: clones of a template, restored and paused, that `mkdir` and `create` take
//! instead of booting (see docs/tree.md, "pools", and docs/architecture.md).
//!
//! ```text
//! spec.rs      a `pools` line: the machine (image, vcpus, memory, disk, net, backend), size
//! template.rs  a pool's template: built once, verified (version + checksums) before use
//! fill.rs      each pool's refill task: template, then clones until `size` are ready
//! handout.rs   a matching request takes a ready clone; it becomes the user's VM
//! ```
//! Invariants:
//! - A pooled clone is in no user's view: it is not in the manager's VMs (no listing,
//!   no quota), its events are root's (it is named `pool-<id>`), and its directory holds
//!   [`POOL_MARKER`], so a restarted daemon ends it instead of adopting it.
//! - A clone is handed out at most once: it leaves `ready` under the pool's lock.
//! - A miss (no pool, no ready clone, a failed hand-out) falls back to a cold boot.
//! - Removing a pool ends its ready clones; a clone being filled is ended when its fill
//!   completes. Templates stay on disk (a later pool of the same machine reuses them).
mod fill;
mod handout;
pub mod spec;
mod template;

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::Result;
use crate::manager::vm::Vm;
use crate::manager::Manager;
pub use spec::PoolSpec;

/// In a pooled clone's VM directory until it is handed out.
pub const POOL_MARKER: &str = "pool.json";
/// The pools as root last wrote them, in the state directory's `pools/`.
const CONF: &str = "pools.conf";

/// The daemon's pools.
#[derive(Default)]
pub struct Pools {
    pools: Mutex<Vec<Arc<Pool>>>,
}

/// One pool.
pub struct Pool {
    pub spec: Mutex<PoolSpec>,
    pub key: String,
    state: Mutex<PoolState>,
    /// Wakes the refill task (a clone was taken, the pool was resized or removed).
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct PoolState {
    ready: VecDeque<Arc<Vm>>,
    hits: u64,
    misses: u64,
    /// What the refill task is doing (`cat pools`).
    refill: String,
    removed: bool,
}

impl Pool {
    fn new(spec: PoolSpec) -> Arc<Pool> {
        Arc::new(Pool {
            key: spec.key(),
            spec: Mutex::new(spec),
            state: Mutex::new(PoolState {
                refill: "starting".into(),
                ..Default::default()
            }),
            wake: tokio::sync::Notify::new(),
        })
    }

    fn set_refill(&self, what: impl Into<String>) {
        self.state.lock().refill = what.into();
    }

    fn removed(&self) -> bool {
        self.state.lock().removed
    }

    fn ready_len(&self) -> usize {
        self.state.lock().ready.len()
    }

    fn render(&self) -> String {
        let st = self.state.lock();
        format!(
            "{} ready={} hits={} misses={} refill={}",
            self.spec.lock().render(),
            st.ready.len(),
            st.hits,
            st.misses,
            st.refill.replace(char::is_whitespace, "_")
        )
    }
}

impl Pools {
    fn find(&self, config: &crate::config::VmConfig) -> Option<Arc<Pool>> {
        self.pools
            .lock()
            .iter()
            .find(|p| p.spec.lock().matches(config))
            .cloned()
    }

    /// `cat pools`: one line per pool.
    pub fn render(&self) -> String {
        self.pools
            .lock()
            .iter()
            .map(|p| p.render() + "\n")
            .collect()
    }
}

impl Manager {
    /// `cat pools`.
    pub fn pools_text(&self) -> String {
        self.pools.render()
    }

    /// A write of `pools` (root only): the pools become exactly `lines`; pools no longer
    /// listed are removed with their clones. All or nothing: a bad line changes nothing.
    pub fn set_pools(self: &Arc<Self>, lines: &[String]) -> Result<()> {
        let specs = PoolSpec::parse_all(lines.iter().map(String::as_str))?;
        for s in &specs {
            self.check_pool(s)?;
        }
        let conf = self.layout.root().join("pools");
        crate::layout::mkdir_private(&conf)?;
        let text: String = specs.iter().map(|s| s.render() + "\n").collect();
        let tmp = conf.join(format!("{CONF}.tmp"));
        std::fs::write(&tmp, &text)?;
        std::fs::rename(&tmp, conf.join(CONF))?;
        self.apply_pools(specs);
        Ok(())
    }

    /// A pool line as a write checks it: its syntax, then an unknown image or backend
    /// (refused at once rather than by every build of its template).
    pub fn check_pool_line(&self, line: &str) -> Result<()> {
        self.check_pool(&PoolSpec::parse(line)?)
    }

    fn check_pool(&self, s: &PoolSpec) -> Result<()> {
        self.backends.choose(s.config.backend)?;
        if !self.images().contains(&s.config.image) {
            return Err(crate::error::Error::not_found(format!(
                "pools: no image {:?}",
                s.config.image
            )));
        }
        Ok(())
    }

    fn apply_pools(self: &Arc<Self>, specs: Vec<PoolSpec>) {
        let mut pools = self.pools.pools.lock();
        let mut next = Vec::new();
        for spec in specs {
            match pools.iter().position(|p| p.key == spec.key()) {
                Some(i) => {
                    let p = pools.remove(i);
                    *p.spec.lock() = spec;
                    p.wake.notify_one();
                    next.push(p);
                }
                None => {
                    let p = Pool::new(spec);
                    tokio::spawn(fill::run(self.clone(), p.clone()));
                    next.push(p);
                }
            }
        }
        for gone in pools.drain(..) {
            gone.state.lock().removed = true;
            gone.wake.notify_one();
        }
        *pools = next;
    }

    /// At daemon start (after `reload`): end the clones an earlier daemon left in pools,
    /// then start the pools of `pools.conf`.
    pub fn start_pools(self: &Arc<Self>) {
        fill::end_leftovers(&self.layout.vms());
        let conf = self.layout.root().join("pools").join(CONF);
        let Ok(text) = std::fs::read_to_string(&conf) else {
            return;
        };
        match PoolSpec::parse_all(text.lines()) {
            Ok(specs) => self.apply_pools(specs),
            Err(e) => tracing::warn!("ignoring {}: {e}", conf.display()),
        }
    }
}

/// The record of a VM the pools own (root's, nobody's to list): a ready clone or a
/// template being built (`template`: its RAM in the shared file).
fn pool_record(
    id: &str,
    name: String,
    config: crate::config::VmConfig,
    backend: crate::vmm::BackendKind,
    disk_mib: u64,
    template: bool,
) -> crate::manager::vm::VmRecord {
    crate::manager::vm::VmRecord {
        ttl_deadline: None,
        id: id.to_string(),
        name,
        uid: 0,
        gid: 0,
        config,
        backend,
        created: 0,
        disk_mib,
        boot_ms: None,
        desired: crate::manager::vm::Desired::Running,
        net_slot: None,
        fs_slot: None,
        phase: Default::default(),
        template,
    }
}
