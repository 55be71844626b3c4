//! `bandsox exec` and `bandsox attach`: thin clients of the tree's files.
//!
//! Everything they do can be done with shell redirections: a run is started by writing
//! `#bandsox key=value...` plus the command to `<vm>/exec` and reading `runs/last`; its
//! output is read from `runs/<n>/stdout`/`stderr` (or `terminal`), input goes to
//! `runs/<n>/stdin` (or `terminal`), signals and window sizes to `runs/<n>/ctl` and
//! `runs/<n>/winsize`, and the exit status comes from `runs/<n>/status`. There is no
//! private channel to the daemon.
//!
//! Invariants:
//! - The local terminal is restored on every exit path of a raw-mode session: normal
//!   end, detach, errors (the guard's `Drop` and an explicit restore before
//!   `process::exit`), panics (a panic hook) and SIGTERM/SIGHUP/SIGQUIT/SIGINT (a
//!   signal thread restores and exits).
//! - INT, TERM, HUP, QUIT and WINCH are blocked in every thread and taken by one
//!   `sigwait` thread, so the daemon never sees them pending on a waiting reader (it
//!   would answer EINTR and interrupt the command itself): forwarding happens once,
//!   through `runs/<n>/ctl` (or, on a terminal, as the keystroke it is).
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use nix::sys::signal::{SigSet, Signal};

use crate::manager::execopts::shell_quote;

/// The default mount point (`BANDSOX_MOUNT` overrides it).
pub const DEFAULT_MOUNT: &str = "/mnt/bandsox";

/// The byte that starts the detach sequence (Ctrl-]), followed by `d`.
pub const ESCAPE: u8 = 0x1d;

/// Exit code of a command stopped by its timeout (as coreutils `timeout`).
pub const TIMEOUT_EXIT: i32 = 124;

type Res<T> = std::result::Result<T, String>;

