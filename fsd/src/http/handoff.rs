//! The hand-off of accepted connections from `bandsox serve` (the front process that
//! owns the listening sockets) to the daemon, over a root-only Unix socket in the state
//! directory ([`SOCKET`]).
//!
//! One hand-off is one connection to that socket carrying one message: a `u32 LE`
//! length, then a JSON [`Header`] of at most [`MAX_HEADER`] bytes, with the accepted
//! connection's descriptor attached to the first byte (`SCM_RIGHTS`). The daemon answers
//! one byte, [`ACK`], once it owns the descriptor; without it (daemon down, restarting,
//! full) the front process answers the client itself (503, see `unavailable`).
//!
//! Invariants: the daemon accepts hand-offs only from its own uid (`SO_PEERCRED`), so no
//! other user can inject a connection with a forged listener kind; a message is read
//! with a deadline and a size cap; received descriptors are close-on-exec.
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

/// The socket's name under the state directory.
pub const SOCKET: &str = "api-handoff.sock";
/// Largest header accepted.
pub const MAX_HEADER: usize = 16 * 1024;
/// The daemon's answer once it owns the connection.
pub const ACK: u8 = b'K';
/// How long either side waits for the other.
pub const DEADLINE: Duration = Duration::from_secs(3);

/// Which listener a connection came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Listener {
    /// The Unix socket: the peer's credentials identify the caller.
    Unix,
    /// TCP: every request needs a key.
    Tcp,
}

/// The certificate and key of a TLS listener (the daemon terminates TLS on the
/// connection it receives, reading these root-owned files itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What comes with a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub listener: Listener,
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// Host names requests may name besides loopback and the connection's own address
    /// (`bandsox serve --host`).
    #[serde(default)]
    pub hosts: Vec<String>,
}

fn io_err(e: nix::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

/// The hand-off socket of a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

/// Front side: give `conn` to the daemon listening at `socket`. `Ok` once the daemon
/// acknowledged it (the caller may then close its copy).
pub async fn send(socket: &Path, header: &Header, conn: RawFd) -> std::io::Result<()> {
    let go = async {
        let mut s = UnixStream::connect(socket).await?;
        let body = serde_json::to_vec(header).map_err(std::io::Error::other)?;
        let len = u32::try_from(body.len()).map_err(std::io::Error::other)?;
        let mut msg = len.to_le_bytes().to_vec();
        msg.extend_from_slice(&body);
        let fds = [conn];
        let sent = s
            .async_io(Interest::WRITABLE, || {
                sendmsg::<()>(
                    s.as_raw_fd(),
                    &[IoSlice::new(&msg)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io_err)
            })
            .await?;
        s.write_all(&msg[sent..]).await?;
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack).await?;
        if ack[0] != ACK {
            return Err(std::io::Error::other("the daemon refused the connection"));
        }
        Ok(())
    };
    tokio::time::timeout(DEADLINE, go)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "hand-off timed out"))?
}

/// Daemon side: read one hand-off from `s` (a connection to the hand-off socket) and
/// acknowledge it.
pub async fn receive(s: &mut UnixStream) -> std::io::Result<(Header, OwnedFd)> {
    let go = async {
        let mut first = [0u8; 4096];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let (n, fd) = s
            .async_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(&mut first)];
                let msg = recvmsg::<()>(
                    s.as_raw_fd(),
                    &mut iov,
                    Some(cmsg.as_mut_slice()),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io_err)?;
                let mut fd = None;
                for c in msg.cmsgs().map_err(io_err)? {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        for raw in fds {
                            // SAFETY: the kernel just installed `raw` in our table for
                            // this message; nothing else owns it.
                            let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                            if fd.is_none() {
                                fd = Some(owned);
                            }
                        }
                    }
                }
                Ok((msg.bytes, fd))
            })
            .await?;
        let fd = fd.ok_or_else(|| std::io::Error::other("a hand-off without a descriptor"))?;
        let mut buf = first[..n].to_vec();
        while buf.len() < 4 {
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            buf.push(b[0]);
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > MAX_HEADER {
            return Err(std::io::Error::other("hand-off header too large"));
        }
        let mut body = buf.split_off(4);
        if body.len() > len {
            return Err(std::io::Error::other(
                "hand-off message longer than announced",
            ));
        }
        let have = body.len();
        body.resize(len, 0);
        s.read_exact(&mut body[have..]).await?;
        let header: Header = serde_json::from_slice(&body).map_err(std::io::Error::other)?;
        s.write_all(&[ACK]).await?;
        Ok((header, fd))
    };
    tokio::time::timeout(DEADLINE, go)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "hand-off timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_descriptor_and_its_header_cross() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let header = Header {
            listener: Listener::Tcp,
            tls: None,
            hosts: vec!["x".repeat(6000)],
        };
        let h2 = header.clone();
        let daemon = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            receive(&mut s).await.unwrap()
        });
        send(&path, &h2, b.as_raw_fd()).await.unwrap();
        let (got, fd) = daemon.await.unwrap();
        assert_eq!(got, header);
        // The passed descriptor is the same connection.
        let mut passed = std::os::unix::net::UnixStream::from(fd);
        use std::io::{Read, Write};
        a.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        passed.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
    }
}
