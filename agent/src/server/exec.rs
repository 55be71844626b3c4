//! Starting commands and pumping their output.
//!
//! Invariants:
//! * The image config ([`crate::image`]) applies to every command: its `Env` over the
//!   agent's defaults (the request's env over both), its `WorkingDir` unless the request
//!   names one, and its `User` (credentials dropped in the child before `exec`; a user
//!   that cannot be resolved fails the request with a message, it never runs as root).
//! * Every command runs in its own session (`setsid`), so its pid is its process-group id
//!   and `Signal` reaches the whole group.
//! * A stream never has more than its credit (`INITIAL_CREDIT` + granted) of output
//!   bytes outstanding: the pump reads at most the remaining credit from the pipes and
//!   does not read at all while it is zero. Other commands are unaffected.
//! * Commands run with umask 022 and the descriptor limit the agent started with (the
//!   agent itself runs with umask 0 and a raised limit for the file service).
//! * `Exited` is queued after all forwarded output and after the file service's pending
//!   change events (`FsEvents`). After the main process exits, the
//!   pipes are read until EOF, until they have been idle for [`IDLE_AFTER_EXIT`] (a
//!   background child may hold them open forever) or until [`MAX_AFTER_EXIT`] more bytes
//!   or [`MAX_TIME_AFTER_EXIT`] of reading have passed (a background child may write
//!   forever).
//! * When the session is gone the pump keeps reading and drops the bytes, so the command
//!   never blocks on a full pipe.
//! * Stdin bytes are written to the pipe in order; each write is acknowledged with
//!   `StdinCredit` (also when the pipe is gone and the bytes are discarded).
//! * A command started with a terminal (`ExecOptions::tty`) gets a fresh pseudo-terminal
//!   as stdin, stdout, stderr and controlling terminal of its new session; the agent
//!   keeps only the master side (close-on-exec, so no other command inherits it). Its
//!   output is the master's, sent as `Stdout`; stdin bytes go to the master unchanged
//!   (the guest's line discipline turns Ctrl-C into SIGINT, echoes, ...). The stream
//!   ends when every holder of the terminal's slave side has closed it (`EIO`).
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{kill, Signal};
use nix::sys::stat::{umask, Mode};
use nix::unistd::{setgid, setgroups, setsid, setuid, Gid, Pid, Uid};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, Notify};

use super::{Agent, Credit, Out, OutTx, SessionCmd, SessionCmds};
use crate::proto::{
    ExecSpec, ExitStatus, Id, Message, OutStream, Program, Response, TtySize, INITIAL_CREDIT,
};

/// How long the pipes may stay silent after the main process exited.
pub const IDLE_AFTER_EXIT: Duration = Duration::from_millis(100);
/// How many bytes are still forwarded after the main process exited.
pub const MAX_AFTER_EXIT: u64 = 16 * 1024 * 1024;
/// How long output is still forwarded after the main process exited (counting only time
/// in which the stream had credit, so a slow consumer never loses buffered output).
pub const MAX_TIME_AFTER_EXIT: Duration = Duration::from_secs(2);
/// Largest single pipe read.
const READ_BUF: usize = 128 * 1024;
/// Scripts without `#!` up to this size run as `/bin/sh -c SCRIPT`; longer ones are
/// written to a file and run as `/bin/sh FILE`, because Linux limits one argument to
/// 128 KiB (`MAX_ARG_STRLEN`).
pub const MAX_SH_C: usize = 64 * 1024;

pub(crate) enum StdinOp {
    Data(Vec<u8>),
    Close,
}

#[derive(Debug)]
pub(crate) struct ExecError {
    pub errno: i32,
    pub message: String,
}

impl ExecError {
    fn new(errno: i32, message: impl Into<String>) -> Self {
        ExecError {
            errno,
            message: message.into(),
        }
    }
    fn io(what: impl std::fmt::Display, e: &std::io::Error) -> Self {
        ExecError::new(
            e.raw_os_error().unwrap_or(libc::EINVAL),
            format!("{what}: {e}"),
        )
    }
}

fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}

