//! The host side of the protocol: one multiplexed connection to an agent.
//!
//! The connection is split by concern: [`outbox`] (frames on their way to the agent and
//! the writer task), [`reader`] (routing what arrives, and the deadlines of `fs_then`
//! requests), [`exec`] (commands: output, stdin, signals) and [`fs`] (file-service
//! requests and change events). This file holds the connection itself: the handshake,
//! requests, and the state the parts share.
//!
//! Invariants:
//! * All frames go through one [`outbox::Outbox`]: a byte buffer behind a lock, appended
//!   to in send order, so frames never interleave. The sender writes it to the stream at
//!   once when it can (a non-blocking write from whatever thread sends, so a request
//!   costs no hand-off to another task); whatever the stream does not take now is written
//!   by the writer task. Senders wait only while more than [`OUTBOX_LIMIT`] bytes are
//!   queued. One reader task routes everything that arrives.
//! * The reader never waits for a consumer: output is queued per command in an unbounded
//!   queue that is nevertheless bounded by the stream's credit window, because credit is
//!   granted back only as [`ExecHandle::next`] hands output to the consumer. A slow
//!   consumer therefore stalls only its own command.
//! * Stdin is sent only within the agent's stdin credit (see `proto` docs).
//! * When the connection dies (EOF, I/O or decode error) every pending request fails with
//!   [`ClientError::Closed`] and every open command receives [`ExecEvent::Lost`], at once.
//!   Registration checks the closed flag under the same lock, so nothing registered
//!   after the death can hang.
//! * A stream that is out of step (an undecodable frame, or a request timing out while
//!   the reader has waited longer than [`STALLED_FRAME`] for the rest of one frame, as
//!   when a corrupted header announced a longer frame) is a dead connection: it is
//!   logged, pending requests fail with [`ClientError::Protocol`] (EIO), and
//!   [`AgentClient::is_closed`] turns true so the owner reconnects.
//! * Dropping the last [`AgentClient`], [`ExecHandle`] and [`ExecControl`] closes the
//!   connection.
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::proto::codec::{append_frame, FrameReader, Incoming, MidFrame, ProtoError};
use crate::proto::{
    AgentInfo, Hello, Id, Message, Request, Response, PROTOCOL_VERSION, SYNC_MAGIC,
};

mod exec;
mod fs;
mod outbox;
mod reader;

pub use exec::{ExecControl, ExecEvent, ExecHandle};
pub use fs::{FsDone, FsEventTap, FsEvents, FS_EVENT_BATCHES};
pub use outbox::OUTBOX_LIMIT;

use exec::StreamState;
use fs::{fs_answer, FsEventQueue};
use outbox::{writer_task, BoxWrite, Outbox};
use reader::{deadline_task, reader_task};

/// How often the hello is re-sent during [`AgentClient::connect`].
pub const HELLO_RESEND: Duration = Duration::from_millis(500);
/// A request that times out while the reader has waited this long inside one frame
/// means the stream is out of step (see the module invariants). The agent writes each
/// frame whole, so an honest frame is never this slow while requests are answered.
pub const STALLED_FRAME: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent connection i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("agent protocol error: {0}")]
    Protocol(String),
    #[error("the agent did not answer in time")]
    Timeout,
    #[error("the agent connection is closed")]
    Closed,
    #[error("the agent refused the session: {0}")]
    Refused(String),
    #[error("{message}")]
    Remote { errno: i32, message: String },
}

/// State shared by the handle side and the reader/writer tasks.
struct Shared {
    closed: AtomicBool,
    closed_tx: watch::Sender<bool>,
    tables: Mutex<Tables>,
    fs_events: FsEventQueue,
    /// The reader's position inside a frame (see [`STALLED_FRAME`]).
    mid_frame: Arc<MidFrame>,
}

/// Who waits for an answer.
enum Waiter {
    /// A task awaiting [`AgentClient::request`].
    Task(oneshot::Sender<Result<Response, ClientError>>),
    /// A completion, due to fail with `Timeout` at `expires`.
    Then { done: FsDone, expires: Instant },
}

impl Waiter {
    /// Deliver an outcome (outside any lock: a completion may do real work).
    fn finish(self, res: Result<Response, ClientError>) {
        match self {
            Waiter::Task(tx) => {
                let _ = tx.send(res);
            }
            Waiter::Then { done, .. } => done(res.and_then(fs_answer)),
        }
    }
}

