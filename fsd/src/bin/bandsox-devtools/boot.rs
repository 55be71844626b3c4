//! Booting one VM without the daemon, the manager or FUSE: the baseline of the boot
//! benchmark (`bench-boot`) and the agent connection `fsbench` measures on.
//!
//! Invariants: the VM's directory is private to this process (`<state>/bench-<pid>`) and
//! removed, with the VMM killed, when the [`Booted`] is dropped through [`Booted::finish`];
//! every wait on the guest has a deadline.
use bandsox_fsd::settings::VmmSettings;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bandsox_agent::client::AgentClient;
use bandsox_fsd::layout::{mkdir_private, Layout};
use bandsox_fsd::vmm::{Backend, VmSpec, VmmInstance};

/// How long a VM may take to answer its first handshake.
const BOOT_DEADLINE: Duration = Duration::from_secs(90);

/// A VM (or a host-mode agent) and a connected agent client.
pub struct Booted {
    pub client: AgentClient,
    /// Milliseconds from launching the VMM to the agent's first handshake answer.
    pub ms: u64,
    vm: Guest,
    dir: PathBuf,
}

enum Guest {
    Vm(Box<dyn VmmInstance>),
    HostAgent(Child),
}

impl Booted {
    /// Kill the VMM (or host agent) and remove the private directory.
    pub async fn finish(self) {
        drop(self.client);
        match self.vm {
            Guest::Vm(inst) => {
                let _ = inst.kill().await;
            }
            Guest::HostAgent(mut child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Boot the `base` image with the QEMU backend, kernel and initramfs a `mkdir` would use.
pub async fn boot_vm(state_dir: &Path, settings: &VmmSettings) -> Result<Booted, String> {
    let layout = Layout::new(state_dir);
    let dir = state_dir.join(format!("bench-{}", std::process::id()));
    mkdir_private(&dir).map_err(|e| e.to_string())?;
    let booted = boot_in(&layout, &dir, settings).await;
    if booted.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    booted
}

async fn boot_in(layout: &Layout, dir: &Path, settings: &VmmSettings) -> Result<Booted, String> {
    let backend =
        bandsox_fsd::vmm::qemu::QemuBackend::detect(settings).map_err(|e| e.to_string())?;
    bandsox_fsd::disk::clone_disk(&layout.image_disk("base"), &dir.join("disk.ext4"))
        .map_err(|e| format!("disk: {e}"))?;
    let spec = VmSpec {
        name: "bench".into(),
        dir: dir.to_path_buf(),
        vcpus: 1,
        memory_mib: 256,
        disk: Some(dir.join("disk.ext4")),
        kernel: layout.kernel(),
        initrd: layout.initrd(),
        net: None,
        memory_file: None,
    };
    let t0 = Instant::now();
    let inst = backend.launch(&spec).await.map_err(|e| e.to_string())?;
    let deadline = t0 + BOOT_DEADLINE;
    loop {
        if Instant::now() > deadline || !inst.is_alive() {
            let _ = inst.kill().await;
            return Err("the agent did not answer".to_string());
        }
        if let Ok(stream) = inst.connect_agent().await {
            if let Ok((client, _)) = AgentClient::connect(stream, Duration::from_secs(3)).await {
                return Ok(Booted {
                    client,
                    ms: millis(t0.elapsed()),
                    vm: Guest::Vm(inst),
                    dir: dir.to_path_buf(),
                });
            }
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Start `agent` in host mode on a unix socket, serving a fresh directory (with a `root`
/// subdirectory, so guest-style paths like `/root/x` work in both modes).
pub async fn host_agent(state_dir: &Path, agent: &Path) -> Result<Booted, String> {
    let dir = state_dir.join(format!("bench-{}", std::process::id()));
    mkdir_private(&dir).map_err(|e| e.to_string())?;
    let root = dir.join("fsroot");
    std::fs::create_dir_all(root.join("root")).map_err(|e| e.to_string())?;
    let sock = dir.join("agent.sock");
    let t0 = Instant::now();
    let mut child = Command::new(agent)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--root")
        .arg(&root)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", agent.display()))?;
    let deadline = t0 + Duration::from_secs(10);
    let connected = loop {
        if Instant::now() > deadline {
            break Err("the host agent did not answer".to_string());
        }
        if let Ok(stream) = tokio::net::UnixStream::connect(&sock).await {
            match AgentClient::connect(stream, Duration::from_secs(3)).await {
                Ok((client, _)) => break Ok(client),
                Err(e) => break Err(format!("handshake: {e}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    match connected {
        Ok(client) => Ok(Booted {
            client,
            ms: millis(t0.elapsed()),
            vm: Guest::HostAgent(child),
            dir,
        }),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}
