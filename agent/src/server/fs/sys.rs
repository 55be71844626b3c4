//! The system calls the file service makes, as safe functions returning `Errno`.
//!
//! Most are `nix` calls (the agent's one system-call crate). Raw `libc` remains only
//! where nix lacks the call or the shape the callers need, each in one small wrapper
//! here: `name_to_handle_at`/`open_by_handle_at`, the extended-attribute calls, `utimensat`
//! with `AT_EMPTY_PATH` (nix's takes only "follow symlinks or not"), `fstatfs64` (nix's
//! `Statfs` hides `f_frsize`), and one raw `getdents64` into a byte buffer
//! (`nix::dir::Dir` hides the byte count and record offsets that `dir.rs` seeks back
//! with).
//!
//! Invariants:
//! * Every wrapper returns `Errno` on failure and never panics.
//! * Paths handed to the kernel are either validated single names (no `/`, no NUL, see
//!   [`crate::proto::fs::valid_name`]) resolved relative to a node's descriptor, or
//!   `/proc/self/fd/N` names of descriptors we own. No path is ever built from host input.
//! * Every descriptor we open has `O_CLOEXEC`, so commands never inherit them.
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode};
use nix::unistd::{Gid, Uid, Whence};

use crate::proto::fs::{Attr, Timespec};

/// `rc < 0` → the thread's errno.
fn cvt(rc: libc::c_int) -> Result<libc::c_int, Errno> {
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(rc)
    }
}

/// A byte-count result (`ssize_t`): negative → the thread's errno.
fn cvt_size(rc: libc::ssize_t) -> Result<usize, Errno> {
    usize::try_from(rc).map_err(|_| Errno::last())
}

/// A name (or xattr name) as a C string; `EINVAL` when it contains NUL.
pub(super) fn cstring(bytes: &[u8]) -> Result<CString, Errno> {
    CString::new(bytes).map_err(|_| Errno::EINVAL)
}

const EMPTY: &CStr = c"";

/// `openat(dir, name, flags | O_CLOEXEC, mode)`.
pub(super) fn openat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: i32,
    mode: u32,
) -> Result<OwnedFd, Errno> {
    nix::fcntl::openat(
        dir,
        name,
        OFlag::from_bits_retain(flags) | OFlag::O_CLOEXEC,
        Mode::from_bits_retain(mode),
    )
}

/// `lstat` of what a descriptor refers to (works on `O_PATH` descriptors and symlinks).
pub(super) fn stat_fd(fd: BorrowedFd<'_>) -> Result<FileStat, Errno> {
    nix::sys::stat::fstatat(
        fd,
        EMPTY,
        AtFlags::AT_EMPTY_PATH | AtFlags::AT_SYMLINK_NOFOLLOW,
    )
}

/// `lstat` of `name` in directory `dir`.
pub(super) fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> Result<FileStat, Errno> {
    nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
}

/// The wire form of a `stat` (negative sizes, which no filesystem reports, become 0;
/// counts beyond the wire's 32 bits saturate).
pub(super) fn to_attr(st: &FileStat) -> Attr {
    let ts = |sec: i64, nsec: i64| Timespec {
        sec,
        nsec: u32::try_from(nsec.clamp(0, 999_999_999)).unwrap_or(0),
    };
    Attr {
        ino: st.st_ino,
        size: u64::try_from(st.st_size).unwrap_or(0),
        blocks: u64::try_from(st.st_blocks).unwrap_or(0),
        atime: ts(st.st_atime, st.st_atime_nsec),
        mtime: ts(st.st_mtime, st.st_mtime_nsec),
        ctime: ts(st.st_ctime, st.st_ctime_nsec),
        mode: st.st_mode,
        nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev,
        blksize: u32::try_from(st.st_blksize.max(0)).unwrap_or(u32::MAX),
    }
}

/// `fchownat(fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`: changes the inode
/// `fd` refers to, symlinks included. `None` leaves an id alone.
pub(super) fn chown_fd(
    fd: BorrowedFd<'_>,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<(), Errno> {
    // -1 is "leave alone" to the kernel: never a real id (nix's `None` means it).
    let uid = uid.filter(|&u| u != u32::MAX).map(Uid::from_raw);
    let gid = gid.filter(|&g| g != u32::MAX).map(Gid::from_raw);
    nix::unistd::fchownat(
        fd,
        EMPTY,
        uid,
        gid,
        AtFlags::AT_EMPTY_PATH | AtFlags::AT_SYMLINK_NOFOLLOW,
    )
}

