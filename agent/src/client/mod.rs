//! The host side of the protocol: one multiplexed connection to an agent.
//!
//! Invariants:
//! * All frames go through one [`Outbox`]: a byte buffer behind a lock, appended to in
//!   send order, so frames never interleave. The sender writes it to the stream at once
//!   when it can (a non-blocking write from whatever thread sends, so a request costs no
//!   hand-off to another task); whatever the stream does not take now is written by the
//!   writer task. Senders wait only while more than [`OUTBOX_LIMIT`] bytes are queued.
//!   One reader task routes everything that arrives.
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
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::proto::codec::{append_frame, FrameReader, Incoming, MidFrame, ProtoError};
use crate::proto::fs::{FsEvent, FsRequest, FsResponse, NodeId};
use crate::proto::{
    AgentInfo, ExecOptions, ExecSpec, ExitStatus, Hello, Id, Message, OutStream, Request, Response,
    TtySize, INITIAL_CREDIT, MAX_CHUNK, PROTOCOL_VERSION, SYNC_MAGIC,
};

/// How often the hello is re-sent during [`AgentClient::connect`].
pub const HELLO_RESEND: Duration = Duration::from_millis(500);
/// Credit is granted back in batches of at least this many bytes (must be ≤ `INITIAL_CREDIT`).
const CREDIT_BATCH: u64 = 64 * 1024;
const _: () = assert!(CREDIT_BATCH <= INITIAL_CREDIT);
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

/// What an open command reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Output(OutStream, Vec<u8>),
    Exited(ExitStatus),
    /// The connection died before `Exited`.
    Lost,
}

struct StdinState {
    /// Bytes we may still send.
    credit: u64,
    /// The command has exited.
    finished: bool,
}

struct StreamState {
    events: mpsc::UnboundedSender<ExecEvent>,
    /// The `ExecHandle` is gone: output is credited back and dropped.
    discard: AtomicBool,
    /// Output bytes received but not yet taken by the consumer.
    queued: AtomicU64,
    stdin: Mutex<StdinState>,
    stdin_notify: Notify,
    /// Serialises `ExecControl::stdin` calls so their bytes do not interleave.
    stdin_order: tokio::sync::Mutex<()>,
}

impl StreamState {
    fn stdin_lock(&self) -> std::sync::MutexGuard<'_, StdinState> {
        self.stdin.lock().unwrap_or_else(|e| e.into_inner())
    }
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

/// File-service change events on their way from the reader to one consumer.
///
/// Bounded: when the consumer falls [`FS_EVENT_BATCHES`] batches behind, further batches
/// are dropped and the consumer is told [`FsEvent::Overflow`] instead, so a chatty guest
/// cannot grow the daemon's memory.
struct FsEventQueue {
    tx: mpsc::Sender<Vec<FsEvent>>,
    rx: Mutex<Option<mpsc::Receiver<Vec<FsEvent>>>>,
    lost: Arc<AtomicBool>,
    /// Sees every batch on the reader, before anything that arrives after it.
    tap: std::sync::OnceLock<FsEventTap>,
}

/// See [`AgentClient::set_fs_event_tap`].
pub type FsEventTap = Box<dyn Fn(&[FsEvent]) + Send + Sync>;

/// Batches of file events queued for the consumer before new ones are dropped.
pub const FS_EVENT_BATCHES: usize = 256;

/// The completion of an [`AgentClient::fs_then`] request. Called exactly once: with the
/// answer on the connection's reader task, or with an error (`Closed`, `Timeout`, or what
/// [`AgentClient::cancel`] gave) wherever the request ended.
pub type FsDone = Box<dyn FnOnce(Result<FsResponse, ClientError>) + Send>;

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

