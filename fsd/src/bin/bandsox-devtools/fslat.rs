//! `bandsox-devtools fslat`: per-call latency of file operations in a directory, measured in-process
//! (no shell or process start in the numbers). Used by `bench/fs.sh` to compare `fs/` with
//! the agent's raw calls (`bandsox-devtools fsbench`).
//!
//! Reports medians in microseconds of: `stat` as programs usually do it (the kernel may
//! answer from its attribute cache), `statx(AT_STATX_FORCE_SYNC)` (always asks the
//! filesystem), a 4 KiB `pread` through `O_DIRECT` (always reaches the filesystem), and
//! `create` + `close` + `unlink` of a fresh name.
use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

#[expect(
    clippy::cast_precision_loss,
    reason = "latency statistics: f64 precision is plenty"
)]
fn median_us(mut v: Vec<Duration>) -> f64 {
    v.sort_unstable();
    v.get(v.len() / 2)
        .map(|d| d.as_nanos() as f64 / 1000.0)
        .unwrap_or(0.0)
}

fn time<F: FnMut() -> std::io::Result<()>>(n: u32, mut f: F) -> Result<f64, String> {
    let mut v = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let t0 = Instant::now();
        f().map_err(|e| e.to_string())?;
        v.push(t0.elapsed());
    }
    Ok(median_us(v))
}

/// Measure in `dir` (created files are removed); prints one `key=value` line.
pub fn run(dir: &Path, n: u32) -> Result<String, String> {
    let file = dir.join(".fslat-file");
    std::fs::write(&file, vec![7u8; 64 * 1024]).map_err(|e| format!("{}: {e}", file.display()))?;
    let cpath = CString::new(file.as_os_str().as_bytes()).map_err(|e| e.to_string())?;

    let stat = time(n, || std::fs::metadata(&file).map(|_| ()))?;
    let statx_sync = time(n, || {
        // SAFETY: a zeroed statx is a valid output buffer; cpath is NUL-terminated.
        let mut sx: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers for the duration of the call.
        let rc = unsafe {
            libc::statx(
                libc::AT_FDCWD,
                cpath.as_ptr(),
                libc::AT_STATX_FORCE_SYNC,
                libc::STATX_BASIC_STATS,
                &mut sx,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    })?;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&file)
        .map_err(|e| format!("O_DIRECT open: {e}"))?;
    // O_DIRECT wants an aligned buffer: take a 4 KiB-aligned window of a larger one.
    let mut backing = vec![0u8; 8192];
    let off = backing.as_ptr().align_offset(4096);
    let buf = &mut backing[off..off + 4096];
    let read4k = time(n, || f.read_at(buf, 0).map(|_| ()))?;
    let mut i = 0u32;
    let create = time(n, || {
        i += 1;
        let p = dir.join(format!(".fslat-{i}"));
        drop(std::fs::File::create(&p)?);
        std::fs::remove_file(&p)
    })?;
    let _ = std::fs::remove_file(&file);
    Ok(format!(
        "n={n} stat_us={stat:.1} statx_sync_us={statx_sync:.1} read4k_direct_us={read4k:.1} create_unlink_us={create:.1}"
    ))
}