/// `utimensat(fd, "", times, AT_EMPTY_PATH)`: the inode `fd` refers to, symlinks
/// included (Linux ≥ 5.8 accepts `AT_EMPTY_PATH` here). `UTIME_NOW`/`UTIME_OMIT` pass
/// through.
pub(super) fn utimens_fd(fd: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> Result<(), Errno> {
    // SAFETY: the path is a NUL-terminated empty string and `times` points to the two
    // timespecs the call reads; both outlive the call, and `fd` is a descriptor we hold.
    cvt(unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// `utimensat(dir, name, times, 0)`: follows a final symlink (for `/proc/self/fd/N`
/// names, the node itself).
pub(super) fn utimens_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    times: &[libc::timespec; 2],
) -> Result<(), Errno> {
    use nix::sys::stat::UtimensatFlags;
    use nix::sys::time::TimeSpec;
    let [atime, mtime] = times.map(TimeSpec::from_timespec);
    nix::sys::stat::utimensat(dir, name, &atime, &mtime, UtimensatFlags::FollowSymlink)
}

/// `fstatfs` (raw: nix's `Statfs` has no accessor for `f_frsize`, which `statfs`
/// answers carry).
pub(super) fn fstatfs(fd: BorrowedFd<'_>) -> Result<libc::statfs64, Errno> {
    let mut buf = std::mem::MaybeUninit::<libc::statfs64>::zeroed();
    // SAFETY: `buf` is large enough for a statfs64 and is written by the kernel.
    cvt(unsafe { libc::fstatfs64(fd.as_raw_fd(), buf.as_mut_ptr()) })?;
    // SAFETY: fstatfs64 succeeded, so the kernel filled the buffer (it was zeroed anyway).
    Ok(unsafe { buf.assume_init() })
}

/// The mount id of the mount `fd` is on: the `mnt_id:` line of `/proc/self/fdinfo/N`
/// (the id `/proc/self/mountinfo` lists first; Linux ≥ 3.15).
pub(super) fn mount_id(fd: BorrowedFd<'_>) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// `lseek(fd, offset, whence)`.
pub(super) fn lseek(fd: BorrowedFd<'_>, offset: u64, whence: i32) -> Result<u64, Errno> {
    let whence = match whence {
        libc::SEEK_SET => Whence::SeekSet,
        libc::SEEK_CUR => Whence::SeekCur,
        libc::SEEK_END => Whence::SeekEnd,
        libc::SEEK_DATA => Whence::SeekData,
        libc::SEEK_HOLE => Whence::SeekHole,
        _ => return Err(Errno::EINVAL),
    };
    // The kernel refuses offsets beyond i64::MAX (as lseek(2) with a negative off_t did).
    let offset = i64::try_from(offset).map_err(|_| Errno::EINVAL)?;
    let pos = nix::unistd::lseek(fd, offset, whence)?;
    u64::try_from(pos).map_err(|_| Errno::EINVAL)
}

/// One raw `getdents64` call into `buf`; returns the number of bytes filled (0 = end).
pub(super) fn getdents64(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    // A negative result is -1 with errno set; anything else is a byte count.
    usize::try_from(rc).map_err(|_| Errno::last())
}

/// One entry parsed out of a `getdents64` buffer.
pub(super) struct RawDirent<'a> {
    pub ino: u64,
    pub off: u64,
    pub dtype: u8,
    pub name: &'a [u8],
}

/// Parse a `getdents64` buffer (`struct linux_dirent64` records). Malformed records end
/// the iteration.
pub(super) fn parse_dirents(buf: &[u8]) -> impl Iterator<Item = RawDirent<'_>> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        const HDR: usize = 19; // d_ino u64, d_off i64, d_reclen u16, d_type u8
        let rec = buf.get(pos..)?;
        if rec.len() < HDR {
            return None;
        }
        let ino = u64::from_ne_bytes(rec[0..8].try_into().ok()?);
        let off = i64::from_ne_bytes(rec[8..16].try_into().ok()?);
        let reclen = usize::from(u16::from_ne_bytes(rec[16..18].try_into().ok()?));
        if reclen < HDR || reclen > rec.len() {
            return None;
        }
        let dtype = rec[18];
        let raw_name = &rec[HDR..reclen];
        let nlen = raw_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(raw_name.len());
        pos += reclen;
        Some(RawDirent {
            ino,
            // The kernel's directory cookie, an opaque 64-bit value: kept bit for bit.
            off: u64::from_ne_bytes(off.to_ne_bytes()),
            dtype,
            name: &raw_name[..nlen],
        })
    })
}

