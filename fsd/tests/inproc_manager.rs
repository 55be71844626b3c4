//! The manager without root, a mount or a VM: VMs of the in-process backend
//! (`inproc/mod.rs`: an agent served over an in-memory pipe) and their exec transaction,
//! with the agent channel damaged on purpose (`bandsox_agent::faults`). What is asserted
//! is what a user would see through the tree: the run's status and output, the errno of
//! a failed start, and that the VM recovers by itself.
mod inproc;

use std::sync::Arc;
use std::time::Duration;

use bandsox_agent::faults::{Fault, Faults};
use bandsox_agent::proto::ExitStatus;
use bandsox_fsd::ctl::VmCmd;
use bandsox_fsd::manager::ctl::Command;
use bandsox_fsd::manager::runs::{Run, RunStatus, RunStream};
use bandsox_fsd::manager::vm::Vm;
use bandsox_fsd::manager::Manager;
use inproc::InProcBackend;

/// Deadline of any single wait in these tests (nothing may hang).
const T: Duration = Duration::from_secs(30);

async fn setup(name: &str) -> (tempfile::TempDir, Arc<Manager>, Arc<InProcBackend>, Arc<Vm>) {
    let tmp = tempfile::tempdir().unwrap();
    let backend = InProcBackend::new();
    let mgr = inproc::manager(&tmp.path().join("state"), backend.clone());
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    let vm = tokio::time::timeout(T, mgr.create(name, &[], uid, gid))
        .await
        .expect("create in time")
        .expect("create");
    (tmp, mgr, backend, vm)
}

async fn finished(run: &Arc<Run>) -> RunStatus {
    tokio::time::timeout(T, run.wait_finished())
        .await
        .expect("the run ended in time");
    run.status()
}

fn stdout(run: &Run) -> Vec<u8> {
    run.read_at(RunStream::Stdout, 0, 1 << 20).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_and_keeps_its_output_and_status() {
    let (_tmp, mgr, _b, vm) = setup("a").await;
    let run = vm
        .start_run(b"echo hello; exit 3".to_vec(), 0)
        .await
        .unwrap();
    assert_eq!(finished(&run).await, RunStatus::Exited(ExitStatus::Code(3)));
    assert_eq!(stdout(&run), b"hello\n");
    assert_eq!(vm.last_run(0), Some(run_number(&vm)));
    mgr.delete("a").await.unwrap();
    assert!(mgr.get("a").is_none());
}

fn run_number(vm: &Vm) -> u64 {
    *vm.run_numbers().last().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_mid_run_marks_the_run_lost_and_the_next_exec_reconnects() {
    let (_tmp, mgr, backend, vm) = setup("b").await;
    let run = vm
        .start_run(b"head -c 2000000 /dev/zero; sleep 30".to_vec(), 0)
        .await
        .unwrap();
    // The channel breaks after 100 kB more from the agent.
    backend
        .faults
        .last()
        .arm(Faults::read(Fault::CloseAt { at: 100_000 }));
    match finished(&run).await {
        RunStatus::Lost(why) => assert!(!why.is_empty()),
        other => panic!("a run on a broken connection ended as {other:?}"),
    }
    // The VM still runs; the next exec gets a new connection by itself.
    let again = vm.start_run(b"echo back".to_vec(), 0).await.unwrap();
    assert_eq!(
        finished(&again).await,
        RunStatus::Exited(ExitStatus::Code(0))
    );
    assert_eq!(stdout(&again), b"back\n");
    mgr.delete("b").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_never_answers_fails_the_exec_with_an_errno_in_time() {
    let (_tmp, mgr, backend, vm) = setup("c").await;
    // Nothing the daemon sends arrives any more (a wedged channel).
    backend
        .faults
        .last()
        .arm(Faults::write(Fault::DropFrom { at: 0 }));
    // Later connections are wedged too, so a reconnect cannot rescue it.
    *backend.faults.next.lock().unwrap() = Some(Faults::write(Fault::DropFrom { at: 0 }));
    let t0 = std::time::Instant::now();
    let r = tokio::time::timeout(T, vm.start_run(b"echo never".to_vec(), 0))
        .await
        .expect("start_run returned in time");
    let err = r.err().expect("an exec nobody answers fails");
    assert!(err.errno > 0, "{err}");
    assert!(t0.elapsed() < T);
    // No run is left "running" for ever.
    for n in vm.run_numbers() {
        let status = vm.run(n).unwrap().status();
        assert!(!status.is_running(), "run {n} is {status:?}");
    }
    *backend.faults.next.lock().unwrap() = None;
    mgr.delete("c").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_frame_fails_requests_in_time_and_reconnect_restores_the_vm() {
    let (_tmp, mgr, backend, vm) = setup("d").await;
    // The next frame the agent sends gets a damaged length: the stream is out of step.
    backend
        .faults
        .last()
        .arm(Faults::read(Fault::CorruptAt { at: 0 }));
    // Requests on the damaged connection fail with an errno within the RPC deadline:
    // the first times out, and the client then ends the out-of-step connection (the
    // manager reconnects by itself); nothing hangs.
    for attempt in 0..2 {
        let t0 = std::time::Instant::now();
        if let Ok(run) = vm.start_run(b"echo first".to_vec(), 0).await {
            let _ = finished(&run).await;
        }
        assert!(
            t0.elapsed() < T,
            "attempt {attempt} took {:?}",
            t0.elapsed()
        );
    }
    // `echo reconnect > ctl` replaces the connection (whether or not the automatic
    // reconnect already did); the VM works again.
    let reconnect = Command::Vm(vm.clone(), VmCmd::Reconnect);
    mgr.execute(reconnect, 0, 0).await.unwrap();
    let run = vm.start_run(b"echo second".to_vec(), 0).await.unwrap();
    assert_eq!(finished(&run).await, RunStatus::Exited(ExitStatus::Code(0)));
    assert_eq!(stdout(&run), b"second\n");
    mgr.delete("d").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_channel_only_slows_the_exec() {
    let (_tmp, mgr, backend, vm) = setup("e").await;
    backend.faults.last().arm(Faults {
        read: Fault::Delay(Duration::from_millis(10)),
        write: Fault::Delay(Duration::from_millis(10)),
    });
    let run = vm.start_run(b"seq 1 2000".to_vec(), 0).await.unwrap();
    assert_eq!(finished(&run).await, RunStatus::Exited(ExitStatus::Code(0)));
    let out = stdout(&run);
    assert!(out.starts_with(b"1\n2\n") && out.ends_with(b"1999\n2000\n"));
    mgr.delete("e").await.unwrap();
}
