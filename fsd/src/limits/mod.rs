//! Resource limits: how much one user, and the whole host, may take.
//!
//! The limits live in a root-owned text file (default `/etc/bandsox/limits`, or
//! `--limits` / `BANDSOX_LIMITS`), `key = value` per line. Every key is optional; what the
//! file does not set comes from defaults derived from this host when the daemon starts
//! ([`HostFacts`]). The file is re-read whenever it changes (see [`ledger`]), so root
//! changes limits without a restart; a file that does not parse is ignored as a whole
//! (the previous limits stay) and the error is logged and shown in `usage`.
//!
//! Two kinds of resources:
//! - what a user *creates* (VMs, vCPUs, memory, disk, snapshots): counted by the
//!   manager from what exists, plus what admitted requests are still creating;
//! - what a user makes *the daemon hold* in its own memory (running commands, terminal
//!   screens, the runs kept, buffers of open control files): counted only by the
//!   [`Reservation`]s that hold them, taken before the memory is, released when it is
//!   ([`Resource::held`]).
//!
//! Invariants:
//! - Per-user limits give EDQUOT; host-wide limits give EAGAIN (what frees up as others
//!   delete VMs or end commands) or ENOSPC (disk, snapshots).
//! - root (uid 0) is held to the host-wide limits only.
//! - A VM counts from `create` to `rmdir`, whatever its state, with its configured vCPUs,
//!   memory and disk size; a snapshot counts with the bytes its files occupy.
mod ledger;

pub use ledger::{Limits, Reservation};

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// Where the limits file is unless `--limits` or `BANDSOX_LIMITS` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/bandsox/limits";
/// Environment variable naming the limits file.
pub const ENV: &str = "BANDSOX_LIMITS";

/// Bytes of daemon memory one terminal cell can cost: the emulator keeps 32-byte cells
/// for its main screen and, once a program switched to it, its alternate screen.
pub const CELL_BYTES: u64 = 64;
/// Bytes of daemon memory one running command can hold besides its screen: the
/// output the agent may send ahead of the spool (its 256 KiB credit window plus one
/// chunk) and the run's own state.
pub const RUN_BYTES: u64 = 320 * 1024;
/// What every open control-tree file counts against `buffer_mib`, besides its content.
pub const HANDLE_BYTES: u64 = 512;
/// Bytes of daemon memory one kept run (running or finished) costs: its record in the
/// VM's table of runs (272 bytes, measured) with its path and change channel.
pub const KEPT_RUN_BYTES: u64 = 512;

const MIB: u64 = 1024 * 1024;

/// The counted resources, in the order of [`Amounts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Vms,
    Vcpus,
    MemoryMib,
    DiskMib,
    Snapshots,
    SnapshotMib,
    /// Commands running (or being written to an `exec` descriptor).
    Runs,
    /// `rows × cols` of the terminal screens the daemon emulates.
    TerminalCells,
    /// Runs kept in the VMs' `runs/` (running or finished).
    KeptRuns,
    /// Bytes held for open control files: unstarted `exec` scripts, unterminated `ctl`
    /// lines, contents rendered at open, writes waiting for a command. Counted in
    /// bytes, limited in MiB.
    BufferMib,
}

/// How many resources there are.
pub const RESOURCES: usize = 10;