/// Options of `bandsox exec`.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ExecArgs {
    /// A VM name under the mount (BANDSOX_MOUNT, default /mnt/bandsox) or a VM's path.
    pub vm: String,
    /// Give the command a terminal (raw mode here, window size followed).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// KEY=VALUE in the command's environment (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the guest.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Run as USER[:GROUP] (names or numbers from the guest's /etc/passwd).
    #[arg(long, short = 'u', value_name = "USER")]
    pub user: Option<String>,
    /// Stop the command after SECONDS (SIGTERM, then SIGKILL 5 s later); `none`
    /// overrides the VM's exec_timeout.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<String>,
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// Options of `bandsox attach`.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct AttachArgs {
    /// A VM name under the mount (BANDSOX_MOUNT, default /mnt/bandsox) or a VM's path.
    pub vm: String,
    /// Re-attach to this terminal run (its screen is redrawn first).
    #[arg(long, value_name = "N")]
    pub run: Option<u64>,
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// A VM directory: a path, or a name under the mount.
pub fn resolve_vm(arg: &str) -> Res<PathBuf> {
    let p = Path::new(arg);
    let dir = if arg.contains('/') || (p.is_dir() && p.join("exec").exists()) {
        p.to_path_buf()
    } else {
        let mount = std::env::var_os("BANDSOX_MOUNT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_MOUNT));
        mount.join(arg)
    };
    match std::fs::metadata(dir.join("exec")) {
        Ok(_) => Ok(dir),
        Err(e) => Err(format!(
            "{}: not a VM directory ({e}); give a VM name under {} (BANDSOX_MOUNT) or a VM's path",
            dir.display(),
            std::env::var("BANDSOX_MOUNT").unwrap_or_else(|_| DEFAULT_MOUNT.into())
        )),
    }
}

/// The command line for `argv`: `exec` plus each word shell-quoted.
fn command_line(argv: &[String]) -> String {
    let words: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
    format!("exec {}", words.join(" "))
}

fn io_err(what: impl std::fmt::Display, e: std::io::Error) -> String {
    format!("{what}: {e}")
}

/// The reason the VM's `ctl` gives for the caller's last failure, if any.
fn ctl_reason(vm: &Path) -> String {
    std::fs::read_to_string(vm.join("ctl"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| s.starts_with("error:"))
        .map(|s| format!(" ({s})"))
        .unwrap_or_default()
}

/// Start a run the way a shell would: write the options line and the command to
/// `exec` in one write, close (checking close's result), and read `runs/last`.
pub fn start_run(vm: &Path, options: &[String], command: &str) -> Res<u64> {
    let mut text = String::from("#bandsox wait=0");
    for o in options {
        text.push(' ');
        text.push_str(o);
    }
    text.push('\n');
    text.push_str(command);
    text.push('\n');
    let f = OpenOptions::new()
        .write(true)
        .open(vm.join("exec"))
        .map_err(|e| io_err(format!("{}/exec", vm.display()), e))?;
    let mut f = f;
    if let Err(e) = f.write_all(text.as_bytes()) {
        return Err(format!("cannot start the command: {e}{}", ctl_reason(vm)));
    }
    // close(2) here, not on drop: its errno is the one of a lost run.
    if let Err(e) = nix::unistd::close(f) {
        let e = std::io::Error::from(e);
        return Err(format!("cannot start the command: {e}{}", ctl_reason(vm)));
    }
    let target = std::fs::read_link(vm.join("runs/last"))
        .map_err(|e| io_err(format!("{}/runs/last", vm.display()), e))?;
    target
        .to_string_lossy()
        .parse()
        .map_err(|_| format!("runs/last points at {}", target.display()))
}

/// The exit code `status` stands for: `N`; `signal N` → 128+N; `timeout ...` → 124;
/// anything else (lost, output limit) → 255 with a message.
pub fn exit_code(status: &str) -> (i32, Option<String>) {
    let s = status.trim();
    if let Ok(n) = s.parse::<i32>() {
        return (n, None);
    }
    if let Some(sig) = s
        .strip_prefix("signal ")
        .and_then(|n| n.parse::<i32>().ok())
    {
        return (128 + sig, None);
    }
    if s.starts_with("timeout") {
        return (TIMEOUT_EXIT, Some(format!("the command was stopped: {s}")));
    }
    (255, Some(format!("the command ended with status: {s}")))
}

fn read_status(run: &Path) -> Res<String> {
    // `stdout` ends only after the status left `running`; allow a moment anyway.
    for _ in 0..50 {
        let s = std::fs::read_to_string(run.join("status"))
            .map_err(|e| io_err(run.join("status").display(), e))?;
        if s.trim() != "running" {
            return Ok(s);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Err("the run is still running".into())
}

fn write_file(path: &Path, text: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).open(path)?;
    f.write_all(text)
}

/// Block the signals this client handles itself, in this thread and every thread
/// started after (see the module docs).
fn block_signals(extra: &[Signal]) -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ]
    .iter()
    .chain(extra)
    {
        set.add(*s);
    }
    let _ = set.thread_block();
    set
}

/// Copy `from` to `to` until EOF (the run ended) or an error.
fn pump(mut from: File, to: &mut dyn Write) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        to.flush()?;
    }
}

fn header(args: &ExecArgs) -> Res<Vec<String>> {
    let mut o = Vec::new();
    for e in &args.env {
        if !e.contains('=') {
            return Err(format!("--env {e}: expected KEY=VALUE"));
        }
        o.push(shell_quote(&format!("env={e}")));
    }
    if let Some(c) = &args.cwd {
        o.push(shell_quote(&format!("cwd={c}")));
    }
    if let Some(u) = &args.user {
        o.push(shell_quote(&format!("user={u}")));
    }
    if let Some(t) = &args.timeout {
        o.push(shell_quote(&format!("timeout={t}")));
    }
    Ok(o)
}

