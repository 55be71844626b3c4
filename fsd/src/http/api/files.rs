//! Files under `fs/`: `GET` (a file's bytes with `Range`, a directory's listing, or
//! `?stat=1`), `PUT` (streamed upload: a temporary name in the same directory, renamed
//! over the target only when the whole body arrived), `POST` (`mkdir`, `rename`) and
//! `DELETE`. Everything goes to the guest through the core's path walk
//! ([`crate::guestfs::calls`]): `..`, absolute paths and symlinks resolve inside the
//! guest, permissions are the guest's modes against the caller, and the host never
//! opens a path a client supplied.
//!
//! Paths are bytes: the URL path after `fs/` is percent-decoded as bytes (non-UTF-8
//! names work); names in listings that are not UTF-8 are base64 with a flag.
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::Engine;
use futures_util::stream::FuturesOrdered;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{detached, vm_for, Json};
use crate::error::{Error, Result};
use crate::guestfs::calls::{check, check_sticky, Node, Walk, Who, R, W, X};
use crate::guestfs::Attr;
use crate::http::auth::Principal;
use crate::http::error::{ApiError, ApiResult, ErrorBody};
use crate::http::Api;

/// Bytes per guest read or write (one agent chunk).
const CHUNK: u32 = 1024 * 1024;
/// Guest reads or writes in flight per transfer.
const IN_FLIGHT: usize = 4;

/// The VM name and the guest path (bytes) of a request URI.
fn split_uri(uri: &Uri) -> ApiResult<(String, Vec<u8>)> {
    let path = uri.path();
    let rest = path
        .strip_prefix("/v1/vms/")
        .ok_or_else(|| Error::not_found("no such API path"))?;
    let (name, after) = rest.split_once('/').unwrap_or((rest, ""));
    let guest = after
        .strip_prefix("fs")
        .ok_or_else(|| Error::not_found("no such API path"))?;
    let name = percent_encoding::percent_decode_str(name)
        .decode_utf8()
        .map_err(|_| Error::invalid("VM names are UTF-8"))?
        .into_owned();
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(guest).collect();
    let mut p = vec![b'/'];
    p.extend_from_slice(bytes.strip_prefix(b"/").unwrap_or(&bytes));
    Ok((name, p))
}

/// The VM's `fs/` root and a walk from it, for the caller.
fn walk_for(api: &Api, p: &Principal, name: &str) -> ApiResult<Walk> {
    let vm = vm_for(api, p.uid, name)?;
    let root = api.vfs.fs_root(&vm.name)?;
    Ok(Walk::new(api.guest.clone(), root))
}

fn kind_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => "dir",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        libc::S_IFCHR => "char",
        libc::S_IFBLK => "block",
        _ => "file",
    }
}

/// A name as JSON: UTF-8 text, or base64 with `name_encoding: "base64"`.
fn name_fields(name: &[u8]) -> (String, Option<String>) {
    match std::str::from_utf8(name) {
        Ok(s) => (s.to_string(), None),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(name),
            Some("base64".into()),
        ),
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StatView {
    /// The entry's name (base64 when `name_encoding` says so).
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name_encoding: Option<String>,
    /// `file`, `dir`, `symlink`, `fifo`, `socket`, `char`, `block`.
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    /// Permission bits in octal (`0644`).
    pub mode: String,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: i64,
    pub mtime_nsec: u32,
}

fn stat_view(name: &[u8], a: &Attr) -> StatView {
    let (name, name_encoding) = name_fields(name);
    StatView {
        name,
        name_encoding,
        kind: kind_name(a.mode).into(),
        size: a.size,
        mode: format!("{:04o}", a.mode & 0o7777),
        uid: a.uid,
        gid: a.gid,
        nlink: a.nlink,
        mtime: a.mtime.sec,
        mtime_nsec: a.mtime.nsec,
    }
}

/// A query flag: `true`/`1`/empty (`?stat`) or `false`/`0`.
fn flag<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    let s = String::deserialize(d)?;
    match s.as_str() {
        "" | "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(serde::de::Error::custom(format!(
            "{s:?}: expected true, false, 1 or 0"
        ))),
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
pub struct GetQuery {
    /// Answer the entry's attributes as JSON instead of its content (`true` or `1`).
    #[serde(default, deserialize_with = "flag")]
    #[param(value_type = bool)]
    pub stat: bool,
    /// With `stat`: do not follow a final symlink (`lstat`).
    #[serde(default, deserialize_with = "flag")]
    #[param(value_type = bool)]
    pub nofollow: bool,
}

