//! `/v1/keys`: the caller's API keys (root: everyone's). Managed over the Unix socket
//! only (`bandsox keys`), so a key that leaked cannot mint or revoke keys.
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Extension;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::Json;
use crate::http::auth::{Principal, Via};
use crate::http::error::{ApiError, ApiResult, ErrorBody};
use crate::http::keys::KeyInfo;
use crate::http::Api;

fn socket_only(p: &Principal) -> ApiResult<()> {
    if p.via != Via::Socket {
        return Err(ApiError::with_status(
            StatusCode::FORBIDDEN,
            libc::EPERM,
            "keys are managed over the Unix socket only (bandsox keys)",
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct NewKey {
    pub name: String,
    /// Root only: make the key for this user.
    pub uid: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    pub name: String,
    pub uid: u32,
    /// The key. It is shown this once; only its hash is kept.
    pub key: String,
}

/// The caller's keys (root: all), never the keys themselves.
#[utoipa::path(get, path = "/v1/keys", tag = "keys",
    responses((status = 200, body = [KeyInfo]), (status = 403, body = ErrorBody)))]
pub async fn list(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Vec<KeyInfo>>> {
    socket_only(&p)?;
    Ok(Json(api.keys.list(p.uid)))
}

/// Make a key that acts as the caller (root: as `uid`).
#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = NewKey,
    responses((status = 201, body = CreatedKey), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn add(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Json(req): Json<NewKey>,
) -> ApiResult<(StatusCode, Json<CreatedKey>)> {
    socket_only(&p)?;
    let uid = match req.uid {
        Some(u) if u != p.uid && p.uid != 0 => {
            return Err(ApiError::with_status(
                StatusCode::FORBIDDEN,
                libc::EPERM,
                "only root makes keys for other users",
            ))
        }
        Some(u) => u,
        None => p.uid,
    };
    let key = api.keys.add(uid, &req.name)?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            name: req.name,
            uid,
            key,
        }),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct RevokeQuery {
    /// Root only: the owner of the key (default: the caller).
    pub uid: Option<u32>,
}

/// Revoke a key; it stops working at once.
#[utoipa::path(delete, path = "/v1/keys/{name}", tag = "keys", params(("name" = String, Path), RevokeQuery),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn revoke(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    Query(q): Query<RevokeQuery>,
) -> ApiResult<StatusCode> {
    socket_only(&p)?;
    api.keys.revoke(p.uid, q.uid.unwrap_or(p.uid), &name)?;
    Ok(StatusCode::NO_CONTENT)
}
