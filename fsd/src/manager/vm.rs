//! One VM: its record, state machine, VMM instance, agent connection and runs.
//!
//! Invariants:
//! - Lifecycle operations (boot, stop, kill, pause, resume, delete) are serialised by
//!   `op_lock`; readers of `state` never wait on it.
//! - `state` is `Running` only while `agent` holds a live client and `vmm` a live instance.
//! - Every wait on the guest has a deadline; a VM that is not running answers EHOSTDOWN
//!   at once.
//! - The on-disk record (`vm.json`) is rewritten after every state change that must
//!   survive a daemon restart (desired state, boot time, how far a start got: `phase`),
//!   atomically (temporary file + rename, one writer at a time).
//! - Adoption after a daemon restart runs in the background (`adopt`); while it runs the
//!   VM is `adopting` and its requests wait for it.
mod activity;
mod adopt;
mod phase;
mod retention;
mod snapshot;
pub use activity::{Wake, AUTORESUME_DEADLINE};
pub use adopt::{ADOPT_AGENT_DEADLINE, ADOPT_WAIT};
pub use phase::Phase;
pub use snapshot::{Taken, FREEZE_TIMEOUT};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bandsox_agent::client::AgentClient;
use bandsox_agent::proto::{ExecOptions, ExecSpec, Program, Request};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::runs::{Run, RunHome};
use crate::config::VmConfig;
use crate::error::{Error, Result};
use crate::events::{rfc3339, EventLog};
use crate::testhook::Point;
use crate::vmm::{Backend, BackendKind, VmSpec, VmmInstance};

/// Deadline for one agent RPC such as PowerOff or Ping.
pub const AGENT_RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `stop` waits for the guest to power itself off before escalating.
pub const POWEROFF_GRACE: Duration = Duration::from_secs(10);
/// How long a request waits for a lost agent connection to be re-established.
pub const RECONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Largest script accepted by `exec`.
pub const MAX_SCRIPT: usize = 1024 * 1024;

/// What the user sees in `state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    /// After a daemon restart, until the VM's VMM and agent have been re-attached.
    Adopting,
    Booting,
    Running,
    Paused,
    Stopping,
    Stopped,
    Failed(String),
}

impl VmState {
    pub fn render(&self) -> String {
        match self {
            VmState::Adopting => "adopting".into(),
            VmState::Booting => "booting".into(),
            VmState::Running => "running".into(),
            VmState::Paused => "paused".into(),
            VmState::Stopping => "stopping".into(),
            VmState::Stopped => "stopped".into(),
            VmState::Failed(why) => format!("failed: {why}"),
        }
    }
}

/// What the VM should be doing after a daemon restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    Paused,
    Stopped,
}

/// `vm.json`: everything needed to rebuild a [`Vm`] after a restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub config: VmConfig,
    pub backend: BackendKind,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub disk_mib: u64,
    pub boot_ms: Option<u64>,
    pub desired: Desired,
    /// `net=tap`: the VM's /30 in the TAP pool (see `crate::net`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_slot: Option<u32>,
    /// The VM's slot in `fs/` inode numbers (see `crate::guestfs::inodes`); given on
    /// first use of `fs/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_slot: Option<u16>,
    /// How far the last start got (see [`Phase`]); records of older daemons have none.
    #[serde(default)]
    pub phase: Phase,
    /// `ttl=`: when the VM ends, in seconds since the Unix epoch (kept here so that a
    /// daemon restart keeps the deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_deadline: Option<u64>,
    /// A pool's template being built: its RAM is the shared file [`TEMPLATE_MEMORY`] in
    /// the VM directory (see `crate::pool`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub template: bool,
}

/// The file a template VM's RAM lives in (in its directory).
pub const TEMPLATE_MEMORY: &str = "mem.ram";

