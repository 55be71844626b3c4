//! Per-VMM cgroup v2 placement: each VMM process runs in `/sys/fs/cgroup/bandsox/vm-<id>`
//! with `memory.max` = guest memory + the VMM's overhead and `cpu.max` = its vCPUs, so a
//! guest cannot take more of the host than it was given.
//!
//! - Used when the daemon is root and `/sys/fs/cgroup` is a cgroup v2 mount offering the
//!   `memory` and `cpu` controllers; otherwise VMMs run unconfined and the daemon log and
//!   every VM's `info` (`"cgroup"`) say why.
//! - The same settings ([`settings`]) go to Firecracker's jailer as `--cgroup` arguments
//!   (`jailer_args`), with the same parent (`bandsox`), so both ways of starting a VMM
//!   give it the same limits.
//! - A VMM is moved into its cgroup ([`confine`]) as soon as its backend's launch or
//!   restore returns, before the guest has touched most of its memory (QEMU and
//!   Firecracker map guest memory lazily); a process started by a jailer that already
//!   put it below `bandsox/` is left where it is. [`Placement::join_from_child`] does the
//!   same between fork and exec for callers that can place a child before it runs.
//! - The cgroup is removed when the VM stops or is deleted (and reused when it exists).
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The parent cgroup of every VMM (below the cgroup v2 root); the jailer's
/// `--parent-cgroup` is the same.
pub const PARENT: &str = "bandsox";
/// `cpu.max` period (µs).
pub const CPU_PERIOD: u64 = 100_000;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// What a VMM needs on top of its guest's memory (MiB), per kind of VMM.
pub fn overhead_mib(vmm: &str, emulated: bool, memory_mib: u32) -> u64 {
    let m = u64::from(memory_mib);
    match (vmm, emulated) {
        // TCG keeps a translation cache of guest code next to guest memory.
        ("qemu", true) => 512 + m / 8,
        ("qemu", false) => 128 + m / 8,
        // Firecracker's own footprint is a few MiB.
        _ => 32 + m / 16,
    }
}

/// The cgroup v2 files and values for a VMM with `vcpus` and `memory_mib` of guest
/// memory, plus `overhead_mib`.
pub fn settings(vcpus: u32, memory_mib: u32, overhead: u64) -> Vec<(&'static str, String)> {
    let bytes = (u64::from(memory_mib) + overhead) * 1024 * 1024;
    vec![
        ("memory.max", bytes.to_string()),
        // Guest memory must not be pushed to swap behind the guest's back.
        ("memory.swap.max", "0".into()),
        (
            "cpu.max",
            format!("{} {CPU_PERIOD}", u64::from(vcpus.max(1)) * CPU_PERIOD),
        ),
    ]
}

/// The jailer's arguments for the same settings.
pub fn jailer_args(vcpus: u32, memory_mib: u32, overhead: u64) -> Vec<String> {
    let mut a = vec![
        "--cgroup-version".to_string(),
        "2".into(),
        "--parent-cgroup".into(),
        PARENT.into(),
    ];
    for (k, v) in settings(vcpus, memory_mib, overhead) {
        a.push("--cgroup".into());
        a.push(format!("{k}={v}"));
    }
    a
}

/// Where VMM cgroups go, or why there are none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    /// The cgroup v2 root (normally `/sys/fs/cgroup`).
    V2(PathBuf),
    Unavailable(String),
}

static SUPPORT: OnceLock<Support> = OnceLock::new();

/// This host's support, decided once (and logged once).
pub fn support() -> &'static Support {
    SUPPORT.get_or_init(|| {
        let s = detect(
            Path::new("/sys/fs/cgroup"),
            nix::unistd::geteuid().is_root(),
        );
        match &s {
            Support::V2(root) => tracing::info!(
                "cgroup v2: each VMM runs in {}/{PARENT}/vm-<id> with memory.max and cpu.max",
                root.display()
            ),
            Support::Unavailable(why) => tracing::warn!(
                "cgroup v2 unavailable ({why}): VMMs run without a memory or CPU limit"
            ),
        }
        s
    })
}

