//! The reference model: the tree the guest's directory should hold after each step, and
//! which names are the same file.
//!
//! Invariants: every node but the root is named by at least one directory entry (a node
//! whose last name goes is dropped); a directory has exactly one name; a node's [`Id`]
//! never changes while it lives (renames move it, hard links share it) and is never
//! given to another node. Each operation answers what Linux answers on ext4 (`Ok` or the
//! errno, checked in the order the kernel checks) and changes the tree only on `Ok`.
use std::collections::{BTreeMap, HashMap};

/// A node's identity in the model (not an inode number).
pub type Id = u64;
/// A path as its components, relative to the guest directory (empty: the directory).
pub type Path = Vec<Vec<u8>>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    File(Vec<u8>),
    Dir(BTreeMap<Vec<u8>, Id>),
    Symlink(Vec<u8>),
}

#[derive(Debug, Clone)]
pub struct Node {
    pub body: Body,
    /// Permission bits.
    pub perm: u32,
}

pub struct Reference {
    nodes: HashMap<Id, Node>,
    next: Id,
}

pub const ROOT: Id = 0;

/// A node as a walk reports it: identity, body, permission bits and link count.
#[derive(Debug, Clone)]
pub struct Seen {
    pub id: Id,
    pub body: Body,
    pub perm: u32,
    pub nlink: u32,
}

impl Reference {
    /// An empty guest directory with permission bits `perm`.
    pub fn new(perm: u32) -> Reference {
        let root = Node {
            body: Body::Dir(BTreeMap::new()),
            perm,
        };
        Reference {
            nodes: HashMap::from([(ROOT, root)]),
            next: ROOT + 1,
        }
    }

    fn children(&self, id: Id) -> Option<&BTreeMap<Vec<u8>, Id>> {
        match &self.nodes.get(&id)?.body {
            Body::Dir(c) => Some(c),
            _ => None,
        }
    }

    fn children_mut(&mut self, id: Id) -> Option<&mut BTreeMap<Vec<u8>, Id>> {
        match &mut self.nodes.get_mut(&id)?.body {
            Body::Dir(c) => Some(c),
            _ => None,
        }
    }

    pub fn lookup(&self, path: &[Vec<u8>]) -> Option<Id> {
        let mut id = ROOT;
        for name in path {
            id = *self.children(id)?.get(name)?;
        }
        Some(id)
    }

    pub fn node(&self, id: Id) -> Option<&Node> {
        self.nodes.get(&id)
    }

    pub fn is_dir(&self, id: Id) -> bool {
        self.children(id).is_some()
    }

    pub fn is_file(&self, id: Id) -> bool {
        matches!(self.nodes.get(&id).map(|n| &n.body), Some(Body::File(_)))
    }

    pub fn is_live(&self, id: Id) -> bool {
        self.nodes.contains_key(&id)
    }

    /// Every name in the tree (not the root), parents before children, in name order.
    pub fn entries(&self) -> Vec<(Path, Id)> {
        let mut out = Vec::new();
        self.collect(ROOT, &mut Vec::new(), &mut out);
        out
    }

    fn collect(&self, dir: Id, at: &mut Path, out: &mut Vec<(Path, Id)>) {
        let Some(children) = self.children(dir) else {
            return;
        };
        for (name, &id) in children {
            at.push(name.clone());
            out.push((at.clone(), id));
            self.collect(id, at, out);
            at.pop();
        }
    }

    /// The directories (the root first).
    pub fn dirs(&self) -> Vec<Path> {
        let mut out = vec![Vec::new()];
        out.extend(
            self.entries()
                .into_iter()
                .filter(|(_, id)| self.is_dir(*id))
                .map(|(p, _)| p),
        );
        out
    }

    /// The regular files' paths (a hard-linked file once per name).
    pub fn files(&self) -> Vec<Path> {
        self.entries()
            .into_iter()
            .filter(|(_, id)| self.is_file(*id))
            .map(|(p, _)| p)
            .collect()
    }

    /// The link count `stat` shows.
    pub fn nlink(&self, id: Id) -> u32 {
        if let Some(children) = self.children(id) {
            let subdirs = children.values().filter(|c| self.is_dir(**c)).count();
            return 2 + u32::try_from(subdirs).unwrap();
        }
        let names = self
            .nodes
            .values()
            .filter_map(|n| match &n.body {
                Body::Dir(c) => Some(c.values().filter(|c| **c == id).count()),
                _ => None,
            })
            .sum::<usize>();
        u32::try_from(names).unwrap()
    }

    /// Every path with what a walk should see there.
    pub fn seen(&self) -> BTreeMap<Path, Seen> {
        self.entries()
            .into_iter()
            .map(|(p, id)| {
                let n = &self.nodes[&id];
                let seen = Seen {
                    id,
                    body: match &n.body {
                        // A walk compares directories by their names, not their ids.
                        Body::Dir(_) => Body::Dir(BTreeMap::new()),
                        b => b.clone(),
                    },
                    perm: n.perm,
                    nlink: self.nlink(id),
                };
                (p, seen)
            })
            .collect()
    }

    /// The directory `dir` and the name `name` in it, for a new name.
    fn new_name(&self, dir: &[Vec<u8>], name: &[u8]) -> Result<Id, i32> {
        let d = self.lookup(dir).ok_or(libc::ENOENT)?;
        let children = self.children(d).ok_or(libc::ENOTDIR)?;
        if children.contains_key(name) {
            return Err(libc::EEXIST);
        }
        Ok(d)
    }

    fn add(&mut self, dir: Id, name: &[u8], node: Node) -> Id {
        let id = self.next;
        self.next += 1;
        self.nodes.insert(id, node);
        self.children_mut(dir).unwrap().insert(name.to_vec(), id);
        id
    }

