//! `bandsox doctor`: check what this host offers BandSox-FS, and say how to fix each
//! problem.
//!
//! Every check prints one line, `ok`, `warn` or `FAIL`, then `fix:` lines for what is not
//! ok. The exit status is non-zero exactly when the default backend (the `backend=` of
//! the state directory's `defaults`, `auto` by default) cannot boot a VM here: no usable
//! VMM for it, or no guest artefacts. Missing extras (Firecracker, `net=tap` tools,
//! cgroup v2, free space) are warnings.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::config::{BackendChoice, VmConfig};
use crate::settings::{Settings, VmmSettings};
use crate::tools::find_tool;
use crate::vmm::accel::{self, AccelKind, HostProbe};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            level: Level::Ok,
            detail: detail.into(),
            fix: None,
        }
    }
    fn bad(
        name: &'static str,
        level: Level,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            name,
            level,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    pub fn render(&self) -> String {
        let tag = match self.level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        let mut s = format!("{tag}  {}: {}\n", self.name, self.detail);
        if let Some(f) = &self.fix {
            s.push_str(&format!("      fix: {f}\n"));
        }
        s
    }
}

/// Why KVM can or cannot run guests here (the same decision the QEMU backend makes).
pub fn kvm_check(p: &HostProbe) -> Check {
    let a = accel::decide(p);
    match a.kind {
        AccelKind::Kvm => Check::ok("kvm", format!("usable: {}", a.reason)),
        AccelKind::Tcg => Check::bad(
            "kvm",
            Level::Warn,
            format!("unusable, VMs run under TCG emulation (much slower): {}", a.reason),
            match &p.kvm_open {
                Err(e) if e.contains("No such file") => {
                    "enable virtualisation (VT-x/AMD-V) in the firmware or the hypervisor, and load kvm_intel or kvm_amd".to_string()
                }
                Err(e) if e.contains("ermission") => {
                    "run the daemon as root, or add its user to the kvm group".to_string()
                }
                _ => "use a host (or a VM with nested virtualisation) whose CPU shows vmx or svm; QEMU TCG works meanwhile".to_string(),
            },
        ),
    }
}

fn version_of(bin: &Path, arg: &str) -> Option<String> {
    let out = Command::new(bin)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().next().map(|l| l.trim().to_string())
}

fn qemu_check(settings: &VmmSettings) -> (Check, bool) {
    match crate::vmm::qemu::QemuBackend::detect(settings) {
        Ok(b) => {
            use crate::vmm::Backend;
            (Check::ok("qemu", b.describe()), true)
        }
        Err(e) => (
            Check::bad(
                "qemu",
                Level::Fail,
                e.to_string(),
                "apt-get install qemu-system-x86",
            ),
            false,
        ),
    }
}

fn firecracker_check(settings: &VmmSettings) -> (Check, bool) {
    let jailer = find_tool("jailer").map(|j| {
        format!(
            "; jailer {} ({})",
            version_of(&j, "--version").unwrap_or_else(|| "?".into()),
            j.display()
        )
    });
    match crate::vmm::firecracker::FirecrackerBackend::detect(settings) {
        Ok(b) => {
            use crate::vmm::Backend;
            (
                Check::ok(
                    "firecracker",
                    format!("{}{}", b.describe(), jailer.unwrap_or_else(|| "; no jailer on PATH".into())),
                ),
                true,
            )
        }
        Err(e) => (
            Check::bad(
                "firecracker",
                Level::Warn,
                format!(
                    "unavailable (QEMU is used instead): {e}{}",
                    jailer.unwrap_or_default()
                ),
                "install firecracker (and jailer) 1.8 or newer on PATH, on a host where KVM runs guests",
            ),
            false,
        ),
    }
}

