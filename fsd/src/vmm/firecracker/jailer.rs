//! Jailer mode: start Firecracker through Firecracker's `jailer`, which chroots it, drops
//! it to an unprivileged uid/gid, and optionally puts it in a cgroup.
//!
//! When it is used (`BANDSOX_JAILER`, read by [`JailerConfig::from_env`]):
//! - unset or empty: **on when the daemon runs as root and a jailer is found** (`jailer` on
//!   PATH, else `jailer` or `jailer-<suffix>` next to the Firecracker binary
//!   `firecracker-<suffix>`); off otherwise;
//! - `0`: off (Firecracker runs unjailed, as the daemon's user);
//! - `1`: on, `jailer` from PATH (an error when there is none);
//! - a path: on, that jailer.
//!
//! Settings:
//! - `BANDSOX_JAILER_UID` / `BANDSOX_JAILER_GID`: the ids Firecracker runs as
//!   (default 65534:65534, `nobody`/`nogroup`).
//! - `BANDSOX_JAILER_CGROUPS`: comma-separated `file=value` cgroup v2 settings (see
//!   [`JailCgroups`], the one place that turns them into jailer arguments).
//!
//! Layout: one jail per VM, inside the VM directory (`--chroot-base-dir <vm>/jail`), so
//! the jail root is `<vm>/jail/<exec name>/bx-<vm id>/root`, on the same filesystem as
//! the VM's files. The exec name is the file name of the Firecracker binary *after*
//! resolving symlinks, as the jailer does it (it canonicalizes `--exec-file` and names
//! the chroot, and the program it runs, after that file): with `firecracker ->
//! firecracker-v1.10.1-x86_64` the jail is `<vm>/jail/firecracker-v1.10.1-x86_64/...`.
//! [`ExecFile::resolve`] makes that resolution once per start, and the resolved path is
//! what the jailer is given, so both always agree, and the record (`firecracker.json`)
//! keeps it: a VM started before the link was moved is still recognised. The jail is wiped and rebuilt before every start (the jailer refuses
//! to reuse the device nodes it made last time). Files go in as hard links:
//! - shared, read-only files (the kernel, the initramfs, snapshot state and memory) keep
//!   their owner and mode: they are linked as they are when the jailed uid/gid can read
//!   them, else copied (reflink where the filesystem can) and the copy handed over.
//!   Nothing outside the jail changes owner or mode because of a jail;
//! - the VM's own writable files (its disk, Firecracker's log and metrics files) are
//!   linked and handed to the jailed uid/gid: they belong to that one VM.
//!
//! Inside the jail every path is relative to its root: `api.sock`, `vsock.sock`,
//! `vmlinux`, `initrd`, `disk.ext4`, the log and metrics files, snapshot files. The
//! serial console and stderr stay in the VM directory (they are the jailer's inherited
//! stdout/stderr: no `--daemonize`, no `--new-pid-ns`, so the pid we spawn is the pid that
//! becomes Firecracker, and `--netns` is not given: a TAP device of the daemon's network
//! namespace stays reachable).
//!
//! Invariants: the jail id is `bx-<vm dir name>` and satisfies the jailer's rule
//! (1-64 of `[A-Za-z0-9-]`); `--exec-file` is always a resolved path (no symlink), whose
//! file name contains `firecracker` (the jailer's own rule); the jailer exec's Firecracker as
//! `<exec name> --id <id> --start-time-us N --start-time-cpu-us N [--parent-cpu-time-us N]
//! <our arguments>` (two-argument `--id`, measured with jailer 1.17), which is how a jailed
//! process is recognised after a daemon restart ([`is_jailed_firecracker`]).
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::tools::find_tool;
use crate::vmm::VmmError;

