//! Runs a sequence of [`Op`]s against `fs/` of one in-process VM and the reference
//! model, checking after every step (see `inproc_fs_model.rs`).
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use bandsox_agent::client::ExecEvent;
use bandsox_agent::faults::{Fault, Faults};
use bandsox_agent::proto::{ExecSpec, Program};
use bandsox_fsd::guestfs::{GuestFs, Owner, Timespec};
use bandsox_fsd::manager::vm::Vm;
use bandsox_fsd::manager::Manager;
use bandsox_fsd::vfs::{Vfs, ROOT_INO};

use super::kernel::{call, Errno, Kernel, T};
use super::reference::{Id, Path, Reference, ROOT};
use super::walk::{self, show};
use super::{Guest, Op, Time};
use crate::inproc::{self, InProcBackend};

pub struct Harness {
    _tmp: tempfile::TempDir,
    mgr: Arc<Manager>,
    backend: Arc<InProcBackend>,
    vm: Arc<Vm>,
    kernel: Kernel,
    /// The guest's directory on this host (the in-process agent's root).
    dir: PathBuf,
    model: Reference,
    /// The `fs/` inode number each live node of the model was seen with.
    inos: HashMap<Id, u64>,
    /// Files that lost one of several names in the guest since the last check: what the
    /// kernel caches of their link count and ctime may lag (see `guestfs::events`).
    lagging: HashSet<Id>,
}

fn join(root: &std::path::Path, p: &Path) -> PathBuf {
    let mut out = root.to_path_buf();
    for n in p {
        out.push(OsStr::from_bytes(n));
    }
    out
}

fn timespec(t: Time) -> Timespec {
    Timespec {
        sec: i64::from(t.sec),
        nsec: t.nsec,
    }
}

/// The model's answer against `fs/`'s.
fn expect(want: Result<(), Errno>, got: Result<(), Errno>) -> Result<(), String> {
    if want == got {
        Ok(())
    } else {
        Err(format!("the model expects {want:?}, fs/ answered {got:?}"))
    }
}

impl Harness {
    /// A manager with one in-process VM, `fs/` of it, and an empty model.
    pub async fn new() -> Harness {
        inproc::limits_from_an_empty_file();
        let tmp = tempfile::tempdir().unwrap();
        let backend = InProcBackend::new();
        let mgr = inproc::manager(&tmp.path().join("state"), backend.clone());
        let (uid, gid) = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let vm = tokio::time::timeout(T, mgr.create("m", &[], uid, gid))
            .await
            .expect("create in time")
            .expect("create");
        // The `fs/` directory as the control tree numbers it, as `fuse/` finds it.
        let vfs = Vfs::new(mgr.clone());
        let vm_ino = vfs.lookup(ROOT_INO, OsStr::new("m")).unwrap().attr.ino;
        let fs_ino = vfs.lookup(vm_ino, OsStr::new("fs")).unwrap().attr.ino;
        let root = vfs.fs_target(fs_ino).expect("fs/ is a guest target");
        let g = GuestFs::new(mgr.clone(), tokio::runtime::Handle::current());
        let kernel = Kernel::new(g, root, Owner { uid, gid });
        let dir = vm.dir.join("inproc-root");
        let perm = std::fs::metadata(&dir).unwrap().mode() & 0o7777;
        Harness {
            _tmp: tmp,
            mgr,
            backend,
            vm,
            kernel,
            dir,
            model: Reference::new(perm),
            inos: HashMap::new(),
            lagging: HashSet::new(),
        }
    }

    /// Run `ops`, checking after each; the error names the step and what differed.
    pub async fn run(&mut self, ops: &[Op]) -> Result<(), String> {
        self.check()
            .await
            .map_err(|e| format!("before any step: {e}"))?;
        for (i, op) in ops.iter().enumerate() {
            self.step(op)
                .await
                .map_err(|e| format!("step {i} {op:?}: {e}"))?;
            self.check()
                .await
                .map_err(|e| format!("after step {i} {op:?}:\n{e}"))?;
        }
        Ok(())
    }

    /// Delete the VM (so its agent and tasks end with the test case).
    pub async fn finish(self) {
        let _ = tokio::time::timeout(T, self.mgr.delete("m")).await;
    }

