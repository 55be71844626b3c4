//! Which runs a VM keeps: at most `keep_runs` of them (its config, from `defaults` or
//! `create`), and no more output than its budget (`output_mib`, bounded by the limits'
//! `vm.run_output_mib`). The oldest *finished* runs go first; a running command's run and
//! the image entrypoint's `runs/main` are never pruned.
use std::sync::Arc;

use super::Vm;
use crate::manager::runs::Run;
use crate::manager::spool::Prune;

impl Vm {
    /// The oldest finished run that may be pruned, other than `except`.
    fn prune_candidate(&self, except: u64) -> Option<Arc<Run>> {
        let main = self.main_run();
        self.runs
            .lock()
            .values()
            .find(|r| r.n != except && Some(r.n) != main && !r.status().is_running())
            .cloned()
    }

    fn prune(&self, run: &Arc<Run>) {
        self.runs.lock().remove(&run.n);
        run.delete();
        tracing::debug!(vm = %self.name, run = run.n, "pruned");
    }

    /// Delete the oldest finished runs beyond `keep_runs`.
    pub(super) fn prune_runs(&self) {
        let keep = usize::try_from(self.record().config.keep_runs.max(1)).unwrap_or(usize::MAX);
        while self.runs.lock().len() > keep {
            let newest = self.runs.lock().keys().next_back().copied().unwrap_or(0);
            match self.prune_candidate(newest) {
                Some(r) => self.prune(&r),
                None => break,
            }
        }
    }
}

impl Prune for Vm {
    fn prune_oldest(&self, except: u64) -> bool {
        match self.prune_candidate(except) {
            Some(r) => {
                self.prune(&r);
                true
            }
            None => false,
        }
    }
}
