//! Boots a real VM through the Firecracker backend: guest artefacts built from the real
//! kernel tree, busybox and the static agent (the bzImage is turned into an ELF vmlinux
//! by the backend), then launch → agent handshake over hybrid vsock → ping and a command
//! → pause → resume → a command → stop (agent poweroff; Firecracker exits) → start again
//! on the same directory and disk (the file written before is still there) → delete.
//!
//! Needs `firecracker` ≥ 1.8 on PATH (or `$BANDSOX_FIRECRACKER`) and KVM that runs
//! ordinary guests, plus what `qemu_boot` needs to build the guest (mkfs.ext4,
//! /var/cache/bandsox/{kernel,busybox}). Without them it prints a loud SKIPPED line to
//! stderr and passes.
mod vmboot;

use vmboot::{guest_vm, missing_guest_inputs, run, skip, KillOnDrop};

use std::path::Path;
use std::time::{Duration, Instant};

use bandsox_agent::client::AgentClient;
use bandsox_agent::proto::{ExitStatus, Request};
use bandsox_fsd::vmm::firecracker::{adopt_dir, FirecrackerBackend};
use bandsox_fsd::vmm::{Backend, VmmError, VmmInstance};

const AGENT_DEADLINE: Duration = Duration::from_secs(60);

fn logs(dir: &Path) -> String {
    ["console.log", "vmm.log", "firecracker.log"]
        .iter()
        .map(|f| {
            format!(
                "--- {f}:\n{}",
                std::fs::read_to_string(dir.join(f)).unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Connect and handshake, retrying while the guest boots.
async fn agent(inst: &dyn VmmInstance, dir: &Path) -> AgentClient {
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < AGENT_DEADLINE {
        assert!(inst.is_alive(), "Firecracker exited; {}", logs(dir));
        match inst.connect_agent().await {
            Ok(s) => match AgentClient::connect(s, Duration::from_secs(3)).await {
                Ok((c, info)) => {
                    eprintln!(
                        "firecracker_boot: agent {} on {} after {:?}",
                        info.agent_version,
                        info.kernel,
                        t0.elapsed()
                    );
                    return c;
                }
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no agent within {AGENT_DEADLINE:?} ({last}); {}", logs(dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_exec_pause_resume_stop_start_delete() {
    let backend = match FirecrackerBackend::detect(&bandsox_fsd::settings::Settings::from_env().vmm)
    {
        Ok(b) => b,
        Err(e) => {
            return skip(
                "firecracker_boot",
                &format!(
                    "firecracker not on PATH or not usable here ({e}); install Firecracker ≥ 1.8 \
                 on a host with hardware KVM"
                ),
                None,
            )
        }
    };
    if let Some(why) = missing_guest_inputs() {
        return skip("firecracker_boot", why, None);
    }
    eprintln!("firecracker_boot: {}", backend.describe());
    let tmp = tempfile::Builder::new()
        .prefix("bx")
        .tempdir_in("/tmp")
        .unwrap();
    let (spec, _art) = guest_vm(tmp.path(), "fctest");
    let dir = spec.dir.clone();

    // Boot.
    let t0 = Instant::now();
    let inst = backend.launch(&spec).await.expect("launch");
    let _guard = KillOnDrop(inst.pid());
    eprintln!("firecracker_boot: InstanceStart after {:?}", t0.elapsed());
    let client = agent(inst.as_ref(), &dir).await;
    eprintln!("firecracker_boot: boot to agent {:?}", t0.elapsed());
    client.ping(Duration::from_secs(5)).await.expect("ping");
    let (out, st) = run(
        &client,
        "grep ' / ' /proc/mounts; echo kept > /root/mark; sync",
    )
    .await;
    assert_eq!(st, ExitStatus::Code(0), "{out}");
    assert!(
        out.contains("/dev/vda / ext4"),
        "root is not the disk: {out}"
    );

    // Pause / resume through PATCH /vm. A paused guest does not answer.
    inst.pause().await.expect("pause");
    assert!(client.ping(Duration::from_millis(500)).await.is_err());
    inst.resume().await.expect("resume");
    // The old connection may stall after resume on some versions: reconnect if needed.
    let client = match client.ping(Duration::from_secs(5)).await {
        Ok(_) => client,
        Err(e) => {
            eprintln!("firecracker_boot: reconnecting after resume ({e})");
            drop(client);
            agent(inst.as_ref(), &dir).await
        }
    };
    let (out, st) = run(&client, "cat /root/mark").await;
    assert_eq!((out.trim(), st), ("kept", ExitStatus::Code(0)));

    // Adopt from the directory.
    let adopted = adopt_dir(&dir).expect("adopt");
    assert_eq!(adopted.pid(), inst.pid());

    // Stop: the agent powers the guest off; with reboot=k Firecracker exits.
    let _ = client
        .request(Request::PowerOff, Duration::from_secs(10))
        .await;
    drop(client);
    if !inst.wait_exit(Duration::from_secs(20)).await {
        eprintln!("firecracker_boot: no exit after poweroff; sending Ctrl+Alt+Del");
        let _ = inst.request_shutdown().await;
        if !inst.wait_exit(Duration::from_secs(10)).await {
            inst.kill().await.expect("kill");
        }
    }
    assert!(!inst.is_alive());
    assert!(matches!(inst.pause().await, Err(VmmError::NotRunning)));
    assert!(backend.adopt(&spec).await.unwrap().is_none());

    // Start again on the same directory and disk.
    let inst = backend.launch(&spec).await.expect("second launch");
    let _guard2 = KillOnDrop(inst.pid());
    let client = agent(inst.as_ref(), &dir).await;
    let (out, st) = run(&client, "cat /root/mark").await;
    assert_eq!(
        (out.trim(), st),
        ("kept", ExitStatus::Code(0)),
        "disk survived"
    );
    drop(client);

    // Delete: kill and remove the directory; nothing is left running.
    let pid = inst.pid();
    inst.kill().await.expect("kill");
    inst.kill().await.expect("kill again");
    assert!(std::fs::read_to_string(format!("/proc/{pid}/stat")).is_err());
    for f in [
        "firecracker.json",
        "console.log",
        "vmm.log",
        "firecracker.log",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    std::fs::remove_dir_all(&dir).expect("delete the VM directory");
}
