//! Pseudo filesystems (proc, sysfs, devtmpfs, ...) are *opaque*: a mount point of one is
//! shown with its real attributes, but lookups in it are `ENOENT`, its listing is only
//! `.` and `..`, and creating or opening anything in it is `EACCES`. This keeps
//! `find fs/` or `cp -a fs/` out of the guest's /proc, /sys and /dev.
//!
//! Invariants:
//! * Only a lookup that crosses into another device (`st_dev` differs from the parent's)
//!   is classified; the root itself is never opaque.
//! * The filesystem type comes from `/proc/self/mountinfo` (by `statx` mount id), because
//!   devtmpfs reports tmpfs's `f_type`; without it the `statfs` magic number decides.
use std::os::fd::BorrowedFd;

use super::sys;

/// Filesystem types (as in `/proc/self/mountinfo`) that are opaque.
pub(super) const OPAQUE_TYPES: &[&str] = &[
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "configfs",
    "bpf",
    "mqueue",
    "pstore",
    "fusectl",
    "binfmt_misc",
    "efivarfs",
    "hugetlbfs",
];

/// `statfs` `f_type` magic numbers of the opaque types (devtmpfs has none of its own).
pub(super) const OPAQUE_MAGICS: &[i64] = &[
    0x9fa0,     // proc
    0x62656572, // sysfs
    0x1cd1,     // devpts
    0x27e0eb,   // cgroup
    0x63677270, // cgroup2
    0x73636673, // securityfs
    0x64626720, // debugfs
    0x74726163, // tracefs
    0x62656570, // configfs
    0xcafe4a11, // bpf
    0x19800202, // mqueue
    0x6165676c, // pstore
    0x65735543, // fusectl
    0x42494e4d, // binfmt_misc
    0xde5e81e4, // efivarfs
    0x958458f6, // hugetlbfs
];

/// Is a filesystem of this type opaque?
pub(super) fn opaque_type(fstype: &str) -> bool {
    OPAQUE_TYPES.contains(&fstype)
}

/// Is a filesystem with this `f_type` opaque?
pub(super) fn opaque_magic(f_type: i64) -> bool {
    OPAQUE_MAGICS.contains(&f_type)
}

/// The filesystem type of mount `id` in a `/proc/self/mountinfo` text.
pub(super) fn mountinfo_fstype(mountinfo: &str, id: u64) -> Option<&str> {
    mountinfo.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let mid = fields.next()?.parse::<u64>().ok()?;
        if mid != id {
            return None;
        }
        let (_, after) = line.split_once(" - ")?;
        after.split(' ').next()
    })
}

/// Is the filesystem `fd` is on opaque?
pub(super) fn is_opaque(fd: BorrowedFd<'_>) -> bool {
    if let Some(id) = sys::mount_id(fd) {
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            if let Some(t) = mountinfo_fstype(&info, id) {
                return opaque_type(t);
            }
        }
    }
    match sys::fstatfs(fd) {
        Ok(st) => opaque_magic(st.f_type),
        Err(e) => {
            tracing::debug!("fstatfs for classification failed: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn classification_by_type_and_magic() {
        for t in [
            "proc", "sysfs", "devtmpfs", "devpts", "cgroup2", "bpf", "tracefs",
        ] {
            assert!(opaque_type(t), "{t}");
        }
        for t in [
            "ext4", "tmpfs", "xfs", "overlay", "btrfs", "9p", "virtiofs", "fuse",
        ] {
            assert!(!opaque_type(t), "{t}");
        }
        assert!(opaque_magic(0x9fa0));
        assert!(opaque_magic(0x62656572));
        assert!(!opaque_magic(0xef53)); // ext4
        assert!(!opaque_magic(0x01021994)); // tmpfs
    }

    #[test]
    fn mountinfo_parsing() {
        let info = "22 1 0:21 / /proc rw,nosuid shared:5 - proc proc rw\n\
                    23 1 0:5 / /dev rw,nosuid shared:2 - devtmpfs devtmpfs rw,size=1k\n\
                    24 1 8:1 / / rw,relatime shared:1 master:3 - ext4 /dev/vda rw\n";
        assert_eq!(mountinfo_fstype(info, 22), Some("proc"));
        assert_eq!(mountinfo_fstype(info, 23), Some("devtmpfs"));
        assert_eq!(mountinfo_fstype(info, 24), Some("ext4"));
        assert_eq!(mountinfo_fstype(info, 25), None);
    }

    #[test]
    fn real_mounts() {
        let proc = std::fs::File::open("/proc").unwrap();
        assert!(is_opaque(proc.as_fd()));
        let tmp = std::fs::File::open(std::env::temp_dir()).unwrap();
        assert!(!is_opaque(tmp.as_fd()));
    }
}
