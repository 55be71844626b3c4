//! QEMU snapshots: save a paused VM by migrating to a file, restore by starting the saved
//! command line (rewritten for the new VM directory) with `-incoming defer` and migrating
//! in from that file.
//!
//! Files in a snapshot directory written here:
//! ```text
//! state      the migration stream: device state and guest memory (zero pages elided);
//!            device state only when the VM's RAM is a shared file (a template)
//! memory     a template's RAM, copied while it was paused; clones map it privately
//! ```
//! The saved command line travels in [`SavedState::restore`] as `{"argv": [...],
//! "source_dir": "..."}`; the snapshot layer keeps it in the snapshot's `info.json`.
//!
//! Invariants:
//! - The restored QEMU gets exactly the device set of the source (same argv), so the
//!   migration stream matches; only paths into the source's VM directory, `-name` and
//!   `-incoming` differ. After rewriting, no argument names the source directory: a clone
//!   never opens the source's disk, sockets or logs.
//! - Every wait has a deadline; a migration that does not finish in time is cancelled
//!   (save) or the new QEMU is killed (restore), and the error says why.
//! - Migration URIs run through `/bin/sh` (`exec:`); paths are single-quoted.
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::logcap::log_tail;
use crate::vmm::qemu::{opt_escape, QemuBackend, QemuInstance, VMM_LOG};
use crate::vmm::{SavedState, VmSpec, VmmError, VmmInstance};

/// The migration stream's file name in the snapshot directory.
pub const STATE_FILE: &str = "state";
/// A template's RAM (see `crate::vmm::qemu_memory`); clones map it copy-on-write.
pub const MEMORY_FILE: &str = "memory";
/// Deadline of one QMP command during snapshot/restore.
const QMP_STEP: Duration = Duration::from_secs(5);
/// How often migration progress is polled.
const POLL: Duration = Duration::from_millis(20);

/// Deadline for saving or loading `memory_mib` of guest memory (generous: TCG hosts are
/// slow and shared).
pub fn migration_deadline(memory_mib: u64) -> Duration {
    Duration::from_secs(30) + Duration::from_millis(memory_mib * 200)
}

/// `'...'` quoting for `/bin/sh`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn path_str(p: &Path) -> Result<&str, VmmError> {
    p.to_str()
        .ok_or_else(|| VmmError::StartFailed(format!("path {} is not UTF-8", p.display())))
}