/// Kernel and initramfs every VM boots (unless it names another with `kernel=`).
#[derive(Debug, Clone)]
pub struct BootFiles {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl BootFiles {
    /// The files of kernel `name` (`vmlinuz-NAME` and `initrd-NAME` beside the default
    /// ones), or these for `None`. `name` passed `names::validate` (no `/`).
    pub fn for_kernel(&self, name: Option<&str>) -> BootFiles {
        match name {
            None => self.clone(),
            Some(n) => BootFiles {
                kernel: self.kernel.with_file_name(format!("vmlinuz-{n}")),
                initrd: self.initrd.with_file_name(format!("initrd-{n}")),
            },
        }
    }
}

pub struct Vm {
    pub id: String,
    pub name: String,
    pub dir: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub(crate) record: Mutex<VmRecord>,
    state: Mutex<VmState>,
    /// Held by every lifecycle operation, and by an adoption from before the VM is
    /// visible until it ends (an `Arc` so the adoption's task can own it).
    pub(crate) op_lock: Arc<tokio::sync::Mutex<()>>,
    /// Woken when an adoption ends (see `adopt`).
    adopted: tokio::sync::Notify,
    /// One `vm.json` writer at a time (they share the temporary file).
    save_lock: Mutex<()>,
    /// One reconnect at a time; others wait for its result.
    reconnect_lock: tokio::sync::Mutex<()>,
    pub(crate) backend: Arc<dyn Backend>,
    boot_files: BootFiles,
    pub(crate) events: Arc<EventLog>,
    pub(crate) vmm: Mutex<Option<Arc<dyn VmmInstance>>>,
    pub(crate) agent: Mutex<Option<AgentClient>>,
    /// Bumped on every boot/adopt so monitors of an earlier incarnation stand down.
    pub(crate) generation: AtomicU64,
    runs: Mutex<BTreeMap<u64, Arc<Run>>>,
    next_run: AtomicU64,
    /// Session id → that session's last run (for `runs/last` and `cat exec`); `None`
    /// when the session's last exec failed before it had a run.
    session_last: crate::sessions::PerSession<Option<u64>>,
    /// Session id → last `ctl` result text.
    ctl_results: crate::ctl::CtlResults,
    /// What all runs share: the bytes their output may keep (see `spool` and
    /// `retention`), and the limits their memory is counted against (the owner's).
    runs_home: Arc<RunHome>,
    /// When the VM last served a request (exec, ctl, `fs/`), in ms since the Unix
    /// epoch; what `idle_pause` measures from (see `activity`).
    last_active_ms: AtomicU64,
    /// `BANDSOX_TAP_POOL` (see `net::plan`).
    tap_pool: Option<String>,
}

/// How [`Vm::start_locked`] starts the VMM.
#[derive(Clone, Copy)]
pub(crate) enum Start<'a> {
    /// A fresh boot from the kernel and the VM's disk.
    Boot,
    /// A restore from snapshot `snap_name` (its files in `snap_dir`); the guest then
    /// thaws and takes a new identity ([`Vm::take_new_identity`]).
    Restore {
        snap_name: &'a str,
        snap_dir: &'a std::path::Path,
        saved: &'a crate::vmm::SavedState,
    },
}

impl Vm {
    pub fn new(
        record: VmRecord,
        dir: PathBuf,
        backend: Arc<dyn Backend>,
        boot_files: BootFiles,
        events: Arc<EventLog>,
        limits: Arc<crate::limits::Limits>,
        tap_pool: Option<String>,
    ) -> Arc<Vm> {
        let runs_home = Arc::new(RunHome {
            budget: Arc::new(super::spool::OutputBudget::new(
                record.config.output_mib.into(),
                limits.clone(),
            )),
            limits,
            uid: record.uid,
        });
        let runs = load_runs(&dir.join("runs"), &runs_home);
        let next = runs.keys().next_back().copied().unwrap_or(0) + 1;
        let vm = Arc::new(Vm {
            id: record.id.clone(),
            name: record.name.clone(),
            uid: record.uid,
            gid: record.gid,
            dir,
            record: Mutex::new(record),
            state: Mutex::new(VmState::Stopped),
            op_lock: Arc::new(tokio::sync::Mutex::new(())),
            adopted: tokio::sync::Notify::new(),
            save_lock: Mutex::new(()),
            reconnect_lock: tokio::sync::Mutex::new(()),
            backend,
            boot_files,
            events,
            vmm: Mutex::new(None),
            agent: Mutex::new(None),
            generation: AtomicU64::new(0),
            runs: Mutex::new(runs),
            next_run: AtomicU64::new(next),
            session_last: Default::default(),
            ctl_results: Default::default(),
            runs_home,
            last_active_ms: AtomicU64::new(activity::now_ms()),
            tap_pool,
        });
        let pruner: std::sync::Weak<dyn super::spool::Prune> = Arc::downgrade(&vm) as _;
        vm.runs_home.budget.set_pruner(pruner);
        vm
    }

    /// `Some(why)` when this VM's backend was forced by a test-only switch.
    pub fn backend_forced(&self) -> Option<String> {
        self.backend.forced()
    }

    pub fn record(&self) -> VmRecord {
        self.record.lock().clone()
    }

    pub fn state(&self) -> VmState {
        self.state.lock().clone()
    }

    /// Change the state; a settled state (running, paused, stopped) is also what the VM
    /// should be in after a daemon restart, so it is persisted as `desired`.
    pub(crate) fn set_state(&self, s: VmState) {
        let desired = match s {
            VmState::Running => Some(Desired::Running),
            VmState::Paused => Some(Desired::Paused),
            VmState::Stopped => Some(Desired::Stopped),
            _ => None,
        };
        *self.state.lock() = s;
        if let Some(d) = desired {
            if self.record.lock().desired != d {
                self.set_desired(d);
            }
        }
    }