pub const JAILER_ENV: &str = "BANDSOX_JAILER";
pub const JAILER_UID_ENV: &str = "BANDSOX_JAILER_UID";
pub const JAILER_GID_ENV: &str = "BANDSOX_JAILER_GID";
pub const JAILER_CGROUPS_ENV: &str = "BANDSOX_JAILER_CGROUPS";
/// The jail's base directory inside a VM directory.
pub const JAIL_DIR: &str = "jail";
/// Parent cgroup of every jailed VM (when cgroup settings are given).
pub const PARENT_CGROUP: &str = "bandsox";
/// Names of the files inside the jail root.
pub const JAIL_KERNEL: &str = "vmlinux";
pub const JAIL_INITRD: &str = "initrd";
pub const JAIL_DISK: &str = "disk.ext4";
/// Snapshot files while they are written by, or loaded into, a jailed Firecracker.
pub const JAIL_SNAP_STATE: &str = "snapshot.state";
pub const JAIL_SNAP_MEMORY: &str = "snapshot.memory";
/// The default jailed uid and gid (`nobody`/`nogroup` on Debian).
pub const DEFAULT_ID: u32 = 65534;

/// cgroup v2 settings the jailer applies to each VM's Firecracker: the one place that
/// knows how they are spelled on the jailer's command line and where the jailer puts the
/// VM's cgroup (`<cgroup2 mount>/bandsox/<jail id>`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JailCgroups {
    /// `file=value` pairs, e.g. `memory.max=1G`, `cpu.max=200000 100000`.
    pub settings: Vec<String>,
}

impl JailCgroups {
    /// Parse `BANDSOX_JAILER_CGROUPS`-style text: comma-separated `file=value`.
    pub fn parse(text: &str) -> Result<Self, VmmError> {
        let settings = text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                if s.split_once('=').is_some_and(|(k, _)| {
                    !k.is_empty() && !k.contains('/') && k.contains('.') && k != ".."
                }) {
                    Ok(s.to_string())
                } else {
                    Err(VmmError::Unavailable(format!(
                        "{JAILER_CGROUPS_ENV}: {s:?} is not FILE=VALUE (e.g. memory.max=1G)"
                    )))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(JailCgroups { settings })
    }

    /// The jailer's cgroup arguments (none when there are no settings, and then the
    /// jailer creates no cgroup).
    pub fn jailer_args(&self) -> Vec<String> {
        if self.settings.is_empty() {
            return Vec::new();
        }
        let mut args = vec![
            "--cgroup-version".into(),
            "2".into(),
            "--parent-cgroup".into(),
            PARENT_CGROUP.into(),
        ];
        for c in &self.settings {
            args.extend(["--cgroup".into(), c.clone()]);
        }
        args
    }

    /// The cgroup directory the jailer makes for jail `id` under the cgroup v2 mount
    /// `mount` (usually `/sys/fs/cgroup`).
    pub fn dir(mount: &Path, id: &str) -> PathBuf {
        mount.join(PARENT_CGROUP).join(id)
    }

    /// Where cgroup v2 is mounted (as the jailer finds it: the first `cgroup2` entry of
    /// `/proc/mounts`; `/sys/fs/cgroup` on a pure v2 host, `/sys/fs/cgroup/unified` on a
    /// hybrid one).
    pub fn mount_point() -> PathBuf {
        std::fs::read_to_string("/proc/self/mounts")
            .ok()
            .and_then(|m| {
                m.lines().find_map(|l| {
                    let mut f = l.split_whitespace();
                    let (_, at, fstype) = (f.next()?, f.next()?, f.next()?);
                    (fstype == "cgroup2").then(|| PathBuf::from(at))
                })
            })
            .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
    }

    /// Remove the (empty, process gone) cgroup of jail `id`, if the jailer made one.
    /// Best effort: a cgroup still holding a process cannot be removed and is left.
    pub fn remove(&self, id: &str) {
        if self.settings.is_empty() {
            return;
        }
        let d = Self::dir(&Self::mount_point(), id);
        match std::fs::remove_dir(&d) {
            Ok(()) => tracing::debug!(cgroup = %d.display(), "removed the jail's cgroup"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(cgroup = %d.display(), "cannot remove the jail's cgroup: {e}"),
        }
    }
}

/// The Firecracker binary as the jailer sees it: `--exec-file` canonicalized (every
/// symlink resolved). Its file name names the jail (`<base>/<name>/<id>/root`) and is the
/// program the jailed process runs (`/<name>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecFile {
    path: PathBuf,
    name: String,
}

impl ExecFile {
    /// Resolve `firecracker` exactly as the jailer will: `canonicalize`, a regular file,
    /// a UTF-8 file name containing `firecracker` (else the jailer refuses it).
    pub fn resolve(firecracker: &Path) -> Result<Self, VmmError> {
        let path = std::fs::canonicalize(firecracker).map_err(|e| {
            VmmError::StartFailed(format!(
                "cannot resolve the Firecracker binary {}: {e}",
                firecracker.display()
            ))
        })?;
        if !path.is_file() {
            return Err(VmmError::StartFailed(format!(
                "the Firecracker binary {} resolves to {}, which is not a file",
                firecracker.display(),
                path.display()
            )));
        }
        let exec = Self::recorded(&path)?;
        if !exec.name.contains("firecracker") {
            return Err(VmmError::StartFailed(format!(
                "the jailer only runs binaries whose name contains \"firecracker\", and {} \
                 resolves to {}",
                firecracker.display(),
                path.display()
            )));
        }
        Ok(exec)
    }