/// `GET /v1/vms/{name}/fs` (the guest's root).
pub async fn get_root(
    state: State<Arc<Api>>,
    p: Extension<Principal>,
    uri: Uri,
    q: Query<GetQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    get(state, p, uri, q, headers).await
}

/// A file's bytes (with `Range`), a directory's entries, or `?stat=1`.
#[utoipa::path(get, path = "/v1/vms/{name}/fs/{path}", tag = "files",
    params(("name" = String, Path), ("path" = String, Path, description = "a guest path; may contain slashes"), GetQuery),
    responses((status = 200, content_type = "application/octet-stream", description = "the file (a directory: a JSON array of StatView; ?stat=1: a StatView)"),
        (status = 206, description = "the requested range"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 416, body = ErrorBody)))]
pub async fn get(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    uri: Uri,
    Query(q): Query<GetQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let (name, path) = split_uri(&uri)?;
    let mut walk = walk_for(&api, &p, &name)?;
    let who = p.who();
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // The walk and the transfer run in a task of their own; see `stream_file`.
    let opened = detached(async move {
        let found = walk.resolve(&who, &path, !q.nofollow).await?;
        let base = path.rsplit(|&b| b == b'/').next().unwrap_or(b"").to_vec();
        if q.stat {
            return Ok(Got::Json(
                serde_json::to_value(stat_view(&base, &found.node.attr)).unwrap_or_default(),
            ));
        }
        let a = found.node.attr;
        if a.mode & libc::S_IFMT == libc::S_IFDIR {
            check(&who, &a, R | X)?;
            let entries = walk.list(&found.node.target).await?;
            let list: Vec<StatView> = entries
                .into_iter()
                .filter_map(|(n, _, attr)| attr.map(|a| stat_view(&n, &a)))
                .collect();
            return Ok(Got::Json(serde_json::to_value(list).unwrap_or_default()));
        }
        if a.mode & libc::S_IFMT != libc::S_IFREG {
            return Err(Error::invalid(format!(
                "{} is a {}, not a regular file",
                String::from_utf8_lossy(&path),
                kind_name(a.mode)
            )));
        }
        check(&who, &a, R)?;
        let opened = walk.open(&found.node.target, libc::O_RDONLY).await?;
        Ok(Got::File(walk, found.node, opened.fh))
    })
    .await?;
    match opened {
        Got::Json(v) => Ok(axum::Json(v).into_response()),
        Got::File(walk, node, fh) => Ok(file_response(walk, node, fh, range.as_deref())),
    }
}

enum Got {
    Json(serde_json::Value),
    File(Walk, Node, u64),
}

/// Parse a single `bytes=` range against `size`: `Ok(None)` = the whole file.
fn parse_range(range: Option<&str>, size: u64) -> std::result::Result<Option<(u64, u64)>, ()> {
    let Some(spec) = range.and_then(|r| r.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        // Several ranges: answered with the whole file (RFC 9110 allows ignoring Range).
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size.saturating_sub(1))
        }
        (s, "") => (s.parse().map_err(|_| ())?, size.saturating_sub(1)),
        (s, e) => {
            let (s, e): (u64, u64) = (s.parse().map_err(|_| ())?, e.parse().map_err(|_| ())?);
            (s, e.min(size.saturating_sub(1)))
        }
    };
    if size == 0 || start >= size || start > end {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// Stream `[from, to)` of an open file, [`IN_FLIGHT`] guest reads at a time. The task
/// owns the walk and the handle: when the client goes away the task ends, the handle
/// is closed and the walk's references given back.
fn stream_file(walk: Walk, node: Node, fh: u64, from: u64, to: u64) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>>>(IN_FLIGHT);
    tokio::spawn(async move {
        let walk = Arc::new(walk);
        let mut next = from;
        let mut reads = FuturesOrdered::new();
        loop {
            while reads.len() < IN_FLIGHT && next < to {
                let size = u32::try_from((to - next).min(u64::from(CHUNK))).unwrap_or(CHUNK);
                let (w, t, at) = (walk.clone(), node.target.clone(), next);
                reads.push_back(async move { w.read(&t, fh, at, size).await.map(|d| (d, size)) });
                next += u64::from(size);
            }
            let Some(res) = reads.next().await else { break };
            let (data, size) = match res {
                Ok(x) => x,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    break;
                }
            };
            let short = data.len() < size as usize;
            if tx.send(Ok(data)).await.is_err() || short {
                // Gone, or the file ended early (it shrank while being read).
                break;
            }
        }
        drop(reads);
        walk.release(&node.target, fh, false);
    });
    Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
}