fn no_nul(what: &str, bytes: &[u8]) -> Result<(), ExecError> {
    if bytes.contains(&0) {
        return Err(ExecError::new(
            libc::EINVAL,
            format!("{what} contains a NUL byte"),
        ));
    }
    Ok(())
}

/// Parse a `#!` line into interpreter and optional single argument (Linux semantics).
fn parse_shebang(script: &[u8]) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
    let rest = script.strip_prefix(b"#!")?;
    let line = rest.split(|&b| b == b'\n').next().unwrap_or(rest);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let is_ws = |b: &u8| *b == b' ' || *b == b'\t';
    let start = line.iter().position(|b| !is_ws(b))?;
    let line = &line[start..];
    let end = line.iter().position(is_ws).unwrap_or(line.len());
    let interp = line[..end].to_vec();
    let arg = line[end..]
        .iter()
        .position(|b| !is_ws(b))
        .map(|s| &line[end + s..])
        .map(|a| {
            let e = a.iter().rposition(|b| !is_ws(b)).map_or(0, |e| e + 1);
            a[..e].to_vec()
        })
        .filter(|a| !a.is_empty());
    Some((interp, arg))
}

/// Resolve a user (from `source`: the image's `User` or the command's options) through
/// the guest's `/etc/passwd` and `/etc/group`.
fn resolve_identity(
    root: &std::path::Path,
    user: &str,
    source: &str,
) -> Result<crate::image::Identity, ExecError> {
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_default();
    crate::image::resolve_user(user, source, &read("etc/passwd"), &read("etc/group"))
        .map_err(|m| ExecError::new(libc::EINVAL, m))
}

/// Removes a script file when dropped.
struct ScriptFile(PathBuf);

impl Drop for ScriptFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write_script(agent: &Agent, script: &[u8]) -> Result<ScriptFile, ExecError> {
    let dir = &agent.cfg.script_dir;
    if let Err(e) = std::fs::create_dir_all(dir) {
        return Err(ExecError::io(
            format!("cannot create script directory {}", dir.display()),
            &e,
        ));
    }
    // Traversable (not listable) so a command running as the image's user can open its
    // own script, which is handed to that user.
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711));
    let n = agent.script_seq.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("script-{n}"));
    let res = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o700)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, script));
    match res {
        Ok(()) => Ok(ScriptFile(path)),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(ExecError::io(
                format!("cannot write script {}", path.display()),
                &e,
            ))
        }
    }
}

/// `script` in a file the command (running as the image's user, if any) can read.
fn script_for(
    agent: &Agent,
    script: &[u8],
    ident: Option<&crate::image::Identity>,
) -> Result<ScriptFile, ExecError> {
    let f = write_script(agent, script)?;
    if let Some(id) = ident.filter(|i| i.uid != 0) {
        std::os::unix::fs::chown(&f.0, Some(id.uid), Some(id.gid))
            .map_err(|e| ExecError::io("cannot hand the script to the image user", &e))?;
    }
    Ok(f)
}

/// Start a command for stream `id`: answers `Started` (queued before any output) and
/// spawns its pump; an error is returned for the caller to answer.
/// Per-command options beyond [`ExecSpec`] (see `proto::ExecOptions`).
#[derive(Debug, Default)]
pub(crate) struct Extra {
    pub user: Option<String>,
    pub tty: Option<TtySize>,
}

/// A pseudo-terminal: the master (kept by the agent) and the slave's path.
struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
}

/// Open a pseudo-terminal of `size`, both sides close-on-exec.
fn open_pty(size: TtySize) -> Result<Pty, ExecError> {
    use nix::fcntl::OFlag;
    let err = |what: &str, e: nix::Error| ExecError::new(e as i32, format!("{what}: {}", e.desc()));
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| err("cannot open a pseudo-terminal (/dev/ptmx)", e))?;
    nix::pty::grantpt(&master).map_err(|e| err("grantpt", e))?;
    nix::pty::unlockpt(&master).map_err(|e| err("unlockpt", e))?;
    let name = nix::pty::ptsname_r(&master).map_err(|e| err("ptsname", e))?;
    let slave = nix::fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| err(&format!("cannot open {name}"), e))?;
    let master: OwnedFd = master.into();
    set_winsize(&master, size).map_err(|e| ExecError::io("cannot set the window size", &e))?;
    Ok(Pty { master, slave })
}

