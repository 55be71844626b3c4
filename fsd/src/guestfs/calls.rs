//! `fs/` for callers inside the daemon (the HTTP adapter): the [`GuestFs`] operations as
//! `async fn`s, a path walk that resolves a guest path the way the guest's kernel would,
//! and the permission check the host kernel makes for FUSE callers
//! (`default_permissions`).
//!
//! Invariants:
//! - Paths go to the guest as they are: components are looked up one by one from the
//!   VM's root, `..` goes up the chain of directories already walked (and stays at the
//!   root), symlinks are read from the guest and followed there (absolute targets from
//!   the VM's root), at most [`MAX_LINKS`] per walk (ELOOP). The host never opens a
//!   path a guest or a client supplied.
//! - Every guest reference a walk takes (a counted lookup, as the kernel holds one) is
//!   given back when the [`Walk`] is dropped, so an in-process caller leaks nothing in
//!   the host's inode table or the agent, whatever the outcome.
//! - Permissions are the guest's modes, checked against the caller's uid, gid and groups
//!   exactly as `generic_permission` does for FUSE callers (root passes, except that it
//!   may only execute what someone may execute); sticky directories keep others' names.
//! - Callers run these in a task of their own (not a request future that a client can
//!   drop), so every answer reaches a receiver; a lookup whose receiver is gone anyway
//!   gives its reference back.
use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::{Attr, GuestFs, Looked, Opened, Owner, Target};
use crate::error::{Error, Result};

/// Symlinks followed in one walk before ELOOP (the kernel's limit).
pub const MAX_LINKS: u32 = 40;

/// Who asks: the identity the permission check uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Who {
    /// The owner new files get in the guest (the creating host user's numeric ids).
    pub fn owner(&self) -> Owner {
        Owner {
            uid: self.uid,
            gid: self.gid,
        }
    }
}

/// Access bits as in `access(2)`.
pub const R: u32 = 4;
pub const W: u32 = 2;
pub const X: u32 = 1;

fn is_dir(a: &Attr) -> bool {
    a.mode & libc::S_IFMT == libc::S_IFDIR
}

fn is_link(a: &Attr) -> bool {
    a.mode & libc::S_IFMT == libc::S_IFLNK
}

/// Whether `who` may access a node with attributes `a` for `want` (bits of [`R`],
/// [`W`], [`X`]), as the kernel's `generic_permission` decides.
pub fn permits(who: &Who, a: &Attr, want: u32) -> bool {
    if who.uid == 0 {
        // Root may read and write anything and search any directory, but executes a
        // file only when some execute bit is set.
        return want & X == 0 || is_dir(a) || a.mode & 0o111 != 0;
    }
    let bits = if a.uid == who.uid {
        (a.mode >> 6) & 7
    } else if a.gid == who.gid || who.groups.contains(&a.gid) {
        (a.mode >> 3) & 7
    } else {
        a.mode & 7
    };
    bits & want == want
}

/// EACCES unless `who` may access `a` for `want`.
pub fn check(who: &Who, a: &Attr, want: u32) -> Result<()> {
    if permits(who, a, want) {
        Ok(())
    } else {
        Err(Error::new(libc::EACCES, "permission denied"))
    }
}

/// The sticky-directory rule: in a directory with `S_ISVTX`, only the owner of an
/// entry, the directory's owner or root may remove or rename it.
pub fn check_sticky(who: &Who, dir: &Attr, entry: &Attr) -> Result<()> {
    if dir.mode & libc::S_ISVTX == 0 || who.uid == 0 || who.uid == dir.uid || who.uid == entry.uid {
        return Ok(());
    }
    Err(Error::new(
        libc::EPERM,
        "the directory is sticky: only the owner of an entry may remove or rename it",
    ))
}

type Done<T> = Box<dyn FnOnce(Result<T>) + Send + 'static>;

/// Run one callback-style [`GuestFs`] operation and wait for its answer.
async fn call<T: Send + 'static>(start: impl FnOnce(Done<T>)) -> Result<T> {
    let (tx, rx) = oneshot::channel();
    start(Box::new(move |r| {
        let _ = tx.send(r);
    }));
    rx.await
        .map_err(|_| Error::io("the guest file request was dropped"))?
}

