//! The line discipline of control files (`ctl`, `<vm>/ctl`, `runs/<n>/ctl`, `defaults`).
//!
//! Scripts write commands with `echo`, `printf`, `cat` and plain `write(2)`, and the kernel
//! hands us whatever chunks they wrote: a command may arrive in several writes, and one
//! write may carry several commands. A [`LineBuffer`] belongs to one open file description
//! and turns those chunks into whole lines.
//!
//! Invariants:
//! - A line is handed out only once its `\n` arrived (or, for the final line, at close:
//!   [`LineBuffer::take_final`]). No prefix of a line is ever handed out.
//! - No line longer than [`MAX_LINE`] bytes is ever handed out. The write that makes a
//!   line too long fails with `E2BIG` and hands out nothing, not even the complete lines
//!   before it in the same write; the rest of the overlong line (up to its `\n`) is
//!   dropped, and writes that consist only of that rest fail with `E2BIG` as well.
//! - Lines of one write are handed out together, in order; when the caller could not run
//!   one of them it calls [`LineBuffer::abandon`], which drops the unterminated tail of
//!   that write (its line is then skipped up to its `\n`), so the rest of a refused write
//!   never runs as a command of its own.
//! - Positional writes: the first write of a description may be at any offset (so
//!   `O_APPEND` works); every later write must start where the previous accepted write
//!   ended, or it fails with `ESPIPE` ([`LineBuffer::check_offset`]).
use crate::error::{Error, Result};

/// Longest command line accepted by a control file, in bytes (without the `\n`).
pub const MAX_LINE: usize = 64 * 1024;

/// Most bytes of user input quoted back in an error message.
pub const MAX_QUOTE: usize = 200;

/// `text` as a quoted string for an error message, cut to at most [`MAX_QUOTE`] bytes
/// (on a character boundary) with the full length noted.
pub fn quote(text: &str) -> String {
    if text.len() <= MAX_QUOTE {
        return format!("{text:?}");
    }
    let mut end = MAX_QUOTE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}... ({} bytes)", &text[..end], text.len())
}

/// Why bytes are being skipped up to the next newline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    No,
    /// The rest of a line longer than [`MAX_LINE`].
    Overlong,
    /// The rest of a write whose command failed.
    Refused,
}

/// Per-open-file line assembly (see the module docs).
#[derive(Debug)]
pub struct LineBuffer {
    partial: Vec<u8>,
    skip: Skip,
    /// Where the next write must start; `None` before the first accepted write.
    next_offset: Option<u64>,
}

impl Default for LineBuffer {
    fn default() -> Self {
        LineBuffer {
            partial: Vec::new(),
            skip: Skip::No,
            next_offset: None,
        }
    }
}

fn too_long() -> Error {
    Error::new(
        libc::E2BIG,
        format!(
            "command line longer than {MAX_LINE} bytes; nothing of it was run (end every \
             command with a newline; one command per line)"
        ),
    )
}

