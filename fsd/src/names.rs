//! Validation of user-chosen names (VMs, snapshots, images).
//!
//! A valid name is 1..=64 bytes of ASCII letters, digits, `.`, `_` and `-`, does not
//! start with `.` or `-`, and is not one of the names the tree reserves. Names are used
//! as directory entries in the mount and in log lines, never as host paths (state
//! directories are keyed by ids), but keeping them boring keeps both safe.
use crate::error::{Error, Result};

pub const MAX_NAME_LEN: usize = 64;

/// Entries of the root directory that a VM may not shadow.
pub const RESERVED: &[&str] = &[
    "README",
    "ctl",
    "defaults",
    "pools",
    "events",
    "usage",
    "images",
    "snapshots",
    "fs",
    "runs",
    "exec",
    "state",
    "info",
    "console",
    "last",
];

/// Check a name for a VM, snapshot or image; `what` names the kind in messages.
pub fn validate(what: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(format!("{what} name is empty")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(format!(
            "{what} name is {} bytes long; at most {MAX_NAME_LEN} are accepted",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(Error::invalid(format!(
            "{what} name {name:?} contains {c:?}; use letters, digits, '.', '_' and '-'"
        )));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(Error::invalid(format!(
            "{what} name {name:?} may not start with '.' or '-'"
        )));
    }
    if RESERVED.contains(&name) {
        return Err(Error::invalid(format!("{what} name {name:?} is reserved")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["a", "vm-1", "web.2", "A_b", &"x".repeat(64)] {
            assert!(validate("VM", n).is_ok(), "{n}");
        }
    }

    #[test]
    fn rejects_bad_names() {
        for n in [
            "",
            "a/b",
            "..",
            ".",
            "-x",
            ".hidden",
            "ctl",
            "images",
            "a b",
            "tab\t",
            "nl\n",
            "é",
            &"x".repeat(65),
        ] {
            let e = validate("VM", n).unwrap_err();
            assert_eq!(e.errno, libc::EINVAL, "{n}");
        }
    }
}
