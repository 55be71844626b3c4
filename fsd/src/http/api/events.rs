//! `events`, `<vm>/events`, `<vm>/console` (server-sent events, or the bytes as they
//! are) and `usage`. Each reader sees what the tree shows them: the event log through
//! the same per-reader views (`crate::eventview`), so event privacy is the tree's.
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::exec::chunk_event;
use super::{vm_for, Json};
use crate::eventview::{EventsHandle, Filter};
use crate::http::auth::Principal;
use crate::http::error::{ApiResult, ErrorBody};
use crate::http::Api;

/// How often a follower looks again when nothing woke it (console growth has no event).
const POLL: Duration = Duration::from_millis(250);

#[derive(Debug, Deserialize, IntoParams)]
pub struct FollowQuery {
    /// Start at this byte of the reader's view; absent: at its current end (only what
    /// happens from now on), like `tail -f -n 0`.
    pub offset: Option<u64>,
}

fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"))
}

/// Lines of an event view as server-sent `event` events, forever (until the client
/// goes away), woken by the manager's news and a slow poll.
fn event_lines(
    api: Arc<Api>,
    handle: EventsHandle,
    mut offset: u64,
) -> impl futures_util::Stream<Item = Result<Event, Infallible>> {
    let mut wake = api.mgr.events.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(16);
    tokio::spawn(async move {
        let mut partial: Vec<u8> = Vec::new();
        loop {
            let data = match handle.read(offset, 64 * 1024) {
                Ok(d) => d,
                Err(e) => {
                    let _ = tx
                        .send(Event::default().event("error").data(e.message))
                        .await;
                    return;
                }
            };
            if data.is_empty() {
                tokio::select! {
                    _ = wake.recv() => {}
                    _ = tokio::time::sleep(POLL * 4) => {}
                    _ = tx.closed() => return,
                }
                continue;
            }
            offset += data.len() as u64;
            partial.extend_from_slice(&data);
            while let Some(i) = partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = partial.drain(..=i).collect();
                let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                if tx
                    .send(Event::default().event("event").data(text))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    futures_util::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}

fn events_response(api: Arc<Api>, filter: Filter, q: FollowQuery, headers: &HeaderMap) -> Response {
    let handle = api.vfs.open_events(&filter);
    if wants_sse(headers) {
        let offset = q.offset.unwrap_or_else(|| api.vfs.events_len(&filter));
        return Sse::new(event_lines(api, handle, offset))
            .keep_alive(KeepAlive::default())
            .into_response();
    }
    // Plain: the whole view as it is now (from `offset`), like `cat events`.
    let at = q.offset.unwrap_or(0);
    let body = futures_util::stream::unfold(Some((handle, at)), move |st| async move {
        let (h, at) = st?;
        match h.read(at, 256 * 1024) {
            Ok(d) if d.is_empty() => None,
            Ok(d) => {
                let next = at + d.len() as u64;
                Some((Ok::<_, crate::error::Error>(d), Some((h, next))))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(body),
    )
        .into_response()
}

/// The event log as the caller sees it (root: all; others: their own VMs' and
/// snapshots' lines and daemon-wide ones): text lines, or with
/// `Accept: text/event-stream` one `event` per line as it happens.
#[utoipa::path(get, path = "/v1/events", tag = "events", params(FollowQuery),
    responses((status = 200, content_type = "text/event-stream", description = "one `event` per line (or text/plain)")))]
pub async fn events(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Query(q): Query<FollowQuery>,
    headers: HeaderMap,
) -> Response {
    events_response(api, Filter::for_uid(p.uid), q, &headers)
}

/// One VM's lines of the event log (`<vm>/events`).
#[utoipa::path(get, path = "/v1/vms/{name}/events", tag = "events", params(("name" = String, Path), FollowQuery),
    responses((status = 200, content_type = "text/event-stream", description = "one `event` per line (or text/plain)"),
        (status = 404, body = ErrorBody)))]
pub async fn vm_events(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    Query(q): Query<FollowQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let vm = vm_for(&api, p.uid, &name)?;
    Ok(events_response(
        api.clone(),
        Filter::Vm(vm.id.clone()),
        q,
        &headers,
    ))
}

/// The serial console (the last `vm.console_mib` kept): bytes, or with
/// `Accept: text/event-stream` `console` events (`{"data", "encoding"}`) as it grows.
#[utoipa::path(get, path = "/v1/vms/{name}/console", tag = "events", params(("name" = String, Path), FollowQuery),
    responses((status = 200, content_type = "application/octet-stream", description = "the console (or text/event-stream)"),
        (status = 404, body = ErrorBody)))]
pub async fn console(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    Query(q): Query<FollowQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let vm = vm_for(&api, p.uid, &name)?;
    let path = vm.console_path();
    let note = crate::logcap::cap_note(api.mgr.limits.vm_caps().console_mib, "vm.console_mib");
    let reader = crate::logcap::LogReader::default();
    let follow = wants_sse(&headers);
    let at = match (q.offset, follow) {
        (Some(o), _) => o,
        (None, true) => crate::snapshots::file_len(&path),
        (None, false) => 0,
    };
    let chunks = futures_util::stream::unfold(Some((reader, at)), move |st| {
        let (path, note) = (path.clone(), note.clone());
        async move {
            let (r, at) = st?;
            loop {
                match r.read(&path, at, 256 * 1024, &note) {
                    Ok(d) if d.is_empty() && follow => tokio::time::sleep(POLL).await,
                    Ok(d) if d.is_empty() => return None,
                    Ok(d) => {
                        let next = at + d.len() as u64;
                        return Some((Ok::<_, crate::error::Error>(d), Some((r, next))));
                    }
                    Err(e) => return Some((Err(e), None)),
                }
            }
        }
    });
    if follow {
        let events = futures_util::StreamExt::map(chunks, |c| {
            Ok::<_, Infallible>(match c {
                Ok(d) => chunk_event("console", &d),
                Err(e) => Event::default().event("error").data(e.message),
            })
        });
        return Ok(Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(chunks),
    )
        .into_response())
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageView {
    /// What `cat usage` shows the caller: their use against the limits root set.
    pub text: String,
}

/// What the caller uses, against the limits (`usage`).
#[utoipa::path(get, path = "/v1/usage", tag = "events",
    responses((status = 200, body = UsageView)))]
pub async fn usage(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
) -> Json<UsageView> {
    Json(UsageView {
        text: api.mgr.usage_text(p.uid),
    })
}
