//! The operations of a disk view, in the shapes of [`crate::guestfs::GuestFs`]'s: each
//! answers through `done`, called once, on the view's thread (or at once on error).
use std::sync::Arc;
use std::time::Duration;

use super::reader::{attr, Listed};
use super::{child, report, At, Routed, Worker, TTL};
use crate::error::{Error, Result};
use bandsox_agent::proto::fs::StatFs;

use crate::guestfs::{fuse_dirent_size, Attr, DirItem, Looked, Opened, XattrReply};

impl At {
    /// Run `work` on the view's thread and answer `done` with its result; errors worth
    /// a message are kept for `cat ctl`.
    fn run<T, W, D>(self, done: D, work: W)
    where
        T: Send + 'static,
        W: FnOnce(&mut Worker, &At) -> Result<T> + Send + 'static,
        D: FnOnce(Result<T>) + Send + 'static,
    {
        let pid = crate::guestfs::interrupt::caller();
        let jobs = self.view.jobs.lock().clone();
        let job: super::Job = Box::new(move |w: &mut Worker| {
            let res = work(w, &self).map_err(|e| report(&self.view, pid, e));
            done(res)
        });
        // The thread ends only when the view (holding a sender) is gone, so this send
        // cannot fail; if it did, the job and its reply would be dropped, and fuser
        // answers a dropped reply with EIO.
        let _ = jobs.send(job);
    }

    fn looked(&self, path: &[u8], a: Attr) -> Result<Looked> {
        let ino = self
            .view
            .nodes
            .lock()
            .intern(path)
            .ok_or_else(|| Error::io("no free inode number for a disk file"))?;
        Ok(Looked {
            ino,
            attr: a,
            ttl: TTL,
            generation: self.view.generation,
        })
    }

    fn handle(&self, fh: u64) -> Result<Arc<[u8]>> {
        self.view
            .handles
            .lock()
            .get(&fh)
            .cloned()
            .ok_or_else(|| Error::new(libc::EBADF, "unknown file handle"))
    }

    fn new_handle(&self) -> u64 {
        let fh = self
            .view
            .next_fh
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.view.handles.lock().insert(fh, self.path.clone());
        fh
    }
}

/// Answer `done` with `at`'s error, or run `go` with it.
fn with<T, D>(at: Routed, done: D, go: impl FnOnce(At, D))
where
    D: FnOnce(Result<T>),
{
    match at {
        Ok(at) => go(at, done),
        Err(e) => done(Err(e)),
    }
}

pub fn lookup<D>(at: Routed, name: Vec<u8>, done: D)
where
    D: FnOnce(Result<Looked>) + Send + 'static,
{
    if name.is_empty() || name.len() > 255 || name.contains(&b'/') || name == b"." || name == b".."
    {
        return done(Err(Error::invalid("invalid name")));
    }
    with(at, done, |at, done| {
        at.run(done, move |w, at| {
            let path = child(&at.path, &name);
            match w.image()?.stat(&path) {
                Ok(m) => at.looked(&path, attr(&m)),
                // The disk does not change while the VM is stopped: remember the miss.
                Err(e) if e.errno == libc::ENOENT => Ok(Looked {
                    ino: 0,
                    attr: Attr::default(),
                    ttl: TTL,
                    generation: at.view.generation,
                }),
                Err(e) => Err(e),
            }
        })
    })
}

pub fn getattr<D>(at: Routed, done: D)
where
    D: FnOnce(Result<(Attr, Duration)>) + Send + 'static,
{
    with(at, done, |at, done| {
        let root = at.root;
        at.run(
            move |r| {
                done(r.map_err(|e| match root {
                    // The `fs/` directory itself stays listable in its parent whatever
                    // the disk holds (as for a VM that is down).
                    true => Error::host_down(e.message),
                    false => e,
                }))
            },
            |w, at| Ok((attr(&w.image()?.stat(&at.path)?), TTL)),
        )
    })
}

pub fn readlink<D>(at: Routed, done: D)
where
    D: FnOnce(Result<Vec<u8>>) + Send + 'static,
{
    with(at, done, |at, done| {
        at.run(done, |w, at| w.image()?.read_link(&at.path))
    })
}

pub fn open<D>(at: Routed, flags: i32, done: D)
where
    D: FnOnce(Result<Opened>) + Send + 'static,
{
    if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
        return done(super::DiskFs::refuse(at));
    }
    with(at, done, |at, done| {
        at.run(done, |w, at| {
            let m = w.image()?.stat(&at.path)?;
            if m.is_dir() {
                return Err(Error::new(libc::EISDIR, "is a directory"));
            }
            let fh = at.new_handle();
            w.add_file(fh, at.path.clone());
            Ok(Opened {
                fh,
                keep_cache: true,
            })
        })
    })
}

