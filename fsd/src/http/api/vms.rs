//! VMs: list, create, info, state, delete, and the lines of `<vm>/ctl` and the root
//! `ctl` (pause, resume, stop, start, kill, restart, snapshot; create, clone, import,
//! pull, build).
use crate::manager::ctl;
use crate::vfs::journal::{Journal, Scope};
use std::collections::BTreeMap;
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
use crate::manager::vm::Vm;

/// A VM as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct VmView {
    /// Its directory name in the tree.
    pub name: String,
    /// Unique across hosts: `<node>:<local id>` (docs/scale-out.md).
    pub id: String,
    /// The host that runs it.
    pub node: String,
    /// What `<vm>/state` says: `booting`, `running`, `paused`, `stopped`, `failed: why`.
    pub state: String,
    /// The owner's uid.
    pub owner: u32,
    /// What `<vm>/info` says (name, id, backend, image, vcpus, memory_mib, disk_mib,
    /// net, ip, created, boot_ms, vmm_pid, ...).
    #[schema(value_type = Object)]
    pub info: serde_json::Value,
}

pub fn view(api: &Api, vm: &Vm) -> VmView {
    VmView {
        name: vm.name.clone(),
        id: format!("{}:{}", api.node, vm.id),
        node: api.node.clone(),
        state: vm.state().render(),
        owner: vm.uid,
        info: serde_json::from_str(&vm.info_json()).unwrap_or(serde_json::Value::Null),
    }
}

/// `mkdir` / `create NAME key=value...`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateVm {
    pub name: String,
    /// The options of `create` (docs/tree.md), as `key: value`: image (a local image or
    /// a registry reference, pulled on first use), vcpus, memory, disk, net,
    /// backend, autostart, keep_runs, output_mib, exec_timeout. Values may be strings,
    /// numbers or booleans. Missing keys come from `defaults`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub options: BTreeMap<String, serde_json::Value>,
}

/// One line for a `ctl` file.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CtlLine {
    /// E.g. `pause`, `snapshot s1` (VM) or `clone s1 b count=3` (root).
    pub command: String,
}

fn option_words(
    options: &BTreeMap<String, serde_json::Value>,
) -> crate::error::Result<Vec<String>> {
    options
        .iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => if *b { "1" } else { "0" }.to_string(),
                _ => {
                    return Err(Error::invalid(format!(
                        "option {k}: expected a string, number or boolean"
                    )))
                }
            };
            if k.contains(['=', ' ', '\n']) || v.contains([' ', '\n']) {
                return Err(Error::invalid(format!(
                    "option {k}: no spaces, newlines or '=' in keys"
                )));
            }
            Ok(format!("{k}={v}"))
        })
        .collect()
}

/// The VMs the caller may see (root: all).
#[utoipa::path(get, path = "/v1/vms", tag = "vms",
    responses((status = 200, body = [VmView]), (status = 401, body = ErrorBody)))]
pub async fn list(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
) -> Json<Vec<VmView>> {
    let vms = api
        .mgr
        .list()
        .into_iter()
        .filter(|vm| crate::vfs::policy::lists(p.uid, vm.uid))
        .map(|vm| view(&api, &vm))
        .collect();
    Json(vms)
}

