//! PID 1 duties in the guest: early mounts, kernel modules, hostname, switching to the
//! disk root, and powering off.
//!
//! Invariants:
//! * Nothing here panics or exits: every failure is logged as one clear line and the
//!   boot continues with what works (PID 1 exiting panics the kernel).
//! * The initramfs cannot `pivot_root`, so the switch to the disk is done the
//!   `switch_root` way: move `/proc`, `/sys`, `/dev`, `/run` into the new root,
//!   `mount --move newroot /`, `chroot .`.
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{sync, Pid};

use crate::reaper::Reaper;

/// Where the kernel command line names the VM.
pub const CMDLINE_NAME_KEY: &str = "bandsox.name=";
/// Kernel modules to load (absolute paths inside the initramfs, in dependency order).
pub const MODULES_LIST: &str = "/etc/bandsox/modules.load";
/// The root disk.
pub const ROOT_DISK: &str = "/dev/vda";
/// How long to wait for the root disk to appear.
pub const ROOT_DISK_WAIT: Duration = Duration::from_secs(3);

/// Is `path` a mount point (per `/proc/self/mountinfo`)? False if that cannot be read.
pub fn is_mountpoint(path: &str) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines()
        .any(|l| l.split_whitespace().nth(4).is_some_and(|mp| mp == path))
}

fn mount_fs(source: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) {
    if target != "/proc" && is_mountpoint(target) {
        return;
    }
    if target == "/proc" && Path::new("/proc/self/mountinfo").exists() {
        return;
    }
    let _ = std::fs::create_dir_all(target);
    if let Err(e) = mount(Some(source), target, Some(fstype), flags, data) {
        if e != nix::errno::Errno::EBUSY {
            eprintln!(
                "bandsox-agent: cannot mount {fstype} on {target}: {}",
                e.desc()
            );
        }
    }
}

/// Mount the pseudo filesystems that are not mounted yet. `with_tmp` also mounts a tmpfs
/// on `/tmp` (initramfs only; a disk root keeps its own `/tmp`).
pub fn mount_pseudo(with_tmp: bool) {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    );
    mount_fs("proc", "/proc", "proc", nosuid, None);
    mount_fs("sysfs", "/sys", "sysfs", nosuid, None);
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("gid=5,mode=620,ptmxmode=666"),
    );
    mount_fs(
        "shm",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    );
    mount_fs(
        "run",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    );
    if with_tmp {
        mount_fs(
            "tmp",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        );
    }
}

/// Make sure fds 0, 1 and 2 are open (on `/dev/console`, else `/dev/null`), so later
/// files and pipes never land on them. Needs `/dev`.
pub fn ensure_std_fds() {
    use nix::fcntl::{fcntl, FcntlArg::F_GETFD};
    use nix::unistd::{dup2_stderr, dup2_stdin, dup2_stdout};
    for fd in 0..3 {
        // F_GETFD only asks whether the descriptor is open.
        let open = match fd {
            0 => fcntl(std::io::stdin(), F_GETFD),
            1 => fcntl(std::io::stdout(), F_GETFD),
            _ => fcntl(std::io::stderr(), F_GETFD),
        };
        if open.is_ok() {
            continue;
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/console")
            .or_else(|_| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
            });
        if let Ok(f) = f {
            if f.as_raw_fd() != fd {
                // Duplicated onto `fd`; `f` itself is closed on drop.
                let _ = match fd {
                    0 => dup2_stdin(&f),
                    1 => dup2_stdout(&f),
                    _ => dup2_stderr(&f),
                };
            } else {
                std::mem::forget(f); // it already is `fd`; keep it open
            }
        }
    }
}

/// Load the modules listed in [`MODULES_LIST`] with `finit_module`. `EEXIST` is fine;
/// other failures are logged and skipped.
pub fn load_modules() {
    let Ok(list) = std::fs::read_to_string(MODULES_LIST) else {
        return;
    };
    for line in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let f = match std::fs::File::open(line) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!("cannot open module {line}: {e}");
                continue;
            }
        };
        match finit_module(&f, c"", ModuleInitFlags::empty()) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => {
                tracing::error!("cannot load module {line}: {}", e.desc());
                continue;
            }
        }
        tracing::debug!("loaded module {line}");
    }
}

