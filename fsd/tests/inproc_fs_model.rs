//! A model test of `fs/` without root, a mount or a VM, in the manner of
//! mountpoint-s3's reference tests: proptest generates sequences of operations, runs them
//! through [`bandsox_fsd::guestfs::GuestFs`] against a VM of the in-process backend
//! (`inproc/mod.rs`: an agent served over an in-memory pipe, whose "guest" is a
//! directory of this host), and checks after every step. A failing sequence shrinks to
//! a minimal one; the ones found are kept below as plain tests that replay them.
//!
//! The steps (`fs_model::Op`): create, write at an offset, truncate, mkdir, unlink,
//! rmdir, rename (over existing targets too), chmod, utimens, symlink, link, readdirplus,
//! stat of missing names, reads; changes made in the guest's directory behind the cache
//! (create, write, unlink, rename, mkdir, link); a replaced agent connection, a broken
//! one with guest changes made while it is down, and one that dies with the events of
//! guest changes on their way; the kernel dropping its caches.
//!
//! After every step, once the events have drained (the agent flushes its pending
//! change events before a command's end, then `GuestFs::events_applied` waits for the
//! pumps to apply them: no sleeping), these must agree:
//! 1. the guest directory (`std::fs`) with the reference model (`fs_model::reference`):
//!    each operation's answer (`Ok` or errno) is the model's, and so is the tree;
//! 2. what the kernel's caches would answer (`fs_model::kernel`, a model of what FUSE
//!    caches, fed by `GuestFs`'s answers and invalidations) with the directory: every
//!    name it would resolve without asking, `stat` and `cat` of every path, and a walk
//!    of listings — nothing cached is stale once the events are applied;
//! 3. a fresh walk through `GuestFs` (readdirplus and lookup of every name, attributes,
//!    contents) with the directory: names, types, sizes, modes, link counts, times
//!    (not atime) and contents;
//! 4. inode numbers with identities: a file's `st_ino` stays the same across renames
//!    and under every hard link for as long as it lives, and no two live files share one.
//!
//! The contract this follows is docs/tree.md ("fs/"): names, attributes and listings of
//! watched directories are cached (60 s) and events keep them true; so once the events
//! are applied, every cached answer must be current. Where the contract allows a lag,
//! the model says so: entries with a shorter TTL (beyond the watch limit) count as
//! expired at once; the link count and ctime of a hard-linked file that lost one of
//! its names in the guest may lag until the next refresh (inotify says which name went,
//! not which file lost a link); after events were lost, cached names may stay stale for
//! their TTL (the model lets it pass), while attributes, pages and listings may not.
//!
//! `BANDSOX_MODEL_CASES=N` runs N cases (256 by default).
mod fs_model;
mod inproc;

use fs_model::harness::Harness;
use fs_model::Op;
use proptest::prelude::*;

/// Cases per run unless `BANDSOX_MODEL_CASES` says otherwise.
const DEFAULT_CASES: u32 = 256;

fn cases() -> u32 {
    std::env::var("BANDSOX_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

/// Run one sequence on a fresh VM; the error says which step failed and how.
fn run(ops: &[Op]) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut h = Harness::new().await;
        let res = h.run(ops).await;
        h.finish().await;
        res
    })
}

/// Replay a recorded sequence.
fn replay(ops: &[Op]) {
    if let Err(e) = run(ops) {
        panic!("{e}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        // Failures are kept as the tests below, not in a file.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]
    #[test]
    fn fs_follows_the_model(ops in proptest::collection::vec(fs_model::op(), 1..24)) {
        run(&ops).map_err(TestCaseError::fail)?;
    }
}

// ---- regressions: sequences the model test found, replayed as they were shrunk ----

use fs_model::{Fill, Guest, Name, Perm, Pick};

/// Create `NAMES[name]` with `len` bytes in directory `dir`.
fn create(dir: u16, name: u8, len: u8) -> Op {
    Op::Create {
        dir: Pick(dir),
        name: Name(name),
        perm: Perm(0),
        data: Fill { start: 0, len },
    }
}

fn mkdir(dir: u16, name: u8) -> Op {
    Op::Mkdir {
        dir: Pick(dir),
        name: Name(name),
        perm: Perm(0),
    }
}

/// A file with two names: `a` and `b/a`.
fn two_names() -> Vec<Op> {
    vec![
        create(0, 0, 0),
        mkdir(0, 1),
        Op::Link {
            entry: Pick(0),
            dir: Pick(1),
            name: Name(0),
        },
    ]
}

/// The guest removes one name of a hard-linked file: the other name's link count may
/// lag (documented; inotify tells which name went, not which file lost a link).
#[test]
fn regression_hard_link_unlinked_in_the_guest() {
    let mut ops = two_names();
    ops.push(Op::Guest(Guest::Unlink { entry: Pick(0) }));
    replay(&ops);
}

/// The guest adds a name to a file the kernel holds: its link count and ctime must not
/// lag (the name event says which file it names now).
#[test]
fn regression_hard_link_made_in_the_guest() {
    replay(&[
        create(0, 0, 0),
        Op::Guest(Guest::Link {
            entry: Pick(0),
            dir: Pick(0),
            name: Name(1),
        }),
    ]);
}

/// Renaming a file over a directory that holds another name of it: `EISDIR` (the
/// kernel's ancestor checks go by path). A bug of the model, kept as its test.
#[test]
fn regression_rename_over_a_directory_holding_a_link() {
    replay(&[
        create(0, 2, 0),
        mkdir(0, 1),
        Op::Link {
            entry: Pick(1),
            dir: Pick(1),
            name: Name(1),
        },
        // c over b, which holds b/b, another name of c.
        Op::Rename {
            entry: Pick(2),
            dir: Pick(0),
            name: Name(1),
        },
    ]);
}

/// Events lost on a dying connection: the new connection drops every cached listing
/// and page (a same-size write in the guest, a name made in a listed directory).
#[test]
fn regression_events_lost_with_the_connection() {
    replay(&[
        create(0, 0, 3),
        Op::Read { file: Pick(0) },
        Op::ReadDir { dir: Pick(0) },
        Op::Lost(vec![
            Guest::Write {
                file: Pick(0),
                offset: 0,
                data: Fill { start: 7, len: 3 },
            },
            Guest::Create {
                dir: Pick(0),
                name: Name(1),
                data: Fill { start: 0, len: 1 },
            },
        ]),
    ]);
}

/// A file written in the guest while the agent connection was down: the agent keeps
/// the events for the next session (they were dropped when no session was connected).
#[test]
fn regression_write_while_disconnected() {
    replay(&[
        create(0, 0, 3),
        Op::Break(vec![Guest::Write {
            file: Pick(0),
            offset: 1,
            data: Fill { start: 9, len: 9 },
        }]),
    ]);
}

/// A name made in the guest while the agent connection was down, where the kernel
/// cached that it did not exist (the same bug: the event was dropped).
#[test]
fn regression_create_while_disconnected() {
    replay(&[
        Op::Stat {
            dir: Pick(0),
            name: Name(0),
        },
        Op::Break(vec![Guest::Create {
            dir: Pick(0),
            name: Name(0),
            data: Fill { start: 0, len: 3 },
        }]),
        Op::Stat {
            dir: Pick(0),
            name: Name(0),
        },
    ]);
}
