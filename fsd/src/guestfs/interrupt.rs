//! Ctrl-C for `fs/` requests.
//!
//! A request to a guest that does not answer (agent stopped, guest hung) would hold the
//! caller until its deadline (20 s), through SIGINT and even SIGKILL, because the kernel
//! waits for our answer. So every request that has not been answered within
//! [`crate::interrupt::POLL`] is handed to a task of its own, and the caller's process
//! (the pid of the FUSE request, carried in the [`CALLER`] task-local) is watched for a
//! pending SIGINT, SIGTERM, SIGHUP, SIGQUIT or SIGKILL ([`crate::interrupt`]); then the
//! caller gets `EINTR` at once.
//!
//! Invariant: an abandoned request still completes, and whatever its answer handed us
//! (node references, open handles) is given back to the agent, so an interrupted
//! `lookup` or `open` leaks nothing in the guest.
use std::time::Duration;

use bandsox_agent::client::{AgentClient, ClientError};
use bandsox_agent::proto::fs::{FsRequest, FsResponse};

use crate::error::{Error, Result};

tokio::task_local! {
    /// The pid of the process whose FUSE request this task answers (0: unknown).
    pub static CALLER: u32;
}

/// The caller's pid, when the current task answers a FUSE request.
pub fn caller() -> u32 {
    CALLER.try_with(|p| *p).unwrap_or(0)
}

/// `client.fs(req, deadline)`, answering `EINTR` when the caller is interrupted.
pub async fn fs(
    client: &AgentClient,
    req: FsRequest,
    deadline: Duration,
) -> Result<std::result::Result<FsResponse, ClientError>> {
    let pid = caller();
    let is_dir = matches!(req, FsRequest::OpenDir { .. });
    let c = client.clone();
    let mut fut = Box::pin(async move { c.fs(req, deadline).await });
    if pid == 0 {
        return Ok(fut.await);
    }
    // Most answers come within microseconds: no task, no watching.
    tokio::select! {
        out = &mut fut => return Ok(out),
        _ = tokio::time::sleep(crate::interrupt::POLL) => {}
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let c = client.clone();
    tokio::spawn(async move {
        let out = fut.await;
        if let Err(Ok(resp)) = tx.send(out) {
            give_back(&c, resp, is_dir).await;
        }
    });
    crate::interrupt::interruptible(pid, async {
        rx.await
            .map_err(|_| Error::io("the file request task ended without an answer"))
    })
    .await
}

/// Return to the agent what an answer nobody will see handed us.
async fn give_back(client: &AgentClient, resp: FsResponse, is_dir: bool) {
    let release = |handle| {
        if is_dir {
            FsRequest::ReleaseDir { handle }
        } else {
            FsRequest::Release { handle }
        }
    };
    match resp {
        FsResponse::Entry(e) => {
            let _ = client.forget(vec![(e.node, 1)]).await;
        }
        FsResponse::Created { entry, handle } => {
            let _ = client.forget(vec![(entry.node, 1)]).await;
            let _ = client
                .fs(FsRequest::Release { handle }, super::FS_DEADLINE)
                .await;
        }
        FsResponse::Opened { handle } => {
            let _ = client.fs(release(handle), super::FS_DEADLINE).await;
        }
        FsResponse::DirEntries(entries) => {
            let nodes: Vec<_> = entries
                .iter()
                .filter_map(|d| d.entry.as_ref().map(|e| (e.node, 1)))
                .collect();
            let _ = client.forget(nodes).await;
        }
        _ => {}
    }
}