/// `TIOCSWINSZ` on a terminal (the kernel signals SIGWINCH to its foreground group).
pub(crate) fn set_winsize(fd: &OwnedFd, size: TtySize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(std::io::Error::from)?;
    Ok(())
}

pub(crate) async fn start(
    agent: &Arc<Agent>,
    id: Id,
    spec: ExecSpec,
    extra: Extra,
    out: OutTx,
    cmds: &Arc<SessionCmds>,
) -> Result<(), ExecError> {
    let image = agent.cfg.image.as_ref();
    if let Some(size) = extra.tty {
        if !size.is_valid() {
            return Err(ExecError::new(
                libc::EINVAL,
                format!(
                    "terminal size {}x{} is out of range 1..{}",
                    size.cols,
                    size.rows,
                    crate::proto::MAX_TTY_DIM
                ),
            ));
        }
    }
    let ident = match (&extra.user, image.filter(|c| !c.user.trim().is_empty())) {
        (Some(u), _) => Some(resolve_identity(&agent.cfg.fs_root, u, "#bandsox user=")?),
        (None, Some(c)) => Some(resolve_identity(
            &agent.cfg.fs_root,
            &c.user,
            "image config User",
        )?),
        (None, None) => None,
    };
    let image_cwd = image
        .map(|c| c.working_dir.as_str())
        .filter(|w| !w.is_empty());
    let cwd = match (&spec.cwd, image_cwd) {
        (Some(c), _) => {
            no_nul("cwd", c)?;
            let p = PathBuf::from(OsString::from_vec(c.clone()));
            agent.cfg.default_cwd.join(p)
        }
        (None, Some(w)) => agent.cfg.default_cwd.join(w),
        (None, None) => agent.cfg.default_cwd.clone(),
    };
    match std::fs::metadata(&cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(ExecError::new(
                libc::ENOTDIR,
                format!("working directory {} is not a directory", cwd.display()),
            ))
        }
        Err(e) => {
            return Err(ExecError::io(
                format!("working directory {}", cwd.display()),
                &e,
            ))
        }
    }

    let mut script_file = None;
    let (mut cmd, what) = match &spec.program {
        Program::Argv(argv) => {
            let Some(first) = argv.first() else {
                return Err(ExecError::new(libc::EINVAL, "empty argv"));
            };
            for a in argv {
                no_nul("argument", a)?;
            }
            if first.is_empty() {
                return Err(ExecError::new(libc::ENOENT, "empty program name"));
            }
            let mut c = Command::new(os(first));
            c.args(argv[1..].iter().map(|a| os(a)));
            (
                c,
                format!("cannot run {:?}", String::from_utf8_lossy(first)),
            )
        }
        Program::Script(script) => match parse_shebang(script) {
            Some((interp, arg)) => {
                no_nul("interpreter line", &interp)?;
                if interp.is_empty() {
                    return Err(ExecError::new(libc::ENOEXEC, "empty #! interpreter line"));
                }
                let f = script_for(agent, script, ident.as_ref())?;
                let mut c = Command::new(os(&interp));
                if let Some(a) = &arg {
                    no_nul("interpreter argument", a)?;
                    c.arg(os(a));
                }
                c.arg(&f.0);
                script_file = Some(f);
                (
                    c,
                    format!(
                        "cannot run script interpreter {:?}",
                        String::from_utf8_lossy(&interp)
                    ),
                )
            }
            None => {
                no_nul("command line", script)?;
                if std::fs::metadata("/bin/sh").is_err() {
                    return Err(ExecError::new(
                        libc::ENOENT,
                        "this image has no /bin/sh to run the command with; start the script \
                         with a #! line naming an interpreter the image has, or use the \
                         image's entrypoint (create ... autostart=1)",
                    ));
                }
                let mut c = Command::new("/bin/sh");
                if script.len() <= MAX_SH_C {
                    c.arg("-c").arg(os(script));
                } else {
                    let f = script_for(agent, script, ident.as_ref())?;
                    c.arg(&f.0);
                    script_file = Some(f);
                }
                (c, "cannot run /bin/sh".to_string())
            }
        },
    };
    cmd.env_clear();
    cmd.envs(agent.cfg.env.iter().map(|(k, v)| (k, v)));
    if let Some(id) = &ident {
        let name = id.name.clone().unwrap_or_else(|| id.uid.to_string());
        cmd.env("HOME", &id.home)
            .env("USER", &name)
            .env("LOGNAME", &name);
    }
    for kv in image.map(|c| c.env.as_slice()).unwrap_or_default() {
        if let Some((k, v)) = kv.split_once('=') {
            if !k.is_empty() && !k.contains('\0') && !v.contains('\0') {
                cmd.env(k, v);
            }
        }
    }
    if extra.tty.is_some() {
        cmd.env("TERM", "xterm-256color");
    }
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains(&b'=') || k.contains(&0) || v.contains(&0) {
            return Err(ExecError::new(
                libc::EINVAL,
                format!(
                    "invalid environment variable {:?}",
                    String::from_utf8_lossy(k)
                ),
            ));
        }
        cmd.env(os(k), os(v));
    }
    cmd.current_dir(&cwd);
    let pty = match extra.tty {
        Some(size) => Some(open_pty(size)?),
        None => None,
    };
    if let Some(p) = &pty {
        let dup = |fd: &OwnedFd| {
            fd.try_clone()
                .map(Stdio::from)
                .map_err(|e| ExecError::io("cannot duplicate the terminal", &e))
        };
        cmd.stdin(dup(&p.slave)?);
        cmd.stdout(dup(&p.slave)?);
        cmd.stderr(dup(&p.slave)?);
    } else {
        cmd.stdin(if spec.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.stdout(Stdio::piped());
        cmd.stderr(Stdio::piped());
    }
    let ctty = pty.is_some();
    let nofile = super::fs::original_nofile_limit();
    // Resolved before the fork: the child only makes syscalls with these values.
    let creds = ident
        .as_ref()
        .filter(|i| i.uid != 0 || i.gid != 0)
        .map(|i| {
            let groups: Vec<Gid> = i.groups.iter().copied().map(Gid::from_raw).collect();
            (Uid::from_raw(i.uid), Gid::from_raw(i.gid), groups)
        });
    // SAFETY: the closure runs between fork and exec, so it must be async-signal-safe:
    // it only makes system calls (setsid, TIOCSCTTY, umask, setrlimit, setgroups, setgid,
    // setuid; nix's wrappers are thin and allocate nothing; an `Errno` becomes an
    // `io::Error` without allocating), reads values computed before the fork and
    // allocates nothing itself.
    unsafe {
        cmd.pre_exec(move || {
            setsid()?;
            // fd 0 is the terminal's slave side by now: make it the session's
            // controlling terminal (nix has no wrapper for TIOCSCTTY).
            if ctty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The agent itself runs with umask 0 (the file service applies modes
            // exactly) and a raised descriptor limit; commands get the usual defaults.
            umask(Mode::from_bits_truncate(0o022));
            if let Some((soft, hard)) = nofile {
                let _ = setrlimit(Resource::RLIMIT_NOFILE, soft, hard);
            }
            if let Some((uid, gid, groups)) = &creds {
                setgroups(groups)?;
                setgid(*gid)?;
                setuid(*uid)?;
            }
            Ok(())
        });
    }

    let (mut child, exit_rx) = agent
        .reaper
        .spawn(&mut cmd)
        .map_err(|e| ExecError::io(&what, &e))?;
    // Our copies of the slave side go now (the stream ends when the command's do).
    drop(cmd);
    let pid = child.id();
    let stdout = child.stdout.take().map(OwnedFd::from);
    let stderr = child.stderr.take().map(OwnedFd::from);
    let stdin = child.stdin.take().map(OwnedFd::from);
    drop(child); // never waited on: the reaper owns that

    let to_rx = |fd: Option<OwnedFd>| fd.and_then(|fd| pipe::Receiver::from_owned_fd(fd).ok());
    let (stdout, stderr, stdin, master) = match pty {
        Some(Pty { master, slave }) => {
            drop(slave);
            let reader = master
                .try_clone()
                .and_then(|r| set_nonblocking(&r).map(|()| r))
                .and_then(pipe::Receiver::from_owned_fd_unchecked)
                .map_err(|e| ExecError::io("cannot read the terminal", &e))?;
            let writer = master
                .try_clone()
                .and_then(pipe::Sender::from_owned_fd_unchecked)
                .map_err(|e| ExecError::io("cannot write the terminal", &e))?;
            (Some(reader), None, Some(writer), Some(Arc::new(master)))
        }
        None => (
            to_rx(stdout),
            to_rx(stderr),
            stdin.and_then(|fd| pipe::Sender::from_owned_fd(fd).ok()),
            None,
        ),
    };
    let wants_stdin = spec.stdin || master.is_some();

    let credit = Arc::new(Credit {
        granted: AtomicU64::new(INITIAL_CREDIT),
        detached: AtomicBool::new(false),
        notify: Notify::new(),
    });
    let (stdin_tx, stdin_task) = if wants_stdin {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(stdin_task(id, stdin, rx, out.clone()));
        (Some(tx), Some(task))
    } else {
        (None, None)
    };
    #[allow(
        clippy::cast_possible_wrap,
        reason = "a pid is below the kernel's pid_max (at most 2^22)"
    )]
    let pgid = pid as i32;
    cmds.lock().insert(
        id,
        SessionCmd {
            credit: credit.clone(),
            stdin: stdin_tx,
            pgid,
            pty: master,
        },
    );
    tracing::debug!(id, pid, "started command");
    // Queued before the pump can queue any output.
    let _ = out
        .send(Out::Msg(Message::Response {
            id,
            resp: Response::Started { pid },
        }))
        .await;
    let pump = Pump {
        agent: agent.clone(),
        id,
        out,
        credit,
        cmds: cmds.clone(),
        stdout,
        stderr,
        exit_rx,
        stdin_task,
        _script: script_file,
    };
    tokio::spawn(pump.run());
    Ok(())
}

