//! The real `bandsox-agent` binary in host mode, serving a temporary root over a unix
//! socket; killed when dropped. Shared by the integration tests.
#![allow(dead_code)]
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Agent {
    pub child: Child,
    pub sock: PathBuf,
    pub root: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

impl Agent {
    pub fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_bandsox-agent"))
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--root")
            .arg(root.path())
            .env("BANDSOX_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "agent socket did not appear");
            std::thread::sleep(Duration::from_millis(5));
        }
        Agent {
            child,
            sock,
            root,
            _dir: dir,
        }
    }
}

impl Agent {
    /// A connection to the agent's socket. The socket file appears at bind(), a moment
    /// before listen(): a refusal is retried for a while.
    pub async fn stream(&self) -> tokio::net::UnixStream {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::net::UnixStream::connect(&self.sock).await {
                Ok(s) => return s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("cannot connect to the agent: {e}"),
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An in-process agent (no binary, no socket) serving a private temporary root; it
/// ignores power-off. The root is private so that other processes' files in the shared
/// temporary directory never show up as events in a test's session.
pub fn in_process_agent() -> std::sync::Arc<bandsox_agent::server::Agent> {
    use bandsox_agent::server::{Agent, AgentConfig, PowerOffAction};
    let root = tempfile::tempdir().expect("temp dir").keep();
    let mut cfg = AgentConfig::host(root);
    cfg.power_off = PowerOffAction::Ignore;
    Agent::new(cfg)
}

/// An in-process agent serving one end of an in-memory duplex; returns the other end.
pub fn serve_duplex() -> tokio::io::DuplexStream {
    let (host, guest) = tokio::io::duplex(256 * 1024);
    let a = in_process_agent();
    tokio::spawn(async move { a.serve_stream(guest).await });
    host
}

/// A shell script to run, with no environment, cwd or stdin of its own.
pub fn script(s: &str) -> bandsox_agent::proto::ExecSpec {
    bandsox_agent::proto::ExecSpec {
        program: bandsox_agent::proto::Program::Script(s.as_bytes().to_vec()),
        env: vec![],
        cwd: None,
        stdin: false,
    }
}