    pub fn console_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    pub fn save_record(&self) -> Result<()> {
        // Under the lock, the record is read afresh: the last writer writes the newest.
        let _one_writer = self.save_lock.lock();
        let rec = self.record();
        let json = serde_json::to_vec_pretty(&rec).map_err(|e| Error::io(e.to_string()))?;
        let tmp = self.dir.join("vm.json.tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, self.dir.join("vm.json"))?;
        Ok(())
    }

    fn set_desired(&self, d: Desired) {
        self.record.lock().desired = d;
        if let Err(e) = self.save_record() {
            tracing::warn!(vm = %self.name, "cannot save record: {e}");
        }
    }

    /// What the backend needs to start this VM; fails only when its network cannot be
    /// described (e.g. the TAP pool was changed under an existing VM).
    pub fn spec(&self) -> Result<VmSpec> {
        let rec = self.record();
        let boot = self.boot_files.for_kernel(rec.config.kernel.as_deref());
        Ok(VmSpec {
            name: self.name.clone(),
            dir: self.dir.clone(),
            vcpus: rec.config.vcpus,
            memory_mib: rec.config.memory_mib,
            disk: Some(self.dir.join("disk.ext4")),
            kernel: boot.kernel,
            initrd: boot.initrd,
            net: crate::net::plan(
                rec.config.net,
                &self.id,
                rec.net_slot,
                self.tap_pool.as_deref(),
            )?,
            memory_file: rec.template.then(|| self.dir.join(TEMPLATE_MEMORY)),
        })
    }

    /// Last `ctl` results per session.
    pub fn ctl_results(&self) -> &crate::ctl::CtlResults {
        &self.ctl_results
    }

    /// The info JSON.
    pub fn info_json(&self) -> String {
        let rec = self.record();
        let pid = self.vmm.lock().as_ref().map(|v| v.pid());
        let mut info = serde_json::json!({
            "name": self.name,
            "id": self.id,
            "backend": rec.backend,
            "image": rec.config.image,
            "vcpus": rec.config.vcpus,
            "memory_mib": rec.config.memory_mib,
            "disk_mib": rec.disk_mib,
            "net": rec.config.net,
            "ip": crate::net::plan(rec.config.net, &self.id, rec.net_slot, self.tap_pool.as_deref())
                .ok()
                .flatten()
                .map(|p| p.guest.addr.to_string()),
            "created": rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(rec.created)),
            "boot_ms": rec.boot_ms,
            "vmm_pid": pid,
            "state": self.state().render(),
            "owner_uid": rec.uid,
            "cgroup": match self.backend.vmm_overhead_mib(rec.config.memory_mib) {
                Some(_) => crate::cgroup::describe(&self.id),
                None => "none: the host test backend runs no VM".to_string(),
            },
        });
        self.lifecycle_info(&mut info);
        if let Some(why) = self.backend.forced() {
            // Test-only switches are never silent.
            info["backend_forced"] = serde_json::Value::String(why);
        }
        let mut s = serde_json::to_string_pretty(&info).unwrap_or_else(|_| "{}".into());
        s.push('\n');
        s
    }

    fn agent(&self) -> Option<AgentClient> {
        self.agent.lock().clone()
    }

    /// EHOSTDOWN unless the VM is running (its agent connection may be reconnecting).
    pub fn require_running(&self) -> Result<()> {
        let state = self.state();
        if state != VmState::Running {
            return Err(Error::host_down(format!(
                "VM {} is {}, not running",
                self.name,
                state.render()
            )));
        }
        Ok(())
    }

    /// A live agent client, or EHOSTDOWN saying why there is none.
    pub fn require_agent(&self) -> Result<AgentClient> {
        self.require_running()?;
        match self.agent() {
            Some(a) if !a.is_closed() => Ok(a),
            _ => Err(Error::host_down(format!(
                "VM {}: the guest agent is not connected",
                self.name
            ))),
        }
    }

    /// EHOSTDOWN unless the VM is running, being adopted (requests then wait for the
    /// adoption: see [`Vm::live_agent`]) or paused with `autoresume=1` (requests resume
    /// it first: see [`Vm::wake`]).
    pub fn require_running_or_adopting(&self) -> Result<()> {
        if self.state() == VmState::Adopting || self.will_autoresume() {
            return Ok(());
        }
        self.require_running()
    }

    /// A live agent client. While the VM is being adopted, wait for that first (at most
    /// [`ADOPT_WAIT`]). When the VM runs but its connection died (a transport reset
    /// after pause or snapshot, a crashed stream), reconnect first: the caller sees a
    /// slower request, not an error.
    pub async fn live_agent(&self) -> Result<AgentClient> {
        self.wait_adopted().await?;
        match self.require_agent() {
            Err(e) if self.state() == VmState::Running => self
                .reconnect_agent("the connection was lost")
                .await
                .map_err(|r| {
                    Error::new(
                        e.errno,
                        format!("{}; reconnect failed: {}", e.message, r.message),
                    )
                }),
            r => r,
        }
    }

