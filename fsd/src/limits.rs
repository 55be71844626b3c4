//! Resource limits: how much one user, and the whole host, may take.
//!
//! The limits live in a root-owned text file (default `/etc/bandsox/limits`, or
//! `--limits` / `BANDSOX_LIMITS`), `key = value` per line. Every key is optional; what the
//! file does not set comes from defaults derived from this host when the daemon starts
//! ([`HostFacts`]). The file is re-read whenever it changes (checked on every request that
//! is admitted against it), so root changes limits without a restart; a file that does not
//! parse is ignored as a whole (the previous limits stay) and the error is logged and
//! shown in `usage`.
//!
//! Invariants:
//! - A request is admitted or refused *before* any work: [`Limits::admit`] runs under one
//!   lock, counts what exists plus what is being created right now (live
//!   [`Reservation`]s), and either returns a reservation or an error that names the
//!   limit, its value and the current use. Nothing changed when it refuses.
//! - Per-user limits give EDQUOT; host-wide limits give EAGAIN (VMs, vCPUs, memory: they
//!   free up when others delete VMs) or ENOSPC (disk, snapshots).
//! - root (uid 0) is held to the host-wide limits only.
//! - A VM counts from `create` to `rmdir`, whatever its state, with its configured vCPUs,
//!   memory and disk size; a snapshot counts with the bytes its files occupy.
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use crate::error::{Error, Result};

/// Where the limits file is unless `--limits` or `BANDSOX_LIMITS` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/bandsox/limits";
/// Environment variable naming the limits file.
pub const ENV: &str = "BANDSOX_LIMITS";

/// The counted resources, in the order of [`Amounts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Vms,
    Vcpus,
    MemoryMib,
    DiskMib,
    Snapshots,
    SnapshotMib,
}

impl Resource {
    pub const ALL: [Resource; 6] = [
        Resource::Vms,
        Resource::Vcpus,
        Resource::MemoryMib,
        Resource::DiskMib,
        Resource::Snapshots,
        Resource::SnapshotMib,
    ];
    pub fn key(self) -> &'static str {
        match self {
            Resource::Vms => "vms",
            Resource::Vcpus => "vcpus",
            Resource::MemoryMib => "memory_mib",
            Resource::DiskMib => "disk_mib",
            Resource::Snapshots => "snapshots",
            Resource::SnapshotMib => "snapshot_mib",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
    fn from_key(k: &str) -> Option<Resource> {
        Resource::ALL.into_iter().find(|r| r.key() == k)
    }
    /// What a host-wide refusal answers: EAGAIN for what frees up as others delete VMs,
    /// ENOSPC for storage.
    fn host_errno(self) -> i32 {
        match self {
            Resource::Vms | Resource::Vcpus | Resource::MemoryMib => libc::EAGAIN,
            Resource::DiskMib | Resource::Snapshots | Resource::SnapshotMib => libc::ENOSPC,
        }
    }
    fn noun(self) -> &'static str {
        match self {
            Resource::Vms => "VMs",
            Resource::Vcpus => "vCPUs",
            Resource::MemoryMib => "MiB of guest memory",
            Resource::DiskMib => "MiB of VM disk",
            Resource::Snapshots => "snapshots",
            Resource::SnapshotMib => "MiB of snapshots",
        }
    }
}

/// One number per [`Resource`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amounts(pub [u64; 6]);

impl Amounts {
    pub fn get(&self, r: Resource) -> u64 {
        self.0[r.index()]
    }
    pub fn set(&mut self, r: Resource, v: u64) {
        self.0[r.index()] = v;
    }
    pub fn add(&mut self, other: &Amounts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.saturating_add(b);
        }
    }
    /// What one VM counts for.
    pub fn vm(vcpus: u32, memory_mib: u32, disk_mib: u64) -> Amounts {
        Amounts([1, vcpus.into(), memory_mib.into(), disk_mib, 0, 0])
    }
    /// What one snapshot of `mib` MiB counts for.
    pub fn snapshot(mib: u64) -> Amounts {
        Amounts([0, 0, 0, 0, 1, mib])
    }
    pub fn times(mut self, n: u64) -> Amounts {
        for a in self.0.iter_mut() {
            *a = a.saturating_mul(n);
        }
        self
    }
}

/// Per-resource limits; `None` = unlimited.
pub type LimitRow = [Option<u64>; 6];

/// Limits that bound what one VM makes the host store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmCaps {
    /// Spooled run output per VM, all its runs together (MiB).
    pub run_output_mib: u64,
    /// The serial console log kept per VM (MiB).
    pub console_mib: u64,
    /// Each VMM log file kept per VM (MiB).
    pub vmm_log_mib: u64,
}

impl Default for VmCaps {
    fn default() -> Self {
        VmCaps {
            run_output_mib: 256,
            console_mib: 4,
            vmm_log_mib: 4,
        }
    }
}

