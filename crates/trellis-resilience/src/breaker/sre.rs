//! Google SRE adaptive throttling.

use std::{
    sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use super::{BreakerPolicy, Outcome, Permit, window::Window};
use crate::{clock::Clock, rng::random_unit};

/// Settings of [`SreBreaker`].
#[derive(Debug, Clone)]
pub struct SreConfig {
    /// Accepts are multiplied by `k`: 2 tolerates twice as many requests as
    /// accepts before throttling; lower is more aggressive. Default: 1.5
    /// (go-zero's and Kratos' choice).
    pub k: f64,
    /// The window requests and accepts are counted over. Default: 10 s.
    pub window: Duration,
    /// Buckets in the window. Default: 40.
    pub buckets: u32,
    /// No throttling below this many requests in the window. Default: 20.
    pub min_requests: u32,
}

impl Default for SreConfig {
    fn default() -> Self {
        SreConfig {
            k: 1.5,
            window: Duration::from_secs(10),
            buckets: 40,
            min_requests: 20,
        }
    }
}

/// Google SRE adaptive throttling: rejects locally in proportion to how far
/// requests exceed `k` × accepted requests.
pub struct SreBreaker {
    config: SreConfig,
    // `calls` counts requests (including those rejected here), `failures`
    // is unused, `slow` counts accepts.
    window: Window,
    // The probability is recomputed when the bucket changes or every
    // RECOMPUTE_EVERY admissions, not on each one: summing the window is
    // the expensive part of a decision.
    cached_p: AtomicU64,
    cached_epoch: AtomicU64,
    since_recompute: AtomicU32,
}

const RECOMPUTE_EVERY: u32 = 16;

impl SreBreaker {
    /// A breaker with no history, on the coarse clock.
    pub fn new(config: SreConfig) -> Self {
        Self::with_clock(config, Clock::Coarse)
    }

    /// A breaker on `clock` (tests: [`Clock::Tokio`]).
    pub fn with_clock(config: SreConfig, clock: Clock) -> Self {
        let window = Window::new(config.window, config.buckets, clock);
        SreBreaker {
            config,
            window,
            cached_p: AtomicU64::new(0f64.to_bits()),
            cached_epoch: AtomicU64::new(0),
            since_recompute: AtomicU32::new(0),
        }
    }

    /// The probability a request is rejected now, computed afresh.
    pub fn rejection_probability(&self) -> f64 {
        let t = self.window.totals();
        if t.calls < self.config.min_requests {
            return 0.0;
        }
        let (requests, accepts) = (f64::from(t.calls), f64::from(t.slow));
        ((requests - self.config.k * accepts) / (requests + 1.0)).max(0.0)
    }
}

impl BreakerPolicy for SreBreaker {
    fn acquire(&self) -> Option<Permit> {
        let epoch = self.window.epoch();
        let stale = self.cached_epoch.load(Relaxed) != epoch
            || self.since_recompute.fetch_add(1, Relaxed) + 1 >= RECOMPUTE_EVERY;
        let p = if stale {
            let p = self.rejection_probability();
            self.cached_p.store(p.to_bits(), Relaxed);
            self.cached_epoch.store(epoch, Relaxed);
            self.since_recompute.store(0, Relaxed);
            p
        } else {
            f64::from_bits(self.cached_p.load(Relaxed))
        };
        self.window.bucket_at(epoch).calls.fetch_add(1, Relaxed);
        if p > 0.0 && random_unit() < p {
            None
        } else {
            Some(Permit::Normal)
        }
    }

    fn record(&self, _permit: Permit, outcome: Outcome, _elapsed: Duration) {
        if outcome == Outcome::Success {
            self.window.current().slow.fetch_add(1, Relaxed);
        }
    }
}