    /// Replace a dead (or, with `force`, any) agent connection by a fresh one.
    /// Single-flight: concurrent callers wait and share the result.
    pub async fn reconnect_agent_with(&self, why: &str, force: bool) -> Result<AgentClient> {
        let _g = self.reconnect_lock.lock().await;
        if let Some(a) = self.agent() {
            if force {
                a.close(why);
            } else if !a.is_closed() {
                return Ok(a);
            }
        }
        let gen = self.generation();
        let inst = self
            .vmm
            .lock()
            .clone()
            .ok_or_else(|| Error::host_down(format!("VM {} has no VMM", self.name)))?;
        self.events.emit(&self.name, "agent-lost", why);
        let client = self.connect_agent(&inst, RECONNECT_DEADLINE).await?;
        if self.generation() != gen {
            client.close("the VM changed state during the reconnect");
            return Err(Error::host_down(format!(
                "VM {} stopped during the reconnect",
                self.name
            )));
        }
        *self.agent.lock() = Some(client.clone());
        self.events.emit(&self.name, "agent-reconnected", "");
        Ok(client)
    }

    #[tracing::instrument(level = "debug", name = "reconnect_agent", skip_all, fields(vm = %self.name))]
    async fn reconnect_agent(&self, why: &str) -> Result<AgentClient> {
        self.reconnect_agent_with(why, false).await
    }

    /// The VM's `fs/` inode-number slot, if it has one.
    pub fn fs_slot(&self) -> Option<u16> {
        self.record.lock().fs_slot
    }

    /// Whether a VMM process of this VM is alive (it may be writing the disk).
    pub fn vmm_alive(&self) -> bool {
        self.vmm.lock().as_ref().is_some_and(|i| i.is_alive())
    }

    /// Give the VM its `fs/` slot (kept in `vm.json`).
    pub fn set_fs_slot(&self, slot: u16) -> Result<()> {
        self.record.lock().fs_slot = Some(slot);
        self.save_record()
    }

    /// The live agent and the boot generation it belongs to (file service numbers are
    /// only valid within one generation).
    pub fn fs_agent(&self) -> Result<(AgentClient, u64)> {
        let client = self.require_agent()?;
        Ok((client, self.generation()))
    }

    /// Bumped on every boot, adopt and exit.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    // ---- lifecycle -------------------------------------------------------------------

    /// Launch the VMM and wait for the agent. Caller holds `op_lock`.
    #[tracing::instrument(level = "debug", name = "boot", skip_all, fields(vm = %self.name))]
    async fn boot_locked(self: &Arc<Self>, timeout: Duration) -> Result<()> {
        self.start_locked(Start::Boot, timeout).await
    }

    /// Start the VMM (`how`: boot, or restore from a snapshot) and wait for the agent;
    /// the VM ends `running`, or `failed: <why>` with its VMM killed and network
    /// released. Caller holds `op_lock`.
    pub(crate) async fn start_locked(
        self: &Arc<Self>,
        how: Start<'_>,
        timeout: Duration,
    ) -> Result<()> {
        if let Start::Boot = how {
            // A failed start or adoption may have left this VM's VMM running (a QEMU in
            // `-incoming defer` holds the pid file a new one needs).
            if let Err(e) = self.end_leftover_vmm().await {
                self.fail_start(&e.message);
                return Err(e);
            }
        }
        let gen = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.set_state(VmState::Booting);
        let booting = match how {
            Start::Boot => format!(
                "backend={}{}",
                self.backend.kind(),
                self.backend
                    .forced()
                    .map(|why| format!(" (forced: {why})"))
                    .unwrap_or_default()
            ),
            Start::Restore { snap_name, .. } => {
                format!("backend={} from snapshot {snap_name}", self.backend.kind())
            }
        };
        self.events.emit(&self.name, "booting", &booting);
        let t0 = Instant::now();
        let spec = match self.spec() {
            Ok(s) => s,
            Err(e) => {
                self.fail_start(&e.message);
                return Err(e);
            }
        };
        if let Err(e) = prepare_network(&spec).await {
            self.fail_start(&e.message);
            return Err(e);
        }
        // Recorded before the VMM exists, so a daemon that dies from here on knows what
        // the VMM it may find is (see `Phase`).
        let phase = match how {
            Start::Boot => Phase::Booting,
            Start::Restore { .. } => Phase::Restoring,
        };
        if let Err(e) = self.record_phase(phase) {
            self.release_network();
            self.fail_start(&e.message);
            return Err(e);
        }
        let launched = match how {
            Start::Boot => self.backend.launch(&spec).await.map_err(Error::from),
            Start::Restore {
                snap_dir, saved, ..
            } => (self.backend.restore(&spec, snap_dir, saved).await)
                .map_err(|e| Error::from(e).with_context("restore")),
        };
        let inst: Arc<dyn VmmInstance> = match launched {
            Ok(i) => Arc::from(i),
            Err(err) => {
                self.release_network();
                self.fail_start(&err.message);
                return Err(err);
            }
        };
        *self.vmm.lock() = Some(inst.clone());
        self.confine(inst.pid());
        let ready = async {
            if let Start::Restore { .. } = how {
                self.record_phase(Phase::IdentityPending)?;
                crate::testhook::pause_at(Point::CloneRestored, &self.name).await;
            }
            let client = self.connect_agent(&inst, timeout).await?;
            if let Start::Restore { .. } = how {
                self.take_new_identity(&client, &spec).await?;
                crate::testhook::pause_at(Point::CloneIdentitySet, &self.name).await;
            }
            Ok::<_, Error>(client)
        }
        .await;
        match ready {
            Ok(client) => {
                let ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
                *self.agent.lock() = Some(client);
                {
                    let mut rec = self.record.lock();
                    rec.boot_ms = Some(ms);
                    rec.phase = Phase::Started;
                }
                self.set_state(VmState::Running);
                if let Err(e) = self.save_record() {
                    tracing::warn!(vm = %self.name, "cannot save record: {e}");
                }
                let running = match how {
                    Start::Boot => format!("boot_ms={ms} pid={}", inst.pid()),
                    Start::Restore { snap_name, .. } => {
                        format!("restore_ms={ms} pid={} snapshot={snap_name}", inst.pid())
                    }
                };
                self.events.emit(&self.name, "running", &running);
                self.spawn_monitor(gen);
                Ok(())
            }
            Err(e) => {
                let killed = inst.kill().await.is_ok();
                *self.vmm.lock() = None;
                self.release_network();
                if killed {
                    self.fail_start(&e.message);
                } else {
                    // Still alive: the record keeps its phase, and the next `start` (or
                    // a later daemon) ends it as a leftover.
                    self.fail(&e.message);
                }
                Err(e)
            }
        }
    }

