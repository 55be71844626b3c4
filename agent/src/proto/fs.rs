//! The file service: the guest's filesystem, operated on by node and handle ids.
//!
//! The model follows FUSE's low-level API so the host can translate one kernel request
//! into one agent request:
//! * A **node** is a guest inode, named by its identity [`NodeId`] (the guest's device and
//!   inode number: stable for the inode's life, shared by its hard links) together with a
//!   [`FileHandle`] the agent issued for it ([`NodeRef`]). Requests carry both; the agent
//!   reopens a node it no longer has open from its handle (`open_by_handle_at`), so it
//!   keeps no state per node the host knows and its descriptors and memory stay bounded
//!   however many nodes the host remembers. [`ROOT_NODE`] names the served root.
//! * Some nodes are *counted*: directories the agent watches, and nodes on filesystems
//!   without file handles (their handle is empty and the agent keeps them open). An
//!   [`Entry`] with `counted` added one reference; [`crate::proto::Message::Forget`] drops
//!   references, and at zero the agent stops watching or closes the node. Forgetting an
//!   uncounted node does nothing.
//! * A **handle** is an open file or directory (`Open`/`Create`/`OpenDir`) until its
//!   `Release`/`ReleaseDir`.
//! * Names are single path components as raw bytes (no `/`, no NUL, not `.` or `..`,
//!   at most 255 bytes); anything else is `EINVAL`. The agent resolves names only relative
//!   to a node it holds and never follows a symlink while doing so, so no request can
//!   reach outside the served root.
//! * Errors are `Response::Error { errno, message }` with the guest's errno. A node that
//!   cannot be reopened (deleted and let go of, or a forgotten node on a filesystem
//!   without file handles) is `ESTALE`, an unknown (e.g. released) handle id `EBADF`.
//!   Only regular files and directories are opened (a symlink is `ELOOP`; fifos,
//!   sockets and devices are `ENXIO`: the host's kernel serves those itself).
//! * Mount points of pseudo filesystems (proc, sysfs, devtmpfs, devpts, cgroup, ...)
//!   are *opaque*: shown with their real attributes, but lookups in them are `ENOENT`,
//!   their listing is only `.` and `..`, and creating, opening or changing anything
//!   there is `EACCES` (so `find` or `cp -a` of the guest root stays out of them).
//! * Sizes a request asks for are capped by the agent ([`MAX_CHUNK`] for data,
//!   [`MAX_XATTR`] for xattrs); the host must still check every size and name it gets back.
//!
//! Coherence: the agent watches (inotify) directories the host holds nodes for, up to a
//! limit, and sends [`crate::proto::Message::FsEvents`] describing changes. An entry whose
//! parent directory is watched is `coherent`: the host may cache it (and the data of the
//! file) for long, because it will hear about changes. Events are batched and sent before
//! any later `Exited` of a command, so a command's changes are announced before the host
//! learns that the command ended.
use serde::{Deserialize, Serialize};

use super::serde_bytes_vec;
pub use super::MAX_CHUNK;

/// A guest inode's identity (see module docs): its `st_dev` and `st_ino`. The served root
/// is always [`ROOT_ID`], whatever its real numbers.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
pub struct NodeId {
    pub dev: u64,
    pub ino: u64,
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}:{}", self.dev, self.ino)
    }
}

/// An opaque kernel file handle the agent issued for a node: handle type (4 bytes,
/// little endian) then the handle's bytes, at most [`MAX_FILE_HANDLE`] in all. Empty when
/// the node's filesystem has none.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct FileHandle(#[serde(with = "serde_bytes_vec")] pub Vec<u8>);

/// Longest [`FileHandle`]: the type plus Linux's `MAX_HANDLE_SZ` (128) bytes.
pub const MAX_FILE_HANDLE: usize = 4 + 128;

/// How requests name a node: its identity and the handle to reopen it by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeRef {
    pub id: NodeId,
    pub fh: FileHandle,
}

impl std::fmt::Display for NodeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.id.fmt(f)
    }
}

/// An agent-side open file or directory.
pub type HandleId = u64;

/// The identity by which the served root is always known (`/` in the guest, `--root` in
/// host mode).
pub const ROOT_ID: NodeId = NodeId { dev: 0, ino: 0 };
/// The served root.
pub const ROOT_NODE: NodeRef = NodeRef {
    id: ROOT_ID,
    fh: FileHandle(Vec::new()),
};
/// Largest xattr value or list the agent returns (Linux's own limit).
pub const MAX_XATTR: u32 = 64 * 1024;
/// Longest name component.
pub const MAX_NAME: usize = 255;

/// Seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

/// `stat` of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Attr {
    /// The guest's inode number (the host derives its own numbers from [`NodeId`]s).
    pub ino: u64,
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    /// Full `st_mode`: file type bits and permission bits.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub blksize: u32,
}

/// A looked-up name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub node: NodeRef,
    pub attr: Attr,
    /// The parent directory is watched, so changes to this entry and to the node's data
    /// and attributes will be announced by [`FsEvent`]s.
    pub coherent: bool,
    /// This answer added one reference to a counted node (see module docs).
    pub counted: bool,
    /// The node is a directory the agent watches (so entries in it are `coherent`).
    pub watched: bool,
    /// The node's extended attribute names when they fit in [`ENTRY_XATTR_NAMES`] bytes:
    /// lets the host answer "no such attribute" without asking (`ls -l` asks for the
    /// ACLs of every file).
    pub xattrs: Option<XattrNames>,
}

/// Most bytes of xattr names an [`Entry`] carries.
pub const ENTRY_XATTR_NAMES: usize = 1024;

/// NUL-terminated extended attribute names, as `listxattr` gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct XattrNames(#[serde(with = "serde_bytes_vec")] pub Vec<u8>);

impl XattrNames {
    /// Is `name` one of them?
    pub fn contains(&self, name: &[u8]) -> bool {
        self.0
            .split(|&b| b == 0)
            .any(|n| !n.is_empty() && n == name)
    }
}

/// A time to set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetTime {
    Now,
    At(Timespec),
}

