//! Every `BANDSOX_*` environment variable the daemon and its commands honour, read once
//! at startup into one [`Settings`] that is passed down to whoever needs a value.
//!
//! Invariants:
//! - [`Settings::from_env`] is the only place in the library that reads a `BANDSOX_*`
//!   variable (`mount-helpers/lint` checks it); the binaries call it once, at start, and
//!   tests build a `Settings` directly (`Settings::default()` is "nothing set").
//!   `BANDSOX_STATE_DIR` is the default of the commands' `--state-dir` flag (clap reads
//!   it with the command line), and the agent has its own `BANDSOX_LOG`.
//! - Values are kept as given (an empty value counts as unset unless a field says
//!   otherwise); each consumer parses its own and says what is wrong with it, as before,
//!   when it uses it, so a bad value of one setting never stops what does not use it.
//! - Nothing here changes after start: a changed environment needs a restart.
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// Default of `BANDSOX_BOOT_TIMEOUT`.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// The daemon's (and the CLI's) settings from the environment.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `BANDSOX_LOG`: the tracing filter (default: the caller's).
    pub log: Option<String>,
    /// `BANDSOX_LIMITS`: the limits file (`--limits` overrides it; else
    /// `limits::DEFAULT_PATH`).
    pub limits: Option<PathBuf>,
    /// `BANDSOX_BOOT_TIMEOUT` (seconds): how long a VM's first boot or start may take.
    pub boot_timeout: Duration,
    /// `BANDSOX_HOST_AGENT` (tests only): the agent binary of the host test backend; set,
    /// even empty, it replaces every VMM.
    pub host_agent: Option<OsString>,
    /// `BANDSOX_TAP_POOL`: the IPv4 pool of `net=tap` (parsed by `net::TapPool`).
    pub tap_pool: Option<String>,
    /// `BANDSOX_TEST_PAUSE_AT` (tests only): pause points (see `testhook`).
    pub test_pause_at: Option<String>,
    /// `BANDSOX_MOUNT`: where the CLI (`bandsox exec`, `attach`) finds VMs by name.
    pub mount: Option<PathBuf>,
    /// `BANDSOX_NODE`: the node name the HTTP API reports (else the host name).
    pub node: Option<String>,
    pub images: ImageSettings,
    pub vmm: VmmSettings,
}

/// The settings of image import, pull and build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSettings {
    /// `BANDSOX_IMAGE_TIMEOUT` (seconds): the deadline of one import, pull or build.
    pub timeout: Duration,
    /// `BANDSOX_IMAGE_MAX_MIB`: most bytes one image may unpack to.
    pub max_unpacked_mib: u64,
    /// `BANDSOX_BUILDER`: `buildah`, `docker` or a path to either.
    pub builder: Option<String>,
}

impl Default for ImageSettings {
    fn default() -> Self {
        ImageSettings {
            timeout: crate::images::IMAGE_TIMEOUT,
            max_unpacked_mib: crate::images::MAX_UNPACKED_MIB,
            builder: None,
        }
    }
}

/// The settings of the VMM backends (see `vmm` and `backends`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmmSettings {
    /// `BANDSOX_QEMU`: the QEMU binary (else `qemu-system-x86_64` on PATH).
    pub qemu: Option<OsString>,
    /// `BANDSOX_QEMU_VSOCK` is `1` (tests only): the agent over virtio-vsock.
    pub qemu_vsock: bool,
    /// `BANDSOX_VHOST_VSOCK`: the `vhost-device-vsock` binary.
    pub vhost_vsock: Option<OsString>,
    /// `BANDSOX_ACCEL`: `kvm` or `tcg` instead of what the host check decides.
    pub accel: Option<String>,
    /// `BANDSOX_FIRECRACKER`: the Firecracker binary (else `firecracker` on PATH).
    pub firecracker: Option<OsString>,
    /// `BANDSOX_FORCE_FIRECRACKER` is `1` (tests only).
    pub force_firecracker: bool,
    /// `BANDSOX_JAILER`: `0`, `1` or the jailer's path.
    pub jailer: Option<OsString>,
    /// `BANDSOX_JAILER_UID`, `BANDSOX_JAILER_GID`: the jailed VMM's ids (numeric).
    pub jailer_uid: Option<String>,
    pub jailer_gid: Option<String>,
    /// `BANDSOX_JAILER_CGROUPS`: `FILE=VALUE,...` for every jailed VMM.
    pub jailer_cgroups: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            log: None,
            limits: None,
            boot_timeout: BOOT_TIMEOUT,
            host_agent: None,
            tap_pool: None,
            test_pause_at: None,
            mount: None,
            node: None,
            images: ImageSettings::default(),
            vmm: VmmSettings::default(),
        }
    }
}

