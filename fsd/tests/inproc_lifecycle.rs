//! VM lifecycle without root, a mount or a VM (the in-process backend of `inproc/`):
//! `destroy-all` (counts, ownership, a VM still booting), `ttl` (expiry, snapshot
//! failure, across a daemon restart, set through ctl), `idle_pause` (never with a live
//! run), `autoresume` (exec and ctl resume a paused VM; `autoresume=0` keeps EHOSTDOWN)
//! and `kernel=`. Time is passed to the reaper (`lifecycle_tick(now)`), never waited
//! for, so nothing here depends on the machine's speed.
mod inproc;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bandsox_agent::faults::{Fault, Faults};
use bandsox_fsd::manager::ctl;
use bandsox_fsd::manager::vm::{Vm, VmState};
use bandsox_fsd::manager::Manager;
use inproc::InProcBackend;

/// One root `ctl` line as `uid`/`gid`, parsed and dispatched as the tree does.
async fn global_ctl(
    mgr: &Arc<Manager>,
    line: &str,
    uid: u32,
    gid: u32,
) -> bandsox_fsd::error::Result<String> {
    mgr.execute(ctl::parse(&ctl::Target::Root, line)?, uid, gid)
        .await
}

/// One `<vm>/ctl` line, parsed and dispatched as the tree does.
async fn vm_ctl(
    mgr: &Arc<Manager>,
    vm: &Arc<Vm>,
    line: &str,
) -> bandsox_fsd::error::Result<String> {
    mgr.execute(ctl::parse(&ctl::Target::Vm(vm.clone()), line)?, 0, 0)
        .await
}

/// Deadline of any single wait in these tests (nothing may hang).
const T: Duration = Duration::from_secs(30);

fn ids() -> (u32, u32) {
    (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    )
}

fn setup() -> (tempfile::TempDir, Arc<Manager>, Arc<InProcBackend>) {
    let tmp = tempfile::tempdir().unwrap();
    let backend = InProcBackend::new();
    let mgr = inproc::manager(&tmp.path().join("state"), backend.clone());
    (tmp, mgr, backend)
}

async fn create(mgr: &Arc<Manager>, name: &str, opts: &[&str]) -> Arc<Vm> {
    create_as(mgr, name, opts, ids().0).await
}

async fn create_as(mgr: &Arc<Manager>, name: &str, opts: &[&str], uid: u32) -> Arc<Vm> {
    let opts: Vec<String> = opts.iter().map(|s| s.to_string()).collect();
    tokio::time::timeout(T, mgr.create(name, &opts, uid, ids().1))
        .await
        .expect("create in time")
        .expect("create")
}

/// One reaper pass at `now`, waited for.
async fn tick(mgr: &Arc<Manager>, now: SystemTime) {
    for t in mgr.lifecycle_tick(now).await {
        tokio::time::timeout(T, t)
            .await
            .expect("reaper task in time")
            .unwrap();
    }
}

fn events(mgr: &Manager) -> String {
    std::fs::read_to_string(mgr.layout.events()).unwrap()
}

fn later(secs: u64) -> SystemTime {
    SystemTime::now() + Duration::from_secs(secs)
}

