//! Capped logs: every file a guest (or its VMM) makes the host write — the serial
//! console, the VMM's own logs — keeps only its last N MiB.
//!
//! The writers (QEMU, Firecracker, the host agent) append to the file themselves and may
//! outlive the daemon, so the file is never renamed or truncated under them: instead the
//! daemon punches a hole over the old part (`fallocate(PUNCH_HOLE)`), which frees its
//! blocks but keeps every offset. So the file's size is the total ever written, offsets
//! never move, `tail -f` follows it by size as before, and the bytes kept start at the
//! first data block (`SEEK_DATA`).
//!
//! Invariants:
//! - [`enforce`] leaves at least the last `keep` bytes and frees everything before them,
//!   rounded down to whole blocks; it runs every [`INTERVAL`] for every VM, so a guest
//!   writing at rate R overshoots the cap by at most R × INTERVAL before it is cut back.
//! - A reader never sees the punched zeros: [`LogReader`] maps a read below the kept part
//!   to the kept part's start (per open file), first saying how much was dropped when
//!   that note is shorter than what was skipped (so a reader's offset never passes the
//!   file's size).
//! - Where the filesystem cannot punch holes, the file is emptied instead (a reader then
//!   sees it start over, as after `truncate`).
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::error::Result;

/// How often every VM's logs are checked.
pub const INTERVAL: Duration = Duration::from_millis(500);
const BLOCK: u64 = 4096;

static PUNCH_UNSUPPORTED_LOGGED: AtomicBool = AtomicBool::new(false);

/// The first kept byte of `f` (its size when nothing is kept).
pub fn kept_start(f: &File) -> u64 {
    // SEEK_DATA moves the file offset, which nothing relies on (callers use positioned
    // reads only).
    match nix::unistd::lseek(f, 0, nix::unistd::Whence::SeekData) {
        Ok(off) => off.unsigned_abs(),
        // ENXIO: no data at all (empty, or all hole).
        Err(_) => f.metadata().map(|m| m.len()).unwrap_or(0),
    }
}

/// Keep the last `keep` bytes of the file at `path`; free the rest once it holds more
/// than `keep` plus a quarter (so the work is done in steps, not on every byte).
/// Returns the bytes freed.
pub fn enforce(path: &Path, keep: u64) -> std::io::Result<u64> {
    let f = match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let start = kept_start(&f);
    let slack = (keep / 4).max(64 * 1024);
    if len.saturating_sub(start) <= keep.saturating_add(slack) {
        return Ok(0);
    }
    let end = (len - keep) / BLOCK * BLOCK;
    if end <= start {
        return Ok(0);
    }
    use nix::fcntl::{fallocate, FallocateFlags};
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    let Err(e) = fallocate(
        &f,
        punch,
        0,
        libc::off_t::try_from(end).unwrap_or(libc::off_t::MAX),
    ) else {
        return Ok(end - start);
    };
    let e = std::io::Error::from(e);
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        if !PUNCH_UNSUPPORTED_LOGGED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "{}: this filesystem cannot punch holes; capped logs are emptied instead",
                path.display()
            );
        }
        f.set_len(0)?;
        return Ok(len);
    }
    Err(e)
}

/// One open capped log: where this reader is relative to the file's offsets.
#[derive(Debug, Default)]
pub struct LogReader {
    /// Added to the kernel's offset to get the file offset (grows when the reader is
    /// moved past dropped bytes).
    skew: Mutex<u64>,
}

impl LogReader {
    /// Read up to `size` bytes at the reader's `offset` of the log at `path`, which keeps
    /// its last `cap_note` (for the note, e.g. "4 MiB (vm.console_mib)").
    pub fn read(&self, path: &Path, offset: u64, size: u32, cap_note: &str) -> Result<Vec<u8>> {
        let f = File::open(path)?;
        let size = size.min(4 * 1024 * 1024) as usize;
        let mut skew = self.skew.lock();
        let at = offset.saturating_add(*skew);
        let start = kept_start(&f);
        let mut out = Vec::new();
        let mut from = at;
        if at < start {
            let skipped = start - at;
            let note =
                format!("[bandsox: {skipped} earlier bytes were dropped: this log keeps its last {cap_note}]\n");
            if skipped >= note.len() as u64 && note.len() < size {
                out.extend_from_slice(note.as_bytes());
                *skew += skipped - note.len() as u64;
            } else {
                *skew += skipped;
            }
            from = start;
        }
        let mut buf = vec![0u8; size - out.len()];
        let n = f.read_at(&mut buf, from)?;
        buf.truncate(n);
        out.extend_from_slice(&buf);
        Ok(out)
    }
}

/// Cap every VM's console and VMM logs, every [`INTERVAL`], until the manager is gone.
pub fn spawn(mgr: std::sync::Weak<crate::manager::Manager>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(INTERVAL).await;
            let Some(m) = mgr.upgrade() else { return };
            let dirs: Vec<_> = m.list().iter().map(|vm| vm.dir.clone()).collect();
            drop(m);
            let caps = crate::limits::vm_caps();
            let _ = tokio::task::spawn_blocking(move || {
                for d in dirs {
                    cap_vm_dir(&d, &caps);
                }
            })
            .await;
        }
    });
}

