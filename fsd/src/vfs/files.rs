//! Open files of the control tree and what reading and writing them means.
//!
//! Kinds of open file:
//! - *generated*: content snapshotted at open (`state`, `info`, `status`, ...); reads
//!   honour the kernel's offset.
//! - *logs* (`console`, `events`): read at the kernel's offset from a growing file, so
//!   `cat` ends at the current end and `tail -f` follows by size.
//! - *ctl* (`ctl`, `<vm>/ctl`, `runs/<n>/ctl`, `defaults`): bytes are assembled into
//!   lines per open file description ([`crate::lines`]); each complete line is one
//!   command, executed before the `write` that completed it returns, so a bad command
//!   fails that write with its errno. A final line without a newline runs at `close`
//!   (the flush of a process that wrote to the description, unless a signal is killing
//!   it). Reading gives the caller session's last result.
//! - *streams* (`runs/<n>/stdout|stderr|output`, and `exec` once it has a run): a private
//!   read position; reads wait like a pipe until data or the end of the command.
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

use super::exec::ExecTx;
use super::tree::{Node, RunFile, Tree, VmFile};
use crate::error::{Error, Result};
use crate::interrupt::interruptible;
use crate::limits::{Amounts, Reservation, HANDLE_BYTES};
use crate::lines::LineBuffer;
use crate::manager::runs::{Run, RunStream};
use crate::manager::vm::Vm;

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

/// What a control file's lines are commands for.
pub enum CtlTarget {
    Root,
    Vm(Arc<Vm>),
    Run(Arc<Run>),
    /// A terminal run's `winsize`: lines are `COLSxROWS`.
    Winsize(Arc<Run>),
    Defaults,
    /// `pools`: the lines of every write are gathered; a close that has lines makes
    /// them the pools, and the last close of a descriptor opened for writing that never
    /// applied any (`: > pools`) removes every pool.
    Pools {
        lines: parking_lot::Mutex<Vec<String>>,
        write: bool,
        applied: std::sync::atomic::AtomicBool,
    },
}

/// An open `runs/<n>/terminal`: reads give a redraw of the screen as it was at the
/// first read, then the terminal's output from exactly that point on.
pub struct TermFile {
    run: Arc<Run>,
    state: tokio::sync::Mutex<Option<TermPos>>,
}

