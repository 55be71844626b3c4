//! A byte-stream wrapper that injects faults, for tests of everything that talks to an
//! agent (the client, the daemon's manager) without a VM: the agent serves one end of an
//! in-process pipe (`Agent::serve_stream`) and the other end goes through a
//! [`FaultStream`].
//!
//! Faults are counted in bytes of each direction separately: `read` is what the wrapped
//! side receives (agent → host when the host end is wrapped), `write` what it sends.
//!
//! Faults can be given at creation, or armed later through a [`FaultHandle`] (offsets
//! then count from the bytes already passed), e.g. after a clean handshake.
//!
//! Invariants: a fault fires exactly once, at the byte it names, whatever the sizes of the
//! reads and writes around it (a read or write that would cross that byte is cut short
//! there); bytes before it pass unchanged; a stream with [`Faults::none`] is transparent.
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What happens at byte `at` of one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Nothing.
    None,
    /// Every read (or write) first waits this long.
    Delay(Duration),
    /// From byte `at` on, bytes are swallowed: writes report success, reads never see them
    /// (the peer goes silent, as a wedged channel does).
    DropFrom { at: u64 },
    /// The stream ends cleanly at byte `at` (reads see EOF; writes fail with `BrokenPipe`).
    TruncateAt { at: u64 },
    /// Byte `at` is XORed with `0xff`; everything else passes.
    CorruptAt { at: u64 },
    /// At byte `at` the connection breaks: both directions fail with `ConnectionReset`.
    CloseAt { at: u64 },
}

/// The faults of both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    pub read: Fault,
    pub write: Fault,
}

impl Faults {
    pub const fn none() -> Faults {
        Faults {
            read: Fault::None,
            write: Fault::None,
        }
    }
    pub const fn read(f: Fault) -> Faults {
        Faults {
            read: f,
            write: Fault::None,
        }
    }
    pub const fn write(f: Fault) -> Faults {
        Faults {
            read: Fault::None,
            write: f,
        }
    }
}

/// One direction's position and fault.
#[derive(Debug)]
struct Dir {
    fault: Fault,
    pos: u64,
    delay: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Dir {
    fn new(fault: Fault) -> Dir {
        Dir {
            fault,
            pos: 0,
            delay: None,
        }
    }

    /// How many of `len` bytes may pass before the fault's byte (`None`: no limit).
    fn room(&self, len: usize) -> usize {
        let at = match self.fault {
            Fault::DropFrom { at }
            | Fault::TruncateAt { at }
            | Fault::CorruptAt { at }
            | Fault::CloseAt { at } => at,
            Fault::None | Fault::Delay(_) => return len,
        };
        if self.pos < at {
            usize::try_from(at - self.pos).map_or(len, |r| r.min(len))
        } else {
            len
        }
    }

    /// Whether the fault's byte has been reached.
    fn reached(&self) -> bool {
        match self.fault {
            Fault::DropFrom { at } | Fault::TruncateAt { at } | Fault::CloseAt { at } => {
                self.pos >= at
            }
            Fault::CorruptAt { .. } | Fault::None | Fault::Delay(_) => false,
        }
    }

    /// Wait out a `Delay` before each operation.
    fn poll_delay(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Fault::Delay(d) = self.fault else {
            return Poll::Ready(());
        };
        let sleep = self
            .delay
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(d)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.delay = None;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A stream whose reads and writes suffer the configured [`Faults`].
#[derive(Debug)]
pub struct FaultStream<S> {
    inner: S,
    read: Dir,
    write: Dir,
    /// Set once a `CloseAt` fired in either direction.
    broken: Arc<AtomicBool>,
    /// Faults armed later through a [`FaultHandle`], taken at the next operation.
    armed: Arc<Mutex<Option<Faults>>>,
}

/// Arms faults on a [`FaultStream`] that was moved elsewhere (into a client).
#[derive(Debug, Clone)]
pub struct FaultHandle(Arc<Mutex<Option<Faults>>>);

impl FaultHandle {
    /// Replace the stream's faults; their offsets count from the bytes already passed
    /// in each direction when the stream next reads or writes.
    pub fn arm(&self, faults: Faults) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(faults);
    }
}

impl<S> FaultStream<S> {
    pub fn new(inner: S, faults: Faults) -> FaultStream<S> {
        FaultStream {
            inner,
            read: Dir::new(faults.read),
            write: Dir::new(faults.write),
            broken: Arc::new(AtomicBool::new(false)),
            armed: Arc::new(Mutex::new(None)),
        }
    }

    /// A handle to arm faults later.
    pub fn handle(&self) -> FaultHandle {
        FaultHandle(self.armed.clone())
    }

    /// Bytes that passed each way so far: (read, written).
    pub fn counts(&self) -> (u64, u64) {
        (self.read.pos, self.write.pos)
    }

    /// Take newly armed faults, shifting their offsets past the bytes already passed.
    fn take_armed(&mut self) {
        let Some(f) = self.armed.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        self.read.fault = shift(f.read, self.read.pos);
        self.write.fault = shift(f.write, self.write.pos);
    }
}

fn shift(f: Fault, by: u64) -> Fault {
    match f {
        Fault::DropFrom { at } => Fault::DropFrom { at: at + by },
        Fault::TruncateAt { at } => Fault::TruncateAt { at: at + by },
        Fault::CorruptAt { at } => Fault::CorruptAt { at: at + by },
        Fault::CloseAt { at } => Fault::CloseAt { at: at + by },
        f @ (Fault::None | Fault::Delay(_)) => f,
    }
}

fn reset() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "fault: connection closed")
}

