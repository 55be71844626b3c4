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
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bandsox_agent::client::{AgentClient, ExecEvent};
use bandsox_agent::proto::{ExecSpec, ExitStatus, Program, Request};
use bandsox_fsd::guest::{build_guest, GuestBuildOptions};
use bandsox_fsd::vmm::firecracker::{adopt_dir, FirecrackerBackend};
use bandsox_fsd::vmm::{Backend, NetMode, VmSpec, VmmError, VmmInstance};

const KERNEL_ROOT: &str = "/var/cache/bandsox/kernel";
const BUSYBOX: &str = "/var/cache/bandsox/busybox/bin/busybox";
const AGENT_DEADLINE: Duration = Duration::from_secs(60);

/// SIGKILLs the Firecracker if the test panics before its own `kill`.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.0) {
            // SAFETY: kill(2) on the pid of the Firecracker this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn skip(why: &str) {
    eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("!!! SKIPPED firecracker_boot: {why}");
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(name).is_file())
}

fn static_agent() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = repo.join("target/x86_64-unknown-linux-gnu/release/bandsox-agent");
    if !bin.is_file() {
        let st = Command::new(repo.join("agent/build-static.sh"))
            .status()
            .expect("run agent/build-static.sh");
        assert!(st.success(), "agent/build-static.sh failed");
    }
    bin
}

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

async fn run(client: &AgentClient, script: &str) -> (String, ExitStatus) {
    let spec = ExecSpec {
        program: Program::Script(script.as_bytes().to_vec()),
        env: Vec::new(),
        cwd: None,
        stdin: false,
    };
    let mut h = client
        .exec(spec, Duration::from_secs(10))
        .await
        .expect("exec");
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, h.next()).await {
            Ok(Some(ExecEvent::Output(_, b))) => out.extend(b),
            Ok(Some(ExecEvent::Exited(st))) => {
                return (String::from_utf8_lossy(&out).into_owned(), st)
            }
            Ok(Some(ExecEvent::Lost)) | Ok(None) => panic!("connection lost during {script:?}"),
            Err(_) => panic!("{script:?} did not finish"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_exec_pause_resume_stop_start_delete() {
    let backend = match FirecrackerBackend::detect() {
        Ok(b) => b,
        Err(e) => {
            return skip(&format!(
                "firecracker not on PATH or not usable here ({e}); install Firecracker ≥ 1.8 \
                 on a host with hardware KVM"
            ))
        }
    };
    if !Path::new(KERNEL_ROOT).join("boot").is_dir() || !Path::new(BUSYBOX).is_file() {
        return skip("no extracted kernel/busybox in /var/cache/bandsox");
    }
    if !on_path("mkfs.ext4") {
        return skip("mkfs.ext4 (e2fsprogs) is not installed");
    }
    eprintln!("firecracker_boot: {}", backend.describe());
    let tmp = tempfile::Builder::new()
        .prefix("bx")
        .tempdir_in("/tmp")
        .unwrap();
    let art = build_guest(&GuestBuildOptions {
        state_dir: tmp.path().join("s"),
        agent: static_agent(),
        kernel_root: KERNEL_ROOT.into(),
        busybox: Some(BUSYBOX.into()),
        force: false,
    })
    .expect("guest build");
    let dir = tmp.path().join("vm");
    std::fs::create_dir(&dir).unwrap();
    let disk = dir.join("disk.ext4");
    bandsox_fsd::disk::clone_disk(&art.base_image, &disk).unwrap();
    let spec = VmSpec {
        name: "fctest".into(),
        dir: dir.clone(),
        vcpus: 1,
        memory_mib: 256,
        disk: Some(disk),
        kernel: art.kernel.clone(),
        initrd: art.initrd.clone(),
        net: NetMode::None,
    };

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
