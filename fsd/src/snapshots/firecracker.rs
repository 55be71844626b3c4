//! Firecracker snapshots: `PUT /snapshot/create` of a paused VM, and restore into a fresh
//! Firecracker process with `PUT /snapshot/load`.
//!
//! Files in a snapshot directory written here:
//! ```text
//! state      the microVM state file (`snapshot_path`)
//! memory     guest memory (`mem_file_path`); a restored VM maps it MAP_PRIVATE,
//!            read-only, for its whole life, so snapshot files are never modified after
//!            they are written
//! ```
//! and in [`SavedState::restore`]: `firecracker_version` (as the binary printed it,
//! `-dev` and other suffixes kept), `snapshot_format` (the data format it wrote, from
//! `--snapshot-version`), `jailed`.
//!
//! Invariants:
//! - Only full snapshots. Firecracker's diff snapshots hold just the pages dirtied since
//!   the previous snapshot; a diff is loadable only after merging it onto the full memory
//!   file it was taken on top of, so `diff=1` is refused (see docs/backends.md).
//! - A jailed Firecracker sees nothing outside its jail: it writes its snapshot into
//!   its jail root (`snapshot.state`, `snapshot.memory`), and the files are then moved
//!   (renamed: one filesystem) into the snapshot directory and given to the daemon's
//!   user; a jailed restore hard-links them into the clone's jail under the same names
//!   and removes the links once loaded. Unjailed, absolute paths are used.
//! - A restore is done on a fresh process that was configured with nothing (logger and
//!   metrics are on its command line). The disk and the vsock socket were configured with
//!   paths relative to Firecracker's cwd (VM directory or jail root), so the restored VM
//!   uses *its* directory's disk copy and socket; from 1.16 the vsock socket is also
//!   named explicitly with `vsock_override`. A snapshot taken jailed restores unjailed
//!   and the other way round.
//! - A snapshot is loaded only by a Firecracker that reads its data format
//!   ([`check_loadable`]: same MAJOR, MINOR no newer); otherwise the clone is refused
//!   with EINVAL before anything starts, naming both versions.
//! - A clone of a `net=tap` VM gets its own TAP device through `network_overrides`
//!   (Firecracker 1.12+; refused with that reason on older releases); the agent then
//!   re-addresses the guest (`SetIdentity`).
//! - A failed load ends the process (Firecracker's documented behaviour); we kill it in any
//!   case and report Firecracker's `fault_message` verbatim.
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::vmm::firecracker::jailer::{JAIL_SNAP_MEMORY, JAIL_SNAP_STATE};
use crate::vmm::firecracker::model::{
    MemBackendType, MemoryBackend, NetworkOverride, SnapshotCreateParams, SnapshotLoadParams,
    SnapshotType, VsockOverride,
};
use crate::vmm::firecracker::{
    load_record, prepare_dir, validate, FcInstance, FcVersion, FirecrackerBackend,
    API_READY_DEADLINE, NET_IFACE_ID, VSOCK_SOCK,
};
use crate::vmm::{SavedState, VmSpec, VmmError, VmmInstance};

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

/// Deadline of `/snapshot/create` for `memory_mib` of guest memory.
pub fn create_timeout(memory_mib: u64) -> Duration {
    Duration::from_secs(10) + Duration::from_millis(memory_mib * 50)
}
/// Deadline of `/snapshot/load` (memory is mapped, not read).
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);

fn path_str(p: &Path) -> Result<String, VmmError> {
    p.to_str()
        .map(String::from)
        .ok_or_else(|| VmmError::StartFailed(format!("path {} is not UTF-8", p.display())))
}

/// The body of `PUT /snapshot/create` for a full snapshot: into `dir` (absolute paths),
/// or, for a jailed Firecracker (`dir` = `None`), into its jail root.
pub fn create_params(dir: Option<&Path>) -> Result<SnapshotCreateParams, VmmError> {
    let (snapshot_path, mem_file_path) = match dir {
        Some(dir) => (
            path_str(&dir.join(STATE_FILE))?,
            path_str(&dir.join(MEMORY_FILE))?,
        ),
        None => (JAIL_SNAP_STATE.into(), JAIL_SNAP_MEMORY.into()),
    };
    Ok(SnapshotCreateParams {
        snapshot_path,
        mem_file_path,
        snapshot_type: Some(SnapshotType::Full),
    })
}

