//! The manager's snapshot operations: `snapshot NAME` on a VM, `clone SNAP NAME [count=N]`,
//! listing, `info` and `rmdir` of snapshots.
//!
//! Invariants:
//! - A snapshot name is reserved (in `snap_creating`) from validation to publication, so
//!   two concurrent `snapshot s1` give exactly one EEXIST and never a mixed directory.
//! - A snapshot is *busy* while clones restore from it; `rmdir` of a busy (or still
//!   being written) snapshot fails with EBUSY and changes nothing.
//! - `clone` validates everything (snapshot, names, backend, kernel identity) and reserves
//!   all clone names before touching disk; a rejected clone leaves no trace. Clones then
//!   restore concurrently; one that fails to restore stays as a `failed` VM (like a
//!   failed mkdir) and the write reports it.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::vm::Vm;
use super::{Manager, NewVm};
use crate::error::{Error, Result};
use crate::events::rfc3339;
use crate::layout::mkdir_private;
use crate::snapshots::{self, Sizes, SnapshotInfo, DISK_FILE};

/// Releases a reservation (name or busy count) when dropped.
struct Release<F: FnMut()>(F);
impl<F: FnMut()> Drop for Release<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// The VM names `clone SNAP NAME [count=N]` creates.
pub fn clone_names(name: &str, count: Option<u32>) -> Vec<String> {
    match count {
        None => vec![name.to_string()],
        Some(n) => (1..=n).map(|i| format!("{name}-{i}")).collect(),
    }
}

impl Manager {
    /// Snapshot names, sorted.
    pub fn snapshots(&self) -> Vec<String> {
        snapshots::list(&self.layout.snapshots())
    }

    /// A snapshot's `info` (pretty JSON).
    pub fn snapshot_info(&self, name: &str) -> Result<String> {
        let info = snapshots::load(&self.layout.snapshots(), name)?;
        let mut s = serde_json::to_string_pretty(&info).map_err(|e| Error::io(e.to_string()))?;
        s.push('\n');
        Ok(s)
    }

    /// Owner of a snapshot (for the tree's attributes and rmdir permission).
    pub fn snapshot_owner(&self, name: &str) -> Option<(u32, u32)> {
        snapshots::load(&self.layout.snapshots(), name)
            .ok()
            .map(|i| (i.owner_uid, i.owner_gid))
    }