pub fn read<D>(at: Routed, fh: u64, offset: u64, size: u32, done: D)
where
    D: FnOnce(Result<Vec<u8>>) + Send + 'static,
{
    // The kernel asks for at most max_read (1 MiB here); never trust it blindly.
    let size = usize::try_from(size.min(1 << 20)).unwrap_or(1 << 20);
    with(at, done, |at, done| {
        at.run(done, move |w, at| {
            let path = at.handle(fh)?;
            w.read(fh, &path, offset, size)
        })
    })
}

pub fn release(at: Routed, fh: u64) {
    if let Ok(at) = at {
        at.view.handles.lock().remove(&fh);
        at.run(
            |_: Result<()>| {},
            move |w, _| {
                w.close(fh);
                Ok(())
            },
        );
    }
}

pub fn opendir<D>(at: Routed, done: D)
where
    D: FnOnce(Result<Opened>) + Send + 'static,
{
    with(at, done, |at, done| {
        at.run(done, |w, at| {
            if !w.image()?.stat(&at.path)?.is_dir() {
                return Err(Error::new(libc::ENOTDIR, "not a directory"));
            }
            Ok(Opened {
                fh: at.new_handle(),
                keep_cache: true,
            })
        })
    })
}

/// One reply's worth of entries from `offset` (1 after `.`, 2 after `..`, 2 + n after
/// the n-th entry), at most `max_bytes` of them as the kernel counts.
pub fn readdir<D>(at: Routed, fh: u64, offset: u64, plus: bool, max_bytes: u32, done: D)
where
    D: FnOnce(Result<Vec<DirItem>>) + Send + 'static,
{
    with(at, done, |at, done| {
        at.run(done, move |w, at| {
            at.handle(fh)?;
            let mut out = Vec::new();
            let mut budget = usize::try_from(max_bytes).unwrap_or(4096);
            for (name, next) in [(&b"."[..], 1u64), (&b".."[..], 2)] {
                if offset < next {
                    budget = budget.saturating_sub(fuse_dirent_size(name.len(), plus));
                    out.push(DirItem {
                        name: name.to_vec(),
                        next_offset: next,
                        kind: libc::S_IFDIR,
                        ino: at.ino,
                        looked: None,
                    });
                }
            }
            let from = offset.saturating_sub(2);
            let listed = w.entries(fh, &at.path, from, |e: &Listed| {
                let size = fuse_dirent_size(e.name.len(), plus);
                let fits = size <= budget;
                budget = budget.saturating_sub(size);
                fits
            })?;
            for (i, e) in (from..).zip(listed) {
                let path = child(&at.path, &e.name);
                let looked = match plus {
                    true => match w.image()?.stat(&path) {
                        Ok(m) => Some(at.looked(&path, attr(&m))?),
                        Err(_) => None,
                    },
                    false => None,
                };
                let ino = match &looked {
                    Some(l) => l.ino,
                    None => at.view.nodes.lock().number(&path).unwrap_or(0),
                };
                out.push(DirItem {
                    name: e.name,
                    next_offset: i + 3,
                    kind: e.kind,
                    ino,
                    looked,
                });
            }
            Ok(out)
        })
    })
}

pub fn statfs<D>(at: Routed, done: D)
where
    D: FnOnce(Result<StatFs>) + Send + 'static,
{
    with(at, done, |at, done| {
        at.run(done, |w, _| {
            // The reader does not count free blocks: the size, with nothing free.
            Ok(StatFs {
                blocks: w.image()?.bytes() / 4096,
                bfree: 0,
                bavail: 0,
                files: 0,
                ffree: 0,
                bsize: 4096,
                namelen: 255,
                frsize: 4096,
            })
        })
    })
}

/// The reader does not show extended attributes: none are listed, none found.
pub fn getxattr<D>(at: Routed, done: D)
where
    D: FnOnce(Result<XattrReply>) + Send + 'static,
{
    done(at.and(Err(Error::new(
        libc::ENODATA,
        "a stopped VM's disk shows no extended attributes",
    ))))
}

pub fn listxattr<D>(at: Routed, size: u32, done: D)
where
    D: FnOnce(Result<XattrReply>) + Send + 'static,
{
    done(at.map(|_| match size {
        0 => XattrReply::Size(0),
        _ => XattrReply::Data(Vec::new()),
    }))
}

/// `SEEK_DATA`/`SEEK_HOLE`: the whole file is data (the reader shows no holes).
pub fn lseek<D>(at: Routed, fh: u64, offset: u64, whence: i32, done: D)
where
    D: FnOnce(Result<u64>) + Send + 'static,
{
    with(at, done, |at, done| {
        at.run(done, move |w, at| {
            let size = w.size(&at.handle(fh)?)?;
            match whence {
                _ if offset >= size => Err(Error::new(libc::ENXIO, "offset past the end")),
                libc::SEEK_DATA => Ok(offset),
                libc::SEEK_HOLE => Ok(size),
                _ => Err(Error::invalid("unsupported whence")),
            }
        })
    })
}
