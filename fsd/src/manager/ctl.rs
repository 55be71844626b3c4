//! The control files' language, in one place: each line written to `ctl`, `<vm>/ctl`,
//! `runs/<n>/ctl`, `runs/<n>/winsize` or `defaults` is parsed once ([`parse`]) into a
//! [`Command`] bound to what it acts on, and every command is dispatched here
//! ([`Manager::execute`]). The accepted syntax lives in `crate::ctl` (root, VM and run
//! commands) and `execopts` (window sizes); every VM command is listed in
//! `crate::ctl::VM_HELP` and docs/tree.md. VM commands that need the guest (ping,
//! reconnect, snapshot) auto-resume a paused VM first (`Vm::wake`).
//!
//! Invariants: parsing has no side effects, so the control tree checks every line of a
//! write before the first one runs; a [`Command`] carries its target, so a command can
//! never be executed against another file's target.
use std::sync::Arc;

use bandsox_agent::proto::TtySize;

use super::runs::Run;
use super::vm::{self, Vm};
use super::Manager;
use crate::ctl::{GlobalCmd, RunCmd, VmCmd, VmOp};
use crate::error::Result;

/// What the lines of one control file act on.
#[derive(Clone)]
pub enum Target {
    /// The root `ctl`: create, clone, import, pull, build.
    Root,
    /// `<vm>/ctl`: lifecycle, snapshot, reconnect, ping, exec_timeout.
    Vm(Arc<Vm>),
    /// `runs/<n>/ctl`: signals and `close-stdin`.
    Run(Arc<Run>),
    /// A terminal run's `winsize`: lines are `COLSxROWS`.
    Winsize(Arc<Run>),
    /// `defaults`: `key=value` words (all the lines of one write are one command).
    Defaults,
    /// `pools` (root): one pool per line, checked as written; an open file's lines
    /// together become the pools at its close (`vfs::ctlfile`).
    Pools,
}

/// One parsed line, bound to its target.
pub enum Command {
    Global(GlobalCmd),
    Vm(Arc<Vm>, VmCmd),
    Run(Arc<Run>, RunCmd),
    Resize(Arc<Run>, TtySize),
    /// `key=value` words to merge into the defaults (checked when merged).
    Defaults(String),
    /// One line of `pools`: executing it checks it (the pools change at close).
    PoolLine(String),
}

/// Parse one line written to a control file of `target` (no side effects).
pub fn parse(target: &Target, line: &str) -> Result<Command> {
    Ok(match target {
        Target::Root => Command::Global(crate::ctl::parse_global(line)?),
        Target::Vm(vm) => Command::Vm(vm.clone(), crate::ctl::parse_vm(line)?),
        Target::Run(run) => Command::Run(run.clone(), crate::ctl::parse_run(line)?),
        Target::Winsize(run) => Command::Resize(run.clone(), super::execopts::parse_size(line)?),
        Target::Defaults => Command::Defaults(line.to_string()),
        Target::Pools => Command::PoolLine(line.to_string()),
    })
}

impl Manager {
    /// Execute one command for user `uid`/`gid`; returns the success text (empty for
    /// commands whose file shows no result: run signals, window sizes, defaults).
    pub async fn execute(self: &Arc<Self>, cmd: Command, uid: u32, gid: u32) -> Result<String> {
        match cmd {
            Command::Global(cmd) => self.global_ctl(cmd, uid, gid).await,
            Command::Vm(vm, cmd) => self.vm_ctl(&vm, cmd).await,
            Command::Run(run, RunCmd::Kill(sig)) => run.signal(sig).await.map(|()| String::new()),
            Command::Run(run, RunCmd::CloseStdin) => {
                run.close_stdin().await.map(|()| String::new())
            }
            Command::Resize(run, size) => run.resize(size).await.map(|()| String::new()),
            Command::Defaults(text) => self.update_defaults(&text).map(|()| String::new()),
            Command::PoolLine(line) => self.check_pool_line(&line).map(|()| String::new()),
        }
    }

    /// Execute one root `ctl` command; returns the success text.
    async fn global_ctl(self: &Arc<Self>, cmd: GlobalCmd, uid: u32, gid: u32) -> Result<String> {
        match cmd {
            GlobalCmd::Create { name, options } => {
                self.create(&name, &options, uid, gid).await?;
                Ok(format!("ok: created {name}"))
            }
            GlobalCmd::Clone {
                snapshot,
                name,
                count,
                options,
            } => {
                self.clone_snapshot(&snapshot, &name, count, &options, uid, gid)
                    .await
            }
            GlobalCmd::DestroyAll { all_users } => self.destroy_all(uid, all_users).await,
            GlobalCmd::Import {
                image,
                source,
                options,
            } => self.import_image(&image, &source, options, uid).await,
            GlobalCmd::Pull {
                image,
                reference,
                options,
            } => self.pull_image(&image, &reference, options, uid).await,
            GlobalCmd::Build {
                image,
                context,
                file,
                options,
            } => {
                self.build_image(&image, &context, file.as_deref(), options, uid)
                    .await
            }
        }
    }

    /// Execute one `<vm>/ctl` command.
    async fn vm_ctl(self: &Arc<Self>, vm: &Arc<Vm>, cmd: VmCmd) -> Result<String> {
        if matches!(cmd, VmCmd::Ping(_) | VmCmd::Reconnect | VmCmd::Snapshot(_)) {
            // These need the guest: a paused VM with autoresume=1 resumes first.
            vm.wake(vm::Wake::Ctl).await?;
        } else {
            vm.touch();
        }
        if !matches!(cmd, VmCmd::ExecTimeout(_) | VmCmd::Lifecycle { .. }) {
            // A VM being adopted after a daemon restart: act on the outcome.
            vm.wait_adopted().await?;
        }
        match cmd {
            VmCmd::Op(op) => {
                match op {
                    VmOp::Start => vm.start(self.boot_timeout).await?,
                    VmOp::Stop => vm.stop().await?,
                    VmOp::Kill => vm.kill().await?,
                    VmOp::Pause => vm.pause().await?,
                    VmOp::Resume => vm.resume().await?,
                    VmOp::Restart => vm.restart(self.boot_timeout).await?,
                }
                if matches!(op, VmOp::Start | VmOp::Restart) {
                    let _ = self.autostart(vm).await;
                }
                Ok(format!("ok: {}", vm.state().render()))
            }
            VmCmd::Reconnect => {
                vm.require_running()?;
                vm.reconnect_agent_with("reconnect requested through ctl", true)
                    .await?;
                Ok("ok: reconnected".into())
            }
            VmCmd::Ping(count) => {
                let agent = vm.require_agent()?;
                let mut times = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
                for _ in 0..count {
                    let rtt = agent.ping(vm::AGENT_RPC_TIMEOUT).await?.as_micros();
                    times.push(u64::try_from(rtt).unwrap_or(u64::MAX));
                }
                times.sort_unstable();
                Ok(format!(
                    "ok: ping n={count} median_us={} min_us={} max_us={}",
                    times[times.len() / 2],
                    times[0],
                    times[times.len() - 1]
                ))
            }
            VmCmd::Snapshot(name) => self.snapshot(vm, &name).await,
            VmCmd::Lifecycle { key, value } => {
                vm.set_lifecycle(&key, &value)?;
                Ok(format!("ok: {key}={value}"))
            }
            VmCmd::ExecTimeout(t) => {
                vm.set_exec_timeout(t)?;
                Ok(format!(
                    "ok: exec_timeout={}",
                    crate::config::render_timeout(
                        t.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                    )
                ))
            }
        }
    }
}