    fn entries_where(&self, keep: impl Fn(&Reference, Id) -> bool) -> Vec<Path> {
        self.model
            .entries()
            .into_iter()
            .filter(|(_, id)| keep(&self.model, *id))
            .map(|(p, _)| p)
            .collect()
    }

    fn all_entries(&self) -> Vec<Path> {
        self.entries_where(|_, _| true)
    }

    async fn step(&mut self, op: &Op) -> Result<(), String> {
        let k = &self.kernel;
        let dirs = self.model.dirs();
        let files = self.model.files();
        let entries = self.all_entries();
        let split = |p: &Path| {
            let (name, dir) = p.split_last().unwrap();
            (dir.to_vec(), name.clone())
        };
        match op {
            Op::Create {
                dir,
                name,
                perm,
                data,
            } => {
                let Some(d) = dir.of(&dirs) else {
                    return Ok(());
                };
                let (name, perm, data) = (name.bytes(), perm.file(), data.bytes());
                let want = self.model.create(&d, name, perm, &data);
                let got = async { k.create(k.dir(&d).await?, name, perm, &data).await };
                expect(want, got.await)
            }
            Op::Write { file, offset, data } => {
                let Some(f) = file.of(&files) else {
                    return Ok(());
                };
                let data = data.bytes();
                let want = self.model.write(&f, usize::from(*offset), &data);
                let got = async { k.write(k.node(&f).await?, u64::from(*offset), &data).await };
                expect(want, got.await)
            }
            Op::Truncate { file, size } => {
                let Some(f) = file.of(&files) else {
                    return Ok(());
                };
                let want = self.model.truncate(&f, usize::from(*size));
                let got = async { k.truncate(k.node(&f).await?, u64::from(*size)).await };
                expect(want, got.await)
            }
            Op::Mkdir { dir, name, perm } => {
                let Some(d) = dir.of(&dirs) else {
                    return Ok(());
                };
                let (name, perm) = (name.bytes(), perm.dir());
                let want = self.model.mkdir(&d, name, perm);
                let got = async { k.mkdir(k.dir(&d).await?, name, perm).await };
                expect(want, got.await)
            }
            Op::Unlink { entry } | Op::Rmdir { entry } => {
                let Some(e) = entry.of(&entries) else {
                    return Ok(());
                };
                let rmdir = matches!(op, Op::Rmdir { .. });
                let want = if rmdir {
                    self.model.rmdir(&e)
                } else {
                    self.model.unlink(&e)
                };
                let (d, name) = split(&e);
                let got = async { k.unlink(k.dir(&d).await?, &name, rmdir).await };
                expect(want, got.await)
            }
            Op::Rename { entry, dir, name } => {
                let (Some(e), Some(d)) = (entry.of(&entries), dir.of(&dirs)) else {
                    return Ok(());
                };
                let name = name.bytes();
                let want = self.model.rename(&e, &d, name);
                let (sd, sname) = split(&e);
                let got = async {
                    let (p1, p2) = (k.dir(&sd).await?, k.dir(&d).await?);
                    k.rename(p1, &sname, p2, name).await
                };
                expect(want, got.await)
            }
            Op::Chmod { entry, perm } => {
                let targets = self.entries_where(|m, id| m.is_dir(id) || m.is_file(id));
                let Some(e) = entry.of(&targets) else {
                    return Ok(());
                };
                let id = self.model.lookup(&e).unwrap();
                let perm = if self.model.is_dir(id) {
                    perm.dir()
                } else {
                    perm.file()
                };
                let want = self.model.chmod(&e, perm);
                let got = async { k.chmod(k.node(&e).await?, perm).await };
                expect(want, got.await)
            }
            Op::Utimens {
                entry,
                atime,
                mtime,
            } => {
                let Some(e) = entry.of(&entries) else {
                    return Ok(());
                };
                let (a, m) = (timespec(*atime), timespec(*mtime));
                let got = async { k.utimens(k.node(&e).await?, a, m).await };
                expect(Ok(()), got.await)
            }
            Op::Symlink { dir, name, target } => {
                let Some(d) = dir.of(&dirs) else {
                    return Ok(());
                };
                let (name, target) = (name.bytes(), target.bytes());
                let want = self.model.symlink(&d, name, target);
                let got = async { k.symlink(k.dir(&d).await?, name, target).await };
                expect(want, got.await)
            }
            Op::Link { entry, dir, name } => {
                let sources = self.entries_where(|m, id| !m.is_dir(id));
                let (Some(e), Some(d)) = (entry.of(&sources), dir.of(&dirs)) else {
                    return Ok(());
                };
                let name = name.bytes();
                let want = self.model.link(&e, &d, name);
                let got = async {
                    let (ino, p) = (k.node(&e).await?, k.dir(&d).await?);
                    k.link(ino, p, name).await
                };
                expect(want, got.await)
            }
            Op::ReadDir { dir } => {
                let Some(d) = dir.of(&dirs) else {
                    return Ok(());
                };
                let want: Vec<Vec<u8>> = self
                    .all_entries()
                    .into_iter()
                    .filter(|p| p.len() == d.len() + 1 && p.starts_with(&d))
                    .map(|p| p.last().unwrap().clone())
                    .collect();
                let got = async { k.readdir(k.dir(&d).await?, false).await };
                let mut got: Vec<Vec<u8>> = match got.await {
                    Ok(l) => l.into_iter().map(|e| e.name).collect(),
                    Err(e) => return Err(format!("readdir failed: errno {e}")),
                };
                got.sort();
                if got != want {
                    return Err(format!("listed {got:?}, the model has {want:?}"));
                }
                Ok(())
            }
            Op::Stat { dir, name } => {
                let Some(d) = dir.of(&dirs) else {
                    return Ok(());
                };
                let name = name.bytes();
                let mut p = d.clone();
                p.push(name.to_vec());
                let want = self.model.lookup(&p).is_some();
                let got = async { k.lookup(k.dir(&d).await?, name, false).await };
                match got.await {
                    Ok(ino) if (ino != 0) == want => Ok(()),
                    other => Err(format!("stat: {other:?}, the model says exists={want}")),
                }
            }
            Op::Read { file } => {
                let Some(f) = file.of(&files) else {
                    return Ok(());
                };
                let id = self.model.lookup(&f).unwrap();
                let want = match &self.model.node(id).unwrap().body {
                    super::reference::Body::File(d) => d.clone(),
                    _ => unreachable!("files() lists files"),
                };
                let got = async { k.read(k.node(&f).await?, false).await };
                match got.await {
                    Ok(d) if d == want => Ok(()),
                    other => Err(format!("read {other:?}, the model has {want:?}")),
                }
            }
            Op::Guest(g) => self.guest(g),
            Op::Reconnect => self
                .vm
                .reconnect_agent_with("model test", true)
                .await
                .map(drop)
                .map_err(|e| format!("reconnect: {e:?}")),
            Op::Break(changes) => {
                let client = self.vm.require_agent().map_err(|e| format!("{e:?}"))?;
                let ended = *self.backend.ended.borrow();
                // The next byte the host writes breaks the connection.
                self.backend
                    .faults
                    .last()
                    .arm(Faults::write(Fault::CloseAt { at: 0 }));
                let _ = client.ping(T).await;
                tokio::time::timeout(T, client.closed())
                    .await
                    .map_err(|_| "the broken connection did not close".to_string())?;
                // The guest changes come after the agent saw the session end (unless the
                // VM's monitor reconnected meanwhile, the agent has nobody to tell).
                tokio::time::timeout(T, self.backend.ended_at_least(ended + 1))
                    .await
                    .map_err(|_| "the agent kept serving the broken connection".to_string())?;
                changes.iter().try_for_each(|g| self.guest(g))?;
                // The agent takes note of them while no host listens.
                let agent = self.backend.agents.lock().unwrap().last().cloned();
                agent.expect("the VM's agent").deliver_fs_events().await;
                Ok(())
            }
            Op::Lost(changes) => {
                let client = self.vm.require_agent().map_err(|e| format!("{e:?}"))?;
                let faults = self.backend.faults.last();
                // The host hears nothing more from the agent.
                faults.arm(Faults::read(Fault::DropFrom { at: 0 }));
                changes.iter().try_for_each(|g| self.guest(g))?;
                let agent = self.backend.agents.lock().unwrap().last().cloned();
                agent.expect("the VM's agent").deliver_fs_events().await;
                // Then the next byte it writes breaks the connection.
                faults.arm(Faults {
                    read: Fault::DropFrom { at: 0 },
                    write: Fault::CloseAt { at: 0 },
                });
                let _ = client.ping(T).await;
                tokio::time::timeout(T, client.closed())
                    .await
                    .map_err(|_| "the broken connection did not close".to_string())?;
                self.kernel.expire_names();
                Ok(())
            }
            Op::DropCaches => {
                self.kernel.drop_caches();
                Ok(())
            }
        }
    }

