//! The `base` image: a sparse ext4 file holding Debian's static busybox and a minimal
//! Unix tree, made with `mkfs.ext4 -d` (no mounting, no loop devices).
//!
//! Tree: `/bin/busybox`, a symlink to it for every applet (`busybox --list-full`, which
//! includes `/bin/sh`), `/etc/{passwd,group,hostname,hosts,resolv.conf,profile,os-release}`,
//! `/etc/mtab -> /proc/self/mounts`, `/root` (0700), `/tmp` and `/var/tmp` (1777), and
//! empty `/proc /sys /dev /run /home /var /mnt /opt /srv /media /lib /usr/local/bin`.
//!
//! Invariants: the image file only appears at its final path once complete (built as
//! `<out>.tmp`, then renamed); the staging directory is removed afterwards; the file is
//! sparse (apparent size [`BASE_IMAGE_SIZE`], a few MiB allocated).
use crate::tools::find_tool;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::GuestError;

/// Apparent size of the base image.
pub const BASE_IMAGE_SIZE: u64 = 512 * 1024 * 1024;

const DIRS: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("sbin", 0o755),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("usr/local", 0o755),
    ("usr/local/bin", 0o755),
    ("etc", 0o755),
    ("root", 0o700),
    ("tmp", 0o1777),
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("run", 0o755),
    ("home", 0o755),
    ("lib", 0o755),
    ("mnt", 0o755),
    ("opt", 0o755),
    ("srv", 0o755),
    ("media", 0o755),
    ("var", 0o755),
    ("var/tmp", 0o1777),
    ("var/log", 0o755),
];

