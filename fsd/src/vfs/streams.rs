//! The streams of a command: reads of `runs/<n>/stdout|stderr|output` (and of `exec`
//! once it has a run) wait like a pipe until data or the end of the command; writes to
//! `stdin` and `terminal` wait like a pipe while the command does not read; reads of
//! `terminal` give a redraw of the screen, then live output.
//!
//! Invariants: every wait is interruptible (see `interrupt`); an interrupted reader of
//! an output stream sends the command SIGINT, like a terminal would, while a reader of
//! `terminal` does not (there, Ctrl-C is a keystroke).
use std::sync::Arc;

use super::files::Handle;
use crate::error::{Error, Result};
use crate::interrupt::interruptible;
use crate::manager::runs::{Run, RunStream};

/// An open `runs/<n>/terminal`: reads give a redraw of the screen as it was at the
/// first read, then the terminal's output from exactly that point on.
pub struct TermFile {
    run: Arc<Run>,
    state: tokio::sync::Mutex<Option<TermPos>>,
}

struct TermPos {
    redraw: Vec<u8>,
    /// Bytes of `redraw` already returned.
    sent: usize,
    /// Position in the run's `stdout`.
    offset: u64,
}

/// A read of `runs/<n>/terminal`: first the redraw of the screen as it was at the first
/// read, then live output from that offset; EOF once the run ended and all was read.
/// An interrupted reader gets EINTR; the command is not signalled (on a terminal,
/// Ctrl-C is a keystroke, written to the terminal).
impl TermFile {
    pub(super) fn new(run: Arc<Run>) -> TermFile {
        TermFile {
            run,
            state: Default::default(),
        }
    }

    pub(super) fn run(&self) -> &Arc<Run> {
        &self.run
    }

    /// See [`TermFile`]: the redraw first, then live output.
    pub(super) async fn read(&self, handle: &Handle, size: u32, pid: u32) -> Result<Vec<u8>> {
        read_terminal(self, handle, size, pid).await
    }
}

async fn read_terminal(t: &TermFile, handle: &Handle, size: u32, pid: u32) -> Result<Vec<u8>> {
    let mut st = t.state.lock().await;
    if st.is_none() {
        let (_, redraw, offset) = t
            .run
            .terminal_snapshot()?
            .ok_or_else(|| Error::new(libc::ENOTTY, "this run has no terminal"))?;
        // The redraw is kept until it was read: it counts as the reader's buffer.
        handle.hold_bytes(redraw.len())?;
        *st = Some(TermPos {
            redraw,
            sent: 0,
            offset,
        });
    }
    let Some(pos) = st.as_mut() else {
        return Ok(Vec::new());
    };
    let size = size.min(4 * 1024 * 1024);
    if pos.sent < pos.redraw.len() {
        let end = pos.sent.saturating_add(size as usize).min(pos.redraw.len());
        let out = pos.redraw[pos.sent..end].to_vec();
        pos.sent = end;
        if end == pos.redraw.len() {
            pos.redraw = Vec::new();
            pos.sent = 0;
            let _ = handle.hold_bytes(0);
        }
        return Ok(out);
    }
    let data = interruptible(pid, t.run.read_stream(RunStream::Stdout, pos.offset, size)).await?;
    pos.offset += data.len() as u64;
    Ok(data)
}

/// Wait like a pipe for a run's stream, answering EINTR (and sending the command
/// SIGINT) if the reader is interrupted.
pub(super) async fn read_run(
    run: &Arc<Run>,
    stream: RunStream,
    at: u64,
    size: u32,
    pid: u32,
) -> Result<Vec<u8>> {
    let size = size.min(4 * 1024 * 1024);
    let res = interruptible(pid, run.read_stream(stream, at, size)).await;
    if let Err(e) = &res {
        if e.errno == libc::EINTR && run.status().is_running() {
            let _ = run.signal(libc::SIGINT).await;
        }
    }
    res
}

/// Write `data` to a command's input (its stdin, or its terminal's keyboard), waiting
/// like a pipe while it does not read; the writer `pid` may be interrupted.
pub(super) async fn write_input(run: &Arc<Run>, data: &[u8], pid: u32) -> Result<()> {
    interruptible(pid, async {
        for chunk in data.chunks(bandsox_agent::proto::MAX_CHUNK) {
            run.write_stdin(chunk.to_vec()).await?;
        }
        Ok(())
    })
    .await
}