    /// `failed: <why>` (and a `failed` event); the record is left as it is.
    pub(crate) fn fail(&self, why: &str) {
        self.set_state(VmState::Failed(why.to_string()));
        self.events.emit(&self.name, "failed", why);
    }

    /// A start failed, or a half-done one was ended (its VMM is gone): [`Vm::fail`], and
    /// `failed` as the record's phase, so a later daemon does not take the VM for one
    /// caught in the middle of a start.
    pub(crate) fn fail_start(&self, why: &str) {
        self.record.lock().phase = Phase::Failed;
        if let Err(e) = self.save_record() {
            tracing::warn!(vm = %self.name, "cannot save record: {e}");
        }
        self.fail(why);
    }

    /// Connect and handshake with the agent, retrying until `timeout`.
    pub(crate) async fn connect_agent(
        &self,
        inst: &Arc<dyn VmmInstance>,
        timeout: Duration,
    ) -> Result<AgentClient> {
        let deadline = Instant::now() + timeout;
        let mut last_err = String::from("no answer");
        loop {
            if !inst.is_alive() {
                // The VMM's own account (exit status, its last error) when it has one;
                // the console holds only guest output.
                return Err(Error::io(match inst.exit_reason() {
                    Some(why) => format!("the VMM exited before the agent answered: {why}"),
                    None => format!(
                        "the VMM exited before the agent answered; console: {}",
                        crate::logcap::log_tail(&self.console_path(), 0, 5)
                    ),
                }));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::timed_out(format!(
                    "the guest agent did not answer within {}s ({last_err}); console: {}",
                    timeout.as_secs(),
                    crate::logcap::log_tail(&self.console_path(), 0, 5)
                )));
            }
            match inst.connect_agent().await {
                Ok(stream) => {
                    // Short handshake windows so a VMM that dies mid-boot is noticed.
                    let window = (deadline - now).min(Duration::from_secs(3));
                    match AgentClient::connect(stream, window).await {
                        Ok((client, info)) => {
                            tracing::info!(vm = %self.name, hostname = %info.hostname, kernel = %info.kernel, "agent connected");
                            return Ok(client);
                        }
                        Err(e) => last_err = e.to_string(),
                    }
                }
                Err(e) => {
                    last_err = e.to_string();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Watch the VMM and the agent connection of boot generation `gen`.
    pub(crate) fn spawn_monitor(self: &Arc<Self>, gen: u64) {
        let vm = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(vm) = vm.upgrade() else { return };
                if vm.generation.load(Ordering::SeqCst) != gen {
                    return;
                }
                let Some(inst) = vm.vmm.lock().clone() else {
                    return;
                };
                if !inst.is_alive() {
                    let _guard = vm.op_lock.lock().await;
                    if vm.generation.load(Ordering::SeqCst) != gen {
                        return;
                    }
                    let why = inst
                        .exit_reason()
                        .unwrap_or_else(|| "the VMM process exited".into());
                    vm.cleanup_after_exit("the VMM process exited");
                    vm.set_state(VmState::Stopped);
                    vm.events.emit(&vm.name, "exited", &why);
                    return;
                }
                let closed = vm.agent().map(|a| a.is_closed()).unwrap_or(true);
                if closed && vm.state() == VmState::Running {
                    if let Err(e) = vm.reconnect_agent("the connection was lost").await {
                        tracing::warn!(vm = %vm.name, "agent reconnect failed: {e}");
                    }
                }
            }
        });
    }