fn info(vm: &Vm) -> serde_json::Value {
    serde_json::from_str(&vm.info_json()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_all_removes_the_callers_vms_and_counts_them() {
    let (_tmp, mgr, backend) = setup();
    let (uid, _) = ids();
    let other = uid + 1000;
    for n in ["a", "b", "c"] {
        create(&mgr, n, &[]).await;
    }
    let theirs = create_as(&mgr, "theirs", &[], other).await;
    let dirs: Vec<_> = mgr.list().iter().map(|v| v.dir.clone()).collect();

    if uid != 0 {
        let e = global_ctl(&mgr, "destroy-all all-users", uid, 0).await;
        assert_eq!(e.unwrap_err().errno, libc::EPERM);
        assert_eq!(mgr.list().len(), 4, "a refused destroy-all removes nothing");
    }
    let e = global_ctl(&mgr, "destroy-all now", uid, 0)
        .await
        .unwrap_err();
    assert_eq!(e.errno, libc::EINVAL);

    let out = global_ctl(&mgr, "destroy-all", uid, 0).await.unwrap();
    assert_eq!(out, "ok: destroyed 3 of your VMs");
    let left: Vec<String> = mgr.list().iter().map(|v| v.name.clone()).collect();
    assert_eq!(left, ["theirs"]);
    for d in &dirs {
        if *d != theirs.dir {
            assert!(!backend.alive(d), "no VMM is left behind");
            assert!(!d.exists(), "the VM's directory is gone");
        }
    }
    assert!(events(&mgr).contains("destroy-all removed=3 failed=0"));

    // Nothing left of the caller's: zero, not an error.
    let out = mgr.destroy_all(uid, false).await.unwrap();
    assert_eq!(out, "ok: destroyed 0 of your VMs");
    let out = mgr.destroy_all(0, true).await.unwrap();
    assert_eq!(out, "ok: destroyed 1 of all users' VMs");
    assert!(mgr.list().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_all_waits_for_a_vm_still_booting_and_leaves_no_vmm() {
    let (_tmp, mgr, backend) = setup();
    create(&mgr, "up", &[]).await;
    // The next VM's agent answers slowly: it stays `booting` for a while.
    *backend.faults.next.lock().unwrap() = Some(Faults {
        read: Fault::Delay(Duration::from_millis(150)),
        write: Fault::Delay(Duration::from_millis(150)),
    });
    let m = mgr.clone();
    let booting = tokio::spawn(async move {
        let (uid, gid) = ids();
        m.create("slow", &[], uid, gid).await
    });
    let slow = tokio::time::timeout(T, async {
        loop {
            if let Some(vm) = mgr.get("slow") {
                if vm.state() == VmState::Booting {
                    return vm;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the VM is seen booting");
    let out = tokio::time::timeout(T, mgr.destroy_all(ids().0, false))
        .await
        .expect("destroy-all in time")
        .unwrap();
    assert_eq!(out, "ok: destroyed 2 of your VMs");
    assert!(mgr.list().is_empty());
    assert!(!backend.alive(&slow.dir), "the booting VM's VMM was ended");
    // Its create ended one way or the other, and left nothing behind.
    let _ = tokio::time::timeout(T, booting)
        .await
        .expect("create ended");
    assert!(mgr.list().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_destroys_the_vm_when_it_runs_out() {
    let (_tmp, mgr, backend) = setup();
    let vm = create(&mgr, "t", &["ttl=5"]).await;
    let i = info(&vm);
    let left = i["ttl_remaining_s"].as_u64().unwrap();
    assert!((4..=5).contains(&left), "{i}");
    assert_eq!(i["ttl_action"], "destroy");
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vm.dir.join("vm.json")).unwrap()).unwrap();
    assert!(rec["ttl_deadline"].as_u64().is_some(), "kept in vm.json");

    tick(&mgr, later(2)).await;
    assert!(mgr.get("t").is_some(), "not yet");
    tick(&mgr, later(6)).await;
    assert!(mgr.get("t").is_none(), "expired");
    assert!(!backend.alive(&vm.dir));
    assert!(events(&mgr).contains("ttl-expired action=destroy"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_snapshot_that_fails_keeps_the_vm() {
    let (_tmp, mgr, _backend) = setup();
    // The in-process backend cannot snapshot: the VM must survive its ttl.
    create(&mgr, "s", &["ttl=1", "ttl_action=snapshot"]).await;
    tick(&mgr, later(5)).await;
    let vm = mgr.get("s").expect("kept");
    assert!(events(&mgr).contains("ttl-expired action=snapshot failed:"));
    assert_eq!(vm.ttl_remaining(later(100)), None, "not retried in a loop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_survives_a_daemon_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let backend = InProcBackend::new();
    let first = inproc::manager(&state, backend.clone());
    let vm = create(&first, "r", &["ttl=30"]).await;
    let dir = vm.dir.clone();
    drop(vm);
    drop(first);
    let second = inproc::manager(&state, backend.clone());
    second.reload().await;
    let vm = second.get("r").expect("reloaded");
    let left = vm.ttl_remaining(SystemTime::now()).unwrap();
    assert!(
        (25..=30).contains(&left),
        "the deadline is kept, not restarted: {left}"
    );
    vm.wait_adopted().await.unwrap();
    tick(&second, later(31)).await;
    assert!(second.get("r").is_none());
    assert!(!backend.alive(&dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_is_set_and_cleared_through_ctl_and_bad_values_are_einval() {
    let (_tmp, mgr, _backend) = setup();
    let (uid, gid) = ids();
    for bad in ["ttl=0", "ttl=abc", "ttl=-3", "ttl=1.5"] {
        let e = mgr
            .create("x", &[bad.to_string()], uid, gid)
            .await
            .err()
            .expect("refused");
        assert_eq!(e.errno, libc::EINVAL, "{bad}");
        assert!(e.message.starts_with("ttl="), "{}", e.message);
    }
    assert!(mgr.get("x").is_none());
    let vm = create(&mgr, "x", &[]).await;
    assert_eq!(info(&vm)["ttl_remaining_s"], serde_json::Value::Null);
    assert_eq!(vm_ctl(&mgr, &vm, "ttl=100").await.unwrap(), "ok: ttl=100");
    let left = info(&vm)["ttl_remaining_s"].as_u64().unwrap();
    assert!((99..=100).contains(&left));
    let e = vm_ctl(&mgr, &vm, "ttl=0").await.unwrap_err();
    assert_eq!(e.errno, libc::EINVAL);
    vm_ctl(&mgr, &vm, "ttl=none").await.unwrap();
    tick(&mgr, later(1000)).await;
    assert!(mgr.get("x").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pause_pauses_an_idle_vm_but_never_one_with_a_live_run() {
    let (_tmp, mgr, _backend) = setup();
    let vm = create(&mgr, "i", &["idle_pause=10"]).await;
    tick(&mgr, later(5)).await;
    assert_eq!(vm.state(), VmState::Running, "not idle long enough");

    let run = vm.start_run(b"sleep 30".to_vec(), 0).await.unwrap();
    tick(&mgr, later(100)).await;
    assert_eq!(vm.state(), VmState::Running, "a live run keeps it running");
    run.signal(libc::SIGKILL).await.unwrap();
    tokio::time::timeout(T, run.wait_finished()).await.unwrap();
    assert!(!run.status().is_running());

    tick(&mgr, later(100)).await;
    assert_eq!(vm.state(), VmState::Paused);
    assert!(events(&mgr).contains("paused reason=idle"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_vm_resumes_for_an_exec_and_a_ctl_command() {
    let (_tmp, mgr, _backend) = setup();
    let vm = create(&mgr, "p", &[]).await;
    assert_eq!(info(&vm)["autoresume"], true);
    vm_ctl(&mgr, &vm, "pause").await.unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    assert!(events(&mgr).contains("paused reason=ctl"));
    vm.require_running_or_adopting()
        .expect("an exec may open a paused VM's exec");
    let run = vm.start_run(b"echo hi".to_vec(), 0).await.unwrap();
    tokio::time::timeout(T, run.wait_finished()).await.unwrap();
    assert_eq!(vm.state(), VmState::Running);
    assert!(events(&mgr).contains("resumed reason=exec"));

    vm_ctl(&mgr, &vm, "pause").await.unwrap();
    let out = vm_ctl(&mgr, &vm, "ping").await.unwrap();
    assert!(out.starts_with("ok: ping"), "{out}");
    assert!(events(&mgr).contains("resumed reason=ctl"));
    assert_eq!(vm.state(), VmState::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoresume_0_keeps_a_paused_vm_paused() {
    let (_tmp, mgr, _backend) = setup();
    let vm = create(&mgr, "q", &["autoresume=0"]).await;
    vm_ctl(&mgr, &vm, "pause").await.unwrap();
    let e = vm
        .start_run(b"echo hi".to_vec(), 0)
        .await
        .err()
        .expect("refused");
    assert_eq!(e.errno, libc::EHOSTDOWN);
    let e = vm_ctl(&mgr, &vm, "ping").await.unwrap_err();
    assert_eq!(e.errno, libc::EHOSTDOWN);
    assert_eq!(vm.state(), VmState::Paused);
    // Switched on later through ctl.
    vm_ctl(&mgr, &vm, "autoresume=1").await.unwrap();
    let run = vm.start_run(b"true".to_vec(), 0).await.unwrap();
    tokio::time::timeout(T, run.wait_finished()).await.unwrap();
    assert_eq!(vm.state(), VmState::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_names_an_installed_kernel_or_is_einval() {
    let (tmp, mgr, _backend) = setup();
    let (uid, gid) = ids();
    let boot = tmp.path().join("state/boot");
    let e = mgr
        .create("k", &["kernel=nope".to_string()], uid, gid)
        .await
        .err()
        .expect("refused");
    assert_eq!(e.errno, libc::EINVAL);
    assert!(
        e.message.contains("kernel=nope: not installed"),
        "{}",
        e.message
    );
    std::fs::write(boot.join("vmlinuz-k2"), b"kernel").unwrap();
    // A kernel without its initramfs is not installed.
    assert!(mgr.kernels().iter().all(|k| k != "k2"));
    std::fs::write(boot.join("initrd-k2"), b"initrd").unwrap();
    assert!(mgr.kernels().iter().any(|k| k == "k2"));
    let vm = create(&mgr, "k", &["kernel=k2"]).await;
    assert_eq!(info(&vm)["kernel"], "k2");
    assert_eq!(vm.spec().unwrap().kernel, boot.join("vmlinuz-k2"));
    assert_eq!(vm.spec().unwrap().initrd, boot.join("initrd-k2"));
    let e = global_ctl(&mgr, "clone snap c kernel=../x", uid, gid).await;
    assert_eq!(e.unwrap_err().errno, libc::EINVAL);
}
