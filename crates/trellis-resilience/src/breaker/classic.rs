//! The classic Closed/Open/HalfOpen breaker.

use std::{
    sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed, Ordering::SeqCst},
    time::Duration,
};

use tokio::sync::watch;
use tracing::warn;

use super::{
    BreakerPolicy, BreakerState, Outcome, Permit, Trip,
    window::{CountWindow, Window},
};
use crate::clock::Clock;

/// Settings of the classic [`Breaker`].
#[derive(Debug, Clone)]
pub struct BreakerConfig {
    /// The sliding window ratios are computed over. Default: 10 s.
    pub window: Duration,
    /// How many buckets the window is split into. Default: 10.
    pub buckets: u32,
    /// Judge the last this many calls instead of a time window (Resilience4j's
    /// count-based window). Default: None (time-based).
    pub count_window: Option<u32>,
    /// No ratio trips the breaker before this many calls in the window. Default: 20.
    pub min_calls: u32,
    /// Trip when failures reach this share of calls. Default: 0.5.
    pub failure_ratio: f64,
    /// Trip when slow calls reach this share of calls; `None` disables. Default: None.
    pub slow_call_ratio: Option<f64>,
    /// A call at least this long is slow. Default: 1 s.
    pub slow_call_threshold: Duration,
    /// Trip after this many failures in a row; `None` disables. Default: 10.
    pub consecutive_failures: Option<u32>,
    /// How long to stay open before probing. Default: 5 s.
    pub open_duration: Duration,
    /// Probes let through when half-open; all must succeed to close. Default: 3.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: Duration::from_secs(10),
            buckets: 10,
            count_window: None,
            min_calls: 20,
            failure_ratio: 0.5,
            slow_call_ratio: None,
            slow_call_threshold: Duration::from_secs(1),
            consecutive_failures: Some(10),
            open_duration: Duration::from_secs(5),
            half_open_probes: 3,
        }
    }
}

pub(crate) const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// The classic Closed/Open/HalfOpen circuit breaker.
pub struct Breaker {
    config: BreakerConfig,
    state: AtomicU8,
    opened_at_ms: AtomicU64,
    probes_left: AtomicU32,
    probe_successes: AtomicU32,
    consecutive: AtomicU32,
    window: Window,
    count_window: Option<CountWindow>,
    events: watch::Sender<(BreakerState, Option<Trip>)>,
}

/// A breaker dropped while open or half-open leaves the open-breakers gauge
/// as it would be had it closed.
impl Drop for Breaker {
    fn drop(&mut self) {
        if *self.state.get_mut() != CLOSED {
            metrics::gauge!("circuit_breaker_open").decrement(1.0);
        }
    }
}

impl Breaker {
    /// A closed breaker on the coarse clock.
    pub fn new(config: BreakerConfig) -> Self {
        Self::with_clock(config, Clock::Coarse)
    }

    /// A closed breaker on `clock` (tests: [`Clock::Tokio`]).
    pub fn with_clock(config: BreakerConfig, clock: Clock) -> Self {
        let window = Window::new(config.window, config.buckets, clock);
        let count_window = config.count_window.map(CountWindow::new);
        Breaker {
            count_window,
            config,
            state: AtomicU8::new(CLOSED),
            opened_at_ms: AtomicU64::new(0),
            probes_left: AtomicU32::new(0),
            probe_successes: AtomicU32::new(0),
            consecutive: AtomicU32::new(0),
            window,
            events: watch::channel((BreakerState::Closed, None)).0,
        }
    }