    /// Put the VMM `pid` into the VM's own cgroup (where the host has cgroup v2).
    pub(crate) fn confine(&self, pid: u32) {
        let rec = self.record();
        if let Some(overhead) = self.backend.vmm_overhead_mib(rec.config.memory_mib) {
            crate::cgroup::confine(
                &self.id,
                pid,
                rec.config.vcpus,
                rec.config.memory_mib,
                overhead,
            );
        }
    }

    /// Forget the VMM and agent, mark live runs lost, remove the host side of the network.
    fn cleanup_after_exit(&self, why: &str) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        *self.agent.lock() = None;
        *self.vmm.lock() = None;
        for run in self.runs.lock().values() {
            run.abandon(why);
        }
        self.release_network();
        crate::cgroup::remove(&self.id);
    }

    /// Delete the VM's TAP device, if it has one. Synchronous on purpose: a restart
    /// creates the device again right after, and must not race a late removal.
    pub(crate) fn release_network(&self) {
        let rec = self.record();
        if rec.config.net == crate::vmm::NetMode::Tap {
            crate::net::remove_tap(&crate::net::tap_name(&self.id));
        }
    }

    /// Boot a stopped or failed VM.
    pub async fn start(self: &Arc<Self>, timeout: Duration) -> Result<()> {
        let _g = self.op_lock.lock().await;
        match self.state() {
            VmState::Stopped | VmState::Failed(_) => self.boot_locked(timeout).await,
            s => Err(Error::busy(format!(
                "VM {} is {}; start needs a stopped VM",
                self.name,
                s.render()
            ))),
        }
    }

    /// Power the guest off cleanly (agent, then ACPI, then kill); keeps the disk.
    pub async fn stop(self: &Arc<Self>) -> Result<()> {
        let _g = self.op_lock.lock().await;
        self.stop_locked().await
    }

    #[tracing::instrument(level = "debug", name = "stop", skip_all, fields(vm = %self.name))]
    async fn stop_locked(self: &Arc<Self>) -> Result<()> {
        let state = self.state();
        if matches!(state, VmState::Stopped | VmState::Failed(_)) {
            return Err(Error::busy(format!(
                "VM {} is {}; stop needs a running or paused VM",
                self.name,
                state.render()
            )));
        }
        let Some(inst) = self.vmm.lock().clone() else {
            self.set_state(VmState::Stopped);
            return Ok(());
        };
        self.set_state(VmState::Stopping);
        if state == VmState::Paused {
            let _ = inst.resume().await;
        }
        let mut how = "poweroff";
        if let Some(agent) = self.agent() {
            let _ = agent.request(Request::PowerOff, AGENT_RPC_TIMEOUT).await;
        }
        if !inst.wait_exit(POWEROFF_GRACE).await {
            how = "acpi";
            let _ = inst.request_shutdown().await;
            if !inst.wait_exit(Duration::from_secs(3)).await {
                how = "killed";
                let _ = inst.kill().await;
            }
        }
        self.cleanup_after_exit("the VM was stopped");
        self.set_state(VmState::Stopped);
        self.events.emit(&self.name, "stopped", how);
        Ok(())
    }

    /// End the VMM at once.
    pub async fn kill(self: &Arc<Self>) -> Result<()> {
        let _g = self.op_lock.lock().await;
        self.kill_locked().await
    }

    #[tracing::instrument(level = "debug", name = "kill", skip_all, fields(vm = %self.name))]
    async fn kill_locked(self: &Arc<Self>) -> Result<()> {
        let inst = self.vmm.lock().clone();
        if let Some(inst) = inst {
            inst.kill().await?;
        }
        self.cleanup_after_exit("the VM was killed");
        self.set_state(VmState::Stopped);
        self.events.emit(&self.name, "killed", "");
        Ok(())
    }

    /// The VMM instance, if the VM is in `needed` state (EBUSY otherwise).
    fn vmm_in_state(&self, needed: VmState, op: &str) -> Result<Arc<dyn VmmInstance>> {
        let state = self.state();
        if state != needed {
            return Err(Error::busy(format!(
                "VM {} is {}; {op} needs a {} VM",
                self.name,
                state.render(),
                needed.render()
            )));
        }
        self.vmm
            .lock()
            .clone()
            .ok_or_else(|| Error::host_down("no VMM"))
    }

    /// `pause` through ctl.
    pub async fn pause(self: &Arc<Self>) -> Result<()> {
        let _g = self.op_lock.lock().await;
        self.pause_locked("ctl").await
    }

    /// Pause; the `paused` event says `reason=<why>`. Caller holds `op_lock`.
    #[tracing::instrument(level = "debug", name = "pause", skip_all, fields(vm = %self.name))]
    pub(crate) async fn pause_locked(self: &Arc<Self>, why: &str) -> Result<()> {
        let inst = self.vmm_in_state(VmState::Running, "pause")?;
        inst.pause().await?;
        self.set_state(VmState::Paused);
        self.events
            .emit(&self.name, "paused", &format!("reason={why}"));
        Ok(())
    }

    /// `resume` through ctl.
    pub async fn resume(self: &Arc<Self>) -> Result<()> {
        let _g = self.op_lock.lock().await;
        self.resume_locked("ctl").await
    }

    /// Resume; the `resumed` event says `reason=<why>`. Caller holds `op_lock`.
    #[tracing::instrument(level = "debug", name = "resume", skip_all, fields(vm = %self.name))]
    pub(crate) async fn resume_locked(self: &Arc<Self>, why: &str) -> Result<()> {
        let inst = self.vmm_in_state(VmState::Paused, "resume")?;
        inst.resume().await?;
        self.set_state(VmState::Running);
        // A connection may not survive a pause on every transport: check, and reconnect.
        let healthy = match self.agent() {
            Some(a) => a.ping(Duration::from_secs(2)).await.is_ok(),
            None => false,
        };
        if !healthy {
            // Some transports stall after a pause rather than close: replace the connection.
            self.reconnect_agent_with("no answer after resume", true)
                .await?;
        }
        self.events
            .emit(&self.name, "resumed", &format!("reason={why}"));
        Ok(())
    }

    pub async fn restart(self: &Arc<Self>, timeout: Duration) -> Result<()> {
        let _g = self.op_lock.lock().await;
        if !matches!(self.state(), VmState::Stopped | VmState::Failed(_)) {
            self.stop_locked().await?;
        }
        self.boot_locked(timeout).await
    }

    /// First boot of a freshly created VM.
    pub async fn first_boot(self: &Arc<Self>, timeout: Duration) -> Result<()> {
        let _g = self.op_lock.lock().await;
        self.boot_locked(timeout).await
    }

    /// Kill the VMM (if any) for deletion. Caller removes the directory.
    #[tracing::instrument(level = "debug", name = "destroy", skip_all, fields(vm = %self.name))]
    pub async fn destroy(self: &Arc<Self>) -> Result<()> {
        let _g = self.op_lock.lock().await;
        let inst = self.vmm.lock().clone();
        if let Some(inst) = inst {
            inst.kill().await?;
        }
        self.cleanup_after_exit("the VM was deleted");
        self.set_state(VmState::Stopped);
        Ok(())
    }

    // ---- runs ------------------------------------------------------------------------

    pub fn run(&self, n: u64) -> Option<Arc<Run>> {
        self.runs.lock().get(&n).cloned()
    }

    /// The run with the highest number.
    pub fn newest_run(&self) -> Option<Arc<Run>> {
        self.runs.lock().values().next_back().cloned()
    }

    pub fn run_numbers(&self) -> Vec<u64> {
        self.runs.lock().keys().copied().collect()
    }

    /// The last run of `session`, or of the VM when that session has none; `None`
    /// when the session's last exec failed before it had a run (see [`Vm::exec_failed`]).
    pub fn last_run(&self, session: u32) -> Option<u64> {
        match self.session_last.get(session) {
            Some(last) => last,
            None => self.runs.lock().keys().next_back().copied(),
        }
    }

    /// Count one more command of this VM (with a screen of `cells`, and its run as a
    /// kept one) for its owner, or refuse (EDQUOT, EAGAIN) naming the limit. When the
    /// owner keeps too many runs, this VM's oldest finished ones are deleted first, as
    /// beyond `keep_runs`.
    pub fn hold_run(&self, cells: u64) -> Result<crate::limits::Reservation> {
        use super::spool::Prune;
        self.runs_home
            .limits
            .hold_freeing(self.uid, crate::limits::Amounts::run(cells), |r| {
                r == crate::limits::Resource::KeptRuns && self.prune_oldest(u64::MAX)
            })
    }

    /// An exec of `session` ran nothing: the session's `runs/last` names no run
    /// (rather than an older one) until its next exec. Returns `e` in the context
    /// `exec`; the control tree records it (`cat <vm>/ctl`, see `vfs::journal`).
    pub fn exec_failed(&self, session: u32, e: Error) -> Error {
        let e = if e.message.starts_with("exec: ") {
            e
        } else {
            e.with_context("exec")
        };
        self.session_last.set(session, None);
        e
    }

    /// Start `script` as a new run (`runs/<n>`); returns once the guest started it. A
    /// first line `#bandsox key=value...` sets per-command options (see `execopts`); a
    /// bad one fails with EINVAL before anything runs. The command counts against the
    /// owner's `runs` and `terminal_cells` from its start to its end. Every failure is
    /// in the context `exec` (the control tree records it for `cat <vm>/ctl`); one that
    /// left no run also clears the session's `runs/last`.
    pub async fn start_run(self: &Arc<Self>, script: Vec<u8>, session: u32) -> Result<Arc<Run>> {
        self.start_run_held(script, session, None).await
    }

    /// [`Vm::start_run`] with the command already counted by `hold` (see
    /// [`Vm::hold_run`]; resized to the terminal the options ask for).
    pub async fn start_run_held(
        self: &Arc<Self>,
        script: Vec<u8>,
        session: u32,
        hold: Option<crate::limits::Reservation>,
    ) -> Result<Arc<Run>> {
        let (opts, body) = match super::execopts::split(&script) {
            Ok(x) => x,
            Err(e) => return Err(self.exec_failed(session, e)),
        };
        self.start_with(script, Program::Script(body), opts, session, hold)
            .await
    }

    /// Start `program` as a new run whose `cmd` file shows `cmd`.
    pub async fn start_program(
        self: &Arc<Self>,
        script: Vec<u8>,
        program: Program,
        session: u32,
    ) -> Result<Arc<Run>> {
        self.start_with(script, program, Default::default(), session, None)
            .await
    }

    /// The VM-wide default timeout of commands (`exec_timeout`).
    pub fn exec_timeout(&self) -> Option<Duration> {
        self.record
            .lock()
            .config
            .exec_timeout_ms
            .map(Duration::from_millis)
    }

    /// Change the VM-wide default timeout (`None`: no timeout); kept in `vm.json`.
    pub fn set_exec_timeout(&self, t: Option<Duration>) -> Result<()> {
        self.record.lock().config.exec_timeout_ms =
            t.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.save_record()
    }

    async fn start_with(
        self: &Arc<Self>,
        script: Vec<u8>,
        program: Program,
        opts: super::execopts::ExecOpts,
        session: u32,
        hold: Option<crate::limits::Reservation>,
    ) -> Result<Arc<Run>> {
        let made = async {
            check_script(&script)?;
            self.wake(Wake::Exec).await?;
            let agent = self.live_agent().await?;
            Ok((agent, self.new_run(&script, &opts, session, hold)?))
        };
        let (agent, run) = match made.await {
            Ok(x) => x,
            Err(e) => return Err(self.exec_failed(session, e)),
        };
        let timeout = match opts.timeout {
            None => self.exec_timeout(),
            Some(super::execopts::TimeoutOpt::Off) => None,
            Some(super::execopts::TimeoutOpt::After(d)) => Some(d),
        };
        let spec = ExecOptions {
            spec: ExecSpec {
                program,
                env: opts.env,
                cwd: opts.cwd,
                stdin: true,
            },
            user: opts.user,
            tty: opts.tty,
        };
        match agent.exec_with(spec, AGENT_RPC_TIMEOUT).await {
            Ok(handle) => {
                tokio::spawn(run.clone().pump(handle, timeout));
                Ok(run)
            }
            Err(e) => {
                let err = Error::from(e);
                run.failed_to_start(&err);
                Err(err.with_context("exec"))
            }
        }
    }

    /// The run a new command gets: admitted against the owner's limits and created on
    /// disk, or nothing at all.
    fn new_run(
        &self,
        script: &[u8],
        opts: &super::execopts::ExecOpts,
        session: u32,
        hold: Option<crate::limits::Reservation>,
    ) -> Result<Arc<Run>> {
        let cells = opts.tty.map_or(0, super::terminal::cells);
        let need = crate::limits::Amounts::run(cells);
        let hold = match hold {
            Some(h) => {
                h.resize(need)?;
                h
            }
            None => self.hold_run(cells)?,
        };
        let n = self.next_run.fetch_add(1, Ordering::SeqCst);
        let run = Run::create(
            &self.runs_home,
            &self.dir.join("runs"),
            n,
            script,
            opts.tty,
            opts.waits(),
            hold,
        )?;
        self.runs.lock().insert(n, run.clone());
        self.prune_runs();
        self.session_last.set(session, Some(n));
        Ok(run)
    }
}

