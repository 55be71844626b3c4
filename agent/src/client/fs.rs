//! File-service traffic on the connection: requests (awaited, or with a completion and
//! a deadline) and the agent's change events.
//!
//! Invariants:
//! * An [`AgentClient::fs_then`] completion is called exactly once: with the answer on the
//!   reader task, with `Timeout` from the deadline task, with what
//!   [`AgentClient::cancel`] gave, or with `Closed`.
//! * Change events are bounded: when the consumer falls [`FS_EVENT_BATCHES`] batches
//!   behind, further batches are dropped and the consumer is told
//!   [`FsEvent::Overflow`] instead.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::{AgentClient, ClientError, Waiter};
use crate::proto::fs::{FsEvent, FsRequest, FsResponse, NodeId};
use crate::proto::{Id, Message, Request, Response};

/// File-service change events on their way from the reader to one consumer.
///
/// Bounded: when the consumer falls [`FS_EVENT_BATCHES`] batches behind, further batches
/// are dropped and the consumer is told [`FsEvent::Overflow`] instead, so a chatty guest
/// cannot grow the daemon's memory.
pub(super) struct FsEventQueue {
    pub(super) tx: mpsc::Sender<Vec<FsEvent>>,
    pub(super) rx: Mutex<Option<mpsc::Receiver<Vec<FsEvent>>>>,
    pub(super) lost: Arc<AtomicBool>,
    /// Sees every batch on the reader, before anything that arrives after it.
    pub(super) tap: std::sync::OnceLock<FsEventTap>,
}

/// See [`AgentClient::set_fs_event_tap`].
pub type FsEventTap = Box<dyn Fn(&[FsEvent]) + Send + Sync>;

/// Batches of file events queued for the consumer before new ones are dropped.
pub const FS_EVENT_BATCHES: usize = 256;

/// The completion of an [`AgentClient::fs_then`] request. Called exactly once: with the
/// answer on the connection's reader task, or with an error (`Closed`, `Timeout`, or what
/// [`AgentClient::cancel`] gave) wherever the request ended.
pub type FsDone = Box<dyn FnOnce(Result<FsResponse, ClientError>) + Send>;

/// A file-service answer out of a response.
pub(super) fn fs_answer(resp: Response) -> Result<FsResponse, ClientError> {
    match resp {
        Response::Fs(r) => Ok(r),
        Response::Error { errno, message } => Err(ClientError::Remote { errno, message }),
        other => Err(ClientError::Protocol(format!(
            "unexpected answer to a file request: {other:?}"
        ))),
    }
}

impl AgentClient {
    /// A file-service request. `Response::Error` becomes [`ClientError::Remote`]; any
    /// answer other than `Response::Fs` is a protocol error.
    pub async fn fs(&self, req: FsRequest, timeout: Duration) -> Result<FsResponse, ClientError> {
        match self.request(Request::Fs(req), timeout).await? {
            Response::Fs(r) => Ok(r),
            other => Err(ClientError::Protocol(format!(
                "unexpected answer to a file request: {other:?}"
            ))),
        }
    }

    /// Send a file-service request without waiting: `done` is called with the answer on
    /// the connection's reader task, with `Timeout` after `timeout`, or with `Closed`
    /// (possibly at once, on this thread). Costs no task: the request is written from
    /// this thread when the stream takes it. Returns the request id (for [`Self::cancel`]).
    pub fn fs_then(&self, req: FsRequest, timeout: Duration, done: FsDone) -> Id {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let expires = Instant::now() + timeout;
        let shared = &self.inner.shared;
        let earliest = {
            let mut t = shared.tables();
            if shared.closed.load(Ordering::SeqCst) {
                drop(t);
                done(Err(ClientError::Closed));
                return id;
            }
            t.pending.insert(id, Waiter::Then { done, expires });
            t.deadlines.insert((expires, id));
            t.deadlines.first() == Some(&(expires, id))
        };
        if earliest {
            self.inner.deadline_changed.notify_one();
        }
        let msg = Message::Request {
            id,
            req: Request::Fs(req),
        };
        self.inner.outbox.push_now(&msg, shared);
        id
    }

    /// End request `id` now with `err` (its completion runs here) unless it has already
    /// ended. A late answer is then ignored. Returns whether it was still pending.
    pub fn cancel(&self, id: Id, err: ClientError) -> bool {
        let w = self.inner.shared.tables().take(id);
        match w {
            Some(w) => {
                w.finish(Err(err));
                true
            }
            None => false,
        }
    }

    /// Drop file-service node references (no answer). Waits only for queue space.
    pub async fn forget(&self, nodes: Vec<(NodeId, u64)>) -> Result<(), ClientError> {
        if nodes.is_empty() {
            return Ok(());
        }
        self.inner.send(Message::Forget { nodes }).await
    }

    /// Have `tap` see every file-event batch on the connection's reader, in order with
    /// everything else the agent sends (so before a command's `Exited` that followed the
    /// batch is delivered). Must be quick and must not block. Only the first tap is kept.
    pub fn set_fs_event_tap(&self, tap: FsEventTap) {
        let _ = self.inner.shared.fs_events.tap.set(tap);
    }

    /// The connection's file-event stream; only the first caller gets it.
    pub fn take_fs_events(&self) -> Option<FsEvents> {
        let q = &self.inner.shared.fs_events;
        let rx = q.rx.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        Some(FsEvents {
            rx,
            lost: q.lost.clone(),
            closed: self.inner.shared.closed_tx.subscribe(),
        })
    }
}

/// Receiver of file-service events (see [`AgentClient::take_fs_events`]).
pub struct FsEvents {
    rx: mpsc::Receiver<Vec<FsEvent>>,
    lost: Arc<AtomicBool>,
    closed: watch::Receiver<bool>,
}

impl FsEvents {
    /// The next batch; `[Overflow]` after batches were dropped; `None` once the
    /// connection is gone and everything was delivered.
    pub async fn next(&mut self) -> Option<Vec<FsEvent>> {
        if self.lost.swap(false, Ordering::SeqCst) {
            return Some(vec![FsEvent::Overflow]);
        }
        let batch = tokio::select! {
            b = self.rx.recv() => b,
            _ = self.closed.wait_for(|c| *c) => self.rx.try_recv().ok(),
        };
        if self.lost.swap(false, Ordering::SeqCst) {
            return Some(vec![FsEvent::Overflow]);
        }
        batch
    }
}
