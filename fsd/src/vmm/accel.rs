//! Which accelerator QEMU uses: KVM where it really runs guests, TCG otherwise.
//!
//! `/dev/kvm` opening is not enough: on hosts whose KVM module is `kvm_pvm` (and whose
//! CPU flags show no `vmx`/`svm`) `KVM_CREATE_VM` succeeds but ordinary guest kernels hang
//! (see docs/verified-facts). So KVM is chosen only if all three hold: `/dev/kvm` opens
//! read-write, `/proc/cpuinfo` has `vmx` or `svm`, and the `kvm_pvm` module is not loaded.
//! `BANDSOX_ACCEL=kvm|tcg` overrides the decision (e.g. to force TCG on a KVM host).
//!
//! The decision is a pure function of a [`HostProbe`] so it is tested on fake inputs.
use std::fmt;

/// Environment variable that forces the accelerator.
pub const ACCEL_ENV: &str = "BANDSOX_ACCEL";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelKind {
    Kvm,
    Tcg,
}

impl fmt::Display for AccelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccelKind::Kvm => "kvm",
            AccelKind::Tcg => "tcg",
        })
    }
}

/// The accelerator and a human-readable reason for choosing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accel {
    pub kind: AccelKind,
    pub reason: String,
}

/// What the decision looks at.
#[derive(Debug, Clone)]
pub struct HostProbe {
    /// `/dev/kvm` opened read-write (or the error text).
    pub kvm_open: Result<(), String>,
    /// The text of `/proc/cpuinfo`.
    pub cpuinfo: String,
    /// `/sys/module/kvm_pvm` exists.
    pub kvm_pvm_loaded: bool,
    /// The value of `BANDSOX_ACCEL`, if set.
    pub env_override: Option<String>,
}

impl HostProbe {
    /// Probe this host.
    pub fn probe() -> Self {
        let kvm_open = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(drop)
            .map_err(|e| e.to_string());
        HostProbe {
            kvm_open,
            cpuinfo: std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
            kvm_pvm_loaded: std::path::Path::new("/sys/module/kvm_pvm").exists(),
            env_override: std::env::var(ACCEL_ENV).ok().filter(|v| !v.is_empty()),
        }
    }
}

/// Does any `flags` line of cpuinfo list `vmx` (Intel VT-x) or `svm` (AMD-V)?
pub fn cpu_has_virt(cpuinfo: &str) -> bool {
    cpuinfo_has_flag(cpuinfo, "vmx") || cpuinfo_has_flag(cpuinfo, "svm")
}

/// Decide. An invalid override is reported in the reason and ignored.
pub fn decide(p: &HostProbe) -> Accel {
    let mut note = String::new();
    if let Some(v) = &p.env_override {
        match v.to_ascii_lowercase().as_str() {
            "kvm" => {
                return Accel {
                    kind: AccelKind::Kvm,
                    reason: format!("{ACCEL_ENV}=kvm"),
                }
            }
            "tcg" => {
                return Accel {
                    kind: AccelKind::Tcg,
                    reason: format!("{ACCEL_ENV}=tcg"),
                }
            }
            other => note = format!(" (ignored {ACCEL_ENV}={other:?}: use kvm or tcg)"),
        }
    }
    let tcg = |why: String| Accel {
        kind: AccelKind::Tcg,
        reason: format!("{why}{note}"),
    };
    if let Err(e) = &p.kvm_open {
        return tcg(format!("/dev/kvm unusable ({e})"));
    }
    if !cpu_has_virt(&p.cpuinfo) {
        return tcg("/proc/cpuinfo has no vmx/svm flag".into());
    }
    if p.kvm_pvm_loaded {
        return tcg("the KVM module is kvm_pvm, which cannot run ordinary guests".into());
    }
    Accel {
        kind: AccelKind::Kvm,
        reason: format!("/dev/kvm opens and the CPU has hardware virtualisation{note}"),
    }
}

/// Probe this host and decide.
pub fn detect() -> Accel {
    decide(&HostProbe::probe())
}

/// The host's TSC frequency in kHz, measured against `CLOCK_MONOTONIC` over ~50 ms.
///
/// Under TCG the guest's TSC ticks at the host's rate, but a guest kernel calibrates it
/// against the emulated PIT, and on a busy host that calibration fails ("tsc: Unable to
/// calibrate against PIT"); with no HPET or ACPI PM timer on `microvm` the guest then hangs
/// early in boot. Passing the measured rate as `tsc_early_khz=` skips the calibration.
/// `None` if the host has no usable invariant TSC or the measurement is implausible.
pub fn host_tsc_khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        if !cpuinfo_has_flag(&cpuinfo, "constant_tsc") {
            return None;
        }
        let (t0, c0) = tsc_sample()?;
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (t1, c1) = tsc_sample()?;
        let ns = t1.checked_sub(t0)?;
        let khz = u128::from(c1.checked_sub(c0)?) * 1_000_000 / ns;
        let khz = u64::try_from(khz).ok()?;
        (100_000..20_000_000).contains(&khz).then_some(khz)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Does any `flags` line of cpuinfo list `flag`?
