//! A model of the kernel's FUSE caches in front of [`GuestFs`], as `fuse/` uses them:
//! what a user's `stat`, `ls`, `cat` and writes would see through a mount, without one.
//!
//! What it keeps, and when (after Linux's fs/fuse, for what `GuestFs` answers):
//! - Dentries `(parent, name) → inode` (0: negative), usable without asking while they
//!   are *fresh*: an entry whose TTL is [`TTL_COHERENT`] (a watched directory) is fresh
//!   until an invalidation expires it (`FUSE_EXPIRE_ONLY`: kept, but looked up again
//!   before its next use); a shorter TTL is treated as already expired. A lookup that
//!   finds another inode, or none, replaces the dentry.
//! - Attributes per inode (same freshness rule), dropped by an inode invalidation and
//!   by the kernel's own changes that alter them (`fuse_dir_changed` on a directory
//!   whose entries the host changed, ctime/nlink/size changes of its own ops).
//! - Pages per inode: filled by reads, dropped at an `open` without `keep_cache`, by a
//!   data invalidation and by the host's own writes and truncations; used only while
//!   their length matches the attributes' size.
//! - Listings per directory (`FOPEN_CACHE_DIR`): filled by a readdirplus of a directory
//!   opened with `keep_cache`, dropped by a data invalidation of the directory or a
//!   change the host made in it.
//! - Lookup counts: every entry handed over adds one; an inode no dentry reaches from
//!   the root any more (its name removed or replaced) is forgotten at once, the whole
//!   count given back ([`GuestFs::forget_many`]), as an evicted inode is.
//!
//! A *fresh* walk asks `GuestFs` for everything (and refreshes the caches, as answers
//! do); a cached walk uses what the caches hold.
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bandsox_fsd::guestfs::{
    Attr, GuestFs, Invalidate, Looked, Owner, SetAttrs, SetTime, Target, Timespec, TTL_COHERENT,
};

use super::reference::Path;
use super::walk::{Item, Tree};

/// An errno.
pub type Errno = i32;

/// Deadline of any single call (nothing may hang).
pub const T: Duration = Duration::from_secs(30);

/// Largest file the walk reads (the model's files are far smaller).
const MAX_READ: usize = 1 << 20;

/// Call a `GuestFs` operation and wait for its completion callback.
pub async fn call<R, F>(f: F) -> Result<R, Errno>
where
    R: Send + 'static,
    F: FnOnce(Box<dyn FnOnce(bandsox_fsd::error::Result<R>) + Send>),
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    f(Box::new(move |r| {
        let _ = tx.send(r);
    }));
    tokio::time::timeout(T, rx)
        .await
        .expect("GuestFs answered in time")
        .expect("GuestFs called its completion")
        .map_err(|e| e.errno)
}

#[derive(Debug, Clone, Copy)]
struct Dentry {
    /// 0: negative.
    ino: u64,
    fresh: bool,
}

/// One directory entry of a listing.
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: u32,
    /// The readdirplus entry's attributes (not kept in a cached listing).
    pub attr: Option<Attr>,
}

#[derive(Default)]
struct Cache {
    dentries: HashMap<(u64, Vec<u8>), Dentry>,
    attrs: HashMap<u64, Attr>,
    kinds: HashMap<u64, u32>,
    pages: HashMap<u64, Vec<u8>>,
    listings: HashMap<u64, Vec<Listed>>,
    nlookup: HashMap<u64, u64>,
}

impl Cache {
    /// The host changed entries of directory `ino`.
    fn dir_changed(&mut self, ino: u64) {
        self.attrs.remove(&ino);
        self.listings.remove(&ino);
    }
}

/// Where `GuestFs` sends its invalidations: straight into the cache model.
struct Invalidator(Arc<Mutex<Cache>>);

impl Invalidate for Invalidator {
    fn entry(&self, parent: u64, name: &[u8]) {
        let mut c = lock(&self.0);
        if let Some(d) = c.dentries.get_mut(&(parent, name.to_vec())) {
            d.fresh = false;
        }
    }

