//! Per-command options of `exec`: an optional first line `#bandsox key=value ...`.
//!
//! ```text
//! #bandsox tty=120x40 env=LANG=C.UTF-8 env='GREETING=hello world' cwd=/srv user=app timeout=30
//! make test
//! ```
//!
//! Invariants:
//! - Parsing has no side effects, and a script whose options line has any error (an
//!   unknown key, a bad value, a key other than `env` given twice) is refused whole
//!   (EINVAL naming the problem): nothing runs.
//! - The options line is removed from the script the guest runs; the run's `cmd` file
//!   shows what was written, options line included.
//! - Words are split like a POSIX shell splits them (`shlex`), so values may be quoted.
//! - A script without an options line runs exactly as before (every option unset).
use std::time::Duration;

use bandsox_agent::proto::{TtySize, MAX_TTY_DIM};

use crate::error::{Error, Result};
use crate::lines::quote;

/// The first word of an options line.
pub const PREFIX: &str = "#bandsox";

/// Longest accepted timeout (a year); longer ones are surely a mistake.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(366 * 24 * 3600);

pub const HELP: &str = "accepted: env=KEY=VALUE (repeatable), cwd=DIR, user=USER[:GROUP], \
                        timeout=SECONDS|none, tty=COLSxROWS, wait=0|1";

/// A timeout setting: `None` = not given (the VM's `exec_timeout` applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutOpt {
    /// `timeout=none`: no timeout, whatever the VM's default.
    Off,
    After(Duration),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOpts {
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    pub cwd: Option<Vec<u8>>,
    pub user: Option<String>,
    pub timeout: Option<TimeoutOpt>,
    pub tty: Option<TtySize>,
    /// Whether a write-only `exec`'s close waits for the command (default: yes, except
    /// for terminal runs, which are driven through their `terminal` file).
    pub wait: Option<bool>,
}

impl ExecOpts {
    /// Whether a write-only `exec`'s close waits for the command.
    pub fn waits(&self) -> bool {
        self.wait.unwrap_or(self.tty.is_none())
    }
}

/// Parse `COLSxROWS` (both 1..=1000).
pub fn parse_size(text: &str) -> Result<TtySize> {
    let t = text.trim();
    let bad = || {
        Error::invalid(format!(
            "window size {}: expected COLSxROWS, each 1..{MAX_TTY_DIM} (e.g. 80x24)",
            quote(t)
        ))
    };
    let (c, r) = t.split_once(['x', 'X']).ok_or_else(bad)?;
    let num = |s: &str| -> Result<u16> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: u32 = s.parse().map_err(|_| bad())?;
        if n == 0 || n > u32::from(MAX_TTY_DIM) {
            return Err(bad());
        }
        u16::try_from(n).map_err(|_| bad())
    };
    Ok(TtySize {
        cols: num(c)?,
        rows: num(r)?,
    })
}

/// Parse a duration in seconds (`10`, `0.5`, at least 0.001) or `none` (no timeout).
/// Zero is refused rather than read as "no timeout": write `none` for that.
pub fn parse_timeout(key: &str, text: &str) -> Result<TimeoutOpt> {
    if text == "none" {
        return Ok(TimeoutOpt::Off);
    }
    if text.parse::<f64>().is_ok_and(|s| s == 0.0) {
        return Err(Error::invalid(format!(
            "{key}={text}: a timeout must be at least 0.001 seconds; write {key}=none for no timeout"
        )));
    }
    let secs: f64 = text
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s > 0.0)
        .ok_or_else(|| {
            Error::invalid(format!(
                "{key}={}: expected seconds (e.g. 30 or 0.5) or none",
                quote(text)
            ))
        })?;
    let d = Duration::from_secs_f64(secs.min(MAX_TIMEOUT.as_secs_f64() + 1.0));
    if d > MAX_TIMEOUT {
        return Err(Error::invalid(format!(
            "{key}={text}: at most {} seconds",
            MAX_TIMEOUT.as_secs()
        )));
    }
    if d < Duration::from_millis(1) {
        return Err(Error::invalid(format!(
            "{key}={text}: at least 0.001 seconds"
        )));
    }
    Ok(TimeoutOpt::After(d))
}

