//! The Origin layer: requests a browser makes on behalf of another site are refused
//! (403) on every route, before authentication.
//!
//! - **Host** (TCP only): the name the request was sent to must be one this server
//!   answers to (loopback names, the address the connection arrived on, and the names
//!   given to `bandsox serve --host`). This defeats DNS rebinding, where another site's
//!   name is made to resolve to this server and the browser then calls it same-origin.
//! - **Origin**, when present: its host and port must be the request's `Host`. Browsers
//!   send it on every cross-origin request, every state-changing request and every
//!   WebSocket handshake; curl and other API clients send none and pass.
//! - **Sec-Fetch-Site: cross-site** is refused as well (browsers that send it).
//!
//! Invariant: nothing a browser sends from another site reaches a handler, credentials
//! or not (cross-site WebSocket hijacking included: axum does not check Origin itself).
use axum::extract::Request;
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::conn::{Conn, Peer};
use super::error::ApiError;

/// The host name of a `Host` header or an authority, without port and brackets.
fn host_name(authority: &str) -> &str {
    let a = authority.trim();
    if let Some(rest) = a.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match a.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => a,
    }
}

/// The authority (`host[:port]`) of an Origin such as `http://localhost:8080`.
fn origin_authority(origin: &str) -> Option<&str> {
    let rest = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))?;
    Some(rest.split('/').next().unwrap_or(rest))
}

/// Why a request must be refused, if it must.
pub fn refusal(conn: &Conn, headers: &HeaderMap) -> Option<String> {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if let Peer::Tcp { .. } = conn.peer {
        let Some(h) = host else {
            return Some("a Host header is required".into());
        };
        let name = host_name(h).to_ascii_lowercase();
        if !conn.hosts.iter().any(|a| a.eq_ignore_ascii_case(&name)) {
            return Some(format!(
                "this server does not answer to the name {name:?} (bandsox serve --host adds names)"
            ));
        }
    }
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if site.eq_ignore_ascii_case("cross-site") {
            return Some("cross-site requests are refused".into());
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let ok = match (origin.to_str().ok().and_then(origin_authority), host) {
            (Some(o), Some(h)) => o.eq_ignore_ascii_case(h.trim()),
            _ => false,
        };
        if !ok {
            return Some(format!(
                "requests from origin {:?} are refused: only this server's own pages may call it",
                String::from_utf8_lossy(origin.as_bytes())
            ));
        }
    }
    None
}

/// The layer.
pub async fn same_origin(req: Request, next: Next) -> Response {
    if let Some(conn) = req.extensions().get::<Conn>() {
        if let Some(why) = refusal(conn, req.headers()) {
            return ApiError::forbidden(why).into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use std::sync::Arc;

    fn tcp() -> Conn {
        Conn {
            peer: Peer::Tcp {
                addr: "127.0.0.1:5555".parse().unwrap(),
            },
            hosts: Arc::new(vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]),
            tls: false,
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn hosts_and_origins() {
        let c = tcp();
        assert!(refusal(&c, &headers(&[("host", "localhost:8080")])).is_none());
        assert!(refusal(&c, &headers(&[("host", "[::1]:8080")])).is_none());
        assert!(refusal(&c, &headers(&[("host", "evil.example:8080")])).is_some());
        assert!(refusal(&c, &headers(&[])).is_some());
        let same = [
            ("host", "localhost:8080"),
            ("origin", "http://localhost:8080"),
        ];
        assert!(refusal(&c, &headers(&same)).is_none());
        let other = [
            ("host", "localhost:8080"),
            ("origin", "http://evil.example"),
        ];
        assert!(refusal(&c, &headers(&other)).is_some());
        let port = [
            ("host", "localhost:8080"),
            ("origin", "http://localhost:9999"),
        ];
        assert!(refusal(&c, &headers(&port)).is_some());
        assert!(refusal(&c, &headers(&[("host", "localhost"), ("origin", "null")])).is_some());
        let xs = [("host", "localhost"), ("sec-fetch-site", "cross-site")];
        assert!(refusal(&c, &headers(&xs)).is_some());
    }
}
