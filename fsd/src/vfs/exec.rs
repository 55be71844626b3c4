//! An open `exec`: a transaction (see `files` for the other kinds of open file).
//!
//! Writes collect the script; it starts on the first flush (close) by a process that
//! wrote to the descriptor, or the first read of the same descriptor. A write-only
//! descriptor's flush waits for the command to finish (so `echo cmd > exec` returns
//! when it is done) and fails with the errno of a command that did not run to its end;
//! a read-write descriptor streams the output instead.
//!
//! Invariants:
//! - All or nothing: a script that grew past [`MAX_SCRIPT`], whose options line is bad,
//!   that does not fit the limits, or whose writer is being killed, never runs; the
//!   descriptor's later writes, reads and closes fail with why (`refused`), and `cat
//!   <vm>/ctl` says it.
//! - Writes continue where the previous one ended (any offset for the first).
//! - From its first write the descriptor holds the command it will run (`runs`, its
//!   run as a kept one, and its terminal's cells once the options line asked for one),
//!   counted for the VM's owner; the script's bytes count against the writer's
//!   buffers. Both move on at the start: the command to the run, the script to disk.
//! - The descriptor is in one [`Phase`]: writing (collecting the script), refused, or
//!   started. Whether there is a script to start is decided in one place
//!   (`take_script`), for all three triggers: a writer's close and the first read
//!   start it and wait ([`ExecTx::start`]), the last close starts it in a task.
use std::sync::Arc;

use super::files::{Caller, Handle, Writers};
use super::journal::{Journal, Scope};
use super::streams::read_run;
use crate::error::{Error, Result};
use crate::interrupt::interruptible;
use crate::limits::{Amounts, Reservation};
use crate::manager::runs::{Run, RunStream};
use crate::manager::vm::{Vm, MAX_SCRIPT};

/// Where an `exec` descriptor's transaction is.
enum Phase {
    /// Collecting the script (empty: nothing written yet, or a read-only descriptor
    /// whose session has no run to show).
    Writing(Script),
    /// The script will never run: why (E2BIG past the cap, writer killed, bad options,
    /// a limit). Later writes, reads and closes fail with it.
    Refused(Error),
    /// The command runs (or ran): reads stream its output from `pos`.
    Started { run: Arc<Run>, pos: u64 },
}

/// The script being written.
#[derive(Default)]
struct Script {
    bytes: Vec<u8>,
    /// The first line (a possible `#bandsox` options line) was complete and checked.
    first_line_checked: bool,
    /// From the first write: the command this descriptor will run, counted for the
    /// VM's owner (with its terminal's cells once the options line asked for one).
    hold: Option<Reservation>,
}

pub struct ExecTx {
    vm: Arc<Vm>,
    phase: Phase,
    write_only: bool,
    session: u32,
    /// Where the next write must start (`None` before the first).
    next_offset: Option<u64>,
    /// Threads that wrote the script (only their close starts it).
    writers: Writers,
}

impl ExecTx {
    /// A descriptor of `vm`'s `exec`; `run` is what a read-only one shows (the
    /// session's last run).
    pub(super) fn new(
        vm: Arc<Vm>,
        run: Option<Arc<Run>>,
        write_only: bool,
        session: u32,
    ) -> ExecTx {
        let phase = match run {
            Some(run) => Phase::Started { run, pos: 0 },
            None => Phase::Writing(Script::default()),
        };
        ExecTx {
            vm,
            phase,
            write_only,
            session,
            next_offset: None,
            writers: Writers::default(),
        }
    }

    /// A read: starts a written script first, then streams its output like a pipe.
    pub(super) async fn read(&mut self, handle: &Handle, size: u32, pid: u32) -> Result<Vec<u8>> {
        self.start(handle, pid).await?;
        let Phase::Started { run, pos } = &mut self.phase else {
            return Ok(Vec::new());
        };
        let data = read_run(run, RunStream::Output, *pos, size, pid).await?;
        *pos += data.len() as u64;
        Ok(data)
    }