    /// A change in the guest's directory, made directly (a guest program's).
    fn guest(&mut self, g: &Guest) -> Result<(), String> {
        let dirs = self.model.dirs();
        let files = self.model.files();
        let entries = self.all_entries();
        let root = self.dir.clone();
        let at = |p: &Path| join(&root, p);
        let res = match g {
            Guest::Create { dir, name, data } => {
                let Some(d) = dir.of(&dirs) else {
                    return Ok(());
                };
                let data = data.bytes();
                if self.model.create(&d, name.bytes(), 0o644, &data).is_err() {
                    return Ok(());
                }
                let mut p = d.clone();
                p.push(name.bytes().to_vec());
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(at(&p))
                    .and_then(|mut f| f.write_all(&data))
            }
            Guest::Write { file, offset, data } => {
                let Some(f) = file.of(&files) else {
                    return Ok(());
                };
                let data = data.bytes();
                if self.model.write(&f, usize::from(*offset), &data).is_err() {
                    return Ok(());
                }
                OpenOptions::new()
                    .write(true)
                    .open(at(&f))
                    .and_then(|file| file.write_all_at(&data, u64::from(*offset)))
            }
            Guest::Unlink { entry } => {
                let Some(e) = entry.of(&entries) else {
                    return Ok(());
                };
                let id = self.model.lookup(&e).unwrap();
                if self.model.is_dir(id) {
                    if self.model.rmdir(&e).is_err() {
                        return Ok(());
                    }
                    std::fs::remove_dir(at(&e))
                } else {
                    self.model.unlink(&e).unwrap();
                    self.lag_if_live(id);
                    std::fs::remove_file(at(&e))
                }
            }
            Guest::Rename { entry, dir, name } => {
                let (Some(e), Some(d)) = (entry.of(&entries), dir.of(&dirs)) else {
                    return Ok(());
                };
                let mut p = d.clone();
                p.push(name.bytes().to_vec());
                let replaced = self.model.lookup(&p);
                if self.model.rename(&e, &d, name.bytes()).is_err() {
                    return Ok(());
                }
                if let Some(r) = replaced {
                    self.lag_if_live(r);
                }
                std::fs::rename(at(&e), at(&p))
            }
            Guest::Link { entry, dir, name } => {
                let sources: Vec<Path> = self.entries_where(|m, id| !m.is_dir(id));
                let (Some(e), Some(d)) = (entry.of(&sources), dir.of(&dirs)) else {
                    return Ok(());
                };
                if self.model.link(&e, &d, name.bytes()).is_err() {
                    return Ok(());
                }
                let mut p = d.clone();
                p.push(name.bytes().to_vec());
                std::fs::hard_link(at(&e), at(&p))
            }
            Guest::Mkdir { dir, name } => {
                let Some(d) = dir.of(&dirs) else {
                    return Ok(());
                };
                if self.model.mkdir(&d, name.bytes(), 0o755).is_err() {
                    return Ok(());
                }
                let mut p = d.clone();
                p.push(name.bytes().to_vec());
                std::fs::DirBuilder::new().mode(0o755).create(at(&p))
            }
        };
        res.map_err(|e| format!("the guest-side change failed: {e}"))
    }

