//! The screen of a terminal run: a `vt100` emulator fed with the run's output.
//!
//! Invariants:
//! - The escape-sequence parsing is `vt100`'s; nothing here interprets bytes.
//! - Memory is bounded: the emulator holds `rows × cols` cells (at most 1000 × 1000)
//!   and no scrollback ([`SCROLLBACK`] = 0 lines): what scrolled off the screen is in
//!   the run's `output`/`stdout` files, not in memory.
//! - Only live runs keep an emulator; the screen of a finished run (or of a run from
//!   before a daemon restart) is rebuilt on demand from the last [`REPLAY_BYTES`] of its
//!   output, so idle runs cost no memory.
//! - Every emulator the daemon holds counts against its VM owner's `terminal_cells`
//!   (rows × cols, see `limits`): a live run's for as long as it runs (its hold grows
//!   and shrinks with `winsize`), a replayed one while it is being rendered. A size
//!   that does not fit is refused (EDQUOT/EAGAIN) and changes nothing. Freeing a
//!   screen asks for the memory to go back to the system (`memtrim`).
use bandsox_agent::proto::TtySize;

use super::runs::{render_size, Run, RunStream, WINSIZE_FILE};
use crate::error::{Error, Result};
use crate::limits::{Amounts, Resource};

/// Scrollback lines the emulator keeps (none: the full history is on disk).
pub const SCROLLBACK: usize = 0;

/// How much of a finished run's output is replayed to rebuild its screen.
pub const REPLAY_BYTES: u64 = 8 * 1024 * 1024;

/// One terminal's emulated screen.
pub struct Screen {
    parser: vt100::Parser,
}

impl std::fmt::Debug for Screen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (rows, cols) = self.parser.screen().size();
        write!(f, "Screen({cols}x{rows})")
    }
}

/// The cells a screen of `size` counts for.
pub fn cells(size: TtySize) -> u64 {
    u64::from(size.rows) * u64::from(size.cols)
}

impl Screen {
    pub fn new(size: TtySize) -> Screen {
        Screen {
            parser: vt100::Parser::new(size.rows, size.cols, SCROLLBACK),
        }
    }

    pub fn feed(&mut self, data: &[u8]) {
        self.parser.process(data);
    }

    pub fn resize(&mut self, size: TtySize) {
        self.parser.screen_mut().set_size(size.rows, size.cols);
    }

    pub fn size(&self) -> TtySize {
        let (rows, cols) = self.parser.screen().size();
        TtySize { cols, rows }
    }

    /// The `screen` file: exactly `rows` lines of plain text, trailing spaces trimmed.
    pub fn text(&self) -> String {
        let screen = self.parser.screen();
        let (_, cols) = screen.size();
        let mut out = String::new();
        for row in screen.rows(0, cols) {
            out.push_str(row.trim_end_matches(' '));
            out.push('\n');
        }
        out
    }

    /// Escape sequences that redraw this screen (contents, attributes, cursor and input
    /// modes) on a terminal of the same size: what a re-attaching client shows first.
    pub fn redraw(&self) -> Vec<u8> {
        let screen = self.parser.screen();
        let mut out = Vec::new();
        if screen.alternate_screen() {
            out.extend_from_slice(b"\x1b[?1049h");
        }
        out.extend_from_slice(&screen.state_formatted());
        out
    }
}

impl Run {
    /// Whether the run has a terminal (`tty=`).
    pub fn is_tty(&self) -> bool {
        self.inner.lock().size.is_some()
    }

    /// The terminal's window size (`None` for other runs).
    pub fn tty_size(&self) -> Option<TtySize> {
        self.inner.lock().size
    }

    /// A screen rebuilt from the end of the spooled output (finished runs, runs of an
    /// earlier daemon); its cells count for the VM's owner while it exists.
    fn replayed_screen(&self, size: TtySize, upto: u64) -> Result<Screen> {
        let _hold = self.home.limits.hold(
            self.home.uid,
            Amounts::of(Resource::TerminalCells, cells(size)),
        )?;
        let mut screen = Screen::new(size);
        let mut at = upto.saturating_sub(REPLAY_BYTES);
        while at < upto {
            let chunk = u32::try_from((upto - at).min(1024 * 1024)).unwrap_or(1024 * 1024);
            let data = self.read_at(RunStream::Stdout, at, chunk)?;
            if data.is_empty() {
                break;
            }
            at += data.len() as u64;
            screen.feed(&data);
        }
        Ok(screen)
    }

    /// The screen's text and a redraw sequence, with the output offset they reflect.
    /// `None` for runs without a terminal.
    pub fn terminal_snapshot(&self) -> Result<Option<(String, Vec<u8>, u64)>> {
        let (size, upto) = {
            let inner = self.inner.lock();
            let Some(size) = inner.size else {
                return Ok(None);
            };
            if let Some(s) = &inner.screen {
                return Ok(Some((s.text(), s.redraw(), inner.lens[0])));
            }
            (size, inner.lens[0])
        };
        let s = self.replayed_screen(size, upto)?;
        let out = (s.text(), s.redraw(), upto);
        drop(s);
        crate::memtrim::after_large_free();
        Ok(Some(out))
    }

    /// Change the window size: the guest's terminal (SIGWINCH to its foreground
    /// process group), the emulated screen and the `winsize` file. A size whose cells
    /// do not fit the owner's `terminal_cells` is refused before anything changes.
    pub async fn resize(&self, size: TtySize) -> Result<()> {
        if !self.is_tty() {
            return Err(Error::new(
                libc::ENOTTY,
                format!("run {} has no terminal", self.n),
            ));
        }
        let Some(c) = self.live_control().await else {
            return Err(Error::new(
                libc::EPIPE,
                format!("run {} has already finished", self.n),
            ));
        };
        let old = {
            let inner = self.inner.lock();
            if inner.status.is_running() {
                inner.hold.resize(Amounts::run(cells(size))).map_err(|e| {
                    e.with_context(&format!("winsize {}", render_size(size).trim()))
                })?;
            }
            inner.size
        };
        if let Err(e) = c.resize(size).await {
            // Give back what the new size took (the old size was held before).
            let inner = self.inner.lock();
            if let (true, Some(old)) = (inner.status.is_running(), old) {
                let _ = inner.hold.resize(Amounts::run(cells(old)));
            }
            return Err(Error::from(e));
        }
        let shrunk = {
            let mut inner = self.inner.lock();
            inner.size = Some(size);
            match inner.screen.as_mut() {
                Some(s) => {
                    let before = cells(s.size());
                    s.resize(size);
                    cells(size) < before
                }
                None => false,
            }
        };
        if shrunk {
            crate::memtrim::after_large_free();
        }
        std::fs::write(self.dir.join(WINSIZE_FILE), render_size(size))?;
        self.bump();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_addressing_lands_on_the_right_cell() {
        let mut s = Screen::new(TtySize { cols: 40, rows: 8 });
        s.feed(b"junk\r\n\x1b[2J\x1b[5;10Hmarker");
        let text = s.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8);
        assert_eq!(lines[4], format!("{}marker", " ".repeat(9)));
        assert!(lines
            .iter()
            .enumerate()
            .all(|(i, l)| i == 4 || l.is_empty()));
        // Replaying the redraw on a fresh screen gives the same picture.
        let mut again = Screen::new(TtySize { cols: 40, rows: 8 });
        again.feed(&s.redraw());
        assert_eq!(again.text(), text);
        s.resize(TtySize { cols: 20, rows: 3 });
        assert_eq!(s.size(), TtySize { cols: 20, rows: 3 });
        assert_eq!(s.text().lines().count(), 3);
    }
}
