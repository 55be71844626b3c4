//! The control tree's core (`bandsox_fsd::vfs`) without root, a mount or a VM: the same
//! calls the kernel adapter makes, over a manager whose VMs are in-process agents
//! (`inproc/mod.rs`). What is asserted is what a user would see through the mount: the
//! names, attributes and errnos, the result `cat ctl` shows, and the exec transaction.
mod inproc;

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Duration;

use bandsox_fsd::manager::Manager;
use bandsox_fsd::vfs::{Caller, DirEntry, Kind, Vfs, DIR_ATTR_TTL, ROOT_INO, TTL, VM_ENTRY_TTL};

/// Deadline of any single wait in these tests (nothing may hang).
const T: Duration = Duration::from_secs(30);

fn setup() -> (tempfile::TempDir, Arc<Manager>, Arc<Vfs>) {
    let tmp = tempfile::tempdir().unwrap();
    let mgr = inproc::manager(&tmp.path().join("state"), inproc::InProcBackend::new());
    let vfs = Arc::new(Vfs::new(mgr.clone()));
    (tmp, mgr, vfs)
}

/// The test process as the caller, with uid `uid` and a session of its own.
fn caller(uid: u32) -> Caller {
    Caller {
        pid: std::process::id(),
        uid,
        gid: uid,
        session: 4242 + uid,
    }
}

fn me() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn names(list: &[DirEntry]) -> Vec<&str> {
    list.iter().map(|e| e.name.as_str()).collect()
}

/// `ino` of `path` (slash-separated) from the root.
fn walk(vfs: &Vfs, path: &str) -> Result<u64, i32> {
    let mut ino = ROOT_INO;
    for part in path.split('/') {
        ino = vfs
            .lookup(ino, OsStr::new(part))
            .map_err(|e| e.errno)?
            .attr
            .ino;
    }
    Ok(ino)
}

async fn mkdir(vfs: &Arc<Vfs>, name: &str, c: Caller) -> Result<u64, i32> {
    let boot = vfs
        .mkdir(ROOT_INO, OsStr::new(name), c)
        .map_err(|e| e.errno)?;
    let entry = tokio::time::timeout(T, boot)
        .await
        .expect("mkdir in time")
        .map_err(|e| e.errno)?;
    Ok(entry.attr.ino)
}

async fn rmdir(vfs: &Vfs, parent: u64, name: &str, c: Caller) -> Result<(), i32> {
    let delete = vfs
        .rmdir(parent, OsStr::new(name), c)
        .map_err(|e| e.errno)?;
    tokio::time::timeout(T, delete)
        .await
        .expect("rmdir in time")
        .map_err(|e| e.errno)
}

/// Write `text` to the file at `path` as `c` and close it, like `echo text > path`.
async fn echo(vfs: &Vfs, path: &str, text: &str, c: Caller) -> Result<(), i32> {
    let ino = walk(vfs, path)?;
    let (fh, _) = vfs.open(ino, false, true, c).map_err(|e| e.errno)?;
    let res = async {
        vfs.write(fh, 0, text.as_bytes(), c).await?;
        vfs.flush(fh, c).await
    };
    let res = tokio::time::timeout(T, res).await.expect("write in time");
    vfs.release(fh);
    res.map_err(|e| e.errno)
}

