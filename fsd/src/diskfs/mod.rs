//! `fs/` of a stopped or failed VM: its disk image, read-only, through a userspace ext4
//! reader ([`reader`]); the host kernel never mounts a guest image.
//!
//! [`crate::guestfs`] asks [`DiskFs::route`] first: a target under the `fs/` of a VM that
//! is `stopped` or `failed`, or a number of a disk view, is answered here; everything
//! else goes to the agent as before (a paused VM still answers EHOSTDOWN).
//!
//! Invariants:
//! - One [`View`] per VM with a readable `fs/` root of the current boot generation; its
//!   image lives on its own thread ([`worker`]), so FUSE threads never wait on it.
//! - Numbers come from [`nodes`] (the VM's slot, device index `DISK_VIEW_DEV`): they
//!   never name a live guest file. Once the VM leaves `stopped`/`failed` (or is deleted,
//!   or stops again with a new generation) every number and handle of the view answers
//!   ESTALE and the view is dropped; the VM's `fs/` root is a new inode then, so the
//!   kernel resolves paths afresh against the live agent.
//! - Nothing changes the image: every change is refused with EROFS, and the refusal's
//!   message (start the VM) is what `cat <vm>/ctl` shows to the caller's session; so are
//!   the messages of unreadable disks (EIO, ENODATA).
//! - The image is treated as hostile (see [`reader`]): a corrupt one answers EIO with a
//!   message, never a panic of the daemon or an allocation sized by the image.
pub mod nodes;
pub mod ops;
pub mod reader;
pub mod worker;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::guestfs::inodes::{dev_index_of, slot_of, DISK_VIEW_DEV};
use crate::guestfs::Target;
use crate::manager::vm::{Vm, VmState};
use crate::manager::Manager;
use nodes::{child, Nodes};
use worker::{Job, Worker};

/// Entry and attribute lifetime: the disk does not change while the VM is stopped, and
/// a start gives `fs/` a new inode.
pub const TTL: Duration = Duration::from_secs(60);

/// One stopped VM's disk as `fs/` shows it.
pub struct View {
    vm: std::sync::Weak<Vm>,
    vm_id: Arc<str>,
    name: String,
    /// The boot generation whose `fs/` root this view answers for.
    generation: u64,
    nodes: Mutex<Nodes>,
    /// Open files and directories: handle → path.
    handles: Mutex<HashMap<u64, Arc<[u8]>>>,
    next_fh: AtomicU64,
    jobs: Mutex<mpsc::Sender<Job>>,
}

/// A routed target: its view and path in the image, and the number the kernel knows.
pub struct At {
    view: Arc<View>,
    path: Arc<[u8]>,
    ino: u64,
    root: bool,
}

/// A routed target, or why its view is gone (ESTALE).
pub type Routed = Result<At>;

/// The disk views of all stopped VMs.
pub struct DiskFs {
    mgr: Arc<Manager>,
    /// By VM slot.
    views: Mutex<HashMap<u16, Arc<View>>>,
}

/// Whether `vm`'s `fs/` is its disk: stopped or failed, with no VMM that may still
/// write the disk (a failed adoption leaves its VMM running: that stays EHOSTDOWN).
fn offline(vm: &Vm) -> bool {
    matches!(vm.state(), VmState::Stopped | VmState::Failed(_)) && !vm.vmm_alive()
}

fn stale(name: &str) -> Error {
    Error::new(
        libc::ESTALE,
        format!("VM {name} started or changed since its stopped disk was read"),
    )
}

