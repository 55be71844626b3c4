//! Host side of Firecracker's hybrid vsock: reach a guest vsock port through the VM's
//! vsock unix socket (`uds_path`).
//!
//! Handshake (Firecracker `docs/vsock.md`): connect to `uds_path`, send
//! `CONNECT <port>\n`; Firecracker forwards the connection to the guest port and answers
//! `OK <host-side port>\n`, or closes the connection when nobody listens there.
//!
//! Invariants:
//! - The answer is read one byte at a time and at most [`MAX_ANSWER_LINE`] bytes, so no
//!   byte after the `OK` line is consumed: the stream handed on starts exactly at the
//!   guest's first byte.
//! - Anything but `OK <digits>\n` is an error; an EOF before the line (guest not
//!   listening yet), a missing socket and a refused connection are *retryable* and
//!   [`connect`] retries them until its deadline. Every attempt has its own deadline.
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;

/// The agent's vsock port in the guest.
pub const AGENT_PORT: u32 = 52;
/// Longest acceptable answer line (`OK 4294967295\n` is 14 bytes).
pub const MAX_ANSWER_LINE: usize = 32;
/// Deadline of one connect + handshake attempt.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(25);

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The socket is missing or refuses (Firecracker not listening yet).
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Firecracker closed the connection without `OK` (nobody listens on the port yet).
    #[error("no listener on guest vsock port {port} (connection closed before OK)")]
    NoListener { port: u32 },
    /// Something other than `OK <port>\n` came back.
    #[error("bad vsock handshake answer {answer:?} (expected \"OK <port>\")")]
    BadAnswer { answer: String },
    #[error("vsock I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("vsock handshake with port {port} timed out after {timeout:?}")]
    Timeout { port: u32, timeout: Duration },
}

impl VsockError {
    /// Worth another attempt: the guest or Firecracker may just not be ready yet.
    pub fn is_retryable(&self) -> bool {
        match self {
            VsockError::Connect { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ),
            VsockError::NoListener { .. } | VsockError::Timeout { .. } => true,
            VsockError::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            VsockError::BadAnswer { .. } => false,
        }
    }
}

