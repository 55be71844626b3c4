//! The limits of one daemon: the file as last read, and the [`Reservation`]s that count
//! what admitted requests are creating and what the daemon holds for users.
//!
//! Invariants:
//! - A request is admitted or refused *before* any work: [`Limits::admit`] and
//!   [`Limits::hold`] run under one lock, count what exists (the manager's [`Usage`])
//!   plus every live reservation, and either return a reservation or an error that
//!   names the limit, its value and the current use. Nothing changed when they refuse.
//! - A reservation counts until it is dropped. [`Reservation::resize`] admits an
//!   increase like a new request (refused: nothing changes) and always accepts a
//!   decrease. Per-user and host totals of the live reservations are kept up to date,
//!   so an admission costs no scan of them.
//! - The file is re-read when its identity, size, times, owner or mode changed (checked
//!   on every admission of a VM or snapshot, at most once a second for holds). When the
//!   daemon is root, a file not owned by root or writable by group or others is
//!   ignored like one that does not parse: the previous limits stay.
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use super::{user_name, Amounts, HostFacts, LimitRow, LimitSet, Resource, Usage, ENV};
use crate::error::{Error, Result};

/// Identity of the limits file as last read (to notice changes, a `chmod` or `chown`
/// alone included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    mtime: Option<SystemTime>,
    len: u64,
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
    mode: u32,
    uid: u32,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            mtime: m.modified().ok(),
            len: m.len(),
            dev: m.dev(),
            ino: m.ino(),
            ctime: (m.ctime(), m.ctime_nsec()),
            mode: m.mode(),
            uid: m.uid(),
        }
    }
}

struct Loaded {
    set: LimitSet,
    stamp: Option<Stamp>,
    error: Option<String>,
    checked: Instant,
}

/// The live reservations, with their totals per user and for the host.
#[derive(Default)]
struct Ledger {
    entries: HashMap<u64, (u32, Amounts)>,
    per_user: HashMap<u32, Amounts>,
    total: Amounts,
    next: u64,
}

impl Ledger {
    fn user(&self, uid: u32) -> Amounts {
        self.per_user.get(&uid).copied().unwrap_or_default()
    }
    fn add(&mut self, uid: u32, a: &Amounts) {
        self.per_user.entry(uid).or_default().add(a);
        self.total.add(a);
    }
    fn remove(&mut self, uid: u32, a: &Amounts) {
        if let Some(u) = self.per_user.get_mut(&uid) {
            u.sub(a);
            if *u == Amounts::default() {
                self.per_user.remove(&uid);
            }
        }
        self.total.sub(a);
    }
}

/// The limits of one daemon: the file, its host-derived defaults, and what the live
/// reservations hold.
pub struct Limits {
    path: PathBuf,
    base: LimitSet,
    loaded: Mutex<Loaded>,
    /// Serialises admissions; what every live reservation holds.
    ledger: Mutex<Ledger>,
    /// The owner the file must have (and no group/other write bit) to be trusted:
    /// root when the daemon is root; `None` checks nothing.
    owner: Option<u32>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits").field("path", &self.path).finish()
    }
}

/// What an admitted request holds: what it is creating until that is counted on its
/// own, or what the daemon keeps for a user (a running command, a screen, a buffer).
/// Dropping it releases what it holds.
#[derive(Debug)]
pub struct Reservation {
    limits: Arc<Limits>,
    id: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut ledger = self.limits.ledger.lock();
        if let Some((uid, a)) = ledger.entries.remove(&self.id) {
            ledger.remove(uid, &a);
        }
    }
}

impl Reservation {
    /// Hold `need` from now on instead of what this holds: an increase is admitted
    /// against the limits like a new request (refused: nothing changes), a decrease is
    /// always accepted.
    pub fn resize(&self, need: Amounts) -> Result<()> {
        let set = self.limits.current_throttled();
        let mut ledger = self.limits.ledger.lock();
        let Some((uid, old)) = ledger.entries.get(&self.id).copied() else {
            return Ok(());
        };
        let mut more = need;
        more.sub(&old);
        let (mine, total) = (ledger.user(uid), ledger.total);
        self.limits
            .check(&set, uid, &more, &mine, &total)
            .map_err(|(_, e)| e)?;
        ledger.remove(uid, &old);
        ledger.add(uid, &need);
        ledger.entries.insert(self.id, (uid, need));
        Ok(())
    }