/// A buffer as the (pointer, length) pair of an xattr call; an empty one is the null
/// pointer with length 0, which asks the kernel for the size.
fn xattr_buf(buf: &mut [u8]) -> (*mut libc::c_void, usize) {
    if buf.is_empty() {
        (std::ptr::null_mut(), 0)
    } else {
        (buf.as_mut_ptr().cast(), buf.len())
    }
}

/// `getxattr(path, name, buf)`; an empty `buf` asks for the size.
pub(super) fn getxattr(path: &CStr, name: &CStr, buf: &mut [u8]) -> Result<usize, Errno> {
    let (ptr, len) = xattr_buf(buf);
    // SAFETY: `path` and `name` are NUL-terminated; the kernel writes at most `len` bytes
    // to `ptr`, which is `buf` (or null with length 0, a size query).
    cvt_size(unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), ptr, len) })
}

/// `setxattr(path, name, value, flags)`.
pub(super) fn setxattr(path: &CStr, name: &CStr, value: &[u8], flags: i32) -> Result<(), Errno> {
    // SAFETY: `path` and `name` are NUL-terminated; the kernel reads `value.len()` bytes
    // of `value`; unknown flags are the kernel's to refuse.
    cvt(unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// `listxattr(path, buf)`; an empty `buf` asks for the size.
pub(super) fn listxattr(path: &CStr, buf: &mut [u8]) -> Result<usize, Errno> {
    let (ptr, len) = xattr_buf(buf);
    // SAFETY: `path` is NUL-terminated; the kernel writes at most `len` bytes to `ptr`,
    // which is `buf` (or null with length 0, a size query).
    cvt_size(unsafe { libc::listxattr(path.as_ptr(), ptr.cast(), len) })
}

/// `removexattr(path, name)`.
pub(super) fn removexattr(path: &CStr, name: &CStr) -> Result<(), Errno> {
    // SAFETY: `path` and `name` are NUL-terminated and outlive the call.
    cvt(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) }).map(drop)
}

/// Linux's `MAX_HANDLE_SZ`.
const MAX_HANDLE_SZ: usize = 128;
/// The same, as the `handle_bytes` field's type.
const MAX_HANDLE_BYTES: libc::c_uint = 128;

