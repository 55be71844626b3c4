//! How a run's output is stored: each stream once, plus an index of where `output`
//! switches between them; and the per-VM budget all of a VM's runs share.
//!
//! Files in `runs/<n>/`:
//! ```text
//! stdout, stderr   the bytes of each stream, exactly as received
//! output.idx       one 16-byte entry per switch of stream in arrival order:
//!                  u64 LE offset in `output`, u64 LE (stream << 63 | offset in that stream)
//! ```
//! `output` (both streams interleaved in arrival order) is served from those three files:
//! an offset in it is found by binary search in `output.idx`. A command that writes only
//! stdout costs its bytes plus one 16-byte entry. Runs written by earlier daemons, which
//! kept a separate `output` file, are still read from it.
//!
//! Invariants:
//! - An index entry is written before the data it points at, and a run's byte counters
//!   are raised only after both, so a reader that trusts the counters never reads an
//!   entry or byte that is not there yet.
//! - [`OutputBudget`] bounds the bytes all runs of one VM keep (stream files and index):
//!   a charge that does not fit first prunes the VM's oldest finished runs, then grants
//!   what is left; the run whose output does not fit ends with `output limit reached`.
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::limits::Limits;

pub const STDOUT: &str = "stdout";
pub const STDERR: &str = "stderr";
pub const INDEX: &str = "output.idx";
/// The interleaved file of runs spooled by earlier daemons.
pub const LEGACY_OUTPUT: &str = "output";
/// Bytes of one index entry.
pub const ENTRY: u64 = 16;
/// [`ENTRY`] as a buffer length.
const ENTRY_LEN: usize = 16;
const STREAM_BIT: u64 = 1 << 63;

/// Appends a run's output: each stream to its file, stream switches to the index.
pub struct Writer {
    files: [File; 2],
    index: File,
    /// The stream of the last chunk (0 stdout, 1 stderr).
    last: Option<usize>,
}

impl Writer {
    pub fn create(dir: &Path) -> std::io::Result<Writer> {
        let open = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(dir.join(name))
        };
        Ok(Writer {
            files: [open(STDOUT)?, open(STDERR)?],
            index: open(INDEX)?,
            last: None,
        })
    }

    /// Bytes [`Self::append`] of `len` bytes to `stream` will store.
    pub fn cost(&self, stream: usize, len: u64) -> u64 {
        if self.last == Some(stream) {
            len
        } else {
            len + ENTRY
        }
    }

    /// Append `data` to `stream`; `lens` are the stream lengths so far (stdout, stderr,
    /// output). Returns the index bytes written.
    pub fn append(&mut self, stream: usize, data: &[u8], lens: [u64; 3]) -> std::io::Result<u64> {
        let mut extra = 0;
        if self.last != Some(stream) {
            let mut e = [0u8; ENTRY_LEN];
            e[..8].copy_from_slice(&lens[2].to_le_bytes());
            let tagged = lens[stream] | if stream == 1 { STREAM_BIT } else { 0 };
            e[8..].copy_from_slice(&tagged.to_le_bytes());
            self.index.write_all(&e)?;
            self.last = Some(stream);
            extra = ENTRY;
        }
        self.files[stream].write_all(data)?;
        Ok(extra)
    }
}

/// Read entry `i` of the index: (offset in output, stream, offset in stream).
fn entry(index: &File, i: u64) -> std::io::Result<(u64, usize, u64)> {
    let mut e = [0u8; ENTRY_LEN];
    index.read_exact_at(&mut e, i * ENTRY)?;
    let out = u64::from_le_bytes(e[..8].try_into().unwrap_or_default());
    let tagged = u64::from_le_bytes(e[8..].try_into().unwrap_or_default());
    let stream = usize::from(tagged & STREAM_BIT != 0);
    Ok((out, stream, tagged & !STREAM_BIT))
}

fn read_full_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// Read up to `size` bytes of a stream file at `offset`, not beyond `len`.
pub fn read_file(path: &Path, offset: u64, size: u64, len: u64) -> std::io::Result<Vec<u8>> {
    if offset >= len {
        return Ok(Vec::new());
    }
    let want = usize::try_from((len - offset).min(size)).unwrap_or(usize::MAX);
    let f = File::open(path)?;
    let mut buf = vec![0u8; want];
    let n = read_full_at(&f, &mut buf, offset)?;
    buf.truncate(n);
    Ok(buf)
}

