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
use bandsox_agent::proto::TtySize;

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
