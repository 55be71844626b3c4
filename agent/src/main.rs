//! `bandsox-agent`: PID 1 of a BandSox guest, or a host-mode agent for tests.
//!
//! * init mode (PID 1, or `--init`): mounts, modules, hostname, switch to `/dev/vda`,
//!   then serves the protocol on the virtio-serial port `org.bandsox.agent` and on
//!   AF_VSOCK port 52. Never exits and never panics out of `main`.
//! * host mode (`--listen unix:PATH --root DIR`): serves sessions on a unix socket;
//!   commands run on the host with cwd `DIR`. `PowerOff` or SIGTERM kill our descendants
//!   and exit.
//!
//! Logs go to stderr (the console in PID 1), filtered by `BANDSOX_LOG` (default `info`).
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bandsox_agent::server::transport::{find_virtio_port, FdStream, VsockListener, VSOCK_PORT};
use bandsox_agent::server::{Agent, AgentConfig, PowerOffAction};
use bandsox_agent::{guestnet, init};

const USAGE: &str =
    "usage: bandsox-agent [--init]\n       bandsox-agent --listen unix:PATH [--root DIR]\n\n\
  --init               run as the guest's init (implied when running as PID 1)\n\
  --listen unix:PATH   host mode: serve sessions on a unix socket\n\
  --root DIR           host mode: default working directory of commands (default: cwd)\n\
  environment: BANDSOX_LOG=<tracing filter> (default info)";

struct Args {
    init: bool,
    listen: Option<String>,
    root: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        init: false,
        listen: None,
        root: None,
    };
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--init") => args.init = true,
            Some("--listen") => {
                let v = it.next().ok_or("--listen needs a value (unix:PATH)")?;
                args.listen = Some(v.into_string().map_err(|_| "--listen value is not UTF-8")?);
            }
            Some("--root") => {
                args.root = Some(PathBuf::from(it.next().ok_or("--root needs a directory")?))
            }
            Some("-h") | Some("--help") => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            Some("-V") | Some("--version") => {
                println!("bandsox-agent {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    Ok(args)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BANDSOX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .try_init();
}

fn main() {
    let is_pid1 = std::process::id() == 1;
    if is_pid1 {
        // Before anything opens a file: /dev and fds 0-2.
        init::mount_pseudo(true);
        init::ensure_std_fds();
        // The kernel passes unknown command-line words to init as arguments: ignore them.
        init_logging();
        init_main();
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bandsox-agent: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    init_logging();
    if args.init {
        init_main();
    }
    match args.listen {
        Some(listen) => host_main(&listen, args.root),
        None => {
            eprintln!("bandsox-agent: not PID 1: pass --init or --listen unix:PATH\n{USAGE}");
            std::process::exit(2);
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
}

fn host_main(listen: &str, root: Option<PathBuf>) {
    let Some(path) = listen.strip_prefix("unix:") else {
        eprintln!("bandsox-agent: --listen takes unix:PATH, got {listen:?}");
        std::process::exit(2);
    };
    // A relative --root stays relative to our working directory: the daemon starts an
    // agent that runs as an unprivileged user inside a directory whose ancestors that
    // user cannot traverse, so absolute paths there would not open.
    let root = match root.map_or_else(std::env::current_dir, Ok).and_then(|r| {
        if r.is_relative() && r.is_dir() {
            Ok(r)
        } else {
            r.canonicalize()
        }
    }) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bandsox-agent: bad --root: {e}");
            std::process::exit(2);
        }
    };
    // Orphaned descendants are re-parented to us, so we reap them and can kill them.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        eprintln!(
            "bandsox-agent: cannot become a child subreaper: {}",
            e.desc()
        );
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bandsox-agent: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let agent = Agent::new(AgentConfig::host(root.clone()));
    let code = rt.block_on(async move {
        let _ = std::fs::remove_file(path);
        let listener = match tokio::net::UnixListener::bind(path) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("bandsox-agent: cannot listen on {path}: {e}");
                return 1;
            }
        };
        tracing::info!("listening on unix:{path} (root {})", root.display());
        println!("bandsox-agent: ready");
        let _ = std::io::stdout().flush();
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("bandsox-agent: cannot watch SIGTERM: {e}");
                    return 1;
                }
            };
        loop {
            tokio::select! {
                conn = listener.accept() => match conn {
                    Ok((stream, _)) => {
                        let agent = agent.clone();
                        tokio::spawn(async move {
                            let (r, w) = stream.into_split();
                            agent.serve(r, w).await;
                        });
                    }
                    Err(e) => {
                        tracing::error!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = term.recv() => {
                    tracing::info!("SIGTERM: stopping");
                    bandsox_agent::server::kill_descendants(nix::sys::signal::Signal::SIGKILL);
                    let _ = std::fs::remove_dir_all(&agent.config().script_dir);
                    return 0;
                }
            }
        }
    });
    std::process::exit(code);
}