    /// An exec file as a record names it (already resolved when it was recorded); the
    /// file system is not consulted.
    pub fn recorded(path: &Path) -> Result<Self, VmmError> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                VmmError::StartFailed(format!(
                    "the Firecracker path {} has no UTF-8 file name",
                    path.display()
                ))
            })?;
        Ok(ExecFile {
            name: name.to_string(),
            path: path.to_path_buf(),
        })
    }

    /// The resolved path (given to the jailer as `--exec-file`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its file name: the jail's directory under the base, and the jailed program.
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerConfig {
    pub binary: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub cgroups: JailCgroups,
}

fn env_id(key: &str) -> Result<u32, VmmError> {
    match std::env::var(key) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .map_err(|_| VmmError::Unavailable(format!("{key}={v}: not a numeric id"))),
        _ => Ok(DEFAULT_ID),
    }
}

/// A jailer beside `firecracker`: `jailer`, or `jailer-<suffix>` for `firecracker-<suffix>`;
/// when `firecracker` is a symlink, also beside the file it resolves to (a release
/// tarball's `release-v1.10.1-x86_64/` holds `firecracker-v1.10.1-x86_64` and
/// `jailer-v1.10.1-x86_64`, and only the first may be linked onto PATH).
pub fn find_beside(firecracker: &Path) -> Option<PathBuf> {
    find_beside_file(firecracker).or_else(|| {
        let resolved = std::fs::canonicalize(firecracker).ok()?;
        (resolved != firecracker).then(|| find_beside_file(&resolved))?
    })
}