/// The value of `bandsox.name=` on the kernel command line.
pub fn name_from_cmdline() -> Option<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(CMDLINE_NAME_KEY))
        .filter(|n| !n.is_empty())
        .map(str::to_string)
}

/// True when virtio devices are known (the transport driver has enumerated them) and
/// none of them is a block device (virtio device id 2): no point waiting for a disk.
fn no_virtio_block_device() -> bool {
    let Ok(dir) = std::fs::read_dir("/sys/bus/virtio/devices") else {
        return false;
    };
    let mut any = false;
    for e in dir.flatten() {
        any = true;
        let id = std::fs::read_to_string(e.path().join("device")).unwrap_or_default();
        if id.trim() == "0x0002" {
            return false;
        }
    }
    any
}

/// Wait for the root disk; if it appears, mount it and switch into it. Returns whether
/// the root is now the disk.
pub fn switch_to_disk() -> bool {
    let deadline = Instant::now() + ROOT_DISK_WAIT;
    while !Path::new(ROOT_DISK).exists() {
        if Instant::now() >= deadline || no_virtio_block_device() {
            tracing::info!("no {ROOT_DISK}: staying in the initramfs");
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let newroot = "/newroot";
    let _ = std::fs::create_dir_all(newroot);
    if let Err(e) = mount(
        Some(ROOT_DISK),
        newroot,
        Some("ext4"),
        MsFlags::empty(),
        None::<&str>,
    ) {
        tracing::error!(
            "cannot mount {ROOT_DISK} (ext4) on {newroot}: {}: staying in the initramfs",
            e.desc()
        );
        return false;
    }
    for dir in ["/proc", "/sys", "/dev", "/run"] {
        let target = format!("{newroot}{dir}");
        let _ = std::fs::create_dir_all(&target);
        if let Err(e) = mount(
            Some(dir),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        ) {
            tracing::warn!("cannot move {dir} into the new root: {}", e.desc());
        }
    }
    if let Err(e) = nix::unistd::chdir(newroot) {
        tracing::error!("cannot chdir to {newroot}: {}", e.desc());
        return false;
    }
    if let Err(e) = mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>) {
        tracing::error!("cannot move {newroot} to /: {}", e.desc());
        let _ = nix::unistd::chdir("/");
        return false;
    }
    if let Err(e) = nix::unistd::chroot(".") {
        tracing::error!("cannot chroot into the new root: {}", e.desc());
        return false;
    }
    let _ = nix::unistd::chdir("/");
    tracing::info!("switched root to {ROOT_DISK}");
    true
}

/// Other user processes still alive (pid != 1, not kernel threads, not zombies).
fn others_alive() -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            return false;
        };
        pid != 1
            && std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| !c.is_empty())
                .unwrap_or(false)
    })
}

/// Sync, stop every process, remount `/` read-only and power off. Never returns.
pub fn power_off(reaper: &Reaper) {
    tracing::info!("powering off");
    sync();
    // Pid -1: every process but us.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(1);
    while others_alive() && Instant::now() < deadline {
        reaper.reap_now();
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    std::thread::sleep(Duration::from_millis(50));
    reaper.reap_now();
    sync();
    if let Err(e) = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        tracing::warn!("cannot remount / read-only: {}", e.desc());
    }
    sync();
    // reboot(2) only returns on failure.
    let Err(e) = reboot(RebootMode::RB_POWER_OFF);
    tracing::error!("power off failed: {}; rebooting", e.desc());
    // QEMU runs with -no-reboot, so this ends the VM too.
    let Err(e) = reboot(RebootMode::RB_AUTOBOOT);
    tracing::error!("reboot failed: {}", e.desc());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Set the hostname, logging failures.
pub fn set_hostname(name: &str) {
    if let Err(e) = nix::unistd::sethostname(name) {
        tracing::error!("cannot set hostname {name:?}: {}", e.desc());
    }
}

/// `/proc/uptime`'s first field, for log lines ("?" when unreadable).
pub fn uptime() -> String {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(|t| format!("{t}s")))
        .unwrap_or_else(|| "?".into())
}