/// The body of `PUT /snapshot/load` restoring `snap_dir` on Firecracker `version`
/// (`snap_dir` = `None`: the files are linked into the jail root under their jail names);
/// `tap` is the clone's own TAP device (`net=tap`), passed as a `network_overrides`
/// entry for the snapshot's one interface.
pub fn load_params(
    snap_dir: Option<&Path>,
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
    let (snapshot_path, backend_path) = match snap_dir {
        Some(d) => (
            path_str(&d.join(&saved.state_file))?,
            path_str(&d.join(memory))?,
        ),
        None => (JAIL_SNAP_STATE.into(), JAIL_SNAP_MEMORY.into()),
    };
    Ok(SnapshotLoadParams {
        snapshot_path,
        mem_backend: MemoryBackend {
            backend_type: MemBackendType::File,
            backend_path,
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
    let jailed = inst.jail.clone();
    if let Some(j) = &jailed {
        for f in [JAIL_SNAP_STATE, JAIL_SNAP_MEMORY] {
            let _ = std::fs::remove_file(j.root.join(f));
        }
    }
    let params = create_params(if jailed.is_some() { None } else { Some(dir) })?;
    let created = inst
        .api()
        .clone()
        .with_timeout(create_timeout(memory_mib))
        .snapshot_create(&params)
        .await
        .map_err(|e| inst.map_api("snapshot/create", e));
    if let Some(j) = &jailed {
        let moved = match &created {
            Ok(()) => move_out_of_jail(&j.root, dir),
            Err(_) => Ok(()),
        };
        for f in [JAIL_SNAP_STATE, JAIL_SNAP_MEMORY] {
            let _ = std::fs::remove_file(j.root.join(f));
        }
        moved?;
    }
    created?;
    if jailed.is_none() {
        // Readable like the boot files, whatever the daemon's umask: a jailed clone gets
        // them as hard links (the snapshot directory itself is owner-only).
        use std::os::unix::fs::PermissionsExt;
        for f in [STATE_FILE, MEMORY_FILE] {
            let p = dir.join(f);
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))
                .map_err(|e| VmmError::Io(p.display().to_string(), e))?;
        }
    }
    let record = load_record(inst.dir());
    Ok(SavedState {
        state_file: STATE_FILE.into(),
        memory_file: Some(MEMORY_FILE.into()),
        restore: json!({
            "firecracker_version": record.as_ref().map(|r| r.version.clone()).unwrap_or_default(),
            "snapshot_format": record.and_then(|r| r.snapshot_format),
            "jailed": jailed.is_some(),
        }),
    })
}

/// Move a jailed Firecracker's snapshot files into the snapshot directory `dir` and make
/// them the daemon's (root:root 0644 in the owner-only snapshot directory: a later jailed
/// restore can hard-link them without changing them).
fn move_out_of_jail(root: &Path, dir: &Path) -> Result<(), VmmError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |p: &Path, e: std::io::Error| VmmError::Io(p.display().to_string(), e);
    for (from, to) in [
        (JAIL_SNAP_STATE, STATE_FILE),
        (JAIL_SNAP_MEMORY, MEMORY_FILE),
    ] {
        let (src, dst) = (root.join(from), dir.join(to));
        if let Err(e) = std::fs::rename(&src, &dst) {
            if e.raw_os_error() != Some(libc::EXDEV) {
                return Err(io(&src, e));
            }
            crate::disk::clone_disk(&src, &dst).map_err(|e| io(&dst, e))?;
        }
        let (uid, gid) = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        std::os::unix::fs::chown(&dst, Some(uid), Some(gid)).map_err(|e| io(&dst, e))?;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| io(&dst, e))?;
    }
    Ok(())
}

/// The VM's memory size from its `vm.json` (the API offers no cheap way while paused).
fn memory_of(dir: &Path) -> Option<u64> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("vm.json")).ok()?).ok()?;
    v.get("config")?.get("memory_mib")?.as_u64()
}

/// The data format of the snapshot `saved` (in `snap_dir`): as recorded when it was
/// taken, else as `binary --describe-snapshot` reads it (snapshots from before formats
/// were recorded; a binary that cannot even parse the header answers nothing).
fn snapshot_format_of(binary: &Path, snap_dir: &Path, saved: &SavedState) -> Option<FcVersion> {
    if let Some(f) = saved
        .restore
        .get("snapshot_format")
        .and_then(|v| v.as_str())
        .and_then(FcVersion::parse)
    {
        return Some(f);
    }
    let state = snap_dir.join(&saved.state_file);
    match crate::vmm::firecracker::run_binary(
        binary,
        &["--describe-snapshot".as_ref(), state.as_os_str()],
    ) {
        Ok((true, out)) => crate::vmm::firecracker::format_text(&out),
        _ => None,
    }
}

