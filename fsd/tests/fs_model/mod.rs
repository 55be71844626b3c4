//! A model test of `fs/` (see `inproc_fs_model.rs` for what it checks and why): the
//! operations a sequence is made of and how they are generated.
//!
//! Operations name their targets by [`Pick`]s, indices into what the reference model
//! holds when the step runs (modulo its number), so every generated sequence is valid
//! to run, a shrunk one too, and a recorded one replays exactly.
pub mod harness;
pub mod kernel;
pub mod reference;
pub mod walk;

use proptest::prelude::*;

/// One of the candidates of its kind when the step runs (`index % count`); a step with
/// no candidate does nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick(pub u16);

impl Pick {
    pub fn of<T: Clone>(self, candidates: &[T]) -> Option<T> {
        match candidates.len() {
            0 => None,
            n => Some(candidates[usize::from(self.0) % n].clone()),
        }
    }
}

/// Few names, so operations collide: `EEXIST`, renames over existing targets, names
/// reused after removal. One is not UTF-8.
pub const NAMES: [&[u8]; 4] = [b"a", b"b", b"c", b"\xffz"];

/// One of [`NAMES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Name(pub u8);

impl Name {
    pub fn bytes(self) -> &'static [u8] {
        NAMES[usize::from(self.0) % NAMES.len()]
    }
}

/// `len` bytes counting up from `start`: different at every offset, so a misplaced
/// write shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    pub start: u8,
    pub len: u8,
}

impl Fill {
    pub fn bytes(self) -> Vec<u8> {
        (0..self.len).map(|i| self.start.wrapping_add(i)).collect()
    }
}

/// Permission bits, from a few that keep the owner's access (so the test means the
/// same as root and as another user).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perm(pub u8);

const FILE_PERMS: [u32; 4] = [0o600, 0o644, 0o755, 0o640];
const DIR_PERMS: [u32; 3] = [0o700, 0o755, 0o750];

impl Perm {
    pub fn file(self) -> u32 {
        FILE_PERMS[usize::from(self.0) % FILE_PERMS.len()]
    }
    pub fn dir(self) -> u32 {
        DIR_PERMS[usize::from(self.0) % DIR_PERMS.len()]
    }
}

/// A timestamp for `utimens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Time {
    pub sec: u32,
    pub nsec: u32,
}

/// A step: an operation through `fs/` (as the kernel would send it), a change made in
/// the guest behind the host's caches, or something that happens to the connection or
/// the kernel's caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `open(O_CREAT|O_EXCL)`, write `data`, close.
    Create {
        dir: Pick,
        name: Name,
        perm: Perm,
        data: Fill,
    },
    /// `pwrite` at `offset` (past the end leaves a hole).
    Write {
        file: Pick,
        offset: u8,
        data: Fill,
    },
    Truncate {
        file: Pick,
        size: u8,
    },
    Mkdir {
        dir: Pick,
        name: Name,
        perm: Perm,
    },
    /// `unlink` of any name (a directory's answers EISDIR).
    Unlink {
        entry: Pick,
    },
    /// `rmdir` of any name (a file's answers ENOTDIR, a full directory's ENOTEMPTY).
    Rmdir {
        entry: Pick,
    },
    /// `rename` of any name to any directory, over whatever is there.
    Rename {
        entry: Pick,
        dir: Pick,
        name: Name,
    },
    /// `chmod` of a file or directory.
    Chmod {
        entry: Pick,
        perm: Perm,
    },
    /// `utimensat(AT_SYMLINK_NOFOLLOW)` of any name.
    Utimens {
        entry: Pick,
        atime: Time,
        mtime: Time,
    },
    Symlink {
        dir: Pick,
        name: Name,
        target: Name,
    },
    /// `link` of a non-directory.
    Link {
        entry: Pick,
        dir: Pick,
        name: Name,
    },
    /// `ls` of a directory (readdirplus, through the kernel's caches).
    ReadDir {
        dir: Pick,
    },
    /// `stat` of a name that may not exist (negative entries).
    Stat {
        dir: Pick,
        name: Name,
    },
    /// `cat` of a file (through the page cache).
    Read {
        file: Pick,
    },
    /// A change made in the guest directly, behind the host's caches.
    Guest(Guest),
    /// The agent connection is replaced by a new one (as after pause/resume).
    Reconnect,
    /// The agent connection breaks, these changes are made in the guest while it is
    /// down, and the next request reconnects.
    Break(Vec<Guest>),
    /// The events of these changes are lost: the host stops hearing the agent, the
    /// guest changes, the connection breaks (as a channel that died mid-stream). The
    /// names the kernel cached may then stay stale until their TTL, which the model lets
    /// pass; attributes, pages and listings may not.
    Lost(Vec<Guest>),
    /// The kernel forgets everything it caches (`echo 3 > drop_caches`).
    DropCaches,
}

