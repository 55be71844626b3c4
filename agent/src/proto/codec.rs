//! Frame encoding and decoding.
//!
//! Invariants:
//! * A frame is `u32 LE length` + `length` bytes of bincode (see [`options`]).
//! * The length is checked against [`MAX_FRAME_LEN`] before any buffer is allocated, and
//!   bincode runs with the same byte limit, so one frame costs at most `MAX_FRAME_LEN`
//!   bytes of memory whatever the peer sends.
//! * Malformed, truncated or oversized input is a [`ProtoError`], never a panic.
//! * [`FrameReader::scan_sync`] consumes input until (and including) [`SYNC_MAGIC`] using
//!   O(1) memory; [`FrameReader::next`] also recognises a `SYNC_MAGIC` between frames.
//! * A frame whose header arrived but whose payload has not is visible through
//!   [`FrameReader::mid_frame`], so a peer whose header was corrupted into a longer length
//!   (the reader then waits for bytes that never come) can be told from a slow one.
use bincode::Options;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::{Message, MAX_FRAME_LEN, SYNC_MAGIC};

/// Errors of the codec. Any of them ends the connection (or session).
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed")]
    Eof,
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_LEN} bytes")]
    TooLarge(u64),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// The one bincode configuration used on the wire.
pub fn options() -> impl Options + Copy {
    bincode::DefaultOptions::new()
        .with_varint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
        .with_limit(u64::from(MAX_FRAME_LEN))
}

/// Encode a message payload (without the length prefix).
pub fn encode_message(msg: &Message) -> Result<Vec<u8>, ProtoError> {
    options().serialize(msg).map_err(|e| match *e {
        bincode::ErrorKind::SizeLimit => {
            ProtoError::TooLarge(options().serialized_size(msg).unwrap_or(u64::MAX))
        }
        other => ProtoError::Malformed(other.to_string()),
    })
}

/// Encode a whole frame: length prefix + payload.
pub fn encode_frame(msg: &Message) -> Result<Vec<u8>, ProtoError> {
    let mut out = Vec::new();
    append_frame(&mut out, msg)?;
    Ok(out)
}

/// Append a whole frame to `out` (lets writers batch several frames into one write).
pub fn append_frame(out: &mut Vec<u8>, msg: &Message) -> Result<(), ProtoError> {
    let payload = encode_message(msg)?;
    let len =
        u32::try_from(payload.len()).map_err(|_| ProtoError::TooLarge(payload.len() as u64))?;
    if len > MAX_FRAME_LEN {
        return Err(ProtoError::TooLarge(u64::from(len)));
    }
    out.reserve(4 + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(())
}

/// Decode one payload (the bytes after the length prefix).
pub fn decode_message(payload: &[u8]) -> Result<Message, ProtoError> {
    if payload.len() > MAX_FRAME_LEN as usize {
        return Err(ProtoError::TooLarge(payload.len() as u64));
    }
    options()
        .deserialize(payload)
        .map_err(|e| ProtoError::Malformed(e.to_string()))
}

/// Decode a complete frame held in memory. Returns the message and the number of bytes
/// used, `Ok(None)` when `buf` holds only part of a frame.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Message, usize)>, ProtoError> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    if len > MAX_FRAME_LEN {
        return Err(ProtoError::TooLarge(u64::from(len)));
    }
    let end = 4 + len as usize;
    match buf.get(4..end) {
        Some(payload) => Ok(Some((decode_message(payload)?, end))),
        None => Ok(None),
    }
}

/// Write one frame and flush.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Message,
) -> Result<(), ProtoError> {
    let frame = encode_frame(msg)?;
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

/// Write `SYNC_MAGIC` followed by one frame, in one write, and flush.
pub async fn write_sync_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Message,
) -> Result<(), ProtoError> {
    let mut buf = SYNC_MAGIC.to_vec();
    append_frame(&mut buf, msg)?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// What [`FrameReader::next`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A `SYNC_MAGIC` between frames (the peer (re)starts a session).
    Sync,
    /// A decoded frame.
    Frame(Message),
}

