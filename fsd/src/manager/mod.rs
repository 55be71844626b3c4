//! The VM manager: names, creation and deletion, defaults, images, persistence.
//!
//! Invariants:
//! - A name is in `vms` or `creating`, never both; both are checked under one lock, so
//!   two concurrent creates of one name give exactly one EEXIST.
//! - Validation (name, options, image, backend) happens before anything touches disk, so
//!   a rejected `create` leaves no trace.
//! - Each VM's state directory holds its whole record; `reload` rebuilds the manager
//!   from the state directory alone, and never waits for a guest (adoption runs in the
//!   background: `vm::adopt`).
mod api;
pub mod ctl;
mod destroy_all;
pub mod images;
mod kernels;
mod quota;
mod reaper;
pub mod runs;
mod snapshots;
pub mod spool;
pub mod terminal;
pub mod vm;

// The exec options parser lives below the manager (`crate::execopts`); the old path
// stays valid for its callers.
pub use crate::execopts;
pub use snapshots::clone_names;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};

use crate::config::{BackendChoice, VmConfig};
use crate::error::{Error, Result};
use crate::events::EventLog;
use crate::layout::{mkdir_private, Layout};
use crate::settings::Settings;
use crate::vmm::{Backend, BackendKind, NetMode};
pub use api::ManagerApi;
use vm::{BootFiles, Desired, Vm, VmRecord};

pub use crate::backends::Backends;

pub struct Manager {
    pub layout: Layout,
    pub events: Arc<EventLog>,
    defaults: Mutex<VmConfig>,
    pub(crate) vms: RwLock<BTreeMap<String, Arc<Vm>>>,
    pub(crate) creating: Mutex<HashSet<String>>,
    /// TAP address slots of every VM (`net=tap`).
    pub(crate) net_slots: crate::net::SlotAllocator,
    pub(crate) backends: Backends,
    pub(crate) boot_files: BootFiles,
    pub boot_timeout: Duration,
    /// The daemon's settings (`BANDSOX_*`, read once at start).
    pub(crate) settings: Settings,
    ctl_results: crate::ctl::CtlResults,
    /// Image names being imported, pulled or removed right now.
    images_busy: Mutex<HashSet<String>>,
    /// Snapshot names being written (see `crate::snapshots`).
    pub(crate) snap_creating: Mutex<HashSet<String>>,
    /// Snapshot name → number of clone operations restoring from it.
    pub(crate) snap_busy: Mutex<HashMap<String, usize>>,
    /// Resource limits (see `crate::limits` and `quota`).
    pub limits: Arc<crate::limits::Limits>,
    /// Whether the lifecycle reaper runs (see `reaper`).
    reaper_started: std::sync::atomic::AtomicBool,
    /// VMs the reaper is handling.
    reaping: reaper::Reaping,
    /// Warm pools of template clones (see `crate::pool`).
    pub(crate) pools: crate::pool::Pools,
}

/// What a new VM is, for [`Manager::register_vm`].
pub(crate) struct NewVm<'a> {
    pub name: &'a str,
    pub uid: u32,
    pub gid: u32,
    pub config: VmConfig,
    pub disk_mib: u64,
}

