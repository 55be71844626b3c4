//! Backend-level contract tests against **real Firecracker binaries**, on hosts whose
//! KVM cannot run a guest (no guest ever reaches userspace here: every VM is paused right
//! after `InstanceStart` or a restore, or killed, so none burns a core).
//!
//! For every Firecracker found (see [`find_binaries`]) and each mode (unjailed; jailed,
//! when a jailer is found and we are root), through the backend's public API:
//! - launch (every API call answered 2xx, logs kept out of the console), pause at once;
//! - the shared boot files keep owner, mode and inode (jailed);
//! - snapshot create; two clones restored from it at once in fresh processes with
//!   `vsock_override` (1.16+) and, in a private network namespace, `network_overrides`
//!   with their own TAP devices: no socket collision, both paused at once;
//! - adopt after a daemon restart (by pid file and command line: the jailer's `--id <id>`
//!   as two arguments), snapshot through the adopted instance;
//! - stop, start again on the same directory (the jail is rebuilt), stop;
//! - rmdir: no process, no TAP device, no jail directory left;
//! - a VMM killed mid-boot: the reason names the exit status and Firecracker's error line,
//!   never its API-socket banner;
//! - across versions: a snapshot whose data format the other binary cannot read is refused
//!   up front (EINVAL, both versions named), and the refusal matches what the binary
//!   itself does with it (measured by a raw load).
//!
//! Every API call is journaled; the test prints each request with the status codes seen.
//!
//! `installs.rs` (its own test, `real_firecracker_contract_installs`): a copy named
//! `firecracker`, a symlink, and the release tarball's names linked, each jailed.
//!
//! Where the binaries are: `$BANDSOX_FIRECRACKER`, else `firecracker` (and `jailer`) on PATH, else
//! `../shared/firecracker/bin/firecracker-*` (and `jailer-*`) relative to the repository's
//! parent directory, else `$BANDSOX_FC_BIN_DIR`; without any, a loud SKIPPED line.
//! Needs root (jailer, TAP devices, network namespace) and an extractable guest kernel
//! (`/var/cache/bandsox/kernel` from mount-helpers/setup).
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bandsox_fsd::net;
use bandsox_fsd::vmm::firecracker::api::{self, ApiClient};
use bandsox_fsd::vmm::firecracker::jailer::JailerConfig;
use bandsox_fsd::vmm::firecracker::{adopt_dir, last_error_line, FirecrackerBackend};
use bandsox_fsd::vmm::{Backend, NetMode, VmSpec, VmmError, VmmInstance};

const KERNEL_ROOT: &str = "/var/cache/bandsox/kernel";
const MEMORY_MIB: u32 = 128;

type Outcome = Result<(), String>;

macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!("{}:{}: {}", file!(), line!(), format!($($fmt)+)));
        }
    };
}

/// Three installs of one release (copy, symlink, release-tarball names), jailed (after
/// `check!`, which it uses).
#[path = "firecracker_contract/installs.rs"]
mod installs;

fn skip(why: &str) {
    eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("!!! SKIPPED firecracker_contract: {why}");
    eprintln!("!!! (put firecracker on PATH, or the test builds in ../shared/firecracker/bin)");
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The Firecracker binaries to test and the jailer, as described in the module docs.
pub fn find_binaries() -> (Vec<PathBuf>, Option<PathBuf>, String) {
    if let Some(fc) = std::env::var_os("BANDSOX_FIRECRACKER").map(PathBuf::from) {
        let jailer =
            on_path("jailer").or_else(|| bandsox_fsd::vmm::firecracker::jailer::find_beside(&fc));
        return (vec![fc], jailer, "BANDSOX_FIRECRACKER".into());
    }
    if let Some(fc) = on_path("firecracker") {
        return (vec![fc], on_path("jailer"), "PATH".into());
    }
    let shared = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/firecracker/bin")
        .canonicalize()
        .ok();
    let dirs = shared
        .into_iter()
        .chain(std::env::var_os("BANDSOX_FC_BIN_DIR").map(PathBuf::from));
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut fcs = Vec::new();
        let mut jailer = None;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("firecracker-") {
                fcs.push(e.path());
            } else if name.starts_with("jailer") {
                jailer = Some(e.path());
            }
        }
        if !fcs.is_empty() {
            fcs.sort();
            fcs.reverse(); // newest first
            return (fcs, jailer, dir.display().to_string());
        }
    }
    (Vec::new(), None, String::new())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The test's own state directory: boot files (a copy of the Debian bzImage, from which
