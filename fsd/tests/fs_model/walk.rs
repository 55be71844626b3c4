//! Walks of the guest directory and their comparison: through `fs/` (see
//! [`super::kernel::Kernel::walk`]), with `std::fs` on the directory itself, and the
//! reference model's view.
//!
//! Compared per path: type, permission bits, size, link count, mtime, ctime and
//! contents (file bytes, symlink target); inode numbers as [`ino_matches`] says. Not
//! compared: atime (reads change it). The link count and ctime of a file that lost one
//! of several names in the guest may lag in the kernel's cache (inotify says which name
//! went, not which file lost a link): the caller names those paths.
use std::collections::{BTreeMap, HashSet};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;

use bandsox_fsd::guestfs::{Attr, FS_INO_BASE};

use super::reference::{Body, Path, Seen};

/// What a walk sees at one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// `S_IFMT` bits.
    pub kind: u32,
    pub perm: u32,
    pub size: u64,
    pub nlink: u64,
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    /// Contents: a file's bytes, a symlink's target.
    pub data: Option<Vec<u8>>,
    /// The inode number (compared separately).
    pub ino: u64,
}

pub type Tree = BTreeMap<Path, Item>;

impl Item {
    pub fn new(ino: u64, a: &Attr, data: Option<Vec<u8>>) -> Item {
        Item {
            kind: a.mode & libc::S_IFMT,
            perm: a.mode & 0o7777,
            size: a.size,
            nlink: u64::from(a.nlink),
            mtime: (a.mtime.sec, a.mtime.nsec),
            ctime: (a.ctime.sec, a.ctime.nsec),
            data,
            ino,
        }
    }

    /// Everything but the inode number (and, when `lagging`, the link count and ctime).
    fn same(&self, other: &Item, lagging: bool) -> bool {
        let strip = |i: &Item| {
            let mut i = Item {
                ino: 0,
                ..i.clone()
            };
            if lagging {
                (i.nlink, i.ctime) = (0, (0, 0));
            }
            i
        };
        strip(self) == strip(other)
    }
}

/// A path for messages (`/` joined, lossy).
pub fn show(p: &Path) -> String {
    let parts: Vec<String> = p
        .iter()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    format!("/{}", parts.join("/"))
}

fn join(root: &std::path::Path, p: &Path) -> std::path::PathBuf {
    let mut out = root.to_path_buf();
    for n in p {
        out.push(std::ffi::OsStr::from_bytes(n));
    }
    out
}

/// The tree under `root` as `std::fs` sees it (inode numbers are the directory's own).
pub fn std_tree(root: &std::path::Path) -> Tree {
    let mut tree = Tree::new();
    let mut dirs = vec![Vec::new()];
    while let Some(path) = dirs.pop() {
        let full = join(root, &path);
        let meta = std::fs::symlink_metadata(&full).unwrap();
        let kind = meta.mode() & libc::S_IFMT;
        let data = match kind {
            libc::S_IFREG => Some(std::fs::read(&full).unwrap()),
            libc::S_IFLNK => Some(
                std::fs::read_link(&full)
                    .unwrap()
                    .into_os_string()
                    .into_vec(),
            ),
            _ => None,
        };
        if kind == libc::S_IFDIR {
            for e in std::fs::read_dir(&full).unwrap() {
                let mut p = path.clone();
                p.push(e.unwrap().file_name().into_vec());
                dirs.push(p);
            }
        }
        let nsec = |n: i64| u32::try_from(n).unwrap();
        let item = Item {
            kind,
            perm: meta.mode() & 0o7777,
            size: meta.size(),
            nlink: meta.nlink(),
            mtime: (meta.mtime(), nsec(meta.mtime_nsec())),
            ctime: (meta.ctime(), nsec(meta.ctime_nsec())),
            data,
            ino: meta.ino(),
        };
        tree.insert(path, item);
    }
    tree
}

/// Does `fs/`'s number `got` stand for the directory's inode `want`? Guest files have
/// bit 62 set and the guest inode number in the low 40 bits (docs/tree.md, "Inode
/// numbers are stable"); the root is a control-tree inode.
pub fn ino_matches(path: &Path, got: u64, want: u64) -> bool {
    const LOW: u64 = (1 << 40) - 1;
    path.is_empty() || (got & FS_INO_BASE != 0 && (want > LOW || got & LOW == want))
}

/// Compare a walk through `fs/` (`got`) with the directory's own (`want`); the link
/// counts and ctimes of the `lagging` paths may differ.
pub fn compare(want: &Tree, got: &Tree, lagging: &HashSet<Path>) -> Result<(), String> {
    let mut diffs = Vec::new();
    for (p, w) in want {
        match got.get(p) {
            None => diffs.push(format!("{} is missing: {w:?}", show(p))),
            Some(g) if !g.same(w, lagging.contains(p)) => {
                diffs.push(format!("{}: want {w:?}\n   got {g:?}", show(p)))
            }
            Some(g) if !ino_matches(p, g.ino, w.ino) => diffs.push(format!(
                "{}: inode {:#x} does not stand for guest inode {}",
                show(p),
                g.ino,
                w.ino
            )),
            Some(_) => {}
        }
    }
    for (p, g) in got {
        if !want.contains_key(p) {
            diffs.push(format!("{} should not exist: {g:?}", show(p)));
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs.join("\n"))
    }
}

/// Compare the directory (`tree`) with the reference model's view.
pub fn compare_reference(
    model: &BTreeMap<Path, Seen>,
    root_nlink: u32,
    tree: &Tree,
) -> Result<(), String> {
    let mut diffs = Vec::new();
    match tree.get(&Vec::new()) {
        Some(r) if r.nlink == u64::from(root_nlink) => {}
        r => diffs.push(format!("the root: want nlink {root_nlink}, got {r:?}")),
    }
    for (p, s) in model {
        let Some(it) = tree.get(p) else {
            diffs.push(format!("{} is missing: {s:?}", show(p)));
            continue;
        };
        let (kind, data) = match &s.body {
            Body::File(d) => (libc::S_IFREG, Some(d)),
            Body::Dir(_) => (libc::S_IFDIR, None),
            Body::Symlink(t) => (libc::S_IFLNK, Some(t)),
        };
        let perm_ok = kind == libc::S_IFLNK || it.perm == s.perm;
        if it.kind != kind || !perm_ok || it.nlink != u64::from(s.nlink) || it.data.as_ref() != data
        {
            diffs.push(format!(
                "{}: the model has {s:?}\n   the directory {it:?}",
                show(p)
            ));
        }
    }
    for p in tree.keys() {
        if !p.is_empty() && !model.contains_key(p) {
            diffs.push(format!("{} is not in the model", show(p)));
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs.join("\n"))
    }
}
