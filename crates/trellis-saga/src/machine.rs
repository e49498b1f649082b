//! The transaction state machine, pure: what to call next given what is
//! known, and what an answer changes. The coordinator persists [`Saga`]
//! after every answer and asks [`Saga::next`] again after a crash, so
//! everything it does is a function of this state — which is what the
//! property test drives, with random answers and crash points.
//!
//! Three kinds of transaction, as in dtm:
//! - **Saga**: steps run forward in order; a step's success moves on; a
//!   **definite failure** (gRPC ABORTED / FAILED_PRECONDITION, HTTP 409)
//!   turns the saga round: every step that was called — the failed one
//!   included, since its effect may have happened before the failure was
//!   known — is compensated, last first (the participant's barrier makes
//!   compensating a step that never ran a no-op); anything else (timeouts,
//!   UNAVAILABLE, 5xx) is **retried** until `timeout_to_fail` turns a
//!   forward step's retries into a definite failure. Compensations are
//!   retried until they succeed.
//! - **TCC**: every branch's *Try* runs in order, as a saga's actions; when
//!   all succeeded, every *Confirm* runs (retried until it succeeds: a
//!   confirmation must not fail); a definite failure of a Try *Cancels*
//!   every Try called, last first.
//! - **Two-phase message**: a local transaction and a guaranteed
//!   follow-up. Prepared first; the submitter commits its local
//!   transaction, then submits; the branches then run in order, each
//!   retried until it succeeds (nothing is undone). A message prepared but
//!   never submitted is **checked back**: the coordinator asks the
//!   submitter's query endpoint whether the local transaction committed
//!   (run the branches) or not (abort).
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

/// Which kind of transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Ordered steps with compensations.
    #[default]
    Saga,
    /// Try / Confirm / Cancel.
    Tcc,
    /// A two-phase message: a local transaction and a guaranteed follow-up.
    Msg,
}

impl Kind {
    /// The forward operation of its branches.
    pub fn forward(self) -> Op {
        match self {
            Kind::Tcc => Op::Try,
            Kind::Saga | Kind::Msg => Op::Action,
        }
    }

    /// The operation that undoes a forward one (none for messages).
    pub fn backward(self) -> Op {
        match self {
            Kind::Tcc => Op::Cancel,
            Kind::Saga | Kind::Msg => Op::Compensate,
        }
    }
}

/// Where a transaction is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// A message whose local transaction has not been reported committed.
    Prepared,
    /// Running its steps forward.
    Running,
    /// TCC: every Try succeeded; confirming them.
    Confirming,
    /// A step failed: undoing the steps called, last first.
    Compensating,
    /// Every step succeeded (and, for TCC, was confirmed).
    Succeeded,
    /// A step failed and every step called was compensated.
    Compensated,
    /// A message whose local transaction did not commit: nothing ran.
    Aborted,
}

impl Status {
    /// Whether nothing more will happen to it.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Succeeded | Status::Compensated | Status::Aborted
        )
    }
}

/// A branch's answer, sorted by what it means for the transaction.
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
    /// Its forward operation was called at least once (so it may have had
    /// an effect).
    pub called: bool,
    /// Its forward operation succeeded.
    pub succeeded: bool,
    /// TCC: its Confirm succeeded.
    #[serde(default)]
    pub confirmed: bool,
    /// Its compensation (Cancel) succeeded.
    pub compensated: bool,
    /// Calls made, every operation.
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
        /// Which operation.
        op: Op,
    },
    /// A prepared message: ask the submitter whether its local
    /// transaction committed ([`Saga::record_query`]).
    Query,
    /// It is over.
    Done(Status),
}

/// A transaction's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saga {
    /// Which kind.
    #[serde(default)]
    pub kind: Kind,
    /// Where it is.
    pub status: Status,
    /// Its steps, in order.
    pub steps: Vec<Step>,
    /// Why it turned round, if it did: the failed step and its error.
    pub failure: Option<(usize, String)>,
    /// Concurrent steps: the steps each waits for (all earlier). `None`:
    /// one after another, each after the previous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Vec<Vec<usize>>>,
}

