//! The daemon's event log: one line per lifecycle event, served as `/events`.
//!
//! Lines are `<rfc3339> <vm> <event> <detail>` (vm `-` for daemon-wide events), appended
//! to `<state>/events.log` under a lock so lines never interleave. The file only grows
//! (until rotation at [`ROTATE_AT`] bytes, when it is renamed to `events.log.1`), which is
//! what lets `tail -f` follow it by size.
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use parking_lot::Mutex;

pub const ROTATE_AT: u64 = 16 * 1024 * 1024;

pub struct EventLog {
    path: PathBuf,
    file: Mutex<Option<File>>,
    /// Names of VMs with a new event, for in-process listeners (cache invalidation).
    changes: tokio::sync::broadcast::Sender<String>,
}

/// RFC 3339 timestamp with second precision, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Replace control characters so one event is always one line.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl EventLog {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(EventLog {
            path: path.to_path_buf(),
            file: Mutex::new(Some(file)),
            changes: tokio::sync::broadcast::channel(256).0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The names of VMs as they get events (lagging listeners miss some; see broadcast).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    /// Append one event; failures are logged, never propagated (events are best effort).
    pub fn emit(&self, vm: &str, event: &str, detail: &str) {
        if !vm.is_empty() {
            let _ = self.changes.send(vm.to_string());
        }
        let line = format!(
            "{} {} {} {}\n",
            rfc3339(SystemTime::now()),
            if vm.is_empty() { "-" } else { vm },
            event,
            one_line(detail)
        );
        tracing::info!(target: "bandsox::events", vm, event, detail);
        let mut guard = self.file.lock();
        if let Some(f) = guard.as_mut() {
            if let Err(e) = f.write_all(line.as_bytes()) {
                tracing::warn!("cannot write event log {}: {e}", self.path.display());
            }
            if f.metadata().map(|m| m.len() > ROTATE_AT).unwrap_or(false) {
                let rotated = self.path.with_extension("log.1");
                let _ = std::fs::rename(&self.path, rotated);
                *guard = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
                    .ok();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_single_and_formatted() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(&dir.path().join("events.log")).unwrap();
        log.emit("a", "created", "vcpus=1\nmemory=256");
        log.emit("", "started", "daemon");
        let text = std::fs::read_to_string(log.path()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].ends_with(" a created vcpus=1 memory=256"),
            "{}",
            lines[0]
        );
        assert!(lines[1].contains(" - started daemon"));
        assert!(lines[0].starts_with("20"));
    }
}
