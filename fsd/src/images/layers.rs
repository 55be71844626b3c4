//! Applying image layers (tar streams) to a staging directory on the host.
//!
//! The staging directory stands for the guest's `/`. Layer contents are hostile input, so:
//! - Entry names are cleaned: leading `/` and `.` components are dropped, and a name with a
//!   `..` component is rejected (the whole layer fails).
//! - Parent directories are resolved *inside* the staging root, component by component,
//!   with symlinks followed as the guest would follow them (absolute targets start again
//!   at the staging root, `..` stops at it). A symlink planted by an earlier entry or layer
//!   therefore never makes us write outside the staging directory.
//! - The final component is never followed: whatever exists there is replaced
//!   (`O_EXCL|O_NOFOLLOW` creation after removal).
//! - Sizes in headers are not trusted: the bytes actually written and the number of
//!   entries are counted against a [`Budget`] shared by all layers of one image.
//!
//! Whiteouts (OCI image spec, "Representing changes"): `.wh.NAME` deletes `NAME` from the
//! lower layers, `.wh..wh..opq` empties its directory of everything from lower layers;
//! both only affect what lower layers created (entries of the same layer are kept), and
//! neither appears in the result. Other `.wh..wh.` names (AUFS metadata) are ignored.
//!
//! Ownership (numeric ids), modes (including setuid bits, applied after `chown`), xattrs
//! (`SCHILY.xattr.*` PAX records), hard links, symlinks, device nodes and fifos are kept;
//! the daemon runs as root so it can `chown` and `mknod` in staging.
use std::collections::HashSet;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Most symlinks followed while resolving one path (like Linux's MAXSYMLINKS).
const MAX_SYMLINKS: u32 = 40;

/// Limits on what one image may unpack to (all layers together).
#[derive(Debug, Clone)]
pub struct Budget {
    pub max_bytes: u64,
    pub max_entries: u64,
    pub bytes: u64,
    pub entries: u64,
}

impl Budget {
    pub fn new(max_bytes: u64, max_entries: u64) -> Self {
        Budget {
            max_bytes,
            max_entries,
            bytes: 0,
            entries: 0,
        }
    }
}

/// How to treat one tar stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// An image layer: whiteouts are applied.
    Layer,
    /// A plain archive (rootfs tarball, image archive): `.wh.` names are ordinary files.
    Plain,
}

/// What one layer did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LayerStats {
    pub entries: u64,
    pub bytes: u64,
    pub whiteouts: u64,
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::invalid(what.to_string())
}

fn host_io(path: &Path, e: io::Error) -> Error {
    Error::io(format!("{}: {e}", path.display()))
}

/// Split a tar entry name into clean components (no `.`, no empty); `..` is an error.
pub fn clean_components(raw: &[u8]) -> Result<Vec<OsString>> {
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(bad(format!(
                    "entry {:?} escapes the image root (\"..\")",
                    String::from_utf8_lossy(raw)
                )))
            }
            c => out.push(OsStr::from_bytes(c).to_os_string()),
        }
    }
    Ok(out)
}