impl Settings {
    /// Read every variable from this process's environment (once, at start).
    pub fn from_env() -> Settings {
        Self::from_vars(|k| std::env::var_os(k))
    }

    /// Read every variable through `var` (the environment, or a test's map).
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Settings {
        let os = |k: &str| var(k).filter(|v| !v.is_empty());
        let text = |k: &str| os(k).map(|v| v.to_string_lossy().into_owned());
        let secs = |k: &str| {
            text(k)
                .and_then(|s| s.parse().ok())
                .map(Duration::from_secs)
        };
        let images = ImageSettings::default();
        Settings {
            log: text("BANDSOX_LOG"),
            limits: os("BANDSOX_LIMITS").map(PathBuf::from),
            boot_timeout: secs("BANDSOX_BOOT_TIMEOUT").unwrap_or(BOOT_TIMEOUT),
            host_agent: var("BANDSOX_HOST_AGENT"),
            tap_pool: text("BANDSOX_TAP_POOL"),
            test_pause_at: text("BANDSOX_TEST_PAUSE_AT"),
            mount: os("BANDSOX_MOUNT").map(PathBuf::from),
            node: text("BANDSOX_NODE"),
            images: ImageSettings {
                timeout: secs("BANDSOX_IMAGE_TIMEOUT").unwrap_or(images.timeout),
                max_unpacked_mib: text("BANDSOX_IMAGE_MAX_MIB")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(images.max_unpacked_mib),
                builder: text("BANDSOX_BUILDER"),
            },
            vmm: VmmSettings {
                qemu: os("BANDSOX_QEMU"),
                qemu_vsock: text("BANDSOX_QEMU_VSOCK").as_deref() == Some("1"),
                vhost_vsock: os("BANDSOX_VHOST_VSOCK"),
                accel: text("BANDSOX_ACCEL"),
                firecracker: os("BANDSOX_FIRECRACKER"),
                force_firecracker: text("BANDSOX_FORCE_FIRECRACKER").as_deref() == Some("1"),
                jailer: os("BANDSOX_JAILER"),
                jailer_uid: text("BANDSOX_JAILER_UID"),
                jailer_gid: text("BANDSOX_JAILER_GID"),
                jailer_cgroups: text("BANDSOX_JAILER_CGROUPS"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_empty_and_set_values() {
        let vars = [
            ("BANDSOX_BOOT_TIMEOUT", "7"),
            ("BANDSOX_IMAGE_MAX_MIB", "not a number"),
            ("BANDSOX_QEMU", ""),
            ("BANDSOX_HOST_AGENT", ""),
            ("BANDSOX_FORCE_FIRECRACKER", "1"),
            ("BANDSOX_QEMU_VSOCK", "yes"),
            ("BANDSOX_TAP_POOL", "10.0.0.0/24"),
        ];
        let s = Settings::from_vars(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        });
        assert_eq!(s.boot_timeout, Duration::from_secs(7));
        // What does not parse is the default; empty is unset, but for the host agent.
        assert_eq!(s.images.max_unpacked_mib, crate::images::MAX_UNPACKED_MIB);
        assert_eq!(s.vmm.qemu, None);
        assert_eq!(s.host_agent, Some(OsString::new()));
        assert!(s.vmm.force_firecracker && !s.vmm.qemu_vsock);
        assert_eq!(s.tap_pool.as_deref(), Some("10.0.0.0/24"));
        assert_eq!(s.limits, None);
        let none = Settings::from_vars(|_| None);
        assert_eq!(none.boot_timeout, BOOT_TIMEOUT);
        assert_eq!(none.images, ImageSettings::default());
        assert_eq!(none.vmm, VmmSettings::default());
    }
}
