//! Open files of the control tree and what reading and writing them means.
//!
//! Kinds of open file:
//! - *generated*: content snapshotted at open (`state`, `info`, `status`, ...); reads
//!   honour the kernel's offset.
//! - *logs* (`console`, `events`): read at the kernel's offset from a growing file, so
//!   `cat` ends at the current end and `tail -f` follows by size.
//! - *ctl*: every write line is one command, executed before `write` returns so a bad
//!   command fails the write with its errno; reading gives the caller session's last
//!   result.
//! - *streams* (`runs/<n>/stdout|stderr|output`, and `exec` once it has a run): a private
//!   read position; reads wait like a pipe until data or the end of the command.
//! - *exec*: a transaction. Writes collect the script; it starts on the first flush
//!   (close) or the first read of the same descriptor. A write-only descriptor's flush
//!   waits for the command to finish (so `echo cmd > exec` returns when it is done); a
//!   read-write descriptor streams the output instead.
//!
//! Every wait is interruptible (see `interrupt`); an interrupted wait on a command sends
//! it SIGINT, like a terminal would.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::tree::{Node, RunFile, Tree, VmFile};
use crate::error::{Error, Result};
use crate::interrupt::interruptible;
use crate::manager::runs::{Run, RunStream};
use crate::manager::vm::{Vm, MAX_SCRIPT};

/// Who is asking.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub session: u32,
}

/// How the kernel should treat an open file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenMode {
    pub direct_io: bool,
    pub nonseekable: bool,
}

pub struct ExecTx {
    vm: Arc<Vm>,
    script: Vec<u8>,
    run: Option<Arc<Run>>,
    pos: u64,
    write_only: bool,
    session: u32,
}

pub enum OpenFile {
    Generated(Vec<u8>),
    Log(PathBuf),
    /// A capped log (`console`): offsets below the kept part are moved past it.
    CappedLog(PathBuf, crate::logcap::LogReader),
    RootCtl,
    VmCtl(Arc<Vm>),
    RunCtl(Arc<Run>),
    Defaults,
    Stream {
        run: Arc<Run>,
        stream: RunStream,
        pos: Mutex<u64>,
    },
    Stdin(Arc<Run>),
    Exec(tokio::sync::Mutex<ExecTx>),
    /// `events` or `<vm>/events`: the caller's view of the event log.
    Events(crate::eventview::EventsHandle),
}

pub struct Files {
    pub tree: Tree,
    events: crate::eventview::EventViews,
    handles: Mutex<HashMap<u64, Arc<OpenFile>>>,
    next_fh: AtomicU64,
}

fn slice_at(data: &[u8], offset: u64, size: u32) -> Vec<u8> {
    let start = (offset as usize).min(data.len());
    let end = start.saturating_add(size as usize).min(data.len());
    data[start..end].to_vec()
}

fn read_file_at(path: &std::path::Path, offset: u64, size: u32) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; size.min(4 * 1024 * 1024) as usize];
    let n = f.read_at(&mut buf, offset)?;
    buf.truncate(n);
    Ok(buf)
}

