//! `bandsox bench-boot`: the baseline for the boot benchmark. Boots one VM with the same
//! backend, kernel, initramfs and image a `mkdir` would use, but without the daemon, the
//! manager or FUSE, and reports the milliseconds from launching the VMM to the agent's
//! first handshake answer.
use std::path::Path;
use std::time::{Duration, Instant};

use bandsox_agent::client::AgentClient;

use crate::layout::{mkdir_private, Layout};
use crate::vmm::{Backend, VmSpec};

pub fn bench_boot(state_dir: &Path) -> Result<u64, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let layout = Layout::new(state_dir);
    let dir = state_dir.join(format!("bench-{}", std::process::id()));
    mkdir_private(&dir).map_err(|e| e.to_string())?;
    let result = rt.block_on(async {
        let backend = crate::vmm::qemu::QemuBackend::detect().map_err(|e| e.to_string())?;
        crate::disk::clone_disk(&layout.image_disk("base"), &dir.join("disk.ext4"))
            .map_err(|e| format!("disk: {e}"))?;
        let spec = VmSpec {
            name: "bench".into(),
            dir: dir.clone(),
            vcpus: 1,
            memory_mib: 256,
            disk: Some(dir.join("disk.ext4")),
            kernel: layout.kernel(),
            initrd: layout.initrd(),
            net: None,
        };
        let t0 = Instant::now();
        let inst = backend.launch(&spec).await.map_err(|e| e.to_string())?;
        let deadline = t0 + Duration::from_secs(90);
        let ms = loop {
            if Instant::now() > deadline || !inst.is_alive() {
                let _ = inst.kill().await;
                return Err("the agent did not answer".to_string());
            }
            if let Ok(stream) = inst.connect_agent().await {
                if AgentClient::connect(stream, Duration::from_secs(3))
                    .await
                    .is_ok()
                {
                    break t0.elapsed().as_millis() as u64;
                }
            } else {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let _ = inst.kill().await;
        Ok(ms)
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}