/// Create and boot a VM; answers once its agent answers (like `mkdir`).
#[utoipa::path(post, path = "/v1/vms", tag = "vms", request_body = CreateVm,
    responses((status = 201, body = VmView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Json(req): Json<CreateVm>,
) -> ApiResult<(StatusCode, Json<VmView>)> {
    let words = option_words(&req.options)?;
    let mgr = api.mgr.clone();
    let c = p.caller();
    let name = req.name.clone();
    let vm = detached(async move { mgr.create(&name, &words, c.uid, c.gid).await }).await?;
    Ok((StatusCode::CREATED, Json(view(&api, &vm))))
}

/// A VM's name, id, state and `info`.
#[utoipa::path(get, path = "/v1/vms/{name}", tag = "vms", params(("name" = String, Path)),
    responses((status = 200, body = VmView), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<VmView>> {
    Ok(Json(view(&api, &*vm_for(&api, p.uid, &name)?)))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StateView {
    /// `booting`, `running`, `paused`, `stopping`, `stopped`, `failed: <why>`.
    pub state: String,
}

/// What `<vm>/state` says.
#[utoipa::path(get, path = "/v1/vms/{name}/state", tag = "vms", params(("name" = String, Path)),
    responses((status = 200, body = StateView), (status = 404, body = ErrorBody)))]
pub async fn state(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<StateView>> {
    let vm = vm_for(&api, p.uid, &name)?;
    Ok(Json(StateView {
        state: vm.state().render(),
    }))
}

/// Stop and delete a VM and everything of it (`rmdir`).
#[utoipa::path(delete, path = "/v1/vms/{name}", tag = "vms", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let vm = vm_for(&api, p.uid, &name)?;
    crate::vfs::policy::may_remove(p.uid, vm.uid, &format!("VM {name}"))?;
    let mgr = api.mgr.clone();
    detached(async move { mgr.delete(&name).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// One line of `<vm>/ctl`: start, stop, kill, pause, resume, restart, snapshot NAME,
/// reconnect, ping [N], exec_timeout=SECONDS|none.
#[utoipa::path(post, path = "/v1/vms/{name}/ctl", tag = "vms", params(("name" = String, Path)),
    request_body = CtlLine,
    responses((status = 200, body = CtlResult), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn ctl(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    Json(line): Json<CtlLine>,
) -> ApiResult<Json<CtlResult>> {
    let vm = vm_for(&api, p.uid, &name)?;
    one_line(&line.command)?;
    let mgr = api.mgr.clone();
    let c = p.caller();
    let result = detached(async move {
        // The tree's own path: parsed once, one dispatch, recorded for `cat <vm>/ctl`.
        let journal = Journal::new(Scope::Vm(vm.clone()), c.session, None);
        let res = match ctl::parse(&ctl::Target::Vm(vm), &line.command) {
            Ok(cmd) => mgr.execute(cmd, c.uid, c.gid).await,
            Err(e) => Err(e),
        };
        journal.finish(res)
    })
    .await?;
    Ok(Json(CtlResult { result }))
}

/// One line of the root `ctl`: create NAME [key=value...], clone SNAPSHOT NAME
/// [count=N], import IMAGE SOURCE [...], pull IMAGE REFERENCE [...], build IMAGE DIR [...].
#[utoipa::path(post, path = "/v1/ctl", tag = "vms", request_body = CtlLine,
    responses((status = 200, body = CtlResult), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn global_ctl(
    State(api): State<Arc<Api>>,
    Extension(p): Extension<Principal>,
    Json(line): Json<CtlLine>,
) -> ApiResult<Json<CtlResult>> {
    one_line(&line.command)?;
    // Parsed once; a parse error is the command's outcome (recorded below).
    let cmd = ctl::parse(&ctl::Target::Root, &line.command);
    // `clone` of another user's snapshot is 404 here, as a missing one.
    if let Ok(ctl::Command::Global(crate::ctl::GlobalCmd::Clone { snapshot, .. })) = &cmd {
        super::snapshots::visible(&api, p.uid, snapshot)?;
    }
    let mgr = api.mgr.clone();
    let c = p.caller();
    let result = detached(async move {
        let journal = Journal::new(Scope::Root(mgr.clone()), c.session, None);
        let res = match cmd {
            Ok(cmd) => mgr.execute(cmd, c.uid, c.gid).await,
            Err(e) => Err(e),
        };
        journal.finish(res)
    })
    .await?;
    Ok(Json(CtlResult { result }))
}

/// A ctl command is one line (the tree runs each line of a write; here one request is
/// one command).
fn one_line(command: &str) -> crate::error::Result<()> {
    if command.trim_end_matches('\n').contains('\n') {
        return Err(Error::invalid("one command per request (no newlines)"));
    }
    Ok(())
}
