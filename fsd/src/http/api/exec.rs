//! `exec`: run a command and return its exit code and output, or stream the output as
//! server-sent events. The request becomes exactly what a shell writes to `<vm>/exec`:
//! a `#bandsox` options line (timeout, env, cwd, user, tty) and the command, so the
//! options are parsed and checked by the tree's own parser (`manager::execopts`), and
//! the run is an ordinary `runs/<n>/`.
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{vm_for, Json};
use crate::http::auth::Principal;
use crate::http::error::{ApiResult, ErrorBody};
use crate::http::Api;
use crate::manager::execopts::shell_quote;
use crate::manager::runs::{Run, RunStatus, RunStream};

/// Most bytes of stdout, and of stderr, a synchronous answer carries; the rest stays
/// in `runs/<n>/` (the answer says it was cut and where the whole output is).
pub const SYNC_OUTPUT_CAP: u64 = 8 * 1024 * 1024;

#[derive(Debug, Deserialize, ToSchema)]
pub struct ExecRequest {
    /// A command line or a whole script (a `#!` first line picks the interpreter).
    pub command: String,
    /// Seconds before the command is stopped (SIGTERM, then SIGKILL); 0 or absent: the
    /// VM's `exec_timeout`.
    pub timeout: Option<f64>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// A guest user (`name`, `uid`, `name:group`).
    pub user: Option<String>,
    /// Bytes for the command's stdin (then closed); absent: stdin is closed at once.
    pub stdin: Option<String>,
    /// Stream the output as server-sent events instead of waiting for the end.
    #[serde(default)]
    pub stream: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExecResult {
    /// The run's number (`runs/<n>/`).
    pub run: u64,
    /// The exit code; 128+N for a command killed by signal N; null when the run was lost.
    pub exit_code: Option<i32>,
    /// What `runs/<n>/status` says (`0`, `signal 9`, `timeout 143`, `lost: ...`).
    pub status: String,
    pub stdout: String,
    pub stderr: String,
    /// `utf-8`, or `base64` when either stream is not valid UTF-8 (both are then base64).
    pub encoding: String,
    /// Output beyond the cap was left out of this answer; all of it is in
    /// `/v1/vms/{name}/runs/{run}/stdout` and `.../stderr`.
    pub truncated: bool,
}

/// The script a shell would write to `exec` for this request.
pub fn script(req: &ExecRequest) -> Vec<u8> {
    let mut line = String::from(crate::manager::execopts::PREFIX);
    if let Some(t) = req.timeout.filter(|t| *t != 0.0) {
        line.push_str(&format!(" timeout={}", shell_quote(&t.to_string())));
    }
    for (k, v) in &req.env {
        line.push_str(&format!(" env={}", shell_quote(&format!("{k}={v}"))));
    }
    if let Some(cwd) = &req.cwd {
        line.push_str(&format!(" cwd={}", shell_quote(cwd)));
    }
    if let Some(u) = &req.user {
        line.push_str(&format!(" user={}", shell_quote(u)));
    }
    // Always an options line (possibly empty), so a command of its own that starts with
    // `#bandsox` is never taken for options.
    let mut s = line.into_bytes();
    s.push(b'\n');
    s.extend_from_slice(req.command.as_bytes());
    if !req.command.ends_with('\n') {
        s.push(b'\n');
    }
    s
}

/// The exit code of a finished run (128+N for signal N, like a shell).
pub fn exit_code(status: &RunStatus) -> Option<i32> {
    use bandsox_agent::proto::ExitStatus;
    let code = |s: &ExitStatus| match s {
        ExitStatus::Code(c) => *c,
        ExitStatus::Signal(n) => 128 + n,
    };
    match status {
        RunStatus::Exited(s) | RunStatus::Timeout(s) => Some(code(s)),
        RunStatus::OutputLimit => Some(128 + libc::SIGKILL),
        RunStatus::Running | RunStatus::Lost(_) => None,
    }
}

/// Signals the command SIGINT if the request is dropped before it ended (a client that
/// went away is Ctrl-C, as for a shell reading `exec`).
struct InterruptOnDrop(Option<Arc<Run>>);

impl Drop for InterruptOnDrop {
    fn drop(&mut self) {
        if let Some(run) = self.0.take() {
            if run.status().is_running() {
                tokio::spawn(async move {
                    let _ = run.signal(libc::SIGINT).await;
                });
            }
        }
    }
}

fn read_capped(run: &Run, stream: RunStream) -> crate::error::Result<(Vec<u8>, bool)> {
    let len = run.len(stream);
    let want = len.min(SYNC_OUTPUT_CAP);
    let mut out = Vec::with_capacity(usize::try_from(want).unwrap_or(0));
    while (out.len() as u64) < want {
        let chunk = u32::try_from((want - out.len() as u64).min(1 << 20)).unwrap_or(1 << 20);
        let d = run.read_at(stream, out.len() as u64, chunk)?;
        if d.is_empty() {
            break;
        }
        out.extend_from_slice(&d);
    }
    Ok((out, len > want))
}

/// Run a command: `{"command", "timeout", "env", "cwd", "user"}` → `{"exit_code",
/// "stdout", "stderr"}`; with `"stream": true`, server-sent events `started`
/// (`{"run"}`), `stdout`/`stderr` (`{"data", "encoding"}`) and `exit`
/// (`{"exit_code", "status"}`).
#[utoipa::path(post, path = "/v1/vms/{name}/exec", tag = "exec", params(("name" = String, Path)),
    request_body = ExecRequest,
    responses((status = 200, body = ExecResult, description = "the finished command (or, with stream, text/event-stream)"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn exec(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    Json(req): Json<ExecRequest>,
) -> ApiResult<Response> {
    let vm = vm_for(&api, p.uid, &name)?;
    let text = script(&req);
    let session = p.caller().session;
    let run = super::detached(async move { vm.start_run(text, session).await }).await?;
    let stdin = req.stdin.clone().map(String::into_bytes);
    {
        let run = run.clone();
        tokio::spawn(async move {
            if let Some(data) = stdin.filter(|d| !d.is_empty()) {
                let _ = run.write_stdin(data).await;
            }
            let _ = run.close_stdin().await;
        });
    }
    if req.stream {
        return Ok(stream(run).into_response());
    }
    let guard = InterruptOnDrop(Some(run.clone()));
    run.wait_finished().await;
    drop(guard);
    let (out, cut_out) = read_capped(&run, RunStream::Stdout)?;
    let (err, cut_err) = read_capped(&run, RunStream::Stderr)?;
    let status = run.status();
    let (stdout, stderr, encoding) = match (String::from_utf8(out), String::from_utf8(err)) {
        (Ok(o), Ok(e)) => (o, e, "utf-8"),
        (o, e) => {
            let b = |r: Result<String, std::string::FromUtf8Error>| {
                let bytes = match r {
                    Ok(s) => s.into_bytes(),
                    Err(e) => e.into_bytes(),
                };
                base64::engine::general_purpose::STANDARD.encode(bytes)
            };
            (b(o), b(e), "base64")
        }
    };
    Ok(Json(ExecResult {
        run: run.n,
        exit_code: exit_code(&status),
        status: status.render().trim_end().to_string(),
        stdout,
        stderr,
        encoding: encoding.into(),
        truncated: cut_out || cut_err,
    })
    .into_response())
}

/// `{"data", "encoding"}` of one output chunk.
pub fn chunk_event(kind: &str, data: &[u8]) -> Event {
    let (text, enc) = match std::str::from_utf8(data) {
        Ok(s) => (s.to_string(), "utf-8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(data),
            "base64",
        ),
    };
    Event::default()
        .event(kind)
        .data(serde_json::json!({ "data": text, "encoding": enc }).to_string())
}

/// A run's stdout and stderr as they come, then its exit.
fn stream(run: Arc<Run>) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(4);
    tokio::spawn(async move {
        let _guard = InterruptOnDrop(Some(run.clone()));
        let start = Event::default()
            .event("started")
            .data(serde_json::json!({ "run": run.n }).to_string());
        if tx.send(start).await.is_err() {
            return;
        }
        let pump = |stream: RunStream, kind: &'static str| {
            let (run, tx) = (run.clone(), tx.clone());
            async move {
                let mut at = 0u64;
                loop {
                    match run.read_stream(stream, at, 64 * 1024).await {
                        Ok(d) if d.is_empty() => return true,
                        Ok(d) => {
                            at += d.len() as u64;
                            if tx.send(chunk_event(kind, &d)).await.is_err() {
                                return false;
                            }
                        }
                        Err(e) => {
                            let _ = tx
                                .send(Event::default().event("error").data(e.message))
                                .await;
                            return false;
                        }
                    }
                }
            }
        };
        let (a, b) = tokio::join!(
            pump(RunStream::Stdout, "stdout"),
            pump(RunStream::Stderr, "stderr")
        );
        if a && b {
            run.wait_finished().await;
            let status = run.status();
            let exit = Event::default().event("exit").data(
                serde_json::json!({
                    "exit_code": exit_code(&status),
                    "status": status.render().trim_end(),
                })
                .to_string(),
            );
            let _ = tx.send(exit).await;
        }
    });
    let s = futures_util::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        Ok::<Event, Infallible>,
    );
    Sse::new(s).keep_alive(KeepAlive::default())
}
