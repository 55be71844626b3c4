//! A reference model of the VM tree's control operations, checked with proptest against
//! the real manager over the in-process backend (no root, no mount, no VM): random
//! sequences of create, delete, pause, resume and exec on a few names must give the
//! answers (success or errno) and leave the states the model predicts, after every step.
mod inproc;

use std::collections::BTreeMap;
use std::time::Duration;

use bandsox_agent::proto::ExitStatus;
use bandsox_fsd::manager::runs::{RunStatus, RunStream};
use bandsox_fsd::manager::vm::VmState;
use proptest::prelude::*;

const NAMES: [&str; 3] = ["m0", "m1", "m2"];
const T: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
enum Op {
    Create(usize),
    Delete(usize),
    Pause(usize),
    Resume(usize),
    Exec(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let n = 0..NAMES.len();
    prop_oneof![
        n.clone().prop_map(Op::Create),
        n.clone().prop_map(Op::Delete),
        n.clone().prop_map(Op::Pause),
        n.clone().prop_map(Op::Resume),
        n.prop_map(Op::Exec),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum M {
    Running,
    Paused,
}

/// What the model says an operation answers: `Ok` or the errno.
fn expect(model: &BTreeMap<&'static str, M>, op: Op) -> Result<(), i32> {
    let st = |i: usize| model.get(NAMES[i]).copied();
    match op {
        Op::Create(i) => st(i).map_or(Ok(()), |_| Err(libc::EEXIST)),
        Op::Delete(i) => st(i).map_or(Err(libc::ENOENT), |_| Ok(())),
        Op::Pause(i) => match st(i) {
            None => Err(libc::ENOENT),
            Some(M::Running) => Ok(()),
            Some(M::Paused) => Err(libc::EBUSY),
        },
        Op::Resume(i) => match st(i) {
            None => Err(libc::ENOENT),
            Some(M::Paused) => Ok(()),
            Some(M::Running) => Err(libc::EBUSY),
        },
        Op::Exec(i) => match st(i) {
            None => Err(libc::ENOENT),
            Some(M::Running) => Ok(()),
            Some(M::Paused) => Err(libc::EHOSTDOWN),
        },
    }
}

fn apply(model: &mut BTreeMap<&'static str, M>, op: Op) {
    match op {
        Op::Create(i) => {
            model.insert(NAMES[i], M::Running);
        }
        Op::Delete(i) => {
            model.remove(NAMES[i]);
        }
        Op::Pause(i) => {
            model.insert(NAMES[i], M::Paused);
        }
        Op::Resume(i) => {
            model.insert(NAMES[i], M::Running);
        }
        Op::Exec(_) => {}
    }
}

async fn run_sequence(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().unwrap();
    let mgr = inproc::manager(&tmp.path().join("state"), inproc::InProcBackend::new());
    let (uid, gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let mut model: BTreeMap<&'static str, M> = BTreeMap::new();
    for (step, op) in ops.into_iter().enumerate() {
        let want = expect(&model, op);
        let vm = |i: usize| {
            mgr.get(NAMES[i])
                .ok_or_else(|| bandsox_fsd::error::Error::not_found("no VM"))
        };
        let got: Result<(), i32> = tokio::time::timeout(T, async {
            let r = match op {
                // autoresume=0: the model's paused VMs refuse exec (auto-resume has its
                // own tests, inproc_lifecycle).
                Op::Create(i) => mgr
                    .create(NAMES[i], &["autoresume=0".to_string()], uid, gid)
                    .await
                    .map(drop),
                Op::Delete(i) => mgr.delete(NAMES[i]).await,
                Op::Pause(i) => match vm(i) {
                    Ok(v) => v.pause().await,
                    Err(e) => Err(e),
                },
                Op::Resume(i) => match vm(i) {
                    Ok(v) => v.resume().await,
                    Err(e) => Err(e),
                },
                Op::Exec(i) => match vm(i) {
                    Ok(v) => match v.start_run(b"echo model".to_vec(), 0).await {
                        Ok(run) => {
                            run.wait_finished().await;
                            assert_eq!(run.status(), RunStatus::Exited(ExitStatus::Code(0)));
                            assert_eq!(run.read_at(RunStream::Stdout, 0, 100).unwrap(), b"model\n");
                            Ok(())
                        }
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                },
            };
            r.map_err(|e| e.errno)
        })
        .await
        .map_err(|_| TestCaseError::fail(format!("step {step}: {op:?} hung")))?;
        prop_assert_eq!(got, want, "step {}: {:?}", step, op);
        if got.is_ok() {
            apply(&mut model, op);
        }
        // The tree shows exactly the model's VMs, in the model's states.
        let mut names: Vec<String> = mgr.list().iter().map(|v| v.name.clone()).collect();
        names.sort();
        let want_names: Vec<String> = model.keys().map(|k| k.to_string()).collect();
        prop_assert_eq!(&names, &want_names, "step {}: {:?}", step, op);
        for (name, m) in &model {
            let state = mgr.get(name).unwrap().state();
            let want_state = match m {
                M::Running => VmState::Running,
                M::Paused => VmState::Paused,
            };
            prop_assert_eq!(state, want_state, "step {}: {:?} ({})", step, op, name);
        }
    }
    for name in model.keys() {
        let _ = mgr.delete(name).await;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn the_tree_follows_the_model(ops in proptest::collection::vec(op(), 1..14)) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run_sequence(ops))?;
    }
}
