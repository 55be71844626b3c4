//! `runs/<n>/`: list, one run, its output (as it is, followed as a chunked stream, or as
//! server-sent events), its stdin and its signals.
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::exec::{chunk_event, exit_code};
use super::{vm_for, Json};
use crate::error::Error;
use crate::http::auth::Principal;
use crate::http::error::{ApiResult, ErrorBody};
use crate::http::Api;
use crate::manager::runs::{Run, RunStream};
use crate::manager::vm::Vm;

#[derive(Debug, Serialize, ToSchema)]
pub struct RunView {
    pub n: u64,
    /// What was written to `exec` (lossy UTF-8).
    pub cmd: String,
    /// What `status` says (`running`, `0`, `signal 9`, `timeout 143`, `lost: ...`).
    pub status: String,
    pub exit_code: Option<i32>,
    pub pid: Option<u32>,
    /// A terminal run (`tty=`).
    pub tty: bool,
    /// Seconds since the Unix epoch.
    pub started: u64,
    /// Bytes of stdout, stderr and output so far.
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
}

fn view(run: &Run) -> RunView {
    let status = run.status();
    RunView {
        n: run.n,
        cmd: String::from_utf8_lossy(&run.cmd().unwrap_or_default()).into_owned(),
        status: status.render().trim_end().to_string(),
        exit_code: exit_code(&status),
        pid: run.pid(),
        tty: run.is_tty(),
        started: run
            .started
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        stdout_bytes: run.len(RunStream::Stdout),
        stderr_bytes: run.len(RunStream::Stderr),
    }
}

/// Run `n` of `vm` (`main`: the image entrypoint's run; `last`: the caller's last).
pub fn run_of(vm: &Vm, n: &str, p: &Principal) -> ApiResult<Arc<Run>> {
    let missing = || Error::not_found(format!("no run {n:?}"));
    let num = match n {
        "main" => vm.main_run().ok_or_else(missing)?,
        "last" => vm.last_run(p.caller().session).ok_or_else(missing)?,
        _ => n.parse().map_err(|_| missing())?,
    };
    Ok(vm.run(num).ok_or_else(missing)?)
}

/// The runs kept (`runs/`).
#[utoipa::path(get, path = "/v1/vms/{name}/runs", tag = "runs", params(("name" = String, Path)),
    responses((status = 200, body = [RunView]), (status = 404, body = ErrorBody)))]