/// Split a script into its options and the script to run. Without an options line the
/// script is returned unchanged.
pub fn split(script: &[u8]) -> Result<(ExecOpts, Vec<u8>)> {
    let (first, rest) = match script.iter().position(|&b| b == b'\n') {
        Some(i) => (&script[..i], &script[i + 1..]),
        None => (script, &[][..]),
    };
    let Some(after) = first.strip_prefix(PREFIX.as_bytes()) else {
        return Ok((ExecOpts::default(), script.to_vec()));
    };
    if !after.is_empty() && !after[0].is_ascii_whitespace() {
        // `#bandsoxfoo`: an ordinary comment.
        return Ok((ExecOpts::default(), script.to_vec()));
    }
    let line = std::str::from_utf8(after)
        .map_err(|_| Error::invalid("the #bandsox options line is not UTF-8"))?;
    let opts = parse_line(line)?;
    if rest.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Error::invalid(
            "the #bandsox options line is not followed by a command",
        ));
    }
    Ok((opts, rest.to_vec()))
}

/// Check the options line as soon as it is complete (the first `\n` was written), so
/// the `write(2)` that completed a bad one fails with EINVAL (a shell ignores the result
/// of `close`). `Ok(None)`: not complete yet; `Ok(Some(options))` once it is (every
/// option unset when the script has no options line).
pub fn check_first_line(script: &[u8]) -> Result<Option<ExecOpts>> {
    let Some(i) = script.iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    let first = &script[..i];
    if let Some(after) = first.strip_prefix(PREFIX.as_bytes()) {
        if after.is_empty() || after[0].is_ascii_whitespace() {
            let line = std::str::from_utf8(after)
                .map_err(|_| Error::invalid("the #bandsox options line is not UTF-8"))?;
            return parse_line(line).map(Some);
        }
    }
    Ok(Some(ExecOpts::default()))
}

/// Parse the words after `#bandsox`.
pub fn parse_line(line: &str) -> Result<ExecOpts> {
    let words = shlex::split(line).ok_or_else(|| {
        Error::invalid(format!(
            "#bandsox options: unbalanced quotes in {}",
            quote(line)
        ))
    })?;
    let mut o = ExecOpts::default();
    let mut seen: Vec<String> = Vec::new();
    for w in &words {
        let (k, v) = w.split_once('=').ok_or_else(|| {
            Error::invalid(format!("#bandsox: {} is not key=value; {HELP}", quote(w)))
        })?;
        if k != "env" {
            if seen.iter().any(|s| s == k) {
                return Err(Error::invalid(format!("#bandsox: {k} given twice")));
            }
            seen.push(k.to_string());
        }
        let nul = |what: &str| -> Result<()> {
            if v.contains('\0') {
                return Err(Error::invalid(format!("#bandsox: {what} contains a NUL")));
            }
            Ok(())
        };
        match k {
            "env" => {
                nul("env")?;
                let (ek, ev) = v.split_once('=').ok_or_else(|| {
                    Error::invalid(format!("#bandsox: env={}: expected KEY=VALUE", quote(v)))
                })?;
                if ek.is_empty() {
                    return Err(Error::invalid("#bandsox: env= with an empty name"));
                }
                o.env.push((ek.as_bytes().to_vec(), ev.as_bytes().to_vec()));
            }
            "cwd" => {
                nul("cwd")?;
                if v.is_empty() {
                    return Err(Error::invalid("#bandsox: cwd= is empty"));
                }
                o.cwd = Some(v.as_bytes().to_vec());
            }
            "user" => {
                nul("user")?;
                if v.trim().is_empty() {
                    return Err(Error::invalid("#bandsox: user= is empty"));
                }
                o.user = Some(v.to_string());
            }
            "timeout" => o.timeout = Some(parse_timeout("timeout", v)?),
            "tty" => o.tty = Some(parse_size(v)?),
            "wait" => {
                o.wait = Some(match v {
                    "1" | "yes" | "true" => true,
                    "0" | "no" | "false" => false,
                    _ => {
                        return Err(Error::invalid(format!(
                            "#bandsox: wait={}: expected 0 or 1",
                            quote(v)
                        )))
                    }
                })
            }
            _ => {
                return Err(Error::invalid(format!(
                    "#bandsox: unknown option {}; {HELP}",
                    quote(k)
                )))
            }
        }
    }
    Ok(o)
}