    fn inode(&self, ino: u64, data: bool) {
        let mut c = lock(&self.0);
        c.attrs.remove(&ino);
        if data {
            c.pages.remove(&ino);
            c.listings.remove(&ino);
        }
    }
}

fn lock(c: &Mutex<Cache>) -> MutexGuard<'_, Cache> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

fn fresh(ttl: Duration) -> bool {
    ttl >= TTL_COHERENT
}

pub struct Kernel {
    g: Arc<GuestFs>,
    root: Target,
    root_ino: u64,
    cache: Arc<Mutex<Cache>>,
    owner: Owner,
}

impl Kernel {
    /// The kernel in front of `g`, whose `fs/` directory is `root`; `g`'s invalidations
    /// go to it.
    pub fn new(g: Arc<GuestFs>, root: Target, owner: Owner) -> Kernel {
        let cache = Arc::new(Mutex::new(Cache::default()));
        g.set_invalidator(Arc::new(Invalidator(cache.clone())));
        Kernel {
            root_ino: root.ino(),
            g,
            root,
            cache,
            owner,
        }
    }

    pub fn guestfs(&self) -> &Arc<GuestFs> {
        &self.g
    }

    pub fn root(&self) -> Target {
        self.root.clone()
    }

    fn target(&self, ino: u64) -> Target {
        if ino == self.root_ino {
            self.root.clone()
        } else {
            Target::Node(ino)
        }
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        lock(&self.cache)
    }

    /// The kernel received `l` for `name` in `parent`.
    fn entered(&self, parent: u64, name: &[u8], l: &Looked) {
        let mut c = self.cache();
        let fresh = fresh(l.ttl);
        if l.ino != 0 {
            *c.nlookup.entry(l.ino).or_default() += 1;
            c.kinds.insert(l.ino, l.attr.mode & libc::S_IFMT);
            if fresh {
                c.attrs.insert(l.ino, l.attr);
            } else {
                c.attrs.remove(&l.ino);
            }
        }
        c.dentries
            .insert((parent, name.to_vec()), Dentry { ino: l.ino, fresh });
    }

    /// Forget what no dentry reaches from the root any more.
    fn evict(&self) {
        let gone: Vec<(u64, u64)> = {
            let mut c = self.cache();
            let mut reach = HashSet::from([self.root_ino]);
            loop {
                let before = reach.len();
                for ((p, _), d) in &c.dentries {
                    if d.ino != 0 && reach.contains(p) {
                        reach.insert(d.ino);
                    }
                }
                if reach.len() == before {
                    break;
                }
            }
            c.dentries.retain(|(p, _), _| reach.contains(p));
            let gone: Vec<(u64, u64)> = c
                .nlookup
                .iter()
                .filter(|(ino, _)| !reach.contains(ino))
                .map(|(ino, n)| (*ino, *n))
                .collect();
            for (ino, _) in &gone {
                c.nlookup.remove(ino);
                c.attrs.remove(ino);
                c.kinds.remove(ino);
                c.pages.remove(ino);
                c.listings.remove(ino);
            }
            gone
        };
        self.g.forget_many(&gone);
    }

    /// `echo 3 > /proc/sys/vm/drop_caches`: everything is forgotten.
    pub fn drop_caches(&self) {
        let all: Vec<(u64, u64)> = {
            let mut c = self.cache();
            let all = c.nlookup.drain().collect();
            *c = Cache::default();
            all
        };
        self.g.forget_many(&all);
    }

    /// The TTL of every cached name passes: each is looked up again before its next use.
    pub fn expire_names(&self) {
        for d in self.cache().dentries.values_mut() {
            d.fresh = false;
        }
    }