/// `bandsox exec`: returns the process exit code.
pub fn exec(args: &ExecArgs) -> Res<i32> {
    if args.cmd.is_empty() {
        return Err("no command given (bandsox exec VM [options] -- CMD ...)".into());
    }
    let vm = resolve_vm(&args.vm)?;
    let mut opts = header(args)?;
    if args.tty {
        let size = local_size().unwrap_or((80, 24));
        opts.push(format!("tty={}x{}", size.0, size.1));
        let sigs = block_signals(&[Signal::SIGWINCH]);
        let n = start_run(&vm, &opts, &command_line(&args.cmd))?;
        return terminal_session(&vm, n, sigs, false);
    }
    let sigs = block_signals(&[]);
    let n = start_run(&vm, &opts, &command_line(&args.cmd))?;
    let run = vm.join("runs").join(n.to_string());

    // Signals go to the command through its ctl.
    {
        let ctl = run.join("ctl");
        std::thread::spawn(move || loop {
            let Ok(sig) = sigs.wait() else { return };
            let _ = write_file(&ctl, format!("kill {}\n", sig as i32).as_bytes());
        });
    }
    // Stdin is forwarded, then closed.
    {
        let run = run.clone();
        std::thread::spawn(move || {
            let stdin_path = run.join("stdin");
            let mut buf = vec![0u8; 64 * 1024];
            let mut input = std::io::stdin().lock();
            let mut out = OpenOptions::new().write(true).open(&stdin_path).ok();
            loop {
                match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let ok = out.as_mut().is_some_and(|f| f.write_all(&buf[..n]).is_ok());
                        if !ok {
                            return; // the command stopped reading (EPIPE): nothing to close
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            drop(out);
            let _ = write_file(&run.join("ctl"), b"close-stdin\n");
        });
    }
    let open =
        |name: &str| File::open(run.join(name)).map_err(|e| io_err(run.join(name).display(), e));
    let (out, err) = (open("stdout")?, open("stderr")?);
    let errs = std::thread::spawn(move || pump(err, &mut std::io::stderr()));
    let r1 = pump(out, &mut std::io::stdout());
    let r2 = errs
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("stderr thread failed")));
    if let Err(e) = r1.and(r2) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(format!("reading the command's output: {e}"));
        }
    }
    let (code, msg) = exit_code(&read_status(&run)?);
    if let Some(m) = msg {
        eprintln!("bandsox: {m}");
    }
    Ok(code)
}

/// The root user's shell from the guest's `/etc/passwd`, when it exists there;
/// otherwise `/bin/sh`.
fn default_shell(vm: &Path) -> String {
    let passwd = std::fs::read_to_string(vm.join("fs/etc/passwd")).unwrap_or_default();
    passwd
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 7 && f[2] == "0").then(|| f[6].to_string())
        })
        .find(|sh| {
            !sh.is_empty()
                && sh.starts_with('/')
                && std::fs::metadata(vm.join("fs").join(sh.trim_start_matches('/'))).is_ok()
        })
        .unwrap_or_else(|| "/bin/sh".into())
}

/// `bandsox attach`: returns the process exit code.
pub fn attach(args: &AttachArgs) -> Res<i32> {
    let vm = resolve_vm(&args.vm)?;
    let sigs = block_signals(&[Signal::SIGWINCH]);
    let n = match args.run {
        Some(n) => {
            let run = vm.join("runs").join(n.to_string());
            std::fs::metadata(&run).map_err(|e| io_err(run.display(), e))?;
            if std::fs::metadata(run.join("terminal")).is_err() {
                return Err(format!(
                    "run {n} has no terminal (start one with bandsox attach VM or #bandsox tty=)"
                ));
            }
            n
        }
        None => {
            let size = local_size().unwrap_or((80, 24));
            let cmd = if args.cmd.is_empty() {
                format!("exec {}", shell_quote(&default_shell(&vm)))
            } else {
                command_line(&args.cmd)
            };
            start_run(&vm, &[format!("tty={}x{}", size.0, size.1)], &cmd)?
        }
    };
    terminal_session(&vm, n, sigs, true)
}

/// The local terminal's size (cols, rows), if stdin is a terminal.
fn local_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the valid pointer.
    let rc = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

/// The terminal settings to restore, shared with the panic hook and signal thread.
static SAVED: std::sync::Mutex<Option<nix::sys::termios::Termios>> = std::sync::Mutex::new(None);

fn restore_terminal() {
    let saved = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(t) = saved {
        let _ =
            nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &t);
    }
}

/// Raw mode while alive; the previous settings come back on drop.
struct RawMode;