/// the backend extracts `vmlinux` on first launch, and a stand-in initramfs), VM and
/// snapshot directories, all on one filesystem as in the daemon's state directory.
struct Fixture {
    root: tempfile::TempDir,
    kernel: PathBuf,
    initrd: PathBuf,
}

impl Fixture {
    fn new() -> Result<Fixture, String> {
        let boot_src = std::fs::read_dir(Path::new(KERNEL_ROOT).join("boot"))
            .map_err(|e| format!("no guest kernel under {KERNEL_ROOT}: {e}"))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .max()
            .ok_or_else(|| format!("no boot/vmlinuz-* under {KERNEL_ROOT}"))?;
        // Short paths: jailed socket paths must stay under 108 bytes.
        let root = tempfile::Builder::new()
            .prefix("bxc")
            .tempdir_in("/tmp")
            .map_err(|e| e.to_string())?;
        let boot = root.path().join("boot");
        std::fs::create_dir_all(&boot).map_err(|e| e.to_string())?;
        let kernel = boot.join("vmlinuz");
        std::fs::copy(&boot_src, &kernel).map_err(|e| e.to_string())?;
        // Firecracker only loads the initramfs into guest memory; the guest never gets to
        // unpack it here.
        let initrd = boot.join("initrd");
        std::fs::write(&initrd, vec![0u8; 64 * 1024]).map_err(|e| e.to_string())?;
        for d in ["vms", "snapshots"] {
            std::fs::create_dir_all(root.path().join(d)).map_err(|e| e.to_string())?;
        }
        Ok(Fixture {
            root,
            kernel,
            initrd,
        })
    }

    /// A VM directory with an 8 MiB (sparse) disk and, with `slot`, a TAP network.
    fn vm(&self, id: &str, slot: Option<u32>) -> VmSpec {
        let dir = self.root.path().join("vms").join(id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.ext4");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(8 << 20))
            .unwrap();
        VmSpec {
            name: format!("vm-{id}"),
            dir,
            vcpus: 1,
            memory_mib: MEMORY_MIB,
            disk: Some(disk),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            net: slot.and_then(|s| net::plan(NetMode::Tap, id, Some(s), None).unwrap()),
            memory_file: None,
        }
    }

    fn snapshot_dir(&self, name: &str) -> PathBuf {
        let d = self.root.path().join("snapshots").join(name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn boot_files(&self) -> Vec<PathBuf> {
        let boot = self.root.path().join("boot");
        ["vmlinuz", "vmlinux", "initrd"]
            .iter()
            .map(|f| boot.join(f))
            .filter(|p| p.exists())
            .collect()
    }
}

/// (uid, gid, mode, inode, link count) of each file.
fn stat_all(files: &[PathBuf]) -> Vec<(PathBuf, (u32, u32, u32, u64))> {
    files
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).unwrap();
            (p.clone(), (m.uid(), m.gid(), m.mode(), m.ino()))
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X"))
        })
        .unwrap_or(false)
}

/// SIGKILLs every pid it holds when dropped (a failed case leaks no VM).
#[derive(Default)]
struct Reaper(std::sync::Mutex<Vec<u32>>);

impl Reaper {
    fn add(&self, pid: u32) {
        self.0.lock().unwrap().push(pid);
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in self.0.lock().unwrap().iter() {
            if let Ok(p) = libc::pid_t::try_from(*pid) {
                // SAFETY: kill(2) on a pid this test started; harmless if already gone.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
    }
}

/// One binary in one mode.
struct Case<'a> {
    fx: &'a Fixture,
    backend: FirecrackerBackend,
    label: String,
    jailed: bool,
    net: bool,
    reaper: Reaper,
}

/// TAP devices for `ids` (the daemon's own setup code, in the test's network namespace).
fn taps(specs: &[&VmSpec]) -> Result<(), String> {
    for s in specs {
        if let Some(tap) = s.net.as_ref().and_then(|n| n.tap.as_ref()) {
            net::setup_tap(tap).map_err(|e| format!("setup_tap: {e}"))?;
        }
    }
    Ok(())
}

fn tap_exists(spec: &VmSpec) -> bool {
    spec.net
        .as_ref()
        .and_then(|n| n.tap.as_ref())
        .is_some_and(|t| nix::net::if_::if_nametoindex(t.ifname.as_str()).is_ok())
}

fn no_firecracker_lines_in_console(dir: &Path) -> Outcome {
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    check!(
        !console.contains("Listening on API socket") && !console.contains("API server"),
        "Firecracker's own log reached the guest console: {console:?}"
    );
    let log = std::fs::read_to_string(dir.join("firecracker.log")).unwrap_or_default();
    check!(
        log.contains("Listening on API socket") || log.contains("API server started"),
        "firecracker.log lacks Firecracker's start-up lines: {log:?}"
    );
    Ok(())
}

impl Case<'_> {
    /// Launch `spec` (every call 2xx) and pause at once.
    async fn launch_paused(&self, spec: &VmSpec) -> Result<Box<dyn VmmInstance>, String> {
        let t0 = Instant::now();
        let inst = self
            .backend
            .launch(spec)
            .await
            .map_err(|e| format!("launch: {e}"))?;
        self.reaper.add(inst.pid());
        inst.pause()
            .await
            .map_err(|e| format!("pause after InstanceStart: {e}"))?;
        eprintln!(
            "  {}: launched and paused in {:?} (pid {})",
            self.label,
            t0.elapsed(),
            inst.pid()
        );
        Ok(inst)
    }