/// Read up to `size` bytes of the interleaved output at `offset`, not beyond
/// `output_len` (the run's output length when the caller looked).
pub fn read_output(
    dir: &Path,
    offset: u64,
    size: u64,
    output_len: u64,
) -> std::io::Result<Vec<u8>> {
    if offset >= output_len {
        return Ok(Vec::new());
    }
    let index = File::open(dir.join(INDEX))?;
    let entries = index.metadata()?.len() / ENTRY;
    if entries == 0 {
        return Ok(Vec::new());
    }
    // The last entry whose output offset is <= offset.
    let (mut lo, mut hi) = (0u64, entries);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if entry(&index, mid)?.0 <= offset {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let files = [File::open(dir.join(STDOUT))?, File::open(dir.join(STDERR))?];
    let end = output_len.min(offset.saturating_add(size));
    let mut out = Vec::with_capacity(usize::try_from(end - offset).unwrap_or(0));
    let mut at = offset;
    let mut i = lo;
    while at < end && i < entries {
        let (seg_out, stream, seg_stream) = entry(&index, i)?;
        let seg_end = if i + 1 < entries {
            entry(&index, i + 1)?.0.min(end)
        } else {
            end
        };
        if seg_end > at {
            let mut buf = vec![0u8; usize::try_from(seg_end - at).unwrap_or(usize::MAX)];
            let n = read_full_at(&files[stream], &mut buf, seg_stream + (at - seg_out))?;
            buf.truncate(n);
            at += n as u64;
            out.extend_from_slice(&buf);
            if n == 0 {
                break;
            }
        }
        i += 1;
    }
    Ok(out)
}

/// Bytes a run's output occupies in `dir` (streams, index, legacy output).
pub fn stored_bytes(dir: &Path) -> u64 {
    [STDOUT, STDERR, INDEX, LEGACY_OUTPUT]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0))
        .sum()
}

/// Frees a VM's oldest finished run for a budget that is full.
pub trait Prune: Send + Sync {
    /// Delete the oldest finished run other than `except` (and the image's main run);
    /// false when there is none.
    fn prune_oldest(&self, except: u64) -> bool;
}

/// The bytes all runs of one VM may keep (see the module doc).
pub struct OutputBudget {
    used: Mutex<u64>,
    /// The VM's own cap (`output_mib` of its config), further bounded by the limits'
    /// `vm.run_output_mib`.
    cap_mib: u64,
    /// The daemon's limits, for `vm.run_output_mib`.
    limits: Arc<Limits>,
    pruner: Mutex<Option<Weak<dyn Prune>>>,
}

impl OutputBudget {
    pub fn new(cap_mib: u64, limits: Arc<Limits>) -> OutputBudget {
        OutputBudget {
            used: Mutex::new(0),
            cap_mib,
            limits,
            pruner: Mutex::new(None),
        }
    }

    pub fn set_pruner(&self, p: Weak<dyn Prune>) {
        *self.pruner.lock() = Some(p);
    }

    /// The cap in bytes now.
    pub fn cap(&self) -> u64 {
        let mib = self
            .cap_mib
            .min(self.limits.vm_caps().run_output_mib)
            .max(1);
        mib.saturating_mul(1024 * 1024)
    }

    pub fn used(&self) -> u64 {
        *self.used.lock()
    }

    /// Count bytes already on disk (a run loaded after a restart); never refused.
    pub fn charge_existing(&self, n: u64) {
        *self.used.lock() += n;
    }

    /// Take `n` bytes for run `run`: prune older finished runs while they do not fit,
    /// then grant what fits (`n` or less).
    pub fn charge(&self, n: u64, run: u64) -> u64 {
        loop {
            {
                let mut used = self.used.lock();
                let cap = self.cap();
                if used.saturating_add(n) <= cap {
                    *used += n;
                    return n;
                }
            }
            let pruner = self.pruner.lock().as_ref().and_then(Weak::upgrade);
            if !pruner.is_some_and(|p| p.prune_oldest(run)) {
                let mut used = self.used.lock();
                let grant = self.cap().saturating_sub(*used).min(n);
                *used += grant;
                return grant;
            }
        }
    }