    /// `echo 'snapshot NAME' > vm/ctl`.
    pub async fn snapshot(self: &Arc<Self>, vm: &Arc<Vm>, name: &str) -> Result<String> {
        crate::names::validate("snapshot", name)?;
        let root = self.layout.snapshots();
        {
            let mut creating = self.snap_creating.lock();
            if creating.contains(name) || root.join(name).exists() {
                return Err(Error::exists(format!("snapshot {name:?} already exists")));
            }
            creating.insert(name.to_string());
        }
        let _reserved = Release(|| {
            self.snap_creating.lock().remove(name);
        });
        let _quota = self.admit_snapshot(
            vm.uid,
            vm.record().config.memory_mib,
            snapshots::allocated(&vm.dir.join("disk.ext4")),
        )?;
        let state = vm.state();
        if state != super::vm::VmState::Running {
            return Err(Error::busy(format!(
                "VM {} is {}; snapshot needs a running VM (start or resume it first)",
                vm.name,
                state.render()
            )));
        }
        vm.check_can_snapshot()?;
        let tmp = snapshots::tmp_dir(&root, name);
        mkdir_private(&tmp)?;
        let result = async {
            let info = self.snapshot_files(vm, name, &tmp).await?;
            snapshots::publish(&root, &tmp, name)?;
            Ok::<_, Error>(info)
        }
        .await;
        match result {
            Ok(info) => {
                let detail = format!(
                    "{name} create_ms={} paused_ms={} state_bytes={} disk_allocated={}",
                    info.create_ms,
                    info.paused_ms,
                    info.sizes.state_bytes,
                    info.sizes.disk_allocated_bytes
                );
                self.events.emit(&vm.name, "snapshot", &detail);
                Ok(format!("ok: snapshot {detail}"))
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// Snapshot the running `vm` into the (existing, private) directory `tmp` as the
    /// snapshot `name`: state, memory and disk by [`Vm::snapshot_into`], then `info.json`.
    /// The caller publishes (or removes) `tmp`.
    pub(crate) async fn snapshot_files(
        &self,
        vm: &Arc<Vm>,
        name: &str,
        tmp: &std::path::Path,
    ) -> Result<SnapshotInfo> {
        // Identify the boot files before the guest is frozen (hashing takes a moment).
        let (kernel, initrd) = self
            .boot_identity(vm.record().config.kernel.as_deref())
            .await?;
        let taken = vm.snapshot_into(tmp).await?;
        let rec = vm.record();
        let disk = tmp.join(DISK_FILE);
        let sizes = Sizes {
            state_bytes: snapshots::file_len(&tmp.join(&taken.saved.state_file)),
            memory_bytes: taken
                .saved
                .memory_file
                .as_ref()
                .map(|m| snapshots::file_len(&tmp.join(m)))
                .unwrap_or(0),
            disk_bytes: snapshots::file_len(&disk),
            disk_allocated_bytes: snapshots::allocated(&disk),
            total_allocated_bytes: snapshots::allocated(tmp),
        };
        let info = SnapshotInfo {
            name: name.to_string(),
            source_vm: vm.name.clone(),
            source_id: vm.id.clone(),
            created: rfc3339(SystemTime::now()),
            backend: rec.backend,
            vcpus: rec.config.vcpus,
            memory_mib: rec.config.memory_mib,
            disk_mib: rec.disk_mib,
            image: rec.config.image.clone(),
            config: rec.config.clone(),
            kernel,
            initrd,
            sizes,
            disk_copy: match taken.disk {
                crate::disk::CloneMethod::Reflink => "reflink".into(),
                crate::disk::CloneMethod::SparseCopy { .. } => "sparse copy".into(),
            },
            create_ms: taken.total_ms,
            paused_ms: taken.paused_ms,
            owner_uid: vm.uid,
            owner_gid: vm.gid,
            saved: taken.saved,
        };
        snapshots::write_info(tmp, &info)?;
        Ok(info)
    }

    /// `rmdir snapshots/NAME`.
    pub async fn delete_snapshot(&self, name: &str) -> Result<()> {
        crate::names::validate("snapshot", name)
            .map_err(|_| Error::not_found("no such snapshot"))?;
        let root = self.layout.snapshots();
        let owner = snapshots::load(&root, name)?.owner_uid;
        let doomed = {
            let creating = self.snap_creating.lock();
            let busy = self.snap_busy.lock();
            if creating.contains(name) || busy.get(name).copied().unwrap_or(0) > 0 {
                return Err(Error::busy(format!(
                    "snapshot {name:?} is in use (clones are being restored from it)"
                )));
            }
            // Hide it at once (under the locks, so no clone can start from it); delete
            // the files afterwards.
            let doomed = snapshots::tmp_dir(&root, name);
            std::fs::rename(root.join(name), &doomed)?;
            doomed
        };
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(doomed))
            .await
            .map_err(|e| Error::io(e.to_string()))??;
        self.events.emit_for(owner, "-", "snapshot-deleted", name);
        Ok(())
    }

    /// The identity of kernel `kernel`'s files (`None`: the default kernel).
    pub(crate) async fn boot_identity(
        &self,
        kernel: Option<&str>,
    ) -> Result<(snapshots::FileIdentity, snapshots::FileIdentity)> {
        let files = self.boot_files.for_kernel(kernel);
        let (k, i) = (files.kernel, files.initrd);
        tokio::task::spawn_blocking(move || {
            Ok::<_, std::io::Error>((snapshots::identify(&k)?, snapshots::identify(&i)?))
        })
        .await
        .map_err(|e| Error::io(e.to_string()))?
        .map_err(|e| Error::io(format!("cannot read the guest kernel/initramfs: {e}")))
    }

    /// `echo 'clone SNAP NAME [count=N]' > ctl`.
    #[tracing::instrument(level = "debug", name = "clone", skip_all)]
    pub async fn clone_snapshot(
        self: &Arc<Self>,
        snap: &str,
        name: &str,
        count: Option<u32>,
        options: &[String],
        uid: u32,
        gid: u32,
    ) -> Result<String> {
        let root = self.layout.snapshots();
        let mut info = snapshots::load(&root, snap)?;
        crate::snapshots::clone_opts::apply(&mut info, options)?;
        self.check_kernel(info.config.kernel.as_deref())?;
        if uid != 0 && uid != info.owner_uid {
            return Err(Error::new(
                libc::EACCES,
                format!("snapshot {snap:?} belongs to uid {}", info.owner_uid),
            ));
        }
        if info.config.net == crate::vmm::NetMode::Tap {
            // Each clone gets its own TAP device and /30; the agent re-addresses the guest.
            crate::net::check_tap_possible()?;
        }
        let names = clone_names(name, count);
        for n in &names {
            crate::names::validate("VM", n)?;
        }
        let backend = self.backends.by_kind(info.backend).ok_or_else(|| {
            Error::new(
                libc::EOPNOTSUPP,
                format!(
                    "snapshot {snap:?} was taken with backend={}, which is not available here",
                    info.backend
                ),
            )
        })?;
        if backend.kind() != info.backend || !backend.can_snapshot() {
            return Err(Error::new(
                libc::EOPNOTSUPP,
                format!(
                    "snapshot {snap:?} was taken with backend={}; it cannot be restored by {}",
                    info.backend,
                    backend.kind()
                ),
            ));
        }
        // A snapshot this backend's VMM cannot read (e.g. a newer Firecracker's format)
        // is refused here, before any name is reserved or file created.
        backend
            .check_restore(&root.join(snap), &info.saved)
            .map_err(|e| Error::from(e).with_context(&format!("snapshot {snap:?}")))?;
        if backend.needs_boot_files() {
            let (k, i) = self.boot_identity(info.config.kernel.as_deref()).await?;
            if let Some(why) = snapshots::boot_mismatch(&info, &k, &i) {
                return Err(Error::invalid(why));
            }
        }
        let _quota = self.admit_vms(
            uid,
            names.len() as u64,
            info.vcpus,
            info.memory_mib,
            info.disk_mib,
        )?;
        // Reserve every name, or none.
        {
            let vms = self.vms.read();
            let mut creating = self.creating.lock();
            if let Some(taken) = names
                .iter()
                .find(|n| vms.contains_key(*n) || creating.contains(*n))
            {
                return Err(Error::exists(format!("VM {taken:?} already exists")));
            }
            creating.extend(names.iter().cloned());
        }
        let _names = Release(|| {
            let mut creating = self.creating.lock();
            for n in &names {
                creating.remove(n);
            }
        });
        // Busy from here; re-check the snapshot still exists under the same lock rmdir
        // takes.
        {
            let mut busy = self.snap_busy.lock();
            if !root.join(snap).join(snapshots::INFO_FILE).is_file() {
                return Err(Error::not_found(format!("no snapshot {snap:?}")));
            }
            *busy.entry(snap.to_string()).or_insert(0) += 1;
        }
        let _busy = Release(|| {
            let mut busy = self.snap_busy.lock();
            if let Some(c) = busy.get_mut(snap) {
                *c -= 1;
                if *c == 0 {
                    busy.remove(snap);
                }
            }
        });
        let t0 = std::time::Instant::now();
        let info = Arc::new(info);
        let tasks: Vec<_> = names
            .iter()
            .map(|n| {
                let (mgr, info, n) = (self.clone(), info.clone(), n.clone());
                let backend = backend.clone();
                tokio::spawn(async move {
                    let r = mgr.restore_one(&info, &n, backend, uid, gid).await;
                    (n, r)
                })
            })
            .collect();
        let mut failures = Vec::new();
        let mut ms = Vec::new();
        for t in tasks {
            match t.await {
                Ok((_, Ok(vm))) => ms.push(vm.record().boot_ms.unwrap_or(0)),
                Ok((n, Err(e))) => failures.push(format!("{n}: {}", e.message)),
                Err(e) => failures.push(format!("task failed: {e}")),
            }
        }
        if !failures.is_empty() {
            return Err(Error::io(format!(
                "clone of {snap:?}: {} of {} failed: {}",
                failures.len(),
                names.len(),
                failures.join("; ")
            )));
        }
        ms.sort_unstable();
        Ok(format!(
            "ok: cloned {snap} into {} wall_ms={} restore_ms_max={}",
            names.join(" "),
            t0.elapsed().as_millis(),
            ms.last().copied().unwrap_or(0)
        ))
    }

    /// Create VM `name` from the snapshot: own directory and disk copy, then restore.
    async fn restore_one(
        self: &Arc<Self>,
        info: &SnapshotInfo,
        name: &str,
        backend: Arc<dyn crate::vmm::Backend>,
        uid: u32,
        gid: u32,
    ) -> Result<Arc<Vm>> {
        let snap_dir = self.layout.snapshots().join(&info.name);
        let src = snap_dir.join(DISK_FILE);
        let copy_disk = |dst: PathBuf| async move {
            tokio::task::spawn_blocking(move || crate::disk::clone_disk(&src, &dst))
                .await
                .map_err(|e| Error::io(e.to_string()))?
                .map(drop)
                .map_err(|e| Error::io(format!("cannot copy the snapshot's disk: {e}")))
        };
        let new = NewVm {
            name,
            uid,
            gid,
            config: info.config.clone(),
            disk_mib: info.disk_mib,
        };
        let vm = self.register_vm(new, backend, copy_disk).await?;
        self.events.emit(
            name,
            "created",
            &format!(
                "from snapshot {} (of {}) vcpus={} memory={} backend={}",
                info.name, info.source_vm, info.vcpus, info.memory_mib, info.backend
            ),
        );
        let timeout = self.boot_timeout.max(Duration::from_secs(30));
        vm.restore_boot(&info.name, &snap_dir, &info.saved, timeout)
            .await?;
        Ok(vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clone_names_follow_count() {
        assert_eq!(clone_names("b", None), ["b"]);
        assert_eq!(clone_names("b", Some(3)), ["b-1", "b-2", "b-3"]);
        assert_eq!(clone_names("b", Some(1)), ["b-1"]);
    }
}