/// Refuse, with a message naming both versions, a snapshot this Firecracker cannot load:
/// its data format must have the binary's MAJOR and a MINOR no newer than the binary's
/// (Firecracker's own rule). When either format is unknown, the load is left to
/// Firecracker (which refuses an unreadable state file by itself).
pub fn check_loadable(
    backend: &FirecrackerBackend,
    snap_dir: &Path,
    saved: &SavedState,
) -> Result<(), VmmError> {
    let taken_by = saved
        .restore
        .get("firecracker_version")
        .and_then(|v| v.as_str())
        .filter(|v| !v.is_empty())
        .unwrap_or("an unknown version");
    let formats = backend.snapshot_format().and_then(|ours| {
        snapshot_format_of(backend.binary(), snap_dir, saved).map(|theirs| (ours, theirs))
    });
    let Some((ours, theirs)) = formats else {
        if taken_by != backend.version_text() {
            tracing::warn!(
                "snapshot taken by Firecracker {taken_by}, restored by {}: its format is \
                 unknown, so the load is not checked in advance",
                backend.version_text()
            );
        }
        return Ok(());
    };
    if ours.can_load_format(theirs) {
        return Ok(());
    }
    let reads = if ours.minor == 0 {
        format!("v{}.0", ours.major)
    } else {
        format!("v{}.0 to v{}.{}", ours.major, ours.major, ours.minor)
    };
    Err(VmmError::Incompatible(format!(
        "the snapshot was taken by Firecracker {taken_by} in snapshot format v{theirs}, and \
         this host's Firecracker {} ({}) reads snapshot format {reads} only: restore it \
         with Firecracker {taken_by} or another release that reads v{}.{} (see the \
         version matrix in docs/backends.md)",
        backend.version_text(),
        backend.binary().display(),
        theirs.major,
        theirs.minor,
    )))
}

/// `Backend::restore` for Firecracker.
pub async fn restore(
    backend: &FirecrackerBackend,
    spec: &VmSpec,
    snap_dir: &Path,
    saved: &SavedState,
) -> Result<FcInstance, VmmError> {
    validate(spec)?;
    check_loadable(backend, snap_dir, saved)?;
    let tap = spec
        .net
        .as_ref()
        .and_then(|n| n.tap.as_ref())
        .map(|t| t.ifname.as_str());
    let jail_cfg = backend.jailer();
    let params = load_params(
        if jail_cfg.is_some() {
            None
        } else {
            Some(snap_dir)
        },
        saved,
        backend.version(),
        tap,
    )?;
    let files: Vec<(&str, &str)> = [
        Some((saved.state_file.as_str(), JAIL_SNAP_STATE)),
        saved.memory_file.as_deref().map(|m| (m, JAIL_SNAP_MEMORY)),
    ]
    .into_iter()
    .flatten()
    .collect();
    for (f, _) in &files {
        if !snap_dir.join(f).is_file() {
            return Err(VmmError::StartFailed(format!(
                "snapshot file {} is missing",
                snap_dir.join(f).display()
            )));
        }
    }
    let t0 = Instant::now();
    let dir = &spec.dir;
    let what = format!("snapshot {}", snap_dir.display());
    let inst = match jail_cfg {
        Some(jail) => {
            let (j, logs) = backend.prepare_jail(spec, jail)?;
            for (f, name) in &files {
                jail.link_shared(&j.root, &snap_dir.join(f), name)?;
            }
            let argv = backend.jailed_argv(jail, &j, dir)?;
            let root = j.root.clone();
            backend.start_process(dir, &argv, what, &root, Some(j), logs)?
        }
        None => {
            let logs = prepare_dir(dir, dir)?;
            let argv = backend.build_argv(dir)?;
            backend.start_process(dir, &argv, what, dir, None, logs)?
        }
    };
    let result = async {
        inst.wait_api(t0 + API_READY_DEADLINE).await?;
        inst.api()
            .clone()
            .with_timeout(LOAD_TIMEOUT)
            .snapshot_load(&params)
            .await
    }
    .await;
    if let Some(j) = &inst.jail {
        // Loaded (the memory stays mapped) or failed: the jail needs the links no more.
        for (_, name) in &files {
            let _ = std::fs::remove_file(j.root.join(name));
        }
    }
    if let Err(e) = result {
        let why = inst.failure_reason(&e).await;
        let _ = inst.kill().await;
        return Err(VmmError::StartFailed(why));
    }
    tracing::info!(
        pid = inst.pid(),
        dir = %dir.display(),
        jailed = inst.jail.is_some(),
        ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
        "Firecracker restored from a snapshot"
    );
    Ok(inst)
}
