//! What the real-VM boot tests share: prerequisites with a loud skip, the guest build
//! (kernel tree, busybox, static agent) and one VM's spec, a kill guard and running a
//! command through the agent.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bandsox_agent::client::{AgentClient, ExecEvent};
use bandsox_agent::proto::{ExecSpec, ExitStatus, Program};
use bandsox_fsd::bootfiles::{build_guest, GuestArtifacts, GuestBuildOptions};
use bandsox_fsd::vmm::VmSpec;

pub const KERNEL_ROOT: &str = "/var/cache/bandsox/kernel";
pub const BUSYBOX: &str = "/var/cache/bandsox/busybox/bin/busybox";

/// SIGKILLs the VMM if the test panics before its own `kill`, so no VM is leaked.
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.0) {
            // SAFETY: kill(2) on the pid of the VMM this test started; harmless if gone.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Print a skip notice nobody can miss.
pub fn skip(test: &str, why: &str, hint: Option<&str>) {
    eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("!!! SKIPPED {test}: {why}");
    if let Some(h) = hint {
        eprintln!("!!! {h}");
    }
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
}

pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(name).is_file())
}

/// Why the guest cannot be built here, if it cannot.
pub fn missing_guest_inputs() -> Option<&'static str> {
    if !Path::new(KERNEL_ROOT).join("boot").is_dir() || !Path::new(BUSYBOX).is_file() {
        return Some("no extracted kernel/busybox in /var/cache/bandsox");
    }
    if !on_path("mkfs.ext4") {
        return Some("mkfs.ext4 (e2fsprogs) is not installed");
    }
    None
}

/// The static agent of this tree, (re)built by agent/build-static.sh: a stale binary
/// would speak another protocol version (cargo makes the rebuild a no-op when current).
pub fn static_agent() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = repo.join("target/x86_64-unknown-linux-gnu/release/bandsox-agent");
    let st = Command::new(repo.join("agent/build-static.sh"))
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run agent/build-static.sh");
    assert!(st.success(), "agent/build-static.sh failed");
    bin
}

/// Build the guest artefacts under `tmp/s` and a VM directory `tmp/vm` with its own copy
/// of the base disk; returns the VM's spec (1 vCPU, 256 MiB, no network).
pub fn guest_vm(tmp: &Path, name: &str) -> (VmSpec, GuestArtifacts) {
    let art = build_guest(&GuestBuildOptions {
        state_dir: tmp.join("s"),
        agent: static_agent(),
        kernel_root: KERNEL_ROOT.into(),
        busybox: Some(BUSYBOX.into()),
        force: false,
    })
    .expect("guest build");
    let dir = tmp.join("vm");
    std::fs::create_dir(&dir).unwrap();
    let disk = dir.join("disk.ext4");
    bandsox_fsd::disk::clone_disk(&art.base_image, &disk).unwrap();
    let spec = VmSpec {
        name: name.into(),
        dir,
        vcpus: 1,
        memory_mib: 256,
        disk: Some(disk),
        kernel: art.kernel.clone(),
        initrd: art.initrd.clone(),
        net: None,
        memory_file: None,
    };
    (spec, art)
}

/// Run `script` in the guest; its combined output and how it ended.
pub async fn run(client: &AgentClient, script: &str) -> (String, ExitStatus) {
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
