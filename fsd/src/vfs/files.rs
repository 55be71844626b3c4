//! Open files of the control tree and what reading and writing them means.
//!
//! Kinds of open file:
//! - *generated*: content snapshotted at open (`state`, `info`, `status`, ...); reads
//!   honour the kernel's offset.
//! - *logs* (`console`, `events`): read at the kernel's offset from a growing file, so
//!   `cat` ends at the current end and `tail -f` follows by size.
//! - *ctl* (`ctl`, `<vm>/ctl`, `runs/<n>/ctl`, `winsize`, `defaults`): lines that are
//!   commands (see `ctlfile`).
//! - *streams* (`runs/<n>/stdout|stderr|output`, and `exec` once it has a run): a private
//!   read position; reads wait like a pipe until data or the end of the command; a
//!   command's `stdin` and `terminal` (see `streams`).
//! - *exec*: a transaction (see `exec`): the script collected from the writes runs
//!   at the close of a process that wrote it, or at the first read.
//!
//! Writes to ctl files and exec must continue where the previous write on the same
//! descriptor ended (any offset for the first one): `write(2)`, `O_APPEND` and an
//! appending `pwrite` (sftp-server, NFS servers) work; any other offset is `ESPIPE`.
//!
//! Every wait is interruptible (see `interrupt`); an interrupted wait on a command sends
//! it SIGINT, like a terminal would.
//!
//! Memory: every open file holds a reservation of the caller's `buffer_mib` (see
//! `limits`) for what it keeps — [`HANDLE_BYTES`], the content rendered at open, an
//! unterminated `ctl` line, an unstarted `exec` script, a terminal's redraw — resized
//! as that grows or shrinks and returned at release; a write to a command's `stdin` or
//! `terminal` holds its bytes while it waits. An `exec` descriptor counts as a running
//! command of the VM's owner (`runs`, and `terminal_cells` once its options line asked
//! for a terminal) from its first write. Whatever does not fit fails with EDQUOT
//! (EAGAIN for a host-wide limit) before anything is kept, and a refused `exec` never
//! runs.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::ctlfile::CtlFile;
use super::exec::ExecTx;
use super::streams::{read_run, write_input, TermFile};
use super::tree::{Node, RunFile, Tree, VmFile};
use crate::error::{Error, Result};
use crate::limits::{Amounts, Reservation, HANDLE_BYTES};
use crate::manager::ctl::Target;
use crate::manager::runs::{Run, RunStream};

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

/// The threads that wrote to one open file description (a few; more are folded).
#[derive(Default)]
pub(super) struct Writers(Vec<u32>);

impl Writers {
    pub(super) fn note(&mut self, pid: u32) {
        if !self.0.contains(&pid) && self.0.len() < 16 {
            self.0.push(pid);
        }
    }
    /// Whether `pid` belongs to a process that wrote (every closer counts once more
    /// than 16 threads wrote).
    pub(super) fn includes(&self, pid: u32) -> bool {
        self.0.len() >= 16
            || self.0.contains(&pid)
            || self
                .0
                .iter()
                .any(|&w| crate::interrupt::same_process(w, pid))
    }
}

/// An open file and what it holds of its opener's `buffer_mib`.
pub struct Handle {
    file: OpenFile,
    hold: Reservation,
}

impl Handle {
    /// Hold `bytes` besides the handle itself from now on (see the module docs).
    pub(super) fn hold_bytes(&self, bytes: usize) -> Result<()> {
        self.hold
            .resize(Amounts::buffer(HANDLE_BYTES + bytes as u64))
    }
}

impl OpenFile {
    /// Bytes of content this file keeps from its open on.
    fn content_len(&self) -> usize {
        match self {
            OpenFile::Generated(c) => c.len(),
            _ => 0,
        }
    }
}

pub enum OpenFile {
    Generated(Vec<u8>),
    Log(PathBuf),
    Ctl(CtlFile),
    /// A capped log (`console`): offsets below the kept part are moved past it.
    CappedLog(PathBuf, crate::logcap::LogReader),
    Stream {
        run: Arc<Run>,
        stream: RunStream,
        pos: Mutex<u64>,
    },
    Stdin(Arc<Run>),
    Terminal(TermFile),
    Exec(tokio::sync::Mutex<ExecTx>),
    /// `events` or `<vm>/events`: the caller's view of the event log.
    Events(crate::eventview::EventsHandle),
}

