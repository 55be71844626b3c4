//! Kernel cache invalidation through the FUSE notify channel: guest change events (from
//! [`crate::guestfs`]) and VM events (names in the root, a VM's `fs/`).
//!
//! Invariant: a notification is never sent from a task that answers a request the
//! notification could wait for (root names wait for root `mkdir`/`rmdir`, see
//! [`crate::vfs::rootops`]); notifications run on blocking threads.
use std::ffi::OsStr;
use std::sync::Arc;

use fuser::INodeNo;

use crate::vfs::{Vfs, ROOT_INO};

/// The kernel expires entries on request (`FUSE_EXPIRE_ONLY`, FUSE 7.38, Linux 6.2):
/// set at INIT from the version the kernel speaks.
pub(super) static EXPIRE_ONLY: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Guest change events → the kernel's caches, through the FUSE notify channel.
///
/// A name event *expires* the kernel's entry where the kernel can do that: its next use
/// looks the name up again and keeps the dentry when the answer is the same inode, so a
/// directory that is someone's working directory is never unhashed while it still
/// exists. Older kernels get a plain invalidation.
pub struct KernelInvalidator {
    pub notifier: fuser::Notifier,
    /// A duplicate of the session's `/dev/fuse` descriptor, for the notification fuser
    /// has no call for.
    pub dev: Option<std::os::fd::OwnedFd>,
}

/// `FUSE_NOTIFY_INVAL_ENTRY` with `FUSE_EXPIRE_ONLY`, written as one message.
fn expire_entry(dev: std::os::fd::BorrowedFd<'_>, parent: u64, name: &[u8]) -> std::io::Result<()> {
    const FUSE_NOTIFY_INVAL_ENTRY: i32 = 3;
    const FUSE_EXPIRE_ONLY: u32 = 1;
    let namelen = u32::try_from(name.len()).map_err(std::io::Error::other)?;
    // fuse_out_header (len, error = notify code, unique = 0), then
    // fuse_notify_inval_entry_out (parent, namelen, flags), then the name and a NUL.
    let len = 16 + 16 + name.len() + 1;
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(
        &u32::try_from(len)
            .map_err(std::io::Error::other)?
            .to_ne_bytes(),
    );
    msg.extend_from_slice(&FUSE_NOTIFY_INVAL_ENTRY.to_ne_bytes());
    msg.extend_from_slice(&0u64.to_ne_bytes());
    msg.extend_from_slice(&parent.to_ne_bytes());
    msg.extend_from_slice(&namelen.to_ne_bytes());
    msg.extend_from_slice(&FUSE_EXPIRE_ONLY.to_ne_bytes());
    msg.extend_from_slice(name);
    msg.push(0);
    let n = nix::unistd::write(dev, &msg).map_err(std::io::Error::from)?;
    if n != len {
        return Err(std::io::Error::other("short notification write"));
    }
    Ok(())
}

impl crate::guestfs::Invalidate for KernelInvalidator {
    fn entry(&self, parent: u64, name: &[u8]) {
        use std::os::fd::AsFd;
        use std::os::unix::ffi::OsStrExt;
        let res = match &self.dev {
            Some(dev) if EXPIRE_ONLY.load(std::sync::atomic::Ordering::Relaxed) => {
                expire_entry(dev.as_fd(), parent, name)
            }
            _ => self
                .notifier
                .inval_entry(INodeNo(parent), OsStr::from_bytes(name)),
        };
        // ENOENT: the kernel holds no such entry, which is fine.
        if let Err(e) = res {
            if e.raw_os_error() != Some(libc::ENOENT) {
                tracing::debug!("invalidate entry {parent}/{name:?}: {e}");
            }
        }
    }

    fn inode(&self, ino: u64, data: bool) {
        // offset -1: attributes only; 0 with length 0: attributes and all pages.
        let offset = if data { 0 } else { -1 };
        if let Err(e) = self.notifier.inval_inode(INodeNo(ino), offset, 0) {
            if e.raw_os_error() != Some(libc::ENOENT) {
                tracing::debug!("invalidate inode {ino}: {e}");
            }
        }
    }
}

/// Keep the cached VM-directory and `fs/` names right: after any event of a VM (boot,
/// exit, delete, ...) drop the kernel's entries for its name and for its `fs/`, whose
/// inode changes with every boot. Runs until the event log goes away. Root names are
/// deferred while a root `mkdir`/`rmdir` is in flight (see [`crate::vfs::rootops`]).
pub fn invalidate_vm_entries(vfs: Arc<Vfs>, notifier: fuser::Notifier) {
    let mut rx = vfs.vm_events();
    {
        let (vfs, notifier) = (vfs.clone(), notifier.clone());
        tokio::spawn(async move {
            loop {
                let names = vfs.root_ops().take_deferred_when_idle().await;
                let n = notifier.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    use crate::guestfs::Invalidate;
                    let inv = KernelInvalidator {
                        notifier: n,
                        dev: None,
                    };
                    for name in names {
                        inv.entry(ROOT_INO, name.as_bytes());
                    }
                    inv.inode(ROOT_INO, false);
                })
                .await;
            }
        });
    }
    tokio::spawn(async move {
        loop {
            let name = match rx.recv().await {
                Ok(n) => n,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            };
            let vm_ino = vfs.vm_ino(&name);
            let root_names = vfs.root_ops().invalidate_now(&name).unwrap_or_default();
            let n = notifier.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let inv = KernelInvalidator {
                    notifier: n,
                    dev: None,
                };
                use crate::guestfs::Invalidate;
                // Root names and attributes only when no root mkdir/rmdir holds the
                // root's lock (`root_ops`); otherwise after it, by the task above.
                let root_now = !root_names.is_empty();
                for name in root_names {
                    inv.entry(ROOT_INO, name.as_bytes());
                }
                if root_now {
                    inv.inode(ROOT_INO, false);
                }
                if let Some(ino) = vm_ino {
                    inv.entry(ino, b"fs");
                    inv.inode(ino, false);
                }
            })
            .await;
        }
    });
}