impl DiskFs {
    pub fn new(mgr: Arc<Manager>) -> DiskFs {
        DiskFs {
            mgr,
            views: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `t` is answered here (`Some`), and where. `slot` gives a VM its `fs/` slot.
    pub fn route(&self, t: &Target, slot: impl FnOnce(&Vm) -> Result<u16>) -> Option<Routed> {
        match t {
            Target::Node(ino) if dev_index_of(*ino) == DISK_VIEW_DEV => Some(self.node(*ino)),
            Target::Node(_) => None,
            Target::Root {
                vm_id,
                generation,
                ino,
            } => {
                let vm = self.mgr.get_by_id(vm_id)?;
                if !offline(&vm) {
                    // Running again: its view (thread, image) is of no more use.
                    if let Some(slot) = vm.fs_slot() {
                        let mut views = self.views.lock();
                        if views.get(&slot).is_some_and(|v| *v.vm_id == *vm.id) {
                            views.remove(&slot);
                        }
                    }
                    return None;
                }
                if *generation != vm.generation() {
                    return Some(Err(stale(&vm.name)));
                }
                Some(self.view(&vm, *generation, slot).map(|view| At {
                    view,
                    path: Arc::from(&b"/"[..]),
                    ino: *ino,
                    root: true,
                }))
            }
        }
    }

    fn node(&self, ino: u64) -> Routed {
        let slot = slot_of(ino);
        let view = self.views.lock().get(&slot).cloned();
        let Some(view) = view else {
            return Err(Error::new(
                libc::ESTALE,
                "this file of a stopped VM's disk is no longer known",
            ));
        };
        let live = self
            .mgr
            .get_by_id(&view.vm_id)
            .is_some_and(|vm| offline(&vm) && vm.generation() == view.generation);
        if !live {
            self.views.lock().remove(&slot);
            return Err(stale(&view.name));
        }
        let path = view
            .nodes
            .lock()
            .path(ino)
            .ok_or_else(|| stale(&view.name))?;
        Ok(At {
            view,
            path,
            ino,
            root: false,
        })
    }

    /// The view of `vm` for `generation`, made on first use. Views of VMs that are gone
    /// or running are dropped here too (their threads end).
    fn view(
        &self,
        vm: &Arc<Vm>,
        generation: u64,
        slot: impl FnOnce(&Vm) -> Result<u16>,
    ) -> Result<Arc<View>> {
        let slot = slot(vm)?;
        let mut views = self.views.lock();
        if let Some(v) = views.get(&slot) {
            if *v.vm_id == *vm.id && v.generation == generation {
                return Ok(v.clone());
            }
        }
        views.retain(|_, v| {
            self.mgr
                .get_by_id(&v.vm_id)
                .is_some_and(|vm| offline(&vm) && vm.generation() == v.generation)
        });
        let jobs = worker::start(vm.dir.join("disk.ext4"), &vm.name)?;
        let view = Arc::new(View {
            vm: Arc::downgrade(vm),
            vm_id: Arc::from(vm.id.as_str()),
            name: vm.name.clone(),
            generation,
            nodes: Mutex::new(Nodes::new(slot)),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            jobs: Mutex::new(jobs),
        });
        views.insert(slot, view.clone());
        Ok(view)
    }

    /// The kernel dropped `n` lookups of disk-view number `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        if let Some(v) = self.views.lock().get(&slot_of(ino)) {
            v.nodes.lock().forget(ino, n);
        }
    }

    /// Number of disk-view inodes the kernel holds (tests, diagnostics).
    pub fn inode_count(&self) -> usize {
        self.views
            .lock()
            .values()
            .map(|v| v.nodes.lock().held())
            .sum()
    }

    /// Whether `ino` is a disk-view number.
    pub fn owns(ino: u64) -> bool {
        ino >= crate::guestfs::FS_INO_BASE && dev_index_of(ino) == DISK_VIEW_DEV
    }

    /// The message of every change refused: the VM must run for its files to change.
    pub fn refuse<T>(at: Routed) -> Result<T> {
        let at = at?;
        let e = Error::new(
            libc::EROFS,
            format!(
                "VM {} is not running: its fs/ is its disk, read-only; start it (echo start > {}/ctl) to change files",
                at.view.name, at.view.name
            ),
        );
        Err(report(&at.view, crate::guestfs::interrupt::caller(), e))
    }
}

/// Keep the message of `e` for `cat <vm>/ctl` of the caller's session (read-only and
/// unreadable-disk errors; a missing name is an ordinary answer).
fn report(view: &View, pid: u32, e: Error) -> Error {
    if matches!(
        e.errno,
        libc::EROFS | libc::EIO | libc::ENODATA | libc::EACCES
    ) {
        if let Some(vm) = view.vm.upgrade() {
            let session = crate::vfs::tree::session_of(pid);
            // Through the one recording path of `cat ctl` (the caller gets `e`).
            return crate::vfs::journal::Journal::new(
                crate::vfs::journal::Scope::Vm(vm),
                session,
                None,
            )
            .refuse(e);
        }
    }
    e
}

#[cfg(test)]
mod tests;