    /// `name` in `parent`: its inode, 0 when there is none.
    pub async fn lookup(&self, parent: u64, name: &[u8], fresh: bool) -> Result<u64, Errno> {
        if !fresh {
            let d = self.cache().dentries.get(&(parent, name.to_vec())).copied();
            if let Some(d) = d.filter(|d| d.fresh) {
                return Ok(d.ino);
            }
        }
        let res = call(|d| self.g.lookup(self.target(parent), name.to_vec(), d)).await;
        let res = match res {
            Ok(l) => {
                self.entered(parent, name, &l);
                Ok(l.ino)
            }
            Err(libc::ENOENT) => {
                self.cache().dentries.remove(&(parent, name.to_vec()));
                Ok(0)
            }
            Err(e) => Err(e),
        };
        self.evict();
        res
    }

    /// The directory at `path` (each component looked up as the VFS walks a path).
    pub async fn dir(&self, path: &[Vec<u8>]) -> Result<u64, Errno> {
        let mut ino = self.root_ino;
        for name in path {
            ino = self.lookup(ino, name, false).await?;
            if ino == 0 {
                return Err(libc::ENOENT);
            }
            if self.cache().kinds.get(&ino) != Some(&libc::S_IFDIR) {
                return Err(libc::ENOTDIR);
            }
        }
        Ok(ino)
    }

    /// The inode at `path` (not the root), ENOENT when there is none.
    pub async fn node(&self, path: &[Vec<u8>]) -> Result<u64, Errno> {
        let (name, dir) = path.split_last().expect("not the root");
        let parent = self.dir(dir).await?;
        match self.lookup(parent, name, false).await? {
            0 => Err(libc::ENOENT),
            ino => Ok(ino),
        }
    }

    pub async fn getattr(&self, ino: u64, fresh: bool) -> Result<Attr, Errno> {
        if !fresh {
            if let Some(a) = self.cache().attrs.get(&ino) {
                return Ok(*a);
            }
        }
        let (a, ttl) = call(|d| self.g.getattr(self.target(ino), None, d)).await?;
        self.told(ino, a, ttl);
        Ok(a)
    }

    fn told(&self, ino: u64, a: Attr, ttl: Duration) {
        let mut c = self.cache();
        if c.nlookup.contains_key(&ino) || ino == self.root_ino {
            if fresh(ttl) {
                c.attrs.insert(ino, a);
            } else {
                c.attrs.remove(&ino);
            }
        }
    }

    async fn setattr(&self, ino: u64, set: SetAttrs) -> Result<(), Errno> {
        let (a, ttl) = call(|d| self.g.setattr(self.target(ino), None, set, d)).await?;
        self.told(ino, a, ttl);
        if set.size.is_some() {
            self.cache().pages.remove(&ino);
        }
        Ok(())
    }

    pub async fn chmod(&self, ino: u64, perm: u32) -> Result<(), Errno> {
        let set = SetAttrs {
            mode: Some(perm),
            ..SetAttrs::default()
        };
        self.setattr(ino, set).await
    }

    pub async fn truncate(&self, ino: u64, size: u64) -> Result<(), Errno> {
        let set = SetAttrs {
            size: Some(size),
            ..SetAttrs::default()
        };
        self.setattr(ino, set).await
    }

    pub async fn utimens(&self, ino: u64, atime: Timespec, mtime: Timespec) -> Result<(), Errno> {
        let set = SetAttrs {
            atime: Some(SetTime::At(atime)),
            mtime: Some(SetTime::At(mtime)),
            ..SetAttrs::default()
        };
        self.setattr(ino, set).await
    }

    /// Open `ino`; without `keep_cache` its pages go (as `fuse_finish_open` does).
    async fn open(&self, ino: u64, flags: i32) -> Result<u64, Errno> {
        let o = call(|d| self.g.open(self.target(ino), flags, d)).await?;
        if !o.keep_cache {
            self.cache().pages.remove(&ino);
        }
        Ok(o.fh)
    }

    fn release(&self, ino: u64, fh: u64, dir: bool) {
        self.g.release(&self.target(ino), fh, dir);
    }