/// A directory or file found by a walk: what to address it by and its attributes.
#[derive(Debug, Clone)]
pub struct Node {
    pub target: Target,
    pub attr: Attr,
}

/// Where a walk ended.
#[derive(Debug, Clone)]
pub struct Found {
    pub node: Node,
    /// The directory it was found in and the name it was found by (`None` for the
    /// root, or a path that ends in `..`).
    pub parent: Option<(Node, Vec<u8>)>,
}

/// A path walk and the guest references it holds (given back on drop).
pub struct Walk {
    fs: Arc<GuestFs>,
    root: Target,
    held: Vec<u64>,
}

impl Drop for Walk {
    fn drop(&mut self) {
        if !self.held.is_empty() {
            let items: Vec<(u64, u64)> = self.held.iter().map(|&i| (i, 1)).collect();
            self.fs.forget_many(&items);
        }
    }
}

fn components(path: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(<[u8]>::to_vec)
}

impl Walk {
    /// A walk from a VM's `fs/` root (`root` is its [`Target::Root`]).
    pub fn new(fs: Arc<GuestFs>, root: Target) -> Walk {
        Walk {
            fs,
            root,
            held: Vec::new(),
        }
    }

    /// The guest filesystem this walk uses.
    pub fn fs(&self) -> &Arc<GuestFs> {
        &self.fs
    }

    /// Keep a reference taken outside the walk (a created file) until the walk ends.
    pub fn hold(&mut self, ino: u64) {
        if ino != 0 {
            self.held.push(ino);
        }
    }

    pub async fn getattr(&self, t: &Target) -> Result<Attr> {
        let (fs, t) = (self.fs.clone(), t.clone());
        call(move |d| fs.getattr(t, None, move |r| d(r.map(|(a, _)| a)))).await
    }

    /// Look `name` up in `dir`: ENOENT when it does not exist; the reference is held.
    pub async fn lookup(&mut self, dir: &Target, name: &[u8]) -> Result<Node> {
        let (tx, rx) = oneshot::channel::<Result<Looked>>();
        let g = self.fs.clone();
        self.fs.lookup(dir.clone(), name.to_vec(), move |r| {
            // Nobody will see the answer: give its reference back at once.
            if let Err(Ok(l)) = tx.send(r) {
                if l.ino != 0 {
                    g.forget(l.ino, 1);
                }
            }
        });
        let looked = rx
            .await
            .map_err(|_| Error::io("the guest file request was dropped"))??;
        if looked.ino == 0 {
            return Err(Error::not_found("no such file or directory"));
        }
        self.held.push(looked.ino);
        Ok(Node {
            target: Target::Node(looked.ino),
            attr: looked.attr,
        })
    }

    async fn readlink(&self, t: &Target) -> Result<Vec<u8>> {
        let (fs, t) = (self.fs.clone(), t.clone());
        call(move |d| fs.readlink(t, d)).await
    }

