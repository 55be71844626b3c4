//! What arrives from the agent, routed by the one reader task; and the deadline task
//! that fails `fs_then` requests whose time is up.
//!
//! Invariants:
//! * The reader never waits for a consumer: answers complete their waiter, output goes to
//!   its command's queue (or is credited back at once when nobody takes it), change
//!   events to the bounded event queue.
//! * An undecodable frame means the stream is out of step: the connection ends with a
//!   protocol error for everything in flight.
//! * `Exited` marks the command's stdin finished before the event is delivered, so a
//!   stdin write after the consumer saw the exit fails.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::AsyncRead;
use tokio::sync::Notify;

use super::exec::ExecEvent;
use super::outbox::Outbox;
use super::{ClientError, Shared};
use crate::proto::codec::{FrameReader, Incoming, ProtoError};
use crate::proto::Message;

/// Fails `fs_then` requests whose time is up, in deadline order.
pub(super) async fn deadline_task(shared: Arc<Shared>, changed: Arc<Notify>) {
    let mut closed = shared.closed_tx.subscribe();
    loop {
        let (first, expired) = {
            let mut t = shared.tables();
            let now = Instant::now();
            let mut expired = Vec::new();
            while let Some(&(at, id)) = t.deadlines.first() {
                if at > now {
                    break;
                }
                if let Some(w) = t.take(id) {
                    expired.push(w);
                }
            }
            (t.deadlines.first().map(|&(at, _)| at), expired)
        };
        if !expired.is_empty() {
            shared.timed_out();
        }
        for w in expired {
            w.finish(Err(ClientError::Timeout));
        }
        let sleep = async {
            match first {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = changed.notified() => {}
            _ = closed.wait_for(|c| *c) => return,
        }
    }
}

pub(super) async fn reader_task<R: AsyncRead + Unpin>(
    mut reader: FrameReader<R>,
    shared: Arc<Shared>,
    outbox: Arc<Outbox>,
) {
    let mut closed = shared.closed_tx.subscribe();
    let why = loop {
        let msg = tokio::select! {
            m = reader.next() => m,
            _ = closed.wait_for(|c| *c) => break "closed".to_string(),
        };
        let msg = match msg {
            Ok(Incoming::Sync) => continue,
            Ok(Incoming::Frame(m)) => m,
            Err(e @ (ProtoError::Malformed(_) | ProtoError::TooLarge(_))) => {
                shared.out_of_step(&format!("undecodable input from the agent: {e}"));
                return;
            }
            Err(e) => break e.to_string(),
        };
        match msg {
            Message::Response { id, resp } => {
                let w = shared.tables().take(id);
                match w {
                    Some(w) => w.finish(Ok(resp)),
                    None => tracing::debug!("late answer for request {id}: {resp:?}"),
                }
            }
            Message::Output { id, stream, data } => {
                let st = shared.tables().streams.get(&id).cloned();
                let give_back = match st {
                    Some(st) if !st.discard.load(Ordering::SeqCst) => {
                        let n = data.len() as u64;
                        st.queued.fetch_add(n, Ordering::SeqCst);
                        match st.events.send(ExecEvent::Output(stream, data)) {
                            Ok(()) => 0,
                            Err(_) => {
                                st.queued.fetch_sub(n, Ordering::SeqCst);
                                n
                            }
                        }
                    }
                    _ => data.len() as u64,
                };
                if give_back > 0 {
                    let credit = Message::Credit {
                        id,
                        bytes: give_back,
                    };
                    outbox.push_now(&credit, &shared);
                }
            }
            Message::Exited { id, status } => {
                let st = shared.tables().streams.remove(&id);
                if let Some(st) = st {
                    st.stdin_lock().finished = true;
                    st.stdin_notify.notify_waiters();
                    let _ = st.events.send(ExecEvent::Exited(status));
                }
            }
            Message::StdinCredit { id, bytes } => {
                let st = shared.tables().streams.get(&id).cloned();
                if let Some(st) = st {
                    let mut s = st.stdin_lock();
                    s.credit = s.credit.saturating_add(bytes);
                    drop(s);
                    st.stdin_notify.notify_waiters();
                }
            }
            Message::FsEvents(batch) => {
                let q = &shared.fs_events;
                if let Some(tap) = q.tap.get() {
                    tap(&batch);
                }
                if q.tx.try_send(batch).is_err() {
                    q.lost.store(true, Ordering::SeqCst);
                }
            }
            Message::HelloAck(_) => {} // re-ack of a repeated hello
            other => tracing::warn!("unexpected message from the agent: {other:?}"),
        }
    };
    shared.shutdown(&why);
}
