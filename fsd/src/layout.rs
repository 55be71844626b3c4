//! The state directory's layout (default `/var/lib/bandsox`).
//!
//! ```text
//! <state>/defaults            key=value defaults for a bare mkdir
//! <state>/events.log          the event log served as /events
//! <state>/boot/{vmlinuz,initrd,kernel.json}   guest kernel and initramfs
//! <state>/images/<name>/{disk.ext4,info.json} one per image
//! <state>/images/.tmp-<name>-<rand>/  an image being built (removed at startup)
//! <state>/cache/blobs/<alg>/<hex>      verified registry blobs, shared by all pulls
//! <state>/snapshots/<name>/   one per snapshot
//! <state>/vms/<id>/           one per VM: vm.json, disk.ext4, console.log, sockets, runs/
//! ```
//! VM directories are keyed by a short random id, not the name, so socket paths stay
//! short and a name is never used as a host path. Every directory is owner-only (0700).
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn defaults(&self) -> PathBuf {
        self.root.join("defaults")
    }
    pub fn events(&self) -> PathBuf {
        self.root.join("events.log")
    }
    pub fn kernel(&self) -> PathBuf {
        self.root.join("boot/vmlinuz")
    }
    pub fn initrd(&self) -> PathBuf {
        self.root.join("boot/initrd")
    }
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }
    pub fn image_dir(&self, name: &str) -> PathBuf {
        self.images().join(name)
    }
    pub fn image_disk(&self, name: &str) -> PathBuf {
        self.image_dir(name).join("disk.ext4")
    }
    pub fn image_info(&self, name: &str) -> PathBuf {
        self.image_dir(name).join("info.json")
    }
    /// The registry blob cache (an OCI-layout-style `blobs/` lives below it).
    pub fn blob_cache(&self) -> PathBuf {
        self.root.join("cache")
    }
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }
    pub fn vms(&self) -> PathBuf {
        self.root.join("vms")
    }
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.vms().join(id)
    }

    /// Create the top-level directories (0700).
    pub fn create(&self) -> std::io::Result<()> {
        for d in [
            self.root.clone(),
            self.vms(),
            self.images(),
            self.snapshots(),
            self.root.join("boot"),
        ] {
            mkdir_private(&d)?;
        }
        Ok(())
    }
}

/// `mkdir -p` with mode 0700 for the leaf.
pub fn mkdir_private(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}