    async fn flow(&self) -> Outcome {
        let fx = self.fx;
        let slot = |n: u32| self.net.then_some(n);
        let src = fx.vm("a0000000000a", slot(1));
        let c1 = fx.vm("c0000000001c", slot(2));
        let c2 = fx.vm("c0000000002c", slot(3));
        taps(&[&src, &c1, &c2])?;

        // Launch; the shared boot files stay as they are.
        let before = stat_all(&fx.boot_files());
        let inst = self.launch_paused(&src).await?;
        let after = stat_all(&fx.boot_files());
        for (p, want) in &before {
            let got = after.iter().find(|(q, _)| q == p).map(|(_, s)| *s);
            check!(
                got == Some(*want),
                "{} changed: {want:?} -> {got:?}",
                p.display()
            );
        }
        let vmlinux = fx.root.path().join("boot/vmlinux");
        let m = std::fs::metadata(&vmlinux).map_err(|e| e.to_string())?;
        check!(
            m.uid() == 0 && m.mode() & 0o777 == 0o644,
            "boot/vmlinux is {}:{} {:o}",
            m.uid(),
            m.gid(),
            m.mode()
        );
        no_firecracker_lines_in_console(&src.dir)?;
        if self.jailed {
            check!(src.dir.join("jail").is_dir(), "no jail directory");
        }

        // Snapshot.
        let snap = fx.snapshot_dir(&format!("s-{}", self.label.replace(' ', "-")));
        let t0 = Instant::now();
        let saved = inst
            .save_snapshot(&snap)
            .await
            .map_err(|e| format!("snapshot create: {e}"))?;
        eprintln!("  {}: snapshot created in {:?}", self.label, t0.elapsed());
        for f in ["state", "memory"] {
            let m = std::fs::metadata(snap.join(f)).map_err(|e| format!("{f}: {e}"))?;
            check!(m.uid() == 0, "snapshot {f} belongs to uid {}", m.uid());
        }
        check!(
            saved.restore["firecracker_version"] == self.backend.version_text(),
            "recorded version {} (want {})",
            saved.restore["firecracker_version"],
            self.backend.version_text()
        );
        check!(
            saved.restore["snapshot_format"].as_str()
                == self
                    .backend
                    .snapshot_format()
                    .map(|f| f.to_string())
                    .as_deref(),
            "recorded format {}",
            saved.restore["snapshot_format"]
        );
        self.backend
            .check_restore(&snap, &saved)
            .map_err(|e| format!("own snapshot refused: {e}"))?;

        // Two clones at once, each paused right after its restore.
        let t0 = Instant::now();
        let (r1, r2) = tokio::join!(
            self.backend.restore(&c1, &snap, &saved),
            self.backend.restore(&c2, &snap, &saved)
        );
        let mut clones = Vec::new();
        for (spec, r) in [(&c1, r1), (&c2, r2)] {
            let i = r.map_err(|e| format!("restore into {}: {e}", spec.dir.display()))?;
            self.reaper.add(i.pid());
            i.pause()
                .await
                .map_err(|e| format!("pause after restore: {e}"))?;
            clones.push(i);
        }
        eprintln!(
            "  {}: two clones restored at once in {:?}",
            self.label,
            t0.elapsed()
        );
        check!(
            clones[0].pid() != clones[1].pid(),
            "one process for two clones"
        );
        for spec in [&c1, &c2] {
            let a = adopt_dir(&spec.dir).ok_or("a clone cannot be adopted")?;
            let sock = a.root().join("vsock.sock");
            check!(
                sock.exists(),
                "clone {} has no vsock socket of its own at {}",
                spec.name,
                sock.display()
            );
            let info = a.api().instance_info().await.map_err(|e| e.to_string())?;
            check!(info.state == "Paused", "clone state {}", info.state);
            no_firecracker_lines_in_console(&spec.dir)?;
        }

        // Adopt after a daemon restart: a new backend object and the directory alone.
        let pid = inst.pid();
        drop(inst);
        let adopted = self
            .backend
            .adopt(&src)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the running VM was not adopted")?;
        check!(adopted.pid() == pid, "adopted pid {}", adopted.pid());
        let snap2 = fx.snapshot_dir(&format!("s2-{}", self.label.replace(' ', "-")));
        adopted
            .save_snapshot(&snap2)
            .await
            .map_err(|e| format!("snapshot through the adopted instance: {e}"))?;

        // Stop; start again on the same directory (jail rebuilt); stop.
        adopted.kill().await.map_err(|e| e.to_string())?;
        check!(!alive(pid), "pid {pid} still alive after kill");
        check!(!src.dir.join("vmm.pid").exists(), "pid file left");
        let again = self.launch_paused(&src).await?;
        let pid2 = again.pid();
        again.kill().await.map_err(|e| e.to_string())?;

        // rmdir: what the manager does (kill, remove the TAP, remove the directory).
        for (spec, i) in [(&c1, &clones[0]), (&c2, &clones[1])] {
            i.kill().await.map_err(|e| e.to_string())?;
            check!(!alive(i.pid()), "clone {} alive", i.pid());
            rmdir(spec)?;
        }
        rmdir(&src)?;
        check!(!alive(pid2), "restarted VM alive");
        Ok(())
    }