    /// What this reservation holds now.
    pub fn amounts(&self) -> Amounts {
        self.limits
            .ledger
            .lock()
            .entries
            .get(&self.id)
            .map(|(_, a)| *a)
            .unwrap_or_default()
    }
}

impl Limits {
    /// The limits at `path` on top of this host's defaults; when the daemon is root the
    /// file must be root's (see the module docs).
    pub fn new(path: PathBuf, facts: HostFacts) -> Arc<Limits> {
        let owner = nix::unistd::geteuid().is_root().then_some(0);
        Self::with_owner(path, facts, owner)
    }

    /// [`Limits::new`] trusting only a file owned by `owner` (`None`: any file).
    pub fn with_owner(path: PathBuf, facts: HostFacts, owner: Option<u32>) -> Arc<Limits> {
        let base = LimitSet::defaults(&facts);
        let l = Arc::new(Limits {
            path,
            loaded: Mutex::new(Loaded {
                set: base.clone(),
                stamp: None,
                error: None,
                checked: Instant::now(),
            }),
            base,
            ledger: Mutex::new(Ledger::default()),
            owner,
        });
        l.current();
        l
    }

    /// The file named by `BANDSOX_LIMITS`, else [`super::DEFAULT_PATH`].
    pub fn path_from_env() -> PathBuf {
        std::env::var_os(ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(super::DEFAULT_PATH))
    }