fn find_beside_file(firecracker: &Path) -> Option<PathBuf> {
    let dir = firecracker.parent()?;
    let name = firecracker.file_name()?.to_str()?;
    let mut candidates = vec![dir.join("jailer")];
    if let Some(suffix) = name.strip_prefix("firecracker-") {
        candidates.insert(0, dir.join(format!("jailer-{suffix}")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

impl JailerConfig {
    /// From the environment (see the module docs); `Ok(None)` when jailer mode is off.
    /// `firecracker` is the Firecracker binary in use (a jailer beside it counts as found).
    pub fn from_env(firecracker: &Path) -> Result<Option<JailerConfig>, VmmError> {
        let setting = std::env::var_os(JAILER_ENV).filter(|v| !v.is_empty());
        let binary = match setting {
            Some(v) if v == "0" => return Ok(None),
            Some(v) if v == "1" => find_tool("jailer").ok_or_else(|| {
                VmmError::Unavailable(format!(
                    "{JAILER_ENV}=1 but no `jailer` on PATH (or set {JAILER_ENV} to its path)"
                ))
            })?,
            Some(v) => PathBuf::from(v),
            None => {
                if !nix::unistd::geteuid().is_root() {
                    return Ok(None);
                }
                match find_tool("jailer").or_else(|| find_beside(firecracker)) {
                    Some(p) => p,
                    None => return Ok(None),
                }
            }
        };
        if !binary.is_file() {
            return Err(VmmError::Unavailable(format!(
                "jailer {} does not exist",
                binary.display()
            )));
        }
        let cgroups = JailCgroups::parse(&std::env::var(JAILER_CGROUPS_ENV).unwrap_or_default())?;
        Ok(Some(JailerConfig {
            binary,
            uid: env_id(JAILER_UID_ENV)?,
            gid: env_id(JAILER_GID_ENV)?,
            cgroups,
        }))
    }

    /// A jailer at `binary` with the default ids and no cgroups.
    pub fn new(binary: PathBuf) -> Self {
        JailerConfig {
            binary,
            uid: DEFAULT_ID,
            gid: DEFAULT_ID,
            cgroups: JailCgroups::default(),
        }
    }

    /// The jail id of the VM in `vm_dir`.
    pub fn jail_id(vm_dir: &Path) -> Result<String, VmmError> {
        let name = vm_dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let id = format!("bx-{name}");
        if name.is_empty()
            || id.len() > 64
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(VmmError::StartFailed(format!(
                "VM directory {} cannot name a jail (1-64 of [A-Za-z0-9-])",
                vm_dir.display()
            )));
        }
        Ok(id)
    }

    /// The jail's root directory (Firecracker's `/` and cwd) when the jailer runs `exec`.
    pub fn root(&self, vm_dir: &Path, exec: &ExecFile) -> Result<PathBuf, VmmError> {
        Ok(vm_dir
            .join(JAIL_DIR)
            .join(exec.name())
            .join(Self::jail_id(vm_dir)?)
            .join("root"))
    }

    /// The jailer's argv (argv[0] = the jailer) starting `exec` for `vm_dir` with
    /// `fc_args` (Firecracker's own arguments, after `--`).
    pub fn argv(
        &self,
        exec: &ExecFile,
        vm_dir: &Path,
        fc_args: &[String],
    ) -> Result<Vec<String>, VmmError> {
        let s = |p: &Path| {
            p.to_str()
                .map(String::from)
                .ok_or_else(|| VmmError::StartFailed(format!("{} is not UTF-8", p.display())))
        };
        let mut argv = vec![
            s(&self.binary)?,
            "--id".into(),
            Self::jail_id(vm_dir)?,
            "--exec-file".into(),
            s(exec.path())?,
            "--uid".into(),
            self.uid.to_string(),
            "--gid".into(),
            self.gid.to_string(),
            "--chroot-base-dir".into(),
            s(&vm_dir.join(JAIL_DIR))?,
        ];
        argv.extend(self.cgroups.jailer_args());
        argv.push("--".into());
        argv.extend(fc_args.iter().cloned());
        Ok(argv)
    }

    /// Wipe whatever an earlier start left in `vm_dir`'s jail and create an empty jail
    /// root owned by the jailed ids. The caller makes sure no Firecracker runs in it.
    pub fn reset(&self, vm_dir: &Path, root: &Path) -> Result<(), VmmError> {
        let base = vm_dir.join(JAIL_DIR);
        match std::fs::remove_dir_all(&base) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&base, e)),
        }
        std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
        self.own(root)
    }

    fn own(&self, p: &Path) -> Result<(), VmmError> {
        std::os::unix::fs::chown(p, Some(self.uid), Some(self.gid)).map_err(|e| io(p, e))
    }

    /// Can the jailed ids read `meta`'s file without it changing owner or mode?
    pub fn can_read(&self, meta: &std::fs::Metadata) -> bool {
        let mode = meta.mode();
        (meta.uid() == self.uid && mode & 0o400 != 0)
            || (meta.gid() == self.gid && mode & 0o040 != 0)
            || mode & 0o004 != 0
    }

    /// Put the shared, read-only file `src` into the jail `root` as `name`, leaving `src`
    /// exactly as it is: a hard link when the jailed ids can read it, else a private copy
    /// (reflinked where possible) given to them. Returns how.
    pub fn link_shared(&self, root: &Path, src: &Path, name: &str) -> Result<Placed, VmmError> {
        let dst = root.join(name);
        remove_if_present(&dst)?;
        let meta = std::fs::metadata(src).map_err(|e| io(src, e))?;
        if self.can_read(&meta) {
            hard_link(src, &dst)?;
            return Ok(Placed::Linked);
        }
        let t0 = std::time::Instant::now();
        let method = crate::disk::clone_disk(src, &dst).map_err(|e| io(&dst, e))?;
        self.own(&dst)?;
        let ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        tracing::info!(
            src = %src.display(),
            bytes = meta.len(),
            ms,
            ?method,
            "copied a file the jailed uid cannot read into the jail (make it readable, e.g. \
             mode 0644, to have it hard-linked instead)"
        );
        Ok(Placed::Copied { ms })
    }

    /// Put the VM's own writable file `src` into the jail as `name` (a hard link) and hand
    /// it to the jailed ids.
    pub fn link_private(&self, root: &Path, src: &Path, name: &str) -> Result<(), VmmError> {
        let dst = root.join(name);
        remove_if_present(&dst)?;
        hard_link(src, &dst)?;
        self.own(&dst)
    }
}