/// Changes made in the guest's directory behind the cache (a step the model predicts
/// to fail is skipped: a guest program would simply have failed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guest {
    Create {
        dir: Pick,
        name: Name,
        data: Fill,
    },
    Write {
        file: Pick,
        offset: u8,
        data: Fill,
    },
    /// `unlink`, or `rmdir` of an empty directory.
    Unlink {
        entry: Pick,
    },
    Rename {
        entry: Pick,
        dir: Pick,
        name: Name,
    },
    Mkdir {
        dir: Pick,
        name: Name,
    },
    /// A hard link to a non-directory.
    Link {
        entry: Pick,
        dir: Pick,
        name: Name,
    },
}

fn pick() -> impl Strategy<Value = Pick> {
    any::<u16>().prop_map(Pick)
}

fn name() -> impl Strategy<Value = Name> {
    (0..u8::try_from(NAMES.len()).unwrap()).prop_map(Name)
}

fn perm() -> impl Strategy<Value = Perm> {
    any::<u8>().prop_map(Perm)
}

fn fill() -> impl Strategy<Value = Fill> {
    (any::<u8>(), 0u8..80).prop_map(|(start, len)| Fill { start, len })
}

fn time() -> impl Strategy<Value = Time> {
    (0u32..2_000_000_000, 0u32..1_000_000_000).prop_map(|(sec, nsec)| Time { sec, nsec })
}

fn guest() -> impl Strategy<Value = Guest> {
    prop_oneof![
        (pick(), name(), fill()).prop_map(|(dir, name, data)| Guest::Create { dir, name, data }),
        (pick(), any::<u8>(), fill()).prop_map(|(file, offset, data)| Guest::Write {
            file,
            offset,
            data
        }),
        pick().prop_map(|entry| Guest::Unlink { entry }),
        (pick(), pick(), name()).prop_map(|(entry, dir, name)| Guest::Rename { entry, dir, name }),
        (pick(), name()).prop_map(|(dir, name)| Guest::Mkdir { dir, name }),
        (pick(), pick(), name()).prop_map(|(entry, dir, name)| Guest::Link { entry, dir, name }),
    ]
}

/// One step, weighted towards changes.
pub fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (pick(), name(), perm(), fill())
            .prop_map(|(dir, name, perm, data)| Op::Create { dir, name, perm, data }),
        3 => (pick(), any::<u8>(), fill())
            .prop_map(|(file, offset, data)| Op::Write { file, offset, data }),
        1 => (pick(), any::<u8>()).prop_map(|(file, size)| Op::Truncate { file, size }),
        3 => (pick(), name(), perm()).prop_map(|(dir, name, perm)| Op::Mkdir { dir, name, perm }),
        2 => pick().prop_map(|entry| Op::Unlink { entry }),
        2 => pick().prop_map(|entry| Op::Rmdir { entry }),
        3 => (pick(), pick(), name()).prop_map(|(entry, dir, name)| Op::Rename { entry, dir, name }),
        1 => (pick(), perm()).prop_map(|(entry, perm)| Op::Chmod { entry, perm }),
        1 => (pick(), time(), time())
            .prop_map(|(entry, atime, mtime)| Op::Utimens { entry, atime, mtime }),
        1 => (pick(), name(), name())
            .prop_map(|(dir, name, target)| Op::Symlink { dir, name, target }),
        2 => (pick(), pick(), name()).prop_map(|(entry, dir, name)| Op::Link { entry, dir, name }),
        2 => pick().prop_map(|dir| Op::ReadDir { dir }),
        1 => (pick(), name()).prop_map(|(dir, name)| Op::Stat { dir, name }),
        2 => pick().prop_map(|file| Op::Read { file }),
        6 => guest().prop_map(Op::Guest),
        1 => Just(Op::Reconnect),
        1 => proptest::collection::vec(guest(), 0..3).prop_map(Op::Break),
        1 => proptest::collection::vec(guest(), 0..3).prop_map(Op::Lost),
        1 => Just(Op::DropCaches),
    ]
}
