//! Runs: one per command executed in a VM, mirrored on disk as `<vm-dir>/runs/<n>/`.
//!
//! Output is spooled to files as it arrives (each stream once, `output` served from them
//! through an index: see `spool`), so the daemon's memory stays bounded no matter how much
//! a command prints: the agent client grants flow-control credit only as the pump takes
//! chunks, and the pump takes a chunk only after writing the previous one to disk.
//! Output is never cut silently: the VM's [`OutputBudget`] first prunes its oldest
//! finished runs, and a run that still does not fit is killed with the status
//! `output limit reached`. Readers wait on a `watch` channel that is bumped on every
//! append and on exit; a run's byte counters only grow, and once `status` leaves
//! `Running` it never changes again.
//!
//! A terminal run (started with `tty=`) has one stream, `stdout` (its terminal's
//! output, `output` the same bytes), a window size kept in its `winsize` file, and, while
//! it runs, a screen emulator fed under the run's lock together with the byte counters,
//! so a snapshot of the screen always corresponds to an exact output offset (see
//! `Run::terminal_snapshot`, in `terminal`). A run with a timeout gets SIGTERM when it
//! expires and SIGKILL [`TIMEOUT_GRACE`] later; its status is then `timeout <how it
//! ended>`.
//!
//! What a run makes the daemon hold is bounded and counted for the VM's owner by one
//! [`Reservation`], taken before the run exists: itself as a kept run (`kept_runs`, for
//! as long as it is in the VM's table) and, while its status is `running`, one command
//! (`runs`) and its screen's cells (`terminal_cells`), returned when it ends (with the
//! screen, whose memory is given back to the system: `memtrim`). The script itself is
//! kept on disk only (`cmd`), not in memory.
//!
//! Times: a run's directory, `cmd`, `stdin`, `ctl`, `pid` and `winsize` carry the time it
//! started; its output files (and `screen`, `terminal`) the time of its last output; its
//! `status` the time it ended (its start while it runs). Runs loaded after a restart
//! take them from their files' modification times.
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bandsox_agent::client::{ExecControl, ExecEvent, ExecHandle};
use bandsox_agent::proto::{ExitStatus, OutStream, TtySize};
use parking_lot::Mutex;
use tokio::sync::watch;

use super::spool::{self, OutputBudget};
use super::terminal::Screen;
use crate::error::{Error, Result};
use crate::limits::{Amounts, Limits, Reservation};

/// `<vm-dir>/main-run`: the number of the run `runs/main` names (the image entrypoint
/// started by `autostart=1`; see `images`).
const MAIN_RUN_FILE: &str = "main-run";

