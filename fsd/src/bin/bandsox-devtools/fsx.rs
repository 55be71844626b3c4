//! `bandsox-devtools fsx`: a small file-system exerciser in the spirit of fsx.
//!
//! Applies a seeded random sequence of writes at random offsets, truncates (down and
//! up), reads, fsyncs and reopens to a file under test and to a reference file in a
//! local directory, and compares every read and the final contents. Any mismatch names
//! the seed and the operation number so the run can be replayed exactly.
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};

pub struct FsxOptions {
    pub file: PathBuf,
    pub ops: u32,
    pub seed: u64,
    /// Largest file size the run produces.
    pub max_size: u64,
}

fn open(p: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
}

fn read_at(f: &File, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = f.read_at(&mut buf[done..], off + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    Ok(buf)
}

/// Run the exerciser; `Err` describes the first divergence.
#[expect(
    clippy::cast_possible_truncation,
    reason = "an operation length bounded by 256 KiB"
)]
pub fn run(opts: &FsxOptions) -> Result<(), String> {
    let refdir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let ref_path = refdir.path().join("reference");
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    let _ = std::fs::remove_file(&opts.file);
    let mut f = open(&opts.file).map_err(|e| io("open file under test", e))?;
    let mut r = open(&ref_path).map_err(|e| io("open reference", e))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let max = opts.max_size.max(1);
    for op in 0..opts.ops {
        let ctx = |what: &str| format!("seed {} op {op}: {what}", opts.seed);
        match rng.random_range(0..100u32) {
            0..=44 => {
                let off = rng.random_range(0..max);
                let len = rng.random_range(1..=(256 * 1024).min(max - off).max(1)) as usize;
                let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                f.write_all_at(&data, off)
                    .map_err(|e| ctx(&format!("write {len}@{off}: {e}")))?;
                r.write_all_at(&data, off)
                    .map_err(|e| ctx(&format!("reference write: {e}")))?;
            }
            45..=54 => {
                let size = rng.random_range(0..max);
                f.set_len(size)
                    .map_err(|e| ctx(&format!("truncate to {size}: {e}")))?;
                r.set_len(size)
                    .map_err(|e| ctx(&format!("reference truncate: {e}")))?;
            }
            55..=89 => {
                let off = rng.random_range(0..max);
                let len = rng.random_range(1..=(512 * 1024usize));
                let got = read_at(&f, off, len).map_err(|e| ctx(&format!("read: {e}")))?;
                let want =
                    read_at(&r, off, len).map_err(|e| ctx(&format!("reference read: {e}")))?;
                if got != want {
                    let first = got
                        .iter()
                        .zip(&want)
                        .position(|(a, b)| a != b)
                        .unwrap_or(got.len().min(want.len()));
                    return Err(ctx(&format!(
                        "read {len}@{off}: got {} bytes, expected {}; first difference at +{first}",
                        got.len(),
                        want.len()
                    )));
                }
            }
            90..=94 => f.sync_all().map_err(|e| ctx(&format!("fsync: {e}")))?,
            _ => {
                drop(f);
                f = open(&opts.file).map_err(|e| ctx(&format!("reopen: {e}")))?;
                r = open(&ref_path).map_err(|e| ctx(&format!("reference reopen: {e}")))?;
            }
        }
        let (a, b) = (
            f.metadata().map_err(|e| ctx(&format!("fstat: {e}")))?.len(),
            r.metadata()
                .map_err(|e| ctx(&format!("reference fstat: {e}")))?
                .len(),
        );
        if a != b {
            return Err(ctx(&format!("size {a}, expected {b}")));
        }
    }
    drop(f);
    let got = std::fs::read(&opts.file).map_err(|e| io("final read", e))?;
    let want = std::fs::read(&ref_path).map_err(|e| io("final reference read", e))?;
    if got != want {
        return Err(format!(
            "seed {}: final contents differ ({} vs {} bytes)",
            opts.seed,
            got.len(),
            want.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_file_matches_its_reference() {
        let d = tempfile::tempdir().unwrap();
        let opts = FsxOptions {
            file: d.path().join("f"),
            ops: 300,
            seed: 7,
            max_size: 2 * 1024 * 1024,
        };
        run(&opts).unwrap();
    }
}