/// The limits in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSet {
    pub per_user: LimitRow,
    pub host: LimitRow,
    /// Per-user overrides, by uid: `Some(v)` where the file set the resource for that
    /// user (`v` itself `None` = unlimited), `None` = the `per_user` value applies.
    pub users: BTreeMap<u32, [Option<Option<u64>>; 6]>,
    pub vm: VmCaps,
}

/// What the defaults are derived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFacts {
    pub mem_total_mib: u64,
    pub cpus: u64,
    /// Size of the filesystem holding the state directory.
    pub state_fs_mib: u64,
}

impl HostFacts {
    pub fn detect(state_dir: &Path) -> HostFacts {
        let mem_total_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map(|kb| kb / 1024)
            .unwrap_or(4096);
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1);
        let state_fs_mib = nix::sys::statvfs::statvfs(state_dir)
            .map(|s| s.blocks() * s.fragment_size() / (1024 * 1024))
            .unwrap_or(64 * 1024);
        HostFacts {
            mem_total_mib,
            cpus,
            state_fs_mib,
        }
    }
}

impl LimitSet {
    /// The defaults for a host (documented in docs/limits.md):
    /// - host memory: what the host can back without swapping: MemTotal minus a reserve
    ///   for the host itself (1/8 of it, at least 1 GiB);
    /// - host vCPUs: 16 per host CPU (vCPUs are threads; idle ones cost nothing);
    /// - host VMs: one per 64 MiB of that memory (the smallest VM), at most 1024;
    /// - host disk: the state directory's filesystem size (configured disk sizes);
    /// - host snapshots: 256, using at most half of that filesystem;
    /// - per user: a quarter of each host value (at least one VM's worth), 32 snapshots.
    pub fn defaults(f: &HostFacts) -> LimitSet {
        let memory = f
            .mem_total_mib
            .saturating_sub((f.mem_total_mib / 8).max(1024))
            .max(256);
        let vcpus = f.cpus * 16;
        let vms = (memory / 64).clamp(1, 1024);
        let disk = f.state_fs_mib.max(1024);
        let snap_mib = (f.state_fs_mib / 2).max(512);
        let host = [
            Some(vms),
            Some(vcpus),
            Some(memory),
            Some(disk),
            Some(256),
            Some(snap_mib),
        ];
        let per_user = [
            Some((vms / 4).max(1)),
            Some((vcpus / 4).max(1)),
            Some((memory / 4).max(256)),
            Some((disk / 4).max(1024)),
            Some(32),
            Some((snap_mib / 4).max(512)),
        ];
        LimitSet {
            per_user,
            host,
            users: BTreeMap::new(),
            vm: VmCaps::default(),
        }
    }

    /// Apply the limits file's `key = value` lines on top of `self`; all or nothing.
    pub fn parse(&self, text: &str) -> std::result::Result<LimitSet, String> {
        let mut next = self.clone();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let lineno = i + 1;
            let (key, value) = line
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| format!("line {lineno}: {line:?} is not key = value"))?;
            let num = || -> std::result::Result<Option<u64>, String> {
                match value {
                    "unlimited" | "none" => Ok(None),
                    v => v.parse::<u64>().map(Some).map_err(|_| {
                        format!("line {lineno}: {key} = {value}: not a number or `unlimited`")
                    }),
                }
            };
            let parts: Vec<&str> = key.split('.').collect();
            match parts.as_slice() {
                ["per_user", r] | ["host", r] | ["user", _, r] => {
                    let res = Resource::from_key(r).ok_or_else(|| {
                        format!(
                            "line {lineno}: unknown resource {r:?}; accepted: {}",
                            Resource::ALL.map(|r| r.key()).join(", ")
                        )
                    })?;
                    let v = num()?;
                    match parts[0] {
                        "per_user" => next.per_user[res.index()] = v,
                        "host" => next.host[res.index()] = v,
                        _ => {
                            let uid = resolve_user(parts[1]).ok_or_else(|| {
                                format!("line {lineno}: unknown user {:?}", parts[1])
                            })?;
                            next.users.entry(uid).or_default()[res.index()] = Some(v);
                        }
                    }
                }
                ["vm", cap] => {
                    let v = num()?.unwrap_or(u64::MAX / (1024 * 1024));
                    match *cap {
                        "run_output_mib" => next.vm.run_output_mib = v.max(1),
                        "console_mib" => next.vm.console_mib = v.max(1),
                        "vmm_log_mib" => next.vm.vmm_log_mib = v.max(1),
                        _ => {
                            return Err(format!(
                            "line {lineno}: unknown key {key:?}; accepted: vm.run_output_mib, vm.console_mib, vm.vmm_log_mib"
                        ))
                        }
                    }
                }
                _ => {
                    return Err(format!(
                        "line {lineno}: unknown key {key:?}; accepted: per_user.RESOURCE, host.RESOURCE, \
                         user.UID_OR_NAME.RESOURCE, vm.run_output_mib, vm.console_mib, vm.vmm_log_mib"
                    ))
                }
            }
        }
        Ok(next)
    }

    /// The per-user row that applies to `uid` (`None` for root: host limits only).
    pub fn row_for(&self, uid: u32) -> Option<LimitRow> {
        if uid == 0 {
            return None;
        }
        let mut row = self.per_user;
        if let Some(o) = self.users.get(&uid) {
            for (v, o) in row.iter_mut().zip(o) {
                if let Some(o) = o {
                    *v = *o;
                }
            }
        }
        Some(row)
    }
}