/// How [`JailerConfig::link_shared`] placed a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    Linked,
    Copied { ms: u64 },
}

fn io(p: &Path, e: std::io::Error) -> VmmError {
    VmmError::Io(p.display().to_string(), e)
}

fn remove_if_present(p: &Path) -> Result<(), VmmError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(p, e)),
    }
}

fn hard_link(src: &Path, dst: &Path) -> Result<(), VmmError> {
    std::fs::hard_link(src, dst).map_err(|e| {
        io(
            dst,
            std::io::Error::new(
                e.kind(),
                format!(
                    "hard-linking {} into the jail (the state directory must be one \
                     filesystem): {e}",
                    src.display()
                ),
            ),
        )
    })
}

/// What exists under a jail base directory (`<vm>/jail`): the directories down to the
/// jail roots' depth (`<exec name>/<id>/root`), relative to `base`, at most 8, for an error
/// that says which jail the jailer made when it is not the one expected.
pub fn found_jails(base: &Path) -> Vec<String> {
    const MAX: usize = 8;
    /// Depth of a jail root below the base: `<exec name>/<id>/root`.
    const ROOT_DEPTH: usize = 3;
    fn walk(base: &Path, rel: &Path, depth: usize, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(base.join(rel)) else {
            return;
        };
        let mut names: Vec<_> = entries.flatten().map(|e| e.file_name()).collect();
        names.sort();
        if names.is_empty() && depth > 0 {
            out.push(format!("{}/", rel.display()));
        }
        for n in names {
            if out.len() > MAX {
                return;
            }
            let child = rel.join(n);
            if depth + 1 < ROOT_DEPTH && base.join(&child).is_dir() {
                walk(base, &child, depth + 1, out);
            } else {
                out.push(child.display().to_string());
            }
        }
    }
    let mut found = Vec::new();
    walk(base, Path::new(""), 0, &mut found);
    if found.len() > MAX {
        found.truncate(MAX);
        found.push("...".into());
    }
    found
}

/// True when `running` (`/proc/<pid>/cmdline`) is the jailed Firecracker of jail `id`,
/// exec'd from a file named `exec_name` with our arguments `fc_args`: after its exec the
/// jailer's child runs `/<exec name> --id <id> --start-time-us N ... <fc_args>`.
/// `--id=<id>` is accepted too.
pub fn is_jailed_firecracker(
    running: &[String],
    exec_name: &str,
    id: &str,
    fc_args: &[String],
) -> bool {
    let name_ok = running
        .first()
        .and_then(|a| a.rsplit('/').next())
        .is_some_and(|n| n == exec_name);
    let id_ok = running.windows(2).any(|w| w[0] == "--id" && w[1] == id)
        || running.iter().any(|a| *a == format!("--id={id}"));
    name_ok && id_ok && running.len() > fc_args.len() && running.ends_with(fc_args)
}