/// Resolve `comps` under `root` as the guest would (symlinks followed, scoped to `root`).
/// Missing directories are created (0755, root) when `create` is set, else ENOENT.
/// With `follow_last` false the last component is appended unresolved.
/// The result is a host path below `root` with no symlink in any resolved component.
pub fn resolve_in_root(
    root: &Path,
    comps: &[OsString],
    create: bool,
    follow_last: bool,
) -> Result<PathBuf> {
    let mut pending: std::collections::VecDeque<(OsString, bool)> = comps
        .iter()
        .enumerate()
        .map(|(i, c)| (c.clone(), i + 1 == comps.len() && !follow_last))
        .collect();
    let mut stack: Vec<OsString> = Vec::new();
    let mut links = 0u32;
    let here = |stack: &[OsString]| stack.iter().fold(root.to_path_buf(), |p, c| p.join(c));
    while let Some((c, raw_last)) = pending.pop_front() {
        if c == "." || c.is_empty() {
            continue;
        }
        if c == ".." {
            stack.pop();
            continue;
        }
        if raw_last && pending.is_empty() {
            stack.push(c);
            break;
        }
        let is_last = pending.is_empty();
        let p = here(&stack).join(&c);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(Error::new(
                        libc::ELOOP,
                        format!("too many symlinks resolving {}", p.display()),
                    ));
                }
                let target = std::fs::read_link(&p).map_err(|e| host_io(&p, e))?;
                let tb = target.as_os_str().as_bytes();
                if tb.starts_with(b"/") {
                    stack.clear();
                }
                for part in tb.split(|&b| b == b'/').rev() {
                    pending.push_front((OsStr::from_bytes(part).to_os_string(), false));
                }
            }
            // The last component may be anything (the caller opens or replaces it);
            // every other one must be a directory.
            Ok(m) if m.is_dir() || is_last => stack.push(c),
            Ok(_) => {
                return Err(Error::new(
                    libc::ENOTDIR,
                    format!("{} is not a directory", p.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !create && is_last {
                    stack.push(c);
                    continue;
                }
                if !create {
                    return Err(Error::not_found(format!("{} does not exist", p.display())));
                }
                std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&p)
                    .map_err(|e| host_io(&p, e))?;
                stack.push(c);
            }
            Err(e) => return Err(host_io(&p, e)),
        }
    }
    Ok(here(&stack))
}

/// Open a regular file named by untrusted `rel` inside `root` (symlinks scoped to `root`).
pub fn open_in_root(root: &Path, rel: &str) -> Result<File> {
    let comps = clean_components(rel.as_bytes())?;
    if comps.is_empty() {
        return Err(bad(format!("{rel:?} names no file")));
    }
    let p = resolve_in_root(root, &comps, false, true)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&p)
        .map_err(|e| Error::not_found(format!("{rel}: {e}")))?;
    let m = f.metadata().map_err(|e| host_io(&p, e))?;
    if !m.is_file() {
        return Err(bad(format!("{rel} is not a regular file")));
    }
    Ok(f)
}

/// Remove whatever is at `p` (not following a symlink there); missing is fine.
pub fn remove_any(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).map_err(|e| host_io(p, e)),
        Ok(_) => std::fs::remove_file(p).map_err(|e| host_io(p, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(host_io(p, e)),
    }
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| bad("path contains a NUL byte"))
}

/// Set atime and mtime of `p` without following a symlink.
fn set_mtime(p: &Path, mtime: u64) -> Result<()> {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    let c = cstr(p)?;
    let t = nix::sys::time::TimeSpec::new(
        libc::time_t::try_from(mtime).unwrap_or(libc::time_t::MAX),
        0,
    );
    utimensat(
        nix::fcntl::AT_FDCWD,
        c.as_c_str(),
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| host_io(p, e.into()))
}

/// Set one xattr on `p` (not following a symlink). Failures are logged and ignored:
/// some namespaces cannot be set on some file types or host filesystems.
fn set_xattr(p: &Path, name: &[u8], value: &[u8]) {
    let (Ok(c), Ok(n)) = (cstr(p), CString::new(name)) else {
        return;
    };
    // SAFETY: valid NUL-terminated path and name; `value` is a valid slice.
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        tracing::debug!(
            path = %p.display(),
            name = %String::from_utf8_lossy(name),
            "cannot set xattr: {}",
            io::Error::last_os_error()
        );
    }
}

/// Count and copy file data, failing when the image's byte budget is exceeded.
fn copy_limited(src: &mut dyn Read, dst: &mut File, budget: &mut Budget, p: &Path) -> Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(bad(format!("corrupt layer data: {e}"))),
        };
        budget.bytes += n as u64;
        if budget.bytes > budget.max_bytes {
            return Err(Error::new(
                libc::EFBIG,
                format!(
                    "the image unpacks to more than {} MiB (the limit)",
                    budget.max_bytes >> 20
                ),
            ));
        }
        dst.write_all(&buf[..n]).map_err(|e| host_io(p, e))?;
        total += n as u64;
    }
    Ok(total)
}

