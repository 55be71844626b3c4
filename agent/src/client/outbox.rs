//! Frames on their way to the agent: one byte buffer behind a lock, and the writer task.
//!
//! Invariants:
//! * Frames are appended in send order under one lock, so they never interleave.
//! * A sender writes to the stream at once when nothing is queued (a non-blocking write
//!   from whatever thread sends); whatever the stream does not take is left to the writer
//!   task. Senders wait only while more than [`OUTBOX_LIMIT`] bytes are queued; small
//!   frames (credits, metadata requests) are queued whatever the size.
//! * A failed write kills the connection; closing it drops the write half, so the peer
//!   sees the end at once.
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::io::AsyncWrite;
use tokio::sync::Notify;

use super::{ClientError, Shared};
use crate::proto::codec::append_frame;
use crate::proto::Message;

/// Bytes queued in the [`Outbox`] beyond which senders wait for the stream.
pub const OUTBOX_LIMIT: usize = 4 * 1024 * 1024;

pub(super) type BoxWrite = std::pin::Pin<Box<dyn AsyncWrite + Send>>;

/// Frames on their way to the agent (see the module docs).
pub(super) struct Outbox {
    state: Mutex<OutboxState>,
    /// Bytes are left for the writer task.
    pending: Notify,
    /// The queue shrank (senders waiting at [`OUTBOX_LIMIT`]).
    drained: Notify,
}

enum PushError {
    Encode(String),
    Write(std::io::Error),
}

pub(super) struct OutboxState {
    /// `None` once the connection is closed: dropping it (with the reader's half)
    /// closes the stream, so the peer sees the end at once (a virtio-serial port
    /// takes one connection at a time).
    pub(super) w: Option<BoxWrite>,
    buf: Vec<u8>,
    /// First byte of `buf` not yet written.
    pos: usize,
}

impl Outbox {
    pub(super) fn new(w: BoxWrite) -> Outbox {
        Outbox {
            state: Mutex::new(OutboxState {
                w: Some(w),
                buf: Vec::with_capacity(64 * 1024),
                pos: 0,
            }),
            pending: Notify::new(),
            drained: Notify::new(),
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue `m`, waiting first while more than [`OUTBOX_LIMIT`] bytes are queued.
    pub(super) async fn send(&self, m: &Message, shared: &Shared) -> Result<(), ClientError> {
        let mut closed = shared.closed_tx.subscribe();
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let res = {
                let mut st = self.lock();
                if shared.closed.load(Ordering::SeqCst) {
                    return Err(ClientError::Closed);
                }
                (st.buf.len() - st.pos <= OUTBOX_LIMIT).then(|| self.push(&mut st, m))
            };
            match res {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) => return Err(Self::failed(shared, e)),
                None => {}
            }
            tokio::select! {
                _ = notified => {}
                _ = closed.wait_for(|c| *c) => return Err(ClientError::Closed),
            }
        }
    }

    /// Queue `m` whatever the queue's size (small frames: credits, metadata requests).
    pub(super) fn push_now(&self, m: &Message, shared: &Shared) {
        let res = {
            let mut st = self.lock();
            self.push(&mut st, m)
        };
        if let Err(e) = res {
            Self::failed(shared, e);
        }
    }

    /// A failed push: the connection is dead when the stream failed (called without the
    /// outbox lock, because shutting down runs completions that may send again).
    fn failed(shared: &Shared, e: PushError) -> ClientError {
        match e {
            PushError::Encode(msg) => ClientError::Protocol(msg),
            PushError::Write(e) => {
                shared.shutdown(&format!("write failed: {e}"));
                ClientError::Closed
            }
        }
    }

    /// Append one frame; when nothing was queued before it, write at once what the
    /// stream takes without waiting, and leave the rest to the writer task.
    fn push(&self, st: &mut OutboxState, m: &Message) -> Result<(), PushError> {
        let idle = st.pos == st.buf.len();
        append_frame(&mut st.buf, m).map_err(|e| PushError::Encode(e.to_string()))?;
        if !idle {
            // A write is outstanding and the writer task knows.
            return Ok(());
        }
        let mut cx = Context::from_waker(Waker::noop());
        match Self::write_some(st, &mut cx) {
            Poll::Ready(Ok(())) => Ok(()),
            Poll::Pending => {
                self.pending.notify_one();
                Ok(())
            }
            Poll::Ready(Err(e)) => Err(PushError::Write(e)),
        }
    }

    /// Write queued bytes until none are left (then flush) or the stream would block.
    fn write_some(st: &mut OutboxState, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while st.pos < st.buf.len() {
            let OutboxState { w, buf, pos } = &mut *st;
            let Some(w) = w.as_mut() else {
                return Poll::Ready(Err(std::io::ErrorKind::NotConnected.into()));
            };
            match w.as_mut().poll_write(cx, &buf[*pos..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => *pos += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        st.buf.clear();
        st.pos = 0;
        if st.buf.capacity() > 1024 * 1024 {
            st.buf.shrink_to(64 * 1024);
        }
        match st.w.as_mut() {
            Some(w) => w.as_mut().poll_flush(cx),
            None => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
}

/// Writes what senders could not write themselves; closes the stream's write half when
/// the connection ends.
pub(super) async fn writer_task(outbox: Arc<Outbox>, shared: Arc<Shared>) {
    writer_loop(&outbox, &shared).await;
    let w = outbox.lock().w.take();
    drop(w);
}

async fn writer_loop(outbox: &Outbox, shared: &Shared) {
    let mut closed = shared.closed_tx.subscribe();
    loop {
        tokio::select! {
            _ = outbox.pending.notified() => {}
            _ = closed.wait_for(|c| *c) => break,
        }
        let res = std::future::poll_fn(|cx| {
            let mut st = outbox.lock();
            let r = Outbox::write_some(&mut st, cx);
            drop(st);
            outbox.drained.notify_waiters();
            r
        });
        let res = tokio::select! {
            r = res => r,
            _ = closed.wait_for(|c| *c) => break,
        };
        if let Err(e) = res {
            shared.shutdown(&format!("write failed: {e}"));
            break;
        }
    }
}
