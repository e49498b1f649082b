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

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed, Ordering::SeqCst},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use tokio::{sync::watch, time::Instant};
use tonic::Status;
use tower::{Layer, Service};
use tracing::warn;

use crate::BoxError;

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
}

/// The right to make one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// An ordinary call.
    Normal,
    /// A half-open probe: its outcome decides the breaker's state.
    Probe,
}

/// What a breaker policy does; implemented by [`Breaker`] and [`SreBreaker`].
pub trait Policy: Send + Sync + 'static {
    /// Whether a call may go ahead.
    fn acquire(&self) -> Option<Permit>;
    /// Records how a permitted call ended.
    fn record(&self, permit: Permit, outcome: Outcome, elapsed: Duration);
}

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

/// One slice of the window: counts for the slice that started at `epoch`.
#[derive(Default)]
struct Bucket {
    epoch: AtomicU64,
    calls: AtomicU32,
    failures: AtomicU32,
    slow: AtomicU32,
}

/// Where breakers read the time.
///
/// The default is the kernel's coarse monotonic clock: a few nanoseconds
/// to read, millisecond-ish resolution, plenty for windows of seconds. Tests
/// use tokio's clock so they can pause and advance it.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// `CLOCK_MONOTONIC_COARSE` (the default).
    Coarse,
    /// `tokio::time::Instant`, which `tokio::time::pause()` controls.
    Tokio,
}

impl Clock {
    fn now_ms(self, start: Instant) -> u64 {
        match self {
            Clock::Tokio => start.elapsed().as_millis() as u64,
            Clock::Coarse => crate::clock::coarse_now_ms(),
        }
    }
}

