//! Which VMM backends this host offers, decided once at daemon start.
//!
//! QEMU is used when `qemu-system-x86_64` is on PATH (KVM where it really works, TCG
//! emulation otherwise). Firecracker arrives with its own backend module; until then
//! `backend=firecracker` is refused with EOPNOTSUPP and `auto` means QEMU.
use std::sync::Arc;

use crate::manager::Backends;

pub fn detect() -> Backends {
    if let Some(agent) = std::env::var_os("BANDSOX_HOST_AGENT") {
        let b = crate::vmm::host::HostBackend::new(agent.into());
        tracing::warn!(
            "BANDSOX_HOST_AGENT is set: using the test backend ({}); no VMs will boot",
            crate::vmm::Backend::describe(&b)
        );
        return Backends {
            qemu: Some(Arc::new(b)),
            firecracker: None,
        };
    }
    let qemu = match crate::vmm::qemu::QemuBackend::detect() {
        Ok(b) => {
            tracing::info!("qemu backend: {}", crate::vmm::Backend::describe(&b));
            Some(Arc::new(b) as Arc<dyn crate::vmm::Backend>)
        }
        Err(e) => {
            tracing::warn!("qemu backend unavailable: {e}");
            None
        }
    };
    Backends {
        qemu,
        firecracker: None,
    }
}
