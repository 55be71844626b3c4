//! Optional jailer mode: start Firecracker through Firecracker's `jailer`, which chroots
//! it, drops it to an unprivileged uid/gid, and optionally puts it in a cgroup.
//!
//! Turned on by `BANDSOX_JAILER` (a path, or `1` for `jailer` on PATH). Settings:
//! - `BANDSOX_JAILER_UID` / `BANDSOX_JAILER_GID`: the ids Firecracker runs as
//!   (default 65534:65534, `nobody`/`nogroup`).
//! - `BANDSOX_JAILER_CGROUPS`: comma-separated `file=value` cgroup v2 settings, e.g.
//!   `memory.max=1G,cpu.max=200000 100000`; passed as `--cgroup` with
//!   `--cgroup-version 2` and parent cgroup `bandsox`. The controllers must be enabled in
//!   the parent's `cgroup.subtree_control`.
//!
//! Layout: the jail lives inside the VM directory (`--chroot-base-dir <vm>/jail`), so
//! the jail root is `<vm>/jail/<exec name>/bx-<vm id>/root` on the same filesystem as
//! the VM's files, and the kernel, initramfs and disk are *hard-linked* into it (no
//! copies) and handed to the jailed uid. Inside the jail every path is relative to its
//! root: `api.sock`, `vsock.sock`, `vmlinux`, `initrd`, `disk.ext4`, the logger and
//! metrics files. The serial console and stderr stay in the VM directory (they are the
//! jailer's inherited stdout/stderr: no `--daemonize`, no `--new-pid-ns`, so the pid we
//! spawn is the pid that becomes Firecracker).
//!
//! Invariants: the jail id is `bx-<vm dir name>` and satisfies the jailer's rule
//! (1-64 of `[A-Za-z0-9-]`); [`JailerConfig::prepare`] leaves every file the jailed
//! process needs owned by its uid/gid, and nothing else is changed outside the jail.
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::vmm::qemu::find_in_path;
use crate::vmm::VmmError;

pub const JAILER_ENV: &str = "BANDSOX_JAILER";
pub const JAILER_UID_ENV: &str = "BANDSOX_JAILER_UID";
pub const JAILER_GID_ENV: &str = "BANDSOX_JAILER_GID";
pub const JAILER_CGROUPS_ENV: &str = "BANDSOX_JAILER_CGROUPS";
/// The jail's base directory inside a VM directory.
pub const JAIL_DIR: &str = "jail";
/// Parent cgroup of every jailed VM (when cgroup settings are given).
pub const PARENT_CGROUP: &str = "bandsox";
/// Names of the hard links inside the jail root.
pub const JAIL_KERNEL: &str = "vmlinux";
pub const JAIL_INITRD: &str = "initrd";
pub const JAIL_DISK: &str = "disk.ext4";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerConfig {
    pub binary: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// cgroup v2 `file=value` settings.
    pub cgroups: Vec<String>,
}

fn env_id(key: &str) -> Result<u32, VmmError> {
    match std::env::var(key) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .map_err(|_| VmmError::Unavailable(format!("{key}={v}: not a numeric id"))),
        _ => Ok(65534),
    }
}

impl JailerConfig {
    /// From the environment; `Ok(None)` when jailer mode is off.
    pub fn from_env() -> Result<Option<JailerConfig>, VmmError> {
        let Some(v) = std::env::var_os(JAILER_ENV).filter(|v| !v.is_empty() && v != "0") else {
            return Ok(None);
        };
        let binary = if v == "1" {
            find_in_path("jailer").ok_or_else(|| {
                VmmError::Unavailable(format!(
                    "{JAILER_ENV}=1 but no `jailer` on PATH (or set {JAILER_ENV} to its path)"
                ))
            })?
        } else {
            PathBuf::from(v)
        };
        if !binary.is_file() {
            return Err(VmmError::Unavailable(format!(
                "jailer {} does not exist",
                binary.display()
            )));
        }
        let cgroups = std::env::var(JAILER_CGROUPS_ENV)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                if s.split_once('=')
                    .is_some_and(|(k, _)| !k.is_empty() && !k.contains('/'))
                {
                    Ok(s.to_string())
                } else {
                    Err(VmmError::Unavailable(format!(
                        "{JAILER_CGROUPS_ENV}: {s:?} is not FILE=VALUE"
                    )))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(JailerConfig {
            binary,
            uid: env_id(JAILER_UID_ENV)?,
            gid: env_id(JAILER_GID_ENV)?,
            cgroups,
        }))
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

    /// The jail's root directory (Firecracker's `/` and cwd).
    pub fn root(&self, vm_dir: &Path, firecracker: &Path) -> Result<PathBuf, VmmError> {
        let exec_name = firecracker
            .file_name()
            .ok_or_else(|| VmmError::StartFailed("the Firecracker path has no file name".into()))?;
        Ok(vm_dir
            .join(JAIL_DIR)
            .join(exec_name)
            .join(Self::jail_id(vm_dir)?)
            .join("root"))
    }

    /// The jailer's argv (argv[0] = the jailer) starting `firecracker` for `vm_dir`.
    pub fn argv(&self, firecracker: &Path, vm_dir: &Path) -> Result<Vec<String>, VmmError> {
        let s = |p: &Path| {
            p.to_str()
                .map(String::from)
                .ok_or_else(|| VmmError::StartFailed(format!("{} is not UTF-8", p.display())))
        };
        if !firecracker
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains("firecracker"))
        {
            return Err(VmmError::StartFailed(format!(
                "the jailer only runs binaries whose name contains \"firecracker\", not {}",
                firecracker.display()
            )));
        }
        let mut argv = vec![
            s(&self.binary)?,
            "--id".into(),
            Self::jail_id(vm_dir)?,
            "--exec-file".into(),
            s(firecracker)?,
            "--uid".into(),
            self.uid.to_string(),
            "--gid".into(),
            self.gid.to_string(),
            "--chroot-base-dir".into(),
            s(&vm_dir.join(JAIL_DIR))?,
        ];
        if !self.cgroups.is_empty() {
            argv.extend([
                "--cgroup-version".into(),
                "2".into(),
                "--parent-cgroup".into(),
                PARENT_CGROUP.into(),
            ]);
            for c in &self.cgroups {
                argv.extend(["--cgroup".into(), c.clone()]);
            }
        }
        argv.extend(["--".into(), "--api-sock".into(), super::API_SOCK.into()]);
        Ok(argv)
    }