impl Saga {
    /// A saga of `steps` steps, about to run the first.
    pub fn new(steps: usize) -> Saga {
        Saga::of(Kind::Saga, steps)
    }

    /// A transaction of `kind` with `steps` steps, about to run the first
    /// (a message: submitted, its local transaction committed; see
    /// [`Saga::prepared`]).
    pub fn of(kind: Kind, steps: usize) -> Saga {
        let mut saga = Saga {
            kind,
            status: Status::Running,
            steps: vec![Step::default(); steps],
            failure: None,
            after: None,
        };
        saga.settle();
        saga
    }

    /// A saga or TCC whose steps run concurrently, each once the steps in
    /// its `after` list (earlier steps' indices; others are ignored)
    /// succeeded, and are undone each after the steps that waited for it.
    pub fn concurrent(kind: Kind, after: Vec<Vec<usize>>) -> Saga {
        let after: Vec<Vec<usize>> = after
            .into_iter()
            .enumerate()
            .map(|(i, deps)| deps.into_iter().filter(|d| *d < i).collect())
            .collect();
        let mut saga = Saga {
            kind,
            status: Status::Running,
            steps: vec![Step::default(); after.len()],
            failure: None,
            after: Some(after),
        };
        saga.settle();
        saga
    }

    /// Whether step `i` waits for step `j`.
    fn waits_for(&self, i: usize, j: usize) -> bool {
        match &self.after {
            None => j + 1 == i,
            Some(after) => after.get(i).is_some_and(|deps| deps.contains(&j)),
        }
    }

    /// Every call that may be made now (one for sequential transactions;
    /// for concurrent ones, every step whose turn it is).
    pub fn ready(&self) -> Vec<(usize, Op)> {
        let n = self.steps.len();
        let all = |f: &dyn Fn(usize) -> bool| (0..n).filter(|i| f(*i)).collect::<Vec<_>>();
        let calls: Vec<usize> = match self.status {
            Status::Running if self.steps.iter().all(|s| s.succeeded) => {
                if self.kind == Kind::Tcc {
                    all(&|i| !self.steps[i].confirmed)
                } else {
                    Vec::new()
                }
            }
            Status::Running => all(&|i| {
                !self.steps[i].succeeded
                    && (0..n).all(|j| !self.waits_for(i, j) || self.steps[j].succeeded)
            }),
            Status::Confirming => all(&|i| !self.steps[i].confirmed),
            Status::Compensating => all(&|i| {
                let s = &self.steps[i];
                s.called
                    && !s.compensated
                    && (0..n).all(|j| {
                        !self.waits_for(j, i) || !self.steps[j].called || self.steps[j].compensated
                    })
            }),
            _ => Vec::new(),
        };
        let op = match self.status {
            Status::Compensating => self.kind.backward(),
            Status::Confirming => Op::Confirm,
            _ if self.steps.iter().all(|s| s.succeeded) => Op::Confirm,
            _ => self.kind.forward(),
        };
        let calls = calls.into_iter().map(|i| (i, op));
        match (&self.after, self.status) {
            // One at a time: the first (last, compensating) whose turn it is.
            (None, Status::Compensating) => calls.rev().take(1).collect(),
            (None, _) => calls.take(1).collect(),
            (Some(_), _) => calls.collect(),
        }
    }

    /// A prepared message of `steps` steps: waiting for its submit, or to
    /// be checked back.
    pub fn prepared(steps: usize) -> Saga {
        Saga {
            kind: Kind::Msg,
            status: Status::Prepared,
            steps: vec![Step::default(); steps],
            failure: None,
            after: None,
        }
    }

    /// What to do next (for concurrent transactions, the first of
    /// [`ready`](Self::ready)).
    pub fn next(&self) -> Next {
        if self.status == Status::Prepared {
            return Next::Query;
        }
        if let Some(&(step, op)) = self.ready().first() {
            return Next::Call { step, op };
        }
        Next::Done(match self.status {
            Status::Running | Status::Confirming => Status::Succeeded,
            Status::Compensating => Status::Compensated,
            done => done,
        })
    }