    /// Make these the limits [`super::vm_caps`] reads (first caller wins).
    pub fn install_global(self: &Arc<Self>) {
        let _ = super::GLOBAL.set(self.clone());
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The host-derived defaults (what applies with no file).
    pub fn defaults(&self) -> &LimitSet {
        &self.base
    }

    /// Why the file is being ignored, if it is.
    pub fn error(&self) -> Option<String> {
        self.current();
        self.loaded.lock().error.clone()
    }

    pub(super) fn current_throttled(&self) -> LimitSet {
        {
            let l = self.loaded.lock();
            if l.checked.elapsed() < Duration::from_secs(1) {
                return l.set.clone();
            }
        }
        self.current()
    }

    /// The limits in force, re-reading the file if it changed since the last call.
    pub fn current(&self) -> LimitSet {
        let meta = std::fs::metadata(&self.path);
        let stamp = meta.as_ref().ok().map(Stamp::of);
        let mut l = self.loaded.lock();
        l.checked = Instant::now();
        if stamp == l.stamp {
            return l.set.clone();
        }
        l.stamp = stamp;
        let Ok(meta) = meta else {
            if l.set != self.base {
                tracing::info!(
                    "limits file {} is gone: host defaults apply",
                    self.path.display()
                );
            }
            l.set = self.base.clone();
            l.error = None;
            return l.set.clone();
        };
        let outcome = check_owner(&meta, &self.path, self.owner).and_then(|()| {
            std::fs::read_to_string(&self.path)
                .map_err(|e| format!("cannot read {}: {e}", self.path.display()))
                .and_then(|text| self.base.parse(&text))
        });
        match outcome {
            Ok(set) => {
                tracing::info!("limits loaded from {}", self.path.display());
                l.set = set;
                l.error = None;
            }
            Err(e) => {
                let msg = format!("{} ignored, previous limits stay: {e}", self.path.display());
                tracing::error!("{msg}");
                l.error = Some(msg);
            }
        }
        l.set.clone()
    }

    /// Whether `uid` may take `more` on top of `mine` (theirs) and `total` (everyone's).
    /// Refusals say which resource, and name the limit, its value and the use.
    fn check(
        &self,
        set: &LimitSet,
        uid: u32,
        more: &Amounts,
        mine: &Amounts,
        total: &Amounts,
    ) -> std::result::Result<(), (Resource, Error)> {
        let over = |r: Resource, limit: u64, have: u64| {
            let want = more.get(r);
            want > 0 && have.saturating_add(want) > limit.saturating_mul(r.unit())
        };
        let refusal = |errno, name: String, limit: u64, who: String, have: u64, r: Resource| {
            Error::new(
                errno,
                format!(
                    "{name}={limit} reached: {who} {} {}, this request needs {} more \
                     (see `cat usage`; root sets limits in {})",
                    r.shown(have),
                    r.noun(),
                    r.shown(more.get(r)),
                    self.path.display()
                ),
            )
        };
        if let Some(row) = set.row_for(uid) {
            for r in Resource::ALL {
                if let Some(limit) = row[r.index()] {
                    if over(r, limit, mine.get(r)) {
                        let scope = if set.overridden(uid, r) {
                            format!("user.{uid}")
                        } else {
                            "per_user".into()
                        };
                        let name = format!("limit {scope}.{}", r.key());
                        let who = format!("uid {uid} has");
                        return Err((r, refusal(libc::EDQUOT, name, limit, who, mine.get(r), r)));
                    }
                }
            }
        }
        for r in Resource::ALL {
            if let Some(limit) = set.host[r.index()] {
                if over(r, limit, total.get(r)) {
                    let name = format!("host limit host.{}", r.key());
                    let who = "all users have".to_string();
                    return Err((
                        r,
                        refusal(r.host_errno(), name, limit, who, total.get(r), r),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Admit a request by `uid` that needs `need`, given what exists (`usage`, counted
    /// while the admission lock is held) and what live reservations hold.
    pub fn admit(
        self: &Arc<Self>,
        uid: u32,
        need: Amounts,
        usage: impl FnOnce() -> Usage,
    ) -> Result<Reservation> {
        let set = self.current();
        let mut ledger = self.ledger.lock();
        let usage = usage();
        let mut mine = usage.user(uid);
        mine.add(&ledger.user(uid));
        let mut total = usage.total();
        total.add(&ledger.total);
        self.check(&set, uid, &need, &mine, &total)
            .map_err(|(_, e)| e)?;
        Ok(self.enter(&mut ledger, uid, need))
    }

    /// Hold `need` of what only reservations count ([`Resource::held`]: commands,
    /// screens, buffers) for `uid`, or refuse. Re-reads a changed file at most once a
    /// second: holds are taken on every open of a control file.
    pub fn hold(self: &Arc<Self>, uid: u32, need: Amounts) -> Result<Reservation> {
        self.hold_freeing(uid, need, |_| false)
    }

    /// [`Limits::hold`], letting `free` make room first whenever a limit refuses: it is
    /// called (without the admission lock) with the resource that did not fit and
    /// returns whether it freed some; then the hold is tried again.
    pub fn hold_freeing(
        self: &Arc<Self>,
        uid: u32,
        need: Amounts,
        mut free: impl FnMut(Resource) -> bool,
    ) -> Result<Reservation> {
        let set = self.current_throttled();
        loop {
            let refused = {
                let mut ledger = self.ledger.lock();
                let (mine, total) = (ledger.user(uid), ledger.total);
                match self.check(&set, uid, &need, &mine, &total) {
                    Ok(()) => return Ok(self.enter(&mut ledger, uid, need)),
                    Err(refused) => refused,
                }
            };
            if !free(refused.0) {
                return Err(refused.1);
            }
        }
    }

    /// Count `need` for `uid` whatever the limits: what exists when the daemon starts
    /// (runs kept on disk) counts, even over a limit.
    pub fn hold_existing(self: &Arc<Self>, uid: u32, need: Amounts) -> Reservation {
        let mut ledger = self.ledger.lock();
        self.enter(&mut ledger, uid, need)
    }

    fn enter(self: &Arc<Self>, ledger: &mut Ledger, uid: u32, need: Amounts) -> Reservation {
        let id = ledger.next;
        ledger.next += 1;
        ledger.entries.insert(id, (uid, need));
        ledger.add(uid, &need);
        Reservation {
            limits: self.clone(),
            id,
        }
    }

    /// What live reservations hold of the [`Resource::held`] resources, per user.
    fn held(&self) -> Usage {
        let ledger = self.ledger.lock();
        let mut u = Usage::default();
        for (uid, a) in &ledger.per_user {
            let mut only = Amounts::default();
            for r in Resource::ALL.into_iter().filter(|r| r.held()) {
                only.set(r, a.get(r));
            }
            u.add(*uid, &only);
        }
        u
    }

    /// The `usage` file for `caller`: their own line (every user's for root), the host
    /// line, and the per-VM caps. Format in docs/service.md.
    pub fn render_usage(&self, caller: u32, usage: &Usage) -> String {
        let set = self.current();
        let mut usage = usage.clone();
        for (uid, a) in self.held().per_user {
            usage.add(uid, &a);
        }
        let fmt_row = |used: &Amounts, row: Option<LimitRow>| -> String {
            Resource::ALL
                .iter()
                .map(|r| {
                    let lim = row
                        .and_then(|row| row[r.index()])
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "unlimited".into());
                    format!("{}={}/{lim}", r.key(), r.shown(used.get(*r)))
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut out = String::new();
        let mut uids: Vec<u32> = if caller == 0 {
            usage.per_user.keys().copied().collect()
        } else {
            vec![caller]
        };
        if !uids.contains(&caller) {
            uids.insert(0, caller);
        }
        uids.sort_unstable();
        uids.dedup();
        for uid in uids {
            let name = user_name(uid).unwrap_or_else(|| "-".into());
            out.push_str(&format!(
                "user uid={uid} name={name} {}\n",
                fmt_row(&usage.user(uid), set.row_for(uid))
            ));
        }
        out.push_str(&format!(
            "host {}\n",
            fmt_row(&usage.total(), Some(set.host))
        ));
        out.push_str(&format!(
            "vm run_output_mib={} console_mib={} vmm_log_mib={}\n",
            set.vm.run_output_mib, set.vm.console_mib, set.vm.vmm_log_mib
        ));
        if let Some(e) = self.loaded.lock().error.clone() {
            out.push_str(&format!("error {}\n", e.replace('\n', " ")));
        }
        out
    }
}

/// Only a file owned by `owner` and not writable by group or others may set limits.
fn check_owner(
    meta: &std::fs::Metadata,
    path: &Path,
    owner: Option<u32>,
) -> std::result::Result<(), String> {
    let Some(owner) = owner else {
        return Ok(());
    };
    if meta.uid() != owner {
        return Err(format!(
            "{} is owned by uid {}, not {}",
            path.display(),
            meta.uid(),
            if owner == 0 {
                "root".to_string()
            } else {
                format!("uid {owner}")
            }
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by group or others (mode {:o}); chmod go-w it",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::super::tests::facts;
    use super::*;

    /// A limits file holding `text`, in a directory that lives as long as the result.
    fn limits_file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("limits");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn usage_with(uid: u32, a: Amounts) -> Usage {
        let mut u = Usage::default();
        u.add(uid, &a);
        u
    }

    #[test]
    fn admit_refuses_with_the_limit_value_and_use() {
        let (_dir, path) = limits_file("per_user.vms = 2\nhost.vcpus = 3\nhost.disk_mib = 100\n");
        let l = Limits::new(path, facts());
        let one = Amounts::vm(1, 256, 10);
        let e = l
            .admit(1000, one, || {
                usage_with(1000, Amounts::vm(1, 256, 10).times(2))
            })
            .unwrap_err();
        assert_eq!(e.errno, libc::EDQUOT);
        assert!(e.message.contains("per_user.vms=2"), "{}", e.message);
        assert!(e.message.contains("uid 1000 has 2 VMs"), "{}", e.message);
        // Host-wide: EAGAIN for vCPUs, ENOSPC for disk; root is held to these too.
        let e = l
            .admit(0, Amounts::vm(2, 256, 10), || {
                usage_with(5, Amounts::vm(2, 256, 10))
            })
            .unwrap_err();
        assert_eq!(e.errno, libc::EAGAIN, "{}", e.message);
        assert!(e.message.contains("host.vcpus=3"), "{}", e.message);
        let e = l
            .admit(0, Amounts::vm(1, 256, 200), Usage::default)
            .unwrap_err();
        assert_eq!(e.errno, libc::ENOSPC, "{}", e.message);
        // Reservations count until dropped.
        let r1 = l.admit(1000, one, Usage::default).unwrap();
        let _r2 = l.admit(1000, one, Usage::default).unwrap();
        assert_eq!(
            l.admit(1000, one, Usage::default).unwrap_err().errno,
            libc::EDQUOT
        );
        drop(r1);
        let _r3 = l.admit(1000, one, Usage::default).unwrap();
    }

    #[test]
    fn holds_count_commands_cells_and_buffers_until_dropped() {
        let (_dir, path) = limits_file(
            "per_user.runs = 2\nper_user.terminal_cells = 1500000\nhost.runs = 3\n\
             per_user.buffer_mib = 1\n",
        );
        let l = Limits::with_owner(path, facts(), None);
        // Two commands, one of them with a 1000x1000 terminal; the third is EDQUOT.
        let a = l.hold(1000, Amounts::run(1_000_000)).unwrap();
        let b = l.hold(1000, Amounts::run(0)).unwrap();
        let e = l.hold(1000, Amounts::run(0)).unwrap_err();
        assert_eq!(e.errno, libc::EDQUOT);
        assert!(
            e.message.contains("per_user.runs=2") && e.message.contains("uid 1000 has 2 commands"),
            "{}",
            e.message
        );
        // Cells: a second big terminal does not fit, a small one does (by resizing).
        let e = b.resize(Amounts::run(1_000_000)).unwrap_err();
        assert_eq!(e.errno, libc::EDQUOT);
        assert!(
            e.message.contains("per_user.terminal_cells=1500000"),
            "{}",
            e.message
        );
        assert_eq!(
            b.amounts(),
            Amounts::run(0),
            "a refused resize changed nothing"
        );
        b.resize(Amounts::run(80 * 24)).unwrap();
        // The host limit counts every user; root is held to it too.
        let _c = l.hold(1001, Amounts::run(0)).unwrap();
        let e = l.hold(0, Amounts::run(0)).unwrap_err();
        assert_eq!(e.errno, libc::EAGAIN, "{}", e.message);
        assert!(e.message.contains("host.runs=3"), "{}", e.message);
        // Dropping a hold returns what it held; shrinking always works.
        drop(a);
        let _d = l.hold(1000, Amounts::run(1_000_000)).unwrap();
        b.resize(Amounts::default()).unwrap();
        // Buffers are counted in bytes against a limit in MiB.
        let buf = l.hold(1000, Amounts::buffer(1024 * 1024)).unwrap();
        let e = l.hold(1000, Amounts::buffer(1)).unwrap_err();
        assert!(
            e.message.contains("per_user.buffer_mib=1") && e.message.contains("has 1 MiB held"),
            "{}",
            e.message
        );
        buf.resize(Amounts::buffer(1000)).unwrap();
        let _small = l.hold(1000, Amounts::buffer(1000)).unwrap();
        // usage shows what is held, in the limits' units.
        let text = l.render_usage(1000, &Usage::default());
        assert!(text.contains(" runs=1/2 "), "{text}");
        assert!(text.contains(" terminal_cells=1000000/1500000 "), "{text}");
        assert!(text.contains(" buffer_mib=1/1"), "{text}");
        let host = text.lines().find(|l| l.starts_with("host ")).unwrap();
        assert!(host.contains(" runs=2/3 "), "{text}");
    }

    #[test]
    fn a_hold_can_make_room_first_and_existing_things_always_count() {
        let (_dir, path) = limits_file("per_user.kept_runs = 2\n");
        let l = Limits::with_owner(path, facts(), None);
        // Two runs kept from before (over the limit would count too).
        let mut kept = vec![
            l.hold_existing(1000, Amounts::kept_run()),
            l.hold_existing(1000, Amounts::kept_run()),
            l.hold_existing(1000, Amounts::kept_run()),
        ];
        // A new one frees the oldest until it fits.
        let mut asked = Vec::new();
        let new = l
            .hold_freeing(1000, Amounts::kept_run(), |r| {
                asked.push(r);
                kept.remove(0);
                true
            })
            .unwrap();
        assert_eq!(asked, vec![Resource::KeptRuns, Resource::KeptRuns]);
        assert_eq!(kept.len(), 1);
        // Nothing to free: refused with the limit named.
        let e = l
            .hold_freeing(1000, Amounts::kept_run(), |_| false)
            .unwrap_err();
        assert_eq!(e.errno, libc::EDQUOT);
        assert!(e.message.contains("per_user.kept_runs=2"), "{}", e.message);
        drop(new);
        let _again = l.hold(1000, Amounts::kept_run()).unwrap();
    }

    #[test]
    fn reload_on_change_and_bad_file_keeps_previous() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("limits");
        let l = Limits::new(path.clone(), facts());
        assert_eq!(l.current(), LimitSet::defaults(&facts()));
        std::fs::write(&path, "per_user.vms = 1\n").unwrap();
        assert_eq!(l.current().per_user[0], Some(1));
        std::fs::write(&path, "per_user.vms = lots of them\n").unwrap();
        assert_eq!(l.current().per_user[0], Some(1));
        assert!(l.error().unwrap().contains("line 1"));
        std::fs::write(&path, "per_user.vms = 7\n").unwrap();
        assert_eq!(l.current().per_user[0], Some(7));
        assert!(l.error().is_none());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(l.current(), LimitSet::defaults(&facts()));
    }

    #[test]
    fn a_chmod_alone_is_noticed_at_once() {
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let (_dir, path) = limits_file("per_user.vms = 3\n");
        let mode =
            |m: u32| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m)).unwrap();
        mode(0o666);
        let l = Limits::with_owner(path.clone(), facts(), Some(me));
        assert_eq!(
            l.current().per_user[0],
            LimitSet::defaults(&facts()).per_user[0]
        );
        assert!(l.error().unwrap().contains("writable by group or others"));
        // No content change, and within the same second: the mode alone is noticed.
        mode(0o644);
        assert_eq!(l.current().per_user[0], Some(3));
        assert!(l.error().is_none());
        // Made writable by others again: ignored again, the limits read stay.
        mode(0o646);
        assert_eq!(l.current().per_user[0], Some(3));
        assert!(l.error().unwrap().contains("mode 646"), "{:?}", l.error());
        mode(0o600);
        assert!(l.error().is_none());
        // Another owner than the trusted one is ignored the same way.
        let other = Limits::with_owner(path.clone(), facts(), Some(me.wrapping_add(1)));
        assert!(other
            .error()
            .unwrap()
            .contains(&format!("owned by uid {me}")));
    }

    #[test]
    fn usage_shows_own_line_to_users_and_all_to_root() {
        let dir = tempfile::tempdir().unwrap();
        let l = Limits::new(dir.path().join("none"), facts());
        let mut u = Usage::default();
        u.add(1000, &Amounts::vm(1, 256, 512));
        u.add(1001, &Amounts::vm(2, 512, 512));
        let mine = l.render_usage(1000, &u);
        assert!(mine.contains("user uid=1000 "), "{mine}");
        assert!(!mine.contains("uid=1001"), "{mine}");
        assert!(mine.contains("vms=1/"), "{mine}");
        assert!(mine.contains("\nhost vms=2/"), "{mine}");
        let all = l.render_usage(0, &u);
        assert!(all.contains("uid=1000") && all.contains("uid=1001") && all.contains("uid=0"));
        assert!(
            all.contains("user uid=0 name=root vms=0/unlimited"),
            "{all}"
        );
    }
}