/// PID 1 (or `--init`): never returns. Panics are caught and the agent restarts serving.
fn init_main() -> ! {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("bandsox-agent: internal error: {info}");
    }));
    let agent = match std::panic::catch_unwind(init_setup) {
        Ok(agent) => agent,
        Err(_) => {
            eprintln!("bandsox-agent: init setup failed; serving anyway");
            Agent::new(init_config())
        }
    };
    // PID 1 must never exit.
    loop {
        let agent = agent.clone();
        let res = std::panic::catch_unwind(move || match runtime() {
            Ok(rt) => rt.block_on(serve_guest(agent)),
            Err(e) => tracing::error!("cannot start the runtime: {e}"),
        });
        if res.is_err() {
            eprintln!("bandsox-agent: serving failed; restarting");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn init_config() -> AgentConfig {
    let image = bandsox_agent::image::ImageConfig::load(std::path::Path::new(
        bandsox_agent::image::IMAGE_CONFIG_PATH,
    ));
    if let Some(c) = &image {
        tracing::info!(
            user = %c.user,
            working_dir = %c.working_dir,
            env = c.env.len(),
            "applying the image config to commands"
        );
    }
    AgentConfig {
        default_cwd: PathBuf::from("/"),
        env: AgentConfig::default_env("/root"),
        script_dir: PathBuf::from("/run/bandsox"),
        power_off: if std::process::id() == 1 {
            PowerOffAction::Halt
        } else {
            PowerOffAction::ExitProcess
        },
        set_hostname: true,
        fs_root: PathBuf::from("/"),
        image,
        machine: std::process::id() == 1,
    }
}

fn init_setup() -> Arc<Agent> {
    init::mount_pseudo(true);
    tracing::info!(
        "bandsox-agent {} starting as init (uptime {})",
        env!("CARGO_PKG_VERSION"),
        init::uptime()
    );
    init::load_modules();
    if let Some(name) = init::name_from_cmdline() {
        init::set_hostname(&name);
    }
    if init::switch_to_disk() {
        init::mount_pseudo(false);
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let net = guestnet::from_cmdline(&cmdline).unwrap_or_else(|e| {
        tracing::error!("ignoring bad {}: {e}", guestnet::CMDLINE_NET_KEY);
        None
    });
    guestnet::apply(net.as_ref());
    Agent::new(init_config())
}

async fn serve_guest(agent: Arc<Agent>) {
    let mut ready = false;
    if std::path::Path::new("/dev/vsock").exists() {
        match VsockListener::bind(VSOCK_PORT) {
            Ok(l) => {
                tracing::info!("listening on vsock port {VSOCK_PORT}");
                announce_ready(&mut ready);
                let agent = agent.clone();
                tokio::spawn(async move {
                    loop {
                        match l.accept().await {
                            Ok(s) => {
                                let agent = agent.clone();
                                tokio::spawn(async move { agent.serve(s.clone(), s).await });
                            }
                            Err(e) => {
                                tracing::error!("vsock accept failed: {e}");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                });
            }
            Err(e) => tracing::error!("cannot listen on vsock port {VSOCK_PORT}: {e}"),
        }
    }
    // The virtio-serial port (QEMU). Keep looking: the device may appear late.
    let mut warned = false;
    let started = std::time::Instant::now();
    loop {
        let Some(dev) = find_virtio_port() else {
            // On vsock-only guests (Firecracker) there is no port to wait for: say so only
            // when nothing serves yet.
            if !warned && !ready && started.elapsed() > Duration::from_secs(3) {
                tracing::warn!("no virtio-serial port named org.bandsox.agent (yet)");
                warned = true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let port = match FdStream::open(&dev) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("cannot open {}: {e}", dev.display());
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        tracing::info!("serving on {}", dev.display());
        announce_ready(&mut ready);
        loop {
            // Each call is one or more sessions; EOF/HUP (no host connected) ends it.
            agent.serve(port.clone(), port.clone()).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn announce_ready(ready: &mut bool) {
    if !*ready {
        *ready = true;
        tracing::info!("serving (uptime {})", init::uptime());
        println!("bandsox-agent: ready");
        let _ = std::io::stdout().flush();
    }
}
