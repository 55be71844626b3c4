//! The answer while the daemon cannot serve: every request gets 503 with the usual JSON
//! error body and `Retry-After`, then the connection closes. `bandsox serve` uses it
//! while the daemon is down or restarting (so clients see a clear, retryable error),
//! the daemon when it already serves its maximum of connections.
use std::convert::Infallible;

use axum::http::{header, HeaderValue, Response, StatusCode};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::conn::{HEAD_TIMEOUT, MAX_HEAD};
use super::error::ErrorBody;

/// Seconds a client should wait before retrying.
pub const RETRY_AFTER: u64 = 1;

/// The 503 response.
pub fn response(message: &str) -> Response<String> {
    let body = ErrorBody {
        errno: libc::EAGAIN,
        code: crate::error::errno_name(libc::EAGAIN),
        message: message.to_string(),
    };
    let text = serde_json::to_string(&body).unwrap_or_default();
    let mut resp = Response::new(text);
    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Answer every request on `io` with 503 `message`.
pub async fn serve<I>(io: I, message: &str)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let message = message.to_string();
    let svc = hyper::service::service_fn(move |_req| {
        let resp = response(&message);
        async move { Ok::<_, Infallible>(resp) }
    });
    let _ = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false)
        .serve_connection(TokioIo::new(io), svc)
        .await;
}