    /// Drop `id` if no name is left for it.
    fn drop_if_unnamed(&mut self, id: Id) {
        if !self.is_dir(id) && self.nlink(id) == 0 {
            self.nodes.remove(&id);
        }
    }

    pub fn create(
        &mut self,
        dir: &[Vec<u8>],
        name: &[u8],
        perm: u32,
        data: &[u8],
    ) -> Result<(), i32> {
        let d = self.new_name(dir, name)?;
        let body = Body::File(data.to_vec());
        self.add(d, name, Node { body, perm });
        Ok(())
    }

    pub fn mkdir(&mut self, dir: &[Vec<u8>], name: &[u8], perm: u32) -> Result<(), i32> {
        let d = self.new_name(dir, name)?;
        let body = Body::Dir(BTreeMap::new());
        self.add(d, name, Node { body, perm });
        Ok(())
    }

    pub fn symlink(&mut self, dir: &[Vec<u8>], name: &[u8], target: &[u8]) -> Result<(), i32> {
        let d = self.new_name(dir, name)?;
        let body = Body::Symlink(target.to_vec());
        self.add(d, name, Node { body, perm: 0o777 });
        Ok(())
    }

    pub fn link(&mut self, src: &[Vec<u8>], dir: &[Vec<u8>], name: &[u8]) -> Result<(), i32> {
        let s = self.lookup(src).ok_or(libc::ENOENT)?;
        let d = self.new_name(dir, name)?;
        if self.is_dir(s) {
            return Err(libc::EPERM);
        }
        self.children_mut(d).unwrap().insert(name.to_vec(), s);
        Ok(())
    }

    fn split(path: &[Vec<u8>]) -> (&[Vec<u8>], &[u8]) {
        let (name, dir) = path.split_last().expect("not the root");
        (dir, name)
    }

    pub fn unlink(&mut self, path: &[Vec<u8>]) -> Result<(), i32> {
        let id = self.lookup(path).ok_or(libc::ENOENT)?;
        if self.is_dir(id) {
            return Err(libc::EISDIR);
        }
        let (dir, name) = Self::split(path);
        let d = self.lookup(dir).unwrap();
        self.children_mut(d).unwrap().remove(name);
        self.drop_if_unnamed(id);
        Ok(())
    }

    pub fn rmdir(&mut self, path: &[Vec<u8>]) -> Result<(), i32> {
        let id = self.lookup(path).ok_or(libc::ENOENT)?;
        let children = self.children(id).ok_or(libc::ENOTDIR)?;
        if !children.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        let (dir, name) = Self::split(path);
        let d = self.lookup(dir).unwrap();
        self.children_mut(d).unwrap().remove(name);
        self.nodes.remove(&id);
        Ok(())
    }

    /// `rename(2)` without flags, with Linux's checks in its order.
    pub fn rename(&mut self, src: &[Vec<u8>], dir: &[Vec<u8>], name: &[u8]) -> Result<(), i32> {
        let s = self.lookup(src).ok_or(libc::ENOENT)?;
        let d = self.lookup(dir).ok_or(libc::ENOENT)?;
        let target = self.children(d).ok_or(libc::ENOTDIR)?.get(name).copied();
        // The source may not be an ancestor of the new name's directory; the target may
        // not be an ancestor of the source (by path: a hard link elsewhere does not count).
        if dir.starts_with(src) {
            return Err(libc::EINVAL);
        }
        let mut new_path = dir.to_vec();
        new_path.push(name.to_vec());
        if src.len() > new_path.len() && src.starts_with(&new_path) {
            return Err(libc::ENOTEMPTY);
        }
        if target == Some(s) {
            // Two names of one file: nothing happens.
            return Ok(());
        }
        if let Some(t) = target {
            match (self.is_dir(s), self.is_dir(t)) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) if !self.children(t).unwrap().is_empty() => {
                    return Err(libc::ENOTEMPTY)
                }
                _ => {}
            }
        }
        let (sdir, sname) = Self::split(src);
        let sd = self.lookup(sdir).unwrap();
        self.children_mut(sd).unwrap().remove(sname);
        self.children_mut(d).unwrap().insert(name.to_vec(), s);
        if let Some(t) = target {
            if self.is_dir(t) {
                self.nodes.remove(&t);
            } else {
                self.drop_if_unnamed(t);
            }
        }
        Ok(())
    }

    pub fn chmod(&mut self, path: &[Vec<u8>], perm: u32) -> Result<(), i32> {
        let id = self.lookup(path).ok_or(libc::ENOENT)?;
        self.nodes.get_mut(&id).unwrap().perm = perm;
        Ok(())
    }

    /// The file at `path` with `f` applied to its contents.
    fn edit(&mut self, path: &[Vec<u8>], f: impl FnOnce(&mut Vec<u8>)) -> Result<(), i32> {
        let id = self.lookup(path).ok_or(libc::ENOENT)?;
        match &mut self.nodes.get_mut(&id).unwrap().body {
            Body::File(data) => {
                f(data);
                Ok(())
            }
            Body::Dir(_) => Err(libc::EISDIR),
            Body::Symlink(_) => Err(libc::ELOOP),
        }
    }

    pub fn write(&mut self, path: &[Vec<u8>], offset: usize, data: &[u8]) -> Result<(), i32> {
        self.edit(path, |d| {
            if data.is_empty() {
                // A write of nothing extends nothing.
                return;
            }
            let end = offset + data.len();
            if d.len() < end {
                d.resize(end, 0);
            }
            d[offset..end].copy_from_slice(data);
        })
    }

    pub fn truncate(&mut self, path: &[Vec<u8>], size: usize) -> Result<(), i32> {
        self.edit(path, |d| d.resize(size, 0))
    }
}