impl Files {
    pub fn new(tree: Tree) -> Self {
        Files {
            events: crate::eventview::EventViews::new(tree.mgr.events.path().to_path_buf()),
            tree,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    /// The size of an `events` file as `uid` sees it (None: not an events file).
    pub fn events_len(&self, node: &Node, uid: u32) -> Option<u64> {
        use crate::eventview::Filter;
        match node {
            Node::Events => Some(self.events.len(&Filter::for_uid(uid))),
            Node::VmFile(id, VmFile::Events) => Some(self.events.len(&Filter::Vm(id.clone()))),
            _ => None,
        }
    }

    fn handle(&self, fh: u64) -> Result<Arc<OpenFile>> {
        self.handles
            .lock()
            .get(&fh)
            .cloned()
            .ok_or_else(|| Error::new(libc::EBADF, "unknown file handle"))
    }

    /// Open `node`; `write`/`read` say what the open flags ask for.
    pub fn open(
        &self,
        node: &Node,
        read: bool,
        write: bool,
        caller: Caller,
    ) -> Result<(u64, OpenMode)> {
        self.tree.check(node)?;
        let direct = OpenMode {
            direct_io: true,
            nonseekable: false,
        };
        let stream = OpenMode {
            direct_io: true,
            nonseekable: true,
        };
        let ro = |what: &str| -> Result<()> {
            if write {
                Err(Error::read_only(what))
            } else {
                Ok(())
            }
        };
        let (file, mode) = match node {
            Node::Ctl => (OpenFile::RootCtl, direct),
            Node::Defaults => (OpenFile::Defaults, direct),
            Node::Events => {
                ro("events")?;
                let f = crate::eventview::Filter::for_uid(caller.uid);
                (OpenFile::Events(self.events.open(&f)), direct)
            }
            Node::VmFile(id, VmFile::Events) => {
                ro("events")?;
                let f = crate::eventview::Filter::Vm(self.tree.vm(id)?.id.clone());
                (OpenFile::Events(self.events.open(&f)), direct)
            }
            Node::Usage => {
                ro("usage")?;
                let text = self.tree.mgr.usage_text(caller.uid);
                (OpenFile::Generated(text.into_bytes()), direct)
            }
            Node::VmFile(id, VmFile::Console) => {
                ro("console")?;
                (
                    OpenFile::CappedLog(self.tree.vm(id)?.console_path(), Default::default()),
                    direct,
                )
            }
            Node::VmFile(id, VmFile::Ctl) => (OpenFile::VmCtl(self.tree.vm(id)?), direct),
            Node::VmFile(id, VmFile::Exec) => {
                let vm = self.tree.vm(id)?;
                let mut run = None;
                if write {
                    // Fail at open, where the shell reports it, rather than at close.
                    vm.require_running()?;
                } else {
                    run = vm.last_run(caller.session).and_then(|n| vm.run(n));
                }
                let tx = ExecTx {
                    vm,
                    script: Vec::new(),
                    run,
                    pos: 0,
                    write_only: write && !read,
                    session: caller.session,
                };
                (OpenFile::Exec(tokio::sync::Mutex::new(tx)), stream)
            }
            Node::RunFile(id, n, f) => {
                let run = self
                    .tree
                    .vm(id)?
                    .run(*n)
                    .ok_or_else(|| Error::not_found("no such run"))?;
                match f {
                    RunFile::Out(s) => {
                        ro(match s {
                            super::tree::RunStreamKey::Stdout => "stdout",
                            super::tree::RunStreamKey::Stderr => "stderr",
                            super::tree::RunStreamKey::Output => "output",
                        })?;
                        (
                            OpenFile::Stream {
                                run,
                                stream: (*s).into(),
                                pos: Mutex::new(0),
                            },
                            stream,
                        )
                    }
                    RunFile::Stdin => {
                        if read {
                            return Err(Error::new(libc::EACCES, "stdin is write-only"));
                        }
                        (OpenFile::Stdin(run), stream)
                    }
                    RunFile::Ctl => (OpenFile::RunCtl(run), direct),
                    _ => {
                        ro("this file")?;
                        let content = self.tree.generated(node)?.unwrap_or_default();
                        (OpenFile::Generated(content), direct)
                    }
                }
            }
            Node::Readme | Node::ImageInfo(_) | Node::SnapshotInfo(_) | Node::VmFile(..) => {
                ro("this file")?;
                let content = self.tree.generated(node)?.unwrap_or_default();
                (OpenFile::Generated(content), direct)
            }
            _ => return Err(Error::new(libc::EISDIR, "is a directory")),
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Arc::new(file));
        Ok((fh, mode))
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32, caller: Caller) -> Result<Vec<u8>> {
        let file = self.handle(fh)?;
        match &*file {
            OpenFile::Generated(c) => Ok(slice_at(c, offset, size)),
            OpenFile::Log(p) => read_file_at(p, offset, size),
            OpenFile::Events(h) => h.read(offset, size),
            OpenFile::CappedLog(p, reader) => {
                let mib = crate::limits::vm_caps().console_mib;
                reader.read(
                    p,
                    offset,
                    size,
                    &crate::logcap::cap_note(mib, "vm.console_mib"),
                )
            }
            OpenFile::RootCtl => Ok(slice_at(
                self.tree.mgr.ctl_results().get(caller.session).as_bytes(),
                offset,
                size,
            )),
            OpenFile::VmCtl(vm) => Ok(slice_at(
                vm.ctl_results().get(caller.session).as_bytes(),
                offset,
                size,
            )),
            OpenFile::RunCtl(_) | OpenFile::Stdin(_) => Ok(Vec::new()),
            OpenFile::Defaults => Ok(slice_at(
                self.tree.mgr.defaults().to_defaults().as_bytes(),
                offset,
                size,
            )),
            OpenFile::Stream { run, stream, pos } => {
                let at = *pos.lock();
                let data = read_run(run, *stream, at, size, caller.pid).await?;
                *pos.lock() = at + data.len() as u64;
                Ok(data)
            }
            OpenFile::Exec(tx) => {
                let mut tx = tx.lock().await;
                if tx.run.is_none() && !tx.script.is_empty() {
                    let script = std::mem::take(&mut tx.script);
                    let run = tx.vm.start_run(script, tx.session).await?;
                    tx.run = Some(run);
                }
                let Some(run) = tx.run.clone() else {
                    return Ok(Vec::new());
                };
                let data = read_run(&run, RunStream::Output, tx.pos, size, caller.pid).await?;
                tx.pos += data.len() as u64;
                Ok(data)
            }
        }
    }

    pub async fn write(&self, fh: u64, data: &[u8], caller: Caller) -> Result<u32> {
        let file = self.handle(fh)?;
        let len = data.len() as u32;
        match &*file {
            OpenFile::RootCtl => {
                let mgr = self.tree.mgr.clone();
                let text = ctl_text(data)?;
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    let outcome = mgr.global_ctl(line, caller.uid, caller.gid).await;
                    mgr.ctl_results().record(caller.session, outcome)?;
                }
                Ok(len)
            }
            OpenFile::VmCtl(vm) => {
                let text = ctl_text(data)?;
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    let outcome = self.tree.mgr.vm_ctl(vm, line).await;
                    vm.ctl_results().record(caller.session, outcome)?;
                }
                Ok(len)
            }
            OpenFile::RunCtl(run) => {
                let text = ctl_text(data)?;
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    match crate::ctl::parse_run(line)? {
                        crate::ctl::RunCmd::Kill(sig) => run.signal(sig).await?,
                        crate::ctl::RunCmd::CloseStdin => run.close_stdin().await?,
                    }
                }
                Ok(len)
            }
            OpenFile::Defaults => {
                // Each write is validated and applied on its own, so its error reaches it.
                self.tree.mgr.update_defaults(&ctl_text(data)?)?;
                Ok(len)
            }
            OpenFile::Stdin(run) => {
                for chunk in data.chunks(bandsox_agent::proto::MAX_CHUNK) {
                    run.write_stdin(chunk.to_vec()).await?;
                }
                Ok(len)
            }
            OpenFile::Exec(tx) => {
                let mut tx = tx.lock().await;
                if tx.run.is_some() {
                    return Err(Error::busy(
                        "this exec descriptor already ran its command; open exec again",
                    ));
                }
                if tx.script.len() + data.len() > MAX_SCRIPT {
                    return Err(Error::new(
                        libc::E2BIG,
                        format!("commands are limited to {MAX_SCRIPT} bytes"),
                    ));
                }
                tx.script.extend_from_slice(data);
                Ok(len)
            }
            OpenFile::Generated(_)
            | OpenFile::Log(_)
            | OpenFile::CappedLog(..)
            | OpenFile::Events(_)
            | OpenFile::Stream { .. } => Err(Error::read_only("this file")),
        }
    }

    /// `close()` of one descriptor. Starts a pending exec; a write-only exec waits for it.
    pub async fn flush(&self, fh: u64, caller: Caller) -> Result<()> {
        let file = self.handle(fh)?;
        let OpenFile::Exec(tx) = &*file else {
            return Ok(());
        };
        let mut tx = tx.lock().await;
        if tx.run.is_none() && !tx.script.is_empty() {
            let script = std::mem::take(&mut tx.script);
            let run = tx.vm.start_run(script, tx.session).await?;
            tx.run = Some(run);
        }
        // Only a write-only descriptor's close waits for its command.
        let run = match (&tx.run, tx.write_only) {
            (Some(run), true) => run.clone(),
            _ => return Ok(()),
        };
        drop(tx);
        let waited = interruptible(caller.pid, async {
            run.wait_finished().await;
            Ok(())
        })
        .await;
        if let Err(e) = &waited {
            if e.errno == libc::EINTR {
                let _ = run.signal(libc::SIGINT).await;
            }
        }
        waited
    }

    /// Last close: forget the handle; an exec never flushed still runs.
    pub fn release(&self, fh: u64) {
        let Some(file) = self.handles.lock().remove(&fh) else {
            return;
        };
        if let OpenFile::Exec(tx) = &*file {
            if let Ok(mut tx) = tx.try_lock() {
                if tx.run.is_none() && !tx.script.is_empty() {
                    let script = std::mem::take(&mut tx.script);
                    let vm = tx.vm.clone();
                    let session = tx.session;
                    tokio::spawn(async move {
                        if let Err(e) = vm.start_run(script, session).await {
                            tracing::warn!(vm = %vm.name, "exec on release failed: {e}");
                        }
                    });
                }
            }
        }
    }
}

/// Wait like a pipe for a run's stream, answering EINTR (and sending the command
/// SIGINT) if the reader is interrupted.
async fn read_run(
    run: &Arc<Run>,
    stream: RunStream,
    at: u64,
    size: u32,
    pid: u32,
) -> Result<Vec<u8>> {
    let size = size.min(4 * 1024 * 1024);
    let res = interruptible(pid, run.read_stream(stream, at, size)).await;
    if let Err(e) = &res {
        if e.errno == libc::EINTR && run.status().is_running() {
            let _ = run.signal(libc::SIGINT).await;
        }
    }
    res
}

fn ctl_text(data: &[u8]) -> Result<String> {
    String::from_utf8(data.to_vec()).map_err(|_| Error::invalid("commands must be UTF-8 text"))
}