    async fn write_fh(&self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> Result<(), Errno> {
        if !data.is_empty() {
            let t = self.target(ino);
            let n = call(|d| self.g.write(t, fh, offset, data.to_vec(), d)).await?;
            assert_eq!(n as usize, data.len(), "a short write");
        }
        // Without writeback caching the size and times the kernel knows are stale now.
        let mut c = self.cache();
        c.attrs.remove(&ino);
        c.pages.remove(&ino);
        Ok(())
    }

    pub async fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let fh = self.open(ino, libc::O_WRONLY).await?;
        let res = self.write_fh(ino, fh, offset, data).await;
        self.release(ino, fh, false);
        res
    }

    /// The name must not exist yet (the VFS looks it up before making it).
    async fn absent(&self, parent: u64, name: &[u8]) -> Result<(), Errno> {
        match self.lookup(parent, name, false).await? {
            0 => Ok(()),
            _ => Err(libc::EEXIST),
        }
    }

    /// A new entry was made: it is cached, its directory changed.
    fn made(&self, parent: u64, name: &[u8], l: &Looked) {
        self.entered(parent, name, l);
        self.cache().dir_changed(parent);
    }

    pub async fn create(
        &self,
        parent: u64,
        name: &[u8],
        perm: u32,
        data: &[u8],
    ) -> Result<(), Errno> {
        self.absent(parent, name).await?;
        let flags = libc::O_CREAT | libc::O_EXCL | libc::O_RDWR;
        let mode = libc::S_IFREG | perm;
        let t = self.target(parent);
        let (l, o) = call(|d| self.g.create(t, name.to_vec(), mode, flags, self.owner, d)).await?;
        self.made(parent, name, &l);
        if !o.keep_cache {
            self.cache().pages.remove(&l.ino);
        }
        let res = self.write_fh(l.ino, o.fh, 0, data).await;
        self.release(l.ino, o.fh, false);
        res
    }

    pub async fn mkdir(&self, parent: u64, name: &[u8], perm: u32) -> Result<(), Errno> {
        self.absent(parent, name).await?;
        let t = self.target(parent);
        let l = call(|d| self.g.mkdir(t, name.to_vec(), perm, self.owner, d)).await?;
        self.made(parent, name, &l);
        Ok(())
    }

    pub async fn symlink(&self, parent: u64, name: &[u8], target: &[u8]) -> Result<(), Errno> {
        self.absent(parent, name).await?;
        let t = self.target(parent);
        let l = call(|d| {
            self.g
                .symlink(t, name.to_vec(), target.to_vec(), self.owner, d)
        })
        .await?;
        self.made(parent, name, &l);
        Ok(())
    }

    pub async fn link(&self, ino: u64, parent: u64, name: &[u8]) -> Result<(), Errno> {
        if self.cache().kinds.get(&ino) == Some(&libc::S_IFDIR) {
            return Err(libc::EPERM);
        }
        self.absent(parent, name).await?;
        let (t, np) = (self.target(ino), self.target(parent));
        let l = call(|d| self.g.link(t, np, name.to_vec(), d)).await?;
        self.made(parent, name, &l);
        Ok(())
    }

    /// `unlink` (`dir`: `rmdir`) of `name` in `parent`.
    pub async fn unlink(&self, parent: u64, name: &[u8], dir: bool) -> Result<(), Errno> {
        let ino = match self.lookup(parent, name, false).await? {
            0 => return Err(libc::ENOENT),
            ino => ino,
        };
        // The VFS checks the victim's type itself.
        let is_dir = self.cache().kinds.get(&ino) == Some(&libc::S_IFDIR);
        match (dir, is_dir) {
            (false, true) => return Err(libc::EISDIR),
            (true, false) => return Err(libc::ENOTDIR),
            _ => {}
        }
        let t = self.target(parent);
        call(|d| self.g.unlink(t, name.to_vec(), dir, d)).await?;
        {
            let mut c = self.cache();
            c.dentries.remove(&(parent, name.to_vec()));
            c.attrs.remove(&ino);
            c.dir_changed(parent);
        }
        self.evict();
        Ok(())
    }

