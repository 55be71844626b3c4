//! What a Firecracker binary is: its release and its snapshot data format, read from
//! `--version` / `--snapshot-version` output.
//!
//! Invariants:
//! - Asking a binary never hangs: [`run_binary`] kills it after [`QUERY_DEADLINE`].
//! - Versions compare as `MAJOR.MINOR.PATCH`; a suffix (`-dev`) is kept in the text only.
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A Firecracker release number (also used for snapshot data format versions, which
/// have the same `MAJOR.MINOR.PATCH` shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FcVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl std::fmt::Display for FcVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl FcVersion {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        FcVersion {
            major,
            minor,
            patch,
        }
    }

    /// `1.10.1`, `v1.10.1`, `1.17.0-dev`, `1.7.0-dirty`: the numeric part only.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim().trim_start_matches('v');
        let core = s.split(['-', '+', ' ']).next()?;
        let mut it = core.split('.');
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        let patch = it.next().map(|p| p.parse().ok()).unwrap_or(Some(0))?;
        if it.next().is_some() {
            return None;
        }
        Some(FcVersion::new(major, minor, patch))
    }

    /// The version in `firecracker --version` output (`Firecracker v1.10.1`, then
    /// possibly more lines).
    pub fn from_version_output(text: &str) -> Option<Self> {
        version_text(text).as_deref().and_then(FcVersion::parse)
    }

    /// `network_overrides` on snapshot load.
    pub fn has_network_overrides(self) -> bool {
        self >= FcVersion::new(1, 12, 0)
    }

    /// `vsock_override` on snapshot load.
    pub fn has_vsock_override(self) -> bool {
        self >= FcVersion::new(1, 16, 0)
    }

    /// Read as a snapshot data format: can a Firecracker supporting format `self` load a
    /// snapshot written in format `snap`? Firecracker's rule (its snapshot versioning
    /// docs and the check in its snapshot loader): the same MAJOR, and a MINOR no newer
    /// than its own; any PATCH.
    pub fn can_load_format(self, snap: FcVersion) -> bool {
        snap.major == self.major && snap.minor <= self.minor
    }
}

/// The version as `firecracker --version` prints it, suffix included
/// (`Firecracker v1.17.0-dev` → `1.17.0-dev`).
pub fn version_text(output: &str) -> Option<String> {
    output
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Firecracker v"))
        .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
        .find(|v| FcVersion::parse(v).is_some())
}

/// The snapshot data format in `firecracker --snapshot-version` or
/// `--describe-snapshot` output (`v11.0.0`, then log lines).
pub fn format_text(output: &str) -> Option<FcVersion> {
    output.lines().find_map(|l| {
        let l = l.trim();
        l.strip_prefix('v')
            .filter(|rest| rest.split('.').count() == 3)
            .and_then(FcVersion::parse)
    })
}

/// How long a `firecracker --version`-style query may take.
const QUERY_DEADLINE: Duration = Duration::from_secs(5);

/// Run `binary args` (stdin /dev/null) and return whether it succeeded and its stdout
/// plus stderr; killed after [`QUERY_DEADLINE`] (a hung binary is an error, not a hang).
pub fn run_binary(binary: &Path, args: &[&std::ffi::OsStr]) -> std::io::Result<(bool, String)> {
    use std::io::Read;
    let mut child = Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // One reader per pipe, so a chatty stderr never blocks the child.
    fn drain<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut text);
            }
            text
        })
    }
    let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let deadline = Instant::now() + QUERY_DEADLINE;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {QUERY_DEADLINE:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut text = out.join().unwrap_or_default();
    text.extend(err.join().unwrap_or_default());
    Ok((
        status.success(),
        String::from_utf8_lossy(&text).into_owned(),
    ))
}
