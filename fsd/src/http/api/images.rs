//! `images/`: list, info, pull (a registry reference), import (a host path; root
//! only, as in the tree), delete (its owner or root, when no VM uses it).
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Extension;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{detached, CtlResult, Json};
use crate::http::auth::Principal;
use crate::http::error::{ApiResult, ErrorBody};
use crate::http::Api;
use crate::images::ImageOptions;

#[derive(Debug, Serialize, ToSchema)]
pub struct ImageView {
    pub name: String,
    pub owner: u32,
    /// What `images/<name>/info` says.
    #[schema(value_type = Object)]
    pub info: serde_json::Value,
}

fn view(api: &Api, name: &str) -> crate::error::Result<ImageView> {
    let info = api.mgr.image_info(name)?;
    Ok(ImageView {
        name: name.to_string(),
        owner: api.mgr.image_owner(name),
        info: serde_json::from_str(&info).unwrap_or(serde_json::Value::Null),
    })
}

/// Every image (images are shared by all users).
#[utoipa::path(get, path = "/v1/images", tag = "images", responses((status = 200, body = [ImageView])))]
pub async fn list(State(api): State<Arc<Api>>) -> Json<Vec<ImageView>> {
    Json(
        api.mgr
            .images()
            .iter()
            .filter_map(|n| view(&api, n).ok())
            .collect(),
    )
}

/// One image's `info`.
#[utoipa::path(get, path = "/v1/images/{name}", tag = "images", params(("name" = String, Path)),
    responses((status = 200, body = ImageView), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
) -> ApiResult<Json<ImageView>> {
    Ok(Json(view(&api, &name)?))
}

/// Remove an image nobody uses (`rmdir images/NAME`).
#[utoipa::path(delete, path = "/v1/images/{name}", tag = "images", params(("name" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    view(&api, &name)?;
    crate::vfs::policy::may_remove(p.uid, api.mgr.image_owner(&name), &format!("image {name}"))?;
    api.mgr.remove_image(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Size options of `pull` and `import`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct SizeOptions {
    /// The image disk's size in MiB (default: content plus headroom).
    pub size: Option<u64>,
    /// Free MiB added to the content (default: the tree's).
    pub headroom: Option<u64>,
    /// Which image of an OCI layout (import only).
    pub tag: Option<String>,
}

impl SizeOptions {
    fn words(&self) -> Vec<String> {
        let mut w = Vec::new();
        if let Some(s) = self.size {
            w.push(format!("size={s}"));
        }
        if let Some(h) = self.headroom {
            w.push(format!("headroom={h}"));
        }
        if let Some(t) = &self.tag {
            w.push(format!("tag={t}"));
        }
        w
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct PullRequest {
    /// The local image name.
    pub name: String,
    /// A registry reference (`alpine:3.20`, `ghcr.io/org/app:1`).
    pub reference: String,
    #[serde(flatten)]
    pub options: SizeOptions,
}

/// Pull an image from an OCI registry (`pull IMAGE REFERENCE`).
#[utoipa::path(post, path = "/v1/images/pull", tag = "images", request_body = PullRequest,
    responses((status = 201, body = CtlResult), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn pull(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Json(req): Json<PullRequest>,
) -> ApiResult<(StatusCode, Json<CtlResult>)> {
    let opts = ImageOptions::parse(&req.options.words())?;
    let mgr = api.mgr.clone();
    let uid = p.uid;
    let result =
        detached(async move { mgr.pull_image(&req.name, &req.reference, opts, uid).await }).await?;
    Ok((StatusCode::CREATED, Json(CtlResult { result })))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ImportRequest {
    pub name: String,
    /// An absolute host path: docker-save tar, OCI layout or archive, rootfs tarball,
    /// directory or ext4 file. Root only (the daemon reads it with its privileges).
    pub source: String,
    #[serde(flatten)]
    pub options: SizeOptions,
}

/// Import an image from a host path (`import IMAGE SOURCE`; root only).
#[utoipa::path(post, path = "/v1/images/import", tag = "images", request_body = ImportRequest,
    responses((status = 201, body = CtlResult), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn import(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Json(req): Json<ImportRequest>,
) -> ApiResult<(StatusCode, Json<CtlResult>)> {
    let opts = ImageOptions::parse(&req.options.words())?;
    let mgr = api.mgr.clone();
    let uid = p.uid;
    let result =
        detached(async move { mgr.import_image(&req.name, &req.source, opts, uid).await }).await?;
    Ok((StatusCode::CREATED, Json(CtlResult { result })))
}
