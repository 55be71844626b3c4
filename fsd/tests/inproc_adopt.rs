//! Adoption after a daemon restart, without root, a mount or a VM: a second manager over
//! the same state directory and in-process backend (`inproc/mod.rs`) is the restarted
//! daemon. What is asserted is what a user would see: `reload` (the mount) never waits
//! for a guest, a VM is `adopting` until its adoption is done, requests wait for the
//! outcome, silent guests end `failed` with a reason (all at once, not one after
//! another), a clone caught mid-restore is ended, one caught before its identity step
//! finishes it, and `start` of a failed VM first ends the VMM it left.
mod inproc;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bandsox_agent::faults::{Fault, Faults};
use bandsox_fsd::manager::runs::RunStatus;
use bandsox_fsd::manager::vm::{Vm, VmState, ADOPT_AGENT_DEADLINE};
use bandsox_fsd::manager::Manager;
use inproc::InProcBackend;

/// Deadline of any single wait in these tests (nothing may hang).
const T: Duration = Duration::from_secs(60);

fn ids() -> (u32, u32) {
    (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    )
}

/// A manager with VMs `names`, all running.
async fn daemon_with(names: &[&str]) -> (tempfile::TempDir, Arc<Manager>, Arc<InProcBackend>) {
    inproc::limits_from_an_empty_file();
    let tmp = tempfile::tempdir().unwrap();
    let backend = InProcBackend::new();
    let mgr = inproc::manager(&tmp.path().join("state"), backend.clone());
    let (uid, gid) = ids();
    for n in names {
        tokio::time::timeout(T, mgr.create(n, &[], uid, gid))
            .await
            .expect("create in time")
            .expect("create");
    }
    (tmp, mgr, backend)
}

/// The daemon dies and a new one starts over the same state (its VMs live on); returns
/// once `reload` returned, with how long that took.
async fn restart(
    tmp: &Path,
    old: Arc<Manager>,
    backend: &Arc<InProcBackend>,
) -> (Arc<Manager>, Duration) {
    drop(old);
    let mgr = inproc::manager(&tmp.join("state"), backend.clone());
    let t0 = Instant::now();
    mgr.reload().await;
    (mgr, t0.elapsed())
}

/// Rewrite the `phase` of VM `vm`'s record, as a daemon that died in that phase left it.
fn set_phase(vm: &Vm, phase: &str) {
    let path = vm.dir.join("vm.json");
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    rec["phase"] = serde_json::Value::String(phase.into());
    std::fs::write(&path, serde_json::to_vec(&rec).unwrap()).unwrap();
}

fn phase_on_disk(vm: &Vm) -> String {
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vm.dir.join("vm.json")).unwrap()).unwrap();
    rec["phase"].as_str().unwrap_or("").to_string()
}

async fn adopted(vm: &Vm) -> VmState {
    tokio::time::timeout(T, vm.wait_adopted())
        .await
        .expect("the adoption ended in time")
        .expect("waited without timing out");
    vm.state()
}

