//! The agent side of the protocol: sessions over any byte stream.
//!
//! Invariants:
//! * A session starts only after `SYNC_MAGIC` + `Hello`; everything before is skipped.
//!   A `Hello` with an unsupported version is answered with `HelloAck(Err)` and the
//!   session ends (the stream is scanned for the next magic).
//! * Requests run concurrently; `Exec` is started inline by the session reader so that
//!   later `Stdin`/`Signal`/`Credit` frames for the same id always find the command.
//!   `Response::Started` is queued before any `Output` of that command.
//! * All frames of a session go through one writer (a bounded channel), so frames never
//!   interleave and a transport that stops reading back-pressures the producers.
//! * Commands outlive sessions: when a session ends (EOF, HUP, decode error, new hello)
//!   its commands keep running and their output is drained and discarded, so they never
//!   block on a full pipe.
//! * A mid-session `SYNC_MAGIC` + `Hello` with the session's nonce is re-acknowledged;
//!   with another nonce it ends the session and starts a new one.
mod exec;
mod fs;
mod machine;
pub use exec::kill_descendants;
pub mod transport;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::proto::codec::{append_frame, write_sync_frame, FrameReader, Incoming, ProtoError};
use crate::proto::{
    AgentInfo, Hello, HelloAck, Id, Message, Request, Response, PROTOCOL_VERSION, SYNC_MAGIC,
};
use crate::reaper::Reaper;

/// What `PowerOff` does after answering `Ok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerOffAction {
    /// Kill our descendants and exit the process (host mode).
    ExitProcess,
    /// Sync, kill everything, remount read-only and power the machine off (PID 1).
    Halt,
    /// Only answer `Ok` (in-process tests).
    Ignore,
}

/// Agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Working directory of commands that do not name one (relative `cwd`s resolve here).
    pub default_cwd: PathBuf,
    /// Base environment of every command (the request's `env` is applied on top).
    pub env: Vec<(OsString, OsString)>,
    /// Private directory for `#!` scripts (created 0700 when missing).
    pub script_dir: PathBuf,
    pub power_off: PowerOffAction,
    /// Whether `SetHostname` really changes the hostname (init mode only).
    pub set_hostname: bool,
    /// The directory the file service serves as [`crate::proto::fs::ROOT_NODE`].
    pub fs_root: PathBuf,
    /// The image config applied to every command (see [`crate::image`]); `None` = none.
    pub image: Option<crate::image::ImageConfig>,
    /// The agent is PID 1 of a VM and owns the machine: `Freeze`/`Thaw` act on the root
    /// filesystem and `SetIdentity` changes hostname, entropy and machine id.
    pub machine: bool,
}

impl AgentConfig {
    /// The default command environment; `home` is `$HOME`.
    pub fn default_env(home: &str) -> Vec<(OsString, OsString)> {
        [
            (
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            ),
            ("HOME", home),
            ("TERM", "dumb"),
            ("USER", "root"),
            ("LOGNAME", "root"),
        ]
        .iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect()
    }

    /// Host-mode configuration rooted at `root`.
    pub fn host(root: PathBuf) -> Self {
        let home = std::path::absolute(&root)
            .unwrap_or_else(|_| root.clone())
            .to_string_lossy()
            .into_owned();
        let default_cwd = root.clone();
        let mut env = Self::default_env(&home);
        env.retain(|(k, _)| k != "USER" && k != "LOGNAME");
        AgentConfig {
            default_cwd,
            env,
            script_dir: std::env::temp_dir().join(format!("bandsox-agent-{}", std::process::id())),
            power_off: PowerOffAction::ExitProcess,
            set_hostname: false,
            fs_root: root,
            image: None,
            machine: false,
        }
    }
}

/// Shared agent state (one per process in practice).
pub struct Agent {
    pub(crate) cfg: AgentConfig,
    pub(crate) reaper: Arc<Reaper>,
    started: Instant,
    pub(crate) script_seq: AtomicU64,
    powering_off: AtomicBool,
    /// See [`AgentInfo::instance`].
    instance: u64,
    /// The file service (shared by all sessions).
    pub(crate) fs: fs::FsService,
    /// Freeze state of the root filesystem (snapshots).
    pub(crate) freezer: machine::Freezer,
}

