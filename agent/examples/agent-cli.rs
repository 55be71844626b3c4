//! A tiny command-line client for poking at an agent by hand.
//!
//! ```text
//! cargo run -p bandsox-agent --example agent-cli -- SOCKET ping
//! cargo run -p bandsox-agent --example agent-cli -- SOCKET exec 'uname -a'
//! cargo run -p bandsox-agent --example agent-cli -- SOCKET poweroff
//! ```
//! `SOCKET` is a unix socket path: a host-mode agent's `--listen` socket or QEMU's
//! virtio-serial chardev socket. `exec` copies the command's stdout/stderr and exits with
//! its status (128+N for signal N).
use std::io::Write;
use std::time::{Duration, Instant};

use bandsox_agent::client::{AgentClient, ExecEvent};
use bandsox_agent::proto::{ExecSpec, ExitStatus, OutStream, Program, Request};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: agent-cli SOCKET ping|poweroff|sync|exec COMMAND");
        std::process::exit(2);
    }
    let start = Instant::now();
    let stream = match tokio::net::UnixStream::connect(&args[0]).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("agent-cli: connect {}: {e}", args[0]);
            std::process::exit(1);
        }
    };
    let (c, info) = match AgentClient::connect(stream, Duration::from_secs(30)).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("agent-cli: handshake: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("agent-cli: connected in {:?}: {info:?}", start.elapsed());
    let t = Duration::from_secs(30);
    let code = match args[1].as_str() {
        "ping" => match c.ping(t).await {
            Ok(rtt) => {
                println!("pong in {rtt:?}");
                0
            }
            Err(e) => {
                eprintln!("agent-cli: {e}");
                1
            }
        },
        "poweroff" | "sync" => {
            let req = if args[1] == "sync" {
                Request::Sync
            } else {
                Request::PowerOff
            };
            match c.request(req, t).await {
                Ok(r) => {
                    println!("{r:?}");
                    0
                }
                Err(e) => {
                    eprintln!("agent-cli: {e}");
                    1
                }
            }
        }
        "exec" => {
            let spec = ExecSpec {
                program: Program::Script(args[2..].join(" ").into_bytes()),
                env: vec![],
                cwd: None,
                stdin: false,
            };
            match c.exec(spec, t).await {
                Ok(mut h) => loop {
                    match h.next().await {
                        Some(ExecEvent::Output(OutStream::Stdout, d)) => {
                            let _ = std::io::stdout().write_all(&d);
                        }
                        Some(ExecEvent::Output(OutStream::Stderr, d)) => {
                            let _ = std::io::stderr().write_all(&d);
                        }
                        Some(ExecEvent::Exited(ExitStatus::Code(n))) => break n,
                        Some(ExecEvent::Exited(ExitStatus::Signal(s))) => break 128 + s,
                        Some(ExecEvent::Lost) | None => {
                            eprintln!("agent-cli: connection lost");
                            break 1;
                        }
                    }
                },
                Err(e) => {
                    eprintln!("agent-cli: {e}");
                    1
                }
            }
        }
        other => {
            eprintln!("agent-cli: unknown command {other}");
            2
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}