pub async fn list(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<RunView>>> {
    let vm = vm_for(&api, p.uid, &name)?;
    let runs = vm
        .run_numbers()
        .into_iter()
        .filter_map(|n| vm.run(n))
        .map(|r| view(&r))
        .collect();
    Ok(Json(runs))
}

/// One run (`n`, or `main`, or `last`).
#[utoipa::path(get, path = "/v1/vms/{name}/runs/{n}", tag = "runs",
    params(("name" = String, Path), ("n" = String, Path, description = "a run number, `main` or `last`")),
    responses((status = 200, body = RunView), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Path((name, n)): Path<(String, String)>,
) -> ApiResult<Json<RunView>> {
    let vm = vm_for(&api, p.uid, &name)?;
    Ok(Json(view(&*run_of(&vm, &n, &p)?)))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct OutputQuery {
    /// Keep the response open and send output as it comes, until the run ends.
    #[serde(default)]
    pub follow: bool,
    /// Start at this byte of the stream.
    #[serde(default)]
    pub offset: u64,
}

fn stream_of(s: &str) -> ApiResult<RunStream> {
    match s {
        "stdout" => Ok(RunStream::Stdout),
        "stderr" => Ok(RunStream::Stderr),
        "output" => Ok(RunStream::Output),
        _ => Err(Error::not_found(format!("no stream {s:?} (stdout, stderr, output)")).into()),
    }
}

fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

/// Chunks of `stream` from `offset`: what there is now, or (`follow`) until the end.
pub fn chunks(
    run: Arc<Run>,
    stream: RunStream,
    offset: u64,
    follow: bool,
) -> impl futures_util::Stream<Item = crate::error::Result<Vec<u8>>> {
    // The offset travels in the state: a captured copy would restart every chunk.
    futures_util::stream::unfold(Some((run, offset)), move |st| async move {
        let (run, offset) = st?;
        let res = if follow {
            run.read_stream(stream, offset, 256 * 1024).await
        } else {
            run.read_at(stream, offset, 256 * 1024)
        };
        match res {
            Ok(d) if d.is_empty() => None,
            Ok(d) => {
                let next = offset + d.len() as u64;
                Some((Ok(d), Some((run, next))))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// A run's `stdout`, `stderr` or `output` (both in the order produced): raw bytes, or
/// with `Accept: text/event-stream` server-sent events (`stdout`/`stderr`/`output`
/// chunks as `{"data", "encoding"}`, then `exit`).
#[utoipa::path(get, path = "/v1/vms/{name}/runs/{n}/{stream}", tag = "runs",
    params(("name" = String, Path), ("n" = String, Path), ("stream" = String, Path, description = "stdout, stderr or output"), OutputQuery),
    responses((status = 200, content_type = "application/octet-stream", description = "the bytes (or text/event-stream)"),
        (status = 404, body = ErrorBody)))]
pub async fn output(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Path((name, n, stream)): Path<(String, String, String)>,
    Query(q): Query<OutputQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let vm = vm_for(&api, p.uid, &name)?;
    let run = run_of(&vm, &n, &p)?;
    let which = stream_of(&stream)?;
    if wants_sse(&headers) {
        let kind = which.file_name();
        let r = run.clone();
        let events = chunks(run, which, q.offset, true)
            .map(move |c| match c {
                Ok(d) => chunk_event(kind, &d),
                Err(e) => Event::default().event("error").data(e.message),
            })
            .chain(futures_util::stream::once(async move {
                r.wait_finished().await;
                let s = r.status();
                Event::default().event("exit").data(
                    serde_json::json!({"exit_code": exit_code(&s), "status": s.render().trim_end()})
                        .to_string(),
                )
            }))
            .map(Ok::<_, Infallible>);
        return Ok(Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let body = Body::from_stream(chunks(run, which, q.offset, q.follow));
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct StdinQuery {
    /// Close the command's stdin after the body (EOF).
    #[serde(default)]
    pub close: bool,
}

/// Bytes for the command's stdin, streamed from the body as they arrive (the command's
/// reading paces the upload); `?close=true` then closes it.
#[utoipa::path(post, path = "/v1/vms/{name}/runs/{n}/stdin", tag = "runs",
    params(("name" = String, Path), ("n" = String, Path), StdinQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn stdin(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Path((name, n)): Path<(String, String)>,
    Query(q): Query<StdinQuery>,
    body: Body,
) -> ApiResult<StatusCode> {
    let vm = vm_for(&api, p.uid, &name)?;
    let run = run_of(&vm, &n, &p)?;
    let mut data = body.into_data_stream();
    while let Some(chunk) = data.next().await {
        let chunk = chunk.map_err(|e| Error::io(format!("request body: {e}")))?;
        if !chunk.is_empty() {
            run.write_stdin(chunk.to_vec()).await?;
        }
    }
    if q.close {
        run.close_stdin().await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct SignalRequest {
    /// A number (`9`), a name (`KILL`) or a prefixed name (`SIGKILL`).
    #[schema(value_type = String)]
    pub signal: serde_json::Value,
}

/// Send the command a signal (`runs/<n>/ctl`'s `kill SIGNAL`).
#[utoipa::path(post, path = "/v1/vms/{name}/runs/{n}/signal", tag = "runs",
    params(("name" = String, Path), ("n" = String, Path)), request_body = SignalRequest,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn signal(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Path((name, n)): Path<(String, String)>,
    Json(req): Json<SignalRequest>,
) -> ApiResult<StatusCode> {
    let vm = vm_for(&api, p.uid, &name)?;
    let run = run_of(&vm, &n, &p)?;
    let text = match &req.signal {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => return Err(Error::invalid("signal: a number or a name").into()),
    };
    let sig = crate::ctl::parse_signal(&text)?;
    run.signal(sig).await?;
    Ok(StatusCode::NO_CONTENT)
}