/// Migrate the (paused) VM into `<dir>/state`.
pub async fn save(inst: &QemuInstance, dir: &Path) -> Result<SavedState, VmmError> {
    let args = crate::vmm::qemu::load_args(inst.dir())?;
    let memory_mib = flag_value(&args.argv, "-m")
        .and_then(|m| m.parse::<u64>().ok())
        .unwrap_or(1024);
    let state = dir.join(STATE_FILE);
    // A template's RAM is a shared file: the stream leaves it out, and the snapshot
    // keeps a copy of the file (taken while the VM is paused) for clones to map.
    // Always set: a clone of a template loaded its state with the capability on, and the
    // stream records it, so its own snapshots must turn it off again.
    let shared = crate::vmm::qemu_memory::shared_memory_file(&args.argv);
    set_ignore_shared(inst, shared.is_some()).await?;
    // No bandwidth cap: the VM is paused, so nothing competes with the copy.
    inst.qmp_execute(
        "migrate-set-parameters",
        Some(json!({"max-bandwidth": 1u64 << 40})),
        QMP_STEP,
    )
    .await?;
    let uri = format!("exec:cat > {}", sh_quote(path_str(&state)?));
    inst.qmp_execute("migrate", Some(json!({ "uri": uri })), QMP_STEP)
        .await?;
    let deadline = Instant::now() + migration_deadline(memory_mib);
    let ram = loop {
        let info = inst.qmp_execute("query-migrate", None, QMP_STEP).await?;
        match info.get("status").and_then(Value::as_str).unwrap_or("") {
            "completed" => break info.get("ram").cloned().unwrap_or(Value::Null),
            "failed" | "cancelled" => {
                return Err(VmmError::Refused {
                    op: "migrate".into(),
                    message: info
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("migration failed")
                        .to_string(),
                })
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            let _ = inst.qmp_execute("migrate_cancel", None, QMP_STEP).await;
            return Err(VmmError::Timeout(
                migration_deadline(memory_mib),
                "QEMU to save the VM state".into(),
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    let memory_file = match shared {
        Some(src) => {
            let dst = dir.join(MEMORY_FILE);
            tokio::task::spawn_blocking(move || crate::disk::clone_disk(&src, &dst))
                .await
                .map_err(|e| VmmError::StartFailed(format!("memory copy: {e}")))?
                .map_err(|e| VmmError::Io("copy the template's memory".into(), e))?;
            Some(MEMORY_FILE.to_string())
        }
        None => None,
    };
    Ok(SavedState {
        state_file: STATE_FILE.into(),
        memory_file,
        restore: json!({
            "argv": args.argv,
            "source_dir": inst.dir(),
            // QEMU's page counts (normal = written, duplicate = zero pages elided).
            "migration_ram": ram,
        }),
    })
}

/// Migrate without the RAM blocks mapped shared from a file (`x-ignore-shared`), on
/// both ends: the source leaves them out, the destination expects none.
async fn set_ignore_shared(inst: &QemuInstance, on: bool) -> Result<(), VmmError> {
    let caps = json!({"capabilities": [{"capability": "x-ignore-shared", "state": on}]});
    inst.qmp_execute("migrate-set-capabilities", Some(caps), QMP_STEP)
        .await
        .map(drop)
}

fn flag_value<'a>(argv: &'a [String], flag: &str) -> Option<&'a str> {
    argv.windows(2)
        .find(|w| w[0] == flag)
        .map(|w| w[1].as_str())
}

/// The command line that restores a snapshot taken of the VM in `source_dir` into the VM
/// directory `new_dir` named `new_name`: every path under `source_dir` moves to `new_dir`
/// (plain and QEMU-option-escaped spellings), `-name` is the new name, an earlier
/// `-incoming` is dropped and `-incoming defer` is appended. With `netdev`, the
/// `-netdev` value is replaced (a clone's own TAP device).
pub fn restore_argv(
    saved: &[String],
    source_dir: &Path,
    new_dir: &Path,
    new_name: &str,
    netdev: Option<&str>,
) -> Result<Vec<String>, VmmError> {
    if saved.is_empty() {
        return Err(VmmError::StartFailed(
            "the snapshot holds no QEMU command line".into(),
        ));
    }
    let src = format!("{}/", path_str(source_dir)?.trim_end_matches('/'));
    let dst = format!("{}/", path_str(new_dir)?.trim_end_matches('/'));
    let (src_e, dst_e) = (opt_escape(&src), opt_escape(&dst));
    let mut out = Vec::with_capacity(saved.len() + 2);
    let mut it = saved.iter().peekable();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-incoming" => {
                it.next();
                continue;
            }
            "-name" => {
                it.next();
                out.push(arg.clone());
                out.push(format!("bandsox-{new_name}"));
                continue;
            }
            "-netdev" if netdev.is_some() => {
                it.next();
                out.push(arg.clone());
                out.extend(netdev.map(str::to_string));
                continue;
            }
            _ => {}
        }
        let mut a = arg.replace(&src_e, &dst_e);
        if src != src_e {
            a = a.replace(&src, &dst);
        }
        out.push(a);
    }
    if let Some(a) = out.iter().find(|a| a.contains(&src) || a.contains(&src_e)) {
        return Err(VmmError::StartFailed(format!(
            "the restored command line still names the source directory: {a}"
        )));
    }
    out.push("-incoming".into());
    out.push("defer".into());
    Ok(out)
}

