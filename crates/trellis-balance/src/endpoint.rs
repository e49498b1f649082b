//! One endpoint of a service and what the client has learnt about it.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

/// The largest weight an endpoint takes (the registry's limit too).
pub const MAX_WEIGHT: u32 = 10_000;

/// Latency assumed for an endpoint before its first response.
const DEFAULT_RTT_NS: f64 = 1_000_000.0;
/// How fast the latency EWMA forgets (time constant).
const DECAY_NS: f64 = 10_000_000_000.0;

/// Nanoseconds since the first call in this process (a monotonic clock);
/// the time [`Endpoint::is_ejected_at`] and pickers take.
pub fn now_ns() -> u64 {
    nanos_at(Instant::now())
}

/// `at` as nanoseconds on the [`now_ns`] clock (so a request's start time
/// serves for its pick too, with one clock read).
pub(crate) fn nanos_at(at: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    at.saturating_duration_since(*EPOCH.get_or_init(Instant::now))
        .as_nanos() as u64
}

/// An endpoint: where it is, its weight and zone, and live statistics.
///
/// Statistics are updated with relaxed atomics: a pick may see a slightly
/// stale value, which costs nothing in balance quality and keeps a pick
/// free of locks.
#[derive(Debug)]
pub struct Endpoint {
    id: String,
    address: String,
    weight: u32,
    zone: String,
    in_flight: AtomicU32,
    requests: AtomicU64,
    ewma_ns: AtomicU64,
    last_sample_ns: AtomicU64,
    consecutive_failures: AtomicU32,
    ejected_until_ns: AtomicU64,
    ejections: AtomicU32,
}

impl Endpoint {
    /// An endpoint with no statistics yet. `weight` is clamped into
    /// `1..=`[`MAX_WEIGHT`] (registries refuse records outside it; the clamp
    /// keeps an endpoint built by hand from growing the hash ring unbounded).
    pub fn new(
        id: impl Into<String>,
        address: impl Into<String>,
        weight: u32,
        zone: impl Into<String>,
    ) -> Self {
        Endpoint {
            id: id.into(),
            address: address.into(),
            weight: weight.clamp(1, MAX_WEIGHT),
            zone: zone.into(),
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            ewma_ns: AtomicU64::new(0),
            last_sample_ns: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ns: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
        }
    }

    /// The instance id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `host:port`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The weight (at least 1).
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// The zone, empty when unknown.
    pub fn zone(&self) -> &str {
        &self.zone
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    /// Requests started on this endpoint since it joined.
    pub fn requests(&self) -> u64 {
        self.requests.load(Relaxed)
    }

    /// Marks a request as started; pair with [`Endpoint::finish`].
    pub fn start(&self) {
        self.in_flight.fetch_add(1, Relaxed);
        self.requests.fetch_add(1, Relaxed);
    }

    /// Marks a request as finished after `rtt`.
    pub fn finish(&self, rtt: Duration) {
        self.release();
        self.observe(rtt);
    }

    /// Marks a request as no longer in flight (its latency was observed
    /// when its response began).
    pub(crate) fn release(&self) {
        self.in_flight.fetch_sub(1, Relaxed);
    }

    /// Feeds one latency sample into the peak EWMA: a slower sample is taken
    /// at once, faster ones pull the average down over ~10 s. Reacting to
    /// slowness at once and to recovery gradually is what lets p2c steer
    /// away from a degrading endpoint before its queue grows.
    pub fn observe(&self, rtt: Duration) {
        let now = now_ns();
        let last = self.last_sample_ns.swap(now, Relaxed);
        let sample = rtt.as_nanos() as f64;
        let prev = f64::from_bits(self.ewma_ns.load(Relaxed));
        let next = if prev == 0.0 || sample > prev {
            sample
        } else {
            let w = (-(now.saturating_sub(last) as f64) / DECAY_NS).exp();
            prev * w + sample * (1.0 - w)
        };
        self.ewma_ns.store(next.to_bits(), Relaxed);
    }

    /// The latency estimate in nanoseconds (a default before any sample).
    pub fn latency_ns(&self) -> f64 {
        let v = f64::from_bits(self.ewma_ns.load(Relaxed));
        if v == 0.0 { DEFAULT_RTT_NS } else { v }
    }

    /// p2c's cost: expected latency × queue.
    pub fn cost(&self) -> f64 {
        self.latency_ns() * f64::from(self.in_flight() + 1)
    }

    /// Whether the endpoint is ejected at `now` ([`now_ns`]); never at
    /// `u64::MAX`, which pickers use to try every endpoint.
    #[inline]
    pub fn is_ejected_at(&self, now: u64) -> bool {
        self.ejected_until_ns.load(Relaxed) > now
    }

    /// Whether the endpoint is ejected now.
    pub fn is_ejected(&self) -> bool {
        self.is_ejected_at(now_ns())
    }

    /// Records a success: resets the failure streak.
    pub(crate) fn record_success(&self) {
        self.consecutive_failures.store(0, Relaxed);
    }

    /// Records a failure; returns the streak length.
    pub(crate) fn record_failure(&self) -> u32 {
        self.consecutive_failures.fetch_add(1, Relaxed) + 1
    }

    /// Takes the endpoint out of picks for `base × times ejected so far`
    /// (at most `max`) and resets its failure streak; returns how long.
    /// Outlier detection calls this; so may an operator's tool.
    pub fn eject(&self, base: Duration, max: Duration) -> Duration {
        let times = self.ejections.fetch_add(1, Relaxed) + 1;
        let duration = base.saturating_mul(times).min(max);
        self.ejected_until_ns
            .store(now_ns() + duration.as_nanos() as u64, Relaxed);
        self.consecutive_failures.store(0, Relaxed);
        duration
    }

    /// Copies the learnt statistics from `old` (the same instance, with a
    /// new weight or zone). Not the requests in flight: those finish on
    /// `old`, and a copy here would never come down.
    pub(crate) fn inherit(&self, old: &Endpoint) {
        self.ewma_ns.store(old.ewma_ns.load(Relaxed), Relaxed);
        self.last_sample_ns
            .store(old.last_sample_ns.load(Relaxed), Relaxed);
        self.requests.store(old.requests.load(Relaxed), Relaxed);
        self.consecutive_failures
            .store(old.consecutive_failures.load(Relaxed), Relaxed);
        self.ejected_until_ns
            .store(old.ejected_until_ns.load(Relaxed), Relaxed);
        self.ejections.store(old.ejections.load(Relaxed), Relaxed);
    }
}
