//! Dispatch of `ctl` lines: the root `ctl` (create, clone, import, pull, build) and a
//! VM's `ctl` (lifecycle, snapshot, reconnect, ping, exec_timeout). Parsing and the
//! accepted syntax live in `crate::ctl`; every command parsed there is executed here,
//! and every VM command is listed in `crate::ctl::VM_HELP` and docs/tree.md.
use std::sync::Arc;

use super::vm::{self, Vm};
use super::Manager;
use crate::ctl::{GlobalCmd, VmCmd, VmOp};
use crate::error::Result;

impl Manager {
    /// Execute one root `ctl` line; returns the success text.
    pub async fn global_ctl(self: &Arc<Self>, line: &str, uid: u32, gid: u32) -> Result<String> {
        match crate::ctl::parse_global(line)? {
            GlobalCmd::Create { name, options } => {
                self.create(&name, &options, uid, gid).await?;
                Ok(format!("ok: created {name}"))
            }
            GlobalCmd::Clone {
                snapshot,
                name,
                count,
            } => self.clone_snapshot(&snapshot, &name, count, uid, gid).await,
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

    /// Execute one `<vm>/ctl` line.
    pub async fn vm_ctl(self: &Arc<Self>, vm: &Arc<Vm>, line: &str) -> Result<String> {
        let cmd = crate::ctl::parse_vm(line)?;
        if !matches!(cmd, VmCmd::ExecTimeout(_)) {
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