#[derive(Default)]
struct Tables {
    pending: HashMap<Id, Waiter>,
    /// `Waiter::Then` entries by when they expire (see [`deadline_task`]).
    deadlines: std::collections::BTreeSet<(Instant, Id)>,
    streams: HashMap<Id, Arc<StreamState>>,
}

impl Tables {
    /// Take the waiter of `id` (and its deadline).
    fn take(&mut self, id: Id) -> Option<Waiter> {
        let w = self.pending.remove(&id)?;
        if let Waiter::Then { expires, .. } = &w {
            self.deadlines.remove(&(*expires, id));
        }
        Some(w)
    }
}

impl Shared {
    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Mark the connection dead: fail pending requests, deliver `Lost`.
    fn shutdown(&self, why: &str) {
        self.end(why, false);
    }

    /// The stream is out of step: the connection is dead, and requests in flight fail
    /// with a protocol error (their answers may have been lost or garbled).
    fn out_of_step(&self, why: &str) {
        self.end(why, true);
    }

    /// A request timed out: if the reader has been stuck inside one frame for long, the
    /// stream is out of step.
    fn timed_out(&self) {
        if let Some(t) = self.mid_frame.stalled_for() {
            if t >= STALLED_FRAME {
                self.out_of_step(&format!(
                    "a request timed out while the rest of a frame was awaited for {} ms",
                    t.as_millis()
                ));
            }
        }
    }

    fn end(&self, why: &str, broken: bool) {
        let (pending, streams) = {
            let mut t = self.tables();
            if self.closed.swap(true, Ordering::SeqCst) {
                return;
            }
            t.deadlines.clear();
            (
                std::mem::take(&mut t.pending),
                std::mem::take(&mut t.streams),
            )
        };
        if broken {
            tracing::warn!("agent connection out of step, closing it: {why}");
        } else {
            tracing::debug!("agent connection closed: {why}");
        }
        for (_, w) in pending {
            w.finish(Err(if broken {
                ClientError::Protocol(format!("the agent connection broke: {why}"))
            } else {
                ClientError::Closed
            }));
        }
        for (_, s) in streams {
            let _ = s.events.send(ExecEvent::Lost);
            s.stdin_lock().finished = true;
            s.stdin_notify.notify_waiters();
        }
        self.closed_tx.send_replace(true);
    }
}

struct Inner {
    shared: Arc<Shared>,
    outbox: Arc<Outbox>,
    /// A request with an earlier deadline than any before was registered.
    deadline_changed: Arc<Notify>,
    /// What the agent said in the handshake.
    info: AgentInfo,
    next_id: AtomicU64,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.shared.shutdown("client dropped");
    }
}

impl Inner {
    async fn send(&self, m: Message) -> Result<(), ClientError> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(ClientError::Closed);
        }
        self.outbox.send(&m, &self.shared).await
    }
}

/// A connection to one agent. Cheap to clone.
#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

fn random_nonce() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.finish()
}