fn fuse_check() -> Check {
    if !Path::new("/dev/fuse").exists() {
        return Check::bad("fuse", Level::Fail, "/dev/fuse is missing", "modprobe fuse");
    }
    if find_tool("fusermount3").is_none() {
        return Check::bad(
            "fuse",
            Level::Warn,
            "/dev/fuse exists; fusermount3 is not installed",
            "apt-get install fuse3",
        );
    }
    let conf = std::fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
    let allow = conf.lines().any(|l| l.trim() == "user_allow_other");
    if allow {
        Check::ok("fuse", "/dev/fuse, fusermount3; user_allow_other is set")
    } else {
        Check::ok(
            "fuse",
            "/dev/fuse, fusermount3; user_allow_other is not set (only needed when the daemon \
             is not root and shares its mount)",
        )
    }
}

fn cgroup_check() -> Check {
    match crate::cgroup::detect(Path::new("/sys/fs/cgroup"), nix::unistd::geteuid().is_root()) {
        crate::cgroup::Support::V2(root) => Check::ok(
            "cgroup",
            format!("cgroup v2 at {}: each VMM gets memory.max and cpu.max", root.display()),
        ),
        crate::cgroup::Support::Unavailable(why) => Check::bad(
            "cgroup",
            Level::Warn,
            format!("VMMs run without memory or CPU limits: {why}"),
            "boot with the unified hierarchy (systemd.unified_cgroup_hierarchy=1, Debian 12's default) and run the daemon as root",
        ),
    }
}

fn tap_check() -> Check {
    let missing: Vec<&str> = ["ip", "nft"]
        .into_iter()
        .filter(|t| find_tool(t).is_none())
        .collect();
    if missing.is_empty() {
        Check::ok("net=tap", "ip and nft are installed")
    } else {
        Check::bad(
            "net=tap",
            Level::Warn,
            format!(
                "missing {}: net=tap is refused (ENOSYS)",
                missing.join(", ")
            ),
            "apt-get install iproute2 nftables",
        )
    }
}

fn space_check(state: &Path) -> Check {
    let probe = state
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    match nix::sys::statvfs::statvfs(probe) {
        Ok(s) => {
            let free_mib = s.blocks_available() * s.fragment_size() / (1024 * 1024);
            if free_mib < 2048 {
                Check::bad(
                    "space",
                    Level::Warn,
                    format!("{free_mib} MiB free for {}", state.display()),
                    "free space there (each VM needs its disk; snapshots ~ memory + disk), or use --state-dir elsewhere",
                )
            } else {
                Check::ok(
                    "space",
                    format!("{free_mib} MiB free for {}", state.display()),
                )
            }
        }
        Err(e) => Check::bad(
            "space",
            Level::Warn,
            format!("{}: {e}", probe.display()),
            "check the state directory",
        ),
    }
}

fn sha256_file(p: &Path) -> Option<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(p).ok()?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).ok()?;
    Some(format!("{:x}", h.finalize()))
}

