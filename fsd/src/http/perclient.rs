//! Connections per client: one Unix user (socket) or one address (TCP) holds at most
//! [`MAX_PER_CLIENT`] of the daemon's [`super::conn::MAX_CONNECTIONS`] at once, so one
//! user opening connections without end cannot lock the others out.
//!
//! Invariants: an entry exists only while its client holds a connection (the count
//! drops when the [`Slot`] does, and a zero count is removed), so memory is bounded by
//! the connections served; the check and the count are one step under one lock.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;

/// Connections one client may hold at once.
pub const MAX_PER_CLIENT: usize = 64;

/// Who a connection counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    Uid(u32),
    Addr(IpAddr),
}

#[derive(Default)]
pub struct PerClient {
    held: Arc<Mutex<HashMap<Client, usize>>>,
}

/// One connection held by a client; given back when dropped.
pub struct Slot {
    held: Arc<Mutex<HashMap<Client, usize>>>,
    client: Client,
}

impl PerClient {
    /// A slot for `client`, or `None` when it already holds [`MAX_PER_CLIENT`].
    pub fn acquire(&self, client: Client) -> Option<Slot> {
        let mut map = self.held.lock();
        let n = map.entry(client).or_insert(0);
        if *n >= MAX_PER_CLIENT {
            return None;
        }
        *n += 1;
        Some(Slot {
            held: self.held.clone(),
            client,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.held.lock();
        if let Some(n) = map.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_client_is_capped_and_others_are_not() {
        let p = PerClient::default();
        let held: Vec<_> = (0..MAX_PER_CLIENT)
            .map(|_| p.acquire(Client::Uid(1000)).unwrap())
            .collect();
        assert!(p.acquire(Client::Uid(1000)).is_none());
        assert!(p.acquire(Client::Uid(1001)).is_some());
        drop(held);
        assert!(p.acquire(Client::Uid(1000)).is_some());
        assert!(
            p.held.lock().is_empty(),
            "entries outlive their connections"
        );
    }
}
