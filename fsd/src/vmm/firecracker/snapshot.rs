//! Firecracker snapshots: `PUT /snapshot/create` of a paused VM, and restore into a fresh
//! Firecracker process with `PUT /snapshot/load`.
//!
//! Files in a snapshot directory written here:
//! ```text
//! state      the microVM state file (`snapshot_path`)
//! memory     guest memory (`mem_file_path`); a restored VM maps it MAP_PRIVATE for its
//!            whole life, so snapshot files are never modified after they are written
//! ```
//! Invariants:
//! - Only full snapshots. Firecracker's diff snapshots hold just the pages dirtied since
//!   the previous snapshot; a diff is loadable only after merging it onto the full memory
//!   file it was taken on top of, so `diff=1` is refused (see docs/backends.md).
//! - A restore is done on a fresh process configured with nothing but logger and metrics
//!   (Firecracker's precondition for `/snapshot/load`). The disk and the vsock socket were
//!   configured with paths relative to the VM directory, Firecracker's working directory,
//!   so the restored VM uses *its* directory's disk copy and socket; from 1.16 the vsock
//!   socket is also named explicitly with `vsock_override`.
//! - A clone of a `net=tap` VM gets its own TAP device through `network_overrides`
//!   (Firecracker 1.12+; refused with that reason on older releases); the agent then
//!   re-addresses the guest (`SetIdentity`).
//! - A failed load ends the process (Firecracker's documented behaviour); we kill it in any
//!   case and report Firecracker's `fault_message` verbatim.
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use super::model::{
    MemBackendType, MemoryBackend, NetworkOverride, SnapshotCreateParams, SnapshotLoadParams,
    SnapshotType, VsockOverride,
};
use super::{
    configure_logging, load_record, prepare_dir, spawn, validate, FcInstance, FcRecord, FcVersion,
    FirecrackerBackend, Runtime, API_READY_DEADLINE, NET_IFACE_ID, RECORD_FILE, VMM_LOG,
    VSOCK_SOCK,
};
use crate::vmm::process::write_atomic;
use crate::vmm::qemu::log_tail;
use crate::vmm::{SavedState, VmSpec, VmmError, VmmInstance};

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

/// Deadline of `/snapshot/create` for `memory_mib` of guest memory.
pub fn create_timeout(memory_mib: u64) -> Duration {
    Duration::from_secs(10) + Duration::from_millis(memory_mib * 50)
}
/// Deadline of `/snapshot/load` (memory is mapped, not read).
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);

fn abs(p: &Path) -> Result<String, VmmError> {
    p.to_str()
        .map(String::from)
        .ok_or_else(|| VmmError::StartFailed(format!("path {} is not UTF-8", p.display())))
}

/// The body of `PUT /snapshot/create` for a full snapshot into `dir`.
pub fn create_params(dir: &Path) -> Result<SnapshotCreateParams, VmmError> {
    Ok(SnapshotCreateParams {
        snapshot_path: abs(&dir.join(STATE_FILE))?,
        mem_file_path: abs(&dir.join(MEMORY_FILE))?,
        snapshot_type: Some(SnapshotType::Full),
    })
}

/// The body of `PUT /snapshot/load` restoring `snap_dir` on Firecracker `version`;
/// `tap` is the clone's own TAP device (`net=tap`), passed as a `network_overrides`
/// entry for the snapshot's one interface.
pub fn load_params(
    snap_dir: &Path,
    saved: &SavedState,
    version: FcVersion,
    tap: Option<&str>,
) -> Result<SnapshotLoadParams, VmmError> {
    let memory = saved.memory_file.as_deref().ok_or_else(|| {
        VmmError::StartFailed("snapshot: no Firecracker memory file recorded".into())
    })?;
    let network_overrides = match tap {
        None => None,
        Some(_) if !version.has_network_overrides() => {
            return Err(VmmError::StartFailed(format!(
                "a clone of a net=tap VM needs its own TAP device, which Firecracker \
                 accepts on snapshot load (network_overrides) from 1.12; this is {version}"
            )))
        }
        Some(dev) => Some(vec![NetworkOverride {
            iface_id: NET_IFACE_ID.into(),
            host_dev_name: dev.into(),
        }]),
    };
    Ok(SnapshotLoadParams {
        snapshot_path: abs(&snap_dir.join(&saved.state_file))?,
        mem_backend: MemoryBackend {
            backend_type: MemBackendType::File,
            backend_path: abs(&snap_dir.join(memory))?,
        },
        enable_diff_snapshots: None,
        track_dirty_pages: None,
        resume_vm: Some(true),
        network_overrides,
        vsock_override: version.has_vsock_override().then(|| VsockOverride {
            uds_path: VSOCK_SOCK.into(),
        }),
    })
}