/// A random agent instance id (see [`AgentInfo::instance`]).
fn random_instance() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_NONBLOCK) };
    if usize::try_from(n) == Ok(buf.len()) {
        return u64::from_le_bytes(buf);
    }
    // Early boot without entropy yet: the process id, the clock and std's keyed hasher.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.finish()
}

/// Why a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The stream ended (EOF, HUP) or failed.
    Eof,
    /// Undecodable input; scan for the next `SYNC_MAGIC`.
    Desync(String),
    /// A hello with a new nonce arrived mid-session: start the next session with it.
    NewHello(Hello),
    /// The hello's version is not ours; we answered with an error.
    Refused,
}

/// One item for the session writer.
pub(crate) enum Out {
    Msg(Message),
    /// `SYNC_MAGIC` + frame (re-acks).
    Sync(Message),
    /// Resolved once everything queued before it has been written and flushed.
    Flushed(oneshot::Sender<()>),
}

pub(crate) type OutTx = mpsc::Sender<Out>;

/// Per-stream output credit shared by the session (which grants) and the pump (which spends).
pub(crate) struct Credit {
    /// `INITIAL_CREDIT` + everything granted so far.
    pub granted: AtomicU64,
    /// Set when the session is gone: the pump drains and discards from then on.
    pub detached: AtomicBool,
    pub notify: Notify,
}

/// Per-session handle of a running command.
pub(crate) struct SessionCmd {
    pub credit: Arc<Credit>,
    pub stdin: Option<mpsc::UnboundedSender<exec::StdinOp>>,
    pub pgid: i32,
    /// The master side of the command's terminal, if it has one (for `Resize`).
    pub pty: Option<Arc<std::os::fd::OwnedFd>>,
}

/// Commands of one session, keyed by request id. Entries are removed when the command's
/// `Exited` has been queued; all are detached when the session ends.
#[derive(Default)]
pub(crate) struct SessionCmds {
    map: Mutex<HashMap<Id, SessionCmd>>,
}

