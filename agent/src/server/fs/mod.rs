//! The file service (see [`crate::proto::fs`]). Placeholder: every request fails with
//! `ENOSYS` until the service is implemented.
use std::sync::Arc;

use crate::proto::fs::{FsRequest, NodeId};
use crate::proto::{Id, Message, Response};
use crate::server::{Agent, Out, OutTx};

/// Run one file request off the session reader; the answer goes to `out`.
pub(crate) fn spawn_request(_agent: &Arc<Agent>, id: Id, _req: FsRequest, out: OutTx) {
    tokio::spawn(async move {
        let resp = Response::Error {
            errno: libc::ENOSYS,
            message: "file service not implemented".into(),
        };
        let _ = out.send(Out::Msg(Message::Response { id, resp })).await;
    });
}

/// Drop node references.
pub(crate) fn forget(_agent: &Arc<Agent>, _nodes: &[(NodeId, u64)]) {}