/// What `SetAttr` changes; `None` leaves a field alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SetAttrs {
    /// Permission bits (and setuid/setgid/sticky); the file type bits are ignored.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Truncate or extend.
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// The identity new files are created with (the host caller's ids). The agent chowns a
/// new node to these ids when they differ from its own; a failure to do so is ignored
/// when the agent is not privileged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    #[serde(with = "serde_bytes_vec")]
    pub name: Vec<u8>,
    /// Cookie to pass as `offset` to continue *after* this entry.
    pub next_offset: u64,
    /// File type as in `st_mode` (`S_IFDIR`, `S_IFREG`, ...; 0 when unknown).
    pub kind: u32,
    /// The entry's identity, as `lstat` of it would show (a mount point shows the
    /// mounted root, not the directory it covers). For `.` and `..`, the numbers
    /// `getdents` gave.
    pub node: NodeId,
    /// `plus` listings: the looked-up entry, except for `.` and `..`, which are never
    /// looked up and carry `None`.
    pub entry: Option<Entry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// host → agent file requests (inside `Request::Fs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsRequest {
    /// → `Entry`.
    Lookup {
        parent: NodeRef,
        #[serde(with = "serde_bytes_vec")]
        name: Vec<u8>,
    },
    /// → `Attr`. Uses the open handle when given (works for unlinked files).
    GetAttr {
        node: NodeRef,
        handle: Option<HandleId>,
    },
    /// → `Attr` (the attributes after the change).
    SetAttr {
        node: NodeRef,
        handle: Option<HandleId>,
        set: SetAttrs,
    },
    /// → `Data` (the link target).
    ReadLink { node: NodeRef },
    /// Regular files, fifos, sockets and (when privileged) device nodes; `mode` includes
    /// the type bits and is applied exactly (the agent's umask is 0; the host has already
    /// applied the caller's umask). → `Entry`.
    Mknod {
        parent: NodeRef,
        #[serde(with = "serde_bytes_vec")]
        name: Vec<u8>,
        mode: u32,
        rdev: u64,
        owner: Owner,
    },
    /// → `Entry`.
    Mkdir {
        parent: NodeRef,
        #[serde(with = "serde_bytes_vec")]
        name: Vec<u8>,
        mode: u32,
        owner: Owner,
    },
    /// → `Entry`.
    Symlink {
        parent: NodeRef,
        #[serde(with = "serde_bytes_vec")]
        name: Vec<u8>,
        #[serde(with = "serde_bytes_vec")]
        target: Vec<u8>,
        owner: Owner,
    },
    /// A new name for `node`. → `Entry`.
    Link {
        node: NodeRef,
        new_parent: NodeRef,
        #[serde(with = "serde_bytes_vec")]
        new_name: Vec<u8>,
    },
    /// → `Ok`.
    Unlink {
        parent: NodeRef,
        #[serde(with = "serde_bytes_vec")]
        name: Vec<u8>,
    },
    /// → `Ok`.
    Rmdir {
        parent: NodeRef,
        #[serde(with = "serde_bytes_vec")]
        name: Vec<u8>,
    },
    /// `flags` are `renameat2` flags (`RENAME_NOREPLACE`, `RENAME_EXCHANGE`). → `Moved`.
    Rename {
        parent: NodeRef,
        #[serde(with = "serde_bytes_vec")]
        name: Vec<u8>,
        new_parent: NodeRef,
        #[serde(with = "serde_bytes_vec")]
        new_name: Vec<u8>,
        flags: u32,
    },
    /// `flags` are `open(2)` flags; `O_CREAT`, `O_EXCL` and `O_NOFOLLOW` are ignored
    /// (the node exists; it is never a symlink to follow). → `Opened`.
    Open { node: NodeRef, flags: i32 },
    /// Create and open `name` (`O_CREAT` implied; `O_EXCL` honoured). → `Created`.
    Create {
        parent: NodeRef,
        #[serde(with = "serde_bytes_vec")]
        name: Vec<u8>,
        mode: u32,
        flags: i32,
        owner: Owner,
    },
    /// → `Data` of at most `min(size, MAX_CHUNK)` bytes; shorter only at end of file.
    Read {
        handle: HandleId,
        offset: u64,
        size: u32,
    },
    /// `data` is at most `MAX_CHUNK` bytes. → `Written`.
    Write {
        handle: HandleId,
        offset: u64,
        #[serde(with = "serde_bytes_vec")]
        data: Vec<u8>,
    },
    /// Closes the handle. → `Ok`.
    Release { handle: HandleId },
    /// `fsync`/`fdatasync` of an open file or directory handle. → `Ok`.
    Fsync { handle: HandleId, datasync: bool },
    /// → `Opened`.
    OpenDir { node: NodeRef },
    /// Entries starting at `offset` (0 = the beginning, else a `next_offset` cookie), at
    /// most as many as fit in `max_bytes` of a FUSE reply buffer (`fuse_dirent` or, with
    /// `plus`, `fuse_direntplus` sizes), so the host never has to drop one. → `DirEntries`
    /// (empty at the end).
    ReadDir {
        handle: HandleId,
        offset: u64,
        plus: bool,
        max_bytes: u32,
    },
    /// → `Ok`.
    ReleaseDir { handle: HandleId },
    /// → `StatFs` of the filesystem holding `node`.
    StatFs { node: NodeRef },
    /// `flags`: `XATTR_CREATE`/`XATTR_REPLACE`. → `Ok`.
    SetXattr {
        node: NodeRef,
        #[serde(with = "serde_bytes_vec")]
        name: Vec<u8>,
        #[serde(with = "serde_bytes_vec")]
        value: Vec<u8>,
        flags: i32,
    },
    /// `size` 0 → `XattrSize` (the value's length); else `Data`, or `ERANGE` when the
    /// value is longer than `size`.
    GetXattr {
        node: NodeRef,
        #[serde(with = "serde_bytes_vec")]
        name: Vec<u8>,
        size: u32,
    },
    /// NUL-separated names, same `size` rules as `GetXattr`.
    ListXattr { node: NodeRef, size: u32 },
    /// → `Ok`.
    RemoveXattr {
        node: NodeRef,
        #[serde(with = "serde_bytes_vec")]
        name: Vec<u8>,
    },
    /// `fallocate(2)` with its `mode` flags, a bitmask of `FALLOC_FL_*` passed to the
    /// guest's fallocate(2) unchanged (the guest refuses what it lacks). → `Ok`.
    Fallocate {
        handle: HandleId,
        offset: u64,
        length: u64,
        mode: i32,
    },
    /// `lseek(2)` for `SEEK_DATA`/`SEEK_HOLE` (others are `EINVAL`). → `Offset`.
    Lseek {
        handle: HandleId,
        offset: u64,
        whence: i32,
    },
}

