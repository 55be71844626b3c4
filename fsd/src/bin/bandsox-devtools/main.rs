//! `bandsox-devtools`: the benchmark and test tools, kept out of the daemon binary (the
//! Debian package ships only `bandsox`). Used by bench/*.sh and the fs/ scenarios
//! (tests/fs/fsx.sh).
//!
//! - `fsx FILE`: a seeded random exerciser of one file against a local reference copy.
//! - `fslat DIR`: per-call latency of stat, 4 KiB `O_DIRECT` read and create+unlink.
//! - `bench-boot`: boots one VM without the daemon and prints the milliseconds to the
//!   agent's first answer (the boot benchmark's baseline).
//! - `fsbench OP...`: the agent's raw file calls on a VM booted the same way (or a
//!   host-mode agent), one `ok: ...` line per operation.
//! - `mcp --socket SOCK STEP...`: an MCP client of `/v1/mcp` (tests).
//! - `wsterm URL STEP...`: a WebSocket client of the web terminal (tests, benchmarks).
use bandsox_fsd::settings::Settings;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod boot;
mod fsbench;
mod fslat;
mod fsx;
mod mcp;
mod wsterm;

#[derive(Parser)]
#[command(
    name = "bandsox-devtools",
    version,
    about = "BandSox-FS benchmark and test tools (not part of the product)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Exercise a file with random writes, truncates and reads, checked against a local
    /// reference copy (e.g. a file under a VM's fs/); exits non-zero on the first mismatch.
    Fsx {
        file: PathBuf,
        #[arg(long, default_value_t = 2000)]
        ops: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Largest file size produced, in bytes.
        #[arg(long, default_value_t = 4 * 1024 * 1024)]
        max_size: u64,
    },
    /// Median latency of stat, 4 KiB O_DIRECT read and create+unlink in DIR (benchmarks).
    Fslat {
        dir: PathBuf,
        #[arg(long, default_value_t = 200)]
        n: u32,
    },
    /// Benchmark baseline: boot one VM without the daemon, print ms to the agent's answer.
    BenchBoot {
        #[arg(long, env = "BANDSOX_STATE_DIR", default_value = "/var/lib/bandsox")]
        state_dir: PathBuf,
    },
    /// Raw agent file calls, no daemon and no FUSE: boots one VM like bench-boot (or,
    /// with --host-agent, starts that agent in host mode) and runs each OP in order:
    /// `read PATH | write PATH MIB | stat PATH N | read4k PATH N | create DIR N`.
    /// Paths are the guest's (`/root` exists in both modes).
    Fsbench {
        #[arg(long, env = "BANDSOX_STATE_DIR", default_value = "/var/lib/bandsox")]
        state_dir: PathBuf,
        /// A bandsox-agent binary to run in host mode instead of booting a VM.
        #[arg(long)]
        host_agent: Option<PathBuf>,
        #[arg(required = true)]
        ops: Vec<String>,
    },
    /// An MCP client of /v1/mcp over the API's Unix socket: `tools` lists the tools,
    /// `TOOL=JSON` calls one (prints `ok: TEXT` or `error: TEXT`).
    Mcp {
        #[arg(long)]
        socket: String,
        /// Deadline of each step, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        steps: Vec<String>,
    },
    /// A web terminal client: `send=TEXT`, `resize=COLSxROWS`, `expect=TEXT`, `exit`
    /// steps over a WebSocket (see wsterm.rs).
    Wsterm {
        url: String,
        /// An API key (sent in Sec-WebSocket-Protocol).
        #[arg(long, env = "BANDSOX_KEY")]
        key: Option<String>,
        /// An Origin header to send.
        #[arg(long)]
        origin: Option<String>,
        /// Deadline of the whole session, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        steps: Vec<String>,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

fn fsbench(
    state_dir: PathBuf,
    host_agent: Option<PathBuf>,
    ops: &[String],
    settings: &Settings,
) -> Result<(), String> {
    // Parse every operation before booting anything.
    let ops = ops
        .iter()
        .map(|op| {
            let words: Vec<&str> = op.split_whitespace().collect();
            fsbench::FsBench::parse(&words).map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    runtime()?.block_on(async {
        let booted = match &host_agent {
            Some(agent) => boot::host_agent(&state_dir, agent).await?,
            None => boot::boot_vm(&state_dir, &settings.vmm).await?,
        };
        let mut result = Ok(());
        for op in &ops {
            match fsbench::run(&booted.client, op).await {
                Ok(line) => println!("{line}"),
                Err(e) => {
                    result = Err(e.to_string());
                    break;
                }
            }
        }
        booted.finish().await;
        result
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every BANDSOX_* variable, read once.
    let settings = Settings::from_env();
    let result = match cli.cmd {
        Cmd::Fslat { dir, n } => fslat::run(&dir, n).map(|line| println!("{line}")),
        Cmd::Fsx {
            file,
            ops,
            seed,
            max_size,
        } => fsx::run(&fsx::FsxOptions {
            file,
            ops,
            seed,
            max_size,
        }),
        Cmd::BenchBoot { state_dir } => {
            bandsox_fsd::daemon::init_logging(&settings, Some("warn"));
            runtime().and_then(|rt| {
                rt.block_on(async {
                    let booted = boot::boot_vm(&state_dir, &settings.vmm).await?;
                    let ms = booted.ms;
                    booted.finish().await;
                    println!("{ms}");
                    Ok(())
                })
            })
        }
        Cmd::Fsbench {
            state_dir,
            host_agent,
            ops,
        } => {
            bandsox_fsd::daemon::init_logging(&settings, Some("warn"));
            fsbench(state_dir, host_agent, &ops, &settings)
        }
        Cmd::Mcp {
            socket,
            timeout,
            steps,
        } => runtime().and_then(|rt| {
            rt.block_on(mcp::run(
                &socket,
                std::time::Duration::from_secs(timeout),
                &steps,
            ))
        }),
        Cmd::Wsterm {
            url,
            key,
            origin,
            timeout,
            steps,
        } => runtime().and_then(|rt| {
            rt.block_on(wsterm::run(wsterm::Options {
                url,
                key,
                origin,
                timeout: std::time::Duration::from_secs(timeout),
                steps,
            }))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bandsox-devtools: {e}");
            ExitCode::FAILURE
        }
    }
}