fn events(mgr: &Manager) -> String {
    std::fs::read_to_string(mgr.layout.events()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_guests_never_hold_the_restart_and_end_failed_together() {
    let names = ["s1", "s2", "s3"];
    let (tmp, mgr, backend) = daemon_with(&names).await;
    // From now on no guest answers a new connection.
    *backend.faults.next.lock().unwrap() = Some(Faults::write(Fault::DropFrom { at: 0 }));
    let (mgr, took) = restart(tmp.path(), mgr, &backend).await;
    // Loose bound: a reload that waited for one guest would take ADOPT_AGENT_DEADLINE.
    assert!(took < Duration::from_secs(5), "reload took {took:?}");
    let vms: Vec<Arc<Vm>> = names.iter().map(|n| mgr.get(n).unwrap()).collect();
    for vm in &vms {
        assert_eq!(vm.state(), VmState::Adopting, "{}", vm.name);
        assert_eq!(vm.state().render(), "adopting");
    }
    // A request for an adopting VM waits for the outcome and fails with it.
    let exec = {
        let vm = vms[0].clone();
        tokio::spawn(async move { vm.start_run(b"echo never".to_vec(), 0).await })
    };
    let t0 = Instant::now();
    for vm in &vms {
        match adopted(vm).await {
            VmState::Failed(why) => {
                assert!(why.contains("the agent did not answer"), "{why}");
                assert!(why.contains("adopted its VMM"), "{why}");
            }
            other => panic!("{} ended {other:?}", vm.name),
        }
    }
    // Concurrent: one after another would take three agent deadlines.
    let all = t0.elapsed() + took;
    assert!(all < 2 * ADOPT_AGENT_DEADLINE, "adoptions took {all:?}");
    let err = tokio::time::timeout(T, exec)
        .await
        .expect("the exec ended in time")
        .unwrap()
        .err()
        .expect("an exec on a VM whose adoption failed fails");
    assert_eq!(err.errno, libc::EHOSTDOWN, "{err}");
    assert!(err.message.contains("failed"), "{err}");
    // The VMMs were left running (the guests may be busy, not gone) ...
    for vm in &vms {
        assert!(backend.alive(&vm.dir), "{}'s VMM was ended", vm.name);
    }
    // ... and `start` ends the leftover one before it boots anew.
    *backend.faults.next.lock().unwrap() = None;
    let vm = &vms[1];
    tokio::time::timeout(T, vm.start(T))
        .await
        .expect("start in time")
        .expect("start of a failed VM with a leftover VMM");
    assert_eq!(vm.state(), VmState::Running);
    let ev = events(&mgr);
    assert!(
        ev.lines()
            .any(|l| l.contains(" s2 killed ") && l.contains("leftover VMM")),
        "{ev}"
    );
    let run = vm.start_run(b"echo back".to_vec(), 0).await.unwrap();
    tokio::time::timeout(T, run.wait_finished()).await.unwrap();
    assert!(matches!(run.status(), RunStatus::Exited(_)));
    for n in names {
        mgr.delete(n).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_caught_restoring_has_its_vmm_ended_and_fails_with_the_reason() {
    let (tmp, mgr, backend) = daemon_with(&["r"]).await;
    set_phase(&mgr.get("r").unwrap(), "restoring");
    let (mgr, _) = restart(tmp.path(), mgr, &backend).await;
    let vm = mgr.get("r").unwrap();
    match adopted(&vm).await {
        VmState::Failed(why) => {
            assert!(why.contains("being restored from its snapshot"), "{why}");
            assert!(why.contains("was ended"), "{why}");
        }
        other => panic!("ended {other:?}"),
    }
    assert!(!backend.alive(&vm.dir), "the half-restored VMM still runs");
    assert_eq!(phase_on_disk(&vm), "failed");
    // A later daemon shows it stopped (nothing is left to adopt).
    let (mgr, _) = restart(tmp.path(), mgr, &backend).await;
    let vm = mgr.get("r").unwrap();
    assert_eq!(adopted(&vm).await, VmState::Stopped);
    mgr.delete("r").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_caught_before_its_identity_step_finishes_it_and_requests_wait() {
    let (tmp, mgr, backend) = daemon_with(&["i"]).await;
    set_phase(&mgr.get("i").unwrap(), "identity-pending");
    // A slow guest: the adoption takes seconds, so the request below meets it.
    *backend.faults.next.lock().unwrap() =
        Some(Faults::read(Fault::Delay(Duration::from_millis(700))));
    let (mgr, _) = restart(tmp.path(), mgr, &backend).await;
    let vm = mgr.get("i").unwrap();
    assert_eq!(vm.state(), VmState::Adopting);
    // Started while adopting: waits, then runs.
    let run = tokio::time::timeout(T, vm.start_run(b"echo after".to_vec(), 0))
        .await
        .expect("exec in time")
        .expect("exec waits for the adoption, then runs");
    assert_eq!(vm.state(), VmState::Running);
    tokio::time::timeout(T, run.wait_finished()).await.unwrap();
    assert!(matches!(run.status(), RunStatus::Exited(_)));
    assert_eq!(phase_on_disk(&vm), "started");
    let ev = events(&mgr);
    assert!(
        ev.lines()
            .any(|l| l.contains(" i adopted ") && l.contains("identity step was finished")),
        "{ev}"
    );
    *backend.faults.next.lock().unwrap() = None;
    mgr.delete("i").await.unwrap();
}