async fn stdin_task(
    id: Id,
    mut pipe: Option<pipe::Sender>,
    mut rx: mpsc::UnboundedReceiver<StdinOp>,
    out: OutTx,
) {
    while let Some(op) = rx.recv().await {
        match op {
            StdinOp::Data(data) => {
                if let Some(p) = pipe.as_mut() {
                    if let Err(e) = p.write_all(&data).await {
                        tracing::debug!(id, "stdin closed by the command: {e}");
                        pipe = None;
                    }
                }
                let bytes = data.len() as u64;
                let _ = out.send(Out::Msg(Message::StdinCredit { id, bytes })).await;
            }
            StdinOp::Close => pipe = None,
        }
    }
}

struct Pump {
    agent: Arc<Agent>,
    id: Id,
    out: OutTx,
    credit: Arc<Credit>,
    cmds: Arc<SessionCmds>,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
    exit_rx: oneshot::Receiver<ExitStatus>,
    stdin_task: Option<tokio::task::JoinHandle<()>>,
    _script: Option<ScriptFile>,
}

/// Wait until `p` is readable; pending forever when `p` is `None` or `enabled` is false.
async fn readable(p: &Option<pipe::Receiver>, enabled: bool) -> std::io::Result<()> {
    match p {
        Some(p) if enabled => p.readable().await,
        _ => std::future::pending().await,
    }
}