/// A file-service answer out of a response.
fn fs_answer(resp: Response) -> Result<FsResponse, ClientError> {
    match resp {
        Response::Fs(r) => Ok(r),
        Response::Error { errno, message } => Err(ClientError::Remote { errno, message }),
        other => Err(ClientError::Protocol(format!(
            "unexpected answer to a file request: {other:?}"
        ))),
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

    /// Start a command; returns once the agent answered `Started`.
    pub async fn exec(&self, spec: ExecSpec, timeout: Duration) -> Result<ExecHandle, ClientError> {
        self.exec_request(Request::Exec(spec), timeout).await
    }

    /// Start a command with per-command options (user, terminal). Sent as a plain
    /// `Exec` when no option is set, so agents that predate `ExecWith` still serve it.
    pub async fn exec_with(
        &self,
        opts: ExecOptions,
        timeout: Duration,
    ) -> Result<ExecHandle, ClientError> {
        let req = if opts.user.is_none() && opts.tty.is_none() {
            Request::Exec(opts.spec)
        } else {
            Request::ExecWith(opts)
        };
        self.exec_request(req, timeout).await
    }

    async fn exec_request(
        &self,
        req: Request,
        timeout: Duration,
    ) -> Result<ExecHandle, ClientError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (etx, erx) = mpsc::unbounded_channel();
        let state = Arc::new(StreamState {
            events: etx,
            discard: AtomicBool::new(false),
            queued: AtomicU64::new(0),
            stdin: Mutex::new(StdinState {
                credit: INITIAL_CREDIT,
                finished: false,
            }),
            stdin_notify: Notify::new(),
            stdin_order: tokio::sync::Mutex::new(()),
        });
        {
            let mut t = self.inner.shared.tables();
            if self.inner.shared.closed.load(Ordering::SeqCst) {
                return Err(ClientError::Closed);
            }
            t.streams.insert(id, state.clone());
        }
        // Unregisters the stream unless the command started (also if this future is dropped).
        struct Unregister<'a>(&'a Shared, Id, bool);
        impl Drop for Unregister<'_> {
            fn drop(&mut self) {
                if self.2 {
                    self.0.tables().streams.remove(&self.1);
                }
            }
        }
        let mut unregister = Unregister(&self.inner.shared, id, true);
        match self.request_with_id(id, req, timeout).await? {
            Response::Started { pid } => {
                unregister.2 = false;
                Ok(ExecHandle {
                    pid,
                    id,
                    rx: erx,
                    inner: self.inner.clone(),
                    state,
                    uncredited: 0,
                    done: false,
                })
            }
            resp => Err(ClientError::Protocol(format!(
                "unexpected answer to exec: {resp:?}"
            ))),
        }
    }

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

    /// Number of commands this connection still tracks (for tests and diagnostics).
    pub fn open_streams(&self) -> usize {
        self.inner.shared.tables().streams.len()
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

/// A running command. Output arrives through [`ExecHandle::next`].
pub struct ExecHandle {
    pub pid: u32,
    id: Id,
    rx: mpsc::UnboundedReceiver<ExecEvent>,
    inner: Arc<Inner>,
    state: Arc<StreamState>,
    /// Bytes handed to the consumer but not yet credited back.
    uncredited: u64,
    done: bool,
}

impl ExecHandle {
    /// The next event; `None` after `Exited` or `Lost` has been delivered.
    pub async fn next(&mut self) -> Option<ExecEvent> {
        if self.done {
            return None;
        }
        let ev = match self.rx.recv().await {
            Some(ev) => ev,
            None => ExecEvent::Lost,
        };
        match &ev {
            ExecEvent::Output(_, data) => {
                self.state
                    .queued
                    .fetch_sub(data.len() as u64, Ordering::SeqCst);
                self.uncredited += data.len() as u64;
                if self.uncredited >= CREDIT_BATCH {
                    let bytes = std::mem::take(&mut self.uncredited);
                    // A dead connection shows up as `Lost` on the next call.
                    let _ = self
                        .inner
                        .send(Message::Credit { id: self.id, bytes })
                        .await;
                }
            }
            ExecEvent::Exited(_) | ExecEvent::Lost => self.done = true,
        }
        Some(ev)
    }

    /// Output bytes received from the agent but not yet returned by [`Self::next`]
    /// (bounded by the credit window).
    pub fn queued_bytes(&self) -> u64 {
        self.state.queued.load(Ordering::SeqCst)
    }

    /// Stream id on the connection.
    pub fn id(&self) -> Id {
        self.id
    }

    pub fn control(&self) -> ExecControl {
        ExecControl {
            id: self.id,
            inner: self.inner.clone(),
            state: self.state.clone(),
        }
    }
}

impl Drop for ExecHandle {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // From now on the reader credits output back itself; give back what is queued.
        self.state.discard.store(true, Ordering::SeqCst);
        let mut bytes = std::mem::take(&mut self.uncredited);
        while let Ok(ev) = self.rx.try_recv() {
            if let ExecEvent::Output(_, d) = ev {
                bytes += d.len() as u64;
            }
        }
        if bytes > 0 {
            let msg = Message::Credit { id: self.id, bytes };
            self.inner.outbox.push_now(&msg, &self.inner.shared);
        }
    }
}

