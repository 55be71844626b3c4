//! Commands on the connection: starting them, their output (credited back as the
//! consumer takes it), their stdin (sent within the agent's stdin credit) and signals.
//!
//! Invariants:
//! * Output credit goes back only as [`ExecHandle::next`] hands output to the consumer
//!   (in batches of [`CREDIT_BATCH`]), so a slow consumer stalls only its own command;
//!   a dropped handle gives back what was queued and the reader credits the rest.
//! * Stdin bytes are sent only within the agent's stdin credit, in order: one
//!   [`ExecControl::stdin`] call at a time per command.
//! * Once the command has exited (or the connection died), stdin, resize and signal
//!   calls fail at once instead of waiting.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use super::{AgentClient, ClientError, Inner, Shared};
use crate::proto::{
    ExecOptions, ExecSpec, ExitStatus, Id, Message, OutStream, Request, Response, TtySize,
    INITIAL_CREDIT, MAX_CHUNK,
};

/// Credit is granted back in batches of at least this many bytes (must be ≤ `INITIAL_CREDIT`).
const CREDIT_BATCH: u64 = 64 * 1024;
const _: () = assert!(CREDIT_BATCH <= INITIAL_CREDIT);

/// What an open command reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Output(OutStream, Vec<u8>),
    Exited(ExitStatus),
    /// The connection died before `Exited`.
    Lost,
}

pub(super) struct StdinState {
    /// Bytes we may still send.
    pub(super) credit: u64,
    /// The command has exited.
    pub(super) finished: bool,
}

pub(super) struct StreamState {
    pub(super) events: mpsc::UnboundedSender<ExecEvent>,
    /// The `ExecHandle` is gone: output is credited back and dropped.
    pub(super) discard: AtomicBool,
    /// Output bytes received but not yet taken by the consumer.
    pub(super) queued: AtomicU64,
    stdin: Mutex<StdinState>,
    pub(super) stdin_notify: Notify,
    /// Serialises `ExecControl::stdin` calls so their bytes do not interleave.
    stdin_order: tokio::sync::Mutex<()>,
}

impl StreamState {
    pub(super) fn stdin_lock(&self) -> std::sync::MutexGuard<'_, StdinState> {
        self.stdin.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl AgentClient {
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

    /// Number of commands this connection still tracks (for tests and diagnostics).
    pub fn open_streams(&self) -> usize {
        self.inner.shared.tables().streams.len()
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
