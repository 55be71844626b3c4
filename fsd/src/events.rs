//! The daemon's event log: one line per lifecycle event, served as `/events` and
//! `<vm>/events` (through `crate::eventview`, which shows each reader only their lines).
//!
//! Public lines are `<rfc3339> <vm> <event> <detail>` (vm `-` for daemon-wide events).
//! In `<state>/events.log` each is stored behind its scope, `u=<owner uid or *>\tv=<vm id
//! or ->\t<public line>`: the owner of the VM (or snapshot) the event is about, found
//! when the event is emitted (so it stays right after the VM is deleted or its name is
//! reused), `*` for daemon-wide and image events, which everyone may see. Lines are
//! appended under a lock so they never interleave. The file only grows (until rotation
//! at [`ROTATE_AT`] bytes, when it is renamed to `events.log.1`).
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::SystemTime;

use parking_lot::Mutex;

pub const ROTATE_AT: u64 = 16 * 1024 * 1024;

/// Who an event's subject belongs to: finds a live VM's owner and id by name.
pub trait Scopes: Send + Sync {
    /// `(owner uid, vm id)` of the VM named `name`, if it exists.
    fn vm_scope(&self, name: &str) -> Option<(u32, String)>;
}

/// Where a stored line may be shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// `None`: everyone.
    pub owner: Option<u32>,
    /// The VM the line is about.
    pub vm_id: Option<String>,
}

impl Scope {
    pub const PUBLIC: Scope = Scope {
        owner: None,
        vm_id: None,
    };

    fn prefix(&self) -> String {
        format!(
            "u={}\tv={}\t",
            self.owner
                .map(|u| u.to_string())
                .unwrap_or_else(|| "*".into()),
            self.vm_id.as_deref().unwrap_or("-")
        )
    }

    /// Split a stored line into its scope and public text. Lines without a scope (from
    /// daemons before scopes) are root's only: `None`.
    pub fn parse(line: &[u8]) -> Option<(Scope, &[u8])> {
        let rest = line.strip_prefix(b"u=")?;
        let tab = rest.iter().position(|&b| b == b'\t')?;
        let owner = match &rest[..tab] {
            b"*" => None,
            u => Some(std::str::from_utf8(u).ok()?.parse().ok()?),
        };
        let rest = rest[tab + 1..].strip_prefix(b"v=")?;
        let tab = rest.iter().position(|&b| b == b'\t')?;
        let vm_id = match &rest[..tab] {
            b"-" => None,
            v => Some(String::from_utf8(v.to_vec()).ok()?),
        };
        Some((Scope { owner, vm_id }, &rest[tab + 1..]))
    }
}

pub struct EventLog {
    path: PathBuf,
    file: Mutex<Option<File>>,
    /// Names of VMs with a new event, for in-process listeners (cache invalidation).
    changes: tokio::sync::broadcast::Sender<String>,
    scopes: Mutex<Option<Weak<dyn Scopes>>>,
    /// Last known scope of each VM name (a deleted VM's last events still find it).
    known: Mutex<HashMap<String, (u32, String)>>,
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
            scopes: Mutex::new(None),
            known: Mutex::new(HashMap::new()),
        })
    }

    /// Where VM owners are looked up (the manager).
    pub fn set_scopes(&self, s: Weak<dyn Scopes>) {
        *self.scopes.lock() = Some(s);
    }

    /// The scope of an event about `subject` (a VM name, `images/<name>`, `-` or "").
    fn scope_of(&self, subject: &str) -> Scope {
        if subject.is_empty() || subject == "-" || subject.starts_with("images/") {
            return Scope::PUBLIC;
        }
        let live = self
            .scopes
            .lock()
            .as_ref()
            .and_then(Weak::upgrade)
            .and_then(|s| s.vm_scope(subject));
        let found = match live {
            Some(sc) => {
                self.known.lock().insert(subject.to_string(), sc.clone());
                Some(sc)
            }
            None => self.known.lock().get(subject).cloned(),
        };
        match found {
            Some((uid, id)) => Scope {
                owner: Some(uid),
                vm_id: Some(id),
            },
            // Unknown subject: root only.
            None => Scope {
                owner: Some(0),
                vm_id: None,
            },
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The names of VMs as they get events (lagging listeners miss some; see broadcast).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    /// Append one event about `vm` (a VM name, `images/<name>`, or `-`/"" for the daemon);
    /// its scope is looked up. Failures are logged, never propagated (best effort).
    pub fn emit(&self, vm: &str, event: &str, detail: &str) {
        let scope = self.scope_of(vm);
        self.emit_scoped(&scope, vm, event, detail);
    }

    /// Append one event that only `owner` (and root) may see, e.g. about a snapshot.
    pub fn emit_for(&self, owner: u32, vm: &str, event: &str, detail: &str) {
        let mut scope = self.scope_of(vm);
        scope.owner = Some(owner);
        self.emit_scoped(&scope, vm, event, detail);
    }

    fn emit_scoped(&self, scope: &Scope, vm: &str, event: &str, detail: &str) {
        if !vm.is_empty() {
            let _ = self.changes.send(vm.to_string());
        }
        let line = format!(
            "{}{} {} {} {}\n",
            scope.prefix(),
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
        // No manager: an unknown VM's line is root's; the daemon's is everyone's.
        let (scope, public) = Scope::parse(lines[0].as_bytes()).unwrap();
        assert_eq!(scope.owner, Some(0));
        assert!(public.starts_with(b"20"));
        let (scope, _) = Scope::parse(lines[1].as_bytes()).unwrap();
        assert_eq!(scope, Scope::PUBLIC);
        assert!(Scope::parse(b"2026-01-01T00:00:00Z a created").is_none());
    }

    struct Owners;
    impl Scopes for Owners {
        fn vm_scope(&self, name: &str) -> Option<(u32, String)> {
            (name == "a").then(|| (1000, "abc".to_string()))
        }
    }

    #[test]
    fn scopes_follow_the_owner_even_after_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(&dir.path().join("events.log")).unwrap();
        let owners: std::sync::Arc<dyn Scopes> = std::sync::Arc::new(Owners);
        log.set_scopes(std::sync::Arc::downgrade(&owners));
        log.emit("a", "created", "");
        drop(owners); // the manager no longer knows "a"
        log.emit("a", "deleted", "");
        log.emit("images/x", "imported", "");
        log.emit_for(1000, "-", "snapshot-deleted", "s1");
        let text = std::fs::read(log.path()).unwrap();
        let scopes: Vec<Scope> = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| Scope::parse(l).unwrap().0)
            .collect();
        let a = Scope {
            owner: Some(1000),
            vm_id: Some("abc".into()),
        };
        assert_eq!(scopes[0], a);
        assert_eq!(scopes[1], a);
        assert_eq!(scopes[2], Scope::PUBLIC);
        assert_eq!(scopes[3].owner, Some(1000));
    }
}
