//! The HTTP adapter's error answer: the core's errno, its symbolic name and the same
//! one-line message the tree gives (`cat ctl`), with the status from the one table in
//! [`crate::error::http_status`].
//!
//! Invariants: every failure a handler or a layer answers goes through [`ApiError`], so
//! every error body has the same shape (`{"errno", "code", "message"}`); the few answers
//! that are the adapter's own (401, 403 Origin, 413, 429, 503) carry the errno closest
//! to their meaning and their status explicitly.
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{errno_name, http_status, Error};

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The errno the tree would give for the same operation (`13`).
    pub errno: i32,
    /// Its symbolic name (`EACCES`).
    pub code: String,
    /// One line saying what was wrong: the text `cat ctl` shows in the tree.
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub errno: i32,
    pub message: String,
    /// Seconds for `Retry-After` (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An answer of the adapter's own with an explicit status.
    pub fn with_status(status: StatusCode, errno: i32, message: impl Into<String>) -> Self {
        ApiError {
            status,
            errno,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 401: no credentials, or wrong or revoked ones.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::with_status(StatusCode::UNAUTHORIZED, libc::EACCES, message)
    }

    /// 403 for a request a browser made from another site (Origin, Host).
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::with_status(StatusCode::FORBIDDEN, libc::EPERM, message)
    }

    /// 413: a body over its cap (nothing was written).
    pub fn too_large(cap: u64) -> Self {
        Self::with_status(
            StatusCode::PAYLOAD_TOO_LARGE,
            libc::EFBIG,
            format!("the request body is larger than its cap of {cap} bytes; nothing was written"),
        )
    }

    /// 429: too many failed authentications from this client.
    pub fn too_many(retry_after: u64) -> Self {
        let mut e = Self::with_status(
            StatusCode::TOO_MANY_REQUESTS,
            libc::EAGAIN,
            format!("too many failed authentications from this client; retry in {retry_after} s"),
        );
        e.retry_after = Some(retry_after);
        e
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            errno: self.errno,
            code: errno_name(self.errno),
            message: self.message.clone(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status =
            StatusCode::from_u16(http_status(e.errno)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError {
            status,
            errno: e.errno,
            message: e.message,
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, errno = self.errno, "http: {}", self.message);
        } else {
            tracing::debug!(status = %self.status, errno = self.errno, "http: {}", self.message);
        }
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// What handlers return.
pub type ApiResult<T> = std::result::Result<T, ApiError>;