impl SessionCmds {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Id, SessionCmd>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn detach_all(&self) {
        let mut map = self.lock();
        for (_, cmd) in map.drain() {
            cmd.credit.detached.store(true, Ordering::SeqCst);
            cmd.credit.notify.notify_one();
        }
    }
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> Arc<Agent> {
        let fs = fs::FsService::new(&cfg.fs_root);
        Arc::new(Agent {
            cfg,
            reaper: Reaper::global(),
            started: Instant::now(),
            script_seq: AtomicU64::new(0),
            powering_off: AtomicBool::new(false),
            instance: random_instance(),
            fs,
            freezer: Default::default(),
        })
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// Read the guest's pending file-change events and deliver them to the live
    /// sessions now (kept for the next session when there is none). The watcher does
    /// this by itself a few milliseconds after a change; tests call it to make that
    /// moment certain.
    pub async fn deliver_fs_events(&self) {
        self.fs.deliver_events().await;
    }

    /// What the agent reports in `HelloAck`.
    pub fn info(&self) -> AgentInfo {
        let hostname = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let uptime_ms = if self.cfg.power_off == PowerOffAction::Halt {
            std::fs::read_to_string("/proc/uptime")
                .ok()
                .and_then(|s| {
                    s.split_whitespace()
                        .next()
                        .and_then(|t| t.parse::<f64>().ok())
                })
                // A float-to-int `as` saturates (and NaN gives 0): a bogus uptime is
                // clamped, never undefined.
                .map(|secs| {
                    #[allow(
                        clippy::cast_possible_truncation,
                        clippy::cast_sign_loss,
                        reason = "saturating float conversion is the intent"
                    )]
                    let ms = (secs * 1000.0) as u64;
                    ms
                })
                .unwrap_or(0)
        } else {
            u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
        };
        AgentInfo {
            version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            hostname,
            kernel,
            uptime_ms,
            instance: self.instance,
        }
    }

    /// Serve sessions on one byte stream until it ends (EOF or I/O error). Decode errors
    /// end the current session only; the stream is then scanned for the next magic.
    pub async fn serve<R, W>(self: &Arc<Self>, reader: R, mut writer: W)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut reader = FrameReader::new(reader);
        let mut next_hello = None;
        loop {
            let end = self
                .session(&mut reader, &mut writer, next_hello.take())
                .await;
            match end {
                SessionEnd::Eof => {
                    tracing::debug!("session ended: end of stream");
                    return;
                }
                SessionEnd::Desync(why) => {
                    tracing::warn!("session ended: {why}; waiting for a new session");
                }
                SessionEnd::NewHello(h) => {
                    tracing::info!("new session requested (nonce {:x})", h.nonce);
                    next_hello = Some(h);
                }
                SessionEnd::Refused => {}
            }
        }
    }

    /// Serve one stream that implements both directions.
    pub async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(self: &Arc<Self>, stream: S) {
        let (r, w) = tokio::io::split(stream);
        self.serve(r, w).await
    }

    async fn wait_hello<R: AsyncRead + Unpin>(
        reader: &mut FrameReader<R>,
    ) -> Result<Hello, SessionEnd> {
        loop {
            match reader.scan_sync().await {
                Ok(()) => {}
                Err(_) => return Err(SessionEnd::Eof),
            }
            match reader.next().await {
                Ok(Incoming::Frame(Message::Hello(h))) => return Ok(h),
                Ok(other) => tracing::debug!("ignoring {other:?} before hello"),
                Err(ProtoError::Eof) | Err(ProtoError::Io(_)) => return Err(SessionEnd::Eof),
                Err(e) => tracing::debug!("ignoring undecodable bytes before hello: {e}"),
            }
        }
    }

    async fn session<R, W>(
        self: &Arc<Self>,
        reader: &mut FrameReader<R>,
        writer: &mut W,
        hello: Option<Hello>,
    ) -> SessionEnd
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let hello = match hello {
            Some(h) => h,
            None => match Self::wait_hello(reader).await {
                Ok(h) => h,
                Err(end) => return end,
            },
        };
        if hello.version != PROTOCOL_VERSION {
            let reason = format!(
                "unsupported protocol version {} (this agent speaks {PROTOCOL_VERSION})",
                hello.version
            );
            tracing::warn!("refusing session: {reason}");
            let ack = Message::HelloAck(HelloAck {
                nonce: hello.nonce,
                result: Err(reason),
            });
            return match write_sync_frame(writer, &ack).await {
                Ok(()) => SessionEnd::Refused,
                Err(_) => SessionEnd::Eof,
            };
        }
        let ack = Message::HelloAck(HelloAck {
            nonce: hello.nonce,
            result: Ok(self.info()),
        });
        if write_sync_frame(writer, &ack).await.is_err() {
            return SessionEnd::Eof;
        }
        tracing::info!("session started (nonce {:x})", hello.nonce);

        let (out_tx, out_rx) = mpsc::channel::<Out>(64);
        // File-service events go to every live session until this guard drops.
        let _fs_events = self.fs.register_session(&out_tx);
        let cmds = Arc::new(SessionCmds::default());
        let end = tokio::select! {
            end = self.session_reader(reader, hello.nonce, &out_tx, &cmds) => end,
            res = writer_loop(writer, out_rx) => match res {
                Ok(()) => SessionEnd::Eof,
                Err(e) => { tracing::debug!("session writer failed: {e}"); SessionEnd::Eof }
            },
        };
        cmds.detach_all();
        end
    }

    async fn session_reader<R: AsyncRead + Unpin>(
        self: &Arc<Self>,
        reader: &mut FrameReader<R>,
        nonce: u64,
        out: &OutTx,
        cmds: &Arc<SessionCmds>,
    ) -> SessionEnd {
        let mut after_sync = false;
        loop {
            let msg = match reader.next().await {
                Ok(Incoming::Sync) => {
                    after_sync = true;
                    continue;
                }
                Ok(Incoming::Frame(m)) => m,
                Err(ProtoError::Eof) | Err(ProtoError::Io(_)) => return SessionEnd::Eof,
                Err(e) => return SessionEnd::Desync(e.to_string()),
            };
            let was_sync = std::mem::replace(&mut after_sync, false);
            match msg {
                Message::Hello(h) if h.nonce == nonce && h.version == PROTOCOL_VERSION => {
                    let ack = Message::HelloAck(HelloAck {
                        nonce,
                        result: Ok(self.info()),
                    });
                    if out.send(Out::Sync(ack)).await.is_err() {
                        return SessionEnd::Eof;
                    }
                }
                Message::Hello(h) => {
                    if !was_sync {
                        tracing::debug!("hello without magic mid-session");
                    }
                    return SessionEnd::NewHello(h);
                }
                Message::Request { id, req } => {
                    if let Err(end) = self.handle_request(id, req, out, cmds).await {
                        return end;
                    }
                }
                Message::Credit { id, bytes } => {
                    if let Some(cmd) = cmds.lock().get(&id) {
                        cmd.credit.granted.fetch_add(bytes, Ordering::SeqCst);
                        cmd.credit.notify.notify_one();
                    }
                }
                Message::Stdin { id, data } => {
                    if data.is_empty() {
                        continue;
                    }
                    let tx = cmds.lock().get(&id).and_then(|c| c.stdin.clone());
                    match tx {
                        Some(tx) => {
                            let _ = tx.send(exec::StdinOp::Data(data));
                        }
                        None => {
                            // Unknown or finished command (or no stdin pipe): give the
                            // credit back so the host never waits for it.
                            let bytes = data.len() as u64;
                            let credit = Out::Msg(Message::StdinCredit { id, bytes });
                            if out.send(credit).await.is_err() {
                                return SessionEnd::Eof;
                            }
                        }
                    }
                }
                Message::CloseStdin { id } => {
                    if let Some(cmd) = cmds.lock().get_mut(&id) {
                        if let Some(tx) = cmd.stdin.take() {
                            let _ = tx.send(exec::StdinOp::Close);
                        }
                    }
                }
                Message::Signal { id, signal } => {
                    let pgid = cmds.lock().get(&id).map(|c| c.pgid);
                    match pgid {
                        Some(pgid) => {
                            // Raw kill(2): `signal` may be any number the host sends,
                            // real-time signals included, which nix's `Signal` lacks.
                            // SAFETY: kill(2) on the command's own process group; no
                            // memory is involved.
                            let rc = unsafe { libc::kill(-pgid, signal) };
                            if rc != 0 {
                                tracing::debug!(
                                    "signal {signal} to group {pgid}: {}",
                                    std::io::Error::last_os_error()
                                );
                            }
                        }
                        None => tracing::debug!("signal for unknown stream {id}"),
                    }
                }
                Message::Resize { id, size } => {
                    let pty = cmds.lock().get(&id).and_then(|c| c.pty.clone());
                    match pty {
                        Some(fd) if size.is_valid() => {
                            if let Err(e) = exec::set_winsize(&fd, size) {
                                tracing::debug!("resize of stream {id}: {e}");
                            }
                        }
                        Some(_) => tracing::debug!("ignoring invalid size {size:?} for {id}"),
                        None => tracing::debug!("resize for a stream without a terminal: {id}"),
                    }
                }
                Message::Forget { nodes } => fs::forget(self, &nodes),
                other => tracing::debug!("ignoring unexpected message {other:?}"),
            }
        }
    }

    async fn handle_request(
        self: &Arc<Self>,
        id: Id,
        req: Request,
        out: &OutTx,
        cmds: &Arc<SessionCmds>,
    ) -> Result<(), SessionEnd> {
        let reply = |resp: Response| Out::Msg(Message::Response { id, resp });
        match req {
            Request::Ping => out
                .send(reply(Response::Pong))
                .await
                .map_err(|_| SessionEnd::Eof),
            Request::Exec(spec) => {
                let extra = exec::Extra::default();
                let resp = match exec::start(self, id, spec, extra, out.clone(), cmds).await {
                    Ok(()) => return Ok(()),
                    Err(e) => Response::Error {
                        errno: e.errno,
                        message: e.message,
                    },
                };
                out.send(reply(resp)).await.map_err(|_| SessionEnd::Eof)
            }
            Request::ExecWith(opts) => {
                let extra = exec::Extra {
                    user: opts.user,
                    tty: opts.tty,
                };
                let resp = match exec::start(self, id, opts.spec, extra, out.clone(), cmds).await {
                    Ok(()) => return Ok(()),
                    Err(e) => Response::Error {
                        errno: e.errno,
                        message: e.message,
                    },
                };
                out.send(reply(resp)).await.map_err(|_| SessionEnd::Eof)
            }
            Request::SetHostname(name) => {
                let resp = if self.cfg.set_hostname {
                    match nix::unistd::sethostname(&name) {
                        Ok(()) => Response::Ok,
                        Err(e) => Response::Error {
                            errno: e as i32, // Errno is a #[repr(i32)] enum
                            message: format!("cannot set hostname to {name:?}: {}", e.desc()),
                        },
                    }
                } else {
                    Response::Ok
                };
                out.send(reply(resp)).await.map_err(|_| SessionEnd::Eof)
            }
            Request::Sync => {
                let out = out.clone();
                tokio::spawn(async move {
                    let _ = tokio::task::spawn_blocking(nix::unistd::sync).await;
                    let _ = out
                        .send(Out::Msg(Message::Response {
                            id,
                            resp: Response::Ok,
                        }))
                        .await;
                });
                Ok(())
            }
            Request::Fs(req) if fs::runs_inline(self, &req) => out
                .send(reply(fs::answer(self, &req)))
                .await
                .map_err(|_| SessionEnd::Eof),
            Request::Fs(req) => {
                fs::spawn_request(self, id, req, out.clone());
                Ok(())
            }
            // Answered from a task so the session keeps reading (a freeze syncs first).
            Request::Freeze { timeout_ms } => {
                let (agent, out) = (self.clone(), out.clone());
                tokio::spawn(async move {
                    let resp = machine::freeze(&agent, timeout_ms).await;
                    let _ = out.send(Out::Msg(Message::Response { id, resp })).await;
                });
                Ok(())
            }
            Request::Thaw => {
                let (agent, out) = (self.clone(), out.clone());
                tokio::spawn(async move {
                    let resp = machine::thaw(&agent).await;
                    let _ = out.send(Out::Msg(Message::Response { id, resp })).await;
                });
                Ok(())
            }
            Request::SetClock { sec, nsec } => {
                let resp = machine::set_clock(&self.clone(), sec, nsec);
                let _ = out.send(reply(resp)).await;
                Ok(())
            }
            Request::SetIdentity(identity) => {
                let (agent, out) = (self.clone(), out.clone());
                tokio::spawn(async move {
                    let resp = machine::set_identity(&agent, identity).await;
                    let _ = out.send(Out::Msg(Message::Response { id, resp })).await;
                });
                Ok(())
            }
            Request::PowerOff => {
                let (tx, rx) = oneshot::channel();
                let _ = out.send(reply(Response::Ok)).await;
                let _ = out.send(Out::Flushed(tx)).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), rx).await;
                self.power_off().await;
                Ok(())
            }
        }
    }

    async fn power_off(&self) {
        if self.powering_off.swap(true, Ordering::SeqCst) {
            return;
        }
        match self.cfg.power_off {
            PowerOffAction::Ignore => {
                tracing::info!("power off requested (ignored)");
                self.powering_off.store(false, Ordering::SeqCst);
            }
            PowerOffAction::ExitProcess => {
                tracing::info!("power off requested: exiting");
                crate::server::exec::kill_descendants(nix::sys::signal::Signal::SIGKILL);
                let _ = std::fs::remove_dir_all(&self.cfg.script_dir);
                std::process::exit(0);
            }
            PowerOffAction::Halt => {
                let reaper = self.reaper.clone();
                let _ = tokio::task::spawn_blocking(move || crate::init::power_off(&reaper)).await;
            }
        }
    }
}

/// The session writer: batches queued frames into few writes.
async fn writer_loop<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut rx: mpsc::Receiver<Out>,
) -> Result<(), ProtoError> {
    let mut buf = Vec::with_capacity(256 * 1024);
    let mut flushed = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut item = Some(first);
        while let Some(it) = item.take() {
            match it {
                Out::Msg(m) => append_or_log(&mut buf, &m),
                Out::Sync(m) => {
                    buf.extend_from_slice(&SYNC_MAGIC);
                    append_or_log(&mut buf, &m);
                }
                Out::Flushed(tx) => flushed.push(tx),
            }
            if buf.len() < 1024 * 1024 {
                item = rx.try_recv().ok();
            }
        }
        w.write_all(&buf).await?;
        w.flush().await?;
        buf.clear();
        for tx in flushed.drain(..) {
            let _ = tx.send(());
        }
    }
    Ok(())
}

fn append_or_log(buf: &mut Vec<u8>, m: &Message) {
    if let Err(e) = append_frame(buf, m) {
        // Only possible for a message we built too large: a bug, but not a reason to die.
        tracing::error!("cannot encode outgoing message: {e}");
    }
}