impl<S: AsyncRead + Unpin> AsyncRead for FaultStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.take_armed();
        if this.broken.load(Ordering::SeqCst) {
            return Poll::Ready(Err(reset()));
        }
        if this.read.poll_delay(cx).is_pending() {
            return Poll::Pending;
        }
        if this.read.reached() {
            match this.read.fault {
                Fault::TruncateAt { .. } => return Poll::Ready(Ok(())),
                Fault::CloseAt { .. } => {
                    this.broken.store(true, Ordering::SeqCst);
                    return Poll::Ready(Err(reset()));
                }
                // Swallow whatever arrives, forever: the reader waits.
                Fault::DropFrom { .. } => {
                    let mut sink = [0u8; 4096];
                    let mut rb = ReadBuf::new(&mut sink);
                    loop {
                        match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                            Poll::Ready(Ok(())) if !rb.filled().is_empty() => rb.clear(),
                            Poll::Ready(Ok(())) => return Poll::Ready(Ok(())),
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                }
                _ => {}
            }
        }
        let room = this.read.room(buf.remaining());
        let mut limited = buf.take(room);
        let res = Pin::new(&mut this.inner).poll_read(cx, &mut limited);
        let n = limited.filled().len();
        if let Poll::Ready(Ok(())) = res {
            if let Fault::CorruptAt { at } = this.read.fault {
                let start = this.read.pos;
                if at >= start && at < start + n as u64 {
                    let i = usize::try_from(at - start).unwrap_or(0);
                    limited.filled_mut()[i] ^= 0xff;
                }
            }
            // SAFETY: `limited` was built over `buf`'s unfilled part and the inner reader
            // initialised and filled its first `n` bytes.
            unsafe { buf.assume_init(n) };
            buf.advance(n);
            this.read.pos += n as u64;
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FaultStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        this.take_armed();
        if this.broken.load(Ordering::SeqCst) {
            return Poll::Ready(Err(reset()));
        }
        if this.write.poll_delay(cx).is_pending() {
            return Poll::Pending;
        }
        if this.write.reached() {
            match this.write.fault {
                Fault::DropFrom { .. } => {
                    this.write.pos += data.len() as u64;
                    return Poll::Ready(Ok(data.len()));
                }
                Fault::TruncateAt { .. } => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "fault: stream truncated",
                    )))
                }
                Fault::CloseAt { .. } => {
                    this.broken.store(true, Ordering::SeqCst);
                    return Poll::Ready(Err(reset()));
                }
                _ => {}
            }
        }
        let room = this.write.room(data.len());
        let mut chunk = data[..room].to_vec();
        if let Fault::CorruptAt { at } = this.write.fault {
            let start = this.write.pos;
            if at >= start && at < start + room as u64 {
                chunk[usize::try_from(at - start).unwrap_or(0)] ^= 0xff;
            }
        }
        let res = Pin::new(&mut this.inner).poll_write(cx, &chunk);
        if let Poll::Ready(Ok(n)) = res {
            this.write.pos += n as u64;
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pass(faults: Faults, data: &[u8]) -> (Vec<u8>, io::Result<()>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut w = FaultStream::new(a, faults);
        let mut r = b;
        let res = async {
            // Odd-sized writes, so faults fall inside them.
            for c in data.chunks(7) {
                w.write_all(c).await?;
            }
            w.shutdown().await
        }
        .await;
        drop(w);
        let mut got = Vec::new();
        let _ = r.read_to_end(&mut got).await;
        (got, res)
    }

    #[tokio::test]
    async fn each_write_fault_fires_at_its_byte() {
        let data: Vec<u8> = (0..100u8).collect();
        let (got, res) = pass(Faults::none(), &data).await;
        assert_eq!((got, res.is_ok()), (data.clone(), true));

        let (got, _) = pass(Faults::write(Fault::CorruptAt { at: 50 }), &data).await;
        assert_eq!(got.len(), 100);
        assert_eq!(got[50], 50 ^ 0xff);
        assert_eq!(&got[..50], &data[..50]);
        assert_eq!(&got[51..], &data[51..]);

        let (got, res) = pass(Faults::write(Fault::DropFrom { at: 30 }), &data).await;
        assert_eq!((got, res.is_ok()), (data[..30].to_vec(), true));

        let (got, res) = pass(Faults::write(Fault::TruncateAt { at: 30 }), &data).await;
        assert_eq!(got, data[..30].to_vec());
        assert_eq!(res.unwrap_err().kind(), io::ErrorKind::BrokenPipe);

        let (got, res) = pass(Faults::write(Fault::CloseAt { at: 12 }), &data).await;
        assert_eq!(got, data[..12].to_vec());
        assert_eq!(res.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn read_faults_truncate_corrupt_and_close() {
        let data: Vec<u8> = (0..64u8).collect();
        let read_through = |f: Fault| {
            let data = data.clone();
            async move {
                let (mut a, b) = tokio::io::duplex(1 << 16);
                a.write_all(&data).await.unwrap();
                drop(a);
                let mut r = FaultStream::new(b, Faults::read(f));
                let mut got = Vec::new();
                let res = r.read_to_end(&mut got).await;
                (got, res.map(drop))
            }
        };
        let (got, res) = read_through(Fault::TruncateAt { at: 10 }).await;
        assert_eq!((got, res.is_ok()), (data[..10].to_vec(), true));
        let (got, _) = read_through(Fault::CorruptAt { at: 0 }).await;
        assert_eq!(got[0], 0xff);
        let (got, res) = read_through(Fault::CloseAt { at: 5 }).await;
        assert_eq!(got, data[..5].to_vec());
        assert!(res.is_err());
        // Dropped bytes are never seen; the end of the stream still is.
        let (got, res) = read_through(Fault::DropFrom { at: 3 }).await;
        assert_eq!((got, res.is_ok()), (data[..3].to_vec(), true));
    }

    #[tokio::test]
    async fn delay_waits_before_each_operation() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut w = FaultStream::new(a, Faults::write(Fault::Delay(Duration::from_millis(50))));
        let t0 = std::time::Instant::now();
        w.write_all(b"x").await.unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(50));
        let mut one = [0u8; 1];
        b.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"x");
    }
}