/// The guest's kernel, initramfs and base image exist and match `boot/kernel.json`
/// (and, when given, the agent the initramfs was built from).
fn artefacts_check(state: &Path, agent: Option<&Path>) -> Check {
    let fix = format!(
        "build them: bandsox guest-build --state-dir {} --agent <static bandsox-agent> --kernel-root <extracted linux-image-cloud-amd64> --busybox <busybox-static> (mount-helpers/setup, or /usr/lib/bandsox/guest-setup from the package, does all of it)",
        state.display()
    );
    let boot = state.join("boot");
    let missing: Vec<String> = [
        "boot/vmlinuz",
        "boot/initrd",
        "boot/kernel.json",
        "images/base/disk.ext4",
    ]
    .iter()
    .filter(|f| !state.join(f).is_file())
    .map(|f| f.to_string())
    .collect();
    if !missing.is_empty() {
        return Check::bad(
            "guest",
            Level::Fail,
            format!("missing under {}: {}", state.display(), missing.join(", ")),
            fix,
        );
    }
    let record: serde_json::Value = match std::fs::read(boot.join("kernel.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        Some(v) => v,
        None => return Check::bad("guest", Level::Fail, "boot/kernel.json is unreadable", fix),
    };
    let field = |k: &str| {
        record
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    for (file, key) in [("vmlinuz", "kernel_sha256"), ("initrd", "initrd_sha256")] {
        if sha256_file(&boot.join(file)).as_deref() != Some(field(key).as_str()) {
            return Check::bad(
                "guest",
                Level::Fail,
                format!("boot/{file} does not match its record in boot/kernel.json ({key})"),
                fix,
            );
        }
    }
    if let Some(agent) = agent {
        match sha256_file(agent) {
            Some(h) if h == field("agent_sha256") => {}
            Some(_) => {
                return Check::bad(
                    "guest",
                    Level::Warn,
                    format!(
                        "the initramfs was built from another agent than {} (guests run an older or newer agent)",
                        agent.display()
                    ),
                    fix,
                )
            }
            None => {}
        }
    }
    Check::ok(
        "guest",
        format!(
            "kernel {} and initramfs match boot/kernel.json; base image present",
            field("version")
        ),
    )
}

/// The agent to compare the initramfs with: the packaged one, if installed.
pub fn default_agent() -> Option<PathBuf> {
    let p = PathBuf::from("/usr/lib/bandsox/bandsox-agent");
    p.is_file().then_some(p)
}

/// Run every check; returns the report and whether the default backend can boot a VM.
pub fn run(state: &Path, agent: Option<&Path>, settings: &Settings) -> (String, bool) {
    let probe = HostProbe::probe(settings.vmm.accel.as_deref());
    let mut checks = vec![kvm_check(&probe)];
    let (fc, fc_ok) = firecracker_check(&settings.vmm);
    let (qemu, qemu_ok) = qemu_check(&settings.vmm);
    checks.push(fc);
    checks.push(qemu);
    checks.push(fuse_check());
    checks.push(cgroup_check());
    checks.push(tap_check());
    checks.push(space_check(state));
    let guest = artefacts_check(state, agent);
    let guest_ok = guest.level != Level::Fail;
    checks.push(guest);

    let choice = std::fs::read_to_string(state.join("defaults"))
        .ok()
        .and_then(|t| VmConfig::default().parse_defaults(&t).ok())
        .map(|c| c.backend)
        .unwrap_or(BackendChoice::Auto);
    let (backend, backend_ok) = match choice {
        BackendChoice::Auto if fc_ok => ("auto (firecracker)", true),
        BackendChoice::Auto => ("auto (qemu)", qemu_ok),
        BackendChoice::Qemu => ("qemu", qemu_ok),
        BackendChoice::Firecracker => ("firecracker", fc_ok),
    };
    let bootable = backend_ok && guest_ok;
    let mut out = String::new();
    for c in &checks {
        out.push_str(&c.render());
    }
    out.push_str(&if bootable {
        format!("default backend {backend}: can boot VMs\n")
    } else {
        format!(
            "default backend {backend}: CANNOT boot a VM here ({})\n",
            if backend_ok {
                "guest artefacts"
            } else {
                "no usable VMM"
            }
        )
    });
    (out, bootable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(kvm_open: Result<(), String>, cpuinfo: &str, pvm: bool) -> HostProbe {
        HostProbe {
            kvm_open,
            cpuinfo: cpuinfo.into(),
            kvm_pvm_loaded: pvm,
            env_override: None,
        }
    }

    #[test]
    fn kvm_says_why_not() {
        let c = kvm_check(&probe(
            Err("No such file or directory (os error 2)".into()),
            "flags: fpu",
            false,
        ));
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("unusable"), "{}", c.detail);
        assert!(c.fix.unwrap().contains("kvm_intel"));
        let c = kvm_check(&probe(Ok(()), "flags\t: fpu vmx sse", false));
        assert_eq!(c.level, Level::Ok, "{}", c.detail);
        let c = kvm_check(&probe(Ok(()), "flags\t: fpu vmx", true));
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("kvm_pvm"), "{}", c.detail);
    }

    #[test]
    fn missing_artefacts_fail_with_a_fix() {
        let d = tempfile::tempdir().unwrap();
        let c = artefacts_check(d.path(), None);
        assert_eq!(c.level, Level::Fail);
        assert!(c.detail.contains("boot/vmlinuz"));
        assert!(c.fix.unwrap().contains("guest-build"));
        let (report, ok) = run(d.path(), None, &Settings::default());
        assert!(!ok, "{report}");
        assert!(report.contains("CANNOT boot"), "{report}");
    }
}