/// The whole content of the file at `path` as `c` sees it, like `cat path`.
async fn cat(vfs: &Vfs, path: &str, c: Caller) -> Result<String, i32> {
    let ino = walk(vfs, path)?;
    let (fh, _) = vfs.open(ino, true, false, c).map_err(|e| e.errno)?;
    let mut out = Vec::new();
    loop {
        let offset = u64::try_from(out.len()).unwrap();
        let read = tokio::time::timeout(T, vfs.read(fh, offset, 65536, c))
            .await
            .expect("read in time");
        match read {
            Ok(d) if d.is_empty() => break,
            Ok(d) => out.extend_from_slice(&d),
            Err(e) => {
                vfs.release(fh);
                return Err(e.errno);
            }
        }
    }
    vfs.release(fh);
    Ok(String::from_utf8(out).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mkdir_shows_a_vm_with_its_files_and_cached_entries() {
    let (_tmp, _mgr, vfs) = setup();
    let root = vfs.listing(ROOT_INO, me()).unwrap();
    assert_eq!(
        names(&root).join(" "),
        ". .. README ctl defaults pools events usage images snapshots"
    );
    let ino = mkdir(&vfs, "v", caller(me())).await.unwrap();
    let entry = vfs.lookup(ROOT_INO, OsStr::new("v")).unwrap();
    assert_eq!(entry.attr.ino, ino);
    assert_eq!(entry.attr.kind, Kind::Dir);
    assert_eq!(entry.attr.perm, 0o700);
    assert_eq!(entry.attr.uid, me());
    assert_eq!(
        (entry.attr_ttl, entry.entry_ttl),
        (DIR_ATTR_TTL, VM_ENTRY_TTL)
    );
    let vm = vfs.listing(ino, me()).unwrap();
    assert_eq!(
        names(&vm).join(" "),
        ". .. ctl state info exec console events runs fs"
    );
    for e in vm.iter().filter(|e| !e.name.starts_with('.')) {
        assert_eq!(
            Ok(e.ino),
            walk(&vfs, &format!("v/{}", e.name)),
            "{}",
            e.name
        );
    }
    // `fs/` is the guest's: the proxy answers for it, not the control tree.
    let fs = walk(&vfs, "v/fs").unwrap();
    assert!(vfs.fs_target(fs).is_some());
    assert!(vfs.fs_target(ino).is_none());
    assert_eq!(vfs.vm_name_of(fs).as_deref(), Some("v"));
    assert_eq!(
        cat(&vfs, "v/state", caller(me())).await.unwrap(),
        "running\n"
    );
    // A control file's attributes are never cached.
    let state = vfs.getattr(walk(&vfs, "v/state").unwrap(), me()).unwrap();
    assert_eq!((state.attr.kind, state.attr_ttl), (Kind::File, TTL));
    // A name taken: EEXIST, and `cat ctl` says why.
    assert_eq!(mkdir(&vfs, "v", caller(me())).await, Err(libc::EEXIST));
    let why = cat(&vfs, "ctl", caller(me())).await.unwrap();
    assert!(why.contains("mkdir v"), "{why}");
    rmdir(&vfs, ROOT_INO, "v", caller(me())).await.unwrap();
    assert_eq!(walk(&vfs, "v"), Err(libc::ENOENT));
    // The old inode answers ENOENT, never another node.
    assert_eq!(vfs.getattr(ino, me()).unwrap_err().errno, libc::ENOENT);
}

/// A snapshot as the daemon writes it, owned by `uid` (restoring it is not the point).
fn plant_snapshot(state: &std::path::Path, name: &str, uid: u32) {
    let dir = state.join("snapshots").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let file = serde_json::json!({"path": "/nonexistent", "size": 0, "sha256": "0"});
    let info = serde_json::json!({
        "name": name, "source_vm": "elsewhere", "source_id": "0123456789ab",
        "created": "2026-12-01T00:00:00Z", "backend": "qemu", "vcpus": 1,
        "memory_mib": 128, "disk_mib": 8, "image": "base",
        "config": {"image": "base", "vcpus": 1, "memory_mib": 128, "disk_mib": null,
                   "net": "none", "backend": "qemu"},
        "kernel": file, "initrd": file,
        "sizes": {"state_bytes": 0, "memory_bytes": 0, "disk_bytes": 0,
                  "disk_allocated_bytes": 0, "total_allocated_bytes": 0},
        "disk_copy": "sparse copy", "create_ms": 1, "paused_ms": 1,
        "owner_uid": uid, "owner_gid": uid,
        "saved": {"state_file": "state", "memory_file": null, "restore": {}},
    });
    std::fs::write(dir.join("info.json"), info.to_string()).unwrap();
}

/// Each user lists only their own VMs and snapshots, root lists all (as `events` and
/// `usage` show them). A known name still resolves for everyone (lookups are shared by
/// the kernel's name cache): its directory is 0700, and taking the name is EEXIST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_show_each_user_their_own_vms_and_snapshots() {
    let (tmp, mgr, vfs) = setup();
    let (a, b) = (1611, 1612);
    mkdir(&vfs, "va", caller(a)).await.unwrap();
    mkdir(&vfs, "vb", caller(b)).await.unwrap();
    let state = tmp.path().join("state");
    plant_snapshot(&state, "sa", a);
    plant_snapshot(&state, "sb", b);
    let statics = "README ctl defaults pools events usage images snapshots";
    let list = |dir: &str, uid: u32| {
        let ino = if dir.is_empty() {
            ROOT_INO
        } else {
            walk(&vfs, dir).unwrap()
        };
        let l = vfs.listing(ino, uid).unwrap();
        let mut n: Vec<String> = names(&l).iter().map(|s| s.to_string()).collect();
        n.sort();
        n.join(" ")
    };
    let sorted = |s: &str| {
        let mut v: Vec<&str> = s.split(' ').collect();
        v.sort();
        v.join(" ")
    };
    assert_eq!(list("", a), sorted(&format!(". .. {statics} va")));
    assert_eq!(list("", b), sorted(&format!(". .. {statics} vb")));
    assert_eq!(list("", 0), sorted(&format!(". .. {statics} va vb")));
    assert_eq!(list("", 4242), sorted(&format!(". .. {statics}")));
    assert_eq!(list("snapshots", a), ". .. sa");
    assert_eq!(list("snapshots", b), ". .. sb");
    assert_eq!(list("snapshots", 0), ". .. sa sb");
    // Known names resolve for all; their directories are their owners'.
    for (path, owner) in [("va", a), ("snapshots/sb", b)] {
        let e = vfs.getattr(walk(&vfs, path).unwrap(), a).unwrap();
        assert_eq!((e.attr.uid, e.attr.perm), (owner, 0o700), "{path}");
    }
    // Taking another user's name: EEXIST, as for one's own.
    assert_eq!(mkdir(&vfs, "va", caller(b)).await, Err(libc::EEXIST));
    assert!(mgr.get("va").is_some_and(|v| v.uid == a));
    rmdir(&vfs, ROOT_INO, "va", caller(a)).await.unwrap();
    rmdir(&vfs, ROOT_INO, "vb", caller(0)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_or_root_removes_a_vm_and_the_tree_names_are_fixed() {
    let (_tmp, mgr, vfs) = setup();
    let owner = 1000;
    mkdir(&vfs, "w", caller(owner)).await.unwrap();
    assert_eq!(
        rmdir(&vfs, ROOT_INO, "w", caller(owner + 1)).await,
        Err(libc::EPERM)
    );
    assert!(mgr.get("w").is_some(), "a refused rmdir removed the VM");
    assert_eq!(
        rmdir(&vfs, ROOT_INO, "nope", caller(0)).await,
        Err(libc::ENOENT)
    );
    assert_eq!(
        rmdir(&vfs, ROOT_INO, "README", caller(0)).await,
        Err(libc::ENOTDIR)
    );
    let runs = walk(&vfs, "w/runs").unwrap();
    assert_eq!(
        vfs.rmdir(runs, OsStr::new("1"), caller(0))
            .err()
            .map(|e| e.errno),
        Some(libc::EPERM)
    );
    let vm = walk(&vfs, "w").unwrap();
    assert_eq!(
        vfs.mkdir(vm, OsStr::new("x"), caller(owner))
            .err()
            .map(|e| e.errno),
        Some(libc::EPERM)
    );
    // Ownership and mode of control files are fixed; truncation is accepted.
    let ctl = walk(&vfs, "w/ctl").unwrap();
    assert_eq!(vfs.setattr(ctl, true).unwrap_err().errno, libc::EPERM);
    assert_eq!(vfs.setattr(ctl, false).unwrap().ino, ctl);
    // Read-only files refuse writers at open.
    let state = walk(&vfs, "w/state").unwrap();
    assert_eq!(
        vfs.open(state, false, true, caller(owner))
            .err()
            .map(|e| e.errno),
        Some(libc::EACCES)
    );
    // A directory is not a file.
    assert_eq!(
        vfs.open(vm, true, false, caller(owner))
            .err()
            .map(|e| e.errno),
        Some(libc::EISDIR)
    );
    rmdir(&vfs, ROOT_INO, "w", caller(owner)).await.unwrap();
    assert!(mgr.get("w").is_none());
}

/// Every refused `mkdir`/`rmdir` of the control tree, and every deletion, is the
/// caller session's `cat ctl` result (issue 21: refusals used to return unrecorded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mkdir_and_rmdir_refusals_and_results_land_in_cat_ctl() {
    let (_tmp, mgr, vfs) = setup();
    let (owner, other) = (1000, 1001);
    mkdir(&vfs, "mine", caller(owner)).await.unwrap();
    assert_eq!(cat(&vfs, "ctl", caller(owner)).await.unwrap(), "");

    assert_eq!(
        rmdir(&vfs, ROOT_INO, "mine", caller(other)).await,
        Err(libc::EPERM)
    );
    let why = cat(&vfs, "ctl", caller(other)).await.unwrap();
    assert!(
        why.starts_with("error: rmdir mine: VM mine belongs to uid 1000"),
        "{why}"
    );
    // Per session: the owner's result is untouched.
    assert_eq!(cat(&vfs, "ctl", caller(owner)).await.unwrap(), "");

    assert_eq!(
        rmdir(&vfs, ROOT_INO, "nope", caller(other)).await,
        Err(libc::ENOENT)
    );
    let why = cat(&vfs, "ctl", caller(other)).await.unwrap();
    assert!(why.starts_with("error: rmdir nope: no VM"), "{why}");

    let images = walk(&vfs, "images").unwrap();
    assert_eq!(
        rmdir(&vfs, images, "nope", caller(other)).await,
        Err(libc::ENOENT)
    );
    let why = cat(&vfs, "ctl", caller(other)).await.unwrap();
    assert!(
        why.starts_with("error: rmdir images/nope: no image"),
        "{why}"
    );

    let snapshots = walk(&vfs, "snapshots").unwrap();
    assert_eq!(
        rmdir(&vfs, snapshots, "nope", caller(other)).await,
        Err(libc::ENOENT)
    );
    let why = cat(&vfs, "ctl", caller(other)).await.unwrap();
    assert!(
        why.starts_with("error: rmdir snapshots/nope: no snapshot"),
        "{why}"
    );

    let runs = walk(&vfs, "mine/runs").unwrap();
    assert_eq!(
        rmdir(&vfs, runs, "1", caller(owner)).await,
        Err(libc::EPERM)
    );
    let why = cat(&vfs, "ctl", caller(owner)).await.unwrap();
    assert!(
        why.starts_with("error: rmdir 1: runs cannot be removed"),
        "{why}"
    );

    let vm = walk(&vfs, "mine").unwrap();
    assert_eq!(
        vfs.mkdir(vm, OsStr::new("x"), caller(owner))
            .err()
            .map(|e| e.errno),
        Some(libc::EPERM)
    );
    let why = cat(&vfs, "ctl", caller(owner)).await.unwrap();
    assert!(
        why.starts_with("error: mkdir x: only VMs are made"),
        "{why}"
    );

    // A bad name for a VM is refused by the manager, and recorded the same way.
    assert_eq!(mkdir(&vfs, "mine", caller(other)).await, Err(libc::EEXIST));
    let why = cat(&vfs, "ctl", caller(other)).await.unwrap();
    assert!(why.starts_with("error: mkdir mine: "), "{why}");

    rmdir(&vfs, ROOT_INO, "mine", caller(owner)).await.unwrap();
    assert!(mgr.get("mine").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_at_close_and_runs_last_follows_the_session() {
    let (_tmp, _mgr, vfs) = setup();
    let c = caller(me());
    mkdir(&vfs, "x", c).await.unwrap();
    assert_eq!(walk(&vfs, "x/runs/last"), Err(libc::ENOENT));
    echo(&vfs, "x/exec", "echo hi; exit 3\n", c).await.unwrap();
    let last = walk(&vfs, "x/runs/last").unwrap();
    let n = vfs.readlink(last, c).unwrap();
    assert_eq!(
        cat(&vfs, &format!("x/runs/{n}/stdout"), c).await.unwrap(),
        "hi\n"
    );
    assert_eq!(
        cat(&vfs, &format!("x/runs/{n}/status"), c).await.unwrap(),
        "3\n"
    );
    // Another session's command is its own `runs/last`, not this session's.
    let other = Caller {
        session: c.session + 1,
        ..c
    };
    echo(&vfs, "x/exec", "echo other\n", other).await.unwrap();
    let m = vfs.readlink(last, other).unwrap();
    assert_ne!(m, n);
    assert_eq!(vfs.readlink(last, c).unwrap(), n);
    assert_eq!(
        cat(&vfs, &format!("x/runs/{m}/stdout"), other)
            .await
            .unwrap(),
        "other\n"
    );
    // A read-write exec descriptor streams the output instead of waiting at close.
    let exec = walk(&vfs, "x/exec").unwrap();
    let (fh, _) = vfs.open(exec, true, true, c).unwrap();
    vfs.write(fh, 0, b"echo streamed\n", c).await.unwrap();
    let out = tokio::time::timeout(T, vfs.read(fh, 0, 4096, c))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out, b"streamed\n");
    vfs.release(fh);
    // A bad command fails its write with EINVAL and `cat x/ctl` says why.
    assert_eq!(
        echo(&vfs, "x/ctl", "frobnicate\n", c).await,
        Err(libc::EINVAL)
    );
    let why = cat(&vfs, "x/ctl", c).await.unwrap();
    assert!(why.contains("frobnicate"), "{why}");
    rmdir(&vfs, ROOT_INO, "x", c).await.unwrap();
}

/// What open files and commands make the daemon hold counts against the limits of one
/// user (`user.7777.*`): over a limit the write fails with EDQUOT, nothing is kept, and
/// `cat ctl` names the limit; closing gives everything back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_open_files_count_against_the_callers_limits() {
    let (_tmp, mgr, vfs) = setup();
    // This manager's own limits file (no other test shares it), rewritten as root would.
    let file = mgr.limits.path().to_path_buf();
    let next = file.with_extension("new");
    std::fs::write(
        &next,
        "user.7777.runs = 1\nuser.7777.terminal_cells = 100\nuser.7777.buffer_mib = 1\n",
    )
    .unwrap();
    // An explicit mode: an in-process agent of another test may have set this process's
    // umask to 0, and the daemon refuses a group- or world-writable limits file.
    std::fs::set_permissions(&next, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::rename(&next, &file).unwrap();
    // Read now: hot paths look at the file at most once a second.
    mgr.limits.current();
    let c = caller(7777);
    mkdir(&vfs, "q", c).await.unwrap();
    let exec = walk(&vfs, "q/exec").unwrap();
    echo(&vfs, "q/exec", "echo first\n", c).await.unwrap();
    let last = walk(&vfs, "q/runs/last").unwrap();
    assert_eq!(vfs.readlink(last, c).unwrap(), "1");

    // A terminal larger than the user's cells: the write of the options line fails.
    assert_eq!(
        echo(&vfs, "q/exec", "#bandsox tty=20x10\ntrue\n", c).await,
        Err(libc::EDQUOT)
    );
    let why = cat(&vfs, "q/ctl", c).await.unwrap();
    assert!(
        why.starts_with("error: exec: limit user.7777.terminal_cells=100 reached"),
        "{why}"
    );
    // An exec descriptor being written counts as a command: a second one is refused.
    let (held, _) = vfs.open(exec, false, true, c).unwrap();
    vfs.write(held, 0, b"true", c).await.unwrap();
    assert_eq!(echo(&vfs, "q/exec", "true\n", c).await, Err(libc::EDQUOT));
    let why = cat(&vfs, "q/ctl", c).await.unwrap();
    assert!(why.contains("limit user.7777.runs=1 reached"), "{why}");
    assert_eq!(
        vfs.readlink(last, c).map_err(|e| e.errno),
        Err(libc::ENOENT),
        "runs/last names an older run after a refused exec"
    );
    tokio::time::timeout(T, vfs.flush(held, c))
        .await
        .unwrap()
        .unwrap();
    vfs.release(held);

    // Unterminated ctl lines hold the caller's buffers: about 1 MiB of them fits.
    let ctl = walk(&vfs, "q/ctl").unwrap();
    let mut open = Vec::new();
    let line = vec![b'x'; 60_000];
    let refused = loop {
        let (fh, _) = vfs.open(ctl, false, true, c).unwrap();
        open.push(fh);
        if let Err(e) = vfs.write(fh, 0, &line, c).await {
            break e;
        }
        assert!(open.len() < 40, "1 MiB of buffers was never reached");
    };
    assert_eq!(refused.errno, libc::EDQUOT, "{}", refused.message);
    assert!(refused.message.contains("user.7777.buffer_mib=1"));
    assert_eq!(open.len(), 18, "1 MiB holds 17 lines of 60,000 bytes");
    for fh in open {
        vfs.release(fh);
    }
    // All given back: a command runs.
    echo(&vfs, "q/exec", "echo back\n", c).await.unwrap();
    assert_eq!(cat(&vfs, "q/exec", c).await.unwrap(), "back\n");
    rmdir(&vfs, ROOT_INO, "q", c).await.unwrap();
}
