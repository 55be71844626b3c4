//! The control tree's namespace: which nodes exist, their inode numbers and attributes.
//!
//! Invariants:
//! - A [`Node`] names a place in the tree by stable identity (VM id, run number), never
//!   by position; the inode table maps each node to one inode number for the daemon's
//!   lifetime, so numbers are never reused for another node (generation stays 0).
//! - Whether a node *exists* is decided by the manager at the time of the call; a node
//!   of a deleted VM keeps its number but every operation on it answers ENOENT.
//! - Nothing here blocks on a guest.
//! - Listings are per viewer (the root's VMs and `snapshots/`: the viewer's own, all for
//!   root); existence and attributes are not (lookups are caller-free, since the kernel
//!   shares its name and attribute caches between users).
//! - Nothing here knows fuser: [`Attr`] and [`Kind`] are the core's own types, which
//!   the kernel adapter (`crate::fuse`) converts.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::manager::runs::RunStream;
use crate::manager::vm::Vm;
use crate::manager::Manager;
use crate::vfs::policy;

pub const ROOT_INO: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmFile {
    Ctl,
    State,
    Info,
    Exec,
    Console,
    /// The VM's own lines of the event log.
    Events,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunFile {
    Cmd,
    Stdin,
    Out(RunStream),
    Status,
    Pid,
    Ctl,
    /// Terminal runs: the terminal (read: redraw + live output; write: keystrokes).
    Terminal,
    /// Terminal runs: `COLSxROWS` (write to resize).
    Winsize,
    /// Terminal runs: the current screen as text.
    Screen,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Node {
    Root,
    Readme,
    Ctl,
    Defaults,
    /// `pools`: the warm pools (root writes them; see `crate::pool`).
    Pools,
    Events,
    /// `usage`: the caller's use against the limits (generated per caller at open).
    Usage,
    Images,
    Image(String),
    ImageInfo(String),
    Snapshots,
    Snapshot(String),
    SnapshotInfo(String),
    Vm(String),
    VmFile(String, VmFile),
    /// A VM's `fs/` directory in one boot generation (a new inode per boot, so the
    /// kernel drops what it cached from an earlier boot).
    VmFs(String, u64),
    Runs(String),
    RunsLast(String),
    Run(String, u64),
    RunFile(String, u64, RunFile),
}

impl Node {
    /// The id of the VM this node belongs to, if any.
    pub fn vm_id(&self) -> Option<&str> {
        match self {
            Node::Vm(id)
            | Node::VmFile(id, _)
            | Node::VmFs(id, _)
            | Node::Runs(id)
            | Node::RunsLast(id)
            | Node::Run(id, _)
            | Node::RunFile(id, _, _) => Some(id),
            _ => None,
        }
    }

    /// What the node is, as listings show it (without asking the manager).
    pub fn kind(&self) -> Kind {
        match self {
            Node::RunsLast(_) => Kind::Symlink,
            Node::Root
            | Node::Images
            | Node::Image(_)
            | Node::Snapshots
            | Node::Snapshot(_)
            | Node::Vm(_)
            | Node::VmFs(..)
            | Node::Runs(_)
            | Node::Run(..) => Kind::Dir,
            _ => Kind::File,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

/// Attributes independent of fuser's types (the adapter converts).
#[derive(Debug, Clone)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u32,
    pub time: SystemTime,
}

const RUN_FILES: &[(&str, RunFile)] = &[
    ("cmd", RunFile::Cmd),
    ("stdin", RunFile::Stdin),
    ("stdout", RunFile::Out(RunStream::Stdout)),
    ("stderr", RunFile::Out(RunStream::Stderr)),
    ("output", RunFile::Out(RunStream::Output)),
    ("status", RunFile::Status),
    ("pid", RunFile::Pid),
    ("ctl", RunFile::Ctl),
];

/// Files only terminal runs have.
const TTY_FILES: &[(&str, RunFile)] = &[
    ("terminal", RunFile::Terminal),
    ("winsize", RunFile::Winsize),
    ("screen", RunFile::Screen),
];

const VM_FILES: &[(&str, VmFile)] = &[
    ("ctl", VmFile::Ctl),
    ("state", VmFile::State),
    ("info", VmFile::Info),
    ("exec", VmFile::Exec),
    ("console", VmFile::Console),
    ("events", VmFile::Events),
];

pub const README: &str = "\
BandSox-FS: microVMs as files.

  mkdir NAME                      create and boot a VM (options from `defaults`)
  echo 'create NAME vcpus=2 memory=512' > ctl
  cat pools                       warm pools of ready clones (root writes them)
  echo 'uname -a' > NAME/exec; cat NAME/exec     run a command, read its output
  cat NAME/runs/last/status       exit code of your last command (or `running`)
  echo pause|resume|stop|start|kill|restart > NAME/ctl
  cat NAME/state                  booting | running | paused | stopped | failed: why
                                  (adopting: after a daemon restart, until re-attached)
  cat NAME/info                   JSON description
  tail -f NAME/console            serial console;   tail -f events   your VMs' events
  cat usage                       what you use, against the limits root set
  rmdir NAME                      stop and delete the VM
  echo 'pull NAME alpine:3.20' > ctl          image from a registry (import NAME /path: local)
  echo 'create vm image=NAME autostart=1' > ctl   boot it; its entrypoint runs as runs/main
  echo 'snapshot S' > NAME/ctl    snapshot a running VM (it keeps running)
  echo 'clone S NEW count=3' > ctl   start NEW-1..NEW-3 from snapshot S
  cat snapshots/S/info; rmdir snapshots/S

A failed write prints e.g. `write error: Invalid argument`; `cat ctl` says why.
";

#[derive(Default)]
pub struct InodeTable {
    by_node: HashMap<Node, u64>,
    by_ino: Vec<Node>,
}

impl InodeTable {
    pub fn new() -> Self {
        let mut t = InodeTable::default();
        t.ino_of(&Node::Root);
        t
    }
    /// The inode number of `node`, assigned on first use.
    pub fn ino_of(&mut self, node: &Node) -> u64 {
        if let Some(i) = self.by_node.get(node) {
            return *i;
        }
        self.by_ino.push(node.clone());
        let ino = self.by_ino.len() as u64;
        self.by_node.insert(node.clone(), ino);
        ino
    }
    pub fn node(&self, ino: u64) -> Option<Node> {
        let i = usize::try_from(ino.checked_sub(1)?).ok()?;
        self.by_ino.get(i).cloned()
    }
}

/// Namespace operations over the manager.
pub struct Tree {
    mgr: Arc<Manager>,
    inodes: Mutex<InodeTable>,
    started: SystemTime,
}

impl Tree {
    pub fn new(mgr: Arc<Manager>) -> Self {
        Tree {
            mgr,
            inodes: Mutex::new(InodeTable::new()),
            started: SystemTime::now(),
        }
    }

    /// The manager the tree shows.
    pub fn mgr(&self) -> &Arc<Manager> {
        &self.mgr
    }

    pub fn ino(&self, node: &Node) -> u64 {
        self.inodes.lock().ino_of(node)
    }

    pub fn node(&self, ino: u64) -> Result<Node> {
        self.inodes
            .lock()
            .node(ino)
            .ok_or_else(|| Error::not_found("stale inode"))
    }

    pub fn vm(&self, id: &str) -> Result<Arc<Vm>> {
        self.mgr
            .get_by_id(id)
            .ok_or_else(|| Error::not_found("no such VM"))
    }

    fn has_image(&self, name: &str) -> bool {
        self.mgr.images().iter().any(|i| i == name)
    }

    fn has_snapshot(&self, name: &str) -> bool {
        self.mgr.snapshots().iter().any(|i| i == name)
    }

    fn vm_by_name(&self, name: &str) -> Option<Arc<Vm>> {
        self.mgr.get(name)
    }

    /// Resolve `runs/last` for a caller's session.
    pub fn last_run(&self, id: &str, session: u32) -> Result<u64> {
        self.vm(id)?
            .last_run(session)
            .ok_or_else(|| Error::not_found("no command has run in this VM yet"))
    }

    pub fn lookup(&self, parent: &Node, name: &str) -> Result<Node> {
        let nf = || Error::not_found(format!("no entry {name:?}"));
        let node = match parent {
            Node::Root => match name {
                "README" => Node::Readme,
                "ctl" => Node::Ctl,
                "defaults" => Node::Defaults,
                "pools" => Node::Pools,
                "events" => Node::Events,
                "usage" => Node::Usage,
                "images" => Node::Images,
                "snapshots" => Node::Snapshots,
                _ => Node::Vm(self.vm_by_name(name).ok_or_else(nf)?.id.clone()),
            },
            Node::Images if self.has_image(name) => Node::Image(name.to_string()),
            Node::Snapshots if self.has_snapshot(name) => Node::Snapshot(name.to_string()),
            Node::Images | Node::Snapshots => return Err(nf()),
            Node::Image(img) if name == "info" => Node::ImageInfo(img.clone()),
            Node::Snapshot(snap) if name == "info" => Node::SnapshotInfo(snap.clone()),
            Node::Vm(id) => {
                self.vm(id)?;
                if name == "runs" {
                    Node::Runs(id.clone())
                } else if name == "fs" {
                    Node::VmFs(id.clone(), self.vm(id)?.generation())
                } else {
                    let f = VM_FILES.iter().find(|(n, _)| *n == name).ok_or_else(nf)?;
                    Node::VmFile(id.clone(), f.1)
                }
            }
            Node::Runs(id) => {
                let vm = self.vm(id)?;
                if name == "last" {
                    if vm.newest_run().is_none() {
                        return Err(nf());
                    }
                    Node::RunsLast(id.clone())
                } else if name == "main" {
                    // The image entrypoint's run (autostart=1): an alias of runs/<n>.
                    let n = vm.main_run().ok_or_else(nf)?;
                    vm.run(n).ok_or_else(nf)?;
                    Node::Run(id.clone(), n)
                } else {
                    let n: u64 = name.parse().map_err(|_| nf())?;
                    vm.run(n).ok_or_else(nf)?;
                    Node::Run(id.clone(), n)
                }
            }
            Node::Run(id, n) => {
                let run = self.vm(id)?.run(*n).ok_or_else(nf)?;
                let tty: &[(&str, RunFile)] = if run.is_tty() { TTY_FILES } else { &[] };
                let f = RUN_FILES
                    .iter()
                    .chain(tty)
                    .find(|(fname, _)| *fname == name)
                    .ok_or_else(nf)?;
                Node::RunFile(id.clone(), *n, f.1)
            }
            _ => return Err(Error::new(libc::ENOTDIR, "not a directory")),
        };
        Ok(node)
    }

    /// Does the node still exist?
    pub fn check(&self, node: &Node) -> Result<()> {
        match node {
            Node::Vm(id)
            | Node::VmFile(id, _)
            | Node::VmFs(id, _)
            | Node::Runs(id)
            | Node::RunsLast(id) => self.vm(id).map(|_| ()),
            Node::Run(id, n) | Node::RunFile(id, n, _) => self
                .vm(id)?
                .run(*n)
                .map(|_| ())
                .ok_or_else(|| Error::not_found("no such run")),
            Node::Image(i) | Node::ImageInfo(i) if !self.has_image(i) => {
                Err(Error::not_found("no such image"))
            }
            Node::Snapshot(i) | Node::SnapshotInfo(i) if !self.has_snapshot(i) => {
                Err(Error::not_found("no such snapshot"))
            }
            _ => Ok(()),
        }
    }

    /// The entries of `node` as `viewer` (a uid) lists them: the root and `snapshots/`
    /// show other users' VMs and snapshots to root only ([`policy::lists`]).
    pub fn readdir(&self, node: &Node, viewer: u32) -> Result<Vec<(String, Node)>> {
        let mut out = Vec::new();
        match node {
            Node::Root => {
                for (n, node) in [
                    ("README", Node::Readme),
                    ("ctl", Node::Ctl),
                    ("defaults", Node::Defaults),
                    ("pools", Node::Pools),
                    ("events", Node::Events),
                    ("usage", Node::Usage),
                    ("images", Node::Images),
                    ("snapshots", Node::Snapshots),
                ] {
                    out.push((n.to_string(), node));
                }
                for vm in self.mgr.list() {
                    if policy::lists(viewer, vm.uid) {
                        out.push((vm.name.clone(), Node::Vm(vm.id.clone())));
                    }
                }
            }
            Node::Images => {
                for i in self.mgr.images() {
                    out.push((i.clone(), Node::Image(i)));
                }
            }
            Node::Image(i) => out.push(("info".into(), Node::ImageInfo(i.clone()))),
            Node::Snapshots => {
                for i in self.mgr.snapshots() {
                    // One info.json read per snapshot, skipped for root. A snapshot
                    // whose owner cannot be read is root's to see.
                    let shown = viewer == 0
                        || self
                            .mgr
                            .snapshot_owner(&i)
                            .is_some_and(|(owner, _)| policy::lists(viewer, owner));
                    if shown {
                        out.push((i.clone(), Node::Snapshot(i)));
                    }
                }
            }
            Node::Snapshot(i) => out.push(("info".into(), Node::SnapshotInfo(i.clone()))),
            Node::Vm(id) => {
                self.vm(id)?;
                for (n, f) in VM_FILES {
                    out.push((n.to_string(), Node::VmFile(id.clone(), *f)));
                }
                out.push(("runs".into(), Node::Runs(id.clone())));
                let generation = self.vm(id)?.generation();
                out.push(("fs".into(), Node::VmFs(id.clone(), generation)));
            }
            Node::Runs(id) => {
                let vm = self.vm(id)?;
                let nums = vm.run_numbers();
                if !nums.is_empty() {
                    out.push(("last".into(), Node::RunsLast(id.clone())));
                }
                if let Some(n) = vm.main_run() {
                    out.push(("main".into(), Node::Run(id.clone(), n)));
                }
                for n in nums {
                    out.push((n.to_string(), Node::Run(id.clone(), n)));
                }
            }
            Node::Run(id, n) => {
                self.check(node)?;
                let tty = self.vm(id)?.run(*n).is_some_and(|r| r.is_tty());
                let extra: &[(&str, RunFile)] = if tty { TTY_FILES } else { &[] };
                for (name, f) in RUN_FILES.iter().chain(extra) {
                    out.push((name.to_string(), Node::RunFile(id.clone(), *n, *f)));
                }
            }
            _ => return Err(Error::new(libc::ENOTDIR, "not a directory")),
        }
        Ok(out)
    }

    /// Content of files whose text is generated on open.
    pub fn generated(&self, node: &Node) -> Result<Option<Vec<u8>>> {
        Ok(Some(match node {
            Node::Readme => README.as_bytes().to_vec(),
            Node::Defaults => self.mgr.defaults().to_defaults().into_bytes(),
            Node::Pools => self.mgr.pools_text().into_bytes(),
            Node::ImageInfo(i) => self.mgr.image_info(i)?.into_bytes(),
            Node::SnapshotInfo(i) => self.mgr.snapshot_info(i)?.into_bytes(),
            Node::VmFile(id, VmFile::State) => {
                format!("{}\n", self.vm(id)?.state().render()).into_bytes()
            }
            Node::VmFile(id, VmFile::Info) => self.vm(id)?.info_json().into_bytes(),
            Node::RunFile(id, n, f) => {
                let run = self
                    .vm(id)?
                    .run(*n)
                    .ok_or_else(|| Error::not_found("no such run"))?;
                match f {
                    RunFile::Cmd => run.cmd()?,
                    RunFile::Status => run.status().render().into_bytes(),
                    RunFile::Pid => run
                        .pid()
                        .map(|p| format!("{p}\n"))
                        .unwrap_or_default()
                        .into_bytes(),
                    RunFile::Screen => run
                        .terminal_snapshot()?
                        .map(|(text, _, _)| text)
                        .unwrap_or_default()
                        .into_bytes(),
                    RunFile::Winsize => run
                        .tty_size()
                        .map(crate::manager::runs::render_size)
                        .unwrap_or_default()
                        .into_bytes(),
                    _ => return Ok(None),
                }
            }
            _ => return Ok(None),
        }))
    }

    fn owner(&self, node: &Node) -> (u32, u32) {
        match node {
            Node::Snapshot(s) | Node::SnapshotInfo(s) => {
                self.mgr.snapshot_owner(s).unwrap_or((0, 0))
            }
            Node::Image(i) | Node::ImageInfo(i) => (self.mgr.image_owner(i), 0),
            _ => match node.vm_id() {
                Some(id) => self.vm(id).map(|v| (v.uid, v.gid)).unwrap_or((0, 0)),
                None => (0, 0),
            },
        }
    }

    pub fn attr(&self, node: &Node) -> Result<Attr> {
        self.check(node)?;
        let (uid, gid) = self.owner(node);
        let ino = self.ino(node);
        let dir = |perm| (Kind::Dir, perm, 0u64);
        let (kind, perm, size) = match node {
            // Sticky like /tmp: anyone may mkdir a VM, only its owner may rmdir it.
            Node::Root => dir(0o1777),
            // Sticky like the root: the kernel lets each user rmdir only their own
            // images and snapshots (the daemon checks ownership again).
            Node::Images | Node::Snapshots => dir(0o1777),
            Node::Image(_) => dir(0o755),
            Node::Snapshot(_) => dir(0o700),
            Node::Vm(_) => dir(0o700),
            // Shown while the guest is unreachable; a running guest's root attributes
            // replace this (see `guestfs`).
            Node::VmFs(..) => dir(0o755),
            Node::Runs(_) | Node::Run(..) => dir(0o700),
            Node::RunsLast(_) => (Kind::Symlink, 0o777, 0),
            Node::Ctl => (Kind::File, 0o666, 0),
            Node::Defaults | Node::Pools => (
                Kind::File,
                0o644,
                self.generated(node)?.map_or(0, |c| c.len() as u64),
            ),
            // The size is the caller's view (see `Files::events_len`).
            Node::Events => (Kind::File, 0o444, 0),
            // Per caller: generated at open; the size is not known before.
            Node::Usage => (Kind::File, 0o444, 0),
            Node::Readme | Node::ImageInfo(_) | Node::SnapshotInfo(_) => (
                Kind::File,
                0o444,
                self.generated(node)?.map_or(0, |c| c.len() as u64),
            ),
            Node::VmFile(id, f) => match f {
                VmFile::Ctl | VmFile::Exec => (Kind::File, 0o600, 0),
                VmFile::Console => (
                    Kind::File,
                    0o400,
                    crate::snapshots::file_len(&self.vm(id)?.console_path()),
                ),
                // The size is the caller's view (see `Files::events_len`).
                VmFile::Events => (Kind::File, 0o400, 0),
                VmFile::State | VmFile::Info => (
                    Kind::File,
                    0o400,
                    self.generated(node)?.map_or(0, |c| c.len() as u64),
                ),
            },
            Node::RunFile(id, n, f) => match f {
                RunFile::Stdin => (Kind::File, 0o200, 0),
                RunFile::Cmd => (Kind::File, 0o400, self.run(id, *n)?.cmd_len()),
                RunFile::Ctl | RunFile::Terminal | RunFile::Winsize => (Kind::File, 0o600, 0),
                // Rendered at open; a size would cost a render per `stat`.
                RunFile::Screen => (Kind::File, 0o400, 0),
                RunFile::Out(s) => {
                    let run = self
                        .vm(id)?
                        .run(*n)
                        .ok_or_else(|| Error::not_found("no such run"))?;
                    (Kind::File, 0o400, run.len(*s))
                }
                _ => (
                    Kind::File,
                    0o400,
                    self.generated(node)?.map_or(0, |c| c.len() as u64),
                ),
            },
        };
        let nlink = if kind == Kind::Dir { 2 } else { 1 };
        let time = match node {
            Node::Vm(id) => self
                .vm(id)
                .map(|v| SystemTime::UNIX_EPOCH + Duration::from_secs(v.record().created))
                .unwrap_or(self.started),
            _ => self.run_time(node).unwrap_or(self.started),
        };
        Ok(Attr {
            ino,
            kind,
            perm,
            uid,
            gid,
            size,
            nlink,
            time,
        })
    }
}

impl Tree {
    fn run(&self, id: &str, n: u64) -> Result<Arc<crate::manager::runs::Run>> {
        self.vm(id)?
            .run(n)
            .ok_or_else(|| Error::not_found("no such run"))
    }

    /// The times of `runs/` and what is in it (docs/tree.md, "exec"): a run's directory
    /// and its input files the start, its output files the last output, `status` the
    /// end; `runs/` (and `runs/last`) the newest run's start.
    fn run_time(&self, node: &Node) -> Option<SystemTime> {
        match node {
            Node::Runs(id) | Node::RunsLast(id) => Some(self.vm(id).ok()?.newest_run()?.started),
            Node::Run(id, n) => Some(self.run(id, *n).ok()?.started),
            Node::RunFile(id, n, f) => {
                let t = self.run(id, *n).ok()?.times();
                Some(match f {
                    RunFile::Out(_) | RunFile::Terminal | RunFile::Screen => t.output,
                    RunFile::Status => t.ended.unwrap_or(t.started),
                    RunFile::Cmd
                    | RunFile::Stdin
                    | RunFile::Pid
                    | RunFile::Ctl
                    | RunFile::Winsize => t.started,
                })
            }
            _ => None,
        }
    }
}

/// Session id of a process (field 6 of /proc/<pid>/stat); 0 when unknown.
pub fn session_of(pid: u32) -> u32 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name may contain spaces and parentheses: parse after the last ')'.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0;
    };
    rest.split_whitespace()
        .nth(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_numbers_are_stable() {
        let mut t = InodeTable::new();
        assert_eq!(t.ino_of(&Node::Root), ROOT_INO);
        let a = t.ino_of(&Node::Vm("x".into()));
        let b = t.ino_of(&Node::Ctl);
        assert_ne!(a, b);
        assert_eq!(t.ino_of(&Node::Vm("x".into())), a);
        assert_eq!(t.node(a), Some(Node::Vm("x".into())));
        assert_eq!(t.node(0), None);
        assert_eq!(t.node(999), None);
    }

    #[test]
    fn session_of_self_matches_getsid() {
        let me = std::process::id();
        let sid = nix::unistd::getsid(None).unwrap().as_raw();
        assert_eq!(session_of(me), u32::try_from(sid).unwrap());
    }
}