/// `struct file_handle` with room for the largest handle.
#[repr(C)]
struct RawHandle {
    handle_bytes: libc::c_uint,
    handle_type: libc::c_int,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// The kernel file handle of what `fd` refers to, as wire bytes (type, then handle; see
/// `proto::fs::FileHandle`). `EOPNOTSUPP` when its filesystem has none.
pub(super) fn name_to_handle(fd: BorrowedFd<'_>) -> Result<Vec<u8>, Errno> {
    let mut h = RawHandle {
        handle_bytes: MAX_HANDLE_BYTES,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `h` is a writable file_handle whose f_handle has `handle_bytes` bytes of
    // room; the path is an empty C string used with AT_EMPTY_PATH on a descriptor we hold.
    cvt(unsafe {
        libc::name_to_handle_at(
            fd.as_raw_fd(),
            c"".as_ptr(),
            (&mut h as *mut RawHandle).cast::<libc::file_handle>(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    })?;
    let n = usize::try_from(h.handle_bytes).map_or(MAX_HANDLE_SZ, |n| n.min(MAX_HANDLE_SZ));
    let mut out = Vec::with_capacity(4 + n);
    out.extend_from_slice(&h.handle_type.to_le_bytes());
    out.extend_from_slice(&h.f_handle[..n]);
    Ok(out)
}

/// Open (`O_PATH`) the inode a handle from [`name_to_handle`] names, on the filesystem of
/// `mount`. Malformed bytes are `ESTALE` (the caller also checks what it got).
pub(super) fn open_by_handle(mount: BorrowedFd<'_>, wire: &[u8]) -> Result<OwnedFd, Errno> {
    if wire.len() < 4 || wire.len() > 4 + MAX_HANDLE_SZ {
        return Err(Errno::ESTALE);
    }
    let mut h = RawHandle {
        handle_bytes: libc::c_uint::try_from(wire.len() - 4).map_err(|_| Errno::ESTALE)?,
        handle_type: libc::c_int::from_le_bytes([wire[0], wire[1], wire[2], wire[3]]),
        f_handle: [0; MAX_HANDLE_SZ],
    };
    h.f_handle[..wire.len() - 4].copy_from_slice(&wire[4..]);
    // SAFETY: `h` is a valid file_handle with `handle_bytes` initialised bytes; the result
    // is a new descriptor we take ownership of.
    let fd = cvt(unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            (&mut h as *mut RawHandle).cast::<libc::file_handle>(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `/proc/self/fd` opened once, to re-open nodes by descriptor number (like virtiofsd).
pub(super) struct ProcFd(OwnedFd);

impl ProcFd {
    pub fn open() -> Result<ProcFd, Errno> {
        let fd = openat(
            nix::fcntl::AT_FDCWD,
            c"/proc/self/fd",
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )?;
        Ok(ProcFd(fd))
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.0.as_fd()
    }

    /// The entry naming `fd` relative to `/proc/self/fd`.
    pub fn name(fd: BorrowedFd<'_>) -> CString {
        // A decimal number never contains NUL.
        CString::new(fd.as_raw_fd().to_string()).unwrap_or_default()
    }

    /// The absolute `/proc/self/fd/N` path of `fd` (for calls without an `*at` form).
    pub fn path(fd: BorrowedFd<'_>) -> CString {
        CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
    }

    /// Open what `fd` refers to anew with `flags` (the magic link is followed, so an
    /// `O_PATH` descriptor of a symlink yields the symlink itself, never its target).
    pub fn reopen(&self, fd: BorrowedFd<'_>, flags: i32) -> Result<OwnedFd, Errno> {
        openat(self.fd(), &Self::name(fd), flags & !libc::O_NOFOLLOW, 0)
    }
}

/// `RLIMIT_NOFILE` (soft, hard) as it was before [`raise_nofile_limit`] (what commands
/// get).
static ORIGINAL_NOFILE: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();

/// The `RLIMIT_NOFILE` (soft, hard) the process had before the file service raised it,
/// to restore in commands (a command must not inherit a soft limit of a million
/// descriptors).
pub(crate) fn original_nofile_limit() -> Option<(u64, u64)> {
    ORIGINAL_NOFILE.get().copied()
}

/// Raise `RLIMIT_NOFILE` (every node holds a descriptor): to `fs.nr_open` when we may
/// raise the hard limit (root; in the guest the kernel's default hard limit is only
/// 4096), else to the hard limit.
pub(super) fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    // Unlimited is RLIM_INFINITY (u64::MAX), larger than any count.
    let Ok((cur, max)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let _ = ORIGINAL_NOFILE.set((cur, max));
    let set = |to: u64| setrlimit(Resource::RLIMIT_NOFILE, to, to);
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if nr_open > max && set(nr_open).is_ok() {
        return;
    }
    if cur < max {
        if let Err(e) = set(max) {
            tracing::warn!("cannot raise RLIMIT_NOFILE to {max}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn record(ino: u64, off: i64, dtype: u8, name: &[u8]) -> Vec<u8> {
        let reclen = (19 + name.len() + 1 + 7) & !7;
        let mut r = Vec::with_capacity(reclen);
        r.extend_from_slice(&ino.to_ne_bytes());
        r.extend_from_slice(&off.to_ne_bytes());
        r.extend_from_slice(&u16::try_from(reclen).unwrap().to_ne_bytes());
        r.push(dtype);
        r.extend_from_slice(name);
        r.resize(reclen, 0);
        r
    }

    #[test]
    fn parses_dirent_records_and_stops_at_garbage() {
        let mut buf = record(5, 10, libc::DT_DIR, b".");
        buf.extend(record(7, 20, libc::DT_REG, b"caf\xe9"));
        buf.extend([1, 2, 3]); // truncated trailing record
        let v: Vec<_> = parse_dirents(&buf)
            .map(|e| (e.ino, e.off, e.dtype, e.name.to_vec()))
            .collect();
        assert_eq!(
            v,
            vec![
                (5, 10, libc::DT_DIR, b".".to_vec()),
                (7, 20, libc::DT_REG, b"caf\xe9".to_vec())
            ]
        );
        // A record claiming to be longer than the buffer ends the iteration.
        let mut bad = record(1, 1, 0, b"x");
        bad[16..18].copy_from_slice(&1000u16.to_ne_bytes());
        assert_eq!(parse_dirents(&bad).count(), 0);
    }

    #[test]
    fn getdents_of_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..50 {
            std::fs::write(dir.path().join(format!("f{i}")), b"").unwrap();
        }
        let d = std::fs::File::open(dir.path()).unwrap();
        let mut buf = vec![0u8; 1024];
        let mut names = Vec::new();
        loop {
            let n = getdents64(d.as_fd(), &mut buf).unwrap();
            if n == 0 {
                break;
            }
            names.extend(parse_dirents(&buf[..n]).map(|e| e.name.to_vec()));
        }
        assert_eq!(names.len(), 52);
        assert!(names.contains(&b"f49".to_vec()));
    }
}