impl super::vm::Vm {
    /// The run `runs/main` names, if this VM started its image's entrypoint.
    pub fn main_run(&self) -> Option<u64> {
        std::fs::read_to_string(self.dir.join(MAIN_RUN_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Make `runs/main` name run `n`.
    pub(super) fn set_main_run(&self, n: u64) -> std::io::Result<()> {
        std::fs::write(self.dir.join(MAIN_RUN_FILE), format!("{n}\n"))
    }
}

/// The `status` text of a run stopped because its VM's output budget was full.
pub const OUTPUT_LIMIT: &str = "output limit reached";

/// How long a timed-out command has between SIGTERM and SIGKILL.
pub const TIMEOUT_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The file holding a terminal run's window size (`COLSxROWS`).
pub(super) const WINSIZE_FILE: &str = "winsize";
/// The file holding the script, as written (options line included).
const CMD_FILE: &str = "cmd";

/// How long stdin/signal requests wait for a just-created run's command to start.
pub const START_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Which spooled stream of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunStream {
    Stdout,
    Stderr,
    Output,
}

impl RunStream {
    pub fn file_name(self) -> &'static str {
        match self {
            RunStream::Stdout => "stdout",
            RunStream::Stderr => "stderr",
            RunStream::Output => "output",
        }
    }
    fn index(self) -> usize {
        match self {
            RunStream::Stdout => 0,
            RunStream::Stderr => 1,
            RunStream::Output => 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunStatus {
    Running,
    Exited(ExitStatus),
    /// The command's fate is unknown (VM died, daemon restarted while it ran).
    Lost(String),
    /// The VM's output budget was full: the command was killed (see [`OUTPUT_LIMIT`]).
    OutputLimit,
    /// The run's timeout expired: it was sent SIGTERM (then SIGKILL) and ended so.
    Timeout(ExitStatus),
}

impl RunStatus {
    /// The text of the `status` file.
    pub fn render(&self) -> String {
        match self {
            RunStatus::Running => "running\n".into(),
            RunStatus::Exited(s) => format!("{s}\n"),
            RunStatus::Lost(why) => format!("lost: {why}\n"),
            RunStatus::OutputLimit => format!("{OUTPUT_LIMIT}\n"),
            RunStatus::Timeout(s) => format!("timeout {s}\n"),
        }
    }
    pub fn is_running(&self) -> bool {
        matches!(self, RunStatus::Running)
    }
}

/// What every run of one VM shares: the output budget, and the owner its memory is
/// counted for.
pub struct RunHome {
    pub budget: Arc<OutputBudget>,
    pub limits: Arc<Limits>,
    pub uid: u32,
}

/// When a run started, last printed, and ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunTimes {
    pub started: SystemTime,
    /// The last output (the start when there was none).
    pub output: SystemTime,
    /// `None` while the command runs.
    pub ended: Option<SystemTime>,
}

pub(super) struct RunInner {
    pub(super) status: RunStatus,
    /// For `Lost`: the errno a waiting `close()` reports (EHOSTDOWN, ENOSPC, EIO).
    lost_errno: i32,
    pid: Option<u32>,
    pub(super) lens: [u64; 3],
    control: Option<ExecControl>,
    /// The spool, open while the run is live.
    writer: Option<spool::Writer>,
    /// Bytes charged to the budget for this run.
    stored: u64,
    /// Terminal runs: the current window size.
    pub(super) size: Option<TtySize>,
    /// Terminal runs, while live: the emulated screen (fed with every output chunk;
    /// boxed, so a kept run's record stays small).
    pub(super) screen: Option<Box<Screen>>,
    /// The timeout expired and the command was signalled.
    timed_out: bool,
    /// What the run counts for its VM's owner: itself as a kept run, and while it runs
    /// also the command and its screen's cells.
    pub(super) hold: Reservation,
    /// When the last output arrived.
    last_output: SystemTime,
    /// When the run ended.
    ended: Option<SystemTime>,
}

pub struct Run {
    pub n: u64,
    /// Whether a write-only `exec`'s close waits for this run (see `execopts`).
    pub waits: bool,
    pub dir: PathBuf,
    pub started: SystemTime,
    pub(super) inner: Mutex<RunInner>,
    changed: watch::Sender<u64>,
    pub(super) home: Arc<RunHome>,
    /// Spooled by an earlier daemon with a separate `output` file.
    legacy: bool,
}

/// Remove directories on one background thread, in order.
fn remove_in_background(dir: PathBuf) {
    use std::sync::mpsc::{channel, Sender};
    static REMOVER: std::sync::OnceLock<Mutex<Sender<PathBuf>>> = std::sync::OnceLock::new();
    let tx = REMOVER.get_or_init(|| {
        let (tx, rx) = channel::<PathBuf>();
        let spawned = std::thread::Builder::new()
            .name("bandsox-run-rm".into())
            .spawn(move || {
                for dir in rx {
                    if let Err(e) = std::fs::remove_dir_all(&dir) {
                        tracing::warn!("cannot remove run {}: {e}", dir.display());
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the run remover thread: {e}");
        }
        Mutex::new(tx)
    });
    if let Err(e) = tx.lock().send(dir) {
        // No remover thread: remove here.
        let dir = e.0;
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!("cannot remove run {}: {e}", dir.display());
        }
    }
}

/// Create a run's `status` file with `running`. Its first block is allocated by this
/// write, so the final status (always shorter than a block) is written into it in
/// place ([`write_status`]) even when the host disk has filled up meanwhile.
fn reserve_status(path: &Path) -> std::io::Result<()> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    f.write_all_at(RunStatus::Running.render().as_bytes(), 0)
}

/// Overwrite `status` in place (no truncate-then-allocate: see [`reserve_status`]).
fn write_status(path: &Path, text: &str) -> std::io::Result<()> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    f.write_all_at(text.as_bytes(), 0)?;
    f.set_len(text.len() as u64)
}

/// The modification time of `dir/name`.
fn file_time(dir: &Path, name: &str) -> Option<SystemTime> {
    std::fs::metadata(dir.join(name)).ok()?.modified().ok()
}

/// When a run's output last grew: the newest of its non-empty stream files.
fn output_time(dir: &Path) -> Option<SystemTime> {
    [spool::STDOUT, spool::STDERR, spool::LEGACY_OUTPUT]
        .into_iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .filter(|m| m.len() > 0)
        .filter_map(|m| m.modified().ok())
        .max()
}

fn status_from_file(text: &str) -> RunStatus {
    let t = text.trim();
    if let Some(rest) = t.strip_prefix("timeout ") {
        if let RunStatus::Exited(s) = status_from_file(rest) {
            return RunStatus::Timeout(s);
        }
    }
    if t == OUTPUT_LIMIT {
        return RunStatus::OutputLimit;
    }
    if let Some(sig) = t.strip_prefix("signal ") {
        if let Ok(s) = sig.parse() {
            return RunStatus::Exited(ExitStatus::Signal(s));
        }
    }
    if let Ok(c) = t.parse() {
        return RunStatus::Exited(ExitStatus::Code(c));
    }
    if let Some(why) = t.strip_prefix("lost: ") {
        return RunStatus::Lost(why.to_string());
    }
    RunStatus::Lost("the daemon restarted while the command ran".into())
}

impl Run {
    /// Create the run's directory and spool files; the command has not started yet.
    /// `hold` counts the command and its screen until the run ends. Nothing is left
    /// behind when this fails (a full host disk: ENOSPC).
    pub fn create(
        home: &Arc<RunHome>,
        runs_dir: &Path,
        n: u64,
        cmd: &[u8],
        tty: Option<TtySize>,
        waits: bool,
        hold: Reservation,
    ) -> Result<Arc<Run>> {
        let dir = runs_dir.join(n.to_string());
        let writer = Self::create_files(&dir, cmd, tty).map_err(|e| {
            if let Err(rm) = std::fs::remove_dir_all(&dir) {
                if rm.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove the half-made run {}: {rm}", dir.display());
                }
            }
            Error::from(e).with_context(&format!(
                "cannot create run {n} on the host ({})",
                dir.display()
            ))
        })?;
        let (changed, _) = watch::channel(0);
        // The time `cmd` got, so a run reloaded after a restart shows the same.
        let now = file_time(&dir, CMD_FILE).unwrap_or_else(SystemTime::now);
        Ok(Arc::new(Run {
            n,
            waits,
            dir,
            started: now,
            inner: Mutex::new(RunInner {
                status: RunStatus::Running,
                lost_errno: 0,
                pid: None,
                lens: [0; 3],
                control: None,
                writer: Some(writer),
                stored: 0,
                size: tty,
                screen: tty.map(|size| Box::new(Screen::new(size))),
                timed_out: false,
                hold,
                last_output: now,
                ended: None,
            }),
            changed,
            home: home.clone(),
            legacy: false,
        }))
    }

    fn create_files(
        dir: &Path,
        cmd: &[u8],
        tty: Option<TtySize>,
    ) -> std::io::Result<spool::Writer> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(CMD_FILE), cmd)?;
        if let Some(size) = tty {
            std::fs::write(dir.join(WINSIZE_FILE), render_size(size))?;
        }
        let writer = spool::Writer::create(dir)?;
        reserve_status(&dir.join("status"))?;
        Ok(writer)
    }

    /// Reload a finished (or interrupted) run from disk after a daemon restart.
    pub fn load(home: &Arc<RunHome>, dir: &Path, n: u64) -> Result<Arc<Run>> {
        let status = match std::fs::read_to_string(dir.join("status")) {
            Ok(text) => status_from_file(&text),
            Err(_) => RunStatus::Lost("the daemon restarted while the command ran".into()),
        };
        if !dir.join("status").exists() {
            let _ = std::fs::write(dir.join("status"), status.render());
        }
        let len = |name: &str| {
            std::fs::metadata(dir.join(name))
                .map(|m| m.len())
                .unwrap_or(0)
        };
        let pid = std::fs::read_to_string(dir.join("pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok());
        let started = file_time(dir, CMD_FILE)
            .ok_or_else(|| Error::not_found(format!("{} has no cmd", dir.display())))?;
        let legacy = dir.join(spool::LEGACY_OUTPUT).exists() && !dir.join(spool::INDEX).exists();
        let (out, err) = (len(spool::STDOUT), len(spool::STDERR));
        let output = if legacy {
            len(spool::LEGACY_OUTPUT)
        } else {
            out + err
        };
        let last_output = output_time(dir).unwrap_or(started);
        let stored = spool::stored_bytes(dir);
        home.budget.charge_existing(stored);
        let size = std::fs::read_to_string(dir.join(WINSIZE_FILE))
            .ok()
            .and_then(|t| super::execopts::parse_size(&t).ok());
        let (changed, _) = watch::channel(0);
        Ok(Arc::new(Run {
            n,
            waits: true,
            dir: dir.to_path_buf(),
            started,
            inner: Mutex::new(RunInner {
                status,
                lost_errno: libc::EIO,
                pid,
                lens: [out, err, output],
                control: None,
                writer: None,
                stored,
                size,
                screen: None,
                timed_out: false,
                hold: home.limits.hold_existing(home.uid, Amounts::kept_run()),
                last_output,
                ended: Some(file_time(dir, "status").unwrap_or(last_output)),
            }),
            changed,
            home: home.clone(),
            legacy,
        }))
    }

    /// The script as written to `exec` (read from the run's `cmd` file).
    pub fn cmd(&self) -> Result<Vec<u8>> {
        Ok(std::fs::read(self.dir.join(CMD_FILE))?)
    }

    /// Bytes of the script (`cmd`'s size).
    pub fn cmd_len(&self) -> u64 {
        std::fs::metadata(self.dir.join(CMD_FILE))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// When the run started, last printed and ended.
    pub fn times(&self) -> RunTimes {
        let inner = self.inner.lock();
        RunTimes {
            started: self.started,
            output: inner.last_output,
            ended: inner.ended,
        }
    }

    pub fn status(&self) -> RunStatus {
        self.inner.lock().status.clone()
    }
    pub fn pid(&self) -> Option<u32> {
        self.inner.lock().pid
    }
    pub fn len(&self, stream: RunStream) -> u64 {
        self.inner.lock().lens[stream.index()]
    }
    pub fn control(&self) -> Option<ExecControl> {
        self.inner.lock().control.clone()
    }

    pub(super) fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn finish(&self, status: RunStatus) {
        self.finish_with(status, 0)
    }

    /// The command's fate is unknown; a waiting `close()` reports `errno`.
    fn finish_lost(&self, errno: i32, why: &str) {
        self.finish_with(RunStatus::Lost(why.to_string()), errno)
    }

    fn finish_with(&self, status: RunStatus, lost_errno: i32) {
        let (status, screen, printed) = {
            let mut inner = self.inner.lock();
            if !inner.status.is_running() {
                return;
            }
            let status = match status {
                RunStatus::Exited(s) if inner.timed_out => RunStatus::Timeout(s),
                s => s,
            };
            // Its place among running commands goes back before anyone can see it
            // ended (a waiting `close` may start the next command at once); its screen
            // right after, outside the lock. It stays a kept run.
            if let Err(e) = inner.hold.resize(Amounts::kept_run()) {
                tracing::warn!(
                    "run {}: cannot give back what it held: {e}",
                    self.dir.display()
                );
            }
            inner.status = status.clone();
            inner.lost_errno = lost_errno;
            inner.control = None;
            inner.writer = None;
            inner.ended = Some(SystemTime::now());
            (status, inner.screen.take(), inner.lens[2] > 0)
        };
        if screen.is_some() {
            drop(screen);
            crate::memtrim::after_large_free();
        }
        if let Err(e) = write_status(&self.dir.join("status"), &status.render()) {
            tracing::warn!("cannot write status of run {}: {e}", self.dir.display());
        }
        // From now on the times are those of the files, as after a daemon restart.
        {
            let mut inner = self.inner.lock();
            if printed {
                if let Some(t) = output_time(&self.dir) {
                    inner.last_output = t;
                }
            }
            if let Some(t) = file_time(&self.dir, "status") {
                inner.ended = Some(t);
            }
        }
        self.bump();
    }

    /// Why the run was lost, as the error a write-only `exec`'s `close()` returns:
    /// `EHOSTDOWN` (the VM or its agent went away), `ENOSPC` or another host errno
    /// (its output could not be stored; also the VM's output budget), `EIO` (anything
    /// else). `None` while running
    /// and for commands that exited.
    pub fn failure(&self) -> Option<Error> {
        let inner = self.inner.lock();
        match &inner.status {
            RunStatus::Lost(why) => Some(Error::new(
                if inner.lost_errno > 0 {
                    inner.lost_errno
                } else {
                    libc::EIO
                },
                format!("run {}: the command was lost: {why}", self.n),
            )),
            RunStatus::OutputLimit => Some(Error::new(
                libc::ENOSPC,
                format!(
                    "run {}: {OUTPUT_LIMIT}; the command was killed (see limits)",
                    self.n
                ),
            )),
            _ => None,
        }
    }

    /// Spool a chunk. `Ok(false)`: the VM's output budget was full, so only a part (or
    /// nothing) was kept and the run must stop.
    fn append(&self, stream: OutStream, data: &[u8]) -> std::io::Result<bool> {
        let idx = match stream {
            OutStream::Stdout => 0,
            OutStream::Stderr => 1,
        };
        let cost = match self.inner.lock().writer.as_ref() {
            Some(w) => w.cost(idx, data.len() as u64),
            None => return Ok(true),
        };
        // Charged outside the run's lock: a full budget prunes other runs.
        let granted = self.home.budget.charge(cost, self.n);
        let keep = if granted == cost {
            data.len()
        } else {
            // Less than `data.len()` was granted, so this fits in usize.
            usize::try_from(granted.saturating_sub(cost - data.len() as u64)).unwrap_or(0)
        };
        let mut inner = self.inner.lock();
        let lens = inner.lens;
        let Some(w) = inner.writer.as_mut() else {
            self.home.budget.release(granted);
            return Ok(true);
        };
        if keep > 0 {
            w.append(idx, &data[..keep], lens)?;
            inner.lens[idx] += keep as u64;
            inner.lens[2] += keep as u64;
            inner.stored += granted;
            inner.last_output = SystemTime::now();
            if let Some(screen) = inner.screen.as_mut() {
                screen.feed(&data[..keep]);
            }
        } else {
            self.home.budget.release(granted);
        }
        Ok(keep == data.len())
    }

    /// Bytes this run's output occupies.
    pub fn stored(&self) -> u64 {
        self.inner.lock().stored
    }

    /// Return the run's bytes to the budget (at once) and delete its directory (in the
    /// background: unlinking a run's files costs milliseconds on some disks, and pruning
    /// happens on the path of a new `exec`; see docs/benchmarks.md, "exec soak").
    pub fn delete(&self) {
        let stored = std::mem::take(&mut self.inner.lock().stored);
        self.home.budget.release(stored);
        remove_in_background(self.dir.clone());
    }

    /// Attach the started command and pump its events to disk until it ends. With a
    /// `timeout`, the command gets SIGTERM when it expires and SIGKILL
    /// [`TIMEOUT_GRACE`] later.
    pub async fn pump(self: Arc<Self>, mut exec: ExecHandle, timeout: Option<std::time::Duration>) {
        {
            let mut inner = self.inner.lock();
            inner.pid = Some(exec.pid);
            inner.control = Some(exec.control());
        }
        let _ = std::fs::write(self.dir.join("pid"), format!("{}\n", exec.pid));
        self.bump();
        let far = std::time::Duration::from_secs(100 * 365 * 24 * 3600);
        let alarm = tokio::time::sleep(timeout.unwrap_or(far));
        tokio::pin!(alarm);
        // 0: waiting for the timeout; 1: SIGTERM sent; 2: SIGKILL sent.
        let mut stage = if timeout.is_some() { 0 } else { 2 };
        loop {
            let ev = tokio::select! {
                ev = exec.next() => ev,
                () = &mut alarm, if stage < 2 => {
                    let sig = if stage == 0 { libc::SIGTERM } else { libc::SIGKILL };
                    if stage == 0 {
                        self.inner.lock().timed_out = true;
                        tracing::info!("run {}: timeout; sending SIGTERM", self.dir.display());
                    }
                    if let Some(c) = self.control() {
                        let _ = c.signal(sig).await;
                    }
                    stage += 1;
                    alarm.as_mut().reset(tokio::time::Instant::now() + TIMEOUT_GRACE);
                    continue;
                }
            };
            let Some(ev) = ev else { break };
            match ev {
                ExecEvent::Output(stream, data) => match self.append(stream, &data) {
                    Ok(true) => self.bump(),
                    Ok(false) => {
                        tracing::warn!(
                            "run {}: {OUTPUT_LIMIT} ({} bytes kept for the VM's runs); killing the command",
                            self.dir.display(),
                            self.home.budget.cap()
                        );
                        if let Some(c) = self.control() {
                            let _ = c.signal(libc::SIGKILL).await;
                        }
                        self.finish(RunStatus::OutputLimit);
                        return;
                    }
                    Err(e) => {
                        // Spool failure (e.g. host disk full): say so rather than drop bytes.
                        tracing::error!("run {}: cannot spool output: {e}", self.dir.display());
                        if let Some(c) = self.control() {
                            let _ = c.signal(libc::SIGKILL).await;
                        }
                        let errno = e.raw_os_error().unwrap_or(libc::EIO);
                        self.finish_lost(
                            errno,
                            &format!("cannot store output on the host (command killed): {e}"),
                        );
                        return;
                    }
                },
                ExecEvent::Exited(status) => {
                    self.finish(RunStatus::Exited(status));
                    return;
                }
                ExecEvent::Lost => {
                    self.finish_lost(
                        libc::EHOSTDOWN,
                        "the connection to the guest was lost (VM stopped or died)",
                    );
                    return;
                }
            }
        }
        self.finish_lost(libc::EIO, "the guest agent ended the stream");
    }

    /// The guest refused to start the command: say why in its output (so `cat exec`
    /// shows it) and mark it lost.
    pub fn failed_to_start(&self, err: &Error) {
        let line = format!("bandsox: cannot start the command: {}\n", err.message);
        if let Err(e) = self.append(OutStream::Stderr, line.as_bytes()) {
            tracing::warn!(
                "run {}: cannot record the start error: {e}",
                self.dir.display()
            );
        }
        self.finish_lost(err.errno, &err.message);
    }

    /// Mark a still-running run as lost because its VM stopped, was killed or deleted.
    pub fn abandon(&self, why: &str) {
        self.finish_lost(libc::EHOSTDOWN, why);
    }

    /// Read up to `size` bytes of `stream` at `offset` from the spool file, without waiting.
    pub fn read_at(&self, stream: RunStream, offset: u64, size: u32) -> Result<Vec<u8>> {
        let len = self.len(stream);
        let size = u64::from(size);
        Ok(match stream {
            RunStream::Output if !self.legacy => spool::read_output(&self.dir, offset, size, len)?,
            _ => spool::read_file(&self.dir.join(stream.file_name()), offset, size, len)?,
        })
    }

    /// Wait until `stream` has bytes beyond `offset` or the run has ended.
    pub async fn wait_for_data(&self, stream: RunStream, offset: u64) {
        let mut rx = self.changed.subscribe();
        loop {
            {
                let inner = self.inner.lock();
                if inner.lens[stream.index()] > offset || !inner.status.is_running() {
                    return;
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Wait until the run has ended.
    pub async fn wait_finished(&self) {
        let mut rx = self.changed.subscribe();
        while self.status().is_running() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Blocking-pipe read: waits for data or exit, then reads. Empty = end of stream.
    pub async fn read_stream(&self, stream: RunStream, offset: u64, size: u32) -> Result<Vec<u8>> {
        self.wait_for_data(stream, offset).await;
        self.read_at(stream, offset, size)
    }

    /// The command's control handle, waiting (at most [`START_WAIT`]) while the run
    /// exists but the guest has not reported the command started yet.
    pub(super) async fn live_control(&self) -> Option<ExecControl> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + START_WAIT;
        loop {
            {
                let inner = self.inner.lock();
                if inner.control.is_some() || !inner.status.is_running() {
                    return inner.control.clone();
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    pub async fn signal(&self, sig: i32) -> Result<()> {
        match self.live_control().await {
            Some(c) => c.signal(sig).await.map_err(Error::from),
            None => Err(Error::new(
                libc::ESRCH,
                format!("run {} has already finished", self.n),
            )),
        }
    }

    pub async fn write_stdin(&self, data: Vec<u8>) -> Result<()> {
        match self.live_control().await {
            Some(c) => c.stdin(data).await.map_err(Error::from),
            None => Err(Error::new(
                libc::EPIPE,
                format!("run {} has already finished", self.n),
            )),
        }
    }

    pub async fn close_stdin(&self) -> Result<()> {
        match self.live_control().await {
            Some(c) => c.close_stdin().await.map_err(Error::from),
            None => Ok(()),
        }
    }
}

/// `COLSxROWS\n`.
pub fn render_size(size: TtySize) -> String {
    format!("{}x{}\n", size.cols, size.rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{Amounts, HostFacts};

    /// Runs of uid 1000 under `limits` (a limits file's text), with a `mib` budget.
    pub(crate) fn home_with(dir: &Path, mib: u64, limits: &str) -> Arc<RunHome> {
        let path = dir.join("limits");
        std::fs::write(&path, limits).unwrap();
        let facts = HostFacts {
            mem_total_mib: 4096,
            cpus: 1,
            state_fs_mib: 1024,
            open_files: 1024,
        };
        Arc::new(RunHome {
            budget: Arc::new(OutputBudget::new(mib)),
            limits: Limits::with_owner(path, facts, None),
            uid: 1000,
        })
    }

    /// A new run of `home` (its command and screen held like `Vm::start_run` does).
    pub(crate) fn new_run(
        home: &Arc<RunHome>,
        dir: &Path,
        n: u64,
        tty: Option<TtySize>,
    ) -> Result<Arc<Run>> {
        let cells = tty.map_or(0, super::super::terminal::cells);
        let hold = home.limits.hold(home.uid, Amounts::run(cells))?;
        Run::create(home, dir, n, b"cmd", tty, true, hold)
    }

    #[test]
    fn status_text_roundtrip() {
        for s in [
            RunStatus::Exited(ExitStatus::Code(0)),
            RunStatus::Exited(ExitStatus::Code(3)),
            RunStatus::Exited(ExitStatus::Signal(9)),
            RunStatus::Lost("vm died".into()),
            RunStatus::OutputLimit,
            RunStatus::Timeout(ExitStatus::Signal(15)),
            RunStatus::Timeout(ExitStatus::Code(0)),
        ] {
            assert_eq!(status_from_file(&s.render()), s);
        }
        assert_eq!(
            RunStatus::Exited(ExitStatus::Signal(15)).render(),
            "signal 15\n"
        );
    }

    #[tokio::test]
    async fn spool_and_wait() {
        let dir = tempfile::tempdir().unwrap();
        let home = home_with(dir.path(), 1, "");
        let run = new_run(&home, dir.path(), 1, None).unwrap();
        run.append(OutStream::Stdout, b"hello ").unwrap();
        run.append(OutStream::Stderr, b"oops ").unwrap();
        assert_eq!(
            run.read_at(RunStream::Output, 0, 100).unwrap(),
            b"hello oops "
        );
        assert_eq!(run.read_at(RunStream::Stderr, 0, 100).unwrap(), b"oops ");
        let r2 = run.clone();
        let waiter = tokio::spawn(async move { r2.read_stream(RunStream::Stdout, 6, 100).await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        run.append(OutStream::Stdout, b"world").unwrap();
        run.bump();
        assert_eq!(waiter.await.unwrap().unwrap(), b"world");
        run.finish(RunStatus::Exited(ExitStatus::Code(0)));
        assert_eq!(
            run.read_stream(RunStream::Stdout, 11, 100).await.unwrap(),
            b""
        );
        assert_eq!(run.stored(), 16 + 3 * spool::ENTRY);
        let again = home_with(dir.path(), 1, "");
        let loaded = Run::load(&again, &dir.path().join("1"), 1).unwrap();
        assert_eq!(loaded.status(), RunStatus::Exited(ExitStatus::Code(0)));
        assert_eq!(loaded.len(RunStream::Output), 16);
        assert_eq!(
            loaded.read_at(RunStream::Output, 0, 100).unwrap(),
            b"hello oops world"
        );
        assert_eq!(again.budget.used(), run.stored());
        loaded.delete();
        assert_eq!(again.budget.used(), 0);
        // The directory goes in the background.
        let t0 = std::time::Instant::now();
        while dir.path().join("1").exists() && t0.elapsed().as_secs() < 5 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!dir.path().join("1").exists());
    }

    #[test]
    fn a_full_budget_keeps_what_fits_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let home = home_with(dir.path(), 1, "");
        let budget = home.budget.clone();
        let run = new_run(&home, dir.path(), 1, None).unwrap();
        let chunk = vec![b'y'; 400 * 1024];
        assert!(run.append(OutStream::Stdout, &chunk).unwrap());
        assert!(run.append(OutStream::Stdout, &chunk).unwrap());
        // The third chunk does not fit in 1 MiB: the part that does is kept.
        assert!(!run.append(OutStream::Stdout, &chunk).unwrap());
        assert_eq!(budget.used(), 1024 * 1024);
        assert_eq!(run.len(RunStream::Stdout), 1024 * 1024 - spool::ENTRY);
        assert_eq!(run.len(RunStream::Output), run.len(RunStream::Stdout));
        run.finish(RunStatus::OutputLimit);
        assert_eq!(run.status().render(), "output limit reached\n");
    }
}