/// Stdin and signals for a running command. Cheap to clone.
#[derive(Clone)]
pub struct ExecControl {
    id: Id,
    inner: Arc<Inner>,
    state: Arc<StreamState>,
}

impl ExecControl {
    /// Send bytes to the command's stdin (started with `stdin: true`). Waits for stdin
    /// credit like a write to a pipe waits for the reader. Fails with `Remote{EPIPE}`
    /// once the command has exited and with `Closed` when the connection is gone.
    pub async fn stdin(&self, data: Vec<u8>) -> Result<(), ClientError> {
        let _order = self.state.stdin_order.lock().await;
        let mut off = 0;
        while off < data.len() {
            let notified = self.state.stdin_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let n = {
                let mut st = self.state.stdin_lock();
                if self.inner.shared.closed.load(Ordering::SeqCst) {
                    return Err(ClientError::Closed);
                }
                if st.finished {
                    return Err(ClientError::Remote {
                        errno: libc::EPIPE,
                        message: "the command has exited; its stdin is closed".into(),
                    });
                }
                // Bounded by the bytes left (a usize), so the conversion back is exact.
                let left = data.len() - off;
                let n = usize::try_from(st.credit).map_or(left, |c| c.min(left));
                let n = n.min(MAX_CHUNK);
                st.credit -= n as u64;
                n
            };
            if n == 0 {
                notified.await;
                continue;
            }
            let chunk = data[off..off + n].to_vec();
            self.inner
                .send(Message::Stdin {
                    id: self.id,
                    data: chunk,
                })
                .await?;
            off += n;
        }
        Ok(())
    }

    /// Close the command's stdin (EOF for the command).
    pub async fn close_stdin(&self) -> Result<(), ClientError> {
        let _order = self.state.stdin_order.lock().await;
        if self.state.stdin_lock().finished && !self.inner.shared.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.inner.send(Message::CloseStdin { id: self.id }).await
    }

    /// Set the window size of a command started with a terminal.
    pub async fn resize(&self, size: TtySize) -> Result<(), ClientError> {
        if self.inner.shared.closed.load(Ordering::SeqCst) {
            return Err(ClientError::Closed);
        }
        if self.state.stdin_lock().finished {
            return Err(ClientError::Remote {
                errno: libc::EPIPE,
                message: "the command has already exited".into(),
            });
        }
        self.inner.send(Message::Resize { id: self.id, size }).await
    }

    /// Send `sig` to the command's process group.
    pub async fn signal(&self, sig: i32) -> Result<(), ClientError> {
        if self.inner.shared.closed.load(Ordering::SeqCst) {
            return Err(ClientError::Closed);
        }
        if self.state.stdin_lock().finished {
            return Err(ClientError::Remote {
                errno: libc::ESRCH,
                message: "the command has already exited".into(),
            });
        }
        self.inner
            .send(Message::Signal {
                id: self.id,
                signal: sig,
            })
            .await
    }
}

/// Bytes queued in the [`Outbox`] beyond which senders wait for the stream.
pub const OUTBOX_LIMIT: usize = 4 * 1024 * 1024;

type BoxWrite = std::pin::Pin<Box<dyn AsyncWrite + Send>>;

/// Frames on their way to the agent (see the module docs).
struct Outbox {
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

struct OutboxState {
    /// `None` once the connection is closed: dropping it (with the reader's half)
    /// closes the stream, so the peer sees the end at once (a virtio-serial port
    /// takes one connection at a time).
    w: Option<BoxWrite>,
    buf: Vec<u8>,
    /// First byte of `buf` not yet written.
    pos: usize,
}

impl Outbox {
    fn new(w: BoxWrite) -> Outbox {
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

    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue `m`, waiting first while more than [`OUTBOX_LIMIT`] bytes are queued.
    async fn send(&self, m: &Message, shared: &Shared) -> Result<(), ClientError> {
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
    fn push_now(&self, m: &Message, shared: &Shared) {
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

/// Fails `fs_then` requests whose time is up, in deadline order.
async fn deadline_task(shared: Arc<Shared>, changed: Arc<Notify>) {
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

/// Writes what senders could not write themselves; closes the stream's write half when
/// the connection ends.
async fn writer_task(outbox: Arc<Outbox>, shared: Arc<Shared>) {
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

async fn reader_task<R: AsyncRead + Unpin>(
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