    /// `id` lost a name in the guest; if it lives on under another, its cached link
    /// count and ctime may lag.
    fn lag_if_live(&mut self, id: Id) {
        if self.model.is_live(id) {
            self.lagging.insert(id);
        }
    }

    /// Wait until the host has acted on every change made so far: the agent flushes its
    /// pending events before a command's end, then every pump applies what it got.
    async fn settle(&self) -> Result<(), String> {
        // A request starts the event pump of the live connection (reconnecting first).
        let g = self.kernel.guestfs();
        let root = self.kernel.root();
        call(|d| g.getattr(root, None, d))
            .await
            .map_err(|e| format!("getattr of fs/: errno {e}"))?;
        let client = self.vm.require_agent().map_err(|e| format!("{e:?}"))?;
        let spec = ExecSpec {
            program: Program::Argv(vec![b"true".to_vec()]),
            env: Vec::new(),
            cwd: None,
            stdin: false,
        };
        let mut run = client
            .exec(spec, T)
            .await
            .map_err(|e| format!("exec true: {e:?}"))?;
        loop {
            match tokio::time::timeout(T, run.next()).await {
                Ok(Some(ExecEvent::Exited(_))) => break,
                Ok(Some(ExecEvent::Output(..))) => {}
                other => return Err(format!("exec true ended with {other:?}")),
            }
        }
        tokio::time::timeout(T, g.events_applied())
            .await
            .map_err(|_| "the events were not applied in time".to_string())
    }