/// A user name or numeric uid → uid.
fn resolve_user(s: &str) -> Option<u32> {
    if let Ok(n) = s.parse::<u32>() {
        return Some(n);
    }
    nix::unistd::User::from_name(s)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

/// A uid's name, if it has one.
pub fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// Current use: per user and in total.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub per_user: BTreeMap<u32, Amounts>,
}

impl Usage {
    pub fn add(&mut self, uid: u32, a: &Amounts) {
        self.per_user.entry(uid).or_default().add(a);
    }
    pub fn user(&self, uid: u32) -> Amounts {
        self.per_user.get(&uid).copied().unwrap_or_default()
    }
    pub fn total(&self) -> Amounts {
        let mut t = Amounts::default();
        for a in self.per_user.values() {
            t.add(a);
        }
        t
    }
}

/// Identity of the limits file as last read (to notice changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    mtime: Option<SystemTime>,
    len: u64,
    ino: u64,
    ctime: i64,
}

struct Loaded {
    set: LimitSet,
    stamp: Option<Stamp>,
    error: Option<String>,
    checked: Instant,
}

/// The limits of one daemon: the file, its host-derived defaults, and admissions in flight.
pub struct Limits {
    path: PathBuf,
    base: LimitSet,
    loaded: Mutex<Loaded>,
    /// Serialises admissions; holds what admitted requests are still creating.
    pending: Mutex<HashMap<u64, (u32, Amounts)>>,
    next_reservation: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits").field("path", &self.path).finish()
    }
}

/// What an admitted request holds until the things it creates are counted on their own
/// (dropping it releases the reservation).
#[derive(Debug)]
pub struct Reservation {
    limits: Arc<Limits>,
    id: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.limits.pending.lock().remove(&self.id);
    }
}

static GLOBAL: OnceLock<Arc<Limits>> = OnceLock::new();

/// The daemon's limits, once a manager installed them (per-VM caps read them).
pub fn global() -> Option<&'static Arc<Limits>> {
    GLOBAL.get()
}

/// The per-VM caps in force (defaults before a daemon installed its limits). Checks the
/// file for changes at most once a second: called on hot paths.
pub fn vm_caps() -> VmCaps {
    global()
        .map(|l| l.current_throttled().vm)
        .unwrap_or_default()
}

