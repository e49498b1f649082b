//! Circuit breakers: fail fast while a dependency is failing, then probe it.
//!
//! [`Breaker`] is the classic three-state breaker (Closed → Open → HalfOpen)
//! over a time window split into buckets. It trips on a failure ratio, a
//! slow-call ratio or a run of consecutive failures; stays open for
//! `open_duration`; then lets `half_open_probes` calls through and closes
//! if they all succeed. [`SreBreaker`] is Google SRE's adaptive throttling:
//! no states, it rejects locally with probability
//! `max(0, (requests − k·accepts) / (requests + 1))`.
//!
//! The closed-state decision is one atomic load; recording an outcome is a
//! few relaxed atomic adds on the current bucket. Ratios are only computed
//! when a failure or slow call arrives, so the success path stays cheap.
//!
//! [`CircuitBreakerLayer`] puts a breaker in front of a service and judges
//! each call with the one classifier every layer uses
//! ([`trellis_core::protocol`]): at the response head when it says, at the
//! end of the body when the gRPC status comes in the trailers.
//!
//! | file | holds |
//! |---|---|
//! | `classic.rs` | [`Breaker`], [`BreakerConfig`] |
//! | `sre.rs` | [`SreBreaker`], [`SreConfig`] |
//! | `window.rs` | the time and count windows outcomes are counted in |
//! | `layer.rs` | [`CircuitBreakerLayer`], [`CircuitBreaker`] |

mod classic;
mod layer;
mod sre;
mod window;

use std::time::Duration;

pub use classic::{Breaker, BreakerConfig};
pub use layer::{CircuitBreaker, CircuitBreakerLayer};
pub use sre::{SreBreaker, SreConfig};

/// A breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow; outcomes are counted.
    Closed,
    /// Calls are rejected until the open period ends.
    Open,
    /// A few probe calls decide whether to close again.
    HalfOpen,
}

/// Why a breaker opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trip {
    /// Failures reached the configured share of calls in the window.
    FailureRatio,
    /// Slow calls reached the configured share of calls in the window.
    SlowCallRatio,
    /// Too many failures in a row.
    ConsecutiveFailures,
    /// A half-open probe failed.
    ProbeFailed,
}

/// How one call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The dependency did its job (client errors count as success).
    Success,
    /// The dependency failed (unavailable, internal error, timeout, 5xx).
    Failure,
    /// The caller gave up before the call ended (a dropped request or
    /// response): nothing learnt about the dependency, but a probe's place
    /// is given back.
    Cancelled,
}

impl Outcome {
    /// The outcome a classification says (see [`trellis_core::protocol::Class`]).
    pub fn of(class: Option<trellis_core::protocol::Class>) -> Outcome {
        match class {
            Some(c) if c.is_failure() => Outcome::Failure,
            Some(_) => Outcome::Success,
            None => Outcome::Cancelled,
        }
    }
}

/// The right to make one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// An ordinary call.
    Normal,
    /// A half-open probe: its outcome decides the breaker's state.
    Probe,
}

/// What a breaker does; implemented by [`Breaker`] and [`SreBreaker`].
pub trait BreakerPolicy: Send + Sync + 'static {
    /// Whether a call may go ahead.
    fn acquire(&self) -> Option<Permit>;
    /// Records how a permitted call ended.
    fn record(&self, permit: Permit, outcome: Outcome, elapsed: Duration);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::classic::CLOSED;

    #[test]
    fn a_breaker_dropped_open_leaves_the_gauge_at_zero() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let breaker = Breaker::new(BreakerConfig::default());
        breaker.trip(CLOSED, Trip::ConsecutiveFailures);
        assert!(
            handle.render().contains("circuit_breaker_open 1"),
            "{}",
            handle.render()
        );
        drop(breaker);
        assert!(
            handle.render().contains("circuit_breaker_open 0"),
            "{}",
            handle.render()
        );
    }
}
