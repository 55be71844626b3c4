//! Directory operations in the tree's root that the kernel holds the root's lock for.
//!
//! While a `mkdir` or `rmdir` in the root waits for us (a boot can take 90 s), the
//! kernel holds the root directory's lock, and an `inval_entry` of a root name would
//! block on that lock until the operation ends. [`RootOps`] counts those operations so
//! that root-name invalidations are deferred while any is in flight and sent once none
//! is (the entries involved also expire by their TTL). Invariant: the notifier never
//! waits on a lock one of our own pending requests holds.
use std::collections::BTreeSet;
use std::sync::Arc;

use parking_lot::Mutex;

#[derive(Default)]
pub struct RootOps {
    state: Mutex<State>,
    idle: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    inflight: usize,
    deferred: BTreeSet<String>,
}

/// Held by a task answering a root `mkdir`/`rmdir` until the reply is sent.
pub struct RootOpGuard(Arc<RootOps>);

impl Drop for RootOpGuard {
    fn drop(&mut self) {
        let mut st = self.0.state.lock();
        st.inflight -= 1;
        if st.inflight == 0 {
            self.0.idle.notify_waiters();
        }
    }
}

impl RootOps {
    pub fn begin(self: &Arc<Self>) -> RootOpGuard {
        self.state.lock().inflight += 1;
        RootOpGuard(self.clone())
    }

    /// Either `Some(names)` to invalidate now (nothing in flight: `name` plus any that
    /// were deferred), or `None` when `name` was deferred.
    pub fn invalidate_now(&self, name: &str) -> Option<Vec<String>> {
        let mut st = self.state.lock();
        if st.inflight > 0 {
            st.deferred.insert(name.to_string());
            return None;
        }
        let mut names: Vec<String> = std::mem::take(&mut st.deferred).into_iter().collect();
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
        Some(names)
    }

    /// Wait until no root operation is in flight, then take the deferred names.
    pub async fn take_deferred_when_idle(&self) -> Vec<String> {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            {
                let mut st = self.state.lock();
                if st.inflight == 0 && !st.deferred.is_empty() {
                    return std::mem::take(&mut st.deferred).into_iter().collect();
                }
            }
            idle.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn defers_while_in_flight() {
        let ops = Arc::new(RootOps::default());
        assert_eq!(ops.invalidate_now("a"), Some(vec!["a".to_string()]));
        let g = ops.begin();
        assert_eq!(ops.invalidate_now("b"), None);
        assert_eq!(ops.invalidate_now("c"), None);
        let o = ops.clone();
        let waiter = tokio::spawn(async move { o.take_deferred_when_idle().await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(g);
        assert_eq!(
            waiter.await.unwrap(),
            vec!["b".to_string(), "c".to_string()]
        );
    }
}
