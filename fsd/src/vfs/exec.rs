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
use std::sync::Arc;

use super::files::{read_run, Caller, Handle, Writers};
use super::journal::{Journal, Scope};
use crate::error::{Error, Result};
use crate::interrupt::interruptible;
use crate::limits::{Amounts, Reservation};
use crate::manager::runs::{Run, RunStream};
use crate::manager::vm::{Vm, MAX_SCRIPT};

pub struct ExecTx {
    vm: Arc<Vm>,
    script: Vec<u8>,
    run: Option<Arc<Run>>,
    pos: u64,
    write_only: bool,
    session: u32,
    /// Where the next write must start (`None` before the first).
    next_offset: Option<u64>,
    /// Threads that wrote the script (only their close starts it).
    writers: Writers,
    /// The script will never run: why (E2BIG past the cap, writer killed, bad options,
    /// a limit).
    refused: Option<Error>,
    /// The first line (a possible `#bandsox` options line) was complete and checked.
    first_line_checked: bool,
    /// From the first write: the command this descriptor will run, counted for the
    /// VM's owner (with its terminal's cells once the options line asked for one).
    run_hold: Option<Reservation>,
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
        ExecTx {
            vm,
            script: Vec::new(),
            run,
            pos: 0,
            write_only,
            session,
            next_offset: None,
            writers: Writers::default(),
            refused: None,
            first_line_checked: false,
            run_hold: None,
        }
    }

    /// A read: starts a written script first, then streams its output like a pipe.
    pub(super) async fn read(&mut self, handle: &Handle, size: u32, pid: u32) -> Result<Vec<u8>> {
        if let Some(e) = &self.refused {
            return Err(e.clone());
        }
        if self.run.is_none() && !self.script.is_empty() {
            self.start(handle, pid).await?;
        }
        let Some(run) = self.run.clone() else {
            return Ok(Vec::new());
        };
        let data = read_run(&run, RunStream::Output, self.pos, size, pid).await?;
        self.pos += data.len() as u64;
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
        if self.run.is_some() {
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
        if let Some(e) = &self.refused {
            return Err(e.clone());
        }
        self.writers.note(pid);
        match self.accept(handle, data) {
            Ok(()) => {
                self.next_offset = Some(offset + data.len() as u64);
                Ok(())
            }
            Err(e) => {
                // All or nothing: a refused script never runs.
                self.refuse(handle, e.clone());
                Err(self.refused.clone().unwrap_or(e))
            }
        }
    }

    /// Take one write of the script. It must fit the script cap, the writer's buffers
    /// and the VM owner's running commands (and, once the options line is complete
    /// and asks for a terminal, its cells); a bad options line is refused as soon as
    /// it is complete, so the `write(2)` that completed it fails (a shell ignores
    /// `close`).
    fn accept(&mut self, handle: &Handle, data: &[u8]) -> Result<()> {
        if self.script.len() + data.len() > MAX_SCRIPT {
            return Err(Error::new(
                libc::E2BIG,
                format!("the script is longer than {MAX_SCRIPT} bytes; nothing was run"),
            ));
        }
        if self.run_hold.is_none() {
            self.run_hold = Some(self.vm.hold_run(0)?);
        }
        self.script.extend_from_slice(data);
        handle.hold_bytes(self.script.capacity())?;
        if !self.first_line_checked {
            if let Some(opts) = crate::manager::execopts::check_first_line(&self.script)? {
                self.first_line_checked = true;
                if let (Some(size), Some(hold)) = (opts.tty, &self.run_hold) {
                    hold.resize(Amounts::run(crate::manager::terminal::cells(size)))?;
                }
            }
        }
        Ok(())
    }

    /// The journal of this descriptor's outcome (`cat <vm>/ctl` of its session).
    fn journal(&self) -> Journal {
        journal(&self.vm, self.session)
    }

    /// The script will never run: drop it and what it held; `cat <vm>/ctl` says why
    /// (and later writes, reads and `close` fail with it).
    fn refuse(&mut self, handle: &Handle, e: Error) {
        self.script = Vec::new();
        self.run_hold = None;
        // Shrinking what is held cannot fail.
        let _ = handle.hold_bytes(0);
        let e = self.vm.exec_failed(self.session, e);
        self.refused = Some(self.journal().refuse(e));
    }

    /// Start the script with the command it holds; the script's bytes go back to the
    /// writer's buffers (the run keeps it on disk).
    async fn start(&mut self, handle: &Handle, pid: u32) -> Result<()> {
        let script = std::mem::take(&mut self.script);
        let hold = self.run_hold.take();
        // Shrinking what is held cannot fail.
        let _ = handle.hold_bytes(0);
        let journal = self.journal();
        let started = start_run(&journal, &self.vm, script, self.session, hold, pid).await;
        self.run = Some(journal.finish(started)?);
        Ok(())
    }

    /// `fsync`: the errno the close of a refused or lost command reports.
    pub(super) fn fsync(&self) -> Result<()> {
        if let Some(e) = &self.refused {
            return Err(e.clone());
        }
        match self.run.as_ref().and_then(|r| r.failure()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The last close: a script never flushed still runs (unless it was refused).
    pub(super) fn release(&mut self) {
        if self.run.is_some() || self.script.is_empty() || self.refused.is_some() {
            return;
        }
        let script = std::mem::take(&mut self.script);
        let hold = self.run_hold.take();
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

/// `close()` of an exec descriptor: starts the script when the closing process wrote
/// it and is not being killed; a write-only descriptor then waits for the command and
/// reports one that did not run to its end.
pub(super) async fn flush(
    tx: &tokio::sync::Mutex<ExecTx>,
    handle: &Handle,
    caller: Caller,
) -> Result<()> {
    let mut tx = tx.lock().await;
    if let Some(e) = &tx.refused {
        return Err(e.clone());
    }
    if tx.run.is_none() && !tx.script.is_empty() {
        if !tx.writers.includes(caller.pid) {
            // Another process's copy of the descriptor (e.g. a child of the writing
            // shell) closed: the writer may not be done yet.
            return Ok(());
        }
        if crate::interrupt::killed_by_signal(caller.pid) {
            tx.refuse(
                handle,
                Error::new(
                    libc::EINTR,
                    "the writer was killed before it closed exec; the script was not run",
                ),
            );
            return Ok(());
        }
        tx.start(handle, caller.pid).await?;
    }
    // Only a write-only descriptor's close waits for its command (and not for a
    // terminal run, or with `wait=0`: see `execopts`).
    let run = match (&tx.run, tx.write_only) {
        (Some(run), true) if run.waits => run.clone(),
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
    waited?;
    match run.failure() {
        Some(e) => Err(e),
        None => Ok(()),
    }
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
