//! `snapshots/`: list, info, take (`snapshot NAME` on a VM), clone, delete. Another
//! user's snapshot is 404, like a missing one.
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Extension;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{detached, vm_for, CtlResult, Json};
use crate::error::Error;
use crate::http::auth::Principal;
use crate::http::error::{ApiResult, ErrorBody};
use crate::http::Api;

#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotView {
    pub name: String,
    pub owner: u32,
    /// What `snapshots/<name>/info` says.
    #[schema(value_type = Object)]
    pub info: serde_json::Value,
}

/// The snapshot `name` if `uid` may see it (its owner's and root's): the same rule as
/// the tree's `snapshots/` listing and its 0700 directories.
pub fn visible(api: &Api, uid: u32, name: &str) -> ApiResult<(u32, String)> {
    let missing = || Error::not_found(format!("no snapshot {name:?}"));
    let (owner, _) = api.mgr.snapshot_owner(name).ok_or_else(missing)?;
    if !crate::vfs::policy::lists(uid, owner) {
        return Err(missing().into());
    }
    let info = api.mgr.snapshot_info(name)?;
    Ok((owner, info))
}

fn view(name: &str, owner: u32, info: &str) -> SnapshotView {
    SnapshotView {
        name: name.to_string(),
        owner,
        info: serde_json::from_str(info).unwrap_or(serde_json::Value::Null),
    }
}

/// The caller's snapshots (root: all).
#[utoipa::path(get, path = "/v1/snapshots", tag = "snapshots",
    responses((status = 200, body = [SnapshotView])))]
pub async fn list(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
) -> Json<Vec<SnapshotView>> {
    let out = api
        .mgr
        .snapshots()
        .into_iter()
        .filter_map(|n| visible(&api, p.uid, &n).ok().map(|(o, i)| view(&n, o, &i)))
        .collect();
    Json(out)
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct TakeSnapshot {
    /// The VM to snapshot (it keeps running).
    pub vm: String,
    pub name: String,
}

/// Snapshot a VM (`echo 'snapshot NAME' > <vm>/ctl`).
#[utoipa::path(post, path = "/v1/snapshots", tag = "snapshots", request_body = TakeSnapshot,
    responses((status = 201, body = CtlResult), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Json(req): Json<TakeSnapshot>,
) -> ApiResult<(StatusCode, Json<CtlResult>)> {
    let vm = vm_for(&api, p.uid, &req.vm)?;
    let mgr = api.mgr.clone();
    let result = detached(async move { mgr.snapshot(&vm, &req.name).await }).await?;
    Ok((StatusCode::CREATED, Json(CtlResult { result })))
}

/// A snapshot's `info`.
#[utoipa::path(get, path = "/v1/snapshots/{name}", tag = "snapshots", params(("name" = String, Path)),
    responses((status = 200, body = SnapshotView), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<SnapshotView>> {
    let (owner, info) = visible(&api, p.uid, &name)?;
    Ok(Json(view(&name, owner, &info)))
}

/// Delete a snapshot (`rmdir snapshots/NAME`).
#[utoipa::path(delete, path = "/v1/snapshots/{name}", tag = "snapshots", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let (owner, _) = visible(&api, p.uid, &name)?;
    crate::vfs::policy::may_remove(p.uid, owner, &format!("snapshot {name}"))?;
    let mgr = api.mgr.clone();
    detached(async move { mgr.delete_snapshot(&name).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CloneRequest {
    /// The new VM's name (with `count`, `NAME-1` .. `NAME-N`).
    pub name: String,
    pub count: Option<u32>,
    /// The clones' network (`net=`, docs/tree.md), if it differs from the snapshot's.
    pub net: Option<String>,
    /// The clones' kernel (`kernel=`), one installed under the state's `boot/`.
    pub kernel: Option<String>,
}

/// Start VMs from a snapshot with its memory (`clone SNAPSHOT NAME [count=N]`).
#[utoipa::path(post, path = "/v1/snapshots/{name}/clone", tag = "snapshots", params(("name" = String, Path)),
    request_body = CloneRequest,
    responses((status = 201, body = CtlResult), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn clone(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    Json(req): Json<CloneRequest>,
) -> ApiResult<(StatusCode, Json<CtlResult>)> {
    visible(&api, p.uid, &name)?;
    if let Some(n) = req.count {
        if !(1..=crate::ctl::MAX_CLONES).contains(&n) {
            return Err(Error::invalid(format!(
                "count={n}: expected 1..{}",
                crate::ctl::MAX_CLONES
            ))
            .into());
        }
    }
    let mgr = api.mgr.clone();
    let c = p.caller();
    // The same `key=value` options the ctl line takes, checked by the same parser.
    let options: Vec<String> = [("net", &req.net), ("kernel", &req.kernel)]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
        .collect();
    let result = detached(async move {
        mgr.clone_snapshot(&name, &req.name, req.count, &options, c.uid, c.gid)
            .await
    })
    .await?;
    Ok((StatusCode::CREATED, Json(CtlResult { result })))
}
