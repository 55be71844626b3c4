//! Per-session memory of the tree (`cat ctl`'s last result, `runs/last`), bounded.
//!
//! Sessions are ids the callers choose (any process can `setsid`), so a map keyed by
//! them would grow without bound. [`PerSession`] keeps the [`MAX_SESSIONS`] sessions
//! that used it most recently; an older session reads as one that never did anything
//! (an empty `ctl` result, the VM's newest run).
use std::num::NonZeroUsize;

use lru::LruCache;
use parking_lot::Mutex;

/// Sessions remembered per map.
pub const MAX_SESSIONS: usize = 1024;

/// A value per caller session, for the most recent [`MAX_SESSIONS`] sessions.
pub struct PerSession<V>(Mutex<LruCache<u32, V>>);

impl<V> Default for PerSession<V> {
    fn default() -> Self {
        let cap = NonZeroUsize::new(MAX_SESSIONS).unwrap_or(NonZeroUsize::MIN);
        PerSession(Mutex::new(LruCache::new(cap)))
    }
}

impl<V: Clone> PerSession<V> {
    pub fn get(&self, session: u32) -> Option<V> {
        self.0.lock().get(&session).cloned()
    }

    /// Remember `v` for `session`, forgetting the least recently used session when full.
    pub fn set(&self, session: u32, v: V) {
        self.0.lock().put(session, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_recent_sessions() {
        let m = PerSession::default();
        for s in 0..u32::try_from(MAX_SESSIONS).unwrap() + 10 {
            m.set(s, s * 2);
        }
        assert_eq!(m.get(0), None);
        assert_eq!(m.get(9), None);
        assert_eq!(m.get(10), Some(20));
        m.set(10, 7);
        assert_eq!(m.get(10), Some(7));
    }
}