/// A window of buckets over a monotonic clock.
struct Window {
    clock: Clock,
    start: Instant,
    bucket_ms: u64,
    buckets: Box<[Bucket]>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Totals {
    calls: u32,
    failures: u32,
    slow: u32,
}

impl Window {
    fn new(window: Duration, buckets: u32, clock: Clock) -> Self {
        let n = buckets.max(1);
        let bucket_ms = (window.as_millis() as u64 / u64::from(n)).max(1);
        Window {
            clock,
            start: Instant::now(),
            bucket_ms,
            buckets: (0..n).map(|_| Bucket::default()).collect(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms(self.start)
    }

    fn epoch(&self) -> u64 {
        // Epoch 0 is "never used": real epochs start at 1.
        self.now_ms() / self.bucket_ms + 1
    }

    /// The bucket for now, reset first if it still holds an older slice.
    fn current(&self) -> &Bucket {
        self.bucket_at(self.epoch())
    }

    /// The bucket for `epoch` (from [`Window::epoch`]), reset if stale.
    fn bucket_at(&self, epoch: u64) -> &Bucket {
        let bucket = &self.buckets[(epoch % self.buckets.len() as u64) as usize];
        let seen = bucket.epoch.load(Relaxed);
        if seen != epoch
            && bucket
                .epoch
                .compare_exchange(seen, epoch, SeqCst, Relaxed)
                .is_ok()
        {
            // A count racing with this reset may be lost; a window is an estimate.
            bucket.calls.store(0, Relaxed);
            bucket.failures.store(0, Relaxed);
            bucket.slow.store(0, Relaxed);
        }
        bucket
    }

    fn totals(&self) -> Totals {
        let now = self.epoch();
        let oldest = now.saturating_sub(self.buckets.len() as u64 - 1);
        let mut t = Totals::default();
        for b in self.buckets.iter() {
            let e = b.epoch.load(Relaxed);
            if e >= oldest && e <= now && e != 0 {
                t.calls += b.calls.load(Relaxed);
                t.failures += b.failures.load(Relaxed);
                t.slow += b.slow.load(Relaxed);
            }
        }
        t
    }

    fn clear(&self) {
        for b in self.buckets.iter() {
            b.epoch.store(0, Relaxed);
        }
    }
}

/// The last N outcomes in a ring, with running totals.
struct CountWindow {
    slots: Box<[AtomicU8]>,
    next: AtomicU64,
    calls: AtomicU32,
    failures: AtomicU32,
    slow: AtomicU32,
}

const EMPTY: u8 = 0;
const FAILED: u8 = 1;
const SLOW: u8 = 2;
const FILLED: u8 = 4;

impl CountWindow {
    fn new(n: u32) -> Self {
        CountWindow {
            slots: (0..n.max(1)).map(|_| AtomicU8::new(EMPTY)).collect(),
            next: AtomicU64::new(0),
            calls: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            slow: AtomicU32::new(0),
        }
    }

    fn push(&self, failed: bool, slow: bool) {
        let i = (self.next.fetch_add(1, Relaxed) % self.slots.len() as u64) as usize;
        let new = FILLED | if failed { FAILED } else { 0 } | if slow { SLOW } else { 0 };
        let old = self.slots[i].swap(new, Relaxed);
        // Replace the outcome that falls out of the window with the new one.
        if old & FILLED == 0 {
            self.calls.fetch_add(1, Relaxed);
        }
        match (old & FAILED != 0, failed) {
            (false, true) => {
                self.failures.fetch_add(1, Relaxed);
            }
            (true, false) => {
                self.failures.fetch_sub(1, Relaxed);
            }
            _ => {}
        }
        match (old & SLOW != 0, slow) {
            (false, true) => {
                self.slow.fetch_add(1, Relaxed);
            }
            (true, false) => {
                self.slow.fetch_sub(1, Relaxed);
            }
            _ => {}
        }
    }

    fn totals(&self) -> Totals {
        Totals {
            calls: self.calls.load(Relaxed),
            failures: self.failures.load(Relaxed),
            slow: self.slow.load(Relaxed),
        }
    }

    fn clear(&self) {
        for slot in self.slots.iter() {
            let old = slot.swap(EMPTY, Relaxed);
            if old & FILLED != 0 {
                self.calls.fetch_sub(1, Relaxed);
                if old & FAILED != 0 {
                    self.failures.fetch_sub(1, Relaxed);
                }
                if old & SLOW != 0 {
                    self.slow.fetch_sub(1, Relaxed);
                }
            }
        }
    }
}

const CLOSED: u8 = 0;
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

    fn trip(&self, from: u8, why: Trip) {
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

impl Policy for Breaker {
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
            Outcome::Success => {
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

impl Policy for SreBreaker {
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

/// A uniform random number in [0, 1) from a per-thread xorshift.
pub(crate) fn random_unit() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            use std::hash::{BuildHasher, RandomState};
            RandomState::new().hash_one(std::thread::current().id()) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// Whether a response means the dependency failed: gRPC UNKNOWN,
/// DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS in a
/// trailers-only response, or an HTTP 5xx. Client errors (bad input, not
/// found) are the caller's, not the dependency's.
pub fn classify<B>(response: &Response<B>) -> Outcome {
    if response.status().is_server_error() {
        return Outcome::Failure;
    }
    match response.headers().get("grpc-status").map(|v| v.as_bytes()) {
        Some(b"2" | b"4" | b"12" | b"13" | b"14" | b"15") => Outcome::Failure,
        _ => Outcome::Success,
    }
}

/// Applies a breaker to a service: one shared breaker, or one per method.
pub struct CircuitBreakerLayer<P> {
    breakers: Breakers<P>,
}

impl<P> Clone for CircuitBreakerLayer<P> {
    fn clone(&self) -> Self {
        CircuitBreakerLayer {
            breakers: self.breakers.clone(),
        }
    }
}

type MakePolicy<P> = Arc<dyn Fn() -> P + Send + Sync>;

enum Breakers<P> {
    Shared(Arc<P>),
    PerMethod(Arc<RwLock<HashMap<String, Arc<P>>>>, MakePolicy<P>),
}

// By hand: deriving would demand `P: Clone`, but only `Arc<P>` is cloned.
impl<P> Clone for Breakers<P> {
    fn clone(&self) -> Self {
        match self {
            Breakers::Shared(p) => Breakers::Shared(p.clone()),
            Breakers::PerMethod(map, make) => Breakers::PerMethod(map.clone(), make.clone()),
        }
    }
}

impl<P: Policy> CircuitBreakerLayer<P> {
    /// One breaker for every call through the layer.
    pub fn new(policy: P) -> Self {
        CircuitBreakerLayer {
            breakers: Breakers::Shared(Arc::new(policy)),
        }
    }

    /// A breaker per request path (gRPC method), made by `make` on first use.
    pub fn per_method(make: impl Fn() -> P + Send + Sync + 'static) -> Self {
        CircuitBreakerLayer {
            breakers: Breakers::PerMethod(Arc::default(), Arc::new(make)),
        }
    }
}

impl<P> Breakers<P> {
    fn for_path(&self, path: &str) -> Arc<P> {
        match self {
            Breakers::Shared(p) => p.clone(),
            Breakers::PerMethod(map, make) => {
                if let Some(p) = map.read().unwrap_or_else(PoisonError::into_inner).get(path) {
                    return p.clone();
                }
                let mut map = map.write().unwrap_or_else(PoisonError::into_inner);
                map.entry(path.to_owned())
                    .or_insert_with(|| Arc::new(make()))
                    .clone()
            }
        }
    }
}

impl<S, P: Policy> Layer<S> for CircuitBreakerLayer<P> {
    type Service = CircuitBreaker<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker {
            inner,
            breakers: self.breakers.clone(),
        }
    }
}

/// A service behind a circuit breaker. Rejections are UNAVAILABLE.
pub struct CircuitBreaker<S, P> {
    inner: S,
    breakers: Breakers<P>,
}

impl<S: Clone, P> Clone for CircuitBreaker<S, P> {
    fn clone(&self) -> Self {
        CircuitBreaker {
            inner: self.inner.clone(),
            breakers: self.breakers.clone(),
        }
    }
}

impl<S, P> CircuitBreaker<S, P> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S, P, B, RB> Service<Request<B>> for CircuitBreaker<S, P>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    P: Policy,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let breaker = self.breakers.for_path(req.uri().path());
        let Some(permit) = breaker.acquire() else {
            let path = req.uri().path().to_owned();
            return Box::pin(async move {
                Err(Box::new(Status::unavailable(format!(
                    "circuit open for {path}: failing fast"
                ))) as BoxError)
            });
        };
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let outcome = match &result {
                Ok(response) => classify(response),
                Err(_) => Outcome::Failure,
            };
            breaker.record(permit, outcome, started.elapsed());
            result.map_err(Into::into)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
