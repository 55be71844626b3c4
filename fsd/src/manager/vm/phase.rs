//! How far a VM's last start got, kept in `vm.json` as `phase`, so that a daemon
//! restarted in the middle of a start knows what the VMM it finds is (see `adopt`).
//!
//! Invariants:
//! - A phase is written, atomically with the rest of `vm.json`, *before* the step it
//!   names begins: `booting` before a boot's VMM is launched, `restoring` before a
//!   clone's VMM is started from its snapshot, `identity-pending` once that VMM runs the
//!   restored guest and before the agent is asked to take the clone's identity,
//!   `started` together with `running`, `failed` when a start (or an adoption) failed.
//!   So a daemon that dies at any moment leaves a record that claims no step more than
//!   was done; at most the named step was begun or finished.
//! - `restoring` and `identity-pending` must be on disk before their step runs: a start
//!   that cannot write them fails. The others are best effort (a VM caught `booting` is
//!   adopted like a started one).
//! - Records written before phases existed read as `started`.
use serde::{Deserialize, Serialize};

use super::Vm;
use crate::error::Result;

/// How far the last start of a VM got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// A fresh boot: the VMM is (being) launched, the agent has not answered yet.
    Booting,
    /// A clone: its VMM is (being) started and loads the snapshot.
    Restoring,
    /// A clone: the VMM runs the restored guest, which still has the snapshot's
    /// identity (hostname, entropy, machine id, address, clock).
    IdentityPending,
    /// The start finished: the VM was `running`.
    #[default]
    Started,
    /// The start or adoption failed (the VM was `failed: <why>`).
    Failed,
}

impl Phase {
    /// What a reader of `events` should know about a VM caught in this phase.
    pub fn describe(self) -> &'static str {
        match self {
            Phase::Booting => "while it was booting",
            Phase::Restoring => "while it was being restored from its snapshot",
            Phase::IdentityPending => "before the restored clone took its own identity",
            Phase::Started => "while it was running",
            Phase::Failed => "after its start had failed",
        }
    }
}

impl Vm {
    /// Record `phase` in `vm.json` before its step starts. `restoring` and
    /// `identity-pending` must reach the disk (an error otherwise); the others are
    /// written as well as possible.
    pub(crate) fn record_phase(&self, phase: Phase) -> Result<()> {
        self.record.lock().phase = phase;
        match self.save_record() {
            Ok(()) => Ok(()),
            Err(e) if matches!(phase, Phase::Restoring | Phase::IdentityPending) => {
                Err(e.with_context("cannot record the clone's progress in vm.json"))
            }
            Err(e) => {
                tracing::warn!(vm = %self.name, "cannot save record: {e}");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_kebab_case_and_default_to_started() {
        let json = serde_json::to_string(&Phase::IdentityPending).unwrap();
        assert_eq!(json, "\"identity-pending\"");
        let back: Phase = serde_json::from_str("\"restoring\"").unwrap();
        assert_eq!(back, Phase::Restoring);
        assert_eq!(Phase::default(), Phase::Started);
    }
}
