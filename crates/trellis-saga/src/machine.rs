//! The saga state machine, pure: what to call next given what is known,
//! and what an answer changes. The coordinator persists [`Saga`] after
//! every [`Saga::record`] and asks [`Saga::next`] again after a crash, so
//! everything it does is a function of this state — which is what the
//! property test drives, with random answers and crash points.
//!
//! The rules, as in dtm:
//! - steps run forward in order; a step's success moves on;
//! - a **definite failure** (gRPC ABORTED / FAILED_PRECONDITION, HTTP 409)
//!   turns the saga round: every step that was called — the failed one
//!   included, since its effect may have happened before the failure was
//!   known — is compensated, last first (the participant's barrier makes
//!   compensating a step that never ran a no-op);
//! - anything else (timeouts, UNAVAILABLE, 5xx) is **retried**: the state
//!   does not change except for the attempt count, until `timeout_to_fail`
//!   turns a forward step's retries into a definite failure;
//! - compensations are retried until they succeed (they must not fail
//!   definitively; one that does is recorded and retried too).
//!
//! ```
//! use trellis_saga::machine::{Answer, Next, Saga, Status};
//! use trellis_saga::barrier::Op;
//!
//! let mut saga = Saga::new(2);
//! assert_eq!(saga.next(), Next::Call { step: 0, op: Op::Action });
//! saga.record(0, Op::Action, Answer::Success);
//! saga.record(1, Op::Action, Answer::Failure);
//! assert_eq!(saga.next(), Next::Call { step: 1, op: Op::Compensate });
//! saga.record(1, Op::Compensate, Answer::Success);
//! saga.record(0, Op::Compensate, Answer::Success);
//! assert_eq!(saga.next(), Next::Done(Status::Compensated));
//! ```

use serde::{Deserialize, Serialize};

use crate::barrier::Op;

/// Where a saga is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Running its steps forward.
    Running,
    /// A step failed: undoing the steps called, last first.
    Compensating,
    /// Every step succeeded.
    Succeeded,
    /// A step failed and every step called was compensated.
    Compensated,
}

impl Status {
    /// Whether nothing more will happen to it.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Succeeded | Status::Compensated)
    }
}

/// A branch's answer, sorted by what it means for the saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// It did its work.
    Success,
    /// It refused, for good (ABORTED, FAILED_PRECONDITION, HTTP 409).
    Failure,
    /// Anything else: try again later.
    Retry,
}

/// One step's state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Step {
    /// Its action was called at least once (so it may have had an effect).
    pub called: bool,
    /// Its action succeeded.
    pub succeeded: bool,
    /// Its compensation succeeded.
    pub compensated: bool,
    /// Calls made, both operations.
    pub attempts: u32,
    /// What the last call that did not succeed said (the coordinator
    /// keeps it for `trellis saga show`; the machine ignores it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_error: String,
    /// When the last call was made (ms since the epoch; 0: never).
    #[serde(default)]
    pub last_attempt_ms: i64,
}

/// What the coordinator does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Call this operation of this step.
    Call {
        /// The step's index.
        step: usize,
        /// Action or compensation.
        op: Op,
    },
    /// The saga is over.
    Done(Status),
}

/// A saga's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saga {
    /// Where it is.
    pub status: Status,
    /// Its steps, in order.
    pub steps: Vec<Step>,
    /// Why it turned round, if it did: the failed step and its error.
    pub failure: Option<(usize, String)>,
}

impl Saga {
    /// A saga of `steps` steps, about to run the first.
    pub fn new(steps: usize) -> Saga {
        Saga {
            status: if steps == 0 {
                Status::Succeeded
            } else {
                Status::Running
            },
            steps: vec![Step::default(); steps],
            failure: None,
        }
    }

    /// What to do next.
    pub fn next(&self) -> Next {
        match self.status {
            Status::Running => match self.steps.iter().position(|s| !s.succeeded) {
                Some(step) => Next::Call {
                    step,
                    op: Op::Action,
                },
                None => Next::Done(Status::Succeeded),
            },
            Status::Compensating => {
                match self.steps.iter().rposition(|s| s.called && !s.compensated) {
                    Some(step) => Next::Call {
                        step,
                        op: Op::Compensate,
                    },
                    None => Next::Done(Status::Compensated),
                }
            }
            done => Next::Done(done),
        }
    }

    /// Marks that `op` of `step` is about to be called (persist before the
    /// call: after a crash the step counts as possibly done).
    pub fn calling(&mut self, step: usize, op: Op) {
        if let Some(s) = self.steps.get_mut(step) {
            if op == Op::Action {
                s.called = true;
            }
            s.attempts = s.attempts.saturating_add(1);
        }
    }

    /// What `op` of `step` answered. Answers that do not fit the state (a
    /// late answer for a step already decided) change nothing.
    pub fn record(&mut self, step: usize, op: Op, answer: Answer) {
        self.record_with(step, op, answer, "")
    }

    /// [`record`](Self::record), keeping `error` as the reason when the
    /// answer turns the saga round.
    pub fn record_with(&mut self, step: usize, op: Op, answer: Answer, error: &str) {
        let Some(s) = self.steps.get_mut(step) else {
            return;
        };
        match (self.status, op, answer) {
            (Status::Running, Op::Action, Answer::Success) => {
                s.called = true;
                s.succeeded = true;
            }
            (Status::Running, Op::Action, Answer::Failure) => {
                s.called = true;
                self.status = Status::Compensating;
                self.failure = Some((step, error.to_owned()));
            }
            (Status::Running, Op::Action, Answer::Retry) => s.called = true,
            (Status::Compensating, Op::Compensate, Answer::Success) => s.compensated = true,
            _ => {}
        }
        self.settle();
    }