    /// Marks that `op` of `step` is about to be called (counts the
    /// attempt; a forward step called counts as possibly done).
    pub fn calling(&mut self, step: usize, op: Op) {
        let forward = self.kind.forward();
        if let Some(s) = self.steps.get_mut(step) {
            if op == forward {
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
    /// answer turns the transaction round.
    pub fn record_with(&mut self, step: usize, op: Op, answer: Answer, error: &str) {
        let (forward, backward) = (self.kind.forward(), self.kind.backward());
        let kind = self.kind;
        let Some(s) = self.steps.get_mut(step) else {
            return;
        };
        match (self.status, answer) {
            (Status::Running, Answer::Success) if op == forward => {
                s.called = true;
                s.succeeded = true;
            }
            // A message's branches are retried until they succeed.
            (Status::Running, Answer::Failure) if op == forward && kind == Kind::Msg => {
                s.called = true;
            }
            (Status::Running, Answer::Failure) if op == forward => {
                s.called = true;
                self.status = Status::Compensating;
                self.failure = Some((step, error.to_owned()));
            }
            (Status::Running, Answer::Retry) if op == forward => s.called = true,
            (Status::Running | Status::Confirming, Answer::Success) if op == Op::Confirm => {
                s.confirmed = true;
                self.status = Status::Confirming;
            }
            (Status::Compensating, Answer::Success) if op == backward => s.compensated = true,
            _ => {}
        }
        self.settle();
    }

    /// A prepared message's check-back answered: committed (Success) runs
    /// its branches, not committed (Failure) aborts it, anything else asks
    /// again later.
    pub fn record_query(&mut self, answer: Answer) {
        if self.status != Status::Prepared {
            return;
        }
        match answer {
            Answer::Success => {
                self.status = Status::Running;
                self.settle();
            }
            Answer::Failure => self.status = Status::Aborted,
            Answer::Retry => {}
        }
    }

    /// A prepared message was submitted: its local transaction committed.
    pub fn submitted(&mut self) {
        self.record_query(Answer::Success);
    }

    /// Gives up on the forward step now running (its `timeout_to_fail`
    /// passed): the saga or TCC compensates, with `reason`. Messages are
    /// not given up on.
    pub fn time_out(&mut self, reason: &str) {
        if self.kind == Kind::Msg || self.status != Status::Running {
            return;
        }
        let forward = self.kind.forward();
        let ready = self.ready();
        // Every step whose turn it is may have been called (a round lost
        // to a crash is not in the log): all count as called, and are
        // compensated (the barrier makes that a no-op for those that never
        // ran).
        for &(step, op) in &ready {
            if op == forward
                && let Some(s) = self.steps.get_mut(step)
            {
                s.called = true;
            }
        }
        if let Some(&(step, op)) = ready.first()
            && op == forward
        {
            self.record_with(step, op, Answer::Failure, reason);
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

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![Just(Kind::Saga), Just(Kind::Tcc), Just(Kind::Msg)]
    }

    /// A participant that applies each operation's effect at most once —
    /// what the barrier guarantees — and tracks what is in effect.
    #[derive(Debug, Default)]
    struct Ledger {
        applied: Vec<bool>,
        compensated: Vec<bool>,
        confirmed: Vec<bool>,
    }

    proptest! {
        /// Random kinds, answers (a definite failure stands for that
        /// delivery only; compensations, cancellations and confirmations
        /// may fail transiently) and crashes (the state is persisted after
        /// each answer only; a crash between a call's effect and the
        /// recording of its answer loses the call and the answer): the
        /// transaction always ends, and ends consistent — every step in
        /// effect (and confirmed, for TCC) when it succeeds, none in effect
        /// or confirmed when compensated; a message always succeeds.
        #[test]
        fn every_transaction_ends_consistent(
            kind in kind(),
            steps in 1usize..6,
            concurrent in proptest::bool::ANY,
            deps in proptest::collection::vec(proptest::collection::vec(0usize..6, 0..3), 6),
            picks in proptest::collection::vec(0usize..6, 1..200),
            answers in proptest::collection::vec(answer(), 1..200),
            crashes in proptest::collection::vec(proptest::bool::weighted(0.3), 1..200),
        ) {
            // Concurrent sagas and TCCs take their ready calls in any order.
            let concurrent = concurrent && kind != Kind::Msg;
            let mut persisted = if concurrent {
                Saga::concurrent(kind, deps[..steps].to_vec())
            } else {
                Saga::of(kind, steps)
            };
            let mut picks = picks.into_iter().chain(std::iter::repeat(0));
            let mut ledger = Ledger {
                applied: vec![false; steps],
                compensated: vec![false; steps],
                confirmed: vec![false; steps],
            };
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
                match saga.next() {
                    Next::Done(status) => {
                        prop_assert!(status.is_terminal());
                        match status {
                            Status::Succeeded => {
                                prop_assert!(ledger.applied.iter().all(|a| *a), "{ledger:?}");
                                prop_assert!(ledger.compensated.iter().all(|c| !c), "{ledger:?}");
                                if kind == Kind::Tcc {
                                    prop_assert!(ledger.confirmed.iter().all(|c| *c), "{ledger:?}");
                                }
                            }
                            _ => {
                                prop_assert!(kind != Kind::Msg, "a message ended {status:?}");
                                for i in 0..steps {
                                    prop_assert!(!ledger.applied[i] || ledger.compensated[i], "a step left in effect: {ledger:?}");
                                    prop_assert!(!ledger.confirmed[i], "a cancelled TCC confirmed: {ledger:?}");
                                }
                            }
                        }
                        break;
                    }
                    Next::Query => unreachable!("submitted transactions are not queried"),
                    Next::Call { .. } => {}
                }
                // A round: every ready call, made in any order (at once);
                // the answers recorded together after the last. A crash
                // anywhere in it loses the whole round.
                let mut round = saga.ready();
                let start = picks.next().unwrap_or(0) % round.len();
                round.rotate_left(start);
                let mut answered = Vec::new();
                let mut crashed = false;
                for &(step, op) in &round {
                    // Order is kept: forward after what the step waits
                    // for, undone after what waited for it.
                    for j in 0..steps {
                        if op == kind.forward() && saga.waits_for(step, j) {
                            prop_assert!(ledger.applied[j], "step {step} called before {j}: {saga:?}");
                        }
                        if op == kind.backward() && saga.waits_for(j, step) {
                            prop_assert!(!ledger.applied[j] || ledger.compensated[j], "step {step} undone before {j}: {saga:?}");
                        }
                    }
                    // Not persisted: the coordinator writes only answers,
                    // so a crash during the round forgets its calls.
                    saga.calling(step, op);
                    // Only forward operations are refused for good: treat
                    // a drawn failure of any other as a transient one.
                    let mut answer = answers.next().unwrap_or(Answer::Success);
                    if op != kind.forward() && answer == Answer::Failure {
                        answer = Answer::Retry;
                    }
                    // The participant, behind its barrier.
                    match (op, answer) {
                        (Op::Action | Op::Try, Answer::Success) if !ledger.compensated[step] => ledger.applied[step] = true,
                        (Op::Compensate | Op::Cancel, Answer::Success) => ledger.compensated[step] = true,
                        (Op::Confirm, Answer::Success) => ledger.confirmed[step] = true,
                        _ => {}
                    }
                    if crashes.next().unwrap_or(false) {
                        crashed = true; // the round's answers are lost; it is made again
                        break;
                    }
                    answered.push((step, op, answer));
                }
                if crashed {
                    continue;
                }
                for (step, op, answer) in answered {
                    saga.record(step, op, answer);
                }
                persisted = saga;
            }
        }
    }

    #[test]
    fn concurrent_steps_wait_for_theirs_and_are_undone_after_their_dependents() {
        // a, b at once; c after both.
        let mut saga = Saga::concurrent(Kind::Saga, vec![vec![], vec![], vec![0, 1]]);
        assert_eq!(saga.ready(), [(0, Op::Action), (1, Op::Action)]);
        saga.calling(0, Op::Action);
        saga.calling(1, Op::Action);
        saga.record(0, Op::Action, Answer::Success);
        assert_eq!(saga.ready(), [(1, Op::Action)], "c waits for b");
        saga.record(1, Op::Action, Answer::Success);
        assert_eq!(saga.ready(), [(2, Op::Action)]);
        saga.calling(2, Op::Action);
        saga.record(2, Op::Action, Answer::Failure);
        // c first (it waited for a and b), then a and b together.
        assert_eq!(saga.ready(), [(2, Op::Compensate)]);
        saga.record(2, Op::Compensate, Answer::Success);
        assert_eq!(saga.ready(), [(0, Op::Compensate), (1, Op::Compensate)]);
        saga.record(0, Op::Compensate, Answer::Success);
        saga.record(1, Op::Compensate, Answer::Success);
        assert_eq!(saga.status, Status::Compensated);

        // Given up on while a round's calls are unrecorded: every step
        // whose turn it was counts as called, and is compensated.
        let mut saga = Saga::concurrent(Kind::Saga, vec![vec![], vec![], vec![]]);
        saga.time_out("late");
        assert_eq!(saga.status, Status::Compensating);
        assert_eq!(saga.ready().len(), 3, "{saga:?}");
    }

    #[test]
    fn tcc_confirms_after_every_try_or_cancels_the_tried() {
        let mut tcc = Saga::of(Kind::Tcc, 2);
        assert_eq!(
            tcc.next(),
            Next::Call {
                step: 0,
                op: Op::Try
            }
        );
        tcc.record(0, Op::Try, Answer::Success);
        tcc.record(1, Op::Try, Answer::Success);
        assert_eq!(
            tcc.next(),
            Next::Call {
                step: 0,
                op: Op::Confirm
            }
        );
        tcc.record(0, Op::Confirm, Answer::Failure); // confirmations only retry
        assert_eq!(
            tcc.next(),
            Next::Call {
                step: 0,
                op: Op::Confirm
            }
        );
        tcc.record(0, Op::Confirm, Answer::Success);
        assert_eq!(tcc.status, Status::Confirming);
        tcc.time_out("late"); // a confirming TCC is not given up on
        assert_eq!(
            tcc.next(),
            Next::Call {
                step: 1,
                op: Op::Confirm
            }
        );
        tcc.record(1, Op::Confirm, Answer::Success);
        assert_eq!(tcc.status, Status::Succeeded);

        let mut tcc = Saga::of(Kind::Tcc, 3);
        tcc.record(0, Op::Try, Answer::Success);
        tcc.record(1, Op::Try, Answer::Failure);
        assert_eq!(
            tcc.next(),
            Next::Call {
                step: 1,
                op: Op::Cancel
            }
        );
        tcc.record(1, Op::Cancel, Answer::Success);
        tcc.record(0, Op::Cancel, Answer::Success);
        assert_eq!(tcc.status, Status::Compensated);
    }

    #[test]
    fn messages_are_checked_back_and_never_undone() {
        let mut msg = Saga::prepared(2);
        assert_eq!(msg.next(), Next::Query);
        msg.record_query(Answer::Retry);
        assert_eq!(msg.status, Status::Prepared);
        msg.record_query(Answer::Failure);
        assert_eq!(msg.next(), Next::Done(Status::Aborted));

        let mut msg = Saga::prepared(2);
        msg.submitted();
        assert_eq!(
            msg.next(),
            Next::Call {
                step: 0,
                op: Op::Action
            }
        );
        msg.record(0, Op::Action, Answer::Failure); // retried, not undone
        msg.time_out("late");
        assert_eq!(msg.status, Status::Running);
        msg.record(0, Op::Action, Answer::Success);
        msg.record(1, Op::Action, Answer::Success);
        assert_eq!(msg.status, Status::Succeeded);
        msg.record_query(Answer::Failure); // a late check-back changes nothing
        assert_eq!(msg.status, Status::Succeeded);
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
