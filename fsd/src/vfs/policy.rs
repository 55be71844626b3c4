//! Who may do what in the control tree: every access and ownership rule the tree
//! applies beyond the kernel's own permission checks, and the errno of each operation
//! the control tree does not have.
//!
//! Invariants: a refusal is decided here before anything changes (bad input leaves the
//! state as it was); every refusal is an [`Error`] with an errno and a readable line, so
//! the kernel adapter logs it like any other failure. Root (uid 0) may do everything the
//! owner may.
use crate::error::{Error, Result};

/// Removing a VM or a snapshot: only its owner or root. (The root and `snapshots/` are
/// sticky, so the kernel already refuses others; this is the daemon's own check.)
pub fn may_remove(caller_uid: u32, owner_uid: u32, what: &str) -> Result<()> {
    if caller_uid == 0 || caller_uid == owner_uid {
        Ok(())
    } else {
        Err(Error::new(
            libc::EPERM,
            format!("{what} belongs to uid {owner_uid}; only its owner or root may remove it"),
        ))
    }
}

/// Whether a listing (`ls /mnt/bandsox`, `ls snapshots/`) shows `viewer` an entry that
/// belongs to `owner`: its owner's and root's only, as `events` and `usage` do. Listings
/// are computed per call for the caller, so this hides names from others' listings; a
/// name that is known still resolves for everyone (the kernel's name cache is shared by
/// all users, so a lookup cannot answer per caller), showing only the directory's owner,
/// mode (0700) and time, and taking it again says EEXIST.
pub fn lists(viewer_uid: u32, owner_uid: u32) -> bool {
    viewer_uid == 0 || viewer_uid == owner_uid
}

/// `mkdir` anywhere but the root (VMs are the only directories users make).
pub fn mkdir_outside_root() -> Error {
    Error::new(
        libc::EPERM,
        "only VMs are made with mkdir, in the root of the tree",
    )
}

/// `rmdir` of a run directory: runs go with their VM.
pub fn rmdir_run() -> Error {
    Error::new(libc::EPERM, "runs cannot be removed; they go with their VM")
}

/// Ownership and mode of control files are fixed.
pub fn chown_chmod() -> Error {
    Error::new(libc::EPERM, "the owner and mode of control files are fixed")
}

/// `unlink`, `mknod`, `symlink`, `link` and `rename` inside the control tree.
pub fn no_such_change(op: &str) -> Error {
    Error::new(
        libc::EPERM,
        format!("{op}: the control tree's names are fixed"),
    )
}

/// `link` or `rename` between a VM's `fs/` and the control tree (or another VM).
pub fn cross_device(op: &str) -> Error {
    Error::new(
        libc::EXDEV,
        format!("{op}: between the control tree and a VM's fs/"),
    )
}

/// `create` (open with `O_CREAT` of a new name) in the control tree.
pub fn create() -> Error {
    Error::new(
        libc::EACCES,
        "files cannot be created in the control tree (mkdir NAME makes a VM)",
    )
}

/// Control files carry no extended attributes: reading or removing one.
pub fn no_xattr() -> Error {
    Error::new(libc::ENODATA, "control files carry no extended attributes")
}

/// Control files carry no extended attributes: setting one.
pub fn set_xattr() -> Error {
    Error::new(libc::ENOTSUP, "control files carry no extended attributes")
}

/// `fallocate` of a control file.
pub fn fallocate() -> Error {
    Error::new(libc::EOPNOTSUPP, "control files have no space to allocate")
}

/// `lseek` with `SEEK_DATA`/`SEEK_HOLE` on a control file.
pub fn lseek() -> Error {
    Error::new(libc::EINVAL, "control files have no holes to seek")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_show_own_entries_and_root_sees_all() {
        assert!(lists(0, 1000));
        assert!(lists(1000, 1000));
        assert!(!lists(1001, 1000));
        assert!(!lists(1000, 0), "root's VMs are root's");
    }

    #[test]
    fn only_owner_or_root_removes() {
        assert!(may_remove(0, 1000, "x").is_ok());
        assert!(may_remove(1000, 1000, "x").is_ok());
        assert_eq!(may_remove(1001, 1000, "x").unwrap_err().errno, libc::EPERM);
    }
}
