//! Failed authentications per client address: after [`MAX_FAILURES`] within
//! [`WINDOW`], a client is refused (429 with `Retry-After`) *before* its credentials are
//! checked, until the window has passed.
//!
//! Why not `governor`: its limiters consume a cell on every check and cannot be asked
//! whether a client is over its limit without counting one more attempt, while here
//! only failures count and the check must come before the verification (otherwise a
//! limited client could still learn that a guess was right).
//!
//! Invariants: memory is bounded (at most [`MAX_CLIENTS`] addresses are tracked; when
//! full, expired entries are dropped first, then the oldest); a successful
//! authentication does not reset the count (a guesser with one valid key gains nothing).
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Failures allowed per client within [`WINDOW`].
pub const MAX_FAILURES: u32 = 10;
/// The window failures are counted in.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at most.
pub const MAX_CLIENTS: usize = 4096;

#[derive(Default)]
pub struct FailureLimiter {
    clients: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl FailureLimiter {
    /// `Some(seconds to wait)` when `client` may not try now.
    pub fn blocked(&self, client: IpAddr) -> Option<u64> {
        let map = self.clients.lock();
        let (count, since) = map.get(&client)?;
        let left = WINDOW.checked_sub(since.elapsed())?;
        (*count >= MAX_FAILURES).then(|| left.as_secs().max(1))
    }

    /// Count one failed authentication of `client`.
    pub fn failed(&self, client: IpAddr) {
        let mut map = self.clients.lock();
        if map.len() >= MAX_CLIENTS && !map.contains_key(&client) {
            map.retain(|_, (_, since)| since.elapsed() < WINDOW);
            if map.len() >= MAX_CLIENTS {
                if let Some(oldest) = map.iter().min_by_key(|(_, (_, s))| *s).map(|(k, _)| *k) {
                    map.remove(&oldest);
                }
            }
        }
        let e = map.entry(client).or_insert((0, Instant::now()));
        if e.1.elapsed() >= WINDOW {
            *e = (0, Instant::now());
        }
        e.0 = e.0.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_limit_and_per_client() {
        let l = FailureLimiter::default();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        for _ in 0..MAX_FAILURES - 1 {
            l.failed(a);
            assert_eq!(l.blocked(a), None);
        }
        l.failed(a);
        assert!(l.blocked(a).is_some_and(|s| (1..=60).contains(&s)));
        assert_eq!(l.blocked(b), None);
    }

    #[test]
    fn memory_is_bounded() {
        let l = FailureLimiter::default();
        for i in 0..u32::try_from(MAX_CLIENTS + 100).unwrap_or(u32::MAX) {
            l.failed(IpAddr::from(i.to_be_bytes()));
        }
        assert!(l.clients.lock().len() <= MAX_CLIENTS);
    }
}