impl LineBuffer {
    /// Refuse a write that does not continue the previous one (`ESPIPE`).
    pub fn check_offset(&self, offset: u64) -> Result<()> {
        match self.next_offset {
            Some(next) if next != offset => Err(Error::new(
                libc::ESPIPE,
                format!(
                    "control files are written in sequence: this write is at offset \
                     {offset}, but the previous one ended at {next}"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Record that a write of `len` bytes at `offset` was accepted.
    pub fn advance(&mut self, offset: u64, len: usize) {
        self.next_offset = Some(offset + len as u64);
    }

    /// Append one write; returns the lines it completed (without their `\n`), in order.
    /// Fails with `E2BIG` (handing out nothing) when a line grows past [`MAX_LINE`].
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut rest = data;
        if self.skip != Skip::No {
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    rest = &rest[i + 1..];
                    self.skip = Skip::No;
                }
                None => {
                    return Err(match self.skip {
                        Skip::Overlong => too_long(),
                        _ => Error::invalid(
                            "this write continues a line that was refused; it was dropped",
                        ),
                    })
                }
            }
        }
        // Check every line of this write before handing out any.
        let mut ends = Vec::new();
        let mut start_len = self.partial.len();
        for (i, &b) in rest.iter().enumerate() {
            if b == b'\n' {
                ends.push(i);
                start_len = 0;
                continue;
            }
            start_len += 1;
            if start_len > MAX_LINE {
                self.partial.clear();
                // Skip to the end of the overlong line unless this write already holds it.
                // A write that ends mid-line: what follows, up to the next newline,
                // belongs to the refused write and is skipped.
                self.skip = if rest.ends_with(b"\n") {
                    Skip::No
                } else {
                    Skip::Overlong
                };
                return Err(too_long());
            }
        }
        let mut lines = Vec::with_capacity(ends.len());
        let mut from = 0;
        for end in ends {
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(&rest[from..end]);
            lines.push(line);
            from = end + 1;
        }
        self.partial.extend_from_slice(&rest[from..]);
        Ok(lines)
    }

    /// A line handed out by the last [`push`](Self::push) failed: the lines after it
    /// were not run and the unterminated tail of that write is dropped (skipped up to its
    /// newline), so it never runs on its own.
    pub fn abandon(&mut self) {
        if !self.partial.is_empty() {
            self.partial.clear();
            self.skip = Skip::Refused;
        }
    }

    /// Bytes of memory the unterminated line holds.
    pub fn held(&self) -> usize {
        self.partial.capacity()
    }

    /// Whether bytes of an unterminated line are waiting.
    pub fn has_partial(&self) -> bool {
        !self.partial.is_empty()
    }

    /// The final line without a newline, at close.
    pub fn take_final(&mut self) -> Option<Vec<u8>> {
        let line = std::mem::take(&mut self.partial);
        (!line.is_empty() && self.skip == Skip::No).then_some(line)
    }

    /// Drop an unterminated line without running it.
    pub fn discard_partial(&mut self) -> Option<Vec<u8>> {
        let line = std::mem::take(&mut self.partial);
        (!line.is_empty()).then_some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn push_all(lb: &mut LineBuffer, writes: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for w in writes {
            out.extend(lb.push(w).unwrap());
        }
        out
    }

    #[test]
    fn split_command_runs_once_whole() {
        let mut lb = LineBuffer::default();
        assert!(lb.push(b"create spl").unwrap().is_empty());
        assert_eq!(lb.push(b"it1\n").unwrap(), vec![b"create split1".to_vec()]);
        assert!(!lb.has_partial());
    }

    #[test]
    fn final_line_at_close() {
        let mut lb = LineBuffer::default();
        assert_eq!(
            push_all(&mut lb, &[b"pause\nres", b"ume"]),
            vec![b"pause".to_vec()]
        );
        assert_eq!(lb.take_final(), Some(b"resume".to_vec()));
        assert_eq!(lb.take_final(), None);
    }

    #[test]
    fn overlong_line_runs_nothing() {
        let mut lb = LineBuffer::default();
        let mut big = b"pause\ncreate ".to_vec();
        big.extend(std::iter::repeat_n(b'z', MAX_LINE));
        assert_eq!(lb.push(&big).unwrap_err().errno, libc::E2BIG);
        // The rest of the overlong line is refused too, then lines work again.
        assert_eq!(lb.push(b"zzzz").unwrap_err().errno, libc::E2BIG);
        assert_eq!(lb.push(b"zz\nresume\n").unwrap(), vec![b"resume".to_vec()]);
        // Exactly MAX_LINE is fine.
        let mut ok = vec![b'a'; MAX_LINE];
        ok.push(b'\n');
        assert_eq!(lb.push(&ok).unwrap().len(), 1);
    }

    #[test]
    fn overlong_line_ending_in_the_same_write() {
        let mut lb = LineBuffer::default();
        let mut big = vec![b'z'; MAX_LINE + 1];
        big.extend_from_slice(b"\nfoo\n");
        assert_eq!(lb.push(&big).unwrap_err().errno, libc::E2BIG);
        assert_eq!(lb.push(b"bar\n").unwrap(), vec![b"bar".to_vec()]);
    }

    #[test]
    fn abandon_drops_the_tail() {
        let mut lb = LineBuffer::default();
        let lines = lb.push(b"pause\nbogus\nresu").unwrap();
        assert_eq!(lines.len(), 2);
        lb.abandon();
        assert_eq!(lb.push(b"me\nkill\n").unwrap(), vec![b"kill".to_vec()]);
        assert_eq!(lb.take_final(), None);
    }

    #[test]
    fn offsets() {
        let mut lb = LineBuffer::default();
        lb.check_offset(4096).unwrap(); // O_APPEND: anywhere first
        lb.advance(4096, 6);
        lb.check_offset(4102).unwrap();
        assert_eq!(lb.check_offset(0).unwrap_err().errno, libc::ESPIPE);
    }

    #[test]
    fn quoting_is_bounded() {
        let q = quote(&"x".repeat(1_000_000));
        assert!(q.len() < 300, "{}", q.len());
        assert!(q.contains("1000000 bytes"));
        assert_eq!(quote("ab"), "\"ab\"");
        let q = quote(&"é".repeat(150)); // 300 bytes, cut on a char boundary
        assert!(q.ends_with("(300 bytes)"));
    }

    /// A command stream of whole lines; each line is one "command".
    fn stream() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::vec("[a-z]{1,8}( [a-z0-9=]{1,6}){0,3}", 1..12)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Random splits of a valid stream give exactly the lines one write gives, and
        /// every line handed out is a whole line of the stream (never a prefix).
        #[test]
        fn any_split_gives_the_same_lines(
            lines in stream(),
            cuts in proptest::collection::vec(0usize..400, 0..20),
            final_newline in any::<bool>(),
        ) {
            let mut text = lines.join("\n");
            if final_newline {
                text.push('\n');
            }
            let bytes = text.as_bytes();
            let mut one = LineBuffer::default();
            let mut expected = one.push(bytes).unwrap();
            expected.extend(one.take_final());

            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut lb = LineBuffer::default();
            let mut got = Vec::new();
            let mut from = 0;
            let mut offset = 0u64;
            for c in cuts.into_iter().chain([bytes.len()]) {
                let chunk = &bytes[from..c];
                lb.check_offset(offset).unwrap();
                got.extend(lb.push(chunk).unwrap());
                lb.advance(offset, chunk.len());
                offset += chunk.len() as u64;
                from = c;
            }
            got.extend(lb.take_final());
            prop_assert_eq!(&got, &expected);
            let whole: Vec<Vec<u8>> = lines.iter().map(|l| l.as_bytes().to_vec()).collect();
            prop_assert_eq!(got, whole);
        }

        /// With failing commands and overlong lines mixed in, whatever is handed out is
        /// still a whole line of the input: never a prefix, never a suffix.
        #[test]
        fn never_a_partial_line(
            lines in proptest::collection::vec(
                prop_oneof![
                    4 => "[a-z]{1,8}( [a-z]{1,6}){0,2}",
                    1 => Just("bad".to_string()),
                    1 => Just("y".repeat(MAX_LINE + 10)),
                ],
                1..10,
            ),
            cuts in proptest::collection::vec(0usize..200_000, 0..12),
        ) {
            let mut text = lines.join("\n");
            text.push('\n');
            let bytes = text.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut lb = LineBuffer::default();
            let mut from = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                if let Ok(got) = lb.push(&bytes[from..c]) {
                    for l in &got {
                        prop_assert!(l.len() <= MAX_LINE);
                        prop_assert!(lines.iter().any(|w| w.as_bytes() == &l[..]),
                            "ran a line that is not whole: {:?}", String::from_utf8_lossy(&l[..l.len().min(40)]));
                        if l == b"bad" {
                            lb.abandon();
                            break;
                        }
                    }
                }
                from = c;
            }
        }
    }
}
