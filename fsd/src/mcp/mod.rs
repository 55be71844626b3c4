//! The MCP server (Model Context Protocol, the official Rust SDK `rmcp`): tools for AI
//! agents, served as streamable HTTP at `/v1/mcp` on the API server, behind the same
//! layers as the REST API (Origin/Host, authentication, body caps).
//!
//! Every tool is exactly one REST request made in-process: the tool builds the request
//! (`GET /v1/vms`, `POST /v1/vms/{name}/exec`, `PUT /v1/vms/{name}/fs/{path}`, ...)
//! and sends it to the REST routes with the calling request's [`Principal`], so
//! ownership, privacy (another user's VM is "not found"), limits, errors and messages
//! are the REST handlers' and thus the tree's; there is no second copy of any rule.
//! A 2xx answer is the tool's result (its JSON or text); any other is a tool error
//! whose text is the API's error body (`{"errno","code","message"}`).
//!
//! Invariants: a tool call without an authenticated principal (which the layers never
//! let through) fails; each call acts as the principal of the HTTP request that carried
//! it, never as whoever started the MCP session.
use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request};
use http_body_util::BodyExt;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, ServerCapabilities, ServerConfig};
use rmcp::service::RequestContext;
use rmcp::{schemars, tool, tool_handler, tool_router, ErrorData, RoleServer, ServerHandler};
use serde::Deserialize;
use tower::ServiceExt;

use crate::http::auth::Principal;
use crate::http::Api;

/// Largest file a `read_file` result carries (the REST API streams any size).
pub const READ_CAP: usize = 4 * 1024 * 1024;

/// Path segments are sent percent-encoded except the unreserved characters and `/`.
const PATH: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn seg(s: &str) -> String {
    utf8_percent_encode(s, PATH).to_string()
}

/// `/v1/vms/{vm}{rest}`, the VM's name encoded.
fn vm_uri(vm: &str, rest: &str) -> String {
    format!("/v1/vms/{}{rest}", seg(vm))
}