/// Start QEMU for `spec` from the snapshot in `snap_dir` and let the guest run.
pub async fn restore(
    backend: &QemuBackend,
    spec: &VmSpec,
    snap_dir: &Path,
    saved: &SavedState,
) -> Result<QemuInstance, VmmError> {
    let bad = |what: &str| VmmError::StartFailed(format!("snapshot: {what}"));
    let argv: Vec<String> = saved
        .restore
        .get("argv")
        .and_then(|a| serde_json::from_value(a.clone()).ok())
        .ok_or_else(|| bad("no QEMU command line recorded"))?;
    let source_dir = saved
        .restore
        .get("source_dir")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no source directory recorded"))?;
    let netdev = spec.net.as_ref().map(crate::vmm::qemu::netdev_arg);
    let argv = restore_argv(
        &argv,
        Path::new(source_dir),
        &spec.dir,
        &spec.name,
        netdev.as_deref(),
    )?;
    let memory = saved.memory_file.as_ref().map(|m| snap_dir.join(m));
    let argv =
        crate::vmm::qemu_memory::restore_memory_argv(argv, memory.as_deref(), spec.memory_mib)
            .ok_or_else(|| bad("the memory file's path is not UTF-8"))?;
    let state = snap_dir.join(&saved.state_file);
    for f in std::iter::once(&state).chain(memory.as_ref()) {
        if !f.is_file() {
            return Err(bad(&format!("{} is missing", f.display())));
        }
    }
    let log_start = std::fs::metadata(spec.dir.join(VMM_LOG))
        .map(|m| m.len())
        .unwrap_or(0);
    let inst = backend.launch_argv(&spec.dir, argv).await?;
    crate::testhook::pause_at(crate::testhook::Point::CloneVmmStarted, &spec.name).await;
    let loaded = async {
        if memory.is_some() {
            set_ignore_shared(&inst, true).await?;
        }
        incoming(&inst, &state, spec.memory_mib.into()).await
    };
    match loaded.await {
        Ok(()) => Ok(inst),
        Err(e) => {
            let _ = inst.kill().await;
            let e = match e {
                VmmError::NotRunning => VmmError::StartFailed(format!(
                    "QEMU exited while loading the snapshot: {}",
                    log_tail(&spec.dir.join(VMM_LOG), log_start, 6)
                )),
                other => other,
            };
            Err(e)
        }
    }
}

