//! The thread that owns one VM's open disk image.
//!
//! Invariants:
//! - The reader is `!Send`: the image, its open files and directory cursors live on this
//!   thread only; callers send jobs and are answered from here (FUSE threads never wait).
//! - The image is (re)opened when the disk file changed (device, inode, size or mtime),
//!   e.g. after a snapshot restore; open files and cursors of the old image are dropped
//!   (their handles then answer EBADF). A failed open is remembered for the same file, so
//!   a corrupt disk costs one parse, not one per request.
//! - A job that panics inside the reader (a bug it has on some corrupt image) is caught:
//!   the image is dropped and reopened on next use, the daemon lives, and the caller's
//!   reply, dropped unanswered, gets EIO from fuser.
//! - At most [`MAX_OPEN`] files and as many directory cursors are kept; past that the
//!   oldest handles are closed (their next read reopens the file, which only costs a
//!   seek: see [`Files::read`]).
//! - The thread ends when the last sender goes (the view was dropped); after [`IDLE`]
//!   without requests it closes the image (open handles reopen their files by path).
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

use super::reader::{read_at, Image, Listed, Listing};
use crate::error::{Error, Result};

/// Open files (and directory cursors) kept per image.
pub const MAX_OPEN: usize = 1024;
/// After this long without a request the image is closed (its block cache freed).
pub const IDLE: std::time::Duration = std::time::Duration::from_secs(300);

pub type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// What identifies one version of the disk file.
type Stamp = (u64, u64, u64, i64, i64);

/// The image, its open files and its directory cursors.
pub struct Worker {
    disk: PathBuf,
    image: Option<(Stamp, std::result::Result<Image, Error>)>,
    /// Open files by handle, with their paths (to reopen after eviction).
    files: BTreeMap<u64, (Arc<[u8]>, Option<ext4_view::File>)>,
    dirs: BTreeMap<u64, (Arc<[u8]>, Listing)>,
}

fn stamp(disk: &std::path::Path) -> Result<Stamp> {
    let m = std::fs::metadata(disk)
        .map_err(|e| Error::io(format!("the VM's disk {}: {e}", disk.display())))?;
    Ok((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

impl Worker {
    fn new(disk: PathBuf) -> Worker {
        Worker {
            disk,
            image: None,
            files: BTreeMap::new(),
            dirs: BTreeMap::new(),
        }
    }

    /// The image as the disk is now.
    pub fn image(&mut self) -> Result<&Image> {
        let now = stamp(&self.disk)?;
        if self.image.as_ref().is_none_or(|(s, _)| *s != now) {
            self.files.clear();
            self.dirs.clear();
            let img = Image::open(&self.disk);
            if let Err(e) = &img {
                tracing::warn!(disk = %self.disk.display(), "stopped VM's disk unreadable: {}", e.message);
            }
            self.image = Some((now, img));
        }
        match &self.image {
            Some((_, Ok(img))) => Ok(img),
            Some((_, Err(e))) => Err(e.clone()),
            None => Err(Error::io("the disk image vanished")),
        }
    }

    /// Remember open file `fh` of `path`.
    pub fn add_file(&mut self, fh: u64, path: Arc<[u8]>) {
        evict(&mut self.files);
        self.files.insert(fh, (path, None));
    }

    pub fn close(&mut self, fh: u64) {
        self.files.remove(&fh);
        self.dirs.remove(&fh);
    }

    /// `size` bytes of open file `fh` at `offset`.
    pub fn read(&mut self, fh: u64, path: &[u8], offset: u64, size: usize) -> Result<Vec<u8>> {
        self.image()?;
        let file = match self.files.remove(&fh) {
            Some((p, Some(f))) if &*p == path => f,
            _ => self.image()?.open_file(path)?,
        };
        let mut file = file;
        let res = read_at(&mut file, offset, size);
        evict(&mut self.files);
        self.files.insert(fh, (Arc::from(path), Some(file)));
        res
    }

    /// The size of regular file `path`.
    pub fn size(&mut self, path: &[u8]) -> Result<u64> {
        Ok(self.image()?.stat(path)?.len())
    }

    /// Entries of directory `path` (handle `fh`) from entry `from` on (0 is the first
    /// after `.` and `..`) while `fits` says they fit; continues the handle's cursor when
    /// it stands there, else lists again from the start.
    pub fn entries(
        &mut self,
        fh: u64,
        path: &[u8],
        from: u64,
        mut fits: impl FnMut(&Listed) -> bool,
    ) -> Result<Vec<Listed>> {
        let mut cur = match self.dirs.remove(&fh) {
            Some((p, c)) if &*p == path && c.position() == from => c,
            _ => {
                let mut c = self.image()?.list(path)?;
                while c.position() < from {
                    if c.next_entry()?.is_none() {
                        break;
                    }
                }
                c
            }
        };
        let mut out = Vec::new();
        while let Some(e) = cur.next_entry()? {
            if !fits(&e) {
                cur.unread(e);
                break;
            }
            out.push(e);
        }
        evict(&mut self.dirs);
        self.dirs.insert(fh, (Arc::from(path), cur));
        Ok(out)
    }
}

/// Make room for one more handle: drop the oldest (lowest handle number).
fn evict<T>(m: &mut BTreeMap<u64, T>) {
    while m.len() >= MAX_OPEN {
        m.pop_first();
    }
}

/// Start the thread of the image at `disk`; jobs sent to the returned sender run there.
pub fn start(disk: PathBuf, name: &str) -> Result<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name(format!("bsx-disk-{name}"))
        .spawn(move || {
            let mut w = Worker::new(disk);
            loop {
                let job = match rx.recv_timeout(IDLE) {
                    Ok(job) => job,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        // Idle: let go of the image and its caches (reopened on use).
                        w = Worker::new(std::mem::take(&mut w.disk));
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                };
                let run = std::panic::AssertUnwindSafe(|| job(&mut w));
                if std::panic::catch_unwind(run).is_err() {
                    tracing::error!(disk = %w.disk.display(), "disk reader panicked; reopening the image");
                    w = Worker::new(std::mem::take(&mut w.disk));
                }
            }
        })
        .map_err(|e| Error::new(libc::EAGAIN, format!("cannot start the disk reader: {e}")))?;
    Ok(tx)
}
