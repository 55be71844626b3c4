//! An in-process VMM backend for tests without root, a mount or a VM: each "VM" is an
//! agent (`Agent::serve_stream`) served on one end of an in-memory pipe, the other end
//! handed to the daemon through a [`FaultStream`], so tests can damage the channel.
//!
//! Invariants: every `connect_agent` gets a fresh pipe and a fresh agent session on the
//! VM's one `Agent` (as reconnecting to a real guest does); after `kill` the VM is dead
//! (no agent answers, `is_alive` is false) and stays so. A live VM outlives the manager
//! that launched it: a second manager over the same state directory and backend (a
//! restarted daemon) adopts it by its directory, as real backends do by `vmm.pid`.
//! [`InProcBackend::ended`] counts the agent sessions that ended, of every VM.
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bandsox_agent::faults::{FaultHandle, FaultStream, Faults};
use bandsox_agent::server::{Agent, AgentConfig, PowerOffAction};
use bandsox_fsd::manager::{Backends, Manager};
use bandsox_fsd::vmm::{Backend, BackendKind, BoxedAgentStream, VmSpec, VmmError, VmmInstance};

/// The faults the next connections get, and the handles of the live ones.
#[derive(Default)]
pub struct FaultPlan {
    /// Faults of every new connection.
    pub next: Mutex<Option<Faults>>,
    /// One handle per connection made, in order (to arm faults after the handshake).
    pub handles: Mutex<Vec<FaultHandle>>,
}

impl FaultPlan {
    /// The handle of the latest connection.
    pub fn last(&self) -> FaultHandle {
        self.handles
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a connection was made")
    }
}

pub struct InProcBackend {
    pub faults: Arc<FaultPlan>,
    /// Every VM launched, by directory (what `adopt` finds).
    vms: Mutex<HashMap<PathBuf, InProcVm>>,
    /// Agent sessions that ended (once the agent saw their pipe close).
    pub ended: Arc<tokio::sync::watch::Sender<u64>>,
    /// The agents of the VMs launched, in order.
    pub agents: Mutex<Vec<Arc<Agent>>>,
}

impl InProcBackend {
    pub fn new() -> Arc<InProcBackend> {
        Arc::new(InProcBackend {
            faults: Arc::new(FaultPlan::default()),
            vms: Mutex::new(HashMap::new()),
            ended: Arc::new(tokio::sync::watch::Sender::new(0)),
            agents: Mutex::new(Vec::new()),
        })
    }

    /// Wait until at least `n` agent sessions have ended.
    pub async fn ended_at_least(&self, n: u64) {
        let _ = self.ended.subscribe().wait_for(|e| *e >= n).await;
    }

    /// Whether the VM launched in `dir` (its latest) still lives.
    pub fn alive(&self, dir: &Path) -> bool {
        self.vms
            .lock()
            .unwrap()
            .get(dir)
            .is_some_and(|vm| vm.is_alive())
    }
}

/// One "VM"; clones are handles to the same one.
#[derive(Clone)]
struct InProcVm {
    agent: Arc<Agent>,
    alive: Arc<AtomicBool>,
    faults: Arc<FaultPlan>,
    ended: Arc<tokio::sync::watch::Sender<u64>>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

/// Counts its session as ended when dropped (also when its task is aborted).
struct Serving(Arc<tokio::sync::watch::Sender<u64>>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n += 1);
    }
}

#[async_trait]
impl Backend for InProcBackend {
    fn kind(&self) -> BackendKind {
        // The test slot (as the host-process backend): no boot files, no snapshots.
        BackendKind::Host
    }
    fn describe(&self) -> String {
        "in-process agent (test backend)".into()
    }
    fn needs_boot_files(&self) -> bool {
        false
    }
    fn vmm_overhead_mib(&self, _memory_mib: u32) -> Option<u64> {
        None
    }
    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn VmmInstance>, VmmError> {
        let root = spec.dir.join("inproc-root");
        std::fs::create_dir_all(&root).map_err(|e| VmmError::Io("root".into(), e))?;
        let mut cfg = AgentConfig::host(root);
        cfg.power_off = PowerOffAction::Ignore;
        let agent = Agent::new(cfg);
        self.agents.lock().unwrap().push(agent.clone());
        let vm = InProcVm {
            agent,
            alive: Arc::new(AtomicBool::new(true)),
            faults: self.faults.clone(),
            ended: self.ended.clone(),
            tasks: Arc::new(Mutex::new(Vec::new())),
        };
        self.vms
            .lock()
            .unwrap()
            .insert(spec.dir.clone(), vm.clone());
        Ok(Box::new(vm))
    }
    async fn adopt(&self, spec: &VmSpec) -> Result<Option<Box<dyn VmmInstance>>, VmmError> {
        let vms = self.vms.lock().unwrap();
        Ok(vms
            .get(&spec.dir)
            .filter(|vm| vm.is_alive())
            .map(|vm| Box::new(vm.clone()) as Box<dyn VmmInstance>))
    }
}

#[async_trait]
impl VmmInstance for InProcVm {
    fn pid(&self) -> u32 {
        0
    }
    fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }
    async fn connect_agent(&self) -> Result<BoxedAgentStream, VmmError> {
        if !self.is_alive() {
            return Err(VmmError::StartFailed("the in-process VM is dead".into()));
        }
        let (host, guest) = tokio::io::duplex(256 * 1024);
        let agent = self.agent.clone();
        let serving = Serving(self.ended.clone());
        self.tasks.lock().unwrap().push(tokio::spawn(async move {
            let _serving = serving;
            agent.serve_stream(guest).await
        }));
        let faults = self.faults.next.lock().unwrap().unwrap_or(Faults::none());
        let stream = FaultStream::new(host, faults);
        self.faults.handles.lock().unwrap().push(stream.handle());
        Ok(Box::pin(stream))
    }
    async fn pause(&self) -> Result<(), VmmError> {
        Ok(())
    }
    async fn resume(&self) -> Result<(), VmmError> {
        Ok(())
    }
    async fn request_shutdown(&self) -> Result<(), VmmError> {
        self.kill().await
    }
    async fn kill(&self) -> Result<(), VmmError> {
        self.alive.store(false, Ordering::SeqCst);
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
        Ok(())
    }
    async fn wait_exit(&self, _timeout: Duration) -> bool {
        !self.is_alive()
    }
}

/// Point the limits at an empty file (no limits), once per test binary, before any
/// manager exists; every test of a binary uses the same value.
pub fn limits_from_an_empty_file() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let f = tempfile::NamedTempFile::new()
            .unwrap()
            .into_temp_path()
            .keep()
            .unwrap();
        std::env::set_var(bandsox_fsd::limits::ENV, f);
    });
}

/// A manager over a fresh state directory (with a small `base` image) whose only backend
/// is `backend`.
pub fn manager(state: &Path, backend: Arc<InProcBackend>) -> Arc<Manager> {
    std::fs::create_dir_all(state.join("images/base")).unwrap();
    std::fs::write(state.join("images/base/disk.ext4"), vec![0u8; 65536]).unwrap();
    Manager::open(
        PathBuf::from(state),
        Backends {
            qemu: Some(backend as Arc<dyn Backend>),
            firecracker: None,
            auto_reason: "in-process test backend".into(),
        },
    )
    .expect("manager opens")
}