/// Apply one tar stream to `root`. `layer_no` only labels error messages.
pub fn apply_tar<R: Read>(
    root: &Path,
    reader: R,
    mode: Mode,
    budget: &mut Budget,
) -> Result<(LayerStats, R)> {
    let mut archive = tar::Archive::new(reader);
    let mut stats = LayerStats::default();
    // Host paths written by this layer (whiteouts only remove what lower layers made).
    let mut mine: HashSet<PathBuf> = HashSet::new();
    let mut dir_times: Vec<(PathBuf, u64)> = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("corrupt tar: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("corrupt tar: {e}")))?;
        budget.entries += 1;
        if budget.entries > budget.max_entries {
            return Err(Error::new(
                libc::EFBIG,
                format!("the image has more than {} entries", budget.max_entries),
            ));
        }
        stats.entries += 1;
        let raw = entry.path_bytes().into_owned();
        let comps = clean_components(&raw)?;
        let header = entry.header().clone();
        let kind = header.entry_type();
        let Some((name, parents)) = comps.split_last() else {
            // The root itself ("./"): take its metadata.
            if kind.is_dir() {
                apply_meta(root, &header, &mut entry)?;
                dir_times.push((root.to_path_buf(), header.mtime().unwrap_or(0)));
            }
            continue;
        };
        let name_b = name.as_bytes();
        if mode == Mode::Layer && name_b.starts_with(b".wh.") {
            stats.whiteouts += 1;
            let parent = match resolve_in_root(root, parents, false, true) {
                Ok(p) => p,
                Err(e) if e.errno == libc::ENOENT => continue,
                Err(e) => return Err(e),
            };
            if name_b == b".wh..wh..opq" {
                clear_lower(&parent, &mine)?;
            } else if !name_b.starts_with(b".wh..wh.") {
                let victim = parent.join(OsStr::from_bytes(&name_b[4..]));
                if !mine.contains(&victim) {
                    remove_any(&victim)?;
                }
            }
            continue;
        }
        let parent = resolve_in_root(root, parents, true, true)?;
        let path = parent.join(name);
        // The entry and every directory above it belong to this layer now, so an
        // opaque marker later in the layer keeps them (but not their lower contents).
        let mut p = path.as_path();
        while p.starts_with(root) && p != root && mine.insert(p.to_path_buf()) {
            match p.parent() {
                Some(q) => p = q,
                None => break,
            }
        }
        if kind.is_dir() {
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                _ => {
                    remove_any(&path)?;
                    std::fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&path)
                        .map_err(|e| host_io(&path, e))?;
                }
            }
            apply_meta(&path, &header, &mut entry)?;
            dir_times.push((path, header.mtime().unwrap_or(0)));
            continue;
        }
        if kind.is_hard_link() {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| bad(format!("hard link {path:?} has no target")))?
                .into_owned();
            let tcomps = clean_components(&target)?;
            if tcomps.is_empty() {
                return Err(bad("hard link to the image root"));
            }
            let src = resolve_in_root(root, &tcomps, false, false)?;
            match std::fs::symlink_metadata(&src) {
                Ok(m) if !m.is_dir() => {}
                Ok(_) => return Err(bad(format!("hard link to a directory: {src:?}"))),
                Err(_) => {
                    return Err(bad(format!(
                        "hard link target {:?} does not exist",
                        String::from_utf8_lossy(&target)
                    )))
                }
            }
            if src != path {
                remove_any(&path)?;
                std::fs::hard_link(&src, &path).map_err(|e| host_io(&path, e))?;
            }
            continue;
        }
        remove_any(&path)?;
        if kind.is_symlink() {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| bad(format!("symlink {path:?} has no target")))?
                .into_owned();
            std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                .map_err(|e| host_io(&path, e))?;
            apply_meta(&path, &header, &mut entry)?;
            set_mtime(&path, header.mtime().unwrap_or(0))?;
        } else if kind.is_file() || kind == tar::EntryType::Continuous || kind.is_gnu_sparse() {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| host_io(&path, e))?;
            stats.bytes += copy_limited(&mut entry, &mut f, budget, &path)?;
            drop(f);
            apply_meta(&path, &header, &mut entry)?;
            set_mtime(&path, header.mtime().unwrap_or(0))?;
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            use nix::sys::stat::SFlag;
            let ftype = if kind.is_character_special() {
                SFlag::S_IFCHR
            } else if kind.is_block_special() {
                SFlag::S_IFBLK
            } else {
                SFlag::S_IFIFO
            };
            let major = header.device_major().ok().flatten().unwrap_or(0);
            let minor = header.device_minor().ok().flatten().unwrap_or(0);
            let c = cstr(&path)?;
            nix::sys::stat::mknod(
                c.as_c_str(),
                ftype,
                nix::sys::stat::Mode::from_bits_retain(0o600),
                nix::sys::stat::makedev(major.into(), minor.into()),
            )
            .map_err(|e| host_io(&path, e.into()))?;
            apply_meta(&path, &header, &mut entry)?;
            set_mtime(&path, header.mtime().unwrap_or(0))?;
        } else {
            tracing::debug!(path = %path.display(), ?kind, "skipping unsupported tar entry");
            mine.remove(&path);
        }
    }
    // Directories last, deepest first, so adding their entries did not change them.
    for (p, t) in dir_times.iter().rev() {
        let _ = set_mtime(p, *t);
    }
    Ok((stats, archive.into_inner()))
}

