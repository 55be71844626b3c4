//! The one way a request is answered: [`Op::reply`] sends a result, and every errno it
//! answers the kernel with (a failure of the core, of `fs/`, or a fixed refusal) is
//! logged at debug level with the operation, the inode and the VM it belongs to, so
//! `BANDSOX_LOG=debug` explains each failed syscall a user reports.
//!
//! Invariant: no operation calls a fuser reply's `error` except through [`Op`].
use std::sync::Arc;

use fuser::{
    Errno, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
};

use crate::error::Error;
use crate::vfs::Vfs;

/// A fuser reply that can carry an errno.
pub trait Fail {
    fn fail(self, errno: Errno);
}

macro_rules! fail {
    ($($t:ty),*) => {
        $(impl Fail for $t {
            fn fail(self, errno: Errno) {
                self.error(errno)
            }
        })*
    };
}

fail!(
    ReplyAttr,
    ReplyCreate,
    ReplyData,
    ReplyDirectory,
    ReplyDirectoryPlus,
    ReplyEmpty,
    ReplyEntry,
    ReplyLseek,
    ReplyOpen,
    ReplyStatfs,
    ReplyWrite,
    ReplyXattr
);

/// The request being answered: which operation, on which inode.
pub struct Op {
    name: &'static str,
    ino: u64,
    vfs: Arc<Vfs>,
}

impl Op {
    pub fn new(name: &'static str, ino: u64, vfs: Arc<Vfs>) -> Self {
        Op { name, ino, vfs }
    }

    /// Answer `res`: `ok` sends a success, an error is logged and sent as its errno.
    pub fn reply<R: Fail, T>(&self, reply: R, res: Result<T, Error>, ok: impl FnOnce(R, T)) {
        match res {
            Ok(v) => ok(reply, v),
            Err(e) => reply.fail(self.errno(&e)),
        }
    }

    fn errno(&self, e: &Error) -> Errno {
        // Only failures pay for naming the VM.
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(
                op = self.name,
                ino = self.ino,
                vm = self.vfs.vm_name_of(self.ino).as_deref().unwrap_or("-"),
                errno = e.errno,
                name = ?nix::errno::Errno::from_raw(e.errno),
                "fuse reply: {}",
                e.message
            );
        }
        Errno::from_i32(e.errno)
    }
}