    /// A write of (part of) the script at `offset`.
    pub(super) fn write(
        &mut self,
        handle: &Handle,
        offset: u64,
        data: &[u8],
        pid: u32,
    ) -> Result<()> {
        if let Phase::Started { .. } = self.phase {
            return Err(Error::busy(
                "this exec descriptor already ran its command; open exec again",
            ));
        }
        if let Some(next) = self.next_offset.filter(|&n| n != offset) {
            return Err(Error::new(
                libc::ESPIPE,
                format!(
                    "exec is written in sequence: this write is at offset {offset}, \
                     but the previous one ended at {next}"
                ),
            ));
        }
        let script = match &mut self.phase {
            Phase::Refused(e) => return Err(e.clone()),
            Phase::Started { .. } => return Ok(()),
            Phase::Writing(script) => script,
        };
        self.writers.note(pid);
        match accept(&self.vm, script, handle, data) {
            Ok(()) => {
                self.next_offset = Some(offset + data.len() as u64);
                Ok(())
            }
            // All or nothing: a refused script never runs.
            Err(e) => Err(self.refuse(handle, e)),
        }
    }

    /// The journal of this descriptor's outcome (`cat <vm>/ctl` of its session).
    fn journal(&self) -> Journal {
        journal(&self.vm, self.session)
    }

    /// The script will never run: drop it and what it held; `cat <vm>/ctl` says why
    /// (and later writes, reads and `close` fail with it). Returns the error.
    fn refuse(&mut self, handle: &Handle, e: Error) -> Error {
        // Shrinking what is held cannot fail.
        let _ = handle.hold_bytes(0);
        let e = self.journal().refuse(self.vm.exec_failed(self.session, e));
        // Drops the script and the command it held.
        self.phase = Phase::Refused(e.clone());
        e
    }

    /// The script written so far, taken to start it: `None` unless the descriptor is
    /// writing a non-empty script (the one place that check is made). What the script
    /// held of the writer's buffers goes back (the run keeps it on disk).
    fn take_script(&mut self, handle: &Handle) -> Option<(Vec<u8>, Option<Reservation>)> {
        match &mut self.phase {
            Phase::Writing(script) if !script.bytes.is_empty() => {
                let script = std::mem::take(script);
                // Shrinking what is held cannot fail.
                let _ = handle.hold_bytes(0);
                Some((script.bytes, script.hold))
            }
            _ => None,
        }
    }

    /// Start the written script, if there is one, with the command it holds, waiting
    /// for the guest to start it (the caller `pid` may be interrupted: see
    /// [`start_run`]). The outcome lands in `cat <vm>/ctl` when it fails.
    async fn start(&mut self, handle: &Handle, pid: u32) -> Result<()> {
        if let Phase::Refused(e) = &self.phase {
            return Err(e.clone());
        }
        let Some((script, hold)) = self.take_script(handle) else {
            return Ok(());
        };
        let journal = self.journal();
        let started = start_run(&journal, &self.vm, script, self.session, hold, pid).await;
        let run = journal.finish(started)?;
        self.phase = Phase::Started { run, pos: 0 };
        Ok(())
    }

    /// `fsync`: the errno the close of a refused or lost command reports.
    pub(super) fn fsync(&self) -> Result<()> {
        match &self.phase {
            Phase::Refused(e) => Err(e.clone()),
            Phase::Started { run, .. } => run.failure().map_or(Ok(()), Err),
            Phase::Writing(_) => Ok(()),
        }
    }

    /// The last close: a script never flushed still runs (unless it was refused), in
    /// a task of its own (nobody waits for it).
    pub(super) fn release(&mut self, handle: &Handle) {
        let Some((script, hold)) = self.take_script(handle) else {
            return;
        };
        let vm = self.vm.clone();
        let session = self.session;
        tokio::spawn(async move {
            let started = vm.start_run_held(script, session, hold).await;
            if let Err(e) = journal(&vm, session).finish(started) {
                tracing::warn!(vm = %vm.name, "exec on release failed: {e}");
            }
        });
    }
}