    /// A VMM that dies mid-boot: SIGBUS (Firecracker logs why and exits) and SIGKILL.
    async fn killed_mid_boot(&self) -> Outcome {
        for (sig, want_status, want_error) in [
            (
                libc::SIGBUS,
                "exited with status",
                Some("intercepting signal 7"),
            ),
            (
                libc::SIGKILL,
                "was killed by signal 9 (SIGKILL)",
                None::<&str>,
            ),
        ] {
            let spec = self.fx.vm("d0000000000d", None);
            let inst = self
                .backend
                .launch(&spec)
                .await
                .map_err(|e| format!("launch: {e}"))?;
            self.reaper.add(inst.pid());
            let pid = libc::pid_t::try_from(inst.pid()).map_err(|e| e.to_string())?;
            // SAFETY: kill(2) on the Firecracker this case just started.
            unsafe { libc::kill(pid, sig) };
            let mut want_status = want_status;
            if !inst.wait_exit(Duration::from_secs(5)).await {
                // On this machine kind (kvm_pvm) a vCPU inside KVM_RUN can take a minute to
                // come out, and Firecracker's shutdown waits for it: it logged its error and
                // sits in a join. SIGKILL then; the reason must still carry the error.
                eprintln!(
                    "  {}: no exit 5 s after signal {sig} (threads: {}); SIGKILL",
                    self.label,
                    threads_of(inst.pid())
                );
                // SAFETY: kill(2) on the Firecracker this case started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                check!(
                    inst.wait_exit(Duration::from_secs(5)).await,
                    "no exit after SIGKILL"
                );
                want_status = "was killed by signal 9 (SIGKILL)";
            }
            let why = inst.exit_reason().ok_or("no exit reason")?;
            eprintln!("  {}: signal {sig} -> {why}", self.label);
            check!(
                why.starts_with("Firecracker ") && why.contains(want_status),
                "reason {why:?} lacks {want_status:?}"
            );
            if let Some(e) = want_error {
                check!(
                    why.contains(e),
                    "reason {why:?} lacks Firecracker's error {e:?}"
                );
                let line = last_error_line(&spec.dir.join("firecracker.log"));
                check!(
                    line.as_deref().is_some_and(|l| l.contains(e)),
                    "last error line {line:?}"
                );
            }
            check!(
                !why.contains("Listening on API socket"),
                "the API-socket banner is not a reason: {why}"
            );
            no_firecracker_lines_in_console(&spec.dir)?;
            rmdir(&spec)?;
        }
        Ok(())
    }
}

