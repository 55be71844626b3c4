//! The HTTP adapter: the REST API under `/v1` (docs/api.md), a second thin adapter over
//! the same core the FUSE adapter calls (the manager, [`crate::vfs`] and
//! [`crate::guestfs`]).
//!
//! Shape (docs/architecture.md, "Two adapters"):
//! - `bandsox serve` ([`front`]) owns the listening sockets and hands every accepted
//!   connection to the daemon ([`handoff`]); the daemon serves it ([`conn`]) with the
//!   router built here. While the daemon is away, `serve` answers 503 itself.
//! - Cross-cutting rules are tower layers applied once, outermost first: tracing, the
//!   Origin/Host check ([`origin`], 403), body frame timeouts, the JSON body cap, then
//!   authentication ([`auth`]: the Unix peer's uid, or a key over TCP; 401/429) on every
//!   route but the OpenAPI document.
//! - Handlers ([`api`]) are one core call and a conversion. Every request acts as one
//!   Unix user ([`auth::Principal`]); ownership, limits, quotas and event privacy are
//!   the tree's own, and errors are the tree's errno and message with the status from
//!   the one table in [`crate::error::http_status`] ([`error`]).
//!
//! Invariants: another user's VM, snapshot or run is answered exactly like a missing
//! one (404); nothing a client sends is buffered beyond a documented cap (JSON bodies
//! [`JSON_CAP`], request heads [`conn::MAX_HEAD`]; uploads and stdin stream through);
//! long core operations run in tasks of their own, so a client that goes away does not
//! cut a boot, a deletion or an upload's rename in half.
pub mod api;
pub mod auth;
pub mod client;
pub mod conn;
pub mod error;
pub mod front;
pub mod handoff;
pub mod keys;
pub mod openapi;
pub mod origin;
pub mod perclient;
pub mod ratelimit;
pub mod terminal;
pub mod tls;
pub mod unavailable;
pub mod wsauth;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::middleware::{from_fn, from_fn_with_state};
use axum::Router;
use tokio::sync::Semaphore;
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::guestfs::GuestFs;
use crate::manager::Manager;
use crate::vfs::Vfs;

/// Largest JSON request body.
pub const JSON_CAP: usize = 1024 * 1024;
/// Longest pause between two frames of a request body (slow uploads are fine; stalled
/// ones are cut).
pub const BODY_FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything handlers need: the core, the keys, the limits of the adapter.
pub struct Api {
    pub mgr: Arc<Manager>,
    pub vfs: Arc<Vfs>,
    pub guest: Arc<GuestFs>,
    pub keys: Arc<keys::KeyStore>,
    /// The kinds of credential accepted over TCP (see [`auth`]).
    pub credentials: Arc<Vec<Arc<dyn auth::CredentialKind>>>,
    pub failures: ratelimit::FailureLimiter,
    /// This host's name in a multi-host deployment (docs/scale-out.md).
    pub node: String,
    pub connections: Arc<Semaphore>,
    /// Connections per user (socket) or address (TCP).
    pub per_client: perclient::PerClient,
    pub tls: tls::Acceptors,
    /// Largest file upload (`PUT .../fs/...`).
    pub upload_cap: u64,
    router: std::sync::OnceLock<Router>,
    openapi: std::sync::OnceLock<String>,
}

/// The node name: `configured` (`BANDSOX_NODE`, see `settings`), else the host name.
pub fn node_name(configured: Option<&str>) -> String {
    configured
        .map(str::to_owned)
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
        })
        .unwrap_or_else(|| "localhost".into())
}

/// Default cap of one file upload (16 GiB): bigger than any guest disk we make.
pub const UPLOAD_CAP: u64 = 16 * 1024 * 1024 * 1024;

impl Api {
    pub fn new(
        mgr: Arc<Manager>,
        vfs: Arc<Vfs>,
        guest: Arc<GuestFs>,
    ) -> crate::error::Result<Arc<Api>> {
        let keys = Arc::new(keys::KeyStore::open(mgr.layout.root())?);
        let bearer: Arc<dyn auth::CredentialKind> = Arc::new(auth::BearerKeys(keys.clone()));
        let node = node_name(mgr.settings.node.as_deref());
        let ws: Arc<dyn auth::CredentialKind> = Arc::new(wsauth::ProtocolKeys(keys.clone()));
        Ok(Arc::new(Api {
            mgr,
            vfs,
            guest,
            keys,
            credentials: Arc::new(vec![bearer, ws]),
            failures: Default::default(),
            node,
            connections: Arc::new(Semaphore::new(conn::MAX_CONNECTIONS)),
            per_client: Default::default(),
            tls: Default::default(),
            upload_cap: UPLOAD_CAP,
            router: Default::default(),
            openapi: Default::default(),
        }))
    }

    /// The router (built once).
    pub fn router(self: &Arc<Self>) -> Router {
        self.router
            .get_or_init(|| build_router(self.clone()))
            .clone()
    }

    /// The OpenAPI document as served.
    pub fn openapi_json(&self) -> &str {
        self.openapi.get_or_init(openapi::json)
    }
}

fn build_router(api: Arc<Api>) -> Router {
    let protected = api::routes()
        .nest_service("/v1/mcp", crate::mcp::service(api.clone()))
        .route_layer(from_fn_with_state(api.clone(), auth::authenticate))
        .with_state(api.clone());
    let public = Router::new()
        .route("/v1/openapi.json", axum::routing::get(openapi::serve))
        .with_state(api.clone());
    public
        .merge(protected)
        .fallback(api::not_found)
        .layer(DefaultBodyLimit::max(JSON_CAP))
        .layer(RequestBodyTimeoutLayer::new(BODY_FRAME_TIMEOUT))
        .layer(from_fn(origin::same_origin))
        .layer(tower_http::trace::TraceLayer::new_for_http())
}

/// Start serving the connections `bandsox serve` hands over, on a root-only socket in
/// the state directory. Call within the runtime.
pub fn start(api: Arc<Api>, state_dir: &Path) -> crate::error::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = handoff::socket_path(state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let me = nix::unistd::geteuid().as_raw();
    tracing::info!(
        "http: taking connections from bandsox serve at {}",
        path.display()
    );
    tokio::spawn(async move {
        loop {
            let (mut s, _) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("http: hand-off accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if s.peer_cred().map(|c| c.uid()).ok() != Some(me) {
                tracing::warn!("http: a hand-off from another user was refused");
                continue;
            }
            let api = api.clone();
            tokio::spawn(async move {
                match handoff::receive(&mut s).await {
                    Ok((header, fd)) => {
                        drop(s);
                        conn::serve_handed(api, header, fd).await
                    }
                    Err(e) => tracing::warn!("http: hand-off: {e}"),
                }
            });
        }
    });
    Ok(())
}