    pub fn release(&self, n: u64) {
        let mut used = self.used.lock();
        *used = used.saturating_sub(n);
    }
}

#[allow(
    clippy::cast_possible_truncation,
    reason = "test code: sizes, offsets and ids are small values the test constructs"
)]
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_interleaved_from_the_stream_files() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Writer::create(d.path()).unwrap();
        let mut lens = [0u64; 3];
        let mut expect = Vec::new();
        let chunks: &[(usize, &[u8])] = &[
            (0, b"out1 "),
            (0, b"out2 "),
            (1, b"ERR1 "),
            (0, b"out3 "),
            (1, b"ERR2 "),
            (1, b"ERR3"),
        ];
        for (s, data) in chunks {
            w.append(*s, data, lens).unwrap();
            lens[*s] += data.len() as u64;
            lens[2] += data.len() as u64;
            expect.extend_from_slice(data);
        }
        // Two same-stream chunks in a row share an entry.
        assert_eq!(
            std::fs::metadata(d.path().join(INDEX)).unwrap().len(),
            4 * ENTRY
        );
        assert_eq!(read_output(d.path(), 0, 1000, lens[2]).unwrap(), expect);
        // Every offset and size gives the same bytes as the reference.
        for off in 0..expect.len() as u64 {
            for size in [1u64, 3, 7, 100] {
                let got = read_output(d.path(), off, size, lens[2]).unwrap();
                let end = (off + size).min(expect.len() as u64) as usize;
                assert_eq!(got, &expect[off as usize..end], "off {off} size {size}");
            }
        }
        // Reads stop at the length the caller saw.
        assert_eq!(read_output(d.path(), 0, 1000, 7).unwrap(), b"out1 ou");
        assert_eq!(
            read_file(&d.path().join(STDERR), 0, 100, lens[1]).unwrap(),
            b"ERR1 ERR2 ERR3"
        );
        assert_eq!(
            stored_bytes(d.path()),
            lens[2] + 4 * ENTRY,
            "each byte stored once"
        );
    }

    struct Runs(Mutex<Vec<u64>>, std::sync::Arc<OutputBudget>);
    impl Prune for Runs {
        fn prune_oldest(&self, except: u64) -> bool {
            let mut runs = self.0.lock();
            match runs.iter().position(|r| *r != except) {
                Some(i) => {
                    runs.remove(i);
                    self.1.release(1024 * 1024);
                    true
                }
                None => false,
            }
        }
    }

    #[test]
    fn budget_prunes_then_caps() {
        let d = tempfile::tempdir().unwrap();
        let facts = crate::limits::HostFacts {
            mem_total_mib: 4096,
            cpus: 1,
            state_fs_mib: 1024,
            open_files: 1024,
        };
        // No limits file: only the budget's own 3 MiB cap applies.
        let limits = Limits::with_owner(d.path().join("limits"), facts, None);
        let b = std::sync::Arc::new(OutputBudget::new(3, limits));
        let runs = std::sync::Arc::new(Runs(Mutex::new(vec![1, 2]), b.clone()));
        let weak: Weak<dyn Prune> = std::sync::Arc::downgrade(&runs) as Weak<dyn Prune>;
        b.set_pruner(weak);
        b.charge_existing(2 * 1024 * 1024); // runs 1 and 2, 1 MiB each
        assert_eq!(b.charge(1024 * 1024, 3), 1024 * 1024);
        // Full: the next MiB prunes run 1.
        assert_eq!(b.charge(1024 * 1024, 3), 1024 * 1024);
        assert_eq!(*runs.0.lock(), vec![2]);
        assert_eq!(b.charge(1024 * 1024, 3), 1024 * 1024);
        assert!(runs.0.lock().is_empty());
        // Nothing left to prune: only what fits is granted.
        assert_eq!(b.charge(10, 3), 0);
        b.release(5);
        assert_eq!(b.charge(10, 3), 5);
    }
}