/// Quote `s` for an options line or a shell command line.
pub fn shell_quote(s: &str) -> String {
    match shlex::try_quote(s) {
        Ok(q) => q.into_owned(),
        // Only NUL cannot be quoted; the parser refuses it anyway.
        Err(_) => format!("'{}'", s.replace('\'', "'\\''")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("80x24").unwrap(), TtySize { cols: 80, rows: 24 });
        assert_eq!(
            parse_size(" 1000x1000\n").unwrap(),
            TtySize {
                cols: 1000,
                rows: 1000
            }
        );
        for bad in [
            "0x24", "80x0", "-1x24", "80x-5", "1001x10", "10x1001", "80", "x", "", "80x24x1",
            "8 0x24",
        ] {
            let e = parse_size(bad).unwrap_err();
            assert_eq!(e.errno, libc::EINVAL, "{bad}");
        }
    }

    #[test]
    fn options_line() {
        let (o, s) = split(
            b"#bandsox tty=100x30 env=A=1 env='B=two words' cwd=/tmp user=nobody timeout=1.5 wait=1\nmake\n",
        )
        .unwrap();
        assert_eq!(s, b"make\n");
        assert_eq!(
            o.tty,
            Some(TtySize {
                cols: 100,
                rows: 30
            })
        );
        assert_eq!(
            o.env,
            vec![
                (b"A".to_vec(), b"1".to_vec()),
                (b"B".to_vec(), b"two words".to_vec())
            ]
        );
        assert_eq!(o.cwd.as_deref(), Some(&b"/tmp"[..]));
        assert_eq!(o.user.as_deref(), Some("nobody"));
        assert_eq!(
            o.timeout,
            Some(TimeoutOpt::After(Duration::from_millis(1500)))
        );
        assert!(o.waits());
        // No options line: unchanged.
        let (o, s) = split(b"#!/bin/sh\nexit 3\n").unwrap();
        assert_eq!(o, ExecOpts::default());
        assert_eq!(s, b"#!/bin/sh\nexit 3\n");
        let (_, s) = split(b"#bandsoxy\necho").unwrap();
        assert_eq!(s, b"#bandsoxy\necho");
        // A terminal run does not make close wait unless asked.
        let (o, _) = split(b"#bandsox tty=80x24\nsh").unwrap();
        assert!(!o.waits());
        let (o, _) = split(b"#bandsox timeout=none\nsh").unwrap();
        assert_eq!(o.timeout, Some(TimeoutOpt::Off));
        // The options of a complete first line, as soon as it is complete.
        assert_eq!(check_first_line(b"#bandsox tty=10x5").unwrap(), None);
        let o = check_first_line(b"#bandsox tty=10x5\nsh").unwrap().unwrap();
        assert_eq!(o.tty, Some(TtySize { cols: 10, rows: 5 }));
        assert_eq!(
            check_first_line(b"echo hi\n").unwrap(),
            Some(ExecOpts::default())
        );
        let e = check_first_line(b"#bandsox timeout=0\n").unwrap_err();
        assert!(e.message.contains("timeout=none"), "{}", e.message);
    }

    #[test]
    fn bad_options_are_refused() {
        for bad in [
            "#bandsox color=red\necho",
            "#bandsox tty=0x0\necho",
            "#bandsox tty=2000x10\necho",
            "#bandsox timeout=-1\necho",
            "#bandsox timeout=abc\necho",
            "#bandsox timeout=1 timeout=2\necho",
            "#bandsox timeout=0\necho",
            "#bandsox timeout=0.0\necho",
            "#bandsox timeout=0.0001\necho",
            "#bandsox env=NOVALUE\necho",
            "#bandsox env==x\necho",
            "#bandsox cwd=\necho",
            "#bandsox user=\necho",
            "#bandsox wait=maybe\necho",
            "#bandsox 'unbalanced\necho",
            "#bandsox tty=80x24\n",
            "#bandsox tty=80x24",
            "#bandsox justaword\necho",
        ] {
            let e = split(bad.as_bytes()).unwrap_err();
            assert_eq!(e.errno, libc::EINVAL, "{bad}");
        }
    }

    #[test]
    fn quoting_roundtrips() {
        for s in ["plain", "two words", "it's", "$HOME", "a\"b", ""] {
            let line = format!("env={}", shell_quote(&format!("K={s}")));
            let o = parse_line(&line).unwrap();
            assert_eq!(o.env[0].1, s.as_bytes(), "{line}");
        }
    }
}
