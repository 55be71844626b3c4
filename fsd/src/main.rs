//! `bandsox`: mount the BandSox-FS tree, unmount it, build the guest boot artefacts.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use bandsox_fsd::daemon::{self, MountOptions};
use bandsox_fsd::settings::Settings;

#[derive(Parser)]
#[command(
    name = "bandsox",
    version,
    about = "microVMs driven through a filesystem"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount the tree at MOUNTPOINT (daemonizes unless -f).
    Mount {
        mountpoint: PathBuf,
        /// State directory (VMs, images, logs).
        #[arg(long, env = "BANDSOX_STATE_DIR", default_value = "/var/lib/bandsox")]
        state_dir: PathBuf,
        /// Stay in the foreground, logging to stderr.
        #[arg(short, long)]
        foreground: bool,
        /// FUSE worker threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Only the mounting user may use the mount (no FUSE allow_other; the default lets
        /// every user create VMs, each seeing only their own).
        #[arg(long)]
        private: bool,
        /// Read-only mount: every write answers EROFS.
        #[arg(long)]
        read_only: bool,
        /// The limits file (default: $BANDSOX_LIMITS, else /etc/bandsox/limits).
        #[arg(long)]
        limits: Option<PathBuf>,
    },
    /// Unmount the tree (VMs keep running and are re-adopted by the next mount).
    Unmount { mountpoint: PathBuf },
    /// Internal: started by `mount`; aborts the daemon's FUSE connection if it dies.
    #[command(hide = true)]
    Watchdog {
        #[arg(long)]
        pid: u32,
    },
    /// Check this host (KVM, Firecracker, QEMU, FUSE, cgroup v2, net=tap tools, space, guest
    /// artefacts) and say how to fix each problem; exits non-zero when the default backend
    /// cannot boot a VM.
    Doctor {
        #[arg(long, env = "BANDSOX_STATE_DIR", default_value = "/var/lib/bandsox")]
        state_dir: PathBuf,
        /// The static agent the initramfs should have been built from (default: the
        /// packaged /usr/lib/bandsox/bandsox-agent when installed).
        #[arg(long)]
        agent: Option<PathBuf>,
    },
    /// Run a command in a VM like `docker exec`: its stdout and stderr on ours, our
    /// stdin forwarded, Ctrl-C sent to it, and its exit code as ours (128+N for signal
    /// N, 124 for a timeout). A thin client of VM/exec and VM/runs/<n>/.
    Exec(bandsox_fsd::cli::ExecArgs),
    /// Attach this terminal to a terminal run: start one (the image's shell, or CMD), or
    /// re-attach to run N. Ctrl-] d detaches and leaves the run alive; the exit code is
    /// the run's. A thin client of VM/exec and VM/runs/<n>/terminal.
    Attach(bandsox_fsd::cli::AttachArgs),
    /// Serve the REST API (docs/api.md): own the Unix socket (the caller is the peer's
    /// uid) and optionally a TCP listener (every request needs a key), and hand each
    /// connection to the daemon; answers 503 while the daemon is away.
    Serve {
        /// The Unix socket.
        #[arg(long, default_value = bandsox_fsd::http::front::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Also listen on TCP ADDR:PORT (loopback unless TLS or --insecure-public).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// TLS certificate chain (PEM) for --listen.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// TLS private key (PEM) for --listen.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Allow a non-loopback --listen without TLS (keys cross the network in clear).
        #[arg(long)]
        insecure_public: bool,
        /// Another host name requests may name in Host/Origin (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// The daemon's state directory (its hand-off socket is there).
        #[arg(long, env = "BANDSOX_STATE_DIR", default_value = "/var/lib/bandsox")]
        state_dir: PathBuf,
    },
    /// Manage your API keys (root: everyone's) through the API's Unix socket.
    Keys {
        /// The API's Unix socket.
        #[arg(long, env = "BANDSOX_API_SOCKET", default_value = bandsox_fsd::http::front::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Build the guest kernel, initramfs and the `base` image into the state directory.
    GuestBuild {
        #[arg(long, env = "BANDSOX_STATE_DIR", default_value = "/var/lib/bandsox")]
        state_dir: PathBuf,
        /// The static bandsox-agent binary to use as the guest's /init.
        #[arg(long)]
        agent: PathBuf,
        /// Root of a tree holding boot/vmlinuz-* and lib/modules/<version>/.
        #[arg(long, default_value = "/")]
        kernel_root: PathBuf,
        /// A static busybox binary for the base image.
        #[arg(long)]
        busybox: Option<PathBuf>,
        /// Rebuild even when the inputs did not change.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Make a key NAME acting as you; prints the key (shown this once).
    Add {
        name: String,
        /// Root only: the key acts as this uid.
        #[arg(long)]
        uid: Option<u32>,
    },
    /// List your keys (root: everyone's); never the keys themselves.
    List,
    /// Revoke key NAME; it stops working at once.
    Revoke {
        name: String,
        /// Root only: the key's owner.
        #[arg(long)]
        uid: Option<u32>,
    },
}

/// End a client command (`exec`, `attach`) with the command's own exit code.
fn client_exit(res: Result<i32, String>) -> ! {
    let _ = std::io::Write::flush(&mut std::io::stdout());
    match res {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("bandsox: {e}");
            std::process::exit(255)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every BANDSOX_* variable, read once (see `settings`).
    let settings = Settings::from_env();
    let result = match cli.cmd {
        Cmd::Mount {
            mountpoint,
            state_dir,
            foreground,
            threads,
            private,
            read_only,
            limits,
        } => daemon::mount(MountOptions {
            settings: Settings {
                limits: limits
                    .filter(|l| !l.as_os_str().is_empty())
                    .or(settings.limits),
                ..settings
            },
            mountpoint,
            state_dir,
            foreground,
            threads,
            allow_other: !private,
            read_only,
        }),
        Cmd::Serve {
            socket,
            listen,
            tls_cert,
            tls_key,
            insecure_public,
            hosts,
            state_dir,
        } => {
            daemon::init_logging(&settings, None);
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => Some(bandsox_fsd::http::handoff::TlsFiles { cert, key }),
                _ => None,
            };
            bandsox_fsd::http::front::run(bandsox_fsd::http::front::ServeOptions {
                socket,
                listen,
                tls,
                insecure_public,
                state_dir,
                hosts,
            })
        }
        Cmd::Keys { socket, cmd } => {
            use bandsox_fsd::http::client::{keys, KeysCmd as K};
            let cmd = match cmd {
                KeysCmd::Add { name, uid } => K::Add { name, uid },
                KeysCmd::List => K::List,
                KeysCmd::Revoke { name, uid } => K::Revoke { name, uid },
            };
            keys(&socket, cmd).map(|out| print!("{out}"))
        }
        Cmd::Exec(args) => client_exit(bandsox_fsd::cli::exec(
            &args,
            &bandsox_fsd::cli::mount_of(&settings),
        )),
        Cmd::Attach(args) => client_exit(bandsox_fsd::cli::attach(
            &args,
            &bandsox_fsd::cli::mount_of(&settings),
        )),
        Cmd::Unmount { mountpoint } => daemon::unmount(&mountpoint),
        Cmd::Watchdog { pid } => bandsox_fsd::watchdog::run(pid),
        Cmd::Doctor { state_dir, agent } => {
            daemon::init_logging(&settings, Some("error"));
            let agent = agent.or_else(bandsox_fsd::doctor::default_agent);
            let (report, bootable) =
                bandsox_fsd::doctor::run(&state_dir, agent.as_deref(), &settings);
            print!("{report}");
            if bootable {
                Ok(())
            } else {
                return ExitCode::FAILURE;
            }
        }
        Cmd::GuestBuild {
            state_dir,
            agent,
            kernel_root,
            busybox,
            force,
        } => {
            daemon::init_logging(&settings, None);
            let opts = bandsox_fsd::bootfiles::GuestBuildOptions {
                state_dir,
                agent,
                kernel_root,
                busybox,
                force,
            };
            bandsox_fsd::bootfiles::build_guest(&opts)
                .map(|a| {
                    println!(
                        "kernel {} ({})\ninitrd {}\nimage base {}",
                        a.kernel.display(),
                        a.kernel_version,
                        a.initrd.display(),
                        a.base_image.display()
                    );
                })
                .map_err(|e| e.to_string())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bandsox: {e}");
            ExitCode::FAILURE
        }
    }
}