/// Buffered frame reader over any byte stream.
///
/// `scan_sync` and `next` are not cancel-safe: dropping one of their futures half-way may
/// lose input. Callers poll them to completion (or drop the reader).
pub struct FrameReader<R> {
    inner: BufReader<R>,
    mid_frame: std::sync::Arc<MidFrame>,
}

/// Since when a [`FrameReader`] has been waiting for the rest of a frame (shared with
/// whoever watches the connection while the reader is blocked in [`FrameReader::next`]).
#[derive(Debug)]
pub struct MidFrame {
    base: std::time::Instant,
    /// Milliseconds after `base` + 1 when the current frame's header arrived; 0 between
    /// frames (and while the whole frame was already buffered).
    since: std::sync::atomic::AtomicU64,
}

impl MidFrame {
    fn new() -> Self {
        MidFrame {
            base: std::time::Instant::now(),
            since: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn start(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.since
            .store(ms.saturating_add(1), std::sync::atomic::Ordering::Relaxed);
    }

    fn end(&self) {
        self.since.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long the reader has been inside one frame waiting for the rest of it, if it is.
    pub fn stalled_for(&self) -> Option<std::time::Duration> {
        match self.since.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            n => Some(
                self.base
                    .elapsed()
                    .saturating_sub(std::time::Duration::from_millis(n - 1)),
            ),
        }
    }
}

/// First four bytes of the magic as a little-endian length; always > `MAX_FRAME_LEN`.
const SYNC_HEAD: u32 =
    u32::from_le_bytes([SYNC_MAGIC[0], SYNC_MAGIC[1], SYNC_MAGIC[2], SYNC_MAGIC[3]]);
const _: () = assert!(SYNC_HEAD > MAX_FRAME_LEN);

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner: BufReader::with_capacity(64 * 1024, inner),
            mid_frame: std::sync::Arc::new(MidFrame::new()),
        }
    }

    /// See [`MidFrame`].
    pub fn mid_frame(&self) -> std::sync::Arc<MidFrame> {
        self.mid_frame.clone()
    }

    /// The underlying reader (buffered input is lost).
    pub fn into_inner(self) -> R {
        self.inner.into_inner()
    }

    /// Consume input up to and including the next `SYNC_MAGIC`.
    ///
    /// The magic has no proper prefix that is also a suffix (checked in tests), so on a
    /// mismatch the match restarts at this byte without backtracking.
    pub async fn scan_sync(&mut self) -> Result<(), ProtoError> {
        use tokio::io::AsyncBufReadExt;
        let mut matched = 0usize;
        loop {
            let buf = self.inner.fill_buf().await?;
            if buf.is_empty() {
                return Err(ProtoError::Eof);
            }
            let mut used = 0;
            let mut found = false;
            for &b in buf {
                used += 1;
                if b == SYNC_MAGIC[matched] {
                    matched += 1;
                } else {
                    matched = usize::from(b == SYNC_MAGIC[0]);
                }
                if matched == SYNC_MAGIC.len() {
                    found = true;
                    break;
                }
            }
            self.inner.consume(used);
            if found {
                return Ok(());
            }
        }
    }

    /// Read the next frame (or a mid-stream `SYNC_MAGIC`).
    pub async fn next(&mut self) -> Result<Incoming, ProtoError> {
        let mut head = [0u8; 4];
        self.read_exact_or_eof(&mut head, true).await?;
        let len = u32::from_le_bytes(head);
        if len == SYNC_HEAD {
            let mut tail = [0u8; 4];
            self.read_exact_or_eof(&mut tail, false).await?;
            if tail[..] == SYNC_MAGIC[4..] {
                return Ok(Incoming::Sync);
            }
            return Err(ProtoError::TooLarge(u64::from(len)));
        }
        if len > MAX_FRAME_LEN {
            return Err(ProtoError::TooLarge(u64::from(len)));
        }
        let len = usize::try_from(len).map_err(|_| ProtoError::TooLarge(u64::from(len)))?;
        let mut payload = vec![0u8; len];
        // Marked only when the reader will wait: a frame already buffered cannot stall.
        let waits = self.inner.buffer().len() < len;
        if waits {
            self.mid_frame.start();
        }
        let res = self.read_exact_or_eof(&mut payload, false).await;
        if waits {
            self.mid_frame.end();
        }
        res?;
        Ok(Incoming::Frame(decode_message(&payload)?))
    }

    /// Like `next`, but a `SYNC_MAGIC` is skipped.
    pub async fn next_message(&mut self) -> Result<Message, ProtoError> {
        loop {
            if let Incoming::Frame(m) = self.next().await? {
                return Ok(m);
            }
        }
    }

    /// `read_exact`; a clean EOF before the first byte (when `clean_ok`) is `Eof`, an
    /// EOF in the middle is `Malformed` (truncated frame).
    async fn read_exact_or_eof(
        &mut self,
        buf: &mut [u8],
        clean_ok: bool,
    ) -> Result<(), ProtoError> {
        let mut got = 0;
        while got < buf.len() {
            let n = self.inner.read(&mut buf[got..]).await?;
            if n == 0 {
                return Err(if got == 0 && clean_ok {
                    ProtoError::Eof
                } else {
                    ProtoError::Malformed("truncated frame".into())
                });
            }
            got += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::*;

    fn sample_messages() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                nonce: 42,
            }),
            Message::HelloAck(HelloAck {
                nonce: u64::MAX,
                result: Ok(AgentInfo {
                    version: 1,
                    agent_version: "0.1".into(),
                    hostname: "vm".into(),
                    kernel: "6.1".into(),
                    uptime_ms: 5,
                    instance: 7,
                }),
            }),
            Message::HelloAck(HelloAck {
                nonce: 1,
                result: Err("nope".into()),
            }),
            Message::Request {
                id: 7,
                req: Request::Exec(ExecSpec {
                    program: Program::Argv(vec![b"ls".to_vec(), vec![0xff, 0]]),
                    env: vec![(b"A".to_vec(), b"B".to_vec())],
                    cwd: Some(b"/tmp".to_vec()),
                    stdin: true,
                }),
            },
            Message::Request {
                id: 8,
                req: Request::Exec(ExecSpec {
                    program: Program::Script(b"#!/bin/sh\nexit 3\n".to_vec()),
                    env: vec![],
                    cwd: None,
                    stdin: false,
                }),
            },
            Message::Request {
                id: 1,
                req: Request::Ping,
            },
            Message::Response {
                id: 1,
                resp: Response::Error {
                    errno: 2,
                    message: "x".into(),
                },
            },
            Message::Output {
                id: 3,
                stream: OutStream::Stderr,
                data: vec![1, 2, 3],
            },
            Message::Output {
                id: 3,
                stream: OutStream::Stdout,
                data: vec![7; MAX_CHUNK],
            },
            Message::Exited {
                id: 3,
                status: ExitStatus::Signal(9),
            },
            Message::Credit {
                id: 3,
                bytes: 1 << 40,
            },
            Message::Stdin {
                id: 3,
                data: vec![],
            },
            Message::CloseStdin { id: 3 },
            Message::Signal { id: 3, signal: 15 },
            Message::StdinCredit { id: 3, bytes: 10 },
        ]
    }

    #[test]
    fn magic_has_no_border() {
        // scan_sync relies on this: no proper prefix of the magic is also its suffix.
        for k in 1..SYNC_MAGIC.len() {
            assert_ne!(SYNC_MAGIC[..k], SYNC_MAGIC[SYNC_MAGIC.len() - k..]);
        }
    }

    #[test]
    fn roundtrip_in_memory() {
        for m in sample_messages() {
            let f = encode_frame(&m).unwrap();
            let (d, used) = decode_frame(&f).unwrap().unwrap();
            assert_eq!(d, m);
            assert_eq!(used, f.len());
            // Every strict prefix is incomplete, never an error or a panic.
            for cut in [0, 1, 3, 4, f.len() / 2, f.len() - 1] {
                assert!(decode_frame(&f[..cut]).unwrap().is_none());
            }
        }
    }

    #[test]
    fn bytes_are_compact() {
        let m = Message::Output {
            id: 1,
            stream: OutStream::Stdout,
            data: vec![0; 1000],
        };
        assert!(encode_frame(&m).unwrap().len() < 1020);
    }

    #[test]
    fn oversized_rejected_before_allocation() {
        let mut f = (MAX_FRAME_LEN + 1).to_le_bytes().to_vec();
        f.extend_from_slice(&[0; 16]);
        assert!(matches!(decode_frame(&f), Err(ProtoError::TooLarge(_))));
        let big = Message::Output {
            id: 1,
            stream: OutStream::Stdout,
            data: vec![0; MAX_FRAME_LEN as usize],
        };
        assert!(matches!(encode_frame(&big), Err(ProtoError::TooLarge(_))));
    }

    #[test]
    fn inner_length_lies_are_errors() {
        // An Output whose byte-string length claims 2^60 bytes inside a small frame.
        // Output (variant 4), id 1, Stdout, then a u64 varint length (marker 253).
        let mut payload = vec![4u8, 1, 0, 253];
        payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode_message(&payload).is_err());
        // Trailing garbage after a valid message is rejected.
        let mut p = encode_message(&Message::CloseStdin { id: 1 }).unwrap();
        p.push(0);
        assert!(decode_message(&p).is_err());
    }

    #[tokio::test]
    async fn async_reader_roundtrip_with_garbage_and_sync() {
        let mut bytes = b"stale garbage BSXSYNC partial \x00\xff".to_vec();
        bytes.extend_from_slice(&SYNC_MAGIC);
        for m in sample_messages() {
            bytes.extend(encode_frame(&m).unwrap());
        }
        bytes.extend_from_slice(&SYNC_MAGIC);
        bytes.extend(encode_frame(&Message::CloseStdin { id: 9 }).unwrap());
        let mut r = FrameReader::new(&bytes[..]);
        r.scan_sync().await.unwrap();
        for m in sample_messages() {
            assert_eq!(r.next().await.unwrap(), Incoming::Frame(m));
        }
        assert_eq!(r.next().await.unwrap(), Incoming::Sync);
        assert_eq!(
            r.next_message().await.unwrap(),
            Message::CloseStdin { id: 9 }
        );
        assert!(matches!(r.next().await, Err(ProtoError::Eof)));
    }

    #[tokio::test]
    async fn async_reader_errors() {
        // Truncated.
        let f = encode_frame(&Message::Signal { id: 1, signal: 9 }).unwrap();
        let mut r = FrameReader::new(&f[..f.len() - 1]);
        assert!(matches!(r.next().await, Err(ProtoError::Malformed(_))));
        // Oversized.
        let f = u32::MAX.to_le_bytes();
        let mut r = FrameReader::new(&f[..]);
        assert!(matches!(r.next().await, Err(ProtoError::TooLarge(_))));
        // Garbage payload.
        let f = [3, 0, 0, 0, 0xff, 0xff, 0xff];
        let mut r = FrameReader::new(&f[..]);
        assert!(matches!(r.next().await, Err(ProtoError::Malformed(_))));
        // No magic at all.
        let mut r = FrameReader::new(&b"no magic here BSXSYN"[..]);
        assert!(matches!(r.scan_sync().await, Err(ProtoError::Eof)));
        // Magic split across reads.
        let (mut a, b) = tokio::io::duplex(4);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            a.write_all(b"xxBSXBSXSY").await.unwrap();
            a.write_all(&SYNC_MAGIC[..3]).await.unwrap();
            a.write_all(&SYNC_MAGIC[3..]).await.unwrap();
            a.write_all(&encode_frame(&Message::CloseStdin { id: 4 }).unwrap())
                .await
                .unwrap();
        });
        let mut r = FrameReader::new(b);
        r.scan_sync().await.unwrap();
        assert_eq!(
            r.next_message().await.unwrap(),
            Message::CloseStdin { id: 4 }
        );
        writer.await.unwrap();
    }
}