impl AgentClient {
    /// Handshake over any byte stream: write `SYNC_MAGIC` + `Hello` (random nonce) every
    /// [`HELLO_RESEND`] until an ack with our nonce arrives or `deadline` passes. Spawns
    /// the reader and writer tasks on the current tokio runtime.
    pub async fn connect<S>(
        stream: S,
        deadline: Duration,
    ) -> Result<(AgentClient, AgentInfo), ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        let mut w: BoxWrite = Box::pin(w);
        let mut reader = FrameReader::new(r);
        let mid_frame = reader.mid_frame();
        let nonce = random_nonce();
        let mut hello = SYNC_MAGIC.to_vec();
        append_frame(
            &mut hello,
            &Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                nonce,
            }),
        )
        .map_err(|e| ClientError::Protocol(e.to_string()))?;

        let read_ack = async {
            loop {
                match reader.scan_sync().await {
                    Ok(()) => {}
                    Err(ProtoError::Io(e)) => return Err(ClientError::Io(e)),
                    Err(_) => return Err(ClientError::Closed),
                }
                match reader.next().await {
                    Ok(Incoming::Frame(Message::HelloAck(ack))) if ack.nonce == nonce => {
                        return Ok(ack)
                    }
                    Ok(other) => tracing::debug!("handshake: ignoring {other:?}"),
                    Err(ProtoError::Eof) => return Err(ClientError::Closed),
                    Err(ProtoError::Io(e)) => return Err(ClientError::Io(e)),
                    Err(e) => tracing::debug!("handshake: skipping undecodable input: {e}"),
                }
            }
        };
        let send_hellos = async {
            loop {
                if let Err(e) = w.write_all(&hello).await {
                    return e;
                }
                if let Err(e) = w.flush().await {
                    return e;
                }
                tokio::time::sleep(HELLO_RESEND).await;
            }
        };
        let ack = tokio::select! {
            ack = read_ack => ack?,
            e = send_hellos => return Err(ClientError::Io(e)),
            _ = tokio::time::sleep(deadline) => return Err(ClientError::Timeout),
        };
        let info = match ack.result {
            Ok(info) => info,
            Err(reason) => return Err(ClientError::Refused(reason)),
        };

        let (closed_tx, _) = watch::channel(false);
        let (ev_tx, ev_rx) = mpsc::channel(FS_EVENT_BATCHES);
        let shared = Arc::new(Shared {
            closed: AtomicBool::new(false),
            closed_tx,
            tables: Mutex::new(Tables::default()),
            fs_events: FsEventQueue {
                tx: ev_tx,
                rx: Mutex::new(Some(ev_rx)),
                lost: Arc::new(AtomicBool::new(false)),
                tap: std::sync::OnceLock::new(),
            },
            mid_frame,
        });
        let outbox = Arc::new(Outbox::new(w));
        let writer = tokio::spawn(writer_task(outbox.clone(), shared.clone()));
        let reader = tokio::spawn(reader_task(reader, shared.clone(), outbox.clone()));
        let deadline_changed = Arc::new(Notify::new());
        let deadlines = tokio::spawn(deadline_task(shared.clone(), deadline_changed.clone()));
        let inner = Inner {
            shared,
            outbox,
            deadline_changed,
            info: info.clone(),
            next_id: AtomicU64::new(1),
            tasks: vec![
                writer.abort_handle(),
                reader.abort_handle(),
                deadlines.abort_handle(),
            ],
        };
        Ok((
            AgentClient {
                inner: Arc::new(inner),
            },
            info,
        ))
    }

    /// What the agent said when the connection was made.
    pub fn info(&self) -> &AgentInfo {
        &self.inner.info
    }

    /// Round-trip time of a `Ping`.
    pub async fn ping(&self, timeout: Duration) -> Result<Duration, ClientError> {
        let start = Instant::now();
        match self.request(Request::Ping, timeout).await? {
            Response::Pong => Ok(start.elapsed()),
            other => Err(ClientError::Protocol(format!(
                "unexpected answer to ping: {other:?}"
            ))),
        }
    }

    /// Generic RPC. `Response::Error` becomes [`ClientError::Remote`].
    pub async fn request(&self, req: Request, timeout: Duration) -> Result<Response, ClientError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.request_with_id(id, req, timeout).await
    }

    async fn request_with_id(
        &self,
        id: Id,
        req: Request,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut t = self.inner.shared.tables();
            if self.inner.shared.closed.load(Ordering::SeqCst) {
                return Err(ClientError::Closed);
            }
            t.pending.insert(id, Waiter::Task(tx));
        }
        // Removes the pending entry however this future ends (timeout, error, or the
        // caller dropping it), so abandoned requests do not accumulate.
        struct Unregister<'a>(&'a Shared, Id);
        impl Drop for Unregister<'_> {
            fn drop(&mut self) {
                let w = self.0.tables().take(self.1);
                drop(w);
            }
        }
        let _unregister = Unregister(&self.inner.shared, id);
        let res = tokio::time::timeout(timeout, async {
            self.inner.send(Message::Request { id, req }).await?;
            rx.await.unwrap_or(Err(ClientError::Closed))
        })
        .await;
        let res = match res {
            Ok(r) => r,
            Err(_) => {
                self.inner.shared.timed_out();
                Err(ClientError::Timeout)
            }
        };
        match res? {
            Response::Error { errno, message } => Err(ClientError::Remote { errno, message }),
            other => Ok(other),
        }
    }

    /// Drop the connection now: pending requests and streams fail with `Closed`.
    pub fn close(&self, why: &str) {
        self.inner.shared.shutdown(why);
        for t in &self.inner.tasks {
            t.abort();
        }
        // The write half goes now, whoever still holds this client.
        let w = self.inner.outbox.lock().w.take();
        drop(w);
    }

    pub fn is_closed(&self) -> bool {
        self.inner.shared.closed.load(Ordering::SeqCst)
    }

    /// Resolves when the connection is gone.
    pub async fn closed(&self) {
        let mut rx = self.inner.shared.closed_tx.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }
}
