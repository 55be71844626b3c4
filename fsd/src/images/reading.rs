//! Reading image input: throttled progress events, the deadline every read enforces, and
//! decompression chosen by sniffing the first bytes.
//!
//! Invariants:
//! - At most one throttled progress line per second per image; layer boundaries always
//!   report.
//! - A read after the image's deadline fails (`TimedOut`), so no import outlives it.
use std::io::{BufRead, Read};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::events::EventLog;

/// Reports progress of one image as events (at most one progress line per second).
pub struct Progress {
    events: Arc<EventLog>,
    subject: String,
    last: parking_lot::Mutex<Instant>,
    pub deadline: Instant,
}

impl Progress {
    pub fn new(events: Arc<EventLog>, image: &str, deadline: Instant) -> Progress {
        Progress {
            events,
            subject: format!("images/{image}"),
            last: parking_lot::Mutex::new(Instant::now() - Duration::from_secs(10)),
            deadline,
        }
    }
    pub fn event(&self, event: &str, detail: &str) {
        self.events.emit(&self.subject, event, detail);
    }
    /// A throttled progress line; `force` always emits (layer boundaries).
    pub fn progress(&self, event: &str, detail: &str, force: bool) {
        if force || self.due() {
            self.event(event, detail);
        }
    }
    /// Whether a throttled progress line is due now (and, if so, counts it as sent).
    pub fn due(&self) -> bool {
        let mut last = self.last.lock();
        if last.elapsed() >= Duration::from_secs(1) {
            *last = Instant::now();
            return true;
        }
        false
    }
    pub fn check_deadline(&self) -> Result<()> {
        if Instant::now() > self.deadline {
            return Err(Error::timed_out(
                "the image took longer than its deadline (BANDSOX_IMAGE_TIMEOUT)",
            ));
        }
        Ok(())
    }
}

/// A reader that reports bytes read as progress and enforces the deadline.
pub(super) struct Counting<'a, R> {
    pub(super) inner: R,
    pub(super) progress: &'a Progress,
    pub(super) label: String,
    pub(super) total: Option<u64>,
    pub(super) done: u64,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if Instant::now() > self.progress.deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the image took longer than its deadline (BANDSOX_IMAGE_TIMEOUT)",
            ));
        }
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.progress.due() {
            let total = self.total.map(|t| format!("/{t}")).unwrap_or_default();
            self.progress.event(
                "import-progress",
                &format!("{} bytes={}{total}", self.label, self.done),
            );
        }
        Ok(n)
    }
}

/// Decompressor chosen by sniffing the first bytes (gzip, zstd, or none).
pub enum Decoder<R: BufRead> {
    Plain(R),
    Gzip(Box<flate2::bufread::MultiGzDecoder<R>>),
    Zstd(Box<zstd::stream::read::Decoder<'static, R>>),
}

impl<R: BufRead> Decoder<R> {
    pub fn new(mut r: R) -> Result<Decoder<R>> {
        let head = r
            .fill_buf()
            .map_err(|e| Error::invalid(format!("cannot read: {e}")))?;
        if head.starts_with(&[0x1f, 0x8b]) {
            Ok(Decoder::Gzip(Box::new(
                flate2::bufread::MultiGzDecoder::new(r),
            )))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            let d = zstd::stream::read::Decoder::with_buffer(r)
                .map_err(|e| Error::invalid(format!("bad zstd stream: {e}")))?;
            Ok(Decoder::Zstd(Box::new(d)))
        } else {
            Ok(Decoder::Plain(r))
        }
    }
    pub fn compression(&self) -> &'static str {
        match self {
            Decoder::Plain(_) => "none",
            Decoder::Gzip(_) => "gzip",
            Decoder::Zstd(_) => "zstd",
        }
    }
    pub fn into_inner(self) -> R {
        match self {
            Decoder::Plain(r) => r,
            Decoder::Gzip(d) => d.into_inner(),
            Decoder::Zstd(d) => d.finish(),
        }
    }
}

impl<R: BufRead> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(d) => d.read(buf),
            Decoder::Zstd(d) => d.read(buf),
        }
    }
}

pub(super) fn drain(r: &mut impl Read, what: &str) -> Result<()> {
    std::io::copy(r, &mut std::io::sink())
        .map(|_| ())
        .map_err(|e| Error::invalid(format!("{what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_sniffs() {
        let data = b"hello world".repeat(100);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &data).unwrap();
        let gz = gz.finish().unwrap();
        let zs = zstd::encode_all(&data[..], 1).unwrap();
        for (input, kind) in [(&data[..], "none"), (&gz[..], "gzip"), (&zs[..], "zstd")] {
            let mut d = Decoder::new(input).unwrap();
            assert_eq!(d.compression(), kind);
            let mut out = Vec::new();
            d.read_to_end(&mut out).unwrap();
            assert_eq!(out, data);
        }
    }
}
