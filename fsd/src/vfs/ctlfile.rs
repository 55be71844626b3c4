//! An open control file (`ctl`, `<vm>/ctl`, `runs/<n>/ctl`, `runs/<n>/winsize`,
//! `defaults`, `pools`): line assembly per open file description, and what its lines do.
//!
//! Bytes are assembled into lines ([`crate::lines`]); each complete line is one
//! command, executed before the `write` that completed it returns, so a bad command
//! fails that write with its errno. A final line without a newline runs at `close` (the
//! flush of a process that wrote to the description, unless a signal is killing it).
//! Reading gives the caller session's last result (`winsize`: the terminal's size,
//! `defaults`: the defaults).
//!
//! Invariants:
//! - Every line of a write is parsed once, into a typed command
//!   ([`crate::manager::ctl::Command`]), before the first one runs; a write with a
//!   malformed line runs nothing. The commands then run in order through the one
//!   dispatch (`Manager::execute`), and the first failing one stops the rest.
//! - Every outcome shown in `cat ctl` (a result, a refused write, a line dropped
//!   unrun) is recorded through a [`Journal`], the one recording path.
//! - `pools` lines are checked as they are written and gathered; at the close of a
//!   process that wrote them they become the pools, all together; the last close of a
//!   description opened for writing that never applied a line (`: > pools`) removes
//!   every pool.
//! - A root or VM command runs as a task of its own: an interrupted writer gets EINTR
//!   at once, the command goes on (a boot or a pull is not cut in half) and its result
//!   replaces the writer's `ctl` result when it ends.
use std::sync::Arc;

use super::files::{slice_at, Caller, Handle, Writers};
use super::journal::{Journal, Scope};
use crate::error::{Error, Result};
use crate::interrupt::interruptible;
use crate::lines::{quote, LineBuffer};
use crate::manager::ctl::{parse, Command, Target};
use crate::manager::{Manager, ManagerApi};

/// One open control file: its target and the line assembly of this description.
pub struct CtlFile {
    target: Target,
    /// The opener's session (whose result a line dropped at release replaces).
    session: u32,
    state: tokio::sync::Mutex<CtlState>,
    /// `pools` opened for writing: what its lines will become.
    pools: Option<PoolsWrite>,
}

/// The lines written to one open `pools`, applied together at close.
#[derive(Default)]
struct PoolsWrite {
    lines: parking_lot::Mutex<Vec<String>>,
    applied: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct CtlState {
    lines: LineBuffer,
    writers: Writers,
}

/// `e` for line `i` of the `n` lines of one write (`ran`: the lines before it ran).
fn in_context(n: usize, i: usize, e: Error, ran: bool) -> Error {
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
}

impl CtlFile {
    pub(super) fn new(target: Target, session: u32) -> CtlFile {
        CtlFile {
            target,
            session,
            state: Default::default(),
            pools: None,
        }
    }

    /// An open `pools` (`write`: opened for writing, which root alone may).
    pub(super) fn pools(session: u32, write: bool) -> CtlFile {
        CtlFile {
            pools: write.then(PoolsWrite::default),
            ..CtlFile::new(Target::Pools, session)
        }
    }

    /// A journal of one outcome of `session` on this file.
    fn journal(&self, mgr: &Arc<Manager>, session: u32) -> Journal {
        let scope = match &self.target {
            Target::Root => Scope::Root(mgr.clone() as Arc<dyn ManagerApi>),
            Target::Vm(vm) => Scope::Vm(vm.clone()),
            Target::Run(_) | Target::Winsize(_) | Target::Defaults | Target::Pools => {
                Scope::Unshown
            }
        };
        Journal::new(scope, session, None)
    }

    /// A read: the caller session's last result (or the file's value).
    pub(super) fn read(&self, mgr: &Manager, offset: u64, size: u32, session: u32) -> Vec<u8> {
        let text = match &self.target {
            Target::Root => mgr.ctl_results().get(session),
            Target::Vm(vm) => vm.ctl_results().get(session),
            Target::Run(_) => String::new(),
            Target::Winsize(run) => run
                .tty_size()
                .map(crate::manager::runs::render_size)
                .unwrap_or_default(),
            Target::Defaults => mgr.defaults().to_defaults(),
            Target::Pools => mgr.pools_text(),
        };
        slice_at(text.as_bytes(), offset, size)
    }

    /// A write at `offset`: runs the lines it completes.
    pub(super) async fn write(
        &self,
        mgr: &Arc<Manager>,
        handle: &Handle,
        offset: u64,
        data: &[u8],
        caller: Caller,
    ) -> Result<()> {
        let mut st = self.state.lock().await;
        if let Err(e) = st.lines.check_offset(offset) {
            return Err(self.journal(mgr, caller.session).refuse(e));
        }
        st.writers.note(caller.pid);
        let lines = match st.lines.push(data) {
            Ok(l) => l,
            Err(e) => return Err(self.journal(mgr, caller.session).refuse(e)),
        };
        // The unterminated rest is kept only if the caller's buffers hold it;
        // otherwise this write runs nothing, like an overlong line.
        if let Err(e) = handle.hold_bytes(st.lines.held()) {
            st.lines.abandon();
            let _ = handle.hold_bytes(0);
            return Err(self.journal(mgr, caller.session).refuse(e));
        }
        let ran = self.run_lines(mgr, &mut st.lines, lines, caller).await;
        // Shrinking what is held cannot fail.
        let _ = handle.hold_bytes(st.lines.held());
        ran?;
        st.lines.advance(offset, data.len());
        Ok(())
    }