fn file_response(walk: Walk, node: Node, fh: u64, range: Option<&str>) -> Response {
    let size = node.attr.size;
    match parse_range(range, size) {
        Err(()) => {
            walk.release(&node.target, fh, false);
            let mut r = ApiError::with_status(
                StatusCode::RANGE_NOT_SATISFIABLE,
                libc::EINVAL,
                format!("the range is outside the file ({size} bytes)"),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            r
        }
        Ok(None) => {
            let body = stream_file(walk, node, fh, 0, size);
            let mut r = (StatusCode::OK, body).into_response();
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
            r
        }
        Ok(Some((start, end))) => {
            let body = stream_file(walk, node, fh, start, end + 1);
            let mut r = (StatusCode::PARTIAL_CONTENT, body).into_response();
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(end + 1 - start));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            r
        }
    }
}

fn parse_mode(m: Option<&str>) -> Result<Option<u32>> {
    m.map(|s| {
        u32::from_str_radix(s.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                Error::invalid(format!("mode {s:?}: expected octal permission bits (0644)"))
            })
    })
    .transpose()
}

#[derive(Debug, Default, Deserialize, IntoParams)]
pub struct PutQuery {
    /// Permission bits of the new file in octal (default: the replaced file's, or 0644).
    pub mode: Option<String>,
}

/// Where an upload goes: the directory, the final name, the temporary name, the mode.
struct Upload {
    dir: Node,
    name: Vec<u8>,
    tmp: Vec<u8>,
    mode: u32,
}

fn temp_name(name: &[u8]) -> Vec<u8> {
    let tag = format!(".bandsox-upload-{:08x}", rand::random::<u32>());
    let mut t = Vec::new();
    if name.len() <= 200 {
        t.push(b'.');
        t.extend_from_slice(name);
    }
    t.extend_from_slice(tag.as_bytes());
    t
}

/// Decide where `path` is written: a final symlink is followed (the file it names is
/// replaced), a directory refused; the caller needs write and search permission on the
/// directory, and write permission on a file it replaces (as `open(O_TRUNC)` would).
async fn plan_upload(walk: &mut Walk, who: &Who, path: &[u8], mode: Option<u32>) -> Result<Upload> {
    let (mut dir, mut name) = walk.resolve_parent(who, path).await?;
    let mut existing = match walk.entry(&dir, &name).await {
        Ok(n) => Some(n),
        Err(e) if e.errno == libc::ENOENT => None,
        Err(e) => return Err(e),
    };
    if existing
        .as_ref()
        .is_some_and(|n| n.attr.mode & libc::S_IFMT == libc::S_IFLNK)
    {
        let f = walk.resolve(who, path, true).await?;
        let (d, n) = f
            .parent
            .ok_or_else(|| Error::invalid("the symlink does not name a file"))?;
        dir = d;
        name = n;
        existing = Some(f.node);
    }
    check(who, &dir.attr, W | X)?;
    if let Some(e) = &existing {
        if e.attr.mode & libc::S_IFMT == libc::S_IFDIR {
            return Err(Error::new(libc::EISDIR, "is a directory"));
        }
        check(who, &e.attr, W)?;
        check_sticky(who, &dir.attr, &e.attr)?;
    }
    let mode = mode
        .or(existing.map(|e| e.attr.mode & 0o7777))
        .unwrap_or(0o644);
    Ok(Upload {
        tmp: temp_name(&name),
        dir,
        name,
        mode,
    })
}