impl FsRequest {
    /// The request's kind, for logs and timings.
    pub fn name(&self) -> &'static str {
        match self {
            FsRequest::Lookup { .. } => "Lookup",
            FsRequest::GetAttr { .. } => "GetAttr",
            FsRequest::SetAttr { .. } => "SetAttr",
            FsRequest::ReadLink { .. } => "ReadLink",
            FsRequest::Mknod { .. } => "Mknod",
            FsRequest::Mkdir { .. } => "Mkdir",
            FsRequest::Symlink { .. } => "Symlink",
            FsRequest::Link { .. } => "Link",
            FsRequest::Unlink { .. } => "Unlink",
            FsRequest::Rmdir { .. } => "Rmdir",
            FsRequest::Rename { .. } => "Rename",
            FsRequest::Open { .. } => "Open",
            FsRequest::Create { .. } => "Create",
            FsRequest::Read { .. } => "Read",
            FsRequest::Write { .. } => "Write",
            FsRequest::Release { .. } => "Release",
            FsRequest::Fsync { .. } => "Fsync",
            FsRequest::OpenDir { .. } => "OpenDir",
            FsRequest::ReadDir { .. } => "ReadDir",
            FsRequest::ReleaseDir { .. } => "ReleaseDir",
            FsRequest::StatFs { .. } => "StatFs",
            FsRequest::SetXattr { .. } => "SetXattr",
            FsRequest::GetXattr { .. } => "GetXattr",
            FsRequest::ListXattr { .. } => "ListXattr",
            FsRequest::RemoveXattr { .. } => "RemoveXattr",
            FsRequest::Fallocate { .. } => "Fallocate",
            FsRequest::Lseek { .. } => "Lseek",
        }
    }

    /// True for requests that may be sent once more over a fresh connection when the
    /// first one died under them: they change nothing a user can see. At worst a lost
    /// answer to the first `Lookup`/`Open`/`OpenDir`/`ReadDir plus` leaves one reference
    /// or handle unused in the agent until it exits; that beats failing the call.
    pub fn retry_safe(&self) -> bool {
        matches!(
            self,
            FsRequest::Lookup { .. }
                | FsRequest::GetAttr { .. }
                | FsRequest::ReadLink { .. }
                | FsRequest::Open { .. }
                | FsRequest::Read { .. }
                | FsRequest::OpenDir { .. }
                | FsRequest::ReadDir { .. }
                | FsRequest::StatFs { .. }
                | FsRequest::GetXattr { .. }
                | FsRequest::ListXattr { .. }
                | FsRequest::Lseek { .. }
        )
    }
}

/// agent → host answers to `FsRequest`s (inside `Response::Fs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsResponse {
    Ok,
    Entry(Entry),
    Attr(Attr),
    Data(#[serde(with = "serde_bytes_vec")] Vec<u8>),
    Written(u32),
    Opened {
        handle: HandleId,
    },
    Created {
        entry: Entry,
        handle: HandleId,
    },
    /// What the rename's new name names now, and its attributes after the rename.
    Moved {
        node: NodeId,
        attr: Attr,
    },
    DirEntries(Vec<DirEntry>),
    StatFs(StatFs),
    XattrSize(u32),
    Offset(u64),
}

/// agent → host: something changed in the guest (see module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsEvent {
    /// The name `name` in directory `parent` appeared, disappeared or now names another
    /// inode (create, unlink, rename from or to). `now` is what it names when the event
    /// was sent (`None`: nothing), so the host can keep what it already knows.
    Entry {
        parent: NodeId,
        #[serde(with = "serde_bytes_vec")]
        name: Vec<u8>,
        now: Option<NodeId>,
    },
    /// A node changed: its contents when `data` (a write: its size and times changed
    /// too, its xattrs did not), else its attributes or xattrs. The agent never folds an
    /// attribute change into a data event, so the host may keep a node's xattr names
    /// across data events. `attr` is what the attributes are when the event was sent
    /// (`None`: the node could not be stat'ed), so the host can keep attributes it
    /// already knows to be current.
    Node {
        node: NodeId,
        data: bool,
        attr: Option<Attr>,
    },
    /// The agent stopped watching directory `node` (it was deleted, or its filesystem
    /// unmounted): entries in it are no longer coherent.
    Unwatched { node: NodeId },
    /// Events were lost (inotify queue overflow): forget every cached entry and page.
    Overflow,
}

/// The size of a `fuse_dirent` (or `fuse_direntplus`) for a name of `namelen` bytes,
/// as the kernel lays out readdir replies.
pub fn fuse_dirent_size(namelen: usize, plus: bool) -> usize {
    const DIRENT_HEADER: usize = 24; // ino, off, namelen, type
    const ENTRY_OUT: usize = 128; // struct fuse_entry_out
    let unpadded = DIRENT_HEADER + namelen;
    let padded = (unpadded + 7) & !7;
    if plus {
        ENTRY_OUT + padded
    } else {
        padded
    }
}

/// Is `name` one valid path component?
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name != b"."
        && name != b".."
        && !name.contains(&b'/')
        && !name.contains(&0)
}