/// `name state wchan` of each thread of `pid` (diagnostics).
fn threads_of(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "gone".into();
    };
    tasks
        .flatten()
        .map(|t| {
            let r = |f: &str| {
                std::fs::read_to_string(t.path().join(f))
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            };
            let state = r("status")
                .lines()
                .find(|l| l.starts_with("State:"))
                .unwrap_or("")
                .to_string();
            format!("{} [{}] {}", r("comm"), state, r("wchan"))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn rmdir(spec: &VmSpec) -> Outcome {
    if let Some(tap) = spec.net.as_ref().and_then(|n| n.tap.as_ref()) {
        net::remove_tap(&tap.ifname);
    }
    std::fs::remove_dir_all(&spec.dir).map_err(|e| format!("rmdir: {e}"))?;
    check!(!tap_exists(spec), "TAP device of {} left", spec.name);
    check!(!spec.dir.exists(), "VM directory left");
    Ok(())
}

/// Start `binary` bare and send one raw `/snapshot/load` of `snap` (no checks of ours):
/// what the binary itself says about that snapshot. The process is always killed.
async fn raw_load(binary: &Path, dir: &Path, snap: &Path) -> Result<u16, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    // The snapshot's disk path (relative) must exist in the loader's cwd.
    std::fs::File::create(dir.join("disk.ext4"))
        .and_then(|f| f.set_len(8 << 20))
        .map_err(|e| e.to_string())?;
    let sock = dir.join("api.sock");
    let mut child = std::process::Command::new(binary)
        .arg("--api-sock")
        .arg(&sock)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let api = ApiClient::new(&sock).with_timeout(Duration::from_secs(10));
    let t0 = Instant::now();
    while api.version().await.is_err() && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let body = serde_json::json!({
        "snapshot_path": snap.join("state"),
        "mem_backend": {"backend_type": "File", "backend_path": snap.join("memory")},
        "resume_vm": false,
    });
    let r = api
        .call(
            hyper::Method::PUT,
            "/snapshot/load",
            Some(serde_json::to_vec(&body).unwrap()),
        )
        .await;
    let _ = child.kill();
    let _ = child.wait();
    Ok(match r {
        Ok(_) => 204,
        Err(api::ApiError::Fault {
            status, message, ..
        }) => {
            eprintln!("  raw load by {}: {status} {message}", binary.display());
            status
        }
        Err(e) => return Err(e.to_string()),
    })
}

/// Snapshots of each binary offered to every other: our check's verdict must match the
/// binary's own answer, and a refusal names both versions.
async fn cross_versions(fx: &Fixture, backends: &[FirecrackerBackend]) -> Outcome {
    let reaper = Reaper::default();
    let mut snaps = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        let spec = fx.vm(&format!("e000000000{i:02}"), None);
        let inst = b.launch(&spec).await.map_err(|e| format!("launch: {e}"))?;
        reaper.add(inst.pid());
        inst.pause().await.map_err(|e| e.to_string())?;
        let snap = fx.snapshot_dir(&format!("x{i}"));
        let saved = inst.save_snapshot(&snap).await.map_err(|e| e.to_string())?;
        inst.kill().await.map_err(|e| e.to_string())?;
        rmdir(&spec)?;
        snaps.push((b, snap, saved));
    }
    for (taker, snap, saved) in &snaps {
        for loader in backends {
            let verdict = loader.check_restore(snap, saved);
            let raw = raw_load(loader.binary(), &fx.root.path().join("raw"), snap).await?;
            eprintln!(
                "  matrix: taken by {} (format {}), loaded by {} (format {}): ours {}, \
                 Firecracker's answer {raw}",
                taker.version_text(),
                saved.restore["snapshot_format"],
                loader.version_text(),
                loader
                    .snapshot_format()
                    .map(|f| f.to_string())
                    .unwrap_or_default(),
                match &verdict {
                    Ok(()) => "loadable".to_string(),
                    Err(e) => format!("refused ({e})"),
                },
            );
            check!(
                verdict.is_ok() == (raw == 204),
                "our verdict {verdict:?} disagrees with Firecracker's answer {raw}"
            );
            if let Err(e) = verdict {
                check!(
                    matches!(e, VmmError::Incompatible(_)),
                    "not Incompatible (EINVAL): {e:?}"
                );
                let m = e.to_string();
                check!(
                    m.contains(taker.version_text()) && m.contains(loader.version_text()),
                    "the refusal does not name both versions: {m}"
                );
                // restore() refuses the same way, before any process starts.
                let spec = fx.vm("f0000000000f", None);
                let r = loader.restore(&spec, snap, saved).await;
                check!(
                    matches!(r, Err(VmmError::Incompatible(_))),
                    "restore was not refused up front"
                );
                check!(!spec.dir.join("vmm.pid").exists(), "a process was started");
                rmdir(&spec)?;
            }
        }
    }
    Ok(())
}