/// Can VMM cgroups be made under `root`?
pub fn detect(root: &Path, is_root: bool) -> Support {
    if !is_root {
        return Support::Unavailable("the daemon is not root".into());
    }
    // The f_type word is i64 on x86-64 but not on every target.
    #[allow(clippy::unnecessary_cast)]
    let magic = |fs: &nix::sys::statfs::Statfs| fs.filesystem_type().0 as i64;
    match nix::sys::statfs::statfs(root) {
        Ok(fs) if magic(&fs) == CGROUP2_SUPER_MAGIC => {}
        Ok(_) => {
            return Support::Unavailable(format!(
                "{} is not a cgroup v2 mount (cgroup v1 or hybrid hierarchy)",
                root.display()
            ))
        }
        Err(e) => return Support::Unavailable(format!("{}: {e}", root.display())),
    }
    check_controllers(root)
}

/// The `memory` and `cpu` controllers must be available at `root`.
fn check_controllers(root: &Path) -> Support {
    let have = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let words: Vec<&str> = have.split_whitespace().collect();
    for c in ["memory", "cpu"] {
        if !words.contains(&c) {
            return Support::Unavailable(format!(
                "the {c} controller is not available in {}/cgroup.controllers",
                root.display()
            ));
        }
    }
    Support::V2(root.to_path_buf())
}

/// A VMM's cgroup, made and configured, ready for the child to join.
#[derive(Debug, Clone)]
pub struct Placement {
    pub dir: PathBuf,
    /// `<dir>/cgroup.procs` as a C string, for the child (no allocation after fork).
    procs: std::ffi::CString,
}

impl Placement {
    /// Make (or reuse) `<root>/bandsox/vm-<id>` and write the settings into it.
    pub fn create(
        root: &Path,
        vm_id: &str,
        settings: &[(&str, String)],
    ) -> Result<Placement, String> {
        let parent = root.join(PARENT);
        std::fs::create_dir_all(&parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        // Controllers must be enabled on the way down (a no-op when already on).
        for d in [root, parent.as_path()] {
            let ctl = d.join("cgroup.subtree_control");
            std::fs::write(&ctl, "+memory +cpu")
                .map_err(|e| format!("enable memory and cpu in {}: {e}", ctl.display()))?;
        }
        let dir = parent.join(format!("vm-{vm_id}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        }
        for (file, value) in settings {
            let p = dir.join(file);
            // memory.swap.max is missing where swap accounting is off: not an error.
            if *file == "memory.swap.max" && !p.exists() {
                continue;
            }
            std::fs::write(&p, value).map_err(|e| format!("{} = {value}: {e}", p.display()))?;
        }
        let procs = std::ffi::CString::new(dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
            .map_err(|_| "cgroup path contains NUL".to_string())?;
        Ok(Placement { dir, procs })
    }

    /// Join this cgroup. Runs in the child between fork and exec: only async-signal-safe
    /// calls (open, write, close) on data prepared before the fork; nothing allocates
    /// (nix passes a `CStr` path through as it is, and an `Errno` becomes an `io::Error`
    /// without allocating).
    pub fn join_from_child(&self) -> std::io::Result<()> {
        use nix::fcntl::OFlag;
        let flags = OFlag::O_WRONLY | OFlag::O_CLOEXEC;
        let fd = nix::fcntl::open(self.procs.as_c_str(), flags, nix::sys::stat::Mode::empty())?;
        // The descriptor is closed when `fd` drops.
        match nix::unistd::write(&fd, b"0")? {
            1 => Ok(()),
            _ => Err(std::io::Error::from_raw_os_error(libc::EIO)),
        }
    }
}

impl Placement {
    /// Move the running process `pid` (all its threads) into this cgroup.
    pub fn add_pid(&self, pid: u32) -> std::io::Result<()> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
    }
}

/// The cgroup v2 path of process `pid` (from `/proc/<pid>/cgroup`).
fn cgroup_of(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(String::from))
}

/// Put the VMM `pid` of VM `vm_id` into its own cgroup (see the module doc); returns
/// the cgroup's directory, or `None` where VMMs run unconfined.
pub fn confine(
    vm_id: &str,
    pid: u32,
    vcpus: u32,
    memory_mib: u32,
    overhead: u64,
) -> Option<PathBuf> {
    let Support::V2(_) = support() else {
        return None;
    };
    if cgroup_of(pid).is_some_and(|c| c.starts_with(&format!("/{PARENT}/"))) {
        return None; // the jailer placed it
    }
    let p = for_vmm(vm_id, vcpus, memory_mib, overhead)?;
    match p.add_pid(pid) {
        Ok(()) => Some(p.dir),
        Err(e) => {
            tracing::warn!(
                "VM {vm_id}: cannot move VMM {pid} into {}: {e}",
                p.dir.display()
            );
            None
        }
    }
}

/// The cgroup for a VMM about to start, or `None` (unsupported here: see [`support`]).
/// A failure to set it up is logged and the VMM starts unconfined.
pub fn for_vmm(vm_id: &str, vcpus: u32, memory_mib: u32, overhead: u64) -> Option<Placement> {
    let Support::V2(root) = support() else {
        return None;
    };
    match Placement::create(root, vm_id, &settings(vcpus, memory_mib, overhead)) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!("VM {vm_id}: no cgroup, the VMM runs unconfined: {e}");
            None
        }
    }
}

