//! A VM's lifecycle options: `ttl=`, `ttl_action=`, `idle_pause=`, `autoresume=`.
//!
//! Invariants: a value held here passed [`LifecycleOpts::set`] (ttl and idle_pause are
//! whole seconds, at least 1 and at most [`MAX_SECS`]); the options are part of the
//! VM's `config` in `vm.json`, and a record written before they existed reads as the
//! defaults (no ttl, no idle pause, autoresume on).
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lines::quote;

/// Largest `ttl=` / `idle_pause=` (ten years of seconds: a typo, not a wish).
pub const MAX_SECS: u64 = 10 * 365 * 24 * 3600;

/// The keys handled here (also settable later through a VM's `ctl`).
pub const KEYS: [&str; 4] = ["ttl", "ttl_action", "idle_pause", "autoresume"];

pub const HELP: &str =
    "ttl=SECONDS|none ttl_action=destroy|snapshot idle_pause=SECONDS|none autoresume=0|1";

/// What happens when a VM's ttl runs out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TtlAction {
    #[default]
    Destroy,
    /// Snapshot (as `<vm>-ttl-<unix time>`), then destroy.
    Snapshot,
}

impl TtlAction {
    pub fn as_str(self) -> &'static str {
        match self {
            TtlAction::Destroy => "destroy",
            TtlAction::Snapshot => "snapshot",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleOpts {
    /// Seconds from creation (or from a later `ttl=` on the VM's ctl) to the VM's end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u64>,
    #[serde(default)]
    pub ttl_action: TtlAction,
    /// Pause the VM after this many seconds with no run and no request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_pause_s: Option<u64>,
    /// An exec, a ctl command that needs the guest, or an `fs/` request resumes a
    /// paused VM first.
    #[serde(default = "yes")]
    pub autoresume: bool,
}

fn yes() -> bool {
    true
}

impl Default for LifecycleOpts {
    fn default() -> Self {
        LifecycleOpts {
            ttl_s: None,
            ttl_action: TtlAction::Destroy,
            idle_pause_s: None,
            autoresume: true,
        }
    }
}

/// Whole seconds, 1..=[`MAX_SECS`], or `none`.
pub fn parse_secs(key: &str, value: &str) -> Result<Option<u64>> {
    if value == "none" {
        return Ok(None);
    }
    let n: u64 = value.parse().map_err(|_| {
        Error::invalid(format!(
            "{key}={}: expected whole seconds (at least 1) or none",
            quote(value)
        ))
    })?;
    if !(1..=MAX_SECS).contains(&n) {
        return Err(Error::invalid(format!(
            "{key}={value}: out of range 1..{MAX_SECS} seconds (none: no {key})"
        )));
    }
    Ok(Some(n))
}

fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value {
        "1" | "yes" | "true" => Ok(true),
        "0" | "no" | "false" => Ok(false),
        _ => Err(Error::invalid(format!(
            "{key}={}: accepted values are 0 and 1",
            quote(value)
        ))),
    }
}

fn render_secs(s: Option<u64>) -> String {
    s.map_or_else(|| "none".into(), |s| s.to_string())
}

impl LifecycleOpts {
    /// Set one key; `Ok(false)` when `key` is not one of [`KEYS`].
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "ttl" => self.ttl_s = parse_secs(key, value)?,
            "idle_pause" => self.idle_pause_s = parse_secs(key, value)?,
            "autoresume" => self.autoresume = parse_bool(key, value)?,
            "ttl_action" => {
                self.ttl_action = match value {
                    "destroy" => TtlAction::Destroy,
                    "snapshot" => TtlAction::Snapshot,
                    _ => {
                        return Err(Error::invalid(format!(
                            "ttl_action={}: accepted values are destroy, snapshot",
                            quote(value)
                        )))
                    }
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The `defaults` file lines.
    pub fn to_defaults(&self) -> String {
        format!(
            "ttl={}\nttl_action={}\nidle_pause={}\nautoresume={}\n",
            render_secs(self.ttl_s),
            self.ttl_action.as_str(),
            render_secs(self.idle_pause_s),
            u8::from(self.autoresume)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let mut o = LifecycleOpts::default();
        assert!(o.set("ttl", "3").unwrap());
        assert!(o.set("idle_pause", "60").unwrap());
        assert!(o.set("autoresume", "0").unwrap());
        assert!(o.set("ttl_action", "snapshot").unwrap());
        assert_eq!(o.ttl_s, Some(3));
        assert_eq!(o.idle_pause_s, Some(60));
        assert!(!o.autoresume);
        assert_eq!(o.ttl_action, TtlAction::Snapshot);
        assert!(!o.set("vcpus", "1").unwrap());
        assert!(o.set("ttl", "none").unwrap());
        assert_eq!(o.ttl_s, None);
        for (k, v) in [
            ("ttl", "0"),
            ("ttl", "-1"),
            ("ttl", "0.5"),
            ("ttl", "abc"),
            ("ttl", ""),
            ("ttl", "999999999999"),
            ("idle_pause", "0"),
            ("autoresume", "maybe"),
            ("ttl_action", "explode"),
        ] {
            let e = o.set(k, v).unwrap_err();
            assert_eq!(e.errno, libc::EINVAL, "{k}={v}");
            assert!(e.message.starts_with(k), "{}", e.message);
        }
    }

    #[test]
    fn old_records_read_as_defaults() {
        let o: LifecycleOpts = serde_json::from_str("{}").unwrap();
        assert_eq!(o, LifecycleOpts::default());
        assert!(o.autoresume);
    }
}