/// `VmmInstance::save_snapshot` for Firecracker (the VM is paused by the caller).
pub async fn save(inst: &FcInstance, dir: &Path) -> Result<SavedState, VmmError> {
    let memory_mib = memory_of(inst.dir()).unwrap_or(1024);
    let params = create_params(dir)?;
    inst.api()
        .clone()
        .with_timeout(create_timeout(memory_mib))
        .snapshot_create(&params)
        .await
        .map_err(|e| inst.map_api("snapshot/create", e))?;
    let version = load_record(inst.dir())
        .map(|r| r.version)
        .unwrap_or_default();
    Ok(SavedState {
        state_file: STATE_FILE.into(),
        memory_file: Some(MEMORY_FILE.into()),
        restore: json!({ "firecracker_version": version }),
    })
}

/// The VM's memory size from its `vm.json` (the API offers no cheap way while paused).
fn memory_of(dir: &Path) -> Option<u64> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("vm.json")).ok()?).ok()?;
    v.get("config")?.get("memory_mib")?.as_u64()
}

/// `Backend::restore` for Firecracker.
pub async fn restore(
    backend: &FirecrackerBackend,
    spec: &VmSpec,
    snap_dir: &Path,
    saved: &SavedState,
) -> Result<FcInstance, VmmError> {
    validate(spec)?;
    let tap = spec
        .net
        .as_ref()
        .and_then(|n| n.tap.as_ref())
        .map(|t| t.ifname.as_str());
    let params = load_params(snap_dir, saved, backend.version(), tap)?;
    for f in [
        Some(saved.state_file.as_str()),
        saved.memory_file.as_deref(),
    ]
    .into_iter()
    .flatten()
    {
        if !snap_dir.join(f).is_file() {
            return Err(VmmError::StartFailed(format!(
                "snapshot file {} is missing",
                snap_dir.join(f).display()
            )));
        }
    }
    let t0 = Instant::now();
    let dir = &spec.dir;
    // Restores run unjailed: the snapshot's files are read from the snapshot directory.
    let rt = Runtime {
        root: dir.clone(),
        kernel: String::new(),
        initrd: String::new(),
        disk: None,
        owner: None,
    };
    let logs = prepare_dir(dir, &rt)?;
    let argv = backend.build_argv(dir)?;
    let record = FcRecord {
        argv: argv.clone(),
        version: backend.version().to_string(),
        kernel: format!("snapshot {}", snap_dir.display()),
        created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        jail_root: None,
    };
    write_atomic(
        &dir.join(RECORD_FILE),
        &serde_json::to_vec_pretty(&record).unwrap_or_default(),
    )?;
    let inst = spawn(dir, dir, &argv)?;
    let result = async {
        inst.wait_api(t0 + API_READY_DEADLINE).await?;
        configure_logging(inst.api()).await?;
        inst.api()
            .clone()
            .with_timeout(LOAD_TIMEOUT)
            .snapshot_load(&params)
            .await
    }
    .await;
    if let Err(e) = result {
        let died = inst.wait_exit(Duration::from_millis(300)).await;
        let why = match &e {
            super::api::ApiError::Fault {
                request, message, ..
            } => format!("Firecracker refused {request}: {message}"),
            _ if died => inst.death_report(&logs),
            other => format!(
                "Firecracker API: {other}; stderr: {}",
                log_tail(&dir.join(VMM_LOG), logs.vmm_log, 5)
            ),
        };
        let _ = inst.kill().await;
        return Err(VmmError::StartFailed(why));
    }
    tracing::info!(
        pid = inst.pid(),
        dir = %dir.display(),
        ms = t0.elapsed().as_millis() as u64,
        "Firecracker restored from a snapshot"
    );
    Ok(inst)
}