/// Owner, mode and xattrs of a created entry (mode after chown so setuid bits stay).
fn apply_meta<R: Read>(path: &Path, header: &tar::Header, entry: &mut tar::Entry<R>) -> Result<()> {
    let uid = u32::try_from(header.uid().unwrap_or(0)).unwrap_or(u32::MAX);
    let gid = u32::try_from(header.gid().unwrap_or(0)).unwrap_or(u32::MAX);
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|e| host_io(path, e))?;
    if !header.entry_type().is_symlink() {
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| host_io(path, e))?;
    }
    if let Ok(Some(exts)) = entry.pax_extensions() {
        for ext in exts.flatten() {
            if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                set_xattr(path, name, ext.value_bytes());
            }
        }
    }
    Ok(())
}

/// Opaque whiteout: remove everything under `dir` that this layer did not write.
fn clear_lower(dir: &Path, mine: &HashSet<PathBuf>) -> Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ENOENT)) => return Ok(()),
        Err(e) => return Err(host_io(dir, e)),
    };
    for e in rd {
        let e = e.map_err(|e| host_io(dir, e))?;
        let p = e.path();
        if !mine.contains(&p) {
            remove_any(&p)?;
        } else if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            clear_lower(&p, mine)?;
        }
    }
    Ok(())
}

