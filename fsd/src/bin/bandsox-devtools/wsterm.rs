//! `wsterm URL STEP...`: a WebSocket client of the web terminal (docs/api.md, "Web
//! terminal"), for tests and the keystroke-echo benchmark. It offers the terminal's
//! subprotocol (and the key, with `--key`), prints `run N` once attached, then runs the
//! steps in order:
//! - `send=TEXT`: keystrokes (a binary message, bytes as given);
//! - `resize=COLSxROWS`: the resize message;
//! - `expect=TEXT`: wait until the output received since the previous `expect` contains
//!   TEXT;
//! - `exit`: wait for the exit message and print `exit CODE`.
//!
//! A refused handshake prints `status NNN` and the body, and fails. Every wait has the
//! `--timeout` deadline.
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

pub struct Options {
    pub url: String,
    pub key: Option<String>,
    pub origin: Option<String>,
    pub timeout: Duration,
    pub steps: Vec<String>,
}

pub async fn run(o: Options) -> Result<(), String> {
    let mut req = o
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let mut protocols = String::from("bandsox.terminal.v1");
    if let Some(k) = &o.key {
        protocols.push_str(&format!(", bandsox.key.{k}"));
    }
    let hv = |s: &str| HeaderValue::from_str(s).map_err(|e| e.to_string());
    req.headers_mut()
        .insert("sec-websocket-protocol", hv(&protocols)?);
    if let Some(origin) = &o.origin {
        req.headers_mut().insert("origin", hv(origin)?);
    }
    let connect = tokio::time::timeout(o.timeout, tokio_tungstenite::connect_async(req))
        .await
        .map_err(|_| "the handshake timed out".to_string())?;
    let (mut ws, _) = match connect {
        Ok(x) => x,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            println!("status {}", resp.status().as_u16());
            return Err(format!("refused: {} {body}", resp.status()));
        }
        Err(e) => return Err(e.to_string()),
    };
    let deadline = tokio::time::Instant::now() + o.timeout;
    let mut seen: Vec<u8> = Vec::new();
    let mut exit: Option<serde_json::Value> = None;
    // Receive one message into `seen`/`exit`; false once the socket ended.
    macro_rules! recv {
        () => {{
            match tokio::time::timeout_at(deadline, ws.next()).await {
                Err(_) => {
                    return Err(format!(
                        "timed out; output so far: {:?}",
                        String::from_utf8_lossy(&seen)
                    ))
                }
                Ok(None) | Ok(Some(Err(_))) => false,
                Ok(Some(Ok(Message::Binary(b)))) => {
                    seen.extend_from_slice(&b);
                    true
                }
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: serde_json::Value =
                        serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
                    match v["type"].as_str() {
                        Some("attached") => println!("run {}", v["run"]),
                        Some("exit") => exit = Some(v),
                        _ => eprintln!("wsterm: {v}"),
                    }
                    true
                }
                Ok(Some(Ok(Message::Close(_)))) => false,
                Ok(Some(Ok(_))) => true,
            }
        }};
    }
    for step in &o.steps {
        let (what, arg) = step.split_once('=').unwrap_or((step.as_str(), ""));
        match what {
            "send" => ws
                .send(Message::Binary(arg.as_bytes().to_vec().into()))
                .await
                .map_err(|e| e.to_string())?,
            "resize" => {
                let (c, r) = arg.split_once('x').ok_or("resize=COLSxROWS")?;
                let m = serde_json::json!({"type": "resize", "cols": c.parse::<u32>().map_err(|e| e.to_string())?,
                    "rows": r.parse::<u32>().map_err(|e| e.to_string())?});
                ws.send(Message::Text(m.to_string().into()))
                    .await
                    .map_err(|e| e.to_string())?
            }
            "expect" => {
                let needle = arg.as_bytes();
                while !seen.windows(needle.len().max(1)).any(|w| w == needle) {
                    if !recv!() {
                        return Err(format!(
                            "the socket ended before {arg:?}; output: {:?}",
                            String::from_utf8_lossy(&seen)
                        ));
                    }
                }
                seen.clear();
            }
            "exit" => {
                while exit.is_none() {
                    if !recv!() {
                        break;
                    }
                }
                match &exit {
                    Some(v) => println!("exit {}", v["exit_code"]),
                    None => return Err("the socket ended without an exit message".into()),
                }
            }
            _ => return Err(format!("unknown step {step:?}")),
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}
