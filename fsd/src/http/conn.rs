//! One HTTP connection in the daemon: a descriptor handed over by `bandsox serve`,
//! served with hyper's HTTP/1.1 server and the API router, every request tagged with
//! where it came from ([`Conn`]).
//!
//! Invariants (slow and hostile clients):
//! - a request head must arrive within [`HEAD_TIMEOUT`] and fit in [`MAX_HEAD`] bytes
//!   (slowloris, huge headers); body frames must keep coming ([`super::BODY_FRAME_TIMEOUT`]);
//! - at most [`MAX_CONNECTIONS`] connections are served at once, and at most
//!   [`super::perclient::MAX_PER_CLIENT`] per Unix user or TCP address; beyond that a connection is
//!   answered 503 and closed, so memory stays bounded whatever the number of clients
//!   and one client cannot lock the others out;
//! - a TLS handshake has the same deadline as a request head.
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tower::ServiceExt;

use super::handoff::{Header, Listener};
use super::perclient::Client;
use super::Api;

/// Time allowed for a request's head (and for a TLS handshake).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;

/// The answer to a client over [`super::perclient::MAX_PER_CLIENT`].
const PER_CLIENT_FULL: &str = "too many connections from this user or address; retry shortly";

/// Where a connection came from.
#[derive(Debug, Clone)]
pub enum Peer {
    /// The Unix socket; the peer's credentials (`SO_PEERCRED`).
    Unix { uid: u32, gid: u32, pid: u32 },
    /// TCP (TLS or not): the client's address.
    Tcp { addr: SocketAddr },
}

/// What every request of a connection carries (a request extension).
#[derive(Debug, Clone)]
pub struct Conn {
    pub peer: Peer,
    /// Host names requests may name (TCP; see `origin`).
    pub hosts: Arc<Vec<String>>,
    pub tls: bool,
}

/// Serve HTTP/1.1 on `io` with `router`, tagging requests with `conn`.
pub async fn serve_io<I>(io: I, router: Router, conn: Conn)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(conn.clone());
        router.clone().oneshot(req)
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades()
        .await;
    if let Err(e) = served {
        tracing::debug!("http connection ended: {e}");
    }
}

/// Loopback names, and the address the connection arrived on.
fn default_hosts(local: Option<SocketAddr>, extra: &[String]) -> Vec<String> {
    let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if let Some(a) = local {
        hosts.push(a.ip().to_string());
    }
    hosts.extend(extra.iter().map(|h| h.to_ascii_lowercase()));
    hosts
}

/// Daemon side: serve one connection handed over by the front process.
pub async fn serve_handed(api: Arc<Api>, header: Header, fd: OwnedFd) {
    let Ok(permit) = api.connections.clone().try_acquire_owned() else {
        tracing::warn!("http: {MAX_CONNECTIONS} connections already; answering 503");
        serve_unavailable(header, fd, &api).await;
        return;
    };
    let router = api.router();
    match header.listener {
        Listener::Unix => {
            let std = std::os::unix::net::UnixStream::from(fd);
            let Ok(stream) = std
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixStream::from_std(std))
            else {
                return;
            };
            let Ok(cred) = stream.peer_cred() else {
                tracing::warn!("http: no peer credentials on a Unix connection");
                return;
            };
            let Some(_slot) = api.per_client.acquire(Client::Uid(cred.uid())) else {
                super::unavailable::serve(stream, PER_CLIENT_FULL).await;
                return;
            };
            let conn = Conn {
                peer: Peer::Unix {
                    uid: cred.uid(),
                    gid: cred.gid(),
                    pid: cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
                },
                hosts: Arc::new(Vec::new()),
                tls: false,
            };
            serve_io(stream, router, conn).await;
        }
        Listener::Tcp => {
            let std = std::net::TcpStream::from(fd);
            let Ok(stream) = std
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(std))
            else {
                return;
            };
            let Ok(addr) = stream.peer_addr() else { return };
            // Counted before the TLS handshake: half-open handshakes count too.
            let Some(_slot) = api.per_client.acquire(Client::Addr(addr.ip())) else {
                if header.tls.is_none() {
                    super::unavailable::serve(stream, PER_CLIENT_FULL).await;
                }
                return;
            };
            let _ = stream.set_nodelay(true);
            let conn = Conn {
                peer: Peer::Tcp { addr },
                hosts: Arc::new(default_hosts(stream.local_addr().ok(), &header.hosts)),
                tls: header.tls.is_some(),
            };
            match &header.tls {
                None => serve_io(stream, router, conn).await,
                Some(files) => {
                    let acceptor = match api.tls.get(&files.cert, &files.key) {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!("http: TLS: {e}");
                            return;
                        }
                    };
                    match tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => serve_io(tls, router, conn).await,
                        _ => tracing::debug!(%addr, "http: TLS handshake failed or timed out"),
                    }
                }
            }
        }
    }
    drop(permit);
}

/// Answer a connection 503 (the daemon is full).
async fn serve_unavailable(header: Header, fd: OwnedFd, api: &Api) {
    let msg = "the server has too many connections; retry shortly";
    match header.listener {
        Listener::Unix => {
            let std = std::os::unix::net::UnixStream::from(fd);
            if let Ok(s) = std
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixStream::from_std(std))
            {
                super::unavailable::serve(s, msg).await;
            }
        }
        Listener::Tcp => {
            let std = std::net::TcpStream::from(fd);
            let Ok(s) = std
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(std))
            else {
                return;
            };
            match &header.tls {
                None => super::unavailable::serve(s, msg).await,
                Some(f) => {
                    if let Ok(a) = api.tls.get(&f.cert, &f.key) {
                        if let Ok(Ok(t)) = tokio::time::timeout(HEAD_TIMEOUT, a.accept(s)).await {
                            super::unavailable::serve(t, msg).await;
                        }
                    }
                }
            }
        }
    }
}
