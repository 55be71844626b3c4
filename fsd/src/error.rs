//! The daemon's one error type: an errno plus one readable line.
//!
//! Every failure a user can trigger through the tree ends up here. The errno is what the
//! syscall returns (so the shell prints e.g. "write error: Invalid argument"); the message
//! is what `cat ctl` shows afterwards. Conversions from lower layers choose the errno
//! explicitly, never by accident.
use std::fmt;

use bandsox_agent::client::ClientError;

use crate::vmm::VmmError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub errno: i32,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        Error {
            errno,
            message: message.into(),
        }
    }
    /// EINVAL: unknown command, bad argument, bad name.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(libc::EINVAL, message)
    }
    /// ENOENT: unknown VM, image, snapshot or run.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(libc::ENOENT, message)
    }
    /// EEXIST: name taken.
    pub fn exists(message: impl Into<String>) -> Self {
        Self::new(libc::EEXIST, message)
    }
    /// EBUSY: the VM is in the wrong state for this.
    pub fn busy(message: impl Into<String>) -> Self {
        Self::new(libc::EBUSY, message)
    }
    /// EHOSTDOWN: the guest cannot be reached (stopped, paused, dead).
    pub fn host_down(message: impl Into<String>) -> Self {
        Self::new(libc::EHOSTDOWN, message)
    }
    /// ETIMEDOUT: a deadline passed.
    pub fn timed_out(message: impl Into<String>) -> Self {
        Self::new(libc::ETIMEDOUT, message)
    }
    /// EIO: an internal or host-side failure.
    pub fn io(message: impl Into<String>) -> Self {
        Self::new(libc::EIO, message)
    }
    /// EINTR: the waiting process got a signal.
    pub fn interrupted() -> Self {
        Self::new(libc::EINTR, "interrupted")
    }
    /// EROFS / EACCES style refusals of writes to read-only files.
    pub fn read_only(what: &str) -> Self {
        Self::new(libc::EACCES, format!("{what} is read-only"))
    }
    pub fn with_context(mut self, ctx: &str) -> Self {
        self.message = format!("{ctx}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::new(e.raw_os_error().unwrap_or(libc::EIO), e.to_string())
    }
}

impl From<VmmError> for Error {
    fn from(e: VmmError) -> Self {
        let errno = match &e {
            VmmError::Unavailable(_) => libc::ENOSYS,
            VmmError::StartFailed(_) => libc::EIO,
            VmmError::NotRunning => libc::EHOSTDOWN,
            VmmError::Refused { .. } => libc::EIO,
            VmmError::Timeout(..) => libc::ETIMEDOUT,
            VmmError::Io(_, err) => err.raw_os_error().unwrap_or(libc::EIO),
            VmmError::Unsupported(_) => libc::EOPNOTSUPP,
            VmmError::Incompatible(_) => libc::EINVAL,
        };
        Error::new(errno, e.to_string())
    }
}

impl From<ClientError> for Error {
    fn from(e: ClientError) -> Self {
        let errno = match &e {
            ClientError::Timeout => libc::ETIMEDOUT,
            ClientError::Closed => libc::EHOSTDOWN,
            ClientError::Remote { errno, .. } if *errno > 0 => *errno,
            _ => libc::EIO,
        };
        let message = match &e {
            ClientError::Closed => "the guest agent connection is gone".to_string(),
            ClientError::Timeout => "the guest agent did not answer in time".to_string(),
            other => other.to_string(),
        };
        Error::new(errno, message)
    }
}

/// The one errno → HTTP status table of the HTTP adapter (`crate::http`), beside the
/// errno choices above so both adapters read the same error. docs/api.md has it as a
/// table. Privacy is decided before this table: another user's VM, snapshot or run is
/// reported as ENOENT (404), never EACCES.
pub fn http_status(errno: i32) -> u16 {
    match errno {
        libc::ENOENT | libc::ESRCH | libc::ENXIO => 404,
        libc::EACCES | libc::EPERM | libc::EROFS => 403,
        libc::EEXIST | libc::ENOTEMPTY | libc::EBUSY | libc::EHOSTDOWN | libc::ESTALE => 409,
        libc::EINVAL
        | libc::ENAMETOOLONG
        | libc::ENOTDIR
        | libc::EISDIR
        | libc::ELOOP
        | libc::EXDEV
        | libc::ERANGE
        | libc::ENOTTY
        | libc::EBADF
        | libc::ESPIPE
        | libc::ENODATA => 400,
        libc::E2BIG | libc::EFBIG => 413,
        libc::EAGAIN | libc::EDQUOT => 429,
        libc::ENOSPC => 507,
        libc::EOPNOTSUPP | libc::ENOSYS => 501,
        libc::ETIMEDOUT => 504,
        libc::EINTR | libc::ENFILE | libc::EMFILE => 503,
        _ => 500,
    }
}

/// The symbolic name of an errno (`EACCES`), as the HTTP adapter's error bodies show it.
pub fn errno_name(errno: i32) -> String {
    let e = nix::errno::Errno::from_raw(errno);
    if e == nix::errno::Errno::UnknownErrno {
        format!("E{errno}")
    } else {
        format!("{e:?}")
    }
}