pub struct Files {
    pub(super) tree: Tree,
    /// Root `mkdir`/`rmdir` in flight (root-name invalidations wait for them).
    pub(super) root_ops: Arc<super::rootops::RootOps>,
    events: crate::eventview::EventViews,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
}

pub(super) fn slice_at(data: &[u8], offset: u64, size: u32) -> Vec<u8> {
    let start = usize::try_from(offset).map_or(data.len(), |o| o.min(data.len()));
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
            events: crate::eventview::EventViews::new(tree.mgr().events.path().to_path_buf()),
            tree,
            root_ops: Default::default(),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    /// The per-reader views of the event log (shared with other adapters).
    pub fn event_views(&self) -> &crate::eventview::EventViews {
        &self.events
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

    fn handle(&self, fh: u64) -> Result<Arc<Handle>> {
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
        let ctl = |target| OpenFile::Ctl(CtlFile::new(target, caller.session));
        let (file, mode) = match node {
            Node::Ctl => (ctl(Target::Root), direct),
            Node::Defaults => (ctl(Target::Defaults), direct),
            Node::Pools if write && caller.uid != 0 => {
                return Err(Error::new(libc::EACCES, "only root configures pools"));
            }
            Node::Pools => (OpenFile::Ctl(CtlFile::pools(caller.session, write)), direct),
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
                let text = self.tree.mgr().usage_text(caller.uid);
                (OpenFile::Generated(text.into_bytes()), direct)
            }
            Node::VmFile(id, VmFile::Console) => {
                ro("console")?;
                (
                    OpenFile::CappedLog(self.tree.vm(id)?.console_path(), Default::default()),
                    direct,
                )
            }
            Node::VmFile(id, VmFile::Ctl) => (ctl(Target::Vm(self.tree.vm(id)?)), direct),
            Node::VmFile(id, VmFile::Exec) => {
                let vm = self.tree.vm(id)?;
                let mut run = None;
                if write {
                    // Fail at open, where the shell reports it, rather than at close
                    // (a VM being adopted may still run: the start waits for it).
                    vm.require_running_or_adopting()?;
                } else {
                    run = vm.last_run(caller.session).and_then(|n| vm.run(n));
                }
                let tx = ExecTx::new(vm, run, write && !read, caller.session);
                // Seekable (not a stream) so that an appending pwrite reaches us; reads
                // keep their own position whatever the offset.
                (OpenFile::Exec(tokio::sync::Mutex::new(tx)), direct)
            }
            Node::RunFile(id, n, f) => {
                let run = self
                    .tree
                    .vm(id)?
                    .run(*n)
                    .ok_or_else(|| Error::not_found("no such run"))?;
                match f {
                    RunFile::Out(s) => {
                        ro(s.file_name())?;
                        (
                            OpenFile::Stream {
                                run,
                                stream: *s,
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
                    RunFile::Ctl => (ctl(Target::Run(run)), direct),
                    RunFile::Winsize => (ctl(Target::Winsize(run)), direct),
                    RunFile::Terminal => (OpenFile::Terminal(TermFile::new(run)), stream),
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
        let bytes = HANDLE_BYTES + file.content_len() as u64;
        let hold = self
            .tree
            .mgr()
            .limits
            .hold(caller.uid, Amounts::buffer(bytes))?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .insert(fh, Arc::new(Handle { file, hold }));
        Ok((fh, mode))
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32, caller: Caller) -> Result<Vec<u8>> {
        let handle = self.handle(fh)?;
        match &handle.file {
            OpenFile::Generated(c) => Ok(slice_at(c, offset, size)),
            OpenFile::Log(p) => read_file_at(p, offset, size),
            OpenFile::Ctl(ctl) => Ok(ctl.read(self.tree.mgr(), offset, size, caller.session)),
            OpenFile::Stdin(_) => Ok(Vec::new()),
            OpenFile::Terminal(t) => t.read(&handle, size, caller.pid).await,
            OpenFile::Events(h) => h.read(offset, size),
            OpenFile::CappedLog(p, reader) => {
                let mib = self.tree.mgr().limits.vm_caps().console_mib;
                reader.read(
                    p,
                    offset,
                    size,
                    &crate::logcap::cap_note(mib, "vm.console_mib"),
                )
            }
            OpenFile::Stream { run, stream, pos } => {
                let at = *pos.lock();
                let data = read_run(run, *stream, at, size, caller.pid).await?;
                *pos.lock() = at + data.len() as u64;
                Ok(data)
            }
            OpenFile::Exec(tx) => tx.lock().await.read(&handle, size, caller.pid).await,
        }
    }

    /// A write at `offset` (see the module docs for what each kind of file does).
    pub async fn write(&self, fh: u64, offset: u64, data: &[u8], caller: Caller) -> Result<u32> {
        let handle = self.handle(fh)?;
        // The kernel's writes are at most `max_write` (1 MiB).
        let len = u32::try_from(data.len())
            .map_err(|_| Error::new(libc::EFBIG, "a single write of 4 GiB or more"))?;
        match &handle.file {
            OpenFile::Ctl(ctl) => ctl
                .write(self.tree.mgr(), &handle, offset, data, caller)
                .await
                .map(|()| len),
            OpenFile::Stdin(run) => {
                // Waits like a pipe while the command does not read; Ctrl-C ends the wait.
                let _held = self.hold_write(caller, data)?;
                write_input(run, data, caller.pid).await.map(|()| len)
            }
            OpenFile::Terminal(t) => {
                // Keystrokes: wait like a pipe while the guest does not read them;
                // a finished run answers EPIPE.
                let _held = self.hold_write(caller, data)?;
                write_input(t.run(), data, caller.pid).await.map(|()| len)
            }
            OpenFile::Exec(tx) => tx
                .lock()
                .await
                .write(&handle, offset, data, caller.pid)
                .map(|()| len),
            OpenFile::Generated(_)
            | OpenFile::Log(_)
            | OpenFile::CappedLog(..)
            | OpenFile::Events(_)
            | OpenFile::Stream { .. } => Err(Error::read_only("this file")),
        }
    }

    /// `close()` of one descriptor. Runs a control file's final unterminated line and
    /// starts a pending exec, when the closing process wrote to the descriptor and is
    /// not being killed; a write-only exec waits for its command and reports a lost run.
    pub async fn flush(&self, fh: u64, caller: Caller) -> Result<()> {
        let handle = self.handle(fh)?;
        match &handle.file {
            OpenFile::Ctl(ctl) => ctl.flush(self.tree.mgr(), caller).await,
            OpenFile::Exec(tx) => super::exec::flush(tx, &handle, caller).await,
            _ => Ok(()),
        }
    }

    /// Hold the bytes of a write to a command's input while it waits for the command.
    fn hold_write(&self, caller: Caller, data: &[u8]) -> Result<Reservation> {
        self.tree
            .mgr()
            .limits
            .hold(caller.uid, Amounts::buffer(data.len() as u64))
    }

    /// `fsync` of a control file: for an exec whose run was lost, the same errno its
    /// close reports; otherwise nothing to do.
    pub async fn fsync(&self, fh: u64) -> Result<()> {
        let handle = self.handle(fh)?;
        match &handle.file {
            OpenFile::Exec(tx) => tx.lock().await.fsync(),
            _ => Ok(()),
        }
    }

    /// Last close: forget the handle. An exec never flushed still runs (unless it was
    /// refused); a control file's unterminated line that no writer's close ran is
    /// dropped, and the caller's `ctl` result says so.
    pub fn release(&self, fh: u64) {
        let Some(handle) = self.handles.lock().remove(&fh) else {
            return;
        };
        match &handle.file {
            OpenFile::Exec(tx) => {
                if let Ok(mut tx) = tx.try_lock() {
                    tx.release(&handle);
                }
            }
            OpenFile::Ctl(ctl) => ctl.release(self.tree.mgr()),
            _ => {}
        }
    }
}
