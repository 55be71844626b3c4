//! Extended attributes.
//!
//! Invariants:
//! * The node is named by its `/proc/self/fd/N` path; the path-following calls resolve
//!   the magic link to the node's own inode and stop there, so for a symlink node they
//!   act on the symlink itself (never its target): Linux then refuses `user.*`
//!   (`EPERM`) while `trusted.*`/`security.*` work for the privileged agent.
//! * Sizes are capped at [`MAX_XATTR`]; `size == 0` asks for the length (`XattrSize`);
//!   a value or list longer than `size` is `ERANGE`; a value longer than
//!   [`MAX_XATTR`] to set is `E2BIG`.
//! * Changing attributes of an opaque node is `EACCES`.
use nix::errno::Errno;

use super::nodes::Node;
use super::{sys, FsCore};
use crate::proto::fs::{FsResponse, NodeRef, XattrNames, ENTRY_XATTR_NAMES, MAX_XATTR};

/// Longest xattr name Linux accepts (`XATTR_NAME_MAX`).
const XATTR_NAME_MAX: usize = 255;

fn xattr_name(name: &[u8]) -> Result<std::ffi::CString, Errno> {
    if name.is_empty() || name.len() > XATTR_NAME_MAX {
        return Err(Errno::ERANGE);
    }
    sys::cstring(name)
}

/// The names of `n`'s extended attributes when they fit in an entry (`None`: unknown).
pub(super) fn entry_names(n: &Node) -> Option<XattrNames> {
    if n.opaque {
        return None;
    }
    let mut buf = [0u8; ENTRY_XATTR_NAMES];
    let len = sys::listxattr(&sys::ProcFd::path(n.fd()), &mut buf).ok()?;
    Some(XattrNames(buf[..len.min(buf.len())].to_vec()))
}

impl FsCore {
    pub(super) fn getxattr(
        &self,
        node: &NodeRef,
        name: &[u8],
        size: u32,
    ) -> Result<FsResponse, Errno> {
        let n = self.nodes.get(node)?;
        let name = xattr_name(name)?;
        let path = sys::ProcFd::path(n.fd());
        if size == 0 {
            let len = sys::getxattr(&path, &name, &mut [])?;
            return Ok(FsResponse::XattrSize(
                u32::try_from(len).unwrap_or(u32::MAX),
            ));
        }
        let mut buf = vec![0u8; size.min(MAX_XATTR) as usize];
        let len = sys::getxattr(&path, &name, &mut buf)?;
        buf.truncate(len);
        Ok(FsResponse::Data(buf))
    }

    pub(super) fn listxattr(&self, node: &NodeRef, size: u32) -> Result<FsResponse, Errno> {
        let n = self.nodes.get(node)?;
        let path = sys::ProcFd::path(n.fd());
        if size == 0 {
            let len = sys::listxattr(&path, &mut [])?;
            return Ok(FsResponse::XattrSize(
                u32::try_from(len).unwrap_or(u32::MAX),
            ));
        }
        let mut buf = vec![0u8; size.min(MAX_XATTR) as usize];
        let len = sys::listxattr(&path, &mut buf)?;
        buf.truncate(len);
        Ok(FsResponse::Data(buf))
    }

    pub(super) fn setxattr(
        &self,
        node: &NodeRef,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> Result<(), Errno> {
        let n = self.nodes.get(node)?;
        if n.opaque {
            return Err(Errno::EACCES);
        }
        let name = xattr_name(name)?;
        if value.len() > MAX_XATTR as usize {
            return Err(Errno::E2BIG);
        }
        sys::setxattr(&sys::ProcFd::path(n.fd()), &name, value, flags)
    }

    pub(super) fn removexattr(&self, node: &NodeRef, name: &[u8]) -> Result<(), Errno> {
        let n = self.nodes.get(node)?;
        if n.opaque {
            return Err(Errno::EACCES);
        }
        let name = xattr_name(name)?;
        sys::removexattr(&sys::ProcFd::path(n.fd()), &name)
    }
}