/// The files of a VM directory a guest or VMM grows, and the cap of each.
pub fn cap_vm_dir(dir: &Path, caps: &crate::limits::VmCaps) {
    let mib = |m: u64| m.saturating_mul(1024 * 1024);
    let files: [(&str, u64); 5] = [
        ("console.log", mib(caps.console_mib)),
        ("vmm.log", mib(caps.vmm_log_mib)),
        ("firecracker.log", mib(caps.vmm_log_mib)),
        ("firecracker.log.1", mib(caps.vmm_log_mib)),
        ("metrics.json", mib(caps.vmm_log_mib)),
    ];
    for (name, keep) in files {
        let p = dir.join(name);
        match enforce(&p, keep) {
            Ok(0) => {}
            Ok(n) => tracing::debug!("{}: dropped {n} old bytes", p.display()),
            Err(e) => tracing::warn!("cannot cap {}: {e}", p.display()),
        }
    }
}

/// The note of a capped file: "4 MiB (vm.console_mib)".
pub fn cap_note(mib: u64, key: &str) -> String {
    format!("{mib} MiB ({key})")
}

/// What a log received since some offset ([`log_tail`]): its last lines, or nothing.
/// Displayed, it is the lines joined by ` | `, or `no output in <path>`; callers that
/// only want real output use [`LogTail::into_text`] (never the displayed words).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogTail {
    path: PathBuf,
    text: Option<String>,
}

impl LogTail {
    /// The lines, joined; `None` when the log received nothing (or cannot be read).
    pub fn into_text(self) -> Option<String> {
        self.text
    }

    /// True when the log received nothing since the offset.
    pub fn is_empty(&self) -> bool {
        self.text.is_none()
    }
}

impl std::fmt::Display for LogTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.text {
            Some(t) => f.write_str(t),
            None => write!(f, "no output in {}", self.path.display()),
        }
    }
}

/// The last `lines` non-empty lines written to a log since byte `from` (at most its last
/// 8 KiB), joined into one line for an error message.
pub fn log_tail(path: &Path, from: u64, lines: usize) -> LogTail {
    let text = (|| -> std::io::Result<String> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        let start = from.max(len.saturating_sub(8192));
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    })()
    .unwrap_or_default();
    let all: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    LogTail {
        path: path.to_path_buf(),
        text: (!all.is_empty()).then(|| all[all.len().saturating_sub(lines)..].join(" | ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_reads_only_new_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vmm.log");
        std::fs::write(&p, "old run\n").unwrap();
        let from = std::fs::metadata(&p).unwrap().len();
        std::fs::write(&p, "old run\nqemu: could not open disk\n\nbye\n").unwrap();
        assert_eq!(
            log_tail(&p, from, 12).into_text().as_deref(),
            Some("qemu: could not open disk | bye")
        );
        let none = log_tail(&dir.path().join("none"), 0, 3);
        assert!(none.is_empty());
        assert!(none.to_string().starts_with("no output in "), "{none}");
        // A log whose text happens to say "no output in" is still output.
        std::fs::write(&p, "no output in sight\n").unwrap();
        assert_eq!(
            log_tail(&p, 0, 1).into_text().as_deref(),
            Some("no output in sight")
        );
    }
    use std::io::Write;

    #[test]
    fn punching_keeps_offsets_and_the_tail() {
        let d = tempfile::Builder::new().tempdir_in("/var/tmp").unwrap();
        let p = d.path().join("console.log");
        let mut w = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .unwrap();
        let line = |i: u32| format!("line {i:08}\n");
        for i in 0..100_000 {
            w.write_all(line(i).as_bytes()).unwrap();
        }
        let total = std::fs::metadata(&p).unwrap().len();
        let freed = enforce(&p, 100_000).unwrap();
        assert!(freed > 1_000_000, "freed {freed}");
        // Same size; only about `keep` bytes still allocated.
        assert_eq!(std::fs::metadata(&p).unwrap().len(), total);
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&p).unwrap().blocks() * 512;
        assert!(allocated <= 100_000 + 2 * BLOCK, "allocated {allocated}");
        // The writer keeps appending at the end.
        w.write_all(b"after\n").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), total + 6);

        // A reader from 0 gets the note, then the kept bytes, and then follows on.
        let r = LogReader::default();
        let first = r.read(&p, 0, 200, "1 MiB (vm.console_mib)").unwrap();
        let text = String::from_utf8_lossy(&first);
        assert!(text.starts_with("[bandsox: "), "{text}");
        assert!(!first.contains(&0u8), "zeros leaked");
        let mut got = first.clone();
        let mut off = first.len() as u64;
        loop {
            let b = r.read(&p, off, 65536, "x").unwrap();
            if b.is_empty() {
                break;
            }
            off += b.len() as u64;
            got.extend_from_slice(&b);
        }
        assert!(got.ends_with(b"line 00099999\nafter\n"));
        // The reader's offset never passed the file's size (tail -f would call that
        // a truncation).
        assert!(off <= total + 6);
        // A reader near the end (tail -f) reads real offsets.
        let r2 = LogReader::default();
        assert_eq!(r2.read(&p, total, 100, "x").unwrap(), b"after\n");
        // Small files are left alone.
        assert_eq!(enforce(&p, total * 2).unwrap(), 0);
        assert_eq!(enforce(&d.path().join("missing"), 1).unwrap(), 0);
    }
}