/// The REST path of `path` under the VM's `fs/` (relative to the guest's `/`).
fn fs_uri(vm: &str, path: &str) -> String {
    vm_uri(vm, &format!("/fs/{}", seg(path.trim_start_matches('/'))))
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct VmName {
    /// The VM's name (its directory under the mount point).
    pub name: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct CreateVm {
    /// The new VM's name.
    pub name: String,
    /// `create` options (docs/tree.md): image (local name or registry reference),
    /// vcpus, memory, disk, net, backend, autostart, exec_timeout, ...
    #[serde(default)]
    pub options: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct Exec {
    /// The VM.
    pub vm: String,
    /// A command line or a script (run by /bin/sh unless it starts with `#!`).
    pub command: String,
    /// Seconds before the command is stopped; absent: the VM's exec_timeout.
    pub timeout: Option<f64>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// A guest user (`name`, `uid`, `name:group`).
    pub user: Option<String>,
    /// Bytes for the command's stdin.
    pub stdin: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct FilePath {
    pub vm: String,
    /// A path in the guest (resolved in the guest; relative to `/`).
    pub path: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct WriteFile {
    pub vm: String,
    pub path: String,
    /// The new contents (replaces the file whole).
    pub content: String,
    /// `utf-8` (default) or `base64`.
    pub encoding: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct Ctl {
    pub vm: String,
    /// `pause`, `resume`, `stop`, `start`, `restart` (a line for the VM's `ctl`).
    pub command: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct Snapshot {
    pub vm: String,
    /// The snapshot's name.
    pub name: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct Clone {
    /// The snapshot to clone.
    pub snapshot: String,
    /// The new VM's name (with count, NAME-1 .. NAME-N).
    pub name: String,
    pub count: Option<u32>,
}

/// The MCP service of one session (cheap: the API is shared).
#[derive(Clone)]
pub struct Mcp {
    /// The REST routes without the authentication layer: the principal is the one the
    /// layer gave the MCP request.
    rest: axum::Router,
    tool_router: ToolRouter<Mcp>,
}

fn err(text: impl Into<String>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(text)])
}

/// The principal of the HTTP request that carried this call.
fn principal(ctx: &RequestContext<RoleServer>) -> Option<Principal> {
    ctx.extensions
        .get::<axum::http::request::Parts>()
        .and_then(|p| p.extensions.get::<Principal>().cloned())
}

impl Mcp {
    pub fn new(rest: axum::Router) -> Mcp {
        Mcp {
            rest,
            tool_router: Self::tool_router(),
        }
    }

    /// One REST request as the caller: (status, body).
    async fn call(
        &self,
        ctx: &RequestContext<RoleServer>,
        method: Method,
        uri: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), CallToolResult> {
        let p = principal(ctx).ok_or_else(|| err("not authenticated"))?;
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", content_type)
            .body(Body::from(body))
            .map_err(|e| err(format!("bad request: {e}")))?;
        req.extensions_mut().insert(p);
        let resp = self
            .rest
            .clone()
            .oneshot(req)
            .await
            .map_err(|e| err(format!("{e}")))?;
        let status = resp.status().as_u16();
        let limited = http_body_util::Limited::new(resp.into_body(), READ_CAP + 1);
        let bytes = limited
            .collect()
            .await
            .map_err(|e| err(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok((status, bytes.to_vec()))
    }

    /// A JSON request whose answer is the tool's text.
    async fn json(
        &self,
        ctx: &RequestContext<RoleServer>,
        method: Method,
        uri: &str,
        body: Option<serde_json::Value>,
    ) -> CallToolResult {
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        match self.call(ctx, method, uri, "application/json", body).await {
            Ok((s, b)) => answer(s, b),
            Err(e) => e,
        }
    }
}

/// A REST answer as a tool result.
fn answer(status: u16, body: Vec<u8>) -> CallToolResult {
    let text = if body.is_empty() {
        format!("ok ({status})")
    } else {
        String::from_utf8_lossy(&body).into_owned()
    };
    if (200..300).contains(&status) {
        CallToolResult::success(vec![ContentBlock::text(text)])
    } else {
        err(text)
    }
}

type Out = Result<CallToolResult, ErrorData>;

#[tool_router]
impl Mcp {
    #[tool(description = "List your VMs with their state.")]
    async fn list_vms(&self, ctx: RequestContext<RoleServer>) -> Out {
        Ok(self.json(&ctx, Method::GET, "/v1/vms", None).await)
    }

    #[tool(
        description = "Create a VM and wait until it runs (or failed). Options as for `create` in docs/tree.md, e.g. {\"image\": \"debian:12\", \"memory\": 512}."
    )]
    async fn create_vm(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<CreateVm>,
    ) -> Out {
        let body = serde_json::json!({"name": a.name, "options": a.options});
        Ok(self.json(&ctx, Method::POST, "/v1/vms", Some(body)).await)
    }

    #[tool(description = "A VM's information and state.")]
    async fn vm_info(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<VmName>,
    ) -> Out {
        Ok(self
            .json(&ctx, Method::GET, &vm_uri(&a.name, ""), None)
            .await)
    }

    #[tool(description = "Destroy a VM (stops it and removes its disk, runs and state).")]
    async fn delete_vm(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<VmName>,
    ) -> Out {
        Ok(self
            .json(&ctx, Method::DELETE, &vm_uri(&a.name, ""), None)
            .await)
    }

    #[tool(
        description = "Run a command in a VM and wait for it: returns exit_code, stdout and stderr (base64 with encoding=base64 when not UTF-8)."
    )]
    async fn exec(&self, ctx: RequestContext<RoleServer>, Parameters(a): Parameters<Exec>) -> Out {
        let body = serde_json::json!({"command": a.command, "timeout": a.timeout, "env": a.env,
            "cwd": a.cwd, "user": a.user, "stdin": a.stdin});
        Ok(self
            .json(&ctx, Method::POST, &vm_uri(&a.vm, "/exec"), Some(body))
            .await)
    }

    #[tool(
        description = "Read a file in a VM (text; base64 prefixed `base64:` when not UTF-8; at most 4 MiB)."
    )]
    async fn read_file(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<FilePath>,
    ) -> Out {
        let uri = fs_uri(&a.vm, &a.path);
        Ok(
            match self
                .call(
                    &ctx,
                    Method::GET,
                    &uri,
                    "application/octet-stream",
                    Vec::new(),
                )
                .await
            {
                Ok((s, b)) if !(200..300).contains(&s) => answer(s, b),
                Ok((_, b)) if b.len() > READ_CAP => err(format!(
                "the file is larger than {READ_CAP} bytes; read it through the REST API ({uri})"
            )),
                Ok((s, b)) => match String::from_utf8(b) {
                    Ok(t) => answer(s, t.into_bytes()),
                    Err(e) => {
                        use base64::Engine;
                        let t = base64::engine::general_purpose::STANDARD.encode(e.into_bytes());
                        answer(s, format!("base64:{t}").into_bytes())
                    }
                },
                Err(e) => e,
            },
        )
    }

    #[tool(
        description = "Write a file in a VM (created or replaced whole; the old file stays until the new one is complete)."
    )]
    async fn write_file(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<WriteFile>,
    ) -> Out {
        let data = match a.encoding.as_deref() {
            None | Some("utf-8") | Some("utf8") => a.content.into_bytes(),
            Some("base64") => {
                use base64::Engine;
                match base64::engine::general_purpose::STANDARD.decode(a.content.as_bytes()) {
                    Ok(d) => d,
                    Err(e) => return Ok(err(format!("content is not base64: {e}"))),
                }
            }
            Some(other) => return Ok(err(format!("encoding {other:?}: utf-8 or base64"))),
        };
        let uri = fs_uri(&a.vm, &a.path);
        Ok(
            match self
                .call(&ctx, Method::PUT, &uri, "application/octet-stream", data)
                .await
            {
                Ok((s, b)) => answer(s, b),
                Err(e) => e,
            },
        )
    }

    #[tool(description = "List a directory in a VM (names, kinds, sizes, modes).")]
    async fn list_files(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<FilePath>,
    ) -> Out {
        let p = a.path.trim_start_matches('/').trim_end_matches('/');
        // A directory's listing: its path with a trailing `/` (the root: `fs/`).
        let uri = fs_uri(&a.vm, p) + if p.is_empty() { "" } else { "/" };
        Ok(self.json(&ctx, Method::GET, &uri, None).await)
    }

    #[tool(description = "Pause, resume, stop, start or restart a VM (a line for its ctl file).")]
    async fn vm_ctl(&self, ctx: RequestContext<RoleServer>, Parameters(a): Parameters<Ctl>) -> Out {
        let body = serde_json::json!({"command": a.command});
        Ok(self
            .json(&ctx, Method::POST, &vm_uri(&a.vm, "/ctl"), Some(body))
            .await)
    }

    #[tool(description = "Snapshot a VM (memory and disk; it keeps running).")]
    async fn snapshot(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<Snapshot>,
    ) -> Out {
        let body = serde_json::json!({"vm": a.vm, "name": a.name});
        Ok(self
            .json(&ctx, Method::POST, "/v1/snapshots", Some(body))
            .await)
    }

    #[tool(description = "List your snapshots.")]
    async fn list_snapshots(&self, ctx: RequestContext<RoleServer>) -> Out {
        Ok(self.json(&ctx, Method::GET, "/v1/snapshots", None).await)
    }

    #[tool(description = "Start new VMs from a snapshot, with its memory (clone).")]
    async fn clone_snapshot(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<Clone>,
    ) -> Out {
        let body = serde_json::json!({"name": a.name, "count": a.count});
        let uri = format!("/v1/snapshots/{}/clone", seg(&a.snapshot));
        Ok(self.json(&ctx, Method::POST, &uri, Some(body)).await)
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Mcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build()).with_instructions(
            "BandSox-FS: create microVMs, run commands and read and write their files. \
             Every call acts as your Unix user, with the same rules as the tree.",
        )
    }
}

/// The streamable HTTP service to mount at `/v1/mcp` (behind the API's layers).
pub fn service(
    api: Arc<Api>,
) -> rmcp::transport::streamable_http_server::StreamableHttpService<
    Mcp,
    rmcp::transport::streamable_http_server::session::local::LocalSessionManager,
> {
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService,
    };
    // The API's Origin layer already checks Host and Origin (and knows `--host` names).
    let config = StreamableHttpServerConfig::default().disable_allowed_hosts();
    let rest = crate::http::api::routes().with_state(api);
    StreamableHttpService::new(
        move || Ok(Mcp::new(rest.clone())),
        Default::default(),
        config,
    )
}