struct TermPos {
    redraw: Vec<u8>,
    /// Bytes of `redraw` already returned.
    sent: usize,
    /// Position in the run's `stdout`.
    offset: u64,
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

/// One open control file: its target and the line assembly of this description.
pub struct CtlFile {
    target: CtlTarget,
    session: u32,
    state: tokio::sync::Mutex<CtlState>,
}

#[derive(Default)]
struct CtlState {
    lines: LineBuffer,
    writers: Writers,
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

fn slice_at(data: &[u8], offset: u64, size: u32) -> Vec<u8> {
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
        let ctl = |target| {
            OpenFile::Ctl(CtlFile {
                target,
                session: caller.session,
                state: Default::default(),
            })
        };
        let (file, mode) = match node {
            Node::Ctl => (ctl(CtlTarget::Root), direct),
            Node::Defaults => (ctl(CtlTarget::Defaults), direct),
            Node::Pools if write && caller.uid != 0 => {
                return Err(Error::new(libc::EACCES, "only root configures pools"));
            }
            Node::Pools => (
                ctl(CtlTarget::Pools {
                    lines: Default::default(),
                    write,
                    applied: Default::default(),
                }),
                direct,
            ),
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
            Node::VmFile(id, VmFile::Ctl) => (ctl(CtlTarget::Vm(self.tree.vm(id)?)), direct),
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
                    RunFile::Ctl => (ctl(CtlTarget::Run(run)), direct),
                    RunFile::Winsize => (ctl(CtlTarget::Winsize(run)), direct),
                    RunFile::Terminal => (
                        OpenFile::Terminal(TermFile {
                            run,
                            state: Default::default(),
                        }),
                        stream,
                    ),
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
            OpenFile::Ctl(ctl) => match &ctl.target {
                CtlTarget::Root => Ok(slice_at(
                    self.tree.mgr().ctl_results().get(caller.session).as_bytes(),
                    offset,
                    size,
                )),
                CtlTarget::Vm(vm) => Ok(slice_at(
                    vm.ctl_results().get(caller.session).as_bytes(),
                    offset,
                    size,
                )),
                CtlTarget::Run(_) => Ok(Vec::new()),
                CtlTarget::Winsize(run) => Ok(slice_at(
                    run.tty_size()
                        .map(crate::manager::runs::render_size)
                        .unwrap_or_default()
                        .as_bytes(),
                    offset,
                    size,
                )),
                CtlTarget::Defaults => Ok(slice_at(
                    self.tree.mgr().defaults().to_defaults().as_bytes(),
                    offset,
                    size,
                )),
                CtlTarget::Pools { .. } => Ok(slice_at(
                    self.tree.mgr().pools_text().as_bytes(),
                    offset,
                    size,
                )),
            },
            OpenFile::Stdin(_) => Ok(Vec::new()),
            OpenFile::Terminal(t) => read_terminal(t, &handle, size, caller.pid).await,
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
            OpenFile::Ctl(ctl) => {
                let mut st = ctl.state.lock().await;
                if let Err(e) = st.lines.check_offset(offset) {
                    return Err(self.record(ctl, caller.session, e));
                }
                st.writers.note(caller.pid);
                let lines = match st.lines.push(data) {
                    Ok(l) => l,
                    Err(e) => return Err(self.record(ctl, caller.session, e)),
                };
                // The unterminated rest is kept only if the caller's buffers hold it;
                // otherwise this write runs nothing, like an overlong line.
                if let Err(e) = handle.hold_bytes(st.lines.held()) {
                    st.lines.abandon();
                    let _ = handle.hold_bytes(0);
                    return Err(self.record(ctl, caller.session, e));
                }
                let ran = self.run_lines(ctl, &mut st.lines, lines, caller).await;
                let _ = handle.hold_bytes(st.lines.held());
                ran?;
                st.lines.advance(offset, data.len());
                Ok(len)
            }
            OpenFile::Stdin(run) => {
                // Waits like a pipe while the command does not read; Ctrl-C ends the wait.
                let _held = self.hold_write(caller, data)?;
                interruptible(caller.pid, async {
                    for chunk in data.chunks(bandsox_agent::proto::MAX_CHUNK) {
                        run.write_stdin(chunk.to_vec()).await?;
                    }
                    Ok(())
                })
                .await?;
                Ok(len)
            }
            OpenFile::Terminal(t) => {
                // Keystrokes: wait like a pipe while the guest does not read them;
                // a finished run answers EPIPE.
                let _held = self.hold_write(caller, data)?;
                interruptible(caller.pid, async {
                    for chunk in data.chunks(bandsox_agent::proto::MAX_CHUNK) {
                        t.run.write_stdin(chunk.to_vec()).await?;
                    }
                    Ok(())
                })
                .await?;
                Ok(len)
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

    /// Remember a failed control-file write in the caller's `ctl` result, pass it on.
    fn record(&self, ctl: &CtlFile, session: u32, e: Error) -> Error {
        match &ctl.target {
            CtlTarget::Root => {
                let _ = self
                    .tree
                    .mgr()
                    .ctl_results()
                    .record(session, Err(e.clone()));
            }
            CtlTarget::Vm(vm) => {
                let _ = vm.ctl_results().record(session, Err(e.clone()));
            }
            CtlTarget::Run(_)
            | CtlTarget::Winsize(_)
            | CtlTarget::Defaults
            | CtlTarget::Pools { .. } => {}
        }
        e
    }

    /// Run the complete lines one write (or the final close) produced. Every line is
    /// checked first (UTF-8, syntax), so a write with a malformed line runs nothing;
    /// then they run in order and the first failing one stops the rest (see
    /// `docs/tree.md`, "Writing control files").
    async fn run_lines(
        &self,
        ctl: &CtlFile,
        buf: &mut LineBuffer,
        lines: Vec<Vec<u8>>,
        caller: Caller,
    ) -> Result<()> {
        let mut texts = Vec::with_capacity(lines.len());
        for l in &lines {
            match std::str::from_utf8(l) {
                Ok(t) if !t.trim().is_empty() && !t.trim_start().starts_with('#') => texts.push(t),
                Ok(_) => {}
                Err(_) => {
                    buf.abandon();
                    let e = Error::invalid("commands must be UTF-8 text; nothing was run");
                    return Err(self.record(ctl, caller.session, e));
                }
            }
        }
        let n = texts.len();
        let in_context = |i: usize, e: Error, ran: bool| -> Error {
            if n <= 1 {
                return e;
            }
            let applied = match (ran, i) {
                (false, _) => "nothing was run".to_string(),
                (true, 0) => "no line before it was run".to_string(),
                (true, 1) => "line 1 was applied".to_string(),
                (true, i) => format!("lines 1-{i} were applied"),
            };
            let msg = format!(
                "line {} of {n}: {} ({applied}; the lines after it were not run)",
                i + 1,
                e.message
            );
            Error::new(e.errno, msg)
        };
        // Syntax first: parsing has no side effects.
        for (i, t) in texts.iter().enumerate() {
            let parsed = match &ctl.target {
                CtlTarget::Root => crate::ctl::parse_global(t).map(drop),
                CtlTarget::Vm(_) => crate::ctl::parse_vm(t).map(drop),
                CtlTarget::Run(_) => crate::ctl::parse_run(t).map(drop),
                CtlTarget::Winsize(_) => crate::manager::execopts::parse_size(t).map(drop),
                CtlTarget::Defaults => Ok(()),
                CtlTarget::Pools { .. } => self.tree.mgr().check_pool_line(t),
            };
            if let Err(e) = parsed {
                buf.abandon();
                let e = in_context(i, e, false);
                return Err(self.record(ctl, caller.session, e));
            }
        }
        if let CtlTarget::Pools { lines, .. } = &ctl.target {
            // Applied at close (see `flush`), all lines together.
            lines.lock().extend(texts.iter().map(|t| t.to_string()));
            return Ok(());
        }
        if let CtlTarget::Defaults = ctl.target {
            // The lines of one write are merged together or not at all.
            if n > 0 {
                if let Err(e) = self.tree.mgr().update_defaults(&texts.join("\n")) {
                    buf.abandon();
                    return Err(e);
                }
            }
            return Ok(());
        }
        for (i, line) in texts.iter().enumerate() {
            let outcome = match &ctl.target {
                CtlTarget::Root | CtlTarget::Vm(_) => {
                    self.run_interruptible(ctl, line, caller).await
                }
                CtlTarget::Run(run) => {
                    let cmd = crate::ctl::parse_run(line)?;
                    interruptible(caller.pid, async {
                        match cmd {
                            crate::ctl::RunCmd::Kill(sig) => run.signal(sig).await,
                            crate::ctl::RunCmd::CloseStdin => run.close_stdin().await,
                        }
                    })
                    .await
                    .map(|()| String::new())
                }
                CtlTarget::Winsize(run) => {
                    let size = crate::manager::execopts::parse_size(line)?;
                    interruptible(caller.pid, run.resize(size))
                        .await
                        .map(|()| String::new())
                }
                CtlTarget::Defaults | CtlTarget::Pools { .. } => Ok(String::new()),
            };
            match outcome {
                Ok(msg) => {
                    if !matches!(ctl.target, CtlTarget::Run(_) | CtlTarget::Winsize(_)) {
                        let _ = self.record_ok(ctl, caller.session, msg);
                    }
                }
                Err(e) => {
                    buf.abandon();
                    let e = in_context(i, e, true);
                    return Err(self.record(ctl, caller.session, e));
                }
            }
        }
        Ok(())
    }

    /// One root or VM command, run as a task of its own: an interrupted writer gets
    /// EINTR at once, the command goes on (a boot or a pull is not cut in half) and its
    /// result replaces the writer's `ctl` result when it ends.
    async fn run_interruptible(&self, ctl: &CtlFile, line: &str, caller: Caller) -> Result<String> {
        let mgr = self.tree.mgr().clone();
        let line = line.to_string();
        let (session, target_vm) = match &ctl.target {
            CtlTarget::Vm(vm) => (caller.session, Some(vm.clone())),
            _ => (caller.session, None),
        };
        let results_vm = target_vm.clone();
        let results_mgr = mgr.clone();
        let op = async move {
            match &target_vm {
                Some(vm) => mgr.vm_ctl(vm, &line).await,
                None => mgr.global_ctl(&line, caller.uid, caller.gid).await,
            }
        };
        let abandoned = move |outcome: Result<String>| {
            let _ = match &results_vm {
                Some(vm) => vm.ctl_results().record(session, outcome),
                None => results_mgr.ctl_results().record(session, outcome),
            };
        };
        match crate::interrupt::detachable(caller.pid, op, abandoned).await {
            Ok(outcome) => outcome,
            Err(e) if e.errno == libc::EINTR => Err(Error::new(
                libc::EINTR,
                "interrupted; the command goes on, and reading ctl shows its result when it ends",
            )),
            Err(e) => Err(e),
        }
    }

    fn record_ok(&self, ctl: &CtlFile, session: u32, msg: String) -> Result<String> {
        match &ctl.target {
            CtlTarget::Root => self.tree.mgr().ctl_results().record(session, Ok(msg)),
            CtlTarget::Vm(vm) => vm.ctl_results().record(session, Ok(msg)),
            _ => Ok(msg),
        }
    }

    /// `close()` of one descriptor. Runs a control file's final unterminated line and
    /// starts a pending exec, when the closing process wrote to the descriptor and is
    /// not being killed; a write-only exec waits for its command and reports a lost run.
    pub async fn flush(&self, fh: u64, caller: Caller) -> Result<()> {
        let handle = self.handle(fh)?;
        match &handle.file {
            OpenFile::Ctl(ctl) => {
                self.flush_ctl(ctl, caller).await?;
                match &ctl.target {
                    CtlTarget::Pools {
                        lines,
                        write: true,
                        applied,
                    } => {
                        // A close before any write (a shell's dup2) applies nothing.
                        let lines = std::mem::take(&mut *lines.lock());
                        if lines.is_empty() {
                            return Ok(());
                        }
                        applied.store(true, std::sync::atomic::Ordering::SeqCst);
                        self.tree.mgr().set_pools(&lines)
                    }
                    _ => Ok(()),
                }
            }
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

    async fn flush_ctl(&self, ctl: &CtlFile, caller: Caller) -> Result<()> {
        let mut st = ctl.state.lock().await;
        if !st.lines.has_partial() || !st.writers.includes(caller.pid) {
            return Ok(());
        }
        if crate::interrupt::killed_by_signal(caller.pid) {
            if let Some(line) = st.lines.discard_partial() {
                let e = Error::new(
                    libc::EINTR,
                    format!(
                        "the writer was killed in the middle of the line {}; it was not run",
                        crate::lines::quote(&String::from_utf8_lossy(&line))
                    ),
                );
                let _ = self.record(ctl, caller.session, e);
            }
            return Ok(());
        }
        let Some(line) = st.lines.take_final() else {
            return Ok(());
        };
        self.run_lines(ctl, &mut st.lines, vec![line], caller).await
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
                    tx.release();
                }
            }
            OpenFile::Ctl(ctl) => {
                if let Ok(mut st) = ctl.state.try_lock() {
                    if let Some(line) = st.lines.discard_partial() {
                        let e = Error::invalid(format!(
                            "the unterminated line {} was dropped: no process that wrote it \
                             closed the file",
                            crate::lines::quote(&String::from_utf8_lossy(&line))
                        ));
                        let _ = self.record(ctl, ctl.session, e);
                    }
                }
                if let CtlTarget::Pools {
                    write: true,
                    applied,
                    ..
                } = &ctl.target
                {
                    if !applied.load(std::sync::atomic::Ordering::SeqCst) {
                        // Emptied: no pool remains (removal spawns nothing).
                        if let Err(e) = self.tree.mgr().set_pools(&[]) {
                            tracing::warn!("emptying pools failed: {e}");
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// A read of `runs/<n>/terminal`: first the redraw of the screen as it was at the first
/// read, then live output from that offset; EOF once the run ended and all was read.
/// An interrupted reader gets EINTR; the command is not signalled (on a terminal,
/// Ctrl-C is a keystroke, written to the terminal).
async fn read_terminal(t: &TermFile, handle: &Handle, size: u32, pid: u32) -> Result<Vec<u8>> {
    let mut st = t.state.lock().await;
    if st.is_none() {
        let (_, redraw, offset) = t
            .run
            .terminal_snapshot()?
            .ok_or_else(|| Error::new(libc::ENOTTY, "this run has no terminal"))?;
        // The redraw is kept until it was read: it counts as the reader's buffer.
        handle.hold_bytes(redraw.len())?;
        *st = Some(TermPos {
            redraw,
            sent: 0,
            offset,
        });
    }
    let Some(pos) = st.as_mut() else {
        return Ok(Vec::new());
    };
    let size = size.min(4 * 1024 * 1024);
    if pos.sent < pos.redraw.len() {
        let end = pos.sent.saturating_add(size as usize).min(pos.redraw.len());
        let out = pos.redraw[pos.sent..end].to_vec();
        pos.sent = end;
        if end == pos.redraw.len() {
            pos.redraw = Vec::new();
            pos.sent = 0;
            let _ = handle.hold_bytes(0);
        }
        return Ok(out);
    }
    let data = interruptible(pid, t.run.read_stream(RunStream::Stdout, pos.offset, size)).await?;
    pos.offset += data.len() as u64;
    Ok(data)
}

/// Wait like a pipe for a run's stream, answering EINTR (and sending the command
/// SIGINT) if the reader is interrupted.
pub(super) async fn read_run(
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
