//! VM configuration: the `key=value` options of `create`, and the `defaults` file.
//!
//! Invariant: a [`VmConfig`] that exists has passed [`VmConfig::set`] for every key, so
//! the manager never sees an out-of-range value. Parsing is all-or-nothing: a bad key
//! leaves the target unchanged.
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lines::quote;
use crate::vmm::NetMode;

pub mod lifecycle;
pub use lifecycle::{LifecycleOpts, TtlAction};

pub const MAX_VCPUS: u32 = 32;
pub const MIN_MEMORY_MIB: u32 = 64;
pub const MAX_MEMORY_MIB: u32 = 65536;
pub const MAX_DISK_MIB: u32 = 1024 * 1024;

/// Which backend to use for a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    Auto,
    Qemu,
    Firecracker,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub image: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Size of the VM's disk; `None` = the image's size.
    pub disk_mib: Option<u32>,
    pub net: NetMode,
    pub backend: BackendChoice,
    /// Run the image's Entrypoint+Cmd as `runs/main` after every boot.
    #[serde(default)]
    pub autostart: bool,
    /// Runs kept in `runs/` (the oldest finished ones are pruned beyond this).
    #[serde(default = "default_keep_runs")]
    pub keep_runs: u32,
    /// MiB of run output kept for all runs together (bounded by the limits'
    /// `vm.run_output_mib`); the oldest finished runs are pruned to make room.
    #[serde(default = "default_output_mib")]
    pub output_mib: u32,
    /// Default timeout of every command, in milliseconds (`exec_timeout=`; `None`: no
    /// timeout). A command's own `timeout=` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_timeout_ms: Option<u64>,
    /// `ttl=`, `ttl_action=`, `idle_pause=`, `autoresume=` (see `lifecycle`).
    #[serde(default, flatten)]
    pub lifecycle: LifecycleOpts,
    /// `kernel=NAME`: boot `<state>/boot/vmlinuz-NAME` and `initrd-NAME` instead of
    /// `vmlinuz` and `initrd` (`None`: those).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
}

pub const DEFAULT_KEEP_RUNS: u32 = 100;
pub const MAX_KEEP_RUNS: u32 = 100_000;
pub const DEFAULT_OUTPUT_MIB: u32 = 256;
pub const MAX_OUTPUT_MIB: u32 = 1024 * 1024;

fn default_keep_runs() -> u32 {
    DEFAULT_KEEP_RUNS
}
fn default_output_mib() -> u32 {
    DEFAULT_OUTPUT_MIB
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            image: "base".into(),
            vcpus: 1,
            memory_mib: 256,
            disk_mib: None,
            net: NetMode::None,
            backend: BackendChoice::Auto,
            autostart: false,
            keep_runs: DEFAULT_KEEP_RUNS,
            output_mib: DEFAULT_OUTPUT_MIB,
            exec_timeout_ms: None,
            lifecycle: LifecycleOpts::default(),
            kernel: None,
        }
    }
}

pub const KEYS_HELP: &str =
    "image=NAME vcpus=1..32 memory=64..65536 (MiB) disk=MiB net=none|user|tap backend=auto|qemu|firecracker autostart=0|1 keep_runs=1..100000 output_mib=1..1048576 exec_timeout=SECONDS|none ttl=SECONDS|none ttl_action=destroy|snapshot idle_pause=SECONDS|none autoresume=0|1 kernel=default|NAME";

fn parse_num(key: &str, value: &str, min: u32, max: u32) -> Result<u32> {
    let n: u32 = value
        .parse()
        .map_err(|_| Error::invalid(format!("{key}={}: not a number", quote(value))))?;
    if n < min || n > max {
        return Err(Error::invalid(format!(
            "{key}={value}: out of range {min}..{max}"
        )));
    }
    Ok(n)
}

/// The key an option sets (`memory_mib` is another spelling of `memory`).
fn canonical_key(key: &str) -> &str {
    match key {
        "memory_mib" => "memory",
        "disk_mib" => "disk",
        k => k,
    }
}

