//! Boots a real VM through the QEMU backend: guest artefacts built from the real kernel
//! tree, busybox and the static agent, then launch → `bandsox-agent: ready` on the console
//! → agent handshake over virtio-serial → a command in the guest (on the disk root) →
//! pause/resume via QMP → adopt from the VM directory → kill, leaving no process.
//!
//! Prerequisites (installed by `mount-helpers/setup --deps-only`): qemu-system-x86_64,
//! mkfs.ext4, /var/cache/bandsox/{kernel,busybox}. Without them the test prints a loud
//! SKIP to stderr. The static agent is built with agent/build-static.sh if missing.
mod vmboot;

use vmboot::{guest_vm, missing_guest_inputs, on_path, run, skip, KillOnDrop};

use std::path::Path;
use std::time::{Duration, Instant};

use bandsox_agent::client::AgentClient;
use bandsox_agent::proto::{ExitStatus, Request};
use bandsox_fsd::vmm::qemu::{adopt_dir, QemuBackend};
use bandsox_fsd::vmm::{Backend, VmSpec, VmmError, VmmInstance};

const READY: &str = "bandsox-agent: ready";
const BOOT_DEADLINE: Duration = Duration::from_secs(60);

async fn wait_console(console: &Path, needle: &str, inst: &dyn VmmInstance) -> Duration {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if text.contains(needle) {
            return t0.elapsed();
        }
        if !inst.is_alive() {
            let log = console.with_file_name("vmm.log");
            panic!(
                "QEMU exited before {needle:?}; vmm.log:\n{}\nconsole:\n{text}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            t0.elapsed() < BOOT_DEADLINE,
            "no {needle:?} within {BOOT_DEADLINE:?}; console:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_pause_resume_kill() {
    let hint = Some("run mount-helpers/setup --deps-only (as root) to install it");
    if !on_path("qemu-system-x86_64") {
        return skip("qemu_boot", "qemu-system-x86_64 is not installed", hint);
    }
    if let Some(why) = missing_guest_inputs() {
        return skip("qemu_boot", why, hint);
    }

    let tmp = tempfile::Builder::new()
        .prefix("bx")
        .tempdir_in("/tmp")
        .unwrap();
    let t0 = Instant::now();
    let (spec, art) = guest_vm(tmp.path(), "boottest");
    eprintln!(
        "qemu_boot: guest artefacts for {} built in {:?}",
        art.kernel_version,
        t0.elapsed()
    );
    let dir = spec.dir.clone();
    let backend = QemuBackend::detect(&bandsox_fsd::settings::Settings::from_env().vmm)
        .expect("qemu backend");
    eprintln!("qemu_boot: {}", backend.describe());

    let t0 = Instant::now();
    let inst = backend.launch(&spec).await.expect("launch");
    let qmp_up = t0.elapsed();
    let pid = inst.pid();
    let _guard = KillOnDrop(pid);
    let ready = wait_console(&spec.console_path(), READY, inst.as_ref()).await + qmp_up;
    eprintln!(
        "qemu_boot: QMP up after {qmp_up:?}, `{READY}` after {ready:?} (launch to console line)"
    );

    // The agent answers over virtio-serial, and the guest runs on the disk root.
    let stream = inst.connect_agent().await.expect("agent socket");
    let (client, info) = AgentClient::connect(stream, Duration::from_secs(10))
        .await
        .expect("agent handshake");
    eprintln!(
        "qemu_boot: agent {} on kernel {}, hostname {}, handshake {:?} after launch",
        info.agent_version,
        info.kernel,
        info.hostname,
        t0.elapsed()
    );
    assert_eq!(info.kernel, art.kernel_version);
    let (out, st) = run(&client, "grep ' / ' /proc/mounts; ls /bin/busybox; id -u").await;
    assert_eq!(st, ExitStatus::Code(0), "{out}");
    assert!(
        out.contains("/dev/vda / ext4"),
        "root is not the disk: {out}"
    );
    assert!(out.trim_end().ends_with("\n0"), "{out}");

    // Pause / resume through QMP; the agent works again afterwards.
    inst.pause().await.expect("pause");
    inst.pause().await.expect("pause twice is fine");
    assert!(
        client.ping(Duration::from_millis(500)).await.is_err(),
        "a paused guest must not answer"
    );
    inst.resume().await.expect("resume");
    client
        .ping(Duration::from_secs(10))
        .await
        .expect("ping after resume");

    // Adopt from the directory alone: vmm.pid (QEMU's) + exact argv match.
    let adopted = adopt_dir(&dir).expect("adopt the running QEMU");
    assert_eq!(adopted.pid(), pid);
    adopted
        .pause()
        .await
        .expect("pause through a second QMP connection");
    adopted.resume().await.expect("resume");
    let again = backend.adopt(&spec).await.expect("adopt").expect("some");
    assert!(again.is_alive());
    drop(client);

    // QMP errors carry QEMU's description.
    match adopted
        .qmp_execute("no-such-command", None, Duration::from_secs(5))
        .await
    {
        Err(VmmError::Refused { op, message }) => {
            assert_eq!(op, "no-such-command");
            assert!(message.contains("no-such-command"), "{message}");
        }
        other => panic!("expected Refused, got {other:?}"),
    }

    // Kill: idempotent, reaped, nothing left.
    inst.kill().await.expect("kill");
    inst.kill().await.expect("kill again");
    assert!(!inst.is_alive());
    assert!(!adopted.is_alive());
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(stat.is_empty(), "QEMU {pid} still present: {stat}");
    assert!(matches!(inst.pause().await, Err(VmmError::NotRunning)));
    assert!(backend.adopt(&spec).await.unwrap().is_none());
    assert!(!dir.join("vmm.pid").exists(), "stale vmm.pid left behind");
    for f in ["qemu.args.json", "console.log", "vmm.log"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }

    // A second VM without a disk (the agent stays in the initramfs) that powers itself
    // off: QEMU exits on its own and is reaped, not left a zombie.
    let dir2 = tmp.path().join("vm2");
    std::fs::create_dir(&dir2).unwrap();
    let spec2 = VmSpec {
        name: "nodisk".into(),
        dir: dir2.clone(),
        disk: None,
        ..spec.clone()
    };
    let inst2 = backend.launch(&spec2).await.expect("launch without disk");
    let _guard2 = KillOnDrop(inst2.pid());
    wait_console(&spec2.console_path(), READY, inst2.as_ref()).await;
    let (client2, _) = AgentClient::connect(
        inst2.connect_agent().await.unwrap(),
        Duration::from_secs(10),
    )
    .await
    .expect("agent handshake (no disk)");
    // (The initramfs has no shell; the handshake shows the agent serves from it.)
    client2
        .ping(Duration::from_secs(5))
        .await
        .expect("ping (no disk)");
    inst2
        .request_shutdown()
        .await
        .expect("QMP system_powerdown is accepted");
    let _ = client2
        .request(Request::PowerOff, Duration::from_secs(10))
        .await;
    assert!(
        inst2.wait_exit(Duration::from_secs(30)).await,
        "QEMU did not exit after the guest powered off"
    );
    let pid2 = inst2.pid();
    assert!(
        std::fs::read_to_string(format!("/proc/{pid2}/stat")).is_err(),
        "QEMU {pid2} left a zombie"
    );
    inst2.kill().await.expect("kill after exit is a no-op");
}
