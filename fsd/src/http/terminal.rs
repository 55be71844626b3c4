//! The web terminal: a WebSocket bridging one terminal run's `terminal` file
//! (docs/tree.md, "Terminals"; protocol in docs/api.md, "Web terminal").
//!
//! - `GET /v1/vms/{name}/terminal?cols=&rows=&cmd=` starts a new terminal run (the
//!   guest root's login shell unless `cmd` says otherwise) exactly as a shell's
//!   `#bandsox tty=COLSxROWS` write to `exec` does, then attaches to it;
//!   `GET /v1/vms/{name}/runs/{n}/terminal` attaches to an existing one.
//! - Server → client: first a text message `{"type":"attached","run":N,...}`, then
//!   binary messages with what the terminal prints, starting with the escape sequences
//!   that redraw the current screen (`Run::terminal_snapshot`, the redraw a read of
//!   `terminal` starts with), so a reconnect after a browser reload shows the screen as
//!   it is; finally `{"type":"exit",...}` and a close when the command ended.
//! - Client → server: binary messages are keystrokes, byte for byte (what a write to
//!   `terminal` sends); text messages are JSON: `{"type":"resize","cols","rows"}` (the
//!   `winsize` file's rule and limits) or `{"type":"input","data":"..."}`.
//!
//! Invariants: authentication, the Origin/Host check and the VM privacy rule are the
//! API's own layers and helpers (a key may also travel in `Sec-WebSocket-Protocol`, see
//! [`super::wsauth`]); any number of sockets may watch one run, each with its own
//! position; memory per socket is bounded (messages up to [`MAX_MESSAGE`], output read
//! in chunks of [`CHUNK`] and sent before the next is read); a peer that stops
//! answering pings is dropped after [`IDLE`]; closing the socket never signals the
//! command (on a terminal, Ctrl-C is a keystroke).
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::Extension;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;

use super::api::exec::exit_code;
use super::api::runs::run_of;
use super::api::vm_for;
use super::auth::Principal;
use super::error::ApiResult;
use super::wsauth::PROTOCOL;
use super::Api;
use crate::error::Error;
use crate::manager::execopts::{parse_size, shell_quote, PREFIX};
use crate::manager::runs::{Run, RunStream};

/// Largest message a client may send (keystrokes or a paste).
pub const MAX_MESSAGE: usize = 1024 * 1024;
/// Largest chunk of output read and sent at once.
pub const CHUNK: u32 = 64 * 1024;
/// Ping interval; a peer silent for [`IDLE`] is dropped (half-open connections).
pub const PING: Duration = Duration::from_secs(20);
pub const IDLE: Duration = Duration::from_secs(60);

/// The guest root's login shell when the image has one, else `/bin/sh` (what
/// `bandsox attach` starts), found in the guest.
const DEFAULT_CMD: &str = "sh=$(awk -F: '$3==0{print $7; exit}' /etc/passwd 2>/dev/null); \
    [ -x \"$sh\" ] || sh=/bin/sh; exec \"$sh\" -l";

#[derive(Debug, Deserialize)]
pub struct NewQuery {
    /// Columns (default 80).
    pub cols: Option<u16>,
    /// Rows (default 24).
    pub rows: Option<u16>,
    /// The command (default: root's login shell).
    pub cmd: Option<String>,
}

/// What a client sends in a text message.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Control {
    Resize { cols: u32, rows: u32 },
    Input { data: String },
}

fn upgrade(ws: WebSocketUpgrade, run: Arc<Run>) -> Response {
    ws.protocols([PROTOCOL])
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| bridge(socket, run))
}

/// `GET /v1/vms/{name}/terminal`: a new terminal run, attached.
pub async fn new_run(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    Query(q): Query<NewQuery>,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    let vm = vm_for(&api, p.uid, &name)?;
    let size = format!("{}x{}", q.cols.unwrap_or(80), q.rows.unwrap_or(24));
    // The tree's own parser checks the size (and the limits, when the run starts).
    parse_size(&size)?;
    let cmd = q.cmd.filter(|c| !c.trim().is_empty());
    let script = format!(
        "{PREFIX} tty={}\n{}\n",
        shell_quote(&size),
        cmd.as_deref().unwrap_or(DEFAULT_CMD)
    );
    let session = p.caller().session;
    let run = super::api::detached(async move { vm.start_run(script.into_bytes(), session).await })
        .await?;
    Ok(upgrade(ws, run))
}

