//! The service lifecycle state machine: every legal edge is declared in [`next`], one table.

use serde::{Deserialize, Serialize};

/// Where a service is in its life. Richer than the six words the client knows;
/// [`Phase::wire_word`] maps each phase to exactly one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// Accepted, waiting for a worker or for resources (e.g. no free GPU).
    Pending,
    /// The deployment pipeline runs: workload created, model loading.
    Initializing,
    /// Ready to serve.
    Running,
    /// Was running, a replica was lost, and the workload is being repaired.
    Recovering,
    /// Gave up; `reason` and `message` say why. A new spec (update) tries again.
    Failed,
    /// Deletion accepted; the workload is being removed.
    Terminating,
    /// Workload removed; the record stays only as history.
    Deleted,
}

impl Phase {
    /// Every phase, for exhaustive tests and metrics.
    pub const ALL: [Phase; 7] = [
        Phase::Pending,
        Phase::Initializing,
        Phase::Running,
        Phase::Recovering,
        Phase::Failed,
        Phase::Terminating,
        Phase::Deleted,
    ];

    /// The status word of the wire contract: one of the six the client maps.
    pub const fn wire_word(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Initializing | Phase::Recovering => "initializing",
            Phase::Running => "running",
            Phase::Failed => "failed",
            Phase::Terminating => "terminating",
            Phase::Deleted => "notExist",
        }
    }

    /// True where nothing more happens without a new request or a runtime change.
    pub const fn is_settled(self) -> bool {
        matches!(self, Phase::Running | Phase::Failed | Phase::Deleted)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = serde_json::to_value(self).ok();
        f.write_str(name.as_ref().and_then(|v| v.as_str()).unwrap_or("?"))
    }
}

/// What happened to a service; the FSM decides which phase follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Trigger {
    /// A new spec (update) was accepted.
    Update,
    /// A worker starts running the pipeline.
    Start,
    /// The pipeline cannot go on for now (e.g. waiting for a GPU); it will be retried.
    Block,
    /// The workload reports ready.
    Ready,
    /// A running workload lost a replica (exited, crashed, removed behind our back).
    Degrade,
    /// A step failed for good, or the workload failed beyond its repair budget.
    Fail,
    /// Deletion was accepted.
    Delete,
    /// The runtime confirmed the workload is gone.
    TornDown,
    /// The runtime cannot be reached or is overloaded (API server down, Docker daemon
    /// restarting). Never a reason to give up: the phase stays, with reason
    /// `RuntimeUnavailable`, and the engine retries until the runtime answers again.
    Unavailable,
}

/// A transition that the table forbids.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal transition: {trigger:?} in phase {from}")]
pub struct TransitionError {
    /// Phase the service was in.
    pub from: Phase,
    /// What was attempted.
    pub trigger: Trigger,
}

/// One recorded change of phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    /// Phase before.
    pub from: Phase,
    /// Phase after.
    pub to: Phase,
    /// What caused it.
    pub trigger: Trigger,
}

/// The transition table: the phase that follows `trigger` in phase `from`.
///
/// # Errors
/// [`TransitionError`] for every pair not listed.
pub const fn next(from: Phase, trigger: Trigger) -> Result<Phase, TransitionError> {
    use Phase::*;
    use Trigger::*;
    let to = match (from, trigger) {
        // A new spec always starts over from pending, even mid-teardown: the last request wins.
        (Pending | Initializing | Running | Recovering | Failed | Terminating, Update) => Pending,
        (Pending | Failed, Start) => Initializing,
        (Running, Start) => Recovering,
        (Initializing | Recovering, Start) => from,
        (Pending | Initializing | Recovering, Block) => Pending,
        (Pending | Initializing | Recovering | Running, Ready) => Running,
        (Running, Degrade) => Recovering,
        (Pending | Initializing | Recovering | Running, Fail) => Failed,
        (Pending | Initializing | Running | Recovering | Failed, Delete) => Terminating,
        (Terminating, TornDown) => Deleted,
        (Pending | Initializing | Recovering | Running | Terminating, Unavailable) => from,
        _ => return Err(TransitionError { from, trigger }),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRIGGERS: [Trigger; 9] = [
        Trigger::Update,
        Trigger::Start,
        Trigger::Block,
        Trigger::Ready,
        Trigger::Degrade,
        Trigger::Fail,
        Trigger::Delete,
        Trigger::TornDown,
        Trigger::Unavailable,
    ];

    /// The whole table, written out: (from, trigger) → to; every other pair is illegal.
    #[test]
    fn the_transition_table_is_exactly_this() {
        use Phase::*;
        use Trigger::*;
        let legal = [
            (Pending, Update, Pending),
            (Initializing, Update, Pending),
            (Running, Update, Pending),
            (Recovering, Update, Pending),
            (Failed, Update, Pending),
            (Terminating, Update, Pending),
            (Pending, Start, Initializing),
            (Failed, Start, Initializing),
            (Running, Start, Recovering),
            (Initializing, Start, Initializing),
            (Recovering, Start, Recovering),
            (Pending, Block, Pending),
            (Initializing, Block, Pending),
            (Recovering, Block, Pending),
            (Pending, Ready, Running),
            (Initializing, Ready, Running),
            (Recovering, Ready, Running),
            (Running, Ready, Running),
            (Running, Degrade, Recovering),
            (Pending, Fail, Failed),
            (Initializing, Fail, Failed),
            (Recovering, Fail, Failed),
            (Running, Fail, Failed),
            (Pending, Delete, Terminating),
            (Initializing, Delete, Terminating),
            (Running, Delete, Terminating),
            (Recovering, Delete, Terminating),
            (Failed, Delete, Terminating),
            (Terminating, TornDown, Deleted),
            (Pending, Unavailable, Pending),
            (Initializing, Unavailable, Initializing),
            (Recovering, Unavailable, Recovering),
            (Running, Unavailable, Running),
            (Terminating, Unavailable, Terminating),
        ];
        let mut count = 0;
        for from in Phase::ALL {
            for trigger in TRIGGERS {
                let expected = legal.iter().find(|(f, t, _)| *f == from && *t == trigger);
                match (next(from, trigger), expected) {
                    (Ok(to), Some((_, _, want))) => {
                        assert_eq!(to, *want, "{from:?} --{trigger:?}-->");
                        count += 1;
                    }
                    (Err(e), None) => assert_eq!(e, TransitionError { from, trigger }),
                    (got, want) => {
                        panic!("{from:?} --{trigger:?}--> got {got:?}, table says {want:?}")
                    }
                }
            }
        }
        assert_eq!(count, legal.len());
    }

    #[test]
    fn deleted_is_final_and_delete_is_not_repeated() {
        for trigger in TRIGGERS {
            assert!(next(Phase::Deleted, trigger).is_err(), "{trigger:?}");
        }
        assert!(next(Phase::Terminating, Trigger::Delete).is_err());
    }

    #[test]
    fn every_phase_maps_to_one_of_the_clients_six_words() {
        let words = [
            "pending",
            "initializing",
            "running",
            "failed",
            "terminating",
            "notExist",
        ];
        for phase in Phase::ALL {
            assert!(words.contains(&phase.wire_word()), "{phase:?}");
        }
        // Loading or repairing is never reported as failed.
        assert_eq!(Phase::Initializing.wire_word(), "initializing");
        assert_eq!(Phase::Recovering.wire_word(), "initializing");
    }
}