impl VmConfig {
    /// Set one key; unknown keys and bad values are EINVAL.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "image" => {
                // A local image name, or a registry reference pulled at create time
                // (see `crate::images::registry::image_ref`).
                if crate::images::registry::image_ref(value).is_none() {
                    crate::names::validate("image", value)?;
                }
                self.image = value.to_string();
            }
            "vcpus" => self.vcpus = parse_num(key, value, 1, MAX_VCPUS)?,
            "memory" | "memory_mib" => {
                self.memory_mib = parse_num(key, value, MIN_MEMORY_MIB, MAX_MEMORY_MIB)?
            }
            "disk" | "disk_mib" => {
                self.disk_mib = if value == "auto" {
                    None
                } else {
                    Some(parse_num(key, value, 16, MAX_DISK_MIB)?)
                }
            }
            "net" => {
                self.net = match value {
                    "none" => NetMode::None,
                    "user" => NetMode::User,
                    "tap" => NetMode::Tap,
                    _ => {
                        return Err(Error::invalid(format!(
                            "net={}: accepted values are none, user, tap",
                            quote(value)
                        )))
                    }
                }
            }
            "backend" => {
                self.backend = match value {
                    "auto" => BackendChoice::Auto,
                    "qemu" => BackendChoice::Qemu,
                    "firecracker" => BackendChoice::Firecracker,
                    _ => {
                        return Err(Error::invalid(format!(
                            "backend={}: accepted values are auto, qemu, firecracker",
                            quote(value)
                        )))
                    }
                }
            }
            "autostart" => {
                self.autostart = match value {
                    "1" | "yes" | "true" => true,
                    "0" | "no" | "false" => false,
                    _ => {
                        return Err(Error::invalid(format!(
                            "autostart={}: accepted values are 0 and 1",
                            quote(value)
                        )))
                    }
                }
            }
            "keep_runs" => self.keep_runs = parse_num(key, value, 1, MAX_KEEP_RUNS)?,
            "output_mib" => self.output_mib = parse_num(key, value, 1, MAX_OUTPUT_MIB)?,
            "exec_timeout" => {
                self.exec_timeout_ms = match crate::execopts::parse_timeout(key, value)? {
                    crate::execopts::TimeoutOpt::Off => None,
                    crate::execopts::TimeoutOpt::After(d) => {
                        Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                    }
                }
            }
            "kernel" => {
                // Resolved to files under `<state>/boot/` when the VM is created.
                self.kernel = if value == "default" {
                    None
                } else {
                    crate::names::validate("kernel", value)?;
                    Some(value.to_string())
                }
            }
            _ if self.lifecycle.set(key, value)? => {}
            _ => {
                return Err(Error::invalid(format!(
                    "unknown option {}; accepted: {KEYS_HELP}",
                    quote(key)
                )))
            }
        }
        Ok(())
    }

    /// Apply `key=value` words on a copy; the copy is returned only if all are valid.
    /// A key given twice is refused (which one was meant is anyone's guess).
    pub fn with_options<'a>(&self, words: impl IntoIterator<Item = &'a str>) -> Result<VmConfig> {
        let mut next = self.clone();
        let mut seen: Vec<String> = Vec::new();
        for w in words {
            let (k, v) = w.split_once('=').ok_or_else(|| {
                Error::invalid(format!(
                    "{} is not key=value; accepted: {KEYS_HELP}",
                    quote(w)
                ))
            })?;
            let key = canonical_key(k);
            if seen.iter().any(|s| s == key) {
                return Err(Error::invalid(format!(
                    "{} given twice",
                    quote(key).trim_matches('"')
                )));
            }
            next.set(k, v)?;
            seen.push(key.to_string());
        }
        Ok(next)
    }

    /// Parse the `defaults` file format: `key=value` lines, `#` comments, blank lines.
    pub fn parse_defaults(&self, text: &str) -> Result<VmConfig> {
        let words: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .flat_map(str::split_whitespace)
            .collect();
        self.with_options(words)
    }

    /// Render as the `defaults` file.
    pub fn to_defaults(&self) -> String {
        let net = match self.net {
            NetMode::None => "none",
            NetMode::User => "user",
            NetMode::Tap => "tap",
        };
        let backend = match self.backend {
            BackendChoice::Auto => "auto",
            BackendChoice::Qemu => "qemu",
            BackendChoice::Firecracker => "firecracker",
        };
        let disk = self
            .disk_mib
            .map(|d| d.to_string())
            .unwrap_or_else(|| "auto".into());
        format!(
            "image={}\nvcpus={}\nmemory={}\ndisk={}\nnet={}\nbackend={}\nautostart={}\nkeep_runs={}\noutput_mib={}\nexec_timeout={}\n",
            self.image,
            self.vcpus,
            self.memory_mib,
            disk,
            net,
            backend,
            u8::from(self.autostart),
            self.keep_runs,
            self.output_mib,
            render_timeout(self.exec_timeout_ms)
        ) + &self.lifecycle.to_defaults()
            + &format!("kernel={}\n", self.kernel.as_deref().unwrap_or("default"))
    }
}

/// `exec_timeout`'s value: seconds (`30`, `0.5`) or `none`.
pub fn render_timeout(ms: Option<u64>) -> String {
    match ms {
        None => "none".into(),
        Some(ms) if ms % 1000 == 0 => (ms / 1000).to_string(),
        Some(ms) => format!("{}.{:03}", ms / 1000, ms % 1000)
            .trim_end_matches('0')
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_roundtrip() {
        let c = VmConfig::default()
            .with_options([
                "vcpus=2",
                "memory=512",
                "disk=1024",
                "net=user",
                "autostart=1",
                "keep_runs=5",
                "output_mib=64",
                "exec_timeout=2.5",
                "ttl=30",
                "ttl_action=snapshot",
                "idle_pause=5",
                "autoresume=0",
                "kernel=k2",
            ])
            .unwrap();
        let back = VmConfig::default()
            .parse_defaults(&c.to_defaults())
            .unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn bad_options_change_nothing() {
        let c = VmConfig::default();
        for bad in [
            "vcpus=0",
            "vcpus=x",
            "memory=1",
            "net=wifi",
            "color=red",
            "novalue",
            "image=a//b",
            "image=a:",
            "vcpus=2",
            "ttl=0",
            "ttl=soon",
            "kernel=../x",
        ] {
            let e = c.with_options(["vcpus=4", bad]).unwrap_err();
            assert_eq!(e.errno, libc::EINVAL, "{bad}");
        }
        assert_eq!(c, VmConfig::default());
        let e = c.with_options(["vcpus=1", "vcpus=3"]).unwrap_err();
        assert_eq!(e.message, "vcpus given twice");
        let e = c
            .with_options(["memory=128", "memory_mib=256"])
            .unwrap_err();
        assert_eq!(e.message, "memory given twice");
        let huge = format!("{}=1", "k".repeat(1_000_000));
        assert!(c.with_options([huge.as_str()]).unwrap_err().message.len() < 600);
    }
}