async fn incoming(inst: &QemuInstance, state: &Path, memory_mib: u64) -> Result<(), VmmError> {
    let uri = format!("exec:cat {}", sh_quote(path_str(state)?));
    inst.qmp_execute("migrate-incoming", Some(json!({ "uri": uri })), QMP_STEP)
        .await?;
    let deadline = Instant::now() + migration_deadline(memory_mib);
    loop {
        let st = inst.qmp_execute("query-status", None, QMP_STEP).await?;
        match st.get("status").and_then(Value::as_str).unwrap_or("") {
            "inmigrate" => {}
            "running" => return Ok(()),
            // Loaded but not started (no autostart): continue it.
            "paused" | "postmigrate" | "prelaunch" => {
                inst.qmp_execute("cont", None, QMP_STEP).await?;
                return Ok(());
            }
            other => {
                return Err(VmmError::Refused {
                    op: "migrate-incoming".into(),
                    message: format!("the VM is in state {other:?} after loading"),
                })
            }
        }
        if Instant::now() >= deadline {
            return Err(VmmError::Timeout(
                migration_deadline(memory_mib),
                "QEMU to load the snapshot".into(),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(dir: &str) -> Vec<String> {
        [
            "/usr/bin/qemu-system-x86_64",
            "-name",
            "bandsox-a",
            "-m",
            "256",
            "-kernel",
            "/s/boot/vmlinuz",
            "-append",
            "console=ttyS0 bandsox.name=a",
            "-chardev",
            &format!("file,id=console,path={dir}/console.log,append=on"),
            "-chardev",
            &format!("socket,id=qmp,path={dir}/qmp.sock,server=on,wait=off"),
            "-chardev",
            &format!("socket,id=agent,path={dir}/agent.sock,server=on,wait=off"),
            "-drive",
            &format!("id=vda,file={dir}/disk.ext4,format=raw,if=none"),
            "-pidfile",
            &format!("{dir}/vmm.pid"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn restore_argv_moves_every_path_and_keeps_the_rest() {
        let src = argv("/st/vms/aaa");
        let out = restore_argv(
            &src,
            Path::new("/st/vms/aaa"),
            Path::new("/st/vms/bbb"),
            "b-1",
            None,
        )
        .unwrap();
        assert_eq!(out.len(), src.len() + 2);
        assert_eq!(&out[out.len() - 2..], ["-incoming", "defer"]);
        assert_eq!(flag_value(&out, "-name"), Some("bandsox-b-1"));
        assert_eq!(flag_value(&out, "-pidfile"), Some("/st/vms/bbb/vmm.pid"));
        assert_eq!(
            flag_value(&out, "-drive"),
            Some("id=vda,file=/st/vms/bbb/disk.ext4,format=raw,if=none")
        );
        // The guest's command line and the kernel stay as they were (memory is restored).
        assert_eq!(
            flag_value(&out, "-append"),
            Some("console=ttyS0 bandsox.name=a")
        );
        assert_eq!(flag_value(&out, "-kernel"), Some("/s/boot/vmlinuz"));
        assert!(!out.iter().any(|a| a.contains("/st/vms/aaa")));
    }

    #[test]
    fn restore_argv_of_a_clone_replaces_its_incoming() {
        let first = restore_argv(
            &argv("/v/a"),
            Path::new("/v/a"),
            Path::new("/v/b"),
            "b",
            None,
        )
        .unwrap();
        let second = restore_argv(&first, Path::new("/v/b"), Path::new("/v/c"), "c", None).unwrap();
        assert_eq!(second.iter().filter(|a| *a == "-incoming").count(), 1);
        assert_eq!(flag_value(&second, "-pidfile"), Some("/v/c/vmm.pid"));
    }

    #[test]
    fn restore_argv_handles_commas_and_prefixes() {
        // A directory whose name is a prefix of another must not be rewritten inside it.
        let mut src = argv("/v/a,x");
        src.push("-drive".into());
        src.push("file=/v/a,,xy/other.img".into());
        // Option strings double commas; plain arguments (-pidfile) do not.
        for a in src.iter_mut() {
            if a.contains("path=") || a.starts_with("id=vda") {
                *a = a.replace("/v/a,x/", "/v/a,,x/");
            }
        }
        let out = restore_argv(&src, Path::new("/v/a,x"), Path::new("/v/n"), "n", None).unwrap();
        assert_eq!(flag_value(&out, "-pidfile"), Some("/v/n/vmm.pid"));
        assert!(out
            .iter()
            .any(|a| a == "socket,id=qmp,path=/v/n/qmp.sock,server=on,wait=off"));
        assert!(out.iter().any(|a| a == "file=/v/a,,xy/other.img"));
        assert!(restore_argv(&[], Path::new("/a"), Path::new("/b"), "b", None).is_err());
    }

    #[test]
    fn restore_argv_gives_a_clone_its_own_tap() {
        let mut src = argv("/v/a");
        src.extend(
            [
                "-netdev",
                "tap,id=net0,ifname=bsxaaaa,script=no,downscript=no",
                "-device",
                "virtio-net-device,netdev=net0,mac=02:bd:00:00:00:01",
            ]
            .map(String::from),
        );
        let new = "tap,id=net0,ifname=bsxbbbb,script=no,downscript=no";
        let out = restore_argv(&src, Path::new("/v/a"), Path::new("/v/b"), "b", Some(new)).unwrap();
        assert_eq!(flag_value(&out, "-netdev"), Some(new));
        // The NIC (and its MAC, part of the saved device state) stays as it was.
        assert!(out
            .iter()
            .any(|a| a == "virtio-net-device,netdev=net0,mac=02:bd:00:00:00:01"));
        assert!(!out.iter().any(|a| a.contains("bsxaaaa")));
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(sh_quote("/a b/state"), "'/a b/state'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
