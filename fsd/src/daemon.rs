//! Process plumbing of the daemon: logging, daemonizing, mounting and unmounting.
//!
//! Order of `mount`: fork into the background (before any thread exists), start the
//! tokio runtime, open the state directory, start re-adopting VMs left running by an
//! earlier daemon (in the background: each VM shows `adopting` until it is done, and the
//! mount never waits for a guest), start the watchdog, clear a stale mount left by a
//! killed daemon (found in the mount table, its connection aborted: see
//! [`crate::watchdog`]) and mount right after, and only once the mount answers a request
//! (`README` stats through FUSE) tell the waiting parent, and systemd (`READY=1` on
//! `$NOTIFY_SOCKET`, for `Type=notify`), that the tree is up.
//! SIGTERM/SIGINT send `STOPPING=1` and unmount cleanly; VMs keep running.
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{Config, MountOption, SessionACL};
use tracing_subscriber::EnvFilter;

use crate::fuse::BandsoxFs;
use crate::guestfs::GuestFs;
use crate::manager::Manager;
use crate::settings::Settings;
use crate::vfs::Vfs;

pub struct MountOptions {
    pub mountpoint: PathBuf,
    pub state_dir: PathBuf,
    pub foreground: bool,
    pub threads: usize,
    /// Let every user use the mount (FUSE `allow_other`); false = the mounting user only.
    pub allow_other: bool,
    /// Mount read-only: every write answers EROFS.
    pub read_only: bool,
    /// Every `BANDSOX_*` variable, read at start; `limits` is `--limits` when given.
    pub settings: Settings,
}

/// How long the daemon waits for its own mount to answer before giving up on readiness.
const READY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// Tell systemd (when it started us with `NOTIFY_SOCKET`) how we are; a no-op otherwise.
fn notify(states: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!("sd_notify: {e}");
        }
    }
}

/// Logs go to stderr (the daemon log file when daemonized), filtered by `BANDSOX_LOG`.
pub fn init_logging(settings: &Settings, default: Option<&str>) {
    let filter = settings
        .log
        .as_deref()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(default.unwrap_or("info")));
    // Spans (VM lifecycle steps, at debug level) log their duration when they close;
    // thread names tie a FUSE reply's line to fuser's line naming the request.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_thread_names(true)
        // Colours only on a terminal: daemon.log stays plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn lazy_unmount(path: &Path) -> Result<(), String> {
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err("mount point contains a NUL byte".to_string());
    }
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(|e| {
        format!(
            "cannot unmount {}: {}",
            path.display(),
            std::io::Error::from(e)
        )
    })
}

/// `bandsox unmount`: detach the tree (found in the mount table, never `stat`ed, so a
/// mount whose daemon died cannot block this).
pub fn unmount(mountpoint: &Path) -> Result<(), String> {
    let mp = crate::watchdog::absolute(mountpoint);
    match crate::watchdog::mount_at(&mp) {
        None => Err(format!("{} is not mounted", mountpoint.display())),
        Some(_) => lazy_unmount(&mp),
    }
}

/// Fork; the parent waits until the child reports the mount is up. Returns in the child
/// with the write end of the readiness pipe.
fn daemonize(log: &Path) -> Result<Option<OwnedFd>, String> {
    use nix::unistd::{dup2_stderr, dup2_stdin, dup2_stdout, fork, pipe2, setsid, ForkResult};
    let (rd, wr) = pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("pipe: {}", std::io::Error::from(e)))?;
    // SAFETY: no other threads exist yet (called before the runtime starts), so the child
    // may do anything the parent could.
    match unsafe { fork() } {
        Err(e) => Err(format!("fork: {}", std::io::Error::from(e))),
        Ok(ForkResult::Child) => {
            drop(rd);
            // Detaches us from the terminal; cannot fail in a fresh child (not a group
            // leader).
            let _ = setsid();
            let logf = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map_err(|e| format!("{}: {e}", log.display()))?;
            let null = std::fs::File::open("/dev/null").map_err(|e| e.to_string())?;
            // The standard streams become /dev/null and the log.
            let _ = dup2_stdin(&null);
            let _ = dup2_stdout(&logf);
            let _ = dup2_stderr(&logf);
            Ok(Some(wr))
        }
        Ok(ForkResult::Parent { .. }) => {
            drop(wr);
            let mut f = std::fs::File::from(rd);
            let mut b = [0u8; 1];
            match f.read(&mut b) {
                Ok(1) => Ok(None),
                _ => Err(format!("the daemon failed to start; see {}", log.display())),
            }
        }
    }
}