/// `GET /v1/vms/{name}/runs/{n}/terminal`: attach to terminal run `n`.
pub async fn attach(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Path((name, n)): Path<(String, String)>,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    let vm = vm_for(&api, p.uid, &name)?;
    let run = run_of(&vm, &n, &p)?;
    if !run.is_tty() {
        return Err(Error::new(
            libc::ENOTTY,
            format!("run {n} has no terminal (start one with /v1/vms/{name}/terminal)"),
        )
        .into());
    }
    Ok(upgrade(ws, run))
}

fn json(v: serde_json::Value) -> Message {
    Message::Text(v.to_string().into())
}

/// Copy the terminal to the socket and the socket to the terminal until either ends.
async fn bridge(socket: WebSocket, run: Arc<Run>) {
    let (mut tx, mut rx) = socket.split();
    let snapshot = match run.terminal_snapshot() {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => {
            let _ = tx
                .send(json(
                    serde_json::json!({"type": "error", "errno": e.errno, "message": e.message}),
                ))
                .await;
            return;
        }
    };
    let (_, redraw, mut offset) = snapshot;
    let size = run.tty_size();
    let hello = serde_json::json!({
        "type": "attached",
        "run": run.n,
        "cols": size.map(|s| s.cols),
        "rows": size.map(|s| s.rows),
    });
    if tx.send(json(hello)).await.is_err() || tx.send(Message::Binary(redraw.into())).await.is_err()
    {
        return;
    }
    let mut ping = tokio::time::interval(PING);
    ping.tick().await;
    let mut last_heard = tokio::time::Instant::now();
    // Output is read in a task of its own so that a read waiting for the guest never
    // delays keystrokes; the channel holds one chunk (bounded memory per socket).
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<crate::error::Result<Vec<u8>>>(1);
    let reader = {
        let run = run.clone();
        tokio::spawn(async move {
            loop {
                let r = run.read_stream(RunStream::Stdout, offset, CHUNK).await;
                let end = matches!(&r, Ok(d) if d.is_empty()) || r.is_err();
                if let Ok(d) = &r {
                    offset += d.len() as u64;
                }
                if out_tx.send(r).await.is_err() || end {
                    return;
                }
            }
        })
    };
    loop {
        tokio::select! {
            out = out_rx.recv() => match out {
                Some(Ok(d)) if !d.is_empty() => {
                    if tx.send(Message::Binary(d.into())).await.is_err() {
                        break;
                    }
                }
                Some(Err(e)) => {
                    let _ = tx.send(json(serde_json::json!({"type": "error", "errno": e.errno, "message": e.message}))).await;
                    break;
                }
                _ => {
                    run.wait_finished().await;
                    let s = run.status();
                    let _ = tx.send(json(serde_json::json!({
                        "type": "exit",
                        "exit_code": exit_code(&s),
                        "status": s.render().trim_end(),
                    }))).await;
                    break;
                }
            },
            msg = rx.next() => {
                let Some(Ok(msg)) = msg else { break };
                last_heard = tokio::time::Instant::now();
                if let Err(e) = input(&run, msg).await {
                    let gone = e.errno == libc::EPIPE;
                    let _ = tx.send(json(serde_json::json!({"type": "error", "errno": e.errno, "message": e.message}))).await;
                    if gone {
                        break;
                    }
                }
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > IDLE {
                    tracing::debug!(run = run.n, "web terminal: peer silent, dropped");
                    break;
                }
                if tx.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break;
                }
            }
        }
    }
    reader.abort();
    let _ = tx.send(Message::Close(None)).await;
}

/// One message from the client.
async fn input(run: &Run, msg: Message) -> crate::error::Result<()> {
    match msg {
        Message::Binary(b) if !b.is_empty() => run.write_stdin(b.to_vec()).await,
        Message::Text(t) => match serde_json::from_str::<Control>(t.as_str()) {
            Ok(Control::Input { data }) if !data.is_empty() => {
                run.write_stdin(data.into_bytes()).await
            }
            Ok(Control::Input { .. }) => Ok(()),
            Ok(Control::Resize { cols, rows }) => run.resize(parse_size(&format!("{cols}x{rows}"))?).await,
            Err(e) => Err(Error::invalid(format!(
                "a text message is JSON: {{\"type\":\"resize\",\"cols\",\"rows\"}} or {{\"type\":\"input\",\"data\"}}: {e}"
            ))),
        },
        _ => Ok(()),
    }
}