impl Resource {
    pub const ALL: [Resource; RESOURCES] = [
        Resource::Vms,
        Resource::Vcpus,
        Resource::MemoryMib,
        Resource::DiskMib,
        Resource::Snapshots,
        Resource::SnapshotMib,
        Resource::Runs,
        Resource::TerminalCells,
        Resource::KeptRuns,
        Resource::BufferMib,
    ];
    pub fn key(self) -> &'static str {
        match self {
            Resource::Vms => "vms",
            Resource::Vcpus => "vcpus",
            Resource::MemoryMib => "memory_mib",
            Resource::DiskMib => "disk_mib",
            Resource::Snapshots => "snapshots",
            Resource::SnapshotMib => "snapshot_mib",
            Resource::Runs => "runs",
            Resource::TerminalCells => "terminal_cells",
            Resource::KeptRuns => "kept_runs",
            Resource::BufferMib => "buffer_mib",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
    fn from_key(k: &str) -> Option<Resource> {
        Resource::ALL.into_iter().find(|r| r.key() == k)
    }
    /// Whether only [`Reservation`]s count this resource (what the daemon holds in its
    /// memory), not the manager's view of what exists.
    pub fn held(self) -> bool {
        matches!(
            self,
            Resource::Runs | Resource::TerminalCells | Resource::KeptRuns | Resource::BufferMib
        )
    }
    /// Units of [`Amounts`] per unit of the limit (`buffer_mib` is counted in bytes).
    fn unit(self) -> u64 {
        match self {
            Resource::BufferMib => MIB,
            _ => 1,
        }
    }
    /// An amount in the limit's unit (rounded up), as `usage` and messages show it.
    fn shown(self, amount: u64) -> u64 {
        amount.div_ceil(self.unit())
    }
    /// What a host-wide refusal answers: EAGAIN for what frees up as others delete VMs
    /// or end commands, ENOSPC for storage.
    fn host_errno(self) -> i32 {
        match self {
            Resource::DiskMib | Resource::Snapshots | Resource::SnapshotMib => libc::ENOSPC,
            _ => libc::EAGAIN,
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
            Resource::Runs => "commands running (or being written to exec)",
            Resource::TerminalCells => "terminal cells (rows x cols)",
            Resource::KeptRuns => "runs kept (running or finished)",
            Resource::BufferMib => "MiB held for open control files",
        }
    }
}

/// One number per [`Resource`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amounts(pub [u64; RESOURCES]);

impl Amounts {
    pub fn get(&self, r: Resource) -> u64 {
        self.0[r.index()]
    }
    pub fn set(&mut self, r: Resource, v: u64) {
        self.0[r.index()] = v;
    }
    /// Only `r`, `v` of it.
    pub fn of(r: Resource, v: u64) -> Amounts {
        let mut a = Amounts::default();
        a.set(r, v);
        a
    }
    pub fn add(&mut self, other: &Amounts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.saturating_add(b);
        }
    }
    pub fn sub(&mut self, other: &Amounts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.saturating_sub(b);
        }
    }
    /// What one VM counts for.
    pub fn vm(vcpus: u32, memory_mib: u32, disk_mib: u64) -> Amounts {
        let mut a = Amounts::default();
        a.set(Resource::Vms, 1);
        a.set(Resource::Vcpus, vcpus.into());
        a.set(Resource::MemoryMib, memory_mib.into());
        a.set(Resource::DiskMib, disk_mib);
        a
    }
    /// What one snapshot of `mib` MiB counts for.
    pub fn snapshot(mib: u64) -> Amounts {
        let mut a = Amounts::of(Resource::Snapshots, 1);
        a.set(Resource::SnapshotMib, mib);
        a
    }
    /// What one kept run counts for.
    pub fn kept_run() -> Amounts {
        Amounts::of(Resource::KeptRuns, 1)
    }
    /// What one running command counts for (its run is kept too); `cells` of a
    /// terminal screen (0: none).
    pub fn run(cells: u64) -> Amounts {
        let mut a = Amounts::kept_run();
        a.set(Resource::Runs, 1);
        a.set(Resource::TerminalCells, cells);
        a
    }
    /// `bytes` held for an open file.
    pub fn buffer(bytes: u64) -> Amounts {
        Amounts::of(Resource::BufferMib, bytes)
    }
    pub fn times(mut self, n: u64) -> Amounts {
        for a in self.0.iter_mut() {
            *a = a.saturating_mul(n);
        }
        self
    }
}

/// Per-resource limits; `None` = unlimited.
pub type LimitRow = [Option<u64>; RESOURCES];

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
    pub users: BTreeMap<u32, [Option<Option<u64>>; RESOURCES]>,
    pub vm: VmCaps,
}

/// What the defaults are derived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFacts {
    pub mem_total_mib: u64,
    pub cpus: u64,
    /// Size of the filesystem holding the state directory.
    pub state_fs_mib: u64,
    /// The daemon's open-file limit (`RLIMIT_NOFILE`, soft): each running command
    /// holds three files of its spool.
    pub open_files: u64,
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
            .map(|s| s.blocks() * s.fragment_size() / MIB)
            .unwrap_or(64 * 1024);
        let open_files = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024);
        HostFacts {
            mem_total_mib,
            cpus,
            state_fs_mib,
            open_files,
        }
    }
}