/// Write what arrives on `rx` to the temporary file; rename it over the target only
/// when the sender says the body is complete (`Ok(None)`); remove it otherwise.
async fn write_upload(
    mut walk: Walk,
    up: Upload,
    who: Who,
    mut rx: tokio::sync::mpsc::Receiver<Result<Option<Vec<u8>>>>,
) -> Result<u64> {
    let (node, opened) = walk.create(&up.dir, &up.tmp, up.mode, &who).await?;
    let walk = Arc::new(walk);
    let mut writes = FuturesOrdered::new();
    let mut at = 0u64;
    let mut complete = false;
    let mut failed: Option<Error> = None;
    while let Some(msg) = rx.recv().await {
        match msg {
            Ok(Some(data)) => {
                let (w, t, off, len) = (walk.clone(), node.target.clone(), at, data.len());
                at += len as u64;
                writes.push_back(async move {
                    match w.write(&t, opened.fh, off, data).await {
                        Ok(n) if n as usize == len => Ok(()),
                        Ok(_) => Err(Error::io("the guest wrote less than it was given")),
                        Err(e) => Err(e),
                    }
                });
                while writes.len() >= IN_FLIGHT {
                    if let Some(Err(e)) = writes.next().await {
                        failed = Some(e);
                        break;
                    }
                }
                if failed.is_some() {
                    break;
                }
            }
            Ok(None) => {
                complete = true;
                break;
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    while let Some(r) = writes.next().await {
        if let (Err(e), None) = (r, &failed) {
            failed = Some(e);
        }
    }
    walk.release(&node.target, opened.fh, false);
    let outcome = match (failed, complete) {
        (Some(e), _) => Err(e),
        (None, false) => Err(Error::io(
            "the upload ended early; the old file is unchanged",
        )),
        (None, true) => {
            walk.rename((&up.dir, &up.tmp), (&up.dir, &up.name), 0)
                .await
        }
    };
    if outcome.is_err() {
        let _ = walk.unlink(&up.dir, &up.tmp, false).await;
    }
    outcome.map(|()| at)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Written {
    /// Bytes written.
    pub size: u64,
}

/// Upload a file: the body is streamed to a temporary name beside the target and
/// renamed over it once complete, so a body that ends early (or is over the cap, 413)
/// leaves the old file as it was.
#[utoipa::path(put, path = "/v1/vms/{name}/fs/{path}", tag = "files",
    params(("name" = String, Path), ("path" = String, Path), PutQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = Written), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody)))]
pub async fn put(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    uri: Uri,
    Query(q): Query<PutQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Written>)> {
    let cap = api.upload_cap;
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > cap) {
        return Err(ApiError::too_large(cap));
    }
    let (name, path) = split_uri(&uri)?;
    let mode = parse_mode(q.mode.as_deref())?;
    let mut walk = walk_for(&api, &p, &name)?;
    let who = p.who();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Option<Vec<u8>>>>(IN_FLIGHT);
    let writer = tokio::spawn(async move {
        let up = plan_upload(&mut walk, &who, &path, mode).await?;
        write_upload(walk, up, who, rx).await
    });
    // Feed the writer in agent-sized chunks; stop at the cap (nothing is renamed).
    let mut data = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK as usize);
    let mut total = 0u64;
    let mut refused: Option<ApiError> = None;
    while let Some(frame) = data.next().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.send(Err(Error::io(format!("request body: {e}")))).await;
                refused = Some(Error::io(format!("the upload ended early: {e}")).into());
                break;
            }
        };
        total += frame.len() as u64;
        if total > cap {
            let _ = tx.send(Err(Error::new(libc::EFBIG, "over the cap"))).await;
            refused = Some(ApiError::too_large(cap));
            break;
        }
        let mut rest = &frame[..];
        while !rest.is_empty() {
            let take = rest.len().min(CHUNK as usize - buf.len());
            buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if buf.len() == CHUNK as usize {
                let full = std::mem::replace(&mut buf, Vec::with_capacity(CHUNK as usize));
                if tx.send(Ok(Some(full))).await.is_err() {
                    break;
                }
            }
        }
    }
    if refused.is_none() {
        if !buf.is_empty() {
            let _ = tx.send(Ok(Some(buf))).await;
        }
        let _ = tx.send(Ok(None)).await;
    }
    drop(tx);
    let res = writer
        .await
        .map_err(|e| ApiError::from(Error::io(format!("upload task: {e}"))))?;
    if let Some(r) = refused {
        return Err(r);
    }
    Ok((StatusCode::CREATED, Json(Written { size: res? })))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct FileOp {
    /// `mkdir` or `rename`.
    pub op: String,
    /// `mkdir`: permission bits in octal (default 0755).
    pub mode: Option<String>,
    /// `rename`: the new guest path.
    pub to: Option<String>,
}