    /// Create the jail root and hard-link `files` (source, name in the jail) into it,
    /// all owned by the jailed uid/gid. Replaces links left by an earlier run.
    pub fn prepare(&self, root: &Path, files: &[(&Path, &str)]) -> Result<(), VmmError> {
        let io = |p: &Path, e: std::io::Error| VmmError::Io(p.display().to_string(), e);
        std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
        let own = |p: &Path| {
            std::os::unix::fs::chown(p, Some(self.uid), Some(self.gid)).map_err(|e| io(p, e))
        };
        own(root)?;
        for (src, name) in files {
            let dst = root.join(name);
            match std::fs::remove_file(&dst) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&dst, e)),
            }
            std::fs::hard_link(src, &dst).map_err(|e| {
                io(
                    &dst,
                    std::io::Error::new(
                        e.kind(),
                        format!(
                            "hard-linking {} into the jail (the state directory must be one \
                             filesystem): {e}",
                            src.display()
                        ),
                    ),
                )
            })?;
            own(&dst)?;
        }
        Ok(())
    }
}

/// True when `/proc/<pid>/cmdline`'s argv is the jailed Firecracker of jail `id`
/// (after the jailer's exec: `<exec> --id=<id> --start-time-us=.. ... --api-sock api.sock`).
pub fn is_jailed_firecracker(running: &[String], id: &str) -> bool {
    running.first().is_some_and(|a| {
        a.rsplit('/')
            .next()
            .is_some_and(|n| n.contains("firecracker"))
    }) && running.iter().any(|a| a == &format!("--id={id}"))
        && running
            .windows(2)
            .any(|w| w[0] == "--api-sock" && w[1] == super::API_SOCK)
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
            cgroups: cgroups.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn argv_and_root() {
        let vm = Path::new("/var/lib/bandsox/vms/0123456789ab");
        let fc = Path::new("/usr/local/bin/firecracker");
        assert_eq!(
            cfg(&[]).argv(fc, vm).unwrap(),
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
            .argv(fc, vm)
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
        assert!(cfg(&[]).argv(Path::new("/usr/bin/qemu"), vm).is_err());
        assert!(JailerConfig::jail_id(Path::new("/x/a_b")).is_err());
        assert!(JailerConfig::jail_id(Path::new("/")).is_err());
    }

    #[test]
    fn prepare_links_and_owns() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("disk.ext4");
        std::fs::write(&src, b"disk").unwrap();
        let root = tmp.path().join("jail/firecracker/bx-x/root");
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let c = JailerConfig {
            uid: if me == 0 { 4321 } else { me },
            gid: if me == 0 {
                4321
            } else {
                unsafe { libc::getegid() }
            },
            ..cfg(&[])
        };
        c.prepare(&root, &[(&src, JAIL_DISK)]).unwrap();
        // Again: an earlier run's links are replaced.
        c.prepare(&root, &[(&src, JAIL_DISK)]).unwrap();
        let link = root.join(JAIL_DISK);
        assert_eq!(std::fs::read(&link).unwrap(), b"disk");
        assert_eq!(
            std::fs::metadata(&link).unwrap().ino(),
            std::fs::metadata(&src).unwrap().ino(),
            "a hard link, not a copy"
        );
        assert_eq!(owner(&link), Some(c.uid));
        assert_eq!(owner(&root), Some(c.uid));
    }

    #[test]
    fn recognises_the_jailed_process() {
        let argv: Vec<String> = [
            "/firecracker",
            "--id=bx-0123",
            "--start-time-us=5",
            "--start-time-cpu-us=1",
            "--api-sock",
            "api.sock",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert!(is_jailed_firecracker(&argv, "bx-0123"));
        assert!(!is_jailed_firecracker(&argv, "bx-9999"));
        assert!(!is_jailed_firecracker(&argv[..4], "bx-0123"));
    }
}