    /// Parse the complete lines one write (or the final close) produced, then run them
    /// (see the module docs and `docs/tree.md`, "Writing control files").
    async fn run_lines(
        &self,
        mgr: &Arc<Manager>,
        buf: &mut LineBuffer,
        lines: Vec<Vec<u8>>,
        caller: Caller,
    ) -> Result<()> {
        let cmds = match self.parse_lines(&lines) {
            Ok(cmds) => cmds,
            Err(e) => {
                buf.abandon();
                return Err(self.journal(mgr, caller.session).refuse(e));
            }
        };
        let n = cmds.len();
        for (i, cmd) in cmds.into_iter().enumerate() {
            let journal = self.journal(mgr, caller.session);
            let pool_line = match &cmd {
                Command::PoolLine(line) => Some(line.clone()),
                _ => None,
            };
            let outcome = self.execute(mgr, &journal, cmd, caller).await;
            if let (Ok(_), Some(line), Some(p)) = (&outcome, pool_line, &self.pools) {
                p.lines.lock().push(line);
            }
            let outcome = outcome.map_err(|e| in_context(n, i, e, true));
            if outcome.is_err() {
                buf.abandon();
            }
            journal.finish(outcome)?;
        }
        Ok(())
    }

    /// Every line of one write as a command (blank and `#` lines are skipped; the
    /// lines of one write to `defaults` are one command, merged together or not at
    /// all); the first bad line fails them all.
    fn parse_lines(&self, lines: &[Vec<u8>]) -> Result<Vec<Command>> {
        let mut texts = Vec::with_capacity(lines.len());
        for l in lines {
            match std::str::from_utf8(l) {
                Ok(t) if !t.trim().is_empty() && !t.trim_start().starts_with('#') => texts.push(t),
                Ok(_) => {}
                Err(_) => {
                    return Err(Error::invalid(
                        "commands must be UTF-8 text; nothing was run",
                    ))
                }
            }
        }
        if let Target::Defaults = self.target {
            if texts.is_empty() {
                return Ok(Vec::new());
            }
            return Ok(vec![parse(&self.target, &texts.join("\n"))?]);
        }
        let n = texts.len();
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| parse(&self.target, t).map_err(|e| in_context(n, i, e, false)))
            .collect()
    }

    /// Run one command: root and VM commands detached (see the module docs), a run's
    /// signals and window sizes interruptibly, defaults at once.
    async fn execute(
        &self,
        mgr: &Arc<Manager>,
        journal: &Journal,
        cmd: Command,
        caller: Caller,
    ) -> Result<String> {
        match &self.target {
            Target::Root | Target::Vm(_) => {
                let m = mgr.clone();
                let op = async move { m.execute(cmd, caller.uid, caller.gid).await };
                journal.detach(caller.pid, op).await
            }
            Target::Run(_) | Target::Winsize(_) => {
                interruptible(caller.pid, mgr.execute(cmd, caller.uid, caller.gid)).await
            }
            Target::Defaults | Target::Pools => mgr.execute(cmd, caller.uid, caller.gid).await,
        }
    }

    /// `close()` of one descriptor: runs the final unterminated line when the closing
    /// process wrote to the descriptor, and drops it (recording why) when that process
    /// is being killed.
    pub(super) async fn flush(&self, mgr: &Arc<Manager>, caller: Caller) -> Result<()> {
        self.flush_lines(mgr, caller).await?;
        let Some(p) = &self.pools else {
            return Ok(());
        };
        // A close before any line (a shell's dup2) applies nothing.
        let lines = std::mem::take(&mut *p.lines.lock());
        if lines.is_empty() {
            return Ok(());
        }
        p.applied.store(true, std::sync::atomic::Ordering::SeqCst);
        mgr.set_pools(&lines)
    }

    async fn flush_lines(&self, mgr: &Arc<Manager>, caller: Caller) -> Result<()> {
        let mut st = self.state.lock().await;
        if !st.lines.has_partial() || !st.writers.includes(caller.pid) {
            return Ok(());
        }
        if crate::interrupt::killed_by_signal(caller.pid) {
            if let Some(line) = st.lines.discard_partial() {
                let e = Error::new(
                    libc::EINTR,
                    format!(
                        "the writer was killed in the middle of the line {}; it was not run",
                        quote(&String::from_utf8_lossy(&line))
                    ),
                );
                self.journal(mgr, caller.session).unanswered(e);
            }
            return Ok(());
        }
        let Some(line) = st.lines.take_final() else {
            return Ok(());
        };
        self.run_lines(mgr, &mut st.lines, vec![line], caller).await
    }

    /// Last close: an unterminated line that no writer's close ran is dropped, and the
    /// opener's `ctl` result says so.
    pub(super) fn release(&self, mgr: &Arc<Manager>) {
        if let Some(p) = &self.pools {
            if !p.applied.load(std::sync::atomic::Ordering::SeqCst) {
                // Emptied (`: > pools`): no pool remains (removal spawns nothing).
                if let Err(e) = mgr.set_pools(&[]) {
                    tracing::warn!("emptying pools failed: {e}");
                }
            }
        }
        let Ok(mut st) = self.state.try_lock() else {
            return;
        };
        if let Some(line) = st.lines.discard_partial() {
            let e = Error::invalid(format!(
                "the unterminated line {} was dropped: no process that wrote it closed the \
                 file",
                quote(&String::from_utf8_lossy(&line))
            ));
            self.journal(mgr, self.session).unanswered(e);
        }
    }
}