    pub async fn rename(&self, p1: u64, n1: &[u8], p2: u64, n2: &[u8]) -> Result<(), Errno> {
        let moved = match self.lookup(p1, n1, false).await? {
            0 => return Err(libc::ENOENT),
            ino => ino,
        };
        let replaced = self.lookup(p2, n2, false).await?;
        if moved == replaced {
            // Two names of one inode: `vfs_rename` does nothing.
            return Ok(());
        }
        let (t1, t2) = (self.target(p1), self.target(p2));
        call(|d| self.g.rename(t1, n1.to_vec(), t2, n2.to_vec(), 0, d)).await?;
        {
            let mut c = self.cache();
            // `d_move`: the dentry keeps its state under the new name.
            let d = c.dentries.remove(&(p1, n1.to_vec()));
            match d {
                Some(d) => c.dentries.insert((p2, n2.to_vec()), d),
                None => c.dentries.remove(&(p2, n2.to_vec())),
            };
            c.attrs.remove(&moved);
            c.attrs.remove(&replaced);
            c.dir_changed(p1);
            c.dir_changed(p2);
        }
        self.evict();
        Ok(())
    }

    /// The entries of directory `ino` (without `.` and `..`).
    pub async fn readdir(&self, ino: u64, fresh: bool) -> Result<Vec<Listed>, Errno> {
        let o = call(|d| self.g.opendir(self.target(ino), d)).await?;
        let cached = if o.keep_cache && !fresh {
            self.cache().listings.get(&ino).cloned()
        } else {
            None
        };
        let res = match cached {
            Some(l) => Ok(l),
            None => self.list(ino, o.fh).await,
        };
        self.release(ino, o.fh, true);
        let mut c = self.cache();
        match &res {
            Ok(l) if o.keep_cache => {
                let kept = l.iter().map(|e| Listed {
                    attr: None,
                    ..e.clone()
                });
                c.listings.insert(ino, kept.collect());
            }
            _ => {
                c.listings.remove(&ino);
            }
        }
        drop(c);
        self.evict();
        res
    }

    async fn list(&self, ino: u64, fh: u64) -> Result<Vec<Listed>, Errno> {
        let mut out = Vec::new();
        let mut offset = 0;
        for _ in 0..1000 {
            let t = self.target(ino);
            let items = call(|d| self.g.readdir(t, fh, offset, true, d)).await?;
            if items.is_empty() {
                return Ok(out);
            }
            for it in items {
                offset = it.next_offset;
                if it.name == b"." || it.name == b".." {
                    continue;
                }
                if let Some(l) = &it.looked {
                    self.entered(ino, &it.name, l);
                }
                out.push(Listed {
                    attr: it.looked.as_ref().map(|l| l.attr),
                    name: it.name,
                    ino: it.ino,
                    kind: it.kind,
                });
            }
        }
        panic!("a listing of more than 1000 pages");
    }

    /// The whole contents of file `ino`, as `cat` reads them.
    pub async fn read(&self, ino: u64, fresh: bool) -> Result<Vec<u8>, Errno> {
        let fh = self.open(ino, libc::O_RDONLY).await?;
        let res = self.read_fh(ino, fh, fresh).await;
        self.release(ino, fh, false);
        res
    }

    async fn read_fh(&self, ino: u64, fh: u64, fresh: bool) -> Result<Vec<u8>, Errno> {
        let size = self.getattr(ino, fresh).await?.size;
        if !fresh {
            let pages = self.cache().pages.get(&ino).cloned();
            if let Some(p) = pages.filter(|p| p.len() as u64 == size) {
                return Ok(p);
            }
        }
        let mut out = Vec::new();
        while out.len() <= MAX_READ {
            let t = self.target(ino);
            let offset = out.len() as u64;
            let d = call(|done| self.g.read(t, fh, offset, 65536, done)).await?;
            if d.is_empty() {
                break;
            }
            out.extend_from_slice(&d);
        }
        self.cache().pages.insert(ino, out.clone());
        Ok(out)
    }