    /// Gives up on the forward step now running (its `timeout_to_fail`
    /// passed): the saga compensates, with `reason`.
    pub fn time_out(&mut self, reason: &str) {
        if let Next::Call {
            step,
            op: Op::Action,
        } = self.next()
        {
            self.record_with(step, Op::Action, Answer::Failure, reason);
        }
    }

    /// Moves to a terminal status when there is nothing left to call.
    fn settle(&mut self) {
        if let Next::Done(done) = self.next() {
            self.status = done;
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn answer() -> impl Strategy<Value = Answer> {
        prop_oneof![
            3 => Just(Answer::Success),
            1 => Just(Answer::Failure),
            2 => Just(Answer::Retry),
        ]
    }

    /// A participant that applies each operation's effect at most once —
    /// what the barrier guarantees — and tracks what is in effect.
    #[derive(Default)]
    struct Ledger {
        applied: Vec<bool>,
        compensated: Vec<bool>,
    }

    proptest! {
        /// Random answers (a definite failure stands for that delivery
        /// only; compensations may fail transiently) and crashes (the
        /// state is persisted before and after each call; a crash between
        /// a call's effect and the recording of its answer loses the
        /// answer): the saga always ends, and ends consistent — every step
        /// in effect when it succeeds, none in effect when compensated.
        #[test]
        fn every_saga_ends_consistent(
            steps in 1usize..6,
            answers in proptest::collection::vec(answer(), 1..200),
            crashes in proptest::collection::vec(proptest::bool::weighted(0.3), 1..200),
        ) {
            let mut persisted = Saga::new(steps);
            let mut ledger = Ledger { applied: vec![false; steps], compensated: vec![false; steps] };
            // Past the drawn ones, answers succeed and nothing crashes: a
            // coordinator that crashes forever never finishes anything.
            let mut answers = answers.into_iter().chain(std::iter::repeat(Answer::Success));
            let mut crashes = crashes.into_iter().chain(std::iter::repeat(false));
            let mut guard = 0;
            loop {
                guard += 1;
                prop_assert!(guard < 10_000, "never ended: {persisted:?}");
                // After a crash the coordinator starts from what it persisted.
                let mut saga = persisted.clone();
                let (step, op) = match saga.next() {
                    Next::Done(status) => {
                        prop_assert!(status.is_terminal());
                        match status {
                            Status::Succeeded => {
                                prop_assert!(ledger.applied.iter().all(|a| *a));
                                prop_assert!(ledger.compensated.iter().all(|c| !c));
                            }
                            _ => {
                                for (a, c) in ledger.applied.iter().zip(&ledger.compensated) {
                                    prop_assert!(!a || *c, "a step left in effect: {ledger:?}", ledger = (&ledger.applied, &ledger.compensated));
                                }
                            }
                        }
                        break;
                    }
                    Next::Call { step, op } => (step, op),
                };
                saga.calling(step, op);
                persisted = saga.clone();
                // Compensations are not refused for good: treat a drawn
                // failure as a transient one.
                let mut answer = answers.next().unwrap_or(Answer::Success);
                if op == Op::Compensate && answer == Answer::Failure {
                    answer = Answer::Retry;
                }
                // The participant, behind its barrier.
                match (op, answer) {
                    (Op::Action, Answer::Success) if !ledger.compensated[step] => ledger.applied[step] = true,
                    (Op::Compensate, Answer::Success) => {
                        ledger.compensated[step] = true;
                    }
                    _ => {}
                }
                if crashes.next().unwrap_or(false) {
                    continue; // the answer is lost; the call will be made again
                }
                saga.record(step, op, answer);
                persisted = saga;
            }
        }
    }

    #[test]
    fn a_step_timing_out_turns_the_saga_round() {
        let mut saga = Saga::new(3);
        saga.record(0, Op::Action, Answer::Success);
        saga.calling(1, Op::Action);
        saga.record(1, Op::Action, Answer::Retry);
        saga.time_out("step 1 did not answer within 30s");
        assert_eq!(saga.status, Status::Compensating);
        assert_eq!(
            saga.failure,
            Some((1, "step 1 did not answer within 30s".into()))
        );
        // Step 2 was never called: it is not compensated.
        assert_eq!(
            saga.next(),
            Next::Call {
                step: 1,
                op: Op::Compensate
            }
        );
        saga.record(1, Op::Compensate, Answer::Success);
        assert_eq!(
            saga.next(),
            Next::Call {
                step: 0,
                op: Op::Compensate
            }
        );
        saga.record(0, Op::Compensate, Answer::Success);
        assert_eq!(saga.status, Status::Compensated);
        // A late answer changes nothing.
        saga.record(2, Op::Action, Answer::Success);
        assert_eq!(saga.status, Status::Compensated);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut saga = Saga::new(2);
        saga.record_with(0, Op::Action, Answer::Failure, "out of stock");
        let text = serde_json::to_string(&saga).unwrap();
        assert_eq!(serde_json::from_str::<Saga>(&text).unwrap(), saga);
    }
}
