//! File I/O on handles: open, opendir, read, write, fsync, fallocate, lseek.
//!
//! Invariants:
//! * Nodes are re-opened through `/proc/self/fd/N` (never by path); `O_CREAT`,
//!   `O_EXCL`, `O_NOFOLLOW`, `O_PATH`, `O_TMPFILE` and `O_DIRECT` (our buffers are not
//!   aligned; direct I/O is the host kernel's business) are stripped, `O_CLOEXEC` and
//!   `O_NOCTTY` added; `O_APPEND` is honoured (Linux `pwrite` appends on such files).
//! * Only regular files and directories are opened: a symlink is `ELOOP`, a fifo,
//!   socket or device `ENXIO` (the host's kernel handles those itself); an opaque node
//!   is `EACCES`.
//! * Reads return `min(size, MAX_CHUNK)` bytes, fewer only at end of file; writes write
//!   everything or fail (short writes are retried), both with `pread`/`pwrite`.
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use nix::errno::Errno;

use super::handles::{DirState, Handle};
use super::{sys, FsCore};
use crate::proto::fs::{HandleId, NodeRef, MAX_CHUNK};

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

impl FsCore {
    pub(super) fn open(&self, node: &NodeRef, flags: i32) -> Result<HandleId, Errno> {
        let n = self.nodes.get(node)?;
        if n.opaque {
            return Err(Errno::EACCES);
        }
        match n.kind {
            libc::S_IFREG | libc::S_IFDIR => {}
            libc::S_IFLNK => return Err(Errno::ELOOP),
            _ => return Err(Errno::ENXIO),
        }
        let tmpfile = libc::O_TMPFILE & !libc::O_DIRECTORY;
        let flags = (flags
            & !(libc::O_CREAT
                | libc::O_EXCL
                | libc::O_NOFOLLOW
                | libc::O_PATH
                | libc::O_DIRECT
                | tmpfile))
            | libc::O_NOCTTY;
        let fd = self.proc.reopen(n.fd(), flags)?;
        self.handles
            .insert_file(std::fs::File::from(fd), n.kind == libc::S_IFREG)
    }

    pub(super) fn opendir(&self, node: &NodeRef) -> Result<HandleId, Errno> {
        let n = self.nodes.get(node)?;
        if !n.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let fd = if n.opaque {
            None
        } else {
            Some(
                self.proc
                    .reopen(n.fd(), libc::O_RDONLY | libc::O_DIRECTORY)?,
            )
        };
        self.handles.insert(Handle::Dir {
            node: n,
            state: Mutex::new(DirState {
                fd,
                pos: Some(0),
                buf: Vec::new(),
            }),
        })
    }

    pub(super) fn read(&self, handle: HandleId, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let h = self.handles.get(handle)?;
        let file = h.file()?;
        let size = (size as usize).min(MAX_CHUNK);
        if i64::try_from(offset.saturating_add(size as u64)).is_err() {
            return Err(Errno::EINVAL);
        }
        let mut buf = vec![0u8; size];
        let mut got = 0usize;
        while got < size {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if got > 0 => {
                    tracing::debug!(handle, "read stopped early: {e}");
                    break;
                }
                Err(e) => return Err(io_errno(&e)),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    pub(super) fn write(&self, handle: HandleId, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        if data.len() > MAX_CHUNK {
            return Err(Errno::EINVAL);
        }
        let h = self.handles.get(handle)?;
        let file = h.file()?;
        if i64::try_from(offset.saturating_add(data.len() as u64)).is_err() {
            return Err(Errno::EFBIG);
        }
        let mut done = 0usize;
        while done < data.len() {
            match file.write_at(&data[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if done > 0 => {
                    tracing::debug!(handle, "write stopped early: {e}");
                    break;
                }
                Err(e) => return Err(io_errno(&e)),
            }
        }
        // At most the request's data, which a frame (4 MiB) bounds.
        Ok(u32::try_from(done).unwrap_or(u32::MAX))
    }

    pub(super) fn fsync(&self, handle: HandleId, datasync: bool) -> Result<(), Errno> {
        let h = self.handles.get(handle)?;
        let fd = h.stat_fd();
        let Some(fd) = fd.fd() else {
            return Ok(());
        };
        if datasync {
            nix::unistd::fdatasync(fd)
        } else {
            nix::unistd::fsync(fd)
        }
    }

    /// `fallocate(2)` with `mode` passed bit for bit (`from_bits_retain`: no flag
    /// filtered, none added), so the guest kernel alone decides which modes and which
    /// combinations its filesystem supports and its errno is the answer (EOPNOTSUPP for
    /// unknown flags, EINVAL for bad ranges, ...).
    pub(super) fn fallocate(
        &self,
        handle: HandleId,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<(), Errno> {
        let h = self.handles.get(handle)?;
        let file = h.file()?;
        let offset = i64::try_from(offset).map_err(|_| Errno::EFBIG)?;
        let length = i64::try_from(length).map_err(|_| Errno::EFBIG)?;
        nix::fcntl::fallocate(
            file,
            nix::fcntl::FallocateFlags::from_bits_retain(mode),
            offset,
            length,
        )
    }

    pub(super) fn lseek(&self, handle: HandleId, offset: u64, whence: i32) -> Result<u64, Errno> {
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return Err(Errno::EINVAL);
        }
        let h = self.handles.get(handle)?;
        let file = h.file()?;
        sys::lseek(file.as_fd(), offset, whence)
    }
}