impl LimitSet {
    /// The defaults for a host (documented in docs/service.md):
    /// - host memory: what the host can back without swapping: MemTotal minus a reserve
    ///   for the host itself (1/8 of it, at least 1 GiB);
    /// - host vCPUs: 16 per host CPU (vCPUs are threads; idle ones cost nothing);
    /// - host VMs: one per 64 MiB of that memory (the smallest VM), at most 1024;
    /// - host disk: the state directory's filesystem size (configured disk sizes);
    /// - host snapshots: 256, using at most half of that filesystem;
    /// - what the daemon holds for users: at most 1/16 of MemTotal in all, half of it
    ///   for terminal screens ([`CELL_BYTES`] a cell), a quarter for the runs kept
    ///   ([`KEPT_RUN_BYTES`] each), an eighth for running commands ([`RUN_BYTES`]
    ///   each, and no more than an eighth of the daemon's open-file limit: three files
    ///   each), an eighth for buffers;
    /// - per user: a quarter of each host value (at least one VM's worth, one
    ///   1000x1000 terminal, 16 commands, 10,000 kept runs and 16 MiB of buffers), 32
    ///   snapshots.
    pub fn defaults(f: &HostFacts) -> LimitSet {
        let memory = f
            .mem_total_mib
            .saturating_sub((f.mem_total_mib / 8).max(1024))
            .max(256);
        let vcpus = f.cpus * 16;
        let vms = (memory / 64).clamp(1, 1024);
        let disk = f.state_fs_mib.max(1024);
        let snap_mib = (f.state_fs_mib / 2).max(512);
        let daemon = (f.mem_total_mib * MIB / 16).max(256 * MIB);
        let cells = (daemon / 2 / CELL_BYTES).max(1_000_000);
        let kept = (daemon / 4 / KEPT_RUN_BYTES).max(10_000);
        let runs = (daemon / 8 / RUN_BYTES).min(f.open_files / 8).max(16);
        let buffer_mib = (daemon / 8 / MIB).max(16);
        let host = [
            Some(vms),
            Some(vcpus),
            Some(memory),
            Some(disk),
            Some(256),
            Some(snap_mib),
            Some(runs),
            Some(cells),
            Some(kept),
            Some(buffer_mib),
        ];
        let per_user = [
            Some((vms / 4).max(1)),
            Some((vcpus / 4).max(1)),
            Some((memory / 4).max(256)),
            Some((disk / 4).max(1024)),
            Some(32),
            Some((snap_mib / 4).max(512)),
            Some((runs / 4).max(16).min(runs)),
            Some((cells / 4).max(1_000_000).min(cells)),
            Some((kept / 4).max(10_000).min(kept)),
            Some((buffer_mib / 4).max(16).min(buffer_mib)),
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
                    let v = num()?.unwrap_or(u64::MAX / MIB);
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

    /// Whether `uid`'s limit on `r` comes from a `user.` line.
    fn overridden(&self, uid: u32, r: Resource) -> bool {
        self.users.get(&uid).is_some_and(|o| o[r.index()].is_some())
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

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn facts() -> HostFacts {
        HostFacts {
            mem_total_mib: 24 * 1024,
            cpus: 2,
            state_fs_mib: 100 * 1024,
            open_files: 65536,
        }
    }

    #[test]
    fn defaults_follow_the_host() {
        let d = LimitSet::defaults(&facts());
        assert_eq!(d.host[Resource::MemoryMib.index()], Some(24 * 1024 - 3072));
        assert_eq!(d.host[Resource::Vcpus.index()], Some(32));
        assert_eq!(d.per_user[Resource::Vcpus.index()], Some(8));
        assert_eq!(d.host[Resource::DiskMib.index()], Some(100 * 1024));
        // 1.5 GiB for what the daemon holds: half for screens, a quarter for kept runs,
        // an eighth each for commands and buffers.
        assert_eq!(
            d.host[Resource::TerminalCells.index()],
            Some(1536 * MIB / 2 / CELL_BYTES)
        );
        assert_eq!(d.host[Resource::KeptRuns.index()], Some(786_432));
        assert_eq!(d.per_user[Resource::KeptRuns.index()], Some(196_608));
        assert_eq!(d.host[Resource::Runs.index()], Some(614));
        assert_eq!(d.per_user[Resource::Runs.index()], Some(153));
        assert_eq!(d.host[Resource::BufferMib.index()], Some(192));
        assert_eq!(d.per_user[Resource::BufferMib.index()], Some(48));
        let small = LimitSet::defaults(&HostFacts {
            mem_total_mib: 1024,
            cpus: 1,
            state_fs_mib: 100,
            open_files: 1024,
        });
        assert_eq!(small.host[Resource::MemoryMib.index()], Some(256));
        assert_eq!(small.host[Resource::Vms.index()], Some(4));
        // 256 MiB for the daemon: an eighth of it for commands (102), under an eighth of
        // the open-file limit (128); at least 16 per user.
        assert_eq!(small.host[Resource::Runs.index()], Some(102));
        assert_eq!(small.per_user[Resource::Runs.index()], Some(25));
        assert_eq!(small.per_user[Resource::KeptRuns.index()], Some(32_768));
        // At least one 1000x1000 terminal, per user and in all.
        assert_eq!(small.host[Resource::TerminalCells.index()], Some(2_097_152));
        assert_eq!(
            small.per_user[Resource::TerminalCells.index()],
            Some(1_000_000)
        );
    }

    #[test]
    fn parse_keys_and_errors() {
        let d = LimitSet::defaults(&facts());
        let s = d
            .parse(
                "# comment\nper_user.vms = 2\nhost.memory_mib=unlimited\nuser.1000.vms = 5 # more\nvm.console_mib = 1\n\
                 per_user.runs = 3\nhost.terminal_cells = 10000\nuser.1000.buffer_mib = 2\n",
            )
            .unwrap();
        assert_eq!(s.per_user[0], Some(2));
        assert_eq!(s.host[Resource::MemoryMib.index()], None);
        assert_eq!(s.row_for(1000).unwrap()[0], Some(5));
        assert_eq!(s.row_for(1001).unwrap()[0], Some(2));
        assert_eq!(s.row_for(0), None);
        assert_eq!(s.vm.console_mib, 1);
        assert_eq!(s.per_user[Resource::Runs.index()], Some(3));
        assert_eq!(s.host[Resource::TerminalCells.index()], Some(10000));
        assert_eq!(
            s.row_for(1000).unwrap()[Resource::BufferMib.index()],
            Some(2)
        );
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
}