    /// Everything agrees: the directory with the model, the cached and the fresh walk
    /// through `fs/` with the directory, and inode numbers with the files' identities.
    async fn check(&mut self) -> Result<(), String> {
        self.settle().await?;
        let actual = walk::std_tree(&self.dir);
        let root_nlink = self.model.nlink(ROOT);
        let seen = self.model.seen();
        walk::compare_reference(&seen, root_nlink, &actual)
            .map_err(|e| format!("the guest directory is not what the model says:\n{e}"))?;
        let lagging: HashSet<Path> = seen
            .iter()
            .filter(|(_, s)| self.lagging.contains(&s.id))
            .map(|(p, _)| p.clone())
            .collect();
        // Nothing the kernel would answer without asking is stale: the names it knows,
        // then each path's attributes and contents...
        for (p, ino) in self.kernel.cached_names() {
            match actual.get(&p) {
                None if ino == 0 => {}
                Some(it) if ino != 0 && walk::ino_matches(&p, ino, it.ino) => {}
                it => {
                    return Err(format!(
                        "the kernel's cache says {} is inode {ino:#x}, the directory has {it:?}",
                        show(&p)
                    ))
                }
            }
        }
        let mut stats = walk::Tree::new();
        for p in actual.keys().filter(|p| !p.is_empty()) {
            let it = self.kernel.stat(p).await;
            stats.insert(
                p.clone(),
                it.map_err(|e| format!("stat of {}: errno {e}", show(p)))?,
            );
        }
        let mut want = actual.clone();
        want.remove(&Vec::new());
        walk::compare(&want, &stats, &lagging)
            .map_err(|e| format!("what stat shows through the kernel's caches is stale:\n{e}"))?;
        // ... and what a walk of listings sees.
        let cached = self.kernel.walk(false).await?;
        walk::compare(&actual, &cached, &lagging)
            .map_err(|e| format!("what the kernel's caches show is stale:\n{e}"))?;
        let fresh = self.kernel.walk(true).await?;
        walk::compare(&actual, &fresh, &HashSet::new())
            .map_err(|e| format!("what fs/ answers differs from the directory:\n{e}"))?;
        // The fresh walk refreshed every cached attribute.
        self.lagging.clear();
        for tree in [&cached, &fresh] {
            let mut by_ino: HashMap<u64, Id> = HashMap::new();
            for (p, s) in &seen {
                let ino = tree[p].ino;
                if let Some(&was) = self.inos.get(&s.id) {
                    if was != ino {
                        return Err(format!("{}: st_ino {was:#x} became {ino:#x}", show(p)));
                    }
                }
                self.inos.insert(s.id, ino);
                if let Some(other) = by_ino.insert(ino, s.id) {
                    if other != s.id {
                        return Err(format!("{}: st_ino {ino:#x} names two files", show(p)));
                    }
                }
            }
        }
        // A number may be reused once its file is gone.
        self.inos.retain(|id, _| self.model.is_live(*id));
        Ok(())
    }
}