/// One attempt: connect, handshake, return the stream positioned after the `OK` line
/// and the host-side port Firecracker assigned.
pub async fn connect_once(
    uds_path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<(UnixStream, u32), VsockError> {
    match tokio::time::timeout(timeout, handshake(uds_path, port)).await {
        Ok(r) => r,
        Err(_) => Err(VsockError::Timeout { port, timeout }),
    }
}

async fn handshake(uds_path: &Path, port: u32) -> Result<(UnixStream, u32), VsockError> {
    let mut s = UnixStream::connect(uds_path)
        .await
        .map_err(|source| VsockError::Connect {
            path: uds_path.display().to_string(),
            source,
        })?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    let mut line = Vec::with_capacity(MAX_ANSWER_LINE);
    loop {
        let mut b = [0u8; 1];
        let n = match s.read(&mut b).await {
            Ok(n) => n,
            // Firecracker resets the connection when the guest refuses it.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            if line.is_empty() {
                return Err(VsockError::NoListener { port });
            }
            return Err(VsockError::BadAnswer {
                answer: String::from_utf8_lossy(&line).into_owned(),
            });
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() >= MAX_ANSWER_LINE {
            return Err(VsockError::BadAnswer {
                answer: String::from_utf8_lossy(&line).into_owned(),
            });
        }
    }
    let text = std::str::from_utf8(&line).map_err(|_| VsockError::BadAnswer {
        answer: String::from_utf8_lossy(&line).into_owned(),
    })?;
    let host_port = text
        .strip_prefix("OK ")
        .filter(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
        .and_then(|p| p.parse::<u32>().ok())
        .ok_or_else(|| VsockError::BadAnswer {
            answer: text.to_string(),
        })?;
    Ok((s, host_port))
}

/// How long [`connect_agent`] keeps trying while the guest is not listening yet; callers
/// (the manager's reconnect loop) retry beyond that.
pub const AGENT_CONNECT_WINDOW: Duration = Duration::from_millis(1500);

/// A fresh stream to the agent's port through the hybrid-vsock socket `uds_path`, for a
/// VMM's `connect_agent`: retries for [`AGENT_CONNECT_WINDOW`] while `keep_trying()`;
/// `NotRunning` if the VMM is gone (`alive()` false) by then, else the error, for `what`.
pub(crate) async fn connect_agent(
    uds_path: &Path,
    keep_trying: impl Fn() -> bool,
    alive: impl Fn() -> bool,
    what: &str,
) -> Result<crate::vmm::BoxedAgentStream, crate::vmm::VmmError> {
    use crate::vmm::VmmError;
    let deadline = Instant::now() + AGENT_CONNECT_WINDOW;
    match connect(uds_path, AGENT_PORT, deadline, keep_trying).await {
        Ok(s) => Ok(Box::pin(s)),
        Err(_) if !alive() => Err(VmmError::NotRunning),
        Err(e) => Err(VmmError::Io(
            format!("connect to the agent over {what}"),
            std::io::Error::other(e.to_string()),
        )),
    }
}

/// Connect to guest `port`, retrying retryable failures until `deadline`; the last
/// error is returned when it passes. `keep_trying` is asked before every retry (e.g.
/// "is the VMM still alive?"); returning false ends the loop with the last error.
pub async fn connect(
    uds_path: &Path,
    port: u32,
    deadline: Instant,
    keep_trying: impl Fn() -> bool,
) -> Result<UnixStream, VsockError> {
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let err = match connect_once(uds_path, port, left.min(ATTEMPT_TIMEOUT)).await {
            Ok((s, host_port)) => {
                tracing::debug!(path = %uds_path.display(), port, host_port, attempts, "vsock connected");
                return Ok(s);
            }
            Err(e) => e,
        };
        if !err.is_retryable() || Instant::now() + RETRY_PAUSE >= deadline || !keep_trying() {
            return Err(err);
        }
        tracing::trace!(port, attempts, "vsock not ready: {err}");
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    /// A Firecracker-like vsock peer: answers `CONNECT <port>\n` with `answer` (then
    /// echoes everything), or closes when `answer` is None.
    pub fn peer(
        listener: UnixListener,
        answer: Option<&'static [u8]>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut r = tokio::io::BufReader::new(s);
                    let mut line = String::new();
                    if r.read_line(&mut line).await.is_err() || line != "CONNECT 52\n" {
                        return;
                    }
                    let Some(answer) = answer else {
                        return;
                    };
                    let mut s = r.into_inner();
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        })
    }

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[tokio::test]
    async fn handshake_and_no_byte_lost() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.sock");
        // The greeting arrives in the same write as the OK line.
        let t = peer(
            UnixListener::bind(&p).unwrap(),
            Some(b"OK 1073741824\nHELLO"),
        );
        let (mut s, host_port) = connect_once(&p, AGENT_PORT, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(host_port, 1_073_741_824);
        let mut hello = [0u8; 5];
        s.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"HELLO");
        s.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        s.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
        t.abort();
    }

    #[tokio::test]
    async fn retries_until_the_listener_appears() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.sock");
        // Missing socket, then a socket that refuses, then a real peer.
        let p2 = p.clone();
        let t = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(std::os::unix::net::UnixListener::bind(&p2).unwrap());
            tokio::time::sleep(Duration::from_millis(100)).await;
            std::fs::remove_file(&p2).unwrap();
            // Keep the peer's handle out of the future's output (clippy: no awaitable
            // results from async blocks); it is aborted with the runtime.
            let peer = peer(UnixListener::bind(&p2).unwrap(), Some(b"OK 5\n"));
            drop(peer);
        });
        let t0 = std::time::Instant::now();
        let mut s = connect(&p, AGENT_PORT, soon(5000), || true).await.unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(190),
            "{:?}",
            t0.elapsed()
        );
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"x");
        t.await.unwrap();

        // Nobody ever listens: the deadline ends it with the retryable error.
        let none = dir.path().join("none.sock");
        let t0 = std::time::Instant::now();
        let err = connect(&none, AGENT_PORT, soon(300), || true)
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(2));
        // keep_trying=false stops at once.
        let t0 = std::time::Instant::now();
        connect(&none, AGENT_PORT, soon(5000), || false)
            .await
            .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn guest_not_listening_is_retryable_then_works() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.sock");
        let t = peer(UnixListener::bind(&p).unwrap(), None);
        let err = connect_once(&p, AGENT_PORT, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, VsockError::NoListener { port: 52 }), "{err}");
        assert!(err.is_retryable());
        t.abort();
        std::fs::remove_file(&p).unwrap();
        // Reconnect after the peer dropped: a fresh connection works.
        let t = peer(UnixListener::bind(&p).unwrap(), Some(b"OK 9\n"));
        connect(&p, AGENT_PORT, soon(2000), || true).await.unwrap();
        t.abort();
    }

    #[tokio::test]
    async fn garbage_answers_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        for (i, answer) in [
            &b"NOPE\n"[..],
            b"OK\n",
            b"OK abc\n",
            b"OK 99999999999\n",
            b"OK 1 2\n",
            b"OK 12345678901234567890123456789012345\n",
            b"\xff\xfe\n",
        ]
        .into_iter()
        .enumerate()
        {
            let p = dir.path().join(format!("g{i}.sock"));
            let leaked: &'static [u8] = Box::leak(answer.to_vec().into_boxed_slice());
            let t = peer(UnixListener::bind(&p).unwrap(), Some(leaked));
            let err = connect(&p, AGENT_PORT, soon(1000), || true)
                .await
                .unwrap_err();
            assert!(
                matches!(err, VsockError::BadAnswer { .. }),
                "{answer:?}: {err}"
            );
            assert!(!err.is_retryable());
            t.abort();
        }
        // An answer that never ends with a newline: bounded read, then error.
        let p = dir.path().join("long.sock");
        let t = peer(UnixListener::bind(&p).unwrap(), Some(&[b'O'; 4096]));
        let err = connect_once(&p, AGENT_PORT, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, VsockError::BadAnswer { .. }), "{err}");
        t.abort();
    }

    #[tokio::test]
    async fn peer_drops_after_ok() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.sock");
        let listener = UnixListener::bind(&p).unwrap();
        let t = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 11];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(b"OK 7\n").await.unwrap();
            drop(s);
        });
        let mut s = connect(&p, AGENT_PORT, soon(2000), || true).await.unwrap();
        let mut b = [0u8; 8];
        assert_eq!(s.read(&mut b).await.unwrap(), 0, "EOF after the OK line");
        t.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.sock");
        let listener = UnixListener::bind(&p).unwrap();
        let t = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(s);
        });
        let err = connect_once(&p, AGENT_PORT, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, VsockError::Timeout { .. }), "{err}");
        t.abort();
    }
}
