//! `bandsox keys`: a thin client of `/v1/keys` over the API's Unix socket, acting as
//! the user who runs it (the daemon reads who that is from the socket, `SO_PEERCRED`).
//!
//! Invariants: one request per command, with a deadline ([`DEADLINE`]); an answer is
//! read up to [`MAX_ANSWER`] bytes; errors are the API's own message.
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

/// How long a command waits for the API.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// Largest answer read.
pub const MAX_ANSWER: usize = 4 * 1024 * 1024;

/// Which keys command.
#[derive(Debug, Clone)]
pub enum KeysCmd {
    Add { name: String, uid: Option<u32> },
    List,
    Revoke { name: String, uid: Option<u32> },
}

/// One request to the API at `socket`; the status and the body.
async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(u16, Bytes), String> {
    let where_ = || format!("{}", socket.display());
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("{}: {e} (is `bandsox serve` running?)", where_()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("{}: {e}", where_()))?;
    let conn = tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost");
    if body.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("{}: {e}", where_()))?;
    let status = resp.status().as_u16();
    let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    conn.abort();
    Ok((status, bytes))
}

/// The message of an error body, or the body as text.
fn error_text(status: u16, body: &[u8]) -> String {
    let msg = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    format!("{msg} (HTTP {status})")
}

fn uid_query(uid: Option<u32>) -> String {
    uid.map(|u| format!("?uid={u}")).unwrap_or_default()
}

/// Run a keys command against the API socket; what to print on stdout.
pub fn keys(socket: &Path, cmd: KeysCmd) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let socket: PathBuf = socket.to_path_buf();
    rt.block_on(async move {
        let go = async {
            match cmd {
                KeysCmd::Add { name, uid } => {
                    let body = serde_json::json!({ "name": name, "uid": uid }).to_string();
                    let (s, b) =
                        request(&socket, Method::POST, "/v1/keys", Some(body.into_bytes())).await?;
                    if s != 201 {
                        return Err(error_text(s, &b));
                    }
                    let v: serde_json::Value =
                        serde_json::from_slice(&b).map_err(|e| e.to_string())?;
                    let key = v.get("key").and_then(|k| k.as_str()).unwrap_or_default();
                    Ok(format!("{key}\n"))
                }
                KeysCmd::List => {
                    let (s, b) = request(&socket, Method::GET, "/v1/keys", None).await?;
                    if s != 200 {
                        return Err(error_text(s, &b));
                    }
                    let list: Vec<serde_json::Value> =
                        serde_json::from_slice(&b).map_err(|e| e.to_string())?;
                    let mut out = String::new();
                    for k in list {
                        out.push_str(&format!(
                            "{}\tuid={}\tcreated={}\n",
                            k.get("name").and_then(|n| n.as_str()).unwrap_or_default(),
                            k.get("uid").and_then(|n| n.as_u64()).unwrap_or_default(),
                            k.get("created")
                                .and_then(|n| n.as_u64())
                                .unwrap_or_default(),
                        ));
                    }
                    Ok(out)
                }
                KeysCmd::Revoke { name, uid } => {
                    let path = format!(
                        "/v1/keys/{}{}",
                        percent_encoding::utf8_percent_encode(
                            &name,
                            percent_encoding::NON_ALPHANUMERIC
                        ),
                        uid_query(uid)
                    );
                    let (s, b) = request(&socket, Method::DELETE, &path, None).await?;
                    if s != 204 {
                        return Err(error_text(s, &b));
                    }
                    Ok(String::new())
                }
            }
        };
        tokio::time::timeout(DEADLINE, go)
            .await
            .map_err(|_| format!("the API did not answer within {DEADLINE:?}"))?
    })
}