/// The uid owning `p` (for tests and diagnostics).
pub fn owner(p: &Path) -> Option<u32> {
    std::fs::metadata(p).ok().map(|m| m.uid())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(cgroups: &[&str]) -> JailerConfig {
        JailerConfig {
            binary: "/usr/bin/jailer".into(),
            uid: 123,
            gid: 100,
            cgroups: JailCgroups {
                settings: cgroups.iter().map(|s| s.to_string()).collect(),
            },
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn argv_and_root() {
        let vm = Path::new("/var/lib/bandsox/vms/0123456789ab");
        let fc = &ExecFile::recorded(Path::new("/usr/local/bin/firecracker")).unwrap();
        let fc_args = strings(&["--api-sock", "api.sock"]);
        assert_eq!(
            cfg(&[]).argv(fc, vm, &fc_args).unwrap(),
            [
                "/usr/bin/jailer",
                "--id",
                "bx-0123456789ab",
                "--exec-file",
                "/usr/local/bin/firecracker",
                "--uid",
                "123",
                "--gid",
                "100",
                "--chroot-base-dir",
                "/var/lib/bandsox/vms/0123456789ab/jail",
                "--",
                "--api-sock",
                "api.sock"
            ]
        );
        let with = cfg(&["memory.max=1G", "cpu.max=200000 100000"])
            .argv(fc, vm, &fc_args)
            .unwrap();
        let tail: Vec<&str> = with[11..].iter().map(String::as_str).collect();
        assert_eq!(
            tail,
            [
                "--cgroup-version",
                "2",
                "--parent-cgroup",
                "bandsox",
                "--cgroup",
                "memory.max=1G",
                "--cgroup",
                "cpu.max=200000 100000",
                "--",
                "--api-sock",
                "api.sock"
            ]
        );
        assert_eq!(
            cfg(&[]).root(vm, fc).unwrap(),
            Path::new("/var/lib/bandsox/vms/0123456789ab/jail/firecracker/bx-0123456789ab/root")
        );
        assert!(JailerConfig::jail_id(Path::new("/x/a_b")).is_err());
        assert!(JailerConfig::jail_id(Path::new("/")).is_err());
    }

    /// The jailer canonicalizes `--exec-file` and names the jail after the file it
    /// finds: a link named `firecracker` (relative or absolute, chained or not) to a
    /// release binary gives that binary's name, and its argv carries the resolved path.
    #[test]
    fn exec_file_resolves_like_the_jailer() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().canonicalize().unwrap();
        let real = d.join("firecracker-v1.10.1-x86_64");
        std::fs::write(&real, "").unwrap();
        symlink("firecracker-v1.10.1-x86_64", d.join("firecracker")).unwrap();
        std::fs::create_dir(d.join("bin")).unwrap();
        symlink(d.join("firecracker"), d.join("bin/firecracker")).unwrap();
        for link in [
            real.clone(),
            d.join("firecracker"),
            d.join("bin/firecracker"),
        ] {
            let e = ExecFile::resolve(&link).unwrap();
            assert_eq!(e.path(), real, "{}", link.display());
            assert_eq!(e.name(), "firecracker-v1.10.1-x86_64");
        }
        let e = ExecFile::resolve(&d.join("bin/firecracker")).unwrap();
        let vm = Path::new("/s/vms/0123");
        assert_eq!(
            cfg(&[]).root(vm, &e).unwrap(),
            Path::new("/s/vms/0123/jail/firecracker-v1.10.1-x86_64/bx-0123/root")
        );
        let argv = cfg(&[]).argv(&e, vm, &[]).unwrap();
        assert_eq!(
            argv[4],
            real.to_str().unwrap(),
            "the resolved path is given"
        );
        // The jailer's own refusals, said before it runs: a link to a binary whose name
        // lacks "firecracker", a missing file, a directory.
        std::fs::write(d.join("fc-bin"), "").unwrap();
        symlink("fc-bin", d.join("firecracker-link")).unwrap();
        let err = ExecFile::resolve(&d.join("firecracker-link")).unwrap_err();
        assert!(err.to_string().contains("fc-bin"), "{err}");
        symlink("nowhere", d.join("firecracker-dangling")).unwrap();
        assert!(ExecFile::resolve(&d.join("firecracker-dangling")).is_err());
        std::fs::create_dir(d.join("firecracker-dir")).unwrap();
        assert!(ExecFile::resolve(&d.join("firecracker-dir")).is_err());
    }

    #[test]
    fn found_jails_says_what_the_jailer_made() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("jail");
        assert!(found_jails(&base).is_empty(), "no base: nothing");
        std::fs::create_dir_all(base.join("firecracker-1.17.0-dev/bx-1/root/dev")).unwrap();
        std::fs::create_dir_all(base.join("firecracker/bx-1")).unwrap();
        assert_eq!(
            found_jails(&base),
            ["firecracker/bx-1/", "firecracker-1.17.0-dev/bx-1/root"]
        );
        for i in 0..20 {
            std::fs::create_dir_all(base.join(format!("x{i:02}"))).unwrap();
        }
        let many = found_jails(&base);
        assert_eq!(many.len(), 9);
        assert_eq!(many.last().map(String::as_str), Some("..."));
    }

    #[test]
    fn jailer_beside_a_linked_firecracker() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let rel = tmp.path().join("release-v1.10.1-x86_64");
        std::fs::create_dir(&rel).unwrap();
        std::fs::write(rel.join("firecracker-v1.10.1-x86_64"), "").unwrap();
        std::fs::write(rel.join("jailer-v1.10.1-x86_64"), "").unwrap();
        let bin = tmp.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        symlink(
            rel.join("firecracker-v1.10.1-x86_64"),
            bin.join("firecracker"),
        )
        .unwrap();
        assert_eq!(
            find_beside(&bin.join("firecracker")),
            Some(rel.canonicalize().unwrap().join("jailer-v1.10.1-x86_64"))
        );
    }

    #[test]
    fn cgroup_settings_parse() {
        let c = JailCgroups::parse(" memory.max=1G, cpu.max=200000 100000 ,").unwrap();
        assert_eq!(c.settings, ["memory.max=1G", "cpu.max=200000 100000"]);
        assert!(JailCgroups::parse("").unwrap().jailer_args().is_empty());
        for bad in ["memory", "=1", "../x.y=1", "a/b.c=1", "nodot=1"] {
            assert!(JailCgroups::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            JailCgroups::dir(Path::new("/sys/fs/cgroup"), "bx-1"),
            Path::new("/sys/fs/cgroup/bandsox/bx-1")
        );
    }

    #[test]
    fn jailer_beside_firecracker() {
        let tmp = tempfile::tempdir().unwrap();
        let fc = tmp.path().join("firecracker-1.17.0-dev");
        assert_eq!(find_beside(&fc), None);
        std::fs::write(tmp.path().join("jailer"), "").unwrap();
        assert_eq!(find_beside(&fc), Some(tmp.path().join("jailer")));
        std::fs::write(tmp.path().join("jailer-1.17.0-dev"), "").unwrap();
        assert_eq!(find_beside(&fc), Some(tmp.path().join("jailer-1.17.0-dev")));
    }

    /// Shared files are linked untouched when readable, copied otherwise; private files
    /// are linked and handed over; reset wipes everything an earlier start left.
    #[test]
    fn linking_leaves_shared_files_alone() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let vm = tmp.path().join("0123");
        std::fs::create_dir(&vm).unwrap();
        let shared = tmp.path().join("vmlinux");
        std::fs::write(&shared, b"kernel").unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o644)).unwrap();
        let secret = tmp.path().join("initrd");
        std::fs::write(&secret, b"initrd").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let disk = vm.join("disk.ext4");
        std::fs::write(&disk, b"disk").unwrap();
        let (me, mygid) = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        // As root, hand files to another uid; otherwise (no chown rights) to ourselves,
        // with a gid we are not in the way of.
        let c = JailerConfig {
            uid: if me == 0 { 4321 } else { me },
            gid: if me == 0 { 4321 } else { mygid },
            ..cfg(&[])
        };
        let exec = ExecFile::recorded(Path::new("/x/firecracker")).unwrap();
        let root = c.root(&vm, &exec).unwrap();
        std::fs::create_dir_all(root.join("dev")).unwrap();
        std::fs::write(root.join("dev/stale"), b"").unwrap();
        c.reset(&vm, &root).unwrap();
        assert!(!root.join("dev").exists(), "reset wipes the old jail");
        let before = |p: &Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.uid(), m.gid(), m.mode())
        };
        let (s0, i0) = (before(&shared), before(&secret));
        assert_eq!(
            c.link_shared(&root, &shared, JAIL_KERNEL).unwrap(),
            Placed::Linked
        );
        let placed = c.link_shared(&root, &secret, JAIL_INITRD).unwrap();
        if me == 0 {
            assert!(matches!(placed, Placed::Copied { .. }), "{placed:?}");
            assert_ne!(
                std::fs::metadata(root.join(JAIL_INITRD)).unwrap().ino(),
                std::fs::metadata(&secret).unwrap().ino()
            );
            assert_eq!(owner(&root.join(JAIL_INITRD)), Some(4321));
        }
        assert_eq!(std::fs::read(root.join(JAIL_INITRD)).unwrap(), b"initrd");
        assert_eq!(
            std::fs::metadata(root.join(JAIL_KERNEL)).unwrap().ino(),
            std::fs::metadata(&shared).unwrap().ino(),
            "a hard link, not a copy"
        );
        assert_eq!(before(&shared), s0, "the shared kernel is unchanged");
        assert_eq!(before(&secret), i0, "the unreadable file is unchanged");
        c.link_private(&root, &disk, JAIL_DISK).unwrap();
        c.link_private(&root, &disk, JAIL_DISK).unwrap(); // again: replaced
        assert_eq!(std::fs::read(root.join(JAIL_DISK)).unwrap(), b"disk");
        assert_eq!(owner(&disk), Some(c.uid));
        assert_eq!(owner(&root), Some(c.uid));
    }

    #[test]
    fn readability_by_the_jailed_ids() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("f");
        std::fs::write(&f, b"").unwrap();
        let m = std::fs::metadata(&f).unwrap();
        let c = JailerConfig {
            uid: m.uid() + 1,
            gid: m.gid() + 1,
            ..cfg(&[])
        };
        for (mode, readable) in [(0o644, true), (0o640, false), (0o600, false), (0o604, true)] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            let m = std::fs::metadata(&f).unwrap();
            assert_eq!(c.can_read(&m), readable, "{mode:o}");
        }
        let same_gid = JailerConfig { gid: m.gid(), ..c };
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(same_gid.can_read(&std::fs::metadata(&f).unwrap()));
    }

    #[test]
    fn recognises_the_jailed_process() {
        let ours = strings(&["--api-sock", "api.sock", "--log-path", "firecracker.log"]);
        // As measured with jailer 1.17: `--id` and its value are two arguments.
        let argv = strings(&[
            "/firecracker-1.16.1",
            "--id",
            "bx-0123",
            "--start-time-us",
            "5",
            "--start-time-cpu-us",
            "1",
            "--parent-cpu-time-us",
            "2",
            "--api-sock",
            "api.sock",
            "--log-path",
            "firecracker.log",
        ]);
        assert!(is_jailed_firecracker(
            &argv,
            "firecracker-1.16.1",
            "bx-0123",
            &ours
        ));
        assert!(!is_jailed_firecracker(
            &argv,
            "firecracker-1.16.1",
            "bx-9999",
            &ours
        ));
        assert!(!is_jailed_firecracker(
            &argv,
            "firecracker",
            "bx-0123",
            &ours
        ));
        assert!(!is_jailed_firecracker(
            &argv[..9],
            "firecracker-1.16.1",
            "bx-0123",
            &ours
        ));
        let mut one_arg = strings(&["/firecracker", "--id=bx-0123"]);
        one_arg.extend(ours.iter().cloned());
        assert!(is_jailed_firecracker(
            &one_arg,
            "firecracker",
            "bx-0123",
            &ours
        ));
    }
}