/// Total bytes allocated below `root` and the number of inodes (for sizing the disk).
pub fn tree_usage(root: &Path) -> (u64, u64) {
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            inodes += 1;
            // Round every file to whole 4 KiB blocks, plus one block for the inode's
            // share of directory entries and metadata.
            bytes += m.len().div_ceil(4096) * 4096 + 4096;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (bytes, inodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> Budget {
        Budget::new(1 << 30, 1_000_000)
    }

    /// A tar builder with helpers for hostile and special entries.
    struct T(tar::Builder<Vec<u8>>);

    impl T {
        fn new() -> Self {
            T(tar::Builder::new(Vec::new()))
        }
        fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(size);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_600_000_000);
            h
        }
        /// Raw name written into the header bytes (bypassing the builder's checks).
        fn raw(mut self, name: &[u8], mut h: tar::Header, data: &[u8]) -> Self {
            {
                let gnu = h.as_gnu_mut().unwrap();
                gnu.name = [0; 100];
                gnu.name[..name.len()].copy_from_slice(name);
            }
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }
        fn file(self, name: &str, data: &str) -> Self {
            let h = Self::header(tar::EntryType::Regular, 0o644, data.len() as u64);
            self.raw(name.as_bytes(), h, data.as_bytes())
        }
        fn file_owned(self, name: &str, data: &str, mode: u32, uid: u64, gid: u64) -> Self {
            let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
            h.set_uid(uid);
            h.set_gid(gid);
            self.raw(name.as_bytes(), h, data.as_bytes())
        }
        fn dir(self, name: &str) -> Self {
            let h = Self::header(tar::EntryType::Directory, 0o755, 0);
            self.raw(name.as_bytes(), h, b"")
        }
        fn link(self, kind: tar::EntryType, name: &str, target: &str) -> Self {
            let mut h = Self::header(kind, 0o777, 0);
            h.set_link_name(target).unwrap();
            self.raw(name.as_bytes(), h, b"")
        }
        fn symlink(self, name: &str, target: &str) -> Self {
            self.link(tar::EntryType::Symlink, name, target)
        }
        fn hardlink(self, name: &str, target: &str) -> Self {
            self.link(tar::EntryType::Link, name, target)
        }
        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn apply(root: &Path, tar: Vec<u8>) -> Result<LayerStats> {
        apply_tar(root, &tar[..], Mode::Layer, &mut budget()).map(|(s, _)| s)
    }

    fn read(root: &Path, p: &str) -> Option<String> {
        std::fs::read_to_string(root.join(p)).ok()
    }

    #[test]
    fn files_dirs_modes_owners() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let t = T::new()
            .dir("./etc/")
            .file("etc/hostname", "x\n")
            .file_owned("usr/bin/su", "suid", 0o4755, 1000, 1001)
            .file("/abs/file", "abs");
        let s = apply(root, t.bytes()).unwrap();
        assert_eq!(s.entries, 4);
        assert_eq!(read(root, "etc/hostname").unwrap(), "x\n");
        assert_eq!(
            read(root, "abs/file").unwrap(),
            "abs",
            "absolute names land in root"
        );
        let m = std::fs::metadata(root.join("usr/bin/su")).unwrap();
        if nix::unistd::geteuid().is_root() {
            assert_eq!((m.uid(), m.gid()), (1000, 1001));
            assert_eq!(m.mode() & 0o7777, 0o4755, "setuid survives chown");
        }
        assert_eq!(
            std::fs::metadata(root.join("usr")).unwrap().mode() & 0o777,
            0o755
        );
        assert_eq!(m.mtime(), 1_600_000_000);
    }

    #[test]
    fn whiteouts_and_opaque_dirs() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let lower = T::new()
            .file("a/keep", "k")
            .file("a/gone", "g")
            .file("a/sub/deep", "d")
            .file("o/old1", "1")
            .file("o/olddir/x", "x")
            .file("r/file", "v1");
        apply(root, lower.bytes()).unwrap();
        let upper = T::new()
            .file("a/.wh.gone", "")
            .file("a/.wh.sub", "")
            .file("o/new", "n")
            .file("o/.wh..wh..opq", "")
            .file("r/.wh.file", "")
            .file("nothere/.wh.x", "")
            .file("a/.wh..wh.plnk", "");
        let s = apply(root, upper.bytes()).unwrap();
        assert_eq!(s.whiteouts, 6);
        assert_eq!(read(root, "a/keep").unwrap(), "k");
        assert!(!root.join("a/gone").exists());
        assert!(!root.join("a/sub").exists());
        assert_eq!(
            read(root, "o/new").unwrap(),
            "n",
            "same-layer entry survives opaque"
        );
        assert!(!root.join("o/old1").exists());
        assert!(!root.join("o/olddir").exists());
        assert!(!root.join("r/file").exists());
        assert!(
            !root.join("nothere").exists(),
            "whiteout does not create parents"
        );
        for p in ["a/.wh.gone", "o/.wh..wh..opq", "a/.wh..wh.plnk"] {
            assert!(
                root.join(p).symlink_metadata().is_err(),
                "{p} must not appear"
            );
        }
        // A third layer replaces a deleted file.
        apply(root, T::new().file("r/file", "v3").bytes()).unwrap();
        assert_eq!(read(root, "r/file").unwrap(), "v3");
    }

    #[test]
    fn opaque_keeps_redeclared_dirs_but_not_their_lower_contents() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        apply(root, T::new().file("o/sub/old", "o").bytes()).unwrap();
        apply(
            root,
            T::new()
                .dir("o/sub")
                .file("o/sub/new", "n")
                .file("o/.wh..wh..opq", "")
                .bytes(),
        )
        .unwrap();
        assert!(root.join("o/sub/new").exists());
        assert!(!root.join("o/sub/old").exists());
    }

    #[test]
    fn opaque_marker_after_entries_of_the_same_layer() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        apply(
            root,
            T::new().file("o/sub/old", "o").file("o/x", "x").bytes(),
        )
        .unwrap();
        // No directory entry for o/sub, and the marker comes last.
        apply(
            root,
            T::new()
                .file("o/sub/new", "n")
                .file("o/.wh..wh..opq", "")
                .bytes(),
        )
        .unwrap();
        assert!(root.join("o/sub/new").exists());
        assert!(!root.join("o/sub/old").exists());
        assert!(!root.join("o/x").exists());
    }

    #[test]
    fn plain_mode_keeps_wh_files() {
        let d = tempfile::tempdir().unwrap();
        let t = T::new().file("x/.wh.y", "literal").bytes();
        apply_tar(d.path(), &t[..], Mode::Plain, &mut budget()).unwrap();
        assert_eq!(read(d.path(), "x/.wh.y").unwrap(), "literal");
    }

    #[test]
    fn hard_links_and_replacement() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let t = T::new()
            .file("bin/busybox", "bb")
            .hardlink("bin/sh", "bin/busybox")
            .hardlink("/bin/ls", "./bin/busybox");
        apply(root, t.bytes()).unwrap();
        let a = std::fs::metadata(root.join("bin/busybox")).unwrap();
        let b = std::fs::metadata(root.join("bin/sh")).unwrap();
        assert_eq!(a.ino(), b.ino());
        assert_eq!(a.nlink(), 3);
        // A later layer replaces one name: the others keep the old contents.
        apply(root, T::new().file("bin/sh", "new sh").bytes()).unwrap();
        assert_eq!(read(root, "bin/sh").unwrap(), "new sh");
        assert_eq!(read(root, "bin/ls").unwrap(), "bb");
        // A dangling hard link fails the layer.
        assert!(apply(root, T::new().hardlink("x", "missing").bytes()).is_err());
    }

    #[test]
    fn traversal_is_rejected() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("root");
        std::fs::create_dir(&root).unwrap();
        for name in ["../evil", "a/../../evil", "a/b/../../../evil"] {
            let e = apply(&root, T::new().file(name, "x").bytes()).unwrap_err();
            assert_eq!(e.errno, libc::EINVAL, "{name}");
            assert!(e.message.contains("escapes"), "{}", e.message);
        }
        let e = apply(&root, T::new().hardlink("l", "../../etc/passwd").bytes()).unwrap_err();
        assert!(e.message.contains("escapes"));
        assert!(!outer.path().join("evil").exists());
    }

    #[test]
    fn symlinks_never_lead_outside() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("root");
        let victim = outer.path().join("victim");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&victim).unwrap();
        std::fs::write(victim.join("secret"), "host").unwrap();
        // Layer 1 plants symlinks to the host directory (absolute and relative).
        let l1 = T::new()
            .symlink("abs", victim.to_str().unwrap())
            .symlink("rel", "../../victim")
            .symlink("file", &format!("{}/secret", victim.display()));
        apply(&root, l1.bytes()).unwrap();
        // Layer 2 writes through them and hard-links through them.
        let l2 = T::new()
            .file("abs/pwned", "x")
            .file("rel/pwned", "x")
            .file("file", "overwrite")
            .hardlink("hl", "abs/secret");
        let r = apply(&root, l2.bytes());
        // "hl" fails (the target does not exist inside the root); nothing leaked out.
        assert!(r.is_err());
        assert_eq!(
            std::fs::read_to_string(victim.join("secret")).unwrap(),
            "host"
        );
        assert!(!victim.join("pwned").exists());
        // The writes landed inside the root, under the guest's view of the paths.
        let inside = root.join(victim.strip_prefix("/").unwrap()).join("pwned");
        assert!(inside.exists(), "{inside:?}");
        assert!(
            root.join("victim/pwned").exists(),
            "relative link clamps at root"
        );
        assert_eq!(
            read(&root, "file").unwrap(),
            "overwrite",
            "symlink replaced"
        );
        assert!(!root.join("file").symlink_metadata().unwrap().is_symlink());
        // Same-layer plant-and-write also stays inside.
        let l3 = T::new()
            .symlink("x", "/../../..")
            .file("x/escape", "e")
            .bytes();
        apply(&root, l3).unwrap();
        assert!(root.join("escape").exists());
        assert!(!outer.path().join("escape").exists());
    }

    #[test]
    fn symlink_loops_fail() {
        let d = tempfile::tempdir().unwrap();
        let t = T::new()
            .symlink("a", "b")
            .symlink("b", "a")
            .file("a/x", "x");
        let e = apply(d.path(), t.bytes()).unwrap_err();
        assert_eq!(e.errno, libc::ELOOP);
    }

    #[test]
    fn budget_limits_bytes_and_entries() {
        let d = tempfile::tempdir().unwrap();
        let t = T::new().file("big", &"x".repeat(5000)).bytes();
        let mut b = Budget::new(4096, 100);
        let e = apply_tar(d.path(), &t[..], Mode::Layer, &mut b).unwrap_err();
        assert_eq!(e.errno, libc::EFBIG);
        let t = T::new().file("a", "").file("b", "").file("c", "").bytes();
        let mut b = Budget::new(1 << 20, 2);
        assert!(apply_tar(d.path(), &t[..], Mode::Layer, &mut b).is_err());
    }

    #[test]
    fn corrupt_tar_is_einval() {
        let d = tempfile::tempdir().unwrap();
        let mut t = T::new().file("a", &"y".repeat(3000)).bytes();
        t.truncate(1200);
        let e = apply(d.path(), t).unwrap_err();
        assert_eq!(e.errno, libc::EINVAL, "{}", e.message);
        let e = apply(d.path(), vec![0x55; 2048]).unwrap_err();
        assert_eq!(e.errno, libc::EINVAL, "{}", e.message);
    }

    #[test]
    fn devices_and_fifos() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let mut h = T::header(tar::EntryType::Char, 0o666, 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        let t = T::new().raw(b"dev/null", h, b"").raw(
            b"p",
            T::header(tar::EntryType::Fifo, 0o600, 0),
            b"",
        );
        apply(d.path(), t.bytes()).unwrap();
        use std::os::unix::fs::FileTypeExt;
        let m = std::fs::symlink_metadata(d.path().join("dev/null")).unwrap();
        assert!(m.file_type().is_char_device());
        assert_eq!(m.rdev(), libc::makedev(1, 3));
        assert!(std::fs::symlink_metadata(d.path().join("p"))
            .unwrap()
            .file_type()
            .is_fifo());
    }

    #[test]
    fn open_in_root_stays_inside() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("r");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(outer.path().join("outside"), "no").unwrap();
        std::os::unix::fs::symlink("../outside", root.join("l")).unwrap();
        std::os::unix::fs::symlink("/outside", root.join("a")).unwrap();
        assert!(open_in_root(&root, "l").is_err());
        assert!(open_in_root(&root, "a").is_err());
        assert!(open_in_root(&root, "../outside").is_err());
        std::fs::write(root.join("outside"), "yes").unwrap();
        let mut s = String::new();
        open_in_root(&root, "a")
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "yes");
    }
}