/// A script `exec` may run: at most [`MAX_SCRIPT`] bytes, not only white space.
fn check_script(script: &[u8]) -> Result<()> {
    if script.len() > MAX_SCRIPT {
        return Err(Error::new(
            libc::E2BIG,
            format!(
                "the command is {} bytes; at most {MAX_SCRIPT} are accepted",
                script.len()
            ),
        ));
    }
    if script.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Error::invalid("empty command"));
    }
    Ok(())
}

/// Create the host side of the VM's network (the TAP device for `net=tap`).
pub(crate) async fn prepare_network(spec: &VmSpec) -> Result<()> {
    let Some(tap) = spec.net.as_ref().and_then(|n| n.tap.clone()) else {
        return Ok(());
    };
    tokio::task::spawn_blocking(move || crate::net::setup_tap(&tap))
        .await
        .map_err(|e| Error::io(format!("network setup task failed: {e}")))?
}

fn load_runs(dir: &std::path::Path, home: &Arc<RunHome>) -> BTreeMap<u64, Arc<Run>> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let Some(n) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        match Run::load(home, &e.path(), n) {
            Ok(run) => {
                out.insert(n, run);
            }
            Err(err) => tracing::warn!("skipping run {}: {err}", e.path().display()),
        }
    }
    out
}
