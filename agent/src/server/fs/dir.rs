//! Directory listings (`ReadDir`).
//!
//! Invariants:
//! * A reply holds as many entries as fit in `max_bytes` by [`fuse_dirent_size`] and
//!   never more; if not even the first entry fits it is `EINVAL`.
//! * `next_offset` is the entry's `d_off` cookie. The handle remembers the kernel
//!   position (`DirState::pos`); a request at another offset seeks first (0 rewinds),
//!   and when `getdents64` returned more than fit, the descriptor is seeked back to just
//!   after the last entry returned, so the next page starts exactly there.
//! * `plus` entries other than `.`/`..` are looked up (counted ones add a reference). An
//!   entry that vanished meanwhile (`ENOENT`) is skipped; another lookup error ends the
//!   page before that entry (or fails the request when it is the first), so no
//!   reference is ever handed out for an entry that is not returned.
//! * Every entry carries the identity `lstat` shows: directories are stat'ed, because a
//!   mount point's `d_ino` is the covered directory's, not the mounted root's.
//! * An opaque directory lists only `.` and `..`.
use std::os::fd::{AsFd, BorrowedFd};

use nix::errno::Errno;

use super::handles::{lock, Handle};
use super::nodes::Node;
use super::{sys, FsCore};
use crate::proto::fs::{fuse_dirent_size, DirEntry, HandleId, NodeId};

/// Largest `getdents64` buffer.
const MAX_BUF: usize = 128 * 1024;
/// Smallest `getdents64` buffer (one entry with a 255-byte name needs 280).
const MIN_BUF: usize = 1024;

impl FsCore {
    pub(super) fn readdir(
        &self,
        handle: HandleId,
        offset: u64,
        plus: bool,
        max_bytes: u32,
    ) -> Result<Vec<DirEntry>, Errno> {
        let h = self.handles.get(handle)?;
        let Handle::Dir { node, state } = &*h else {
            return Err(Errno::ENOTDIR);
        };
        let max = max_bytes as usize;
        let mut st = lock(state);
        let st = &mut *st;
        let Some(fd) = st.fd.as_ref() else {
            return opaque_listing(node, offset, plus, max);
        };
        let fd = fd.as_fd();
        if st.pos != Some(offset) {
            st.pos = None;
            sys::lseek(fd, offset, libc::SEEK_SET)?;
            st.pos = Some(offset);
        }
        let bufsize = max.clamp(MIN_BUF, MAX_BUF);
        if st.buf.len() < bufsize {
            st.buf.resize(bufsize, 0);
        }
        let mut out: Vec<DirEntry> = Vec::new();
        let mut used = 0usize;
        'pages: loop {
            let n = match sys::getdents64(fd, &mut st.buf[..bufsize]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    st.pos = None;
                    if out.is_empty() {
                        return Err(e);
                    }
                    tracing::debug!(handle, "readdir stopped early: {e}");
                    break;
                }
            };
            // Entries after `stop` are handed back to the kernel by seeking.
            let mut stop = false;
            let mut err = None;
            let mut pos = st.pos;
            for e in sys::parse_dirents(&st.buf[..n]) {
                let size = fuse_dirent_size(e.name.len(), plus);
                if used + size > max {
                    stop = true;
                    break;
                }
                let dot = e.name == b"." || e.name == b"..";
                let entry = if plus && !dot {
                    let lookup = sys::cstring(e.name).and_then(|c| self.lookup_in(node, &c));
                    match lookup {
                        Ok(en) => Some(en),
                        Err(Errno::ENOENT) => {
                            pos = Some(e.off);
                            continue;
                        }
                        Err(x) => {
                            err = Some(x);
                            stop = true;
                            break;
                        }
                    }
                } else {
                    None
                };
                let id = match &entry {
                    Some(en) => en.node.id,
                    None if !dot && (e.dtype == libc::DT_DIR || e.dtype == libc::DT_UNKNOWN) => {
                        sys::cstring(e.name)
                            .and_then(|c| sys::stat_at(node.fd(), &c))
                            .map(|st| self.nodes.reported(st.st_dev, st.st_ino))
                            .unwrap_or(NodeId {
                                dev: node.dev,
                                ino: e.ino,
                            })
                    }
                    None => NodeId {
                        dev: node.dev,
                        ino: e.ino,
                    },
                };
                used += size;
                pos = Some(e.off);
                out.push(DirEntry {
                    name: e.name.to_vec(),
                    next_offset: e.off,
                    kind: u32::from(e.dtype) << 12,
                    node: id,
                    entry,
                });
            }
            st.pos = pos;
            if stop {
                let back = pos.unwrap_or(offset);
                st.pos = None;
                sys::lseek(fd, back, libc::SEEK_SET)?;
                st.pos = Some(back);
                if out.is_empty() {
                    return Err(err.unwrap_or(Errno::EINVAL));
                }
                break 'pages;
            }
        }
        Ok(out)
    }
}

/// `.` and `..` only (offsets 1 and 2).
fn opaque_listing(
    node: &Node,
    offset: u64,
    plus: bool,
    max: usize,
) -> Result<Vec<DirEntry>, Errno> {
    let id_of = |fd: BorrowedFd<'_>, name: &std::ffi::CStr| {
        sys::stat_at(fd, name)
            .map(|s| NodeId {
                dev: s.st_dev,
                ino: s.st_ino,
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    let mut used = 0;
    for (i, name) in [(1u64, &b"."[..]), (2, &b".."[..])] {
        if offset >= i {
            continue;
        }
        let size = fuse_dirent_size(name.len(), plus);
        if used + size > max {
            if out.is_empty() {
                return Err(Errno::EINVAL);
            }
            break;
        }
        used += size;
        let id = if i == 1 {
            node.id
        } else {
            id_of(node.fd(), c"..")
        };
        out.push(DirEntry {
            name: name.to_vec(),
            next_offset: i,
            kind: libc::S_IFDIR,
            node: id,
            entry: None,
        });
    }
    Ok(out)
}