    pub async fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        call(|d| self.g.readlink(self.target(ino), d)).await
    }

    /// Every name the kernel would answer from its cache alone (fresh dentries reached
    /// from the root through fresh dentries): path → inode, 0 for "does not exist".
    pub fn cached_names(&self) -> Vec<(Path, u64)> {
        let c = self.cache();
        let mut out = Vec::new();
        let mut dirs: Vec<(Path, u64)> = vec![(Vec::new(), self.root_ino)];
        while let Some((path, dir)) = dirs.pop() {
            for ((parent, name), d) in &c.dentries {
                if *parent != dir || !d.fresh {
                    continue;
                }
                let mut p = path.clone();
                p.push(name.clone());
                if d.ino != 0 && c.kinds.get(&d.ino) == Some(&libc::S_IFDIR) {
                    dirs.push((p.clone(), d.ino));
                }
                out.push((p, d.ino));
            }
        }
        out
    }

    /// What `stat` and `cat` (or `readlink`) of `path` show: the path resolved and the
    /// attributes and contents read through the caches.
    pub async fn stat(&self, path: &[Vec<u8>]) -> Result<Item, Errno> {
        let ino = self.node(path).await?;
        let a = self.getattr(ino, false).await?;
        let data = match a.mode & libc::S_IFMT {
            libc::S_IFREG => Some(self.read(ino, false).await?),
            libc::S_IFLNK => Some(self.readlink(ino).await?),
            _ => None,
        };
        Ok(Item::new(ino, &a, data))
    }

    /// Walk the tree from the root: each directory listed, each name looked up, its
    /// attributes and contents read. `fresh`: ask `GuestFs` for everything; else use
    /// the caches where they answer. A listing that disagrees with a lookup is an error.
    pub async fn walk(&self, fresh: bool) -> Result<Tree, String> {
        let mut tree = BTreeMap::new();
        let root = self.getattr(self.root_ino, fresh).await;
        let root = root.map_err(|e| format!("getattr of the root: errno {e}"))?;
        tree.insert(Vec::new(), Item::new(self.root_ino, &root, None));
        let mut dirs: VecDeque<(Path, u64)> = VecDeque::from([(Vec::new(), self.root_ino)]);
        while let Some((path, dir)) = dirs.pop_front() {
            let at = |p: &Path| super::walk::show(p);
            let listing = self
                .readdir(dir, fresh)
                .await
                .map_err(|e| format!("readdir of {}: errno {e}", at(&path)))?;
            for e in listing {
                let mut p = path.clone();
                p.push(e.name.clone());
                let ino = self
                    .lookup(dir, &e.name, fresh)
                    .await
                    .map_err(|err| format!("lookup of {}: errno {err}", at(&p)))?;
                if ino != e.ino {
                    return Err(format!(
                        "{} is listed as inode {:#x} but looked up as {:#x}",
                        at(&p),
                        e.ino,
                        ino
                    ));
                }
                let a = self
                    .getattr(ino, fresh)
                    .await
                    .map_err(|err| format!("getattr of {}: errno {err}", at(&p)))?;
                let kind = a.mode & libc::S_IFMT;
                if e.kind != kind {
                    return Err(format!(
                        "{} is listed as type {:o} but is {kind:o}",
                        at(&p),
                        e.kind
                    ));
                }
                if let Some(la) = e.attr.filter(|_| fresh) {
                    if Item::new(ino, &la, None) != Item::new(ino, &a, None) {
                        return Err(format!(
                            "{}: readdirplus said {la:?}, getattr {a:?}",
                            at(&p)
                        ));
                    }
                }
                let data = match kind {
                    libc::S_IFREG => Some(self.read(ino, fresh).await),
                    libc::S_IFLNK => Some(self.readlink(ino).await),
                    _ => None,
                };
                let data = data
                    .transpose()
                    .map_err(|err| format!("reading {}: errno {err}", at(&p)))?;
                if kind == libc::S_IFDIR {
                    dirs.push_back((p.clone(), ino));
                }
                tree.insert(p, Item::new(ino, &a, data));
            }
        }
        Ok(tree)
    }
}
