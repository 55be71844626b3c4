//! A key for a WebSocket handshake, carried in `Sec-WebSocket-Protocol` (browsers cannot
//! set `Authorization` on a WebSocket, and a key in the URL would land in logs and
//! history). The client offers two protocols, [`PROTOCOL`] and `bandsox.key.<KEY>`;
//! the server selects [`PROTOCOL`] and never echoes the key.
//!
//! It is one more [`CredentialKind`] beside `Authorization: Bearer`, checked by the same
//! authentication layer, with the same 401 and failure rate limit.
use std::sync::Arc;

use axum::http::header::SEC_WEBSOCKET_PROTOCOL;
use axum::http::HeaderMap;

use super::auth::{CredentialKind, Principal, Verdict, Via};
use super::keys::KeyStore;

/// The subprotocol of the web terminal (docs/api.md, "Web terminal").
pub const PROTOCOL: &str = "bandsox.terminal.v1";
/// The prefix of the protocol that carries a key.
pub const KEY_PROTOCOL: &str = "bandsox.key.";

/// `Sec-WebSocket-Protocol: bandsox.terminal.v1, bandsox.key.<KEY>`.
pub struct ProtocolKeys(pub Arc<KeyStore>);

impl CredentialKind for ProtocolKeys {
    fn verify(&self, headers: &HeaderMap) -> Verdict {
        let token = headers
            .get_all(SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|p| p.trim().strip_prefix(KEY_PROTOCOL));
        let Some(token) = token else {
            return Verdict::Absent;
        };
        match self.0.verify(token) {
            Some((uid, name)) => Verdict::Valid(Principal::for_uid(uid, None, Via::Key(name))),
            None => Verdict::Invalid,
        }
    }
}