fn cpuinfo_has_flag(cpuinfo: &str, flag: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim() == "flags")
        .any(|(_, v)| v.split_whitespace().any(|f| f == flag))
}

/// One (monotonic ns, TSC) pair, read tightly: the TSC read is bracketed by two clock reads
/// less than 20 µs apart (retried otherwise) and paired with their midpoint.
#[cfg(target_arch = "x86_64")]
fn tsc_sample() -> Option<(u128, u64)> {
    let mono = || -> Option<u128> {
        let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
        Some(
            u128::try_from(ts.tv_sec()).ok()? * 1_000_000_000
                + u128::try_from(ts.tv_nsec()).ok()?,
        )
    };
    for _ in 0..100 {
        let a = mono()?;
        // SAFETY: RDTSC has no preconditions on x86-64 (it only reads the counter).
        #[allow(unused_unsafe)]
        let c = unsafe { core::arch::x86_64::_rdtsc() };
        let b = mono()?;
        if b - a < 20_000 {
            return Some(((a + b) / 2, c));
        }
    }
    None
}

#[allow(
    clippy::cast_precision_loss,
    reason = "test code: sizes, offsets and ids are small values the test constructs"
)]
#[cfg(test)]
mod tests {
    use super::*;

    const VMX: &str = "processor\t: 0\nflags\t\t: fpu vme de pse vmx sse2\n";
    const NOVIRT: &str = "processor\t: 0\nflags\t\t: fpu vme de pse sse2 hypervisor\n";

    fn probe(open: bool, cpuinfo: &str, pvm: bool, env: Option<&str>) -> HostProbe {
        HostProbe {
            kvm_open: if open {
                Ok(())
            } else {
                Err("No such file or directory".into())
            },
            cpuinfo: cpuinfo.into(),
            kvm_pvm_loaded: pvm,
            env_override: env.map(String::from),
        }
    }

    #[test]
    fn kvm_only_when_everything_holds() {
        assert_eq!(decide(&probe(true, VMX, false, None)).kind, AccelKind::Kvm);
        let amd = "flags : fpu svm\n";
        assert_eq!(decide(&probe(true, amd, false, None)).kind, AccelKind::Kvm);
        let no_dev = decide(&probe(false, VMX, false, None));
        assert_eq!(no_dev.kind, AccelKind::Tcg);
        assert!(no_dev.reason.contains("/dev/kvm"), "{}", no_dev.reason);
        let no_flag = decide(&probe(true, NOVIRT, false, None));
        assert_eq!(no_flag.kind, AccelKind::Tcg);
        assert!(no_flag.reason.contains("vmx/svm"));
        let pvm = decide(&probe(true, VMX, true, None));
        assert_eq!(pvm.kind, AccelKind::Tcg);
        assert!(pvm.reason.contains("kvm_pvm"));
    }

    #[test]
    fn flag_must_be_a_whole_word_on_a_flags_line() {
        assert!(!cpu_has_virt(
            "model name : vmx-like cpu\nflags : fpu vmxx\n"
        ));
        assert!(cpu_has_virt("flags\t: a b svm\n"));
        assert!(!cpu_has_virt(""));
    }

    #[test]
    fn host_tsc_is_measured_consistently() {
        let (Some(a), Some(b)) = (host_tsc_khz(), host_tsc_khz()) else {
            eprintln!("no invariant TSC on this host; tsc_early_khz will not be passed");
            return;
        };
        let diff = a.abs_diff(b) as f64 / a as f64;
        assert!(diff < 0.01, "{a} vs {b}");
    }

    #[test]
    fn env_override_wins_and_bad_values_are_noted() {
        let forced = decide(&probe(true, VMX, false, Some("tcg")));
        assert_eq!(forced.kind, AccelKind::Tcg);
        assert_eq!(forced.reason, "BANDSOX_ACCEL=tcg");
        assert_eq!(
            decide(&probe(false, "", true, Some("KVM"))).kind,
            AccelKind::Kvm
        );
        let bad = decide(&probe(true, VMX, false, Some("hvf")));
        assert_eq!(bad.kind, AccelKind::Kvm);
        assert!(bad.reason.contains("ignored"), "{}", bad.reason);
    }
}
