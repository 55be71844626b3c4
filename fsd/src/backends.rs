//! Which VMM backends this host offers, decided once at daemon start.
//!
//! - Firecracker when `firecracker` (or `$BANDSOX_FIRECRACKER`) is 1.8 or newer and
//!   `/dev/kvm` runs ordinary guests (see `vmm::accel`; not on `kvm_pvm` hosts).
//! - QEMU when `qemu-system-x86_64` is on PATH (KVM where it really works, TCG otherwise);
//!   with `BANDSOX_QEMU_VSOCK=1` (tests only) in its variant whose agent channel is
//!   virtio-vsock (`vmm::qemu_vsock`).
//! - `BANDSOX_FORCE_FIRECRACKER=1` (tests only) offers Firecracker where KVM cannot run
//!   guests; such a backend says so in `info`, `events` and the log.
//!
//! `auto` prefers Firecracker; [`Backends::auto_reason`] says in one line why `auto`
//! means what it means, and the daemon logs it and puts it in each auto-created VM's
//! `created` event.
use std::sync::Arc;

use crate::config::BackendChoice;
use crate::error::{Error, Result};
use crate::settings::Settings;
use crate::vmm::{Backend, BackendKind};

/// The VMM backends this daemon can use.
#[derive(Clone)]
pub struct Backends {
    pub qemu: Option<Arc<dyn Backend>>,
    pub firecracker: Option<Arc<dyn Backend>>,
    /// Why `backend=auto` resolves as it does (one line, for logs and events).
    pub auto_reason: String,
}

impl Backends {
    /// Resolve a VM's backend choice; `auto` prefers Firecracker.
    pub fn choose(&self, choice: BackendChoice) -> Result<Arc<dyn Backend>> {
        let unavailable = |what: &str| {
            Error::new(
                libc::EOPNOTSUPP,
                format!("backend={what} is not available on this host"),
            )
        };
        match choice {
            BackendChoice::Auto => self
                .firecracker
                .clone()
                .or_else(|| self.qemu.clone())
                .ok_or_else(|| unavailable("auto (no VMM found)")),
            BackendChoice::Qemu => self.qemu.clone().ok_or_else(|| unavailable("qemu")),
            BackendChoice::Firecracker => self
                .firecracker
                .clone()
                .ok_or_else(|| unavailable("firecracker")),
        }
    }

    pub(crate) fn by_kind(&self, kind: BackendKind) -> Option<Arc<dyn Backend>> {
        match kind {
            BackendKind::Qemu => self.qemu.clone(),
            BackendKind::Firecracker => self.firecracker.clone(),
            // The test backend sits in the `qemu` slot (`backends::detect`).
            BackendKind::Host => self.qemu.clone().filter(|b| b.kind() == BackendKind::Host),
        }
    }
}

pub fn detect(settings: &Settings) -> Backends {
    if let Some(agent) = settings.host_agent.clone() {
        let b = crate::vmm::host::HostBackend::new(agent.into());
        tracing::warn!(
            "BANDSOX_HOST_AGENT is set: using the test backend ({}); no VMs will boot",
            b.describe()
        );
        return Backends {
            qemu: Some(Arc::new(b)),
            firecracker: None,
            auto_reason: "BANDSOX_HOST_AGENT is set (test backend)".into(),
        };
    }
    let qemu = match crate::vmm::qemu::QemuBackend::detect(&settings.vmm) {
        // Test only: the agent over virtio-vsock (BANDSOX_QEMU_VSOCK=1).
        Ok(b) => match crate::vmm::qemu_vsock::QemuVsockBackend::from_settings(b, &settings.vmm) {
            Ok(Ok(v)) => {
                tracing::warn!("qemu backend in its vsock test variant: {}", v.describe());
                Some(Arc::new(v) as Arc<dyn Backend>)
            }
            Ok(Err(plain)) => Some(Arc::new(plain) as Arc<dyn Backend>),
            Err(e) => {
                tracing::error!("qemu backend unavailable: {e}");
                None
            }
        },
        Err(e) => {
            tracing::warn!("qemu backend unavailable: {e}");
            None
        }
    };
    let (firecracker, fc_status) =
        match crate::vmm::firecracker::FirecrackerBackend::detect(&settings.vmm) {
            Ok(b) => {
                let d = b.describe();
                tracing::info!("firecracker backend: {d}");
                (Some(Arc::new(b) as Arc<dyn Backend>), d)
            }
            Err(e) => {
                tracing::info!("firecracker backend unavailable: {e}");
                (None, e.to_string())
            }
        };
    let auto_reason = auto_reason(firecracker.is_some(), qemu.is_some(), &fc_status);
    tracing::info!("backend=auto: {auto_reason}");
    Backends {
        qemu,
        firecracker,
        auto_reason,
    }
}

/// One line on what `auto` resolves to and why.
pub fn auto_reason(firecracker: bool, qemu: bool, fc_status: &str) -> String {
    match (firecracker, qemu) {
        (true, _) => format!("firecracker ({fc_status})"),
        (false, true) => format!("qemu, because firecracker is unavailable: {fc_status}"),
        (false, false) => format!("nothing: no qemu, and firecracker is unavailable: {fc_status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_reason_names_the_choice_and_why() {
        assert!(auto_reason(true, true, "Firecracker 1.10.1").starts_with("firecracker ("));
        let q = auto_reason(false, true, "firecracker not found on PATH");
        assert_eq!(
            q,
            "qemu, because firecracker is unavailable: firecracker not found on PATH"
        );
        assert!(auto_reason(false, false, "x").starts_with("nothing"));
    }
}
