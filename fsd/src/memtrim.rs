//! Giving freed memory back to the system after large frees.
//!
//! A terminal screen is thousands of row allocations of a few KiB each. glibc's malloc
//! serves them from its arenas and, once they are freed, keeps the pages for reuse
//! unless they happen to lie at the top of a heap: measured with 50 running 1000x1000
//! terminals, the daemon stayed at 1.58 GB after every one had ended, and went down to
//! 34 MB after one `malloc_trim(0)`. So whoever frees a screen calls [`after_large_free`].
//!
//! Invariants:
//! - Trimming runs on a thread of its own, never under a caller's lock, and at most one
//!   is pending: frees within [`COALESCE`] of each other (every run of a VM killed at
//!   once) cost one trim.
//! - Elsewhere than glibc this does nothing.
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How long a requested trim waits for more frees to join it.
const COALESCE: Duration = Duration::from_millis(50);

static PENDING: AtomicBool = AtomicBool::new(false);

/// Ask for freed memory to be returned to the system soon.
pub fn after_large_free() {
    if PENDING.swap(true, Ordering::AcqRel) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("bandsox-trim".into())
        .spawn(|| {
            std::thread::sleep(COALESCE);
            PENDING.store(false, Ordering::Release);
            trim();
        });
    if let Err(e) = spawned {
        PENDING.store(false, Ordering::Release);
        tracing::debug!("cannot start the memory trim thread: {e}");
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks and releases glibc's own free lists under its arena
    // locks; it has no preconditions and is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