impl Limits {
    /// The limits at `path` on top of this host's defaults.
    pub fn new(path: PathBuf, facts: HostFacts) -> Arc<Limits> {
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
            pending: Mutex::new(HashMap::new()),
            next_reservation: Default::default(),
        });
        l.current();
        l
    }

    /// The file named by `BANDSOX_LIMITS`, else [`DEFAULT_PATH`].
    pub fn path_from_env() -> PathBuf {
        std::env::var_os(ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
    }

    /// Make these the limits [`vm_caps`] reads (first caller wins).
    pub fn install_global(self: &Arc<Self>) {
        let _ = GLOBAL.set(self.clone());
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

    fn current_throttled(&self) -> LimitSet {
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
        let stamp = meta.as_ref().ok().map(|m| Stamp {
            mtime: m.modified().ok(),
            len: m.len(),
            ino: m.ino(),
            ctime: m.ctime(),
        });
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
        let outcome = check_owner(&meta, &self.path).and_then(|()| {
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

    /// Admit a request by `uid` that needs `need`, given what exists (`usage`, counted
    /// while the admission lock is held). Refusals name the limit, its value and the use.
    pub fn admit(
        self: &Arc<Self>,
        uid: u32,
        need: Amounts,
        usage: impl FnOnce() -> Usage,
    ) -> Result<Reservation> {
        let set = self.current();
        let mut pending = self.pending.lock();
        let mut usage = usage();
        for (puid, amounts) in pending.values() {
            usage.add(*puid, amounts);
        }
        if let Some(row) = set.row_for(uid) {
            let mine = usage.user(uid);
            for r in Resource::ALL {
                if let Some(limit) = row[r.index()] {
                    let (have, want) = (mine.get(r), need.get(r));
                    if want > 0 && have.saturating_add(want) > limit {
                        let scope = if set.users.get(&uid).is_some_and(|o| o[r.index()].is_some()) {
                            format!("user.{uid}")
                        } else {
                            "per_user".into()
                        };
                        return Err(Error::new(
                            libc::EDQUOT,
                            format!(
                                "limit {scope}.{}={limit} reached: uid {uid} has {have} {}, this request needs {want} more \
                                 (see `cat usage`; root sets limits in {})",
                                r.key(),
                                r.noun(),
                                self.path.display()
                            ),
                        ));
                    }
                }
            }
        }
        let total = usage.total();
        for r in Resource::ALL {
            if let Some(limit) = set.host[r.index()] {
                let (have, want) = (total.get(r), need.get(r));
                if want > 0 && have.saturating_add(want) > limit {
                    return Err(Error::new(
                        r.host_errno(),
                        format!(
                            "host limit host.{}={limit} reached: all users have {have} {}, this request needs {want} more \
                             (see `cat usage`; root sets limits in {})",
                            r.key(),
                            r.noun(),
                            self.path.display()
                        ),
                    ));
                }
            }
        }
        let id = self
            .next_reservation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        pending.insert(id, (uid, need));
        Ok(Reservation {
            limits: self.clone(),
            id,
        })
    }

    /// The `usage` file for `caller`: their own line (every user's for root), the host
    /// line, and the per-VM caps. Format in docs/limits.md.
    pub fn render_usage(&self, caller: u32, usage: &Usage) -> String {
        let set = self.current();
        let fmt_row = |used: &Amounts, row: Option<LimitRow>| -> String {
            Resource::ALL
                .iter()
                .map(|r| {
                    let lim = row
                        .and_then(|row| row[r.index()])
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "unlimited".into());
                    format!("{}={}/{lim}", r.key(), used.get(*r))
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

/// When the daemon runs as root, only a file owned by root and not writable by others
/// may set limits.
fn check_owner(meta: &std::fs::Metadata, path: &Path) -> std::result::Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    if meta.uid() != 0 {
        return Err(format!(
            "{} is owned by uid {}, not root",
            path.display(),
            meta.uid()
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
    use super::*;

    fn facts() -> HostFacts {
        HostFacts {
            mem_total_mib: 24 * 1024,
            cpus: 2,
            state_fs_mib: 100 * 1024,
        }
    }

    #[test]
    fn defaults_follow_the_host() {
        let d = LimitSet::defaults(&facts());
        assert_eq!(d.host[Resource::MemoryMib.index()], Some(24 * 1024 - 3072));
        assert_eq!(d.host[Resource::Vcpus.index()], Some(32));
        assert_eq!(d.per_user[Resource::Vcpus.index()], Some(8));
        assert_eq!(d.host[Resource::DiskMib.index()], Some(100 * 1024));
        let small = LimitSet::defaults(&HostFacts {
            mem_total_mib: 1024,
            cpus: 1,
            state_fs_mib: 100,
        });
        assert_eq!(small.host[Resource::MemoryMib.index()], Some(256));
        assert_eq!(small.host[Resource::Vms.index()], Some(4));
    }

    #[test]
    fn parse_keys_and_errors() {
        let d = LimitSet::defaults(&facts());
        let s = d
            .parse(
                "# comment\nper_user.vms = 2\nhost.memory_mib=unlimited\nuser.1000.vms = 5 # more\nvm.console_mib = 1\n",
            )
            .unwrap();
        assert_eq!(s.per_user[0], Some(2));
        assert_eq!(s.host[Resource::MemoryMib.index()], None);
        assert_eq!(s.row_for(1000).unwrap()[0], Some(5));
        assert_eq!(s.row_for(1001).unwrap()[0], Some(2));
        assert_eq!(s.row_for(0), None);
        assert_eq!(s.vm.console_mib, 1);
        for bad in [
            "vms = 3",
            "per_user.cats = 1",
            "per_user.vms = many",
            "user.no-such-user-here.vms = 1",
            "vm.colour_mib = 3",
            "just words",
        ] {
            assert!(d.parse(bad).is_err(), "{bad}");
        }
        // A per-user override made before per_user changed still follows it elsewhere.
        let s = d.parse("user.1000.vms = 5\nper_user.vcpus = 3\n").unwrap();
        assert_eq!(s.row_for(1000).unwrap()[1], Some(3));
    }

    fn usage_with(uid: u32, a: Amounts) -> Usage {
        let mut u = Usage::default();
        u.add(uid, &a);
        u
    }

    #[test]
    fn admit_refuses_with_the_limit_value_and_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("limits");
        std::fs::write(
            &path,
            "per_user.vms = 2\nhost.vcpus = 3\nhost.disk_mib = 100\n",
        )
        .unwrap();
        let l = Limits::new(path.clone(), facts());
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
