//! Typed bodies of the Firecracker API requests this backend sends, and its error body.
//!
//! Written from Firecracker's API documentation (its swagger definition and
//! `docs/api_requests/`), for the versions this backend supports (1.8 and later; see
//! `firecracker/mod.rs`). Field names are exactly the documented ones.
//!
//! Invariants:
//! - Optional fields are `Option`s that are left out of the JSON when `None`, so a body
//!   never carries a field the running Firecracker might not know unless the caller set it.
//! - Enums serialise to the documented spellings (`InstanceStart`, `Paused`, `Writeback`,
//!   `Full`, `File`, ...).
//! - Fields that only exist from some version on say so in their doc comment; choosing
//!   whether to send them is the caller's business (see [`super::FcVersion`]).
use serde::{Deserialize, Serialize};

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    /// Host path of the kernel: an uncompressed ELF `vmlinux` (bzImage only after 1.16).
    pub kernel_image_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// `PUT /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfiguration {
    /// 1..=32 (with `smt`, 1 or even).
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Needed for diff snapshots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
}

/// Block device caching strategy. `Unsafe` (Firecracker's default) ignores guest flushes;
/// `Writeback` honours them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    Unsafe,
    Writeback,
}

/// Block device IO engine (`Async` needs host kernel > 5.10.51).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    Sync,
    Async,
}

/// `PUT /drives/{drive_id}` (virtio-block).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: String,
    pub is_root_device: bool,
    pub is_read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    /// Only used when `is_root_device` is true.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
}

/// `PUT /vsock`. The deprecated `vsock_id` is not sent (optional since 1.0 and
/// deprecated in the 1.x API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vsock {
    /// At least 3.
    pub guest_cid: u32,
    /// Host-initiated connections: Firecracker listens here and expects
    /// `CONNECT <port>\n`. A relative path is resolved against Firecracker's cwd.
    pub uds_path: String,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    /// The host TAP device.
    pub host_dev_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
}

/// `PUT /entropy` (virtio-rng); an empty object is a device without rate limiting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntropyDevice {}

/// Log level for [`Logger`] (case-insensitive for Firecracker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
    Trace,
    Off,
}

/// `PUT /logger`. Firecracker opens `log_path` without creating it: the file (or FIFO)
/// must exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logger {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
}

/// `PUT /metrics`. Like the logger's, the file must exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    pub metrics_path: String,
}

/// `PUT /serial` — only in newer releases (present in the 1.16 API, absent in 1.9).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDevice {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<String>,
}

/// `action_type` of `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    InstanceStart,
    /// x86 only: Ctrl+Alt+Del on the emulated i8042 keyboard.
    SendCtrlAltDel,
    FlushMetrics,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

/// `state` of `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmStateRequest {
    Paused,
    Resumed,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub state: VmStateRequest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    Full,
    Diff,
}

/// `PUT /snapshot/create` (the VM must be paused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCreateParams {
    pub snapshot_path: String,
    pub mem_file_path: String,
    /// Defaults to `Full`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    File,
    Uffd,
}

/// Where `PUT /snapshot/load` gets guest memory from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBackend {
    pub backend_type: MemBackendType,
    /// The memory file (`File`) or the UFFD handler's socket (`Uffd`).
    pub backend_path: String,
}

/// One entry of `network_overrides` (since 1.12).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `vsock_override` (since 1.16).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockOverride {
    pub uds_path: String,
}

/// `PUT /snapshot/load` (only on a fresh process, before anything but logger/metrics).
/// The deprecated `mem_file_path` is never sent: `mem_backend` replaces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotLoadParams {
    pub snapshot_path: String,
    pub mem_backend: MemoryBackend,
    /// Dirty page tracking after load; the 1.8-era name, deprecated once
    /// `track_dirty_pages` arrived. Send at most one of the two.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_diff_snapshots: Option<bool>,
    /// Newer name of `enable_diff_snapshots`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    /// Since 1.12.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_overrides: Option<Vec<NetworkOverride>>,
    /// Since 1.16.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
}

/// `PUT /balloon` (before boot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balloon {
    pub amount_mib: u32,
    pub deflate_on_oom: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats_polling_interval_s: Option<u32>,
}

/// `PATCH /balloon` (before or after boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonUpdate {
    pub amount_mib: u32,
}

/// Answer of `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub app_name: String,
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    pub vmm_version: String,
}

/// Answer of `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    pub firecracker_version: String,
}