/// Take one write of the script. It must fit the script cap, the writer's buffers and
/// the VM owner's running commands (and, once the options line is complete and asks
/// for a terminal, its cells); a bad options line is refused as soon as it is
/// complete, so the `write(2)` that completed it fails (a shell ignores `close`).
fn accept(vm: &Vm, script: &mut Script, handle: &Handle, data: &[u8]) -> Result<()> {
    if script.bytes.len() + data.len() > MAX_SCRIPT {
        return Err(Error::new(
            libc::E2BIG,
            format!("the script is longer than {MAX_SCRIPT} bytes; nothing was run"),
        ));
    }
    if script.hold.is_none() {
        script.hold = Some(vm.hold_run(0)?);
    }
    script.bytes.extend_from_slice(data);
    handle.hold_bytes(script.bytes.capacity())?;
    if !script.first_line_checked {
        if let Some(opts) = crate::manager::execopts::check_first_line(&script.bytes)? {
            script.first_line_checked = true;
            if let (Some(size), Some(hold)) = (opts.tty, &script.hold) {
                hold.resize(Amounts::run(crate::manager::terminal::cells(size)))?;
            }
        }
    }
    Ok(())
}

/// `close()` of an exec descriptor: starts the script when the closing process wrote
/// it and is not being killed; a write-only descriptor then waits for the command and
/// reports one that did not run to its end.
pub(super) async fn flush(
    tx: &tokio::sync::Mutex<ExecTx>,
    handle: &Handle,
    caller: Caller,
) -> Result<()> {
    let mut tx = tx.lock().await;
    if matches!(&tx.phase, Phase::Writing(s) if !s.bytes.is_empty()) {
        if !tx.writers.includes(caller.pid) {
            // Another process's copy of the descriptor (e.g. a child of the writing
            // shell) closed: the writer may not be done yet.
            return Ok(());
        }
        if crate::interrupt::killed_by_signal(caller.pid) {
            let e = Error::new(
                libc::EINTR,
                "the writer was killed before it closed exec; the script was not run",
            );
            // The writer is being killed: nobody sees this close's errno.
            drop(tx.refuse(handle, e));
            return Ok(());
        }
    }
    tx.start(handle, caller.pid).await?;
    // Only a write-only descriptor's close waits for its command (and not for a
    // terminal run, or with `wait=0`: see `execopts`).
    let run = match (&tx.phase, tx.write_only) {
        (Phase::Started { run, .. }, true) if run.waits => run.clone(),
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
            // Best effort, like a terminal's Ctrl-C: the run may have ended.
            let _ = run.signal(libc::SIGINT).await;
        }
    }
    waited?;
    run.failure().map_or(Ok(()), Err)
}

/// The journal of an exec's outcome in `cat <vm>/ctl` of `session`.
fn journal(vm: &Arc<Vm>, session: u32) -> Journal {
    Journal::new(Scope::Vm(vm.clone()), session, Some("exec".to_string()))
}

/// Start `script` as a run; the starting process may be interrupted (EINTR at once),
/// in which case the command, once started, gets SIGINT as if typed Ctrl-C, and a
/// late failure lands in `journal`.
async fn start_run(
    journal: &Journal,
    vm: &Arc<Vm>,
    script: Vec<u8>,
    session: u32,
    hold: Option<Reservation>,
    pid: u32,
) -> Result<Arc<Run>> {
    let v = vm.clone();
    let op = async move { v.start_run_held(script, session, hold).await };
    let late = |res: &Result<Arc<Run>>| {
        if let Ok(run) = res {
            let run = run.clone();
            tokio::spawn(async move {
                // Best effort, like a terminal's Ctrl-C: the run may have ended.
                let _ = run.signal(libc::SIGINT).await;
            });
        }
    };
    journal.detach_with(pid, op, late).await
}
