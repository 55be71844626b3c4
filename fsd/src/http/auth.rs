//! Who a request acts as: the tower layer (an axum middleware) that turns a connection
//! and its credentials into a [`Principal`], one Unix user.
//!
//! - Over the Unix socket the peer's uid and gid come from `SO_PEERCRED` on the
//!   connection (taken when the daemon received it); no key is needed or looked at.
//! - Over TCP every request needs a credential. Each [`CredentialKind`] looks at the
//!   request and says absent, valid (a principal) or invalid. Today there is one kind,
//!   `Authorization: Bearer <key>` ([`BearerKeys`]); the browser's session cookie is a
//!   second kind added beside it, not a change to this layer.
//! - No credential, or a wrong or revoked one: 401. A client (IP address) with too many
//!   failures is refused with 429 before anything is verified ([`super::ratelimit`]).
//!
//! Invariant: handlers never see a request without a [`Principal`]; they act as exactly
//! that user through the core (ownership, limits, event privacy are the tree's).
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::conn::{Conn, Peer};
use super::error::ApiError;
use super::keys::KeyStore;
use super::Api;
use crate::guestfs::calls::Who;
use crate::vfs::Caller;

/// How the caller proved who they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// The Unix socket (`SO_PEERCRED`).
    Socket,
    /// An API key, by name.
    Key(String),
}

/// The Unix user a request acts as.
#[derive(Debug, Clone)]
pub struct Principal {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (for permission checks in a guest's `fs/`).
    pub groups: Vec<u32>,
    pub via: Via,
}

/// Session ids of HTTP callers: above any pid (`pid_max` is at most 2^22), one per uid,
/// so a user's HTTP runs never become a shell session's `runs/last`.
const HTTP_SESSION: u32 = 0x8000_0000;

impl Principal {
    /// The principal for `uid`, with the primary group `gid` when known (the socket's
    /// peer credentials) or the user's own, and the user's supplementary groups.
    pub fn for_uid(uid: u32, gid: Option<u32>, via: Via) -> Principal {
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten();
        let gid = gid
            .or_else(|| user.as_ref().map(|u| u.gid.as_raw()))
            .unwrap_or(uid);
        let groups = user
            .and_then(|u| {
                let name = std::ffi::CString::new(u.name).ok()?;
                nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid)).ok()
            })
            .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default();
        Principal {
            uid,
            gid,
            groups,
            via,
        }
    }

    /// The caller as the core knows callers (no process to watch for signals: a client
    /// that goes away drops its request instead).
    pub fn caller(&self) -> Caller {
        Caller {
            pid: 0,
            uid: self.uid,
            gid: self.gid,
            session: HTTP_SESSION | (self.uid & 0x7fff_ffff),
        }
    }

    /// The identity for permission checks in a guest's `fs/`.
    pub fn who(&self) -> Who {
        Who {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }
}

/// What one kind of credential says about a request.
#[derive(Debug)]
pub enum Verdict {
    /// The request carries no credential of this kind.
    Absent,
    Valid(Principal),
    /// A credential of this kind that is wrong, expired or revoked.
    Invalid,
}

/// One way to prove who one is over TCP.
pub trait CredentialKind: Send + Sync {
    fn verify(&self, headers: &HeaderMap) -> Verdict;
}

/// `Authorization: Bearer <key>`.
pub struct BearerKeys(pub Arc<KeyStore>);

impl CredentialKind for BearerKeys {
    fn verify(&self, headers: &HeaderMap) -> Verdict {
        let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
            return Verdict::Absent;
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match token.and_then(|t| self.0.verify(t)) {
            Some((uid, name)) => Verdict::Valid(Principal::for_uid(uid, None, Via::Key(name))),
            None => Verdict::Invalid,
        }
    }
}

/// The layer: attach the [`Principal`] or answer 401/429.
pub async fn authenticate(State(api): State<Arc<Api>>, mut req: Request, next: Next) -> Response {
    let Some(conn) = req.extensions().get::<Conn>().cloned() else {
        return ApiError::unauthorized("no connection information").into_response();
    };
    let principal = match conn.peer {
        Peer::Unix { uid, gid, .. } => {
            let (uid, gid) = (uid, gid);
            match tokio::task::spawn_blocking(move || {
                Principal::for_uid(uid, Some(gid), Via::Socket)
            })
            .await
            {
                Ok(p) => p,
                Err(_) => {
                    return ApiError::unauthorized("cannot resolve the caller").into_response()
                }
            }
        }
        Peer::Tcp { addr } => {
            let client = addr.ip();
            if let Some(wait) = api.failures.blocked(client) {
                return ApiError::too_many(wait).into_response();
            }
            let headers = req.headers().clone();
            let kinds = api.credentials.clone();
            let verdicts = tokio::task::spawn_blocking(move || {
                kinds.iter().map(|k| k.verify(&headers)).collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            let mut invalid = false;
            let mut found = None;
            for v in verdicts {
                match v {
                    Verdict::Valid(p) => found = Some(p),
                    Verdict::Invalid => invalid = true,
                    Verdict::Absent => {}
                }
            }
            match (found, invalid) {
                (Some(p), false) => p,
                (_, true) => {
                    api.failures.failed(client);
                    tracing::info!(%client, "http: authentication failed");
                    return ApiError::unauthorized("the key is wrong or was revoked")
                        .into_response();
                }
                (None, false) => return ApiError::unauthorized(
                    "a key is needed over TCP: Authorization: Bearer <key> (bandsox keys add NAME)",
                )
                .into_response(),
            }
        }
    };
    req.extensions_mut().insert(principal);
    next.run(req).await
}