const FILES: &[(&str, &str)] = &[
    ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
    ("etc/group", "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n"),
    ("etc/hostname", "bandsox\n"),
    ("etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
    // QEMU user networking's DNS forwarder.
    ("etc/resolv.conf", "nameserver 10.0.2.3\n"),
    (
        "etc/profile",
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
    ),
    (
        "etc/os-release",
        "NAME=\"BandSox busybox\"\nID=bandsox-busybox\nPRETTY_NAME=\"BandSox base image (Debian busybox-static)\"\n",
    ),
];

/// Build the base image at `out` from `busybox`; returns busybox's version line.
pub fn build_base_image(busybox: &Path, out: &Path) -> Result<String, GuestError> {
    let parent = out
        .parent()
        .ok_or_else(|| GuestError::Invalid(format!("bad image path {}", out.display())))?;
    let staging = parent.join(format!(".staging-{}", std::process::id()));
    let tmp = with_suffix(out, ".tmp");
    let result = (|| {
        let version = stage_tree(busybox, &staging)?;
        make_ext4(&staging, &tmp, BASE_IMAGE_SIZE, "bandsox-base")?;
        std::fs::rename(&tmp, out).map_err(|e| GuestError::io(out.to_path_buf(), e))?;
        Ok(version)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn set_mode(p: &Path, mode: u32) -> Result<(), GuestError> {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| GuestError::io(p.to_path_buf(), e))
}

/// Lay out the root tree in `staging` (replaced if present); returns busybox's version.
pub fn stage_tree(busybox: &Path, staging: &Path) -> Result<String, GuestError> {
    if staging.exists() {
        std::fs::remove_dir_all(staging).map_err(|e| GuestError::io(staging.to_path_buf(), e))?;
    }
    std::fs::create_dir_all(staging).map_err(|e| GuestError::io(staging.to_path_buf(), e))?;
    set_mode(staging, 0o755)?;
    for (d, mode) in DIRS {
        let p = staging.join(d);
        std::fs::create_dir_all(&p).map_err(|e| GuestError::io(p.clone(), e))?;
        set_mode(&p, *mode)?;
    }
    for (f, text) in FILES {
        let p = staging.join(f);
        std::fs::write(&p, text).map_err(|e| GuestError::io(p.clone(), e))?;
        set_mode(&p, 0o644)?;
    }
    let mtab = staging.join("etc/mtab");
    std::os::unix::fs::symlink("/proc/self/mounts", &mtab).map_err(|e| GuestError::io(mtab, e))?;

    let bb = staging.join("bin/busybox");
    std::fs::copy(busybox, &bb).map_err(|e| GuestError::io(busybox.to_path_buf(), e))?;
    set_mode(&bb, 0o755)?;
    let list = run(Command::new(&bb).arg("--list-full"), "busybox --list-full")?;
    let mut applets = 0;
    for line in list.lines().map(str::trim) {
        // Entries are relative paths like "bin/ls"; skip "linuxrc" and anything odd.
        if !line.contains('/')
            || line.starts_with('/')
            || line
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
            || line == "bin/busybox"
        {
            continue;
        }
        let link = staging.join(line);
        if let Some(dir) = link.parent() {
            std::fs::create_dir_all(dir).map_err(|e| GuestError::io(dir.to_path_buf(), e))?;
        }
        if link.symlink_metadata().is_ok() {
            continue;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link)
            .map_err(|e| GuestError::io(link.clone(), e))?;
        applets += 1;
    }
    if staging.join("bin/sh").symlink_metadata().is_err() {
        return Err(GuestError::Busybox(format!(
            "{} has no sh applet",
            busybox.display()
        )));
    }
    // `busybox` with no arguments prints "BusyBox v1.35.0 (...) multi-call binary." first.
    let help = Command::new(&bb)
        .output()
        .map_err(|e| GuestError::Busybox(format!("cannot run {}: {e}", bb.display())))?;
    let version = String::from_utf8_lossy(&help.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&help.stderr).lines())
        .find(|l| l.starts_with("BusyBox v"))
        .map(|l| l.trim_end_matches(" multi-call binary.").to_string())
        .unwrap_or_else(|| "BusyBox (unknown version)".into());
    tracing::debug!(applets, %version, "staged the base tree");
    Ok(version)
}

/// `mkfs.ext4 -d staging` into a fresh sparse file `out` of `size` bytes.
pub fn make_ext4(staging: &Path, out: &Path, size: u64, label: &str) -> Result<(), GuestError> {
    make_ext4_with(staging, out, size, label, None, None)
}

/// [`make_ext4`] with an inode count (`-N`) and a deadline after which mkfs is killed.
pub fn make_ext4_with(
    staging: &Path,
    out: &Path,
    size: u64,
    label: &str,
    inodes: Option<u64>,
    deadline: Option<std::time::Instant>,
) -> Result<(), GuestError> {
    let _ = std::fs::remove_file(out);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|e| GuestError::io(out.to_path_buf(), e))?;
    f.set_len(size)
        .map_err(|e| GuestError::io(out.to_path_buf(), e))?;
    drop(f);
    set_mode(out, 0o600)?;
    let mkfs = find_tool("mkfs.ext4").ok_or_else(|| GuestError::Tool {
        tool: "mkfs.ext4".into(),
        detail: "not found (install e2fsprogs)".into(),
    })?;
    let mut cmd = Command::new(mkfs);
    cmd.args(["-q", "-F", "-t", "ext4", "-L", label, "-m", "0"])
        .args([
            "-E",
            "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        ]);
    if let Some(n) = inodes {
        cmd.arg("-N").arg(n.to_string());
    }
    cmd.arg("-d").arg(staging).arg(out);
    match deadline {
        None => {
            run(&mut cmd, "mkfs.ext4")?;
        }
        Some(d) => run_until(&mut cmd, "mkfs.ext4", d)?,
    }
    Ok(())
}

/// Run a command that must finish before `deadline` (killed then); error has its stderr.
fn run_until(
    cmd: &mut Command,
    what: &str,
    deadline: std::time::Instant,
) -> Result<(), GuestError> {
    use std::io::Read;
    let tool_err = |detail: String| GuestError::Tool {
        tool: what.into(),
        detail,
    };
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| tool_err(e.to_string()))?;
    let mut stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(tool_err(
                    "did not finish before the deadline; killed".into(),
                ));
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(50)),
            Err(e) => return Err(tool_err(e.to_string())),
        }
    };
    let err = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(tool_err(format!("{status}: {}", err.trim())));
    }
    Ok(())
}

/// Run a command; its stdout on success, else an error with its stderr.
fn run(cmd: &mut Command, what: &str) -> Result<String, GuestError> {
    let out = cmd.output().map_err(|e| GuestError::Tool {
        tool: what.into(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(GuestError::Tool {
            tool: what.into(),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