/// `PUT /drives/vda` and `PUT /network-interfaces/eth0` etc. by path shape.
fn summarize(journal: &BTreeMap<String, BTreeMap<String, Vec<u16>>>) {
    eprintln!("\nfirecracker_contract: API calls and the status codes the real binaries gave");
    for (label, calls) in journal {
        eprintln!("  {label}:");
        for (req, statuses) in calls {
            let mut s = statuses.clone();
            s.sort_unstable();
            s.dedup();
            eprintln!(
                "    {req:<32} {} ({} calls)",
                s.iter().map(u16::to_string).collect::<Vec<_>>().join(", "),
                statuses.len()
            );
        }
    }
}

#[test]
fn real_firecracker_contract() {
    let (fcs, jailer, from) = find_binaries();
    if fcs.is_empty() {
        return skip("no firecracker on PATH and no ../shared/firecracker/bin next to the repo");
    }
    if !is_root() {
        return skip("needs root (jailer, TAP devices, a network namespace)");
    }
    let fx = match Fixture::new() {
        Ok(f) => f,
        Err(e) => return skip(&e),
    };
    eprintln!(
        "firecracker_contract: binaries from {from}: {:?}; jailer: {:?}",
        fcs, jailer
    );
    // One thread, so the network namespace below (per thread) holds every TAP device
    // and every Firecracker this test creates.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // SAFETY: unshare(2) with CLONE_NEWNET moves only this thread into a new, empty
    // network namespace; no memory is involved.
    let netns = unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0;
    if !netns {
        eprintln!(
            "!!! firecracker_contract: no private network namespace ({}): net=tap parts skipped",
            std::io::Error::last_os_error()
        );
    }
    api::journal_start();
    let mut failures = Vec::new();
    let mut journal: BTreeMap<String, BTreeMap<String, Vec<u16>>> = BTreeMap::new();
    let mut backends = Vec::new();
    rt.block_on(async {
        for fc in &fcs {
            let probe = match FirecrackerBackend::probe(fc.clone()) {
                Ok(b) => b,
                Err(e) => {
                    failures.push(format!("{}: {e}", fc.display()));
                    continue;
                }
            };
            for jailed in [false, true] {
                if jailed && jailer.is_none() {
                    eprintln!("!!! firecracker_contract: no jailer found: jailed cases skipped");
                    continue;
                }
                let backend = FirecrackerBackend::probe(fc.clone())
                    .unwrap()
                    .with_jailer(jailed.then(|| JailerConfig::new(jailer.clone().unwrap())));
                let label = format!(
                    "{} {}",
                    backend.version_text(),
                    if jailed { "jailed" } else { "unjailed" }
                );
                if std::env::var("BANDSOX_FC_CONTRACT_ONLY")
                    .is_ok_and(|only| !label.contains(&only))
                {
                    continue;
                }
                eprintln!("firecracker_contract: {label} ({})", fc.display());
                let case = Case {
                    fx: &fx,
                    backend,
                    label: label.clone(),
                    jailed,
                    net: netns,
                    reaper: Reaper::default(),
                };
                let t0 = Instant::now();
                for (what, r) in [
                    ("flow", case.flow().await),
                    ("killed mid-boot", case.killed_mid_boot().await),
                ] {
                    match r {
                        Ok(()) => eprintln!("  {label}: {what} ok"),
                        Err(e) => failures.push(format!("{label}: {what}: {e}")),
                    }
                }
                eprintln!("  {label}: done in {:?}", t0.elapsed());
                let calls = journal.entry(label).or_default();
                for c in api::journal_take() {
                    calls.entry(c.request).or_default().push(c.status);
                }
            }
            backends.push(probe);
        }
        if backends.len() > 1 {
            match cross_versions(&fx, &backends).await {
                Ok(()) => eprintln!("  cross-version snapshots ok"),
                Err(e) => failures.push(format!("cross-version: {e}")),
            }
            let calls = journal.entry("cross-version".into()).or_default();
            for c in api::journal_take() {
                calls.entry(c.request).or_default().push(c.status);
            }
        } else {
            eprintln!("!!! firecracker_contract: one binary only: cross-version checks skipped");
        }
    });
    summarize(&journal);
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