impl RawMode {
    fn enter() -> Option<RawMode> {
        use nix::sys::termios;
        let stdin = std::io::stdin();
        let orig = termios::tcgetattr(&stdin).ok()?;
        let mut raw = orig.clone();
        termios::cfmakeraw(&mut raw);
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(orig);
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            prev(info);
        }));
        if termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &raw).is_err() {
            restore_terminal();
            return None;
        }
        Some(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Restore the terminal and end the process with `code`.
fn leave(code: i32, msg: Option<String>) -> ! {
    restore_terminal();
    if let Some(m) = msg {
        eprintln!("{m}");
    }
    let _ = std::io::stdout().flush();
    std::process::exit(code)
}

/// Forward keystrokes to `terminal`; with `detach`, Ctrl-] d leaves the run alive.
fn forward_keys(terminal: PathBuf, vm: String, n: u64, detach: bool) {
    let Ok(mut out) = OpenOptions::new().write(true).open(&terminal) else {
        return;
    };
    let mut input = std::io::stdin().lock();
    let mut buf = vec![0u8; 4096];
    let mut escape = false;
    loop {
        let got = match input.read(&mut buf) {
            Ok(0) => return,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut send = Vec::with_capacity(got + 1);
        for &b in &buf[..got] {
            if !detach {
                send.push(b);
            } else if escape {
                escape = false;
                match b {
                    b'd' => {
                        let _ = out.write_all(&send);
                        leave(
                            0,
                            Some(format!(
                                "\r\n[detached from run {n}; re-attach: bandsox attach {vm} --run {n}]\r"
                            )),
                        );
                    }
                    ESCAPE => send.push(ESCAPE),
                    other => {
                        send.push(ESCAPE);
                        send.push(other);
                    }
                }
            } else if b == ESCAPE {
                escape = true;
            } else {
                send.push(b);
            }
        }
        if !send.is_empty() && out.write_all(&send).is_err() {
            return; // the run ended (EPIPE): the output side notices and exits
        }
    }
}

/// A raw-mode session on run `n`'s terminal until it ends (its exit code) or detaches.
fn terminal_session(vm: &Path, n: u64, sigs: SigSet, detach: bool) -> Res<i32> {
    let run = vm.join("runs").join(n.to_string());
    // Our size first, so the redraw (and the application, through SIGWINCH) fits.
    if let Some((c, r)) = local_size() {
        let _ = write_file(&run.join("winsize"), format!("{c}x{r}\n").as_bytes());
    }
    let term =
        File::open(run.join("terminal")).map_err(|e| io_err(run.join("terminal").display(), e))?;
    let raw = RawMode::enter();
    {
        let winsize = run.join("winsize");
        std::thread::spawn(move || loop {
            let Ok(sig) = sigs.wait() else { return };
            if sig == Signal::SIGWINCH {
                if let Some((c, r)) = local_size() {
                    let _ = write_file(&winsize, format!("{c}x{r}\n").as_bytes());
                }
                continue;
            }
            // The session ends here; the run stays (re-attach with --run).
            leave(128 + sig as i32, None);
        });
    }
    {
        let (t, name) = (run.join("terminal"), vm.display().to_string());
        std::thread::spawn(move || forward_keys(t, name, n, detach));
    }
    let res = pump(term, &mut std::io::stdout());
    drop(raw);
    if let Err(e) = res {
        return Err(format!("reading the terminal: {e}"));
    }
    let (code, msg) = exit_code(&read_status(&run)?);
    if let Some(m) = msg {
        eprintln!("bandsox: {m}");
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code("0\n"), (0, None));
        assert_eq!(exit_code("7\n").0, 7);
        assert_eq!(exit_code("signal 9\n").0, 137);
        assert_eq!(exit_code("timeout signal 15\n").0, TIMEOUT_EXIT);
        assert_eq!(exit_code("lost: vm died\n").0, 255);
    }

    #[test]
    fn argv_is_quoted() {
        assert_eq!(
            command_line(&["echo".into(), "a b".into(), "it's".into()]),
            "exec echo 'a b' \"it's\""
        );
    }
}