    /// The state now.
    pub fn state(&self) -> BreakerState {
        match self.state.load(Relaxed) {
            OPEN => BreakerState::Open,
            HALF_OPEN => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    /// State changes, with the reason for each opening.
    pub fn subscribe(&self) -> watch::Receiver<(BreakerState, Option<Trip>)> {
        self.events.subscribe()
    }

    fn now_ms(&self) -> u64 {
        self.window.now_ms()
    }

    pub(crate) fn trip(&self, from: u8, why: Trip) {
        if self
            .state
            .compare_exchange(from, OPEN, SeqCst, Relaxed)
            .is_ok()
        {
            self.opened_at_ms.store(self.now_ms(), SeqCst);
            warn!(reason = ?why, "circuit opened");
            metrics::counter!("circuit_breaker_transitions_total", "to" => "open").increment(1);
            if from == CLOSED {
                metrics::gauge!("circuit_breaker_open").increment(1.0);
            }
            self.events.send_replace((BreakerState::Open, Some(why)));
        }
    }

    fn close(&self) {
        if self
            .state
            .compare_exchange(HALF_OPEN, CLOSED, SeqCst, Relaxed)
            .is_ok()
        {
            self.window.clear();
            if let Some(c) = &self.count_window {
                c.clear();
            }
            self.consecutive.store(0, Relaxed);
            metrics::counter!("circuit_breaker_transitions_total", "to" => "closed").increment(1);
            metrics::gauge!("circuit_breaker_open").decrement(1.0);
            self.events.send_replace((BreakerState::Closed, None));
        }
    }

    fn check_ratios(&self) {
        let t = match &self.count_window {
            Some(c) => c.totals(),
            None => self.window.totals(),
        };
        if t.calls < self.config.min_calls.max(1) {
            return;
        }
        let calls = f64::from(t.calls);
        if f64::from(t.failures) / calls >= self.config.failure_ratio {
            self.trip(CLOSED, Trip::FailureRatio);
        } else if let Some(ratio) = self.config.slow_call_ratio
            && f64::from(t.slow) / calls >= ratio
        {
            self.trip(CLOSED, Trip::SlowCallRatio);
        }
    }
}

impl BreakerPolicy for Breaker {
    fn acquire(&self) -> Option<Permit> {
        match self.state.load(Relaxed) {
            CLOSED => Some(Permit::Normal),
            OPEN => {
                let since = self.now_ms().saturating_sub(self.opened_at_ms.load(SeqCst));
                if since < self.config.open_duration.as_millis() as u64 {
                    return None;
                }
                if self
                    .state
                    .compare_exchange(OPEN, HALF_OPEN, SeqCst, Relaxed)
                    .is_ok()
                {
                    self.probe_successes.store(0, SeqCst);
                    self.probes_left
                        .store(self.config.half_open_probes.max(1), SeqCst);
                    metrics::counter!("circuit_breaker_transitions_total", "to" => "half_open")
                        .increment(1);
                    self.events.send_replace((BreakerState::HalfOpen, None));
                }
                self.acquire()
            }
            _ => self
                .probes_left
                .fetch_update(SeqCst, SeqCst, |left| left.checked_sub(1))
                .ok()
                .map(|_| Permit::Probe),
        }
    }

    fn record(&self, permit: Permit, outcome: Outcome, elapsed: Duration) {
        if outcome == Outcome::Cancelled {
            // Nothing learnt; a probe's place goes back for another call.
            if permit == Permit::Probe && self.state.load(Relaxed) == HALF_OPEN {
                self.probes_left.fetch_add(1, SeqCst);
            }
            return;
        }
        let slow = elapsed >= self.config.slow_call_threshold;
        if permit == Permit::Probe {
            let failed =
                outcome == Outcome::Failure || (slow && self.config.slow_call_ratio.is_some());
            if failed {
                self.trip(HALF_OPEN, Trip::ProbeFailed);
            } else if self.probe_successes.fetch_add(1, SeqCst) + 1
                >= self.config.half_open_probes.max(1)
            {
                self.close();
            }
            return;
        }
        if self.state.load(Relaxed) != CLOSED {
            // A call admitted before the breaker opened: nothing to learn.
            return;
        }
        let failed = outcome == Outcome::Failure;
        match &self.count_window {
            Some(c) => c.push(failed, slow),
            None => {
                let bucket = self.window.current();
                bucket.calls.fetch_add(1, Relaxed);
                if slow {
                    bucket.slow.fetch_add(1, Relaxed);
                }
                if failed {
                    bucket.failures.fetch_add(1, Relaxed);
                }
            }
        }
        match outcome {
            Outcome::Failure => {
                let run = self.consecutive.fetch_add(1, Relaxed) + 1;
                if self.config.consecutive_failures.is_some_and(|n| run >= n) {
                    self.trip(CLOSED, Trip::ConsecutiveFailures);
                } else {
                    self.check_ratios();
                }
            }
            Outcome::Success | Outcome::Cancelled => {
                if self.consecutive.load(Relaxed) != 0 {
                    self.consecutive.store(0, Relaxed);
                }
                if slow && self.config.slow_call_ratio.is_some() {
                    self.check_ratios();
                }
            }
        }
    }
}