pub(crate) fn new_id() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Manager {
    /// A `Vm` of this daemon for `record` in `dir` on `backend`, with the daemon's boot
    /// files, event log, limits and TAP pool (adopted, created, pooled and template VMs).
    pub(crate) fn vm_of(
        &self,
        record: VmRecord,
        dir: PathBuf,
        backend: Arc<dyn Backend>,
    ) -> Arc<Vm> {
        Vm::new(
            record,
            dir,
            backend,
            self.boot_files.clone(),
            self.events.clone(),
            self.limits.clone(),
            self.settings.tap_pool.clone(),
        )
    }

    /// Open (creating if needed) the state directory. Does not touch VMs; see `reload`.
    /// `settings` are the daemon's (read once at start); their limits file (else
    /// `limits::DEFAULT_PATH`) makes [`Manager::limits`], the daemon's one limits handle.
    pub fn open(
        state_dir: PathBuf,
        backends: Backends,
        settings: Settings,
    ) -> Result<Arc<Manager>> {
        let layout = Layout::new(state_dir);
        layout.create()?;
        let events = Arc::new(EventLog::open(&layout.events())?);
        crate::snapshots::remove_leftovers(&layout.snapshots());
        let defaults = match std::fs::read_to_string(layout.defaults()) {
            Ok(text) => VmConfig::default()
                .parse_defaults(&text)
                .unwrap_or_else(|e| {
                    tracing::warn!("ignoring invalid defaults file: {e}");
                    VmConfig::default()
                }),
            Err(_) => VmConfig::default(),
        };
        let limits_file = settings
            .limits
            .clone()
            .unwrap_or_else(|| crate::limits::DEFAULT_PATH.into());
        let limits = crate::limits::Limits::new(
            limits_file,
            crate::limits::HostFacts::detect(layout.root()),
        );
        Ok(Arc::new(Manager {
            limits,
            boot_files: BootFiles {
                kernel: layout.kernel(),
                initrd: layout.initrd(),
            },
            layout,
            events,
            defaults: Mutex::new(defaults),
            vms: RwLock::new(BTreeMap::new()),
            creating: Mutex::new(HashSet::new()),
            net_slots: Default::default(),
            backends,
            boot_timeout: settings.boot_timeout,
            settings,
            ctl_results: Default::default(),
            images_busy: Mutex::new(HashSet::new()),
            snap_creating: Mutex::new(HashSet::new()),
            snap_busy: Mutex::new(HashMap::new()),
            reaper_started: Default::default(),
            reaping: Default::default(),
            pools: Default::default(),
        }))
        .inspect(|m: &Arc<Manager>| {
            m.clean_image_leftovers();
            let scopes: std::sync::Weak<dyn crate::events::Scopes> = Arc::downgrade(m) as _;
            m.events.set_scopes(scopes);
        })
    }

    /// Load every VM record and start re-adopting live VMMs, each in a task of its own;
    /// returns without waiting for any guest (the VMs are `adopting` meanwhile).
    pub async fn reload(self: &Arc<Self>) {
        let Ok(entries) = std::fs::read_dir(self.layout.vms()) else {
            return;
        };
        let mut adopt = Vec::new();
        for e in entries.flatten() {
            let dir = e.path();
            if dir.join(crate::pool::POOL_MARKER).exists() {
                // A pooled clone, never handed out: `start_pools` ends it.
                continue;
            }
            if !dir.join("vm.json").exists() && !vmm_running_in(&dir) {
                // A creation (or deletion) the daemon died in: no record, no VMM.
                tracing::warn!("removing {}: a VM without a record", dir.display());
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            }
            let rec: VmRecord = match std::fs::read(dir.join("vm.json"))
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => r,
                Err(err) => {
                    tracing::warn!("skipping {}: unreadable vm.json: {err}", dir.display());
                    continue;
                }
            };
            if let Some(slot) = rec.net_slot {
                self.net_slots.claim(slot);
            }
            let Some(backend) = self.backends.by_kind(rec.backend) else {
                tracing::warn!(vm = %rec.name, "backend {} unavailable; VM left alone", rec.backend);
                continue;
            };
            let vm = self.vm_of(rec.clone(), dir, backend);
            self.vms.write().insert(rec.name.clone(), vm.clone());
            adopt.push(vm);
        }
        for vm in adopt {
            vm.begin_adopt();
        }
        self.start_reaper();
    }

    pub fn get(&self, name: &str) -> Option<Arc<Vm>> {
        self.vms.read().get(name).cloned()
    }

    /// The VM with state-directory id `id` (the FUSE tree names VMs by id).
    pub fn get_by_id(&self, id: &str) -> Option<Arc<Vm>> {
        self.vms.read().values().find(|v| v.id == id).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Vm>> {
        self.vms.read().values().cloned().collect()
    }

    pub fn defaults(&self) -> VmConfig {
        self.defaults.lock().clone()
    }

    /// Merge `key=value` words into the defaults and persist them; on any invalid
    /// line nothing changes.
    pub fn update_defaults(&self, text: &str) -> Result<()> {
        let mut d = self.defaults.lock();
        let next = d.parse_defaults(text)?;
        self.check_kernel(next.kernel.as_deref())?;
        std::fs::write(self.layout.defaults(), next.to_defaults())?;
        *d = next;
        Ok(())
    }

    /// Last `ctl` results per session.
    pub fn ctl_results(&self) -> &crate::ctl::CtlResults {
        &self.ctl_results
    }

    // ---- create / delete -----------------------------------------------------------

    /// Create and boot a VM; returns when the agent answered or the boot failed (the VM
    /// then exists in state `failed`, and the error says why).
    #[tracing::instrument(level = "debug", name = "create", skip(self, options, uid, gid))]
    pub async fn create(
        self: &Arc<Self>,
        name: &str,
        options: &[String],
        uid: u32,
        gid: u32,
    ) -> Result<Arc<Vm>> {
        crate::names::validate("VM", name)?;
        let mut config = self
            .defaults()
            .with_options(options.iter().map(String::as_str))?;
        // `image=REF`: local names keep priority; a registry reference is pulled (once,
        // through the blob cache) into an image named after it.
        if !self.images().contains(&config.image) {
            if let Some(pref) = images::image_ref(&config.image) {
                crate::names::validate("VM", name)?;
                if self.get(name).is_some() {
                    return Err(Error::exists(format!("VM {name:?} already exists")));
                }
                let local = images::image_name_for_ref(&config.image);
                if !self.images().contains(&local) {
                    self.events.emit(
                        name,
                        "image-pull",
                        &format!("{} into images/{local}", pref.display()),
                    );
                    self.pull_image(&local, &config.image, Default::default(), uid)
                        .await?;
                }
                config.image = local;
            }
        }
        let backend = self.backends.choose(config.backend)?;
        if config.net == NetMode::Tap {
            crate::net::check_tap_possible()?;
        }
        if config.net == NetMode::User && backend.kind() == BackendKind::Firecracker {
            return Err(Error::new(
                libc::EOPNOTSUPP,
                "net=user needs the qemu backend (Firecracker has no user-mode networking); \
                 use net=none or backend=qemu",
            ));
        }
        if !self.images().contains(&config.image) {
            return Err(Error::not_found(format!(
                "no image {:?}; images: {}",
                config.image,
                self.images().join(", ")
            )));
        }
        self.check_kernel(config.kernel.as_deref())?;
        if backend.needs_boot_files()
            && (!self.boot_files.kernel.exists() || !self.boot_files.initrd.exists())
        {
            return Err(Error::io(format!(
                "guest kernel/initrd missing under {}; run `bandsox guest-build`",
                self.layout.root().display()
            )));
        }
        let image_disk = self.layout.image_disk(&config.image);
        let image_mib = std::fs::metadata(&image_disk)?.len().div_ceil(1024 * 1024);
        if let Some(d) = config.disk_mib {
            if u64::from(d) < image_mib {
                return Err(Error::invalid(format!(
                    "disk={d} is smaller than image {} ({image_mib} MiB)",
                    config.image
                )));
            }
        }
        let disk_mib = config.disk_mib.map(u64::from).unwrap_or(image_mib);
        let quota = self.admit_vms(uid, 1, config.vcpus, config.memory_mib, disk_mib)?;
        // Reserve the name.
        {
            let vms = self.vms.read();
            let mut creating = self.creating.lock();
            if vms.contains_key(name) || creating.contains(name) {
                return Err(Error::exists(format!("VM {name:?} already exists")));
            }
            creating.insert(name.to_string());
        }
        // A warm pool's clone when one matches (a miss boots cold, with no error).
        if let Some(vm) = self.take_pooled(name, &config, uid, gid).await {
            self.creating.lock().remove(name);
            drop(quota);
            if let Err(e) = self.save_autostart(&vm) {
                self.events.emit(&vm.name, "autostart-failed", &e.message);
            }
            let _ = self.autostart(&vm).await;
            return Ok(vm);
        }
        let result = self
            .create_reserved(name, config, backend, uid, gid, &image_disk, image_mib)
            .await;
        self.creating.lock().remove(name);
        // From here the VM is in `vms` (and counted there) or gone.
        drop(quota);
        let vm = result?;
        if let Err(e) = self.save_autostart(&vm) {
            self.events.emit(&vm.name, "autostart-failed", &e.message);
        }
        vm.first_boot(self.boot_timeout).await?;
        // A failed entrypoint shows in runs/main and events; the VM itself is up.
        let _ = self.autostart(&vm).await;
        Ok(vm)
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_reserved(
        self: &Arc<Self>,
        name: &str,
        config: VmConfig,
        backend: Arc<dyn Backend>,
        uid: u32,
        gid: u32,
        image_disk: &std::path::Path,
        image_mib: u64,
    ) -> Result<Arc<Vm>> {
        let disk_mib = config.disk_mib.map(u64::from).unwrap_or(image_mib);
        let disk =
            |dst: PathBuf| async move { prepare_disk(image_disk, &dst, disk_mib, image_mib).await };
        let new = NewVm {
            name,
            uid,
            gid,
            config,
            disk_mib,
        };
        let vm = self.register_vm(new, backend, disk).await?;
        self.events.emit(
            name,
            "created",
            &format!(
                "image={} vcpus={} memory={} disk={} backend={}{}{}",
                vm.record().config.image,
                vm.record().config.vcpus,
                vm.record().config.memory_mib,
                disk_mib,
                vm.record().backend,
                match vm.record().config.backend {
                    BackendChoice::Auto => format!(" (auto: {})", self.backends.auto_reason),
                    _ => String::new(),
                },
                vm.backend_forced()
                    .map(|why| format!(" (forced: {why})"))
                    .unwrap_or_default()
            ),
        );
        Ok(vm)
    }

    /// Make a new VM: its directory with the disk `make_disk` writes (given the path),
    /// a TAP slot if `net=tap`, its record; then add it to the VMs. A failure at any
    /// step removes the directory and releases the slot: nothing of the VM remains.
    /// The caller has reserved the name (`creating`) and admitted the resources.
    pub(crate) async fn register_vm<F, Fut>(
        &self,
        new: NewVm<'_>,
        backend: Arc<dyn Backend>,
        make_disk: F,
    ) -> Result<Arc<Vm>>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let id = new_id();
        let dir = self.layout.vm_dir(&id);
        mkdir_private(&dir)?;
        if let Err(e) = make_disk(dir.join("disk.ext4")).await {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let net_slot = match self.allocate_net_slot(new.config.net) {
            Ok(slot) => slot,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let ttl_deadline = new.config.lifecycle.ttl_s.map(|t| now_secs() + t);
        let record = VmRecord {
            ttl_deadline,
            fs_slot: None,
            net_slot,
            id,
            name: new.name.to_string(),
            uid: new.uid,
            gid: new.gid,
            backend: backend.kind(),
            config: new.config,
            created: now_secs(),
            disk_mib: new.disk_mib,
            boot_ms: None,
            desired: Desired::Running,
            phase: Default::default(),
            template: false,
        };
        let vm = self.vm_of(record, dir.clone(), backend);
        if let Err(e) = vm.save_record() {
            let _ = std::fs::remove_dir_all(&dir);
            if let Some(slot) = net_slot {
                self.net_slots.release(slot);
            }
            return Err(e);
        }
        self.vms.write().insert(new.name.to_string(), vm.clone());
        Ok(vm)
    }

    /// A slot of the TAP pool for a new `net=tap` VM (`None` for other modes).
    pub(crate) fn allocate_net_slot(&self, mode: NetMode) -> Result<Option<u32>> {
        match mode {
            NetMode::Tap => crate::net::TapPool::from_setting(self.settings.tap_pool.as_deref())
                .and_then(|pool| self.net_slots.allocate(&pool))
                .map(Some),
            _ => Ok(None),
        }
    }

    /// Stop and delete a VM and its whole state directory.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let vm = self
            .get(name)
            .ok_or_else(|| Error::not_found(format!("no VM {name:?}")))?;
        vm.destroy().await?;
        self.vms.write().remove(name);
        if let Some(slot) = vm.record().net_slot {
            self.net_slots.release(slot);
        }
        crate::cgroup::remove(&vm.id);
        if let Err(e) = tokio::fs::remove_dir_all(&vm.dir).await {
            tracing::warn!(vm = name, "cannot remove {}: {e}", vm.dir.display());
        }
        self.events.emit(name, "deleted", "");
        Ok(())
    }
}

/// Whether `<dir>/vmm.pid` names a live process started in that directory.
fn vmm_running_in(dir: &std::path::Path) -> bool {
    vmm_pid_in(dir).is_some()
}

/// The pid in `<dir>/vmm.pid` if it is a live process started in that directory.
pub(crate) fn vmm_pid_in(dir: &std::path::Path) -> Option<u32> {
    let pid = std::fs::read_to_string(dir.join("vmm.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())?;
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let dir = dir.as_os_str().as_encoded_bytes();
            c.windows(dir.len().max(1)).any(|w| w == dir)
        })
        .unwrap_or(false)
        .then_some(pid)
}

impl crate::events::Scopes for Manager {
    fn vm_scope(&self, name: &str) -> Option<(u32, String)> {
        self.get(name).map(|vm| (vm.uid, vm.id.clone()))
    }
}

/// Give a new VM its own copy of the image disk (reflink or sparse), grown to `disk_mib`.
pub(crate) async fn prepare_disk(
    image: &std::path::Path,
    dst: &std::path::Path,
    disk_mib: u64,
    image_mib: u64,
) -> Result<()> {
    let (image, dst) = (image.to_path_buf(), dst.to_path_buf());
    tokio::task::spawn_blocking(move || -> Result<()> {
        crate::disk::clone_disk(&image, &dst).map_err(|e| {
            // Keep the errno: a full disk is ENOSPC, not a generic I/O error.
            Error::new(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("cannot copy the image disk: {e}"),
            )
        })?;
        if disk_mib > image_mib {
            let f = std::fs::OpenOptions::new().write(true).open(&dst)?;
            f.set_len(disk_mib * 1024 * 1024)?;
            drop(f);
            let out = std::process::Command::new("resize2fs")
                .arg("-f")
                .arg(&dst)
                .output()
                .map_err(|e| Error::io(format!("cannot run resize2fs: {e}")))?;
            if !out.status.success() {
                return Err(Error::io(format!(
                    "resize2fs failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| Error::io(e.to_string()))?
}