impl Pump {
    async fn run(mut self) {
        let id = self.id;
        let mut buf = vec![0u8; READ_BUF];
        let mut sent: u64 = 0;
        let mut status: Option<ExitStatus> = None;
        let mut after_exit: u64 = 0;
        let mut read_time_after_exit = Duration::ZERO;
        let mut discard = false;
        loop {
            if self.stdout.is_none() && self.stderr.is_none() {
                break;
            }
            if status.is_some()
                && (after_exit >= MAX_AFTER_EXIT || read_time_after_exit >= MAX_TIME_AFTER_EXIT)
            {
                tracing::debug!(id, "output continues after exit; finishing");
                break;
            }
            if !discard && self.credit.detached.load(Ordering::SeqCst) {
                discard = true;
            }
            let avail = if discard {
                READ_BUF
            } else {
                let granted = self.credit.granted.load(Ordering::SeqCst);
                usize::try_from(granted.saturating_sub(sent)).map_or(READ_BUF, |n| n.min(READ_BUF))
            };
            let exited = status.is_some();
            let idle = async {
                if exited && avail > 0 {
                    tokio::time::sleep(IDLE_AFTER_EXIT).await
                } else {
                    std::future::pending().await
                }
            };
            let waited_from = std::time::Instant::now();
            let which = tokio::select! {
                biased;
                st = &mut self.exit_rx, if !exited => {
                    status = Some(st.unwrap_or_else(|_| {
                        tracing::error!(id, "exit status lost");
                        ExitStatus::Code(255)
                    }));
                    if let Some(t) = self.stdin_task.take() {
                        t.abort();
                    }
                    continue;
                }
                r = readable(&self.stdout, avail > 0) => (OutStream::Stdout, r),
                r = readable(&self.stderr, avail > 0) => (OutStream::Stderr, r),
                _ = self.credit.notify.notified(), if avail == 0 => continue,
                _ = idle => break,
            };
            if exited && avail > 0 {
                read_time_after_exit += waited_from.elapsed();
            }
            let (stream, ready) = which;
            let slot = match stream {
                OutStream::Stdout => &mut self.stdout,
                OutStream::Stderr => &mut self.stderr,
            };
            let res = match (ready, slot.as_ref()) {
                (Ok(()), Some(p)) => p.try_read(&mut buf[..avail]),
                (Err(e), _) => Err(e),
                (_, None) => continue,
            };
            match res {
                Ok(0) => *slot = None,
                Ok(n) => {
                    if exited {
                        after_exit += n as u64;
                    }
                    if discard {
                        continue;
                    }
                    sent += n as u64;
                    let msg = Message::Output {
                        id,
                        stream,
                        data: buf[..n].to_vec(),
                    };
                    if self.out.send(Out::Msg(msg)).await.is_err() {
                        discard = true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(id, "reading {stream:?}: {e}");
                    *slot = None;
                }
            }
        }
        // Close our read ends (a background writer gets SIGPIPE/EPIPE from now on).
        self.stdout = None;
        self.stderr = None;
        let status = match status {
            Some(s) => s,
            None => (&mut self.exit_rx).await.unwrap_or(ExitStatus::Code(255)),
        };
        if let Some(t) = self.stdin_task.take() {
            t.abort();
        }
        self.cmds.lock().remove(&id);
        tracing::debug!(id, %status, "command exited");
        if !discard {
            // The command's file changes are announced before its end.
            self.agent.fs.flush_events(&self.out).await;
            let _ = self
                .out
                .send(Out::Msg(Message::Exited { id, status }))
                .await;
        }
    }
}

/// Send `sig` to every descendant of this process (found through `/proc`).
pub fn kill_descendants(sig: Signal) {
    let me = std::process::id();
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                let ppid = stat
                    .rfind(')')
                    .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
                    .and_then(|p| p.parse::<u32>().ok());
                if let Some(ppid) = ppid {
                    parents.push((pid, ppid));
                }
            }
        }
    }
    let mut found = vec![me];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        for &(pid, ppid) in &parents {
            if ppid == p && !found.contains(&pid) {
                found.push(pid);
            }
        }
        i += 1;
    }
    for pid in found.into_iter().skip(1) {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = kill(Pid::from_raw(pid), sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_shebang;

    #[test]
    fn shebang() {
        assert_eq!(
            parse_shebang(b"#!/bin/sh\nexit 3\n"),
            Some((b"/bin/sh".to_vec(), None))
        );
        assert_eq!(
            parse_shebang(b"#! /usr/bin/env  python3 -u \r\nprint(1)"),
            Some((b"/usr/bin/env".to_vec(), Some(b"python3 -u".to_vec())))
        );
        assert_eq!(parse_shebang(b"#!"), None);
        assert_eq!(parse_shebang(b"echo hi"), None);
    }
}
