//! Guest transports: the virtio-serial port and AF_VSOCK, as tokio streams.
//!
//! Invariants:
//! * [`FdStream`] is a non-blocking fd registered with tokio; clones share the fd, so one
//!   clone can read while another writes.
//! * On a virtio-serial port a read of 0 bytes means "no host connected" (the kernel also
//!   reports POLLHUP then). That ends the current session; the caller sleeps ~50 ms and
//!   serves a new session on the same port, so HUP is never fatal.
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The port name the host gives the agent's virtio-serial port.
pub const VIRTIO_PORT_NAME: &str = "org.bandsox.agent";
/// The AF_VSOCK port the agent listens on.
pub const VSOCK_PORT: u32 = 52;

/// A non-blocking fd as an `AsyncRead + AsyncWrite`.
#[derive(Clone)]
pub struct FdStream {
    fd: Arc<AsyncFd<OwnedFd>>,
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

impl FdStream {
    /// Wrap `fd` (made non-blocking). Must be called inside a tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(fd.as_fd())?;
        // SAFETY: `fd` is an OwnedFd that the AsyncFd owns from now on; it is neither
        // replaced nor closed while registered.
        let fd = unsafe { AsyncFd::register(fd)? };
        Ok(FdStream { fd: Arc::new(fd) })
    }

    /// Open a character device read-write.
    pub fn open(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)?;
        Self::new(OwnedFd::from(f))
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            // Into the initialized, unfilled part of `buf`.
            let res = guard.try_io(|fd| Ok(nix::unistd::read(fd, unfilled)?));
            match res {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let res = guard.try_io(|fd| Ok(nix::unistd::write(fd, data)?));
            match res {
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Find the device of the virtio-serial port named [`VIRTIO_PORT_NAME`]
/// (`/sys/class/virtio-ports/<dev>/name` → `/dev/<dev>`).
pub fn find_virtio_port() -> Option<PathBuf> {
    let dir = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for e in dir.flatten() {
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == VIRTIO_PORT_NAME {
            return Some(Path::new("/dev").join(e.file_name()));
        }
    }
    None
}

/// A listening AF_VSOCK socket.
pub struct VsockListener {
    fd: AsyncFd<OwnedFd>,
}

impl VsockListener {
    /// Listen on `port` for any CID.
    pub fn bind(port: u32) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let addr = VsockAddr::new(libc::VMADDR_CID_ANY, port);
        bind(fd.as_raw_fd(), &addr)?;
        listen(&fd, Backlog::new(16)?)?;
        // SAFETY: as in `FdStream::new`: the AsyncFd owns the OwnedFd.
        let fd = unsafe { AsyncFd::register(fd)? };
        Ok(VsockListener { fd })
    }

    /// Accept one connection.
    pub async fn accept(&self) -> io::Result<FdStream> {
        loop {
            let mut guard = self.fd.readable().await?;
            let res = guard.try_io(|fd| {
                Ok(accept4(
                    fd.as_raw_fd(),
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                )?)
            });
            match res {
                // SAFETY: accept4 returned a fresh fd that nothing else owns.
                Ok(Ok(c)) => return FdStream::new(unsafe { OwnedFd::from_raw_fd(c) }),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}