    /// Resolve `path` for `who`. `follow_last`: a final symlink is followed (`stat`)
    /// or not (`lstat`, removal).
    pub async fn resolve(&mut self, who: &Who, path: &[u8], follow_last: bool) -> Result<Found> {
        let root = Node {
            target: self.root.clone(),
            attr: self.getattr(&self.root.clone()).await?,
        };
        let mut stack: Vec<(Node, Vec<u8>)> = vec![(root, Vec::new())];
        let mut todo: VecDeque<Vec<u8>> = components(path).collect();
        let mut links = 0u32;
        while let Some(name) = todo.pop_front() {
            let Some((dir, _)) = stack.last() else {
                return Err(Error::io("path walk lost its root"));
            };
            if !is_dir(&dir.attr) {
                return Err(Error::new(libc::ENOTDIR, "not a directory"));
            }
            check(who, &dir.attr, X)?;
            if name == b".." {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            let dir_target = dir.target.clone();
            let node = self.lookup(&dir_target, &name).await?;
            if is_link(&node.attr) && (!todo.is_empty() || follow_last) {
                links += 1;
                if links > MAX_LINKS {
                    return Err(Error::new(libc::ELOOP, "too many levels of symbolic links"));
                }
                let target = self.readlink(&node.target).await?;
                if target.first() == Some(&b'/') {
                    stack.truncate(1);
                }
                for c in components(&target).collect::<Vec<_>>().into_iter().rev() {
                    todo.push_front(c);
                }
                continue;
            }
            stack.push((node, name));
        }
        let (node, name) = stack.pop().ok_or_else(|| Error::io("empty path walk"))?;
        let parent = stack
            .pop()
            .filter(|_| !name.is_empty())
            .map(|(p, _)| (p, name));
        Ok(Found { node, parent })
    }

    /// Resolve the directory `path` names an entry of, and the entry's name (which need
    /// not exist): for creating, replacing, renaming and removing.
    pub async fn resolve_parent(&mut self, who: &Who, path: &[u8]) -> Result<(Node, Vec<u8>)> {
        let mut parts: Vec<Vec<u8>> = components(path).collect();
        let name = parts.pop().filter(|n| n != b"..").ok_or_else(|| {
            Error::invalid("the path names no entry (it is the root or ends in ..)")
        })?;
        let dir_path = parts.join(&b'/');
        let mut full = Vec::with_capacity(dir_path.len() + 1);
        full.push(b'/');
        full.extend_from_slice(&dir_path);
        let found = self.resolve(who, &full, true).await?;
        if !is_dir(&found.node.attr) {
            return Err(Error::new(libc::ENOTDIR, "not a directory"));
        }
        check(who, &found.node.attr, X)?;
        Ok((found.node, name))
    }

    /// The entry `name` of `dir` if it exists (ENOENT otherwise), without following it.
    pub async fn entry(&mut self, dir: &Node, name: &[u8]) -> Result<Node> {
        self.lookup(&dir.target, name).await
    }

    pub async fn open(&self, t: &Target, flags: i32) -> Result<Opened> {
        let (fs, t) = (self.fs.clone(), t.clone());
        call(move |d| fs.open(t, flags, d)).await
    }

    pub async fn read(&self, t: &Target, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let (fs, t) = (self.fs.clone(), t.clone());
        call(move |d| fs.read(t, fh, offset, size, d)).await
    }

    pub async fn write(&self, t: &Target, fh: u64, offset: u64, data: Vec<u8>) -> Result<u32> {
        let (fs, t) = (self.fs.clone(), t.clone());
        call(move |d| fs.write(t, fh, offset, data, d)).await
    }

    /// Close a handle (never waits for the guest).
    pub fn release(&self, t: &Target, fh: u64, dir: bool) {
        self.fs.release(t, fh, dir);
    }

    /// Create and open `name` in `dir` (`O_EXCL`); the new entry's reference is held.
    pub async fn create(
        &mut self,
        dir: &Node,
        name: &[u8],
        mode: u32,
        who: &Who,
    ) -> Result<(Node, Opened)> {
        let (fs, t, n, owner) = (
            self.fs.clone(),
            dir.target.clone(),
            name.to_vec(),
            who.owner(),
        );
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL;
        let (looked, opened) =
            call(move |d| fs.create(t, n, libc::S_IFREG | mode, flags, owner, d)).await?;
        self.hold(looked.ino);
        Ok((
            Node {
                target: Target::Node(looked.ino),
                attr: looked.attr,
            },
            opened,
        ))
    }

    pub async fn mkdir(&mut self, dir: &Node, name: &[u8], mode: u32, who: &Who) -> Result<Attr> {
        let (fs, t, n, owner) = (
            self.fs.clone(),
            dir.target.clone(),
            name.to_vec(),
            who.owner(),
        );
        let looked = call(move |d| fs.mkdir(t, n, mode, owner, d)).await?;
        self.hold(looked.ino);
        Ok(looked.attr)
    }

    pub async fn unlink(&self, dir: &Node, name: &[u8], is_dir: bool) -> Result<()> {
        let (fs, t, n) = (self.fs.clone(), dir.target.clone(), name.to_vec());
        call(move |d| fs.unlink(t, n, is_dir, d)).await
    }

    pub async fn rename(&self, from: (&Node, &[u8]), to: (&Node, &[u8]), flags: u32) -> Result<()> {
        let fs = self.fs.clone();
        let (p, n) = (from.0.target.clone(), from.1.to_vec());
        let (np, nn) = (to.0.target.clone(), to.1.to_vec());
        call(move |d| fs.rename(p, n, np, nn, flags, d)).await
    }

    /// Every entry of directory `dir` (without `.` and `..`) with its attributes when
    /// the guest gave them.
    pub async fn list(&mut self, dir: &Target) -> Result<Vec<(Vec<u8>, u32, Option<Attr>)>> {
        let (fs, t) = (self.fs.clone(), dir.clone());
        let opened: Opened = call(move |d| fs.opendir(t, d)).await?;
        let res = self.list_open(dir, opened.fh).await;
        self.fs.release(dir, opened.fh, true);
        res
    }

    async fn list_open(
        &mut self,
        dir: &Target,
        fh: u64,
    ) -> Result<Vec<(Vec<u8>, u32, Option<Attr>)>> {
        let mut out = Vec::new();
        let mut offset = 0u64;
        loop {
            let (fs, t) = (self.fs.clone(), dir.clone());
            let items = call(move |d| fs.readdir(t, fh, offset, true, d)).await?;
            let Some(last) = items.last() else {
                return Ok(out);
            };
            if last.next_offset <= offset {
                // A guest that does not move forward would loop forever.
                self.fs.unused_entries(&items);
                return Err(Error::io("the guest's directory listing does not advance"));
            }
            offset = last.next_offset;
            for item in items {
                if let Some(l) = &item.looked {
                    self.hold(l.ino);
                }
                if item.name == b"." || item.name == b".." {
                    continue;
                }
                out.push((item.name, item.kind, item.looked.map(|l| l.attr)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(mode: u32, uid: u32, gid: u32) -> Attr {
        Attr {
            mode,
            uid,
            gid,
            ..Attr::default()
        }
    }

    fn who(uid: u32, gid: u32, groups: &[u32]) -> Who {
        Who {
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn generic_permission() {
        let f = attr(libc::S_IFREG | 0o640, 1000, 100);
        assert!(permits(&who(1000, 1000, &[]), &f, R | W));
        assert!(!permits(&who(1000, 1000, &[]), &f, X));
        assert!(permits(&who(1001, 100, &[]), &f, R));
        assert!(permits(&who(1001, 5, &[100]), &f, R));
        assert!(!permits(&who(1001, 5, &[100]), &f, W));
        assert!(!permits(&who(1002, 5, &[]), &f, R));
        // Owner bits apply to the owner even when group or other bits would allow more.
        let g = attr(libc::S_IFREG | 0o077, 1000, 100);
        assert!(!permits(&who(1000, 100, &[]), &g, R));
        // Root: anything but executing a file nobody may execute.
        assert!(permits(&who(0, 0, &[]), &attr(libc::S_IFREG, 5, 5), R | W));
        assert!(!permits(
            &who(0, 0, &[]),
            &attr(libc::S_IFREG | 0o600, 5, 5),
            X
        ));
        assert!(permits(&who(0, 0, &[]), &attr(libc::S_IFDIR, 5, 5), X));
    }

    #[test]
    fn sticky_directories() {
        let tmp = attr(libc::S_IFDIR | 0o1777, 0, 0);
        let theirs = attr(libc::S_IFREG | 0o666, 1001, 1001);
        assert!(check_sticky(&who(1000, 1000, &[]), &tmp, &theirs).is_err());
        assert!(check_sticky(&who(1001, 1001, &[]), &tmp, &theirs).is_ok());
        assert!(check_sticky(&who(0, 0, &[]), &tmp, &theirs).is_ok());
        let plain = attr(libc::S_IFDIR | 0o777, 0, 0);
        assert!(check_sticky(&who(1000, 1000, &[]), &plain, &theirs).is_ok());
    }

    #[test]
    fn components_skip_empty_and_dot() {
        let c: Vec<Vec<u8>> = components(b"//a/./b/../c/").collect();
        assert_eq!(
            c,
            vec![b"a".to_vec(), b"b".to_vec(), b"..".to_vec(), b"c".to_vec()]
        );
    }
}