/// `mkdir` (`{"op": "mkdir", "mode": "0755"}`) or `rename`
/// (`{"op": "rename", "to": "/new/path"}`, replacing an existing file there).
#[utoipa::path(post, path = "/v1/vms/{name}/fs/{path}", tag = "files",
    params(("name" = String, Path), ("path" = String, Path)), request_body = FileOp,
    responses((status = 201, body = StatView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn post(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    uri: Uri,
    Json(op): Json<FileOp>,
) -> ApiResult<(StatusCode, Json<StatView>)> {
    let (name, path) = split_uri(&uri)?;
    let mut walk = walk_for(&api, &p, &name)?;
    let who = p.who();
    let view = detached(async move {
        let (dir, entry) = walk.resolve_parent(&who, &path).await?;
        check(&who, &dir.attr, W | X)?;
        match op.op.as_str() {
            "mkdir" => {
                let mode = parse_mode(op.mode.as_deref())?.unwrap_or(0o755);
                let attr = walk.mkdir(&dir, &entry, mode, &who).await?;
                Ok(stat_view(&entry, &attr))
            }
            "rename" => {
                let to = op
                    .to
                    .ok_or_else(|| Error::invalid("rename: \"to\" is missing"))?;
                let moved = walk.entry(&dir, &entry).await?;
                check_sticky(&who, &dir.attr, &moved.attr)?;
                let (to_dir, to_name) = walk.resolve_parent(&who, to.as_bytes()).await?;
                check(&who, &to_dir.attr, W | X)?;
                if let Ok(replaced) = walk.entry(&to_dir, &to_name).await {
                    check_sticky(&who, &to_dir.attr, &replaced.attr)?;
                }
                walk.rename((&dir, &entry), (&to_dir, &to_name), 0).await?;
                Ok(stat_view(&to_name, &moved.attr))
            }
            other => Err(Error::invalid(format!(
                "unknown op {other:?}; accepted: mkdir, rename"
            ))),
        }
    })
    .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Remove a file, symlink or empty directory (not followed).
#[utoipa::path(delete, path = "/v1/vms/{name}/fs/{path}", tag = "files",
    params(("name" = String, Path), ("path" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    uri: Uri,
) -> ApiResult<StatusCode> {
    let (name, path) = split_uri(&uri)?;
    let mut walk = walk_for(&api, &p, &name)?;
    let who = p.who();
    detached(async move {
        let (dir, entry) = walk.resolve_parent(&who, &path).await?;
        check(&who, &dir.attr, W | X)?;
        let victim = walk.entry(&dir, &entry).await?;
        check_sticky(&who, &dir.attr, &victim.attr)?;
        let is_dir = victim.attr.mode & libc::S_IFMT == libc::S_IFDIR;
        walk.unlink(&dir, &entry, is_dir).await
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-3"), 10), Ok(Some((0, 3))));
        assert_eq!(parse_range(Some("bytes=5-"), 10), Ok(Some((5, 9))));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Ok(Some((7, 9))));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), Ok(Some((8, 9))));
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), Ok(None));
        assert!(parse_range(Some("bytes=10-"), 10).is_err());
        assert!(parse_range(Some("bytes=5-2"), 10).is_err());
        assert!(parse_range(Some("bytes=x-"), 10).is_err());
        assert!(parse_range(Some("bytes=0-0"), 0).is_err());
    }

    #[test]
    fn uris_split_into_vm_and_guest_bytes() {
        let u: Uri = "/v1/vms/a/fs/etc/%FFname%20x".parse().unwrap();
        let (vm, p) = split_uri(&u).unwrap();
        assert_eq!(vm, "a");
        assert_eq!(p, b"/etc/\xffname x");
        let (_, root) = split_uri(&"/v1/vms/a/fs".parse().unwrap()).unwrap();
        assert_eq!(root, b"/");
    }
}