/// The VM id of a VM directory (its last path component).
pub fn vm_id_of(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Remove a VM's cgroup (its VMM is gone); fine when there is none.
pub fn remove(vm_id: &str) {
    if let Support::V2(root) = support() {
        let dir = root.join(PARENT).join(format!("vm-{vm_id}"));
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir(&dir) {
                tracing::debug!("cannot remove {}: {e}", dir.display());
            }
        }
    }
}

/// What `info` says about a VM's cgroup.
pub fn describe(vm_id: &str) -> String {
    match support() {
        Support::V2(root) => root
            .join(PARENT)
            .join(format!("vm-{vm_id}"))
            .display()
            .to_string(),
        Support::Unavailable(why) => format!("unavailable: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_follow_the_vm() {
        let s = settings(2, 256, 32);
        assert_eq!(s[0], ("memory.max", (288u64 * 1024 * 1024).to_string()));
        assert_eq!(s[2], ("cpu.max", "200000 100000".to_string()));
        let j = jailer_args(1, 128, 40);
        assert_eq!(
            &j[..4],
            ["--cgroup-version", "2", "--parent-cgroup", "bandsox"]
        );
        assert!(j.contains(&format!("memory.max={}", 168u64 * 1024 * 1024)));
        assert!(j.contains(&"cpu.max=100000 100000".to_string()));
        assert!(overhead_mib("qemu", true, 256) > overhead_mib("qemu", false, 256));
        assert!(overhead_mib("firecracker", false, 256) < 64);
    }

    #[test]
    fn detection_says_why_not() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            detect(d.path(), false),
            Support::Unavailable("the daemon is not root".into())
        );
        match detect(d.path(), true) {
            Support::Unavailable(why) => assert!(why.contains("not a cgroup v2 mount"), "{why}"),
            s => panic!("{s:?}"),
        }
        std::fs::write(d.path().join("cgroup.controllers"), "cpuset io memory pids").unwrap();
        match check_controllers(d.path()) {
            Support::Unavailable(why) => assert!(why.contains("the cpu controller"), "{why}"),
            s => panic!("{s:?}"),
        }
        std::fs::write(d.path().join("cgroup.controllers"), "cpu memory").unwrap();
        assert_eq!(
            check_controllers(d.path()),
            Support::V2(d.path().to_path_buf())
        );
    }

    #[test]
    fn own_cgroup_is_read_from_proc() {
        let c = cgroup_of(std::process::id());
        assert!(c.is_some_and(|c| c.starts_with('/')));
    }

    #[test]
    fn placement_writes_settings_and_the_child_joins() {
        // A stand-in tree of plain files: what the kernel would get written.
        let d = tempfile::tempdir().unwrap();
        let p = Placement::create(d.path(), "abc", &settings(1, 256, 32)).unwrap();
        let dir = d.path().join("bandsox/vm-abc");
        assert_eq!(p.dir, dir);
        assert_eq!(
            std::fs::read_to_string(d.path().join("bandsox/cgroup.subtree_control")).unwrap(),
            "+memory +cpu"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("cpu.max")).unwrap(),
            "100000 100000"
        );
        std::fs::write(dir.join("cgroup.procs"), "").unwrap();
        // The child writes "0" (itself) into cgroup.procs between fork and exec.
        let mut cmd = std::process::Command::new("true");
        let child_p = p.clone();
        use std::os::unix::process::CommandExt;
        // SAFETY: join_from_child only makes async-signal-safe calls.
        unsafe {
            cmd.pre_exec(move || child_p.join_from_child());
        }
        assert!(cmd.status().unwrap().success());
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.procs")).unwrap(),
            "0"
        );
        p.add_pid(42).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.procs")).unwrap(),
            "42"
        );
        // Re-creating an existing cgroup is fine.
        Placement::create(d.path(), "abc", &settings(1, 256, 32)).unwrap();
    }
}
