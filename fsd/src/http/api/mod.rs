//! The `/v1` routes. Paths mirror the tree and name VMs by their directory name; each
//! handler is one call into the core plus a conversion (see `super`'s module docs).
//!
//! Helpers shared by the handlers live here: the JSON extractor whose rejections are
//! the API's own error bodies, the privacy rule for VMs (another user's VM is 404), and
//! [`detached`], which runs a core operation in a task of its own.
pub mod events;
pub mod exec;
pub mod files;
pub mod images;
pub mod keys;
pub mod runs;
pub mod snapshots;
pub mod vms;

use std::sync::Arc;

use axum::extract::{FromRequest, Request};
use axum::Router;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, ApiResult};
use super::Api;
use crate::error::Error;
use crate::manager::vm::Vm;

/// Every documented route (the OpenAPI document is generated from this router).
pub fn openapi_router() -> OpenApiRouter<Arc<Api>> {
    OpenApiRouter::with_openapi(super::openapi::base())
        .routes(routes!(vms::list, vms::create))
        .routes(routes!(vms::get, vms::delete))
        .routes(routes!(vms::state))
        .routes(routes!(vms::ctl))
        .routes(routes!(vms::global_ctl))
        .routes(routes!(exec::exec))
        .routes(routes!(runs::list))
        .routes(routes!(runs::get))
        .routes(routes!(runs::output))
        .routes(routes!(runs::stdin))
        .routes(routes!(runs::signal))
        .routes(routes!(events::events))
        .routes(routes!(events::vm_events))
        .routes(routes!(events::console))
        .routes(routes!(events::usage))
        .routes(routes!(snapshots::list, snapshots::create))
        .routes(routes!(snapshots::get, snapshots::delete))
        .routes(routes!(snapshots::clone))
        .routes(routes!(images::list))
        .routes(routes!(images::get, images::delete))
        .routes(routes!(images::pull))
        .routes(routes!(images::import))
        .routes(routes!(keys::list, keys::add))
        .routes(routes!(keys::revoke))
}

/// The routes served behind authentication.
pub fn routes() -> Router<Arc<Api>> {
    let (router, _) = openapi_router().split_for_parts();
    // `fs/{*path}` has a wildcard OpenAPI cannot express; it is documented by hand as
    // `/v1/vms/{name}/fs/{path}` (see `openapi::base`).
    router
        .route(
            "/v1/vms/{name}/fs/{*path}",
            axum::routing::get(files::get)
                .put(files::put)
                .post(files::post)
                .delete(files::delete),
        )
        .route(
            "/v1/vms/{name}/terminal",
            axum::routing::get(super::terminal::new_run),
        )
        .route(
            "/v1/vms/{name}/runs/{n}/terminal",
            axum::routing::get(super::terminal::attach),
        )
        .route("/v1/vms/{name}/fs", axum::routing::get(files::get_root))
        .route("/v1/vms/{name}/fs/", axum::routing::get(files::get_root))
}

/// Unknown paths: the API's own 404 body.
pub async fn not_found() -> ApiError {
    Error::not_found("no such API path; see /v1/openapi.json").into()
}

/// `axum::Json` whose rejections (bad JSON, too large, wrong content type) are the API's
/// error bodies.
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(e) => {
                let status = e.status();
                let errno = if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    libc::EFBIG
                } else {
                    libc::EINVAL
                };
                Err(ApiError::with_status(status, errno, e.body_text()))
            }
        }
    }
}

impl<T: serde::Serialize> axum::response::IntoResponse for Json<T> {
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}

/// The VM `name` as `uid` may see it: its owner's and root's; for anyone else it does
/// not exist (404, the same answer as a missing VM: no existence leak). The rule is the
/// tree's: VM directories are mode 0700, their owner's ([`crate::vfs::policy::lists`]).
pub fn vm_for(api: &Api, uid: u32, name: &str) -> ApiResult<Arc<Vm>> {
    match api.mgr.get(name) {
        Some(vm) if crate::vfs::policy::lists(uid, vm.uid) => Ok(vm),
        _ => Err(Error::not_found(format!("no VM {name:?}")).into()),
    }
}

/// Run `fut` in a task of its own and wait for it: a client that goes away does not
/// cancel a core operation half-way (a boot, a deletion, an upload's rename).
pub async fn detached<T, F>(fut: F) -> ApiResult<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = crate::error::Result<T>> + Send + 'static,
{
    match tokio::spawn(fut).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(Error::io(format!("the operation's task failed: {e}")).into()),
    }
}

/// The one-line result text of a ctl command.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct CtlResult {
    /// What `cat ctl` would show after the command (`ok: paused`).
    pub result: String,
}
