//! `bandsox serve`: the small front process that owns the API's listening sockets and
//! hands every accepted connection to the daemon ([`super::handoff`]).
//!
//! - The Unix socket (default [`DEFAULT_SOCKET`], mode 0666: every local user may
//!   connect; the daemon reads who they are from the connection) and optionally a TCP
//!   listener (`--listen ADDR:PORT`; every request needs a key there).
//! - TCP binds to loopback unless TLS is configured (`--tls-cert/--tls-key`) or
//!   `--insecure-public` says otherwise: keys travel in every request, and on an open
//!   network without TLS anyone on the path could read and replay them.
//! - While the daemon is down or restarting (its hand-off socket refuses, or does not
//!   acknowledge in time), `serve` answers the connection itself: 503 with a JSON error
//!   body and `Retry-After`, so clients get a clear, retryable error; the next
//!   connection goes to the daemon again as soon as it is back.
//!
//! Invariant: `serve` never parses a request it hands over, and holds no state a client
//! could grow (each connection is either handed over at once or answered 503 and
//! closed).
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use super::handoff::{self, Header, Listener, TlsFiles};

/// The Unix socket's default path.
pub const DEFAULT_SOCKET: &str = "/run/bandsox/api.sock";

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub socket: PathBuf,
    pub listen: Option<SocketAddr>,
    pub tls: Option<TlsFiles>,
    pub insecure_public: bool,
    pub state_dir: PathBuf,
    /// Extra host names requests may name (besides loopback and the listen address).
    pub hosts: Vec<String>,
}

/// Refuse a non-loopback TCP address without TLS unless explicitly allowed.
pub fn check_listen(opts: &ServeOptions) -> Result<(), String> {
    if let Some(addr) = opts.listen {
        if !addr.ip().is_loopback() && opts.tls.is_none() && !opts.insecure_public {
            return Err(format!(
                "--listen {addr} is not a loopback address: keys would cross the network in \
                 clear text. Configure TLS (--tls-cert F --tls-key F), or pass \
                 --insecure-public if a trusted network or a proxy protects it"
            ));
        }
    }
    Ok(())
}

fn bind_unix(path: &std::path::Path) -> Result<tokio::net::UnixListener, String> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    // A socket left by an earlier `serve` (nothing listens on it any more).
    if std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    let l = tokio::net::UnixListener::bind(path).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(l)
}

/// Hand `stream` to the daemon, or answer it 503 when the daemon cannot take it.
async fn pass_on<S>(
    stream: S,
    header: Arc<Header>,
    handoff: Arc<PathBuf>,
    tls: Option<Arc<super::tls::Acceptors>>,
) where
    S: AsRawFd + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match handoff::send(&handoff, &header, stream.as_raw_fd()).await {
        // The daemon has its own copy now; ours closes here.
        Ok(()) => {}
        Err(e) => {
            tracing::info!("the daemon did not take a connection ({e}); answering 503");
            let msg = "the daemon is not running or is restarting; retry shortly";
            match (&header.tls, tls) {
                (Some(f), Some(acc)) => {
                    if let Ok(a) = acc.get(&f.cert, &f.key) {
                        if let Ok(Ok(t)) =
                            tokio::time::timeout(super::conn::HEAD_TIMEOUT, a.accept(stream)).await
                        {
                            super::unavailable::serve(t, msg).await;
                        }
                    }
                }
                _ => super::unavailable::serve(stream, msg).await,
            }
        }
    }
}

/// Run `bandsox serve` until SIGTERM/SIGINT.
pub fn run(opts: ServeOptions) -> Result<(), String> {
    check_listen(&opts)?;
    if let Some(t) = &opts.tls {
        // Fail now, not at the first client.
        super::tls::server_config(&t.cert, &t.key).map_err(|e| e.to_string())?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("bandsox-serve")
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(async move {
        let handoff = Arc::new(handoff::socket_path(&opts.state_dir));
        let unix = bind_unix(&opts.socket)?;
        tracing::info!("serving the API on {}", opts.socket.display());
        let unix_header = Arc::new(Header {
            listener: Listener::Unix,
            tls: None,
            hosts: Vec::new(),
        });
        {
            let (h, hdr) = (handoff.clone(), unix_header.clone());
            tokio::spawn(async move {
                loop {
                    match unix.accept().await {
                        Ok((s, _)) => {
                            tokio::spawn(pass_on(s, hdr.clone(), h.clone(), None));
                        }
                        Err(e) => {
                            tracing::warn!("accept (unix): {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
        if let Some(addr) = opts.listen {
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("--listen {addr}: {e}"))?;
            tracing::info!(
                "serving the API on {}{}",
                tcp.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                if opts.tls.is_some() { " (TLS)" } else { "" }
            );
            let header = Arc::new(Header {
                listener: Listener::Tcp,
                tls: opts.tls.clone(),
                hosts: opts.hosts.clone(),
            });
            let acceptors = Arc::new(super::tls::Acceptors::default());
            let h = handoff.clone();
            tokio::spawn(async move {
                loop {
                    match tcp.accept().await {
                        Ok((s, _)) => {
                            let _ = s.set_nodelay(true);
                            tokio::spawn(pass_on(
                                s,
                                header.clone(),
                                h.clone(),
                                Some(acceptors.clone()),
                            ));
                        }
                        Err(e) => {
                            tracing::warn!("accept (tcp): {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        }
        use tokio::signal::unix::{signal, SignalKind};
        let (mut term, mut int) = (
            signal(SignalKind::terminate()).map_err(|e| e.to_string())?,
            signal(SignalKind::interrupt()).map_err(|e| e.to_string())?,
        );
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        let _ = std::fs::remove_file(&opts.socket);
        Ok::<(), String>(())
    })?;
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(listen: &str, tls: bool, insecure: bool) -> ServeOptions {
        ServeOptions {
            socket: "/nonexistent/api.sock".into(),
            listen: Some(listen.parse().unwrap()),
            tls: tls.then(|| TlsFiles {
                cert: "c".into(),
                key: "k".into(),
            }),
            insecure_public: insecure,
            state_dir: "/nonexistent".into(),
            hosts: vec![],
        }
    }

    #[test]
    fn public_addresses_need_tls_or_consent() {
        assert!(check_listen(&opts("127.0.0.1:8080", false, false)).is_ok());
        assert!(check_listen(&opts("[::1]:8080", false, false)).is_ok());
        assert!(check_listen(&opts("0.0.0.0:8080", false, false)).is_err());
        assert!(check_listen(&opts("0.0.0.0:8080", true, false)).is_ok());
        assert!(check_listen(&opts("0.0.0.0:8080", false, true)).is_ok());
    }
}