/// The body of every Firecracker error response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    #[serde(default)]
    pub fault_message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn v<T: Serialize>(t: &T) -> Value {
        serde_json::to_value(t).unwrap()
    }

    #[test]
    fn boot_source_and_machine_config() {
        let b = BootSource {
            kernel_image_path: "/k".into(),
            boot_args: Some("console=ttyS0".into()),
            initrd_path: Some("/i".into()),
        };
        assert_eq!(
            v(&b),
            json!({"kernel_image_path": "/k", "boot_args": "console=ttyS0", "initrd_path": "/i"})
        );
        let b = BootSource {
            kernel_image_path: "/k".into(),
            boot_args: None,
            initrd_path: None,
        };
        assert_eq!(v(&b), json!({"kernel_image_path": "/k"}));
        let m = MachineConfiguration {
            vcpu_count: 2,
            mem_size_mib: 256,
            smt: Some(false),
            track_dirty_pages: None,
        };
        assert_eq!(
            v(&m),
            json!({"vcpu_count": 2, "mem_size_mib": 256, "smt": false})
        );
    }

    #[test]
    fn devices() {
        let d = Drive {
            drive_id: "vda".into(),
            path_on_host: "disk.ext4".into(),
            is_root_device: false,
            is_read_only: false,
            cache_type: Some(CacheType::Writeback),
            io_engine: None,
            partuuid: None,
        };
        assert_eq!(
            v(&d),
            json!({"drive_id": "vda", "path_on_host": "disk.ext4", "is_root_device": false,
                   "is_read_only": false, "cache_type": "Writeback"})
        );
        let d = Drive {
            io_engine: Some(IoEngine::Async),
            cache_type: Some(CacheType::Unsafe),
            partuuid: Some("p".into()),
            ..d
        };
        let j = v(&d);
        assert_eq!(j["io_engine"], "Async");
        assert_eq!(j["cache_type"], "Unsafe");
        assert_eq!(j["partuuid"], "p");
        assert_eq!(
            v(&Vsock {
                guest_cid: 3,
                uds_path: "vsock.sock".into()
            }),
            json!({"guest_cid": 3, "uds_path": "vsock.sock"})
        );
        assert_eq!(
            v(&NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: "bxtap0".into(),
                guest_mac: Some("06:00:ac:10:00:02".into())
            }),
            json!({"iface_id": "eth0", "host_dev_name": "bxtap0", "guest_mac": "06:00:ac:10:00:02"})
        );
        assert_eq!(v(&EntropyDevice {}), json!({}));
        assert_eq!(
            v(&SerialDevice {
                serial_out_path: Some("console.log".into())
            }),
            json!({"serial_out_path": "console.log"})
        );
        assert_eq!(
            v(&Balloon {
                amount_mib: 64,
                deflate_on_oom: true,
                stats_polling_interval_s: None
            }),
            json!({"amount_mib": 64, "deflate_on_oom": true})
        );
        assert_eq!(
            v(&BalloonUpdate { amount_mib: 32 }),
            json!({"amount_mib": 32})
        );
    }

    #[test]
    fn logger_metrics_actions_vm() {
        let l = Logger {
            log_path: Some("firecracker.log".into()),
            level: Some(LogLevel::Info),
            show_level: Some(true),
            show_log_origin: Some(false),
        };
        assert_eq!(
            v(&l),
            json!({"log_path": "firecracker.log", "level": "Info", "show_level": true,
                   "show_log_origin": false})
        );
        assert_eq!(
            v(&Metrics {
                metrics_path: "metrics.json".into()
            }),
            json!({"metrics_path": "metrics.json"})
        );
        for (a, s) in [
            (ActionType::InstanceStart, "InstanceStart"),
            (ActionType::SendCtrlAltDel, "SendCtrlAltDel"),
            (ActionType::FlushMetrics, "FlushMetrics"),
        ] {
            assert_eq!(
                v(&InstanceActionInfo { action_type: a }),
                json!({ "action_type": s })
            );
        }
        assert_eq!(
            v(&Vm {
                state: VmStateRequest::Paused
            }),
            json!({"state": "Paused"})
        );
        assert_eq!(
            v(&Vm {
                state: VmStateRequest::Resumed
            }),
            json!({"state": "Resumed"})
        );
    }

    #[test]
    fn snapshots() {
        assert_eq!(
            v(&SnapshotCreateParams {
                snapshot_path: "s/vmstate".into(),
                mem_file_path: "s/mem".into(),
                snapshot_type: Some(SnapshotType::Full)
            }),
            json!({"snapshot_path": "s/vmstate", "mem_file_path": "s/mem", "snapshot_type": "Full"})
        );
        let load = SnapshotLoadParams {
            snapshot_path: "vmstate".into(),
            mem_backend: MemoryBackend {
                backend_type: MemBackendType::File,
                backend_path: "mem".into(),
            },
            enable_diff_snapshots: None,
            track_dirty_pages: None,
            resume_vm: Some(true),
            network_overrides: None,
            vsock_override: None,
        };
        assert_eq!(
            v(&load),
            json!({"snapshot_path": "vmstate",
                   "mem_backend": {"backend_type": "File", "backend_path": "mem"},
                   "resume_vm": true})
        );
        let full = SnapshotLoadParams {
            track_dirty_pages: Some(false),
            network_overrides: Some(vec![NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: "tap1".into(),
            }]),
            vsock_override: Some(VsockOverride {
                uds_path: "vsock.sock".into(),
            }),
            mem_backend: MemoryBackend {
                backend_type: MemBackendType::Uffd,
                backend_path: "uffd.sock".into(),
            },
            ..load
        };
        let j = v(&full);
        assert_eq!(j["mem_backend"]["backend_type"], "Uffd");
        assert_eq!(j["track_dirty_pages"], false);
        assert_eq!(
            j["network_overrides"],
            json!([{"iface_id": "eth0", "host_dev_name": "tap1"}])
        );
        assert_eq!(j["vsock_override"], json!({"uds_path": "vsock.sock"}));
        assert!(j.get("enable_diff_snapshots").is_none());
        assert!(j.get("mem_file_path").is_none());
    }

    #[test]
    fn answers_parse() {
        let e: ApiErrorBody =
            serde_json::from_str(r#"{"fault_message": "Invalid kernel path"}"#).unwrap();
        assert_eq!(e.fault_message, "Invalid kernel path");
        let i: InstanceInfo = serde_json::from_str(
            r#"{"app_name":"Firecracker","id":"anonymous-instance","state":"Not started","vmm_version":"1.10.1"}"#,
        )
        .unwrap();
        assert_eq!(i.state, "Not started");
        let ver: FirecrackerVersion =
            serde_json::from_str(r#"{"firecracker_version":"1.10.1"}"#).unwrap();
        assert_eq!(ver.firecracker_version, "1.10.1");
    }
}