/// Raise the soft open-file limit to the hard one: every running command holds three
/// spool files, and the default limits (`limits::LimitSet::defaults`) follow this one.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        // Capped: VMMs inherit it, and some programs size tables by it.
        let want = hard.min(1 << 20);
        if want > soft {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
                tracing::warn!("cannot raise the open-file limit from {soft} to {want}: {e}");
            }
        }
    }
}

pub fn mount(opts: MountOptions) -> Result<(), String> {
    std::fs::create_dir_all(&opts.state_dir)
        .map_err(|e| format!("{}: {e}", opts.state_dir.display()))?;
    // Before the fork, so a refused second daemon says why on the caller's terminal;
    // the child inherits the lock and holds it until it exits.
    let state_lock = crate::watchdog::lock_state_dir(&opts.state_dir)?;
    let ready = if opts.foreground {
        None
    } else {
        match daemonize(&opts.state_dir.join("daemon.log"))? {
            None => {
                // Parent: the child mounted successfully. Dropping the lock would
                // unlock the description the child shares (`Flock`'s drop unlocks).
                std::mem::forget(state_lock);
                return Ok(());
            }
            Some(w) => Some(w),
        }
    };
    init_logging(&opts.settings, None);
    let host_backend = opts.settings.host_agent.is_some();
    if host_backend {
        tracing::warn!(
            "TEST BACKEND: BANDSOX_HOST_AGENT is set, so VMs are host processes, not virtual \
             machines; every command runs on this host (as the VM's owner when the daemon \
             is root). Never use it for a shared service."
        );
        crate::vmm::host::check_mount(opts.allow_other, nix::unistd::geteuid().is_root())?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .thread_name("bandsox-rt")
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    raise_open_file_limit();
    let backends = crate::backends::detect(&opts.settings);
    // Decide (and log) once whether VMMs get cgroups.
    let _ = crate::cgroup::support();
    crate::testhook::arm(opts.settings.test_pause_at.as_deref());
    let mgr = Manager::open(opts.state_dir.clone(), backends, opts.settings.clone())
        .map_err(|e| e.to_string())?;
    mgr.events
        .emit("", "daemon-start", &format!("pid={}", std::process::id()));
    rt.block_on(mgr.reload());
    // Pools start after the VMs are known (their leftover clones are not VMs).
    rt.block_on(async { mgr.start_pools() });
    {
        let _rt = rt.enter();
        let weak = Arc::downgrade(&mgr);
        let vm_dirs = move || {
            let m = weak.upgrade()?;
            let dirs = m.list().iter().map(|vm| vm.dir.clone()).collect();
            Some(dirs)
        };
        crate::logcap::spawn(vm_dirs, mgr.limits.clone());
    }

    // Everything the mount needs is made first: between the removal of a dead mount and
    // the new one the mount point is the bare directory (and the adoptions run
    // meanwhile), so that gap holds nothing but the mount itself.
    let mut watchdog = crate::watchdog::spawn();
    let vfs = Arc::new(Vfs::new(mgr.clone()));
    let guest = GuestFs::new(mgr.clone(), rt.handle().clone());
    let fs = BandsoxFs::new(vfs.clone(), guest.clone(), rt.handle().clone());
    // The HTTP adapter beside the FUSE one, over the same core: it serves the connections
    // `bandsox serve` hands over (docs/api.md). Without it the tree still works, so a
    // failure here is logged, not fatal.
    match crate::http::Api::new(mgr.clone(), vfs.clone(), guest.clone()) {
        Ok(api) => {
            let _rt = rt.enter();
            if let Err(e) = crate::http::start(api, &opts.state_dir) {
                tracing::warn!("http: the API hand-off socket: {e}; `bandsox serve` answers 503");
            }
        }
        Err(e) => tracing::warn!("http: the API key store: {e}; `bandsox serve` answers 503"),
    }

    // Never stat the mount point before an earlier mount is gone: if its daemon died,
    // the stat would wait forever.
    let mountpoint = crate::watchdog::absolute(&opts.mountpoint);
    let dead = !crate::watchdog::recorded_daemon_alive(&opts.state_dir);
    if crate::watchdog::clear_mount(&mountpoint, dead)? {
        tracing::warn!("cleared an earlier mount at {}", mountpoint.display());
    }
    std::fs::create_dir_all(&mountpoint).map_err(|e| format!("{}: {e}", mountpoint.display()))?;
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("bandsox".into()),
        MountOption::Subtype("bandsox".into()),
        MountOption::DefaultPermissions,
        MountOption::NoSuid,
        MountOption::NoDev,
    ];
    if opts.read_only {
        // The kernel answers EROFS to every write, mkdir, rmdir and open for writing.
        config.mount_options.push(MountOption::RO);
    }
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    let session = fuser::Session::new(fs, &mountpoint, &config)
        .map_err(|e| format!("mount {}: {e}", mountpoint.display()))?;
    tracing::info!("mounted {}", mountpoint.display());
    crate::watchdog::write_pid_file(&opts.state_dir, watchdog.as_ref().map(|(c, _)| c.id()));
    if let Some((_, stdin)) = watchdog.as_mut() {
        match crate::watchdog::mount_at(&mountpoint) {
            Some(entry) => {
                let _ = writeln!(stdin, "{} {}", entry.connection(), mountpoint.display());
            }
            None => tracing::warn!("the new mount is not in the mount table; no watchdog"),
        }
    }
    let dev = std::os::fd::AsFd::as_fd(&session)
        .try_clone_to_owned()
        .inspect_err(|e| tracing::warn!("cannot duplicate the FUSE descriptor: {e}"))
        .ok();
    guest.set_invalidator(Arc::new(crate::fuse::KernelInvalidator {
        notifier: session.notifier(),
        dev,
    }));
    {
        // stat(2) of the mount point is a FUSE request: it can only be answered once the
        // session below runs, so ask from another thread; the first answer means ready.
        let mp = mountpoint.clone();
        let mut ready = ready.map(std::fs::File::from);
        std::thread::spawn(move || {
            let t0 = std::time::Instant::now();
            while std::fs::metadata(mp.join("README")).is_err() {
                if t0.elapsed() > READY_DEADLINE {
                    tracing::error!("{} did not answer within {READY_DEADLINE:?}", mp.display());
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            tracing::info!("{} answers: ready", mp.display());
            if let Some(f) = ready.as_mut() {
                let _ = f.write_all(b"1");
            }
            notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&format!("serving {}", mp.display())),
            ]);
            raise_readahead(&mp, 1024);
        });
    }
    {
        let _rt = rt.enter();
        crate::fuse::invalidate_vm_entries(vfs, session.notifier());
    }

    let mp = mountpoint.clone();
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("signal received; unmounting {}", mp.display());
        notify(&[sd_notify::NotifyState::Stopping]);
        if let Err(e) = lazy_unmount(&mp) {
            tracing::error!("{e}");
        }
    });

    let res = session.run().map_err(|e| format!("FUSE session: {e}"));
    if let Some((mut child, stdin)) = watchdog.take() {
        drop(stdin);
        let _ = child.kill();
        let _ = child.wait();
    }
    crate::watchdog::remove_pid_file(&opts.state_dir);
    mgr.events.emit("", "daemon-stop", "unmounted");
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    res
}

/// The kernel caps a FUSE mount's readahead at its backing device's default (128 KiB),
/// whatever the filesystem asked for; raise it so sequential reads of guest files go out
/// as 1 MiB requests. Best effort: a failure only costs read throughput.
fn raise_readahead(mountpoint: &Path, kib: u32) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match std::fs::write(&knob, kib.to_string()) {
        Ok(()) => tracing::debug!("{knob} = {kib}"),
        Err(e) => tracing::info!("cannot raise readahead ({knob}): {e}"),
    }
}
