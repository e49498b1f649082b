//! Rate limiting: GCRA locally (per process) or in Redis (shared by every
//! instance), per route and per key, as a server-side layer.
//!
//! GCRA (the generic cell rate algorithm) keeps one number per key: the
//! theoretical arrival time (TAT) of the next request. A request at `now`
//! is allowed if `TAT - now <= burst tolerance`, and moves TAT on by one
//! emission interval (`period / rate`). That is a token bucket without the
//! refill bookkeeping: one compare-and-swap per decision, and a key whose
//! TAT is in the past holds no information, so idle keys can be dropped at
//! any time. That is how [`LocalLimiter`] keeps memory bounded.

use std::{
    future::Future,
    hash::{BuildHasher, RandomState},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response, StatusCode};
use tower::{Layer, Service};

use trellis_core::future::EitherFuture;

use crate::reject::{is_grpc, refuse};

/// How many requests per period, with what burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Requests allowed per `period` on average.
    pub rate: u32,
    /// The period. Default: 1 s.
    pub period: Duration,
    /// Requests allowed at once after idleness (at least 1). Default: `rate`.
    pub burst: u32,
}

impl Quota {
    /// `rate` per second, burst `rate`.
    pub fn per_second(rate: u32) -> Self {
        Quota {
            rate: rate.max(1),
            period: Duration::from_secs(1),
            burst: rate.max(1),
        }
    }

    /// The same quota with another burst.
    pub fn with_burst(mut self, burst: u32) -> Self {
        self.burst = burst.max(1);
        self
    }

    /// Nanoseconds between two requests at the steady rate.
    pub fn emission_interval_ns(&self) -> u64 {
        (self.period.as_nanos() as u64 / u64::from(self.rate.max(1))).max(1)
    }

    /// How far ahead of now the TAT may run.
    pub fn burst_tolerance_ns(&self) -> u64 {
        self.emission_interval_ns() * u64::from(self.burst.max(1) - 1)
    }
}

/// A limiter's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Not now; try again after this long.
    Deny {
        /// When a retry would be allowed.
        retry_after: Duration,
    },
}

fn monotonic_ns() -> u64 {
    // +1 s so that a fresh TAT of 0 is always "in the past".
    crate::clock::now_ns() + 1_000_000_000
}

/// A quota in the form GCRA uses.
struct Cell {
    interval: u64,
    tolerance: u64,
}

impl From<&Quota> for Cell {
    fn from(q: &Quota) -> Self {
        Cell {
            interval: q.emission_interval_ns(),
            tolerance: q.burst_tolerance_ns(),
        }
    }
}

/// One GCRA decision on `tat` (ns on [`monotonic_ns`]'s clock).
fn gcra(tat: &AtomicU64, cell: &Cell, now: u64) -> Decision {
    let (interval, tolerance) = (cell.interval, cell.tolerance);
    let mut current = tat.load(Relaxed);
    loop {
        let start = current.max(now);
        if start - now > tolerance {
            return Decision::Deny {
                retry_after: Duration::from_nanos(start - now - tolerance),
            };
        }
        match tat.compare_exchange_weak(current, start + interval, Relaxed, Relaxed) {
            Ok(_) => return Decision::Allow,
            Err(seen) => current = seen,
        }
    }
}

/// Slots a key may be looked for in, from its home slot (four cache lines).
const PROBES: usize = 16;

/// One key's cell: the key's hash (0: never used) and its TAT.
#[derive(Default)]
struct Slot {
    key: AtomicU64,
    tat: AtomicU64,
}

/// A per-process GCRA limiter keyed by string, with bounded memory. Its
/// quota can change while it runs ([`LocalLimiter::set_quota`]).
///
/// Keys live in a fixed open-addressing table of (key hash, TAT) slots,
/// read and claimed with atomics, never locked: a decision on a known key
/// is a hash, a probe within a cache line or two, and one compare-and-swap.
/// A key whose TAT has passed holds no information (GCRA), so its slot is
/// taken over by a new key when its neighbourhood is full; with no such
/// slot nearby, a new key shares one overflow cell until one frees up.
/// Two keys whose 64-bit hashes (keyed per process) collide share a cell.
pub struct LocalLimiter {
    // 0 = unlimited. Read per decision, so a change applies at once.
    interval_ns: AtomicU64,
    tolerance_ns: AtomicU64,
    global: AtomicU64,
    slots: Box<[Slot]>,
    overflow: AtomicU64,
    hasher: RandomState,
}

impl LocalLimiter {
    /// A limiter applying `quota` to each key, tracking at most `max_keys`
    /// keys at once (rounded down to a power of two, at least 16).
    pub fn new(quota: Quota, max_keys: usize) -> Self {
        let capacity = max_keys.max(PROBES);
        let capacity = 1usize << capacity.ilog2();
        LocalLimiter {
            interval_ns: AtomicU64::new(quota.emission_interval_ns()),
            tolerance_ns: AtomicU64::new(quota.burst_tolerance_ns()),
            global: AtomicU64::new(0),
            slots: (0..capacity).map(|_| Slot::default()).collect(),
            overflow: AtomicU64::new(0),
            hasher: RandomState::new(),
        }
    }

    /// A limiter that allows everything until a quota is set.
    pub fn unlimited(max_keys: usize) -> Self {
        let limiter = Self::new(Quota::per_second(1), max_keys);
        limiter.set_quota(None);
        limiter
    }

    /// Changes the quota for decisions from now on; `None` lifts the limit.
    pub fn set_quota(&self, quota: Option<Quota>) {
        let (interval, tolerance) = quota.map_or((0, 0), |q| {
            (q.emission_interval_ns(), q.burst_tolerance_ns())
        });
        self.tolerance_ns.store(tolerance, Relaxed);
        self.interval_ns.store(interval, Relaxed);
    }

    /// Whether a quota is set (an unlimited limiter allows everything).
    pub fn is_limited(&self) -> bool {
        self.interval_ns.load(Relaxed) != 0
    }

    /// Checks one request for `key` (`None`: the limiter's single global cell).
    pub fn check(&self, key: Option<&str>) -> Decision {
        let interval = self.interval_ns.load(Relaxed);
        if interval == 0 {
            return Decision::Allow;
        }
        let cell = Cell {
            interval,
            tolerance: self.tolerance_ns.load(Relaxed),
        };
        let now = monotonic_ns();
        match key {
            None => gcra(&self.global, &cell, now),
            // 0 marks an unused slot.
            Some(key) => gcra(self.cell(self.hasher.hash_one(key) | 1, now), &cell, now),
        }
    }

    /// The TAT cell of the key hashed to `key`, claiming a slot for it if
    /// it has none.
    fn cell(&self, key: u64, now: u64) -> &AtomicU64 {
        let mask = self.slots.len() - 1;
        let home = key as usize & mask;
        let mut idle = None;
        for step in 0..PROBES {
            let slot = &self.slots[(home + step) & mask];
            match slot.key.load(Relaxed) {
                k if k == key => return &slot.tat,
                0 => match slot.key.compare_exchange(0, key, Relaxed, Relaxed) {
                    // Never used: its TAT is 0, in the past.
                    Ok(_) => return &slot.tat,
                    Err(k) if k == key => return &slot.tat,
                    Err(_) => {}
                },
                k if idle.is_none() && slot.tat.load(Relaxed) <= now => idle = Some((slot, k)),
                _ => {}
            }
        }
        // Not here, no free slot: take over a key that has gone idle. (A
        // request of that key racing with this may count against the new
        // one: a window of one request, and limits are estimates.)
        if let Some((slot, old)) = idle
            && slot
                .key
                .compare_exchange(old, key, Relaxed, Relaxed)
                .is_ok()
        {
            return &slot.tat;
        }
        &self.overflow
    }

    /// Keys currently tracked: those whose TAT is still ahead (for tests
    /// and metrics).
    pub fn tracked_keys(&self) -> usize {
        let now = monotonic_ns();
        self.slots
            .iter()
            .filter(|s| s.key.load(Relaxed) != 0 && s.tat.load(Relaxed) > now)
            .count()
    }
}

/// Something that decides; local or shared.
pub trait Limiter: Send + Sync + 'static {
    /// Decides for one request with `key`.
    fn check<'a>(
        &'a self,
        key: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = Decision> + Send + 'a>>;

    /// Whether any request could be refused now; when not, the layer
    /// neither builds the key nor asks. Default: yes.
    fn is_limited(&self) -> bool {
        true
    }
}

impl Limiter for LocalLimiter {
    fn is_limited(&self) -> bool {
        LocalLimiter::is_limited(self)
    }

    fn check<'a>(
        &'a self,
        key: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = Decision> + Send + 'a>> {
        let d = LocalLimiter::check(self, key);
        Box::pin(std::future::ready(d))
    }
}

/// What a request is limited by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyBy {
    /// One budget for everything through the layer.
    Global,
    /// Per route: the route template the server matched
    /// (`/v1/users/{id}`, a gRPC method's `/package.Service/Method`), never
    /// the raw path, so keys stay a bounded set; a request no route
    /// matched shares one budget.
    Route,
    /// Per client IP (from the connection; set by the Trellis server).
    ClientIp,
    /// Per value of a header (tenant, user, API key); requests without it
    /// share one budget.
    Header(String),
}

impl KeyBy {
    fn key<B>(&self, req: &Request<B>) -> Option<String> {
        match self {
            KeyBy::Global => None,
            KeyBy::Route => Some(
                req.extensions()
                    .get::<trellis_core::RouteTemplate>()
                    .map(|t| t.0.to_string())
                    .unwrap_or_else(|| trellis_core::protocol::OTHER.to_owned()),
            ),
            KeyBy::ClientIp => Some(
                req.extensions()
                    .get::<PeerAddr>()
                    .map(|p| p.0.ip().to_string())
                    .unwrap_or_else(|| "unknown".into()),
            ),
            KeyBy::Header(name) => Some(format!(
                "{name}={}",
                req.headers()
                    .get(name.as_str())
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
            )),
        }
    }
}

pub use trellis_core::PeerAddr;

/// Rate-limits a service: rejected HTTP requests get 429 with `Retry-After`
/// and a JSON error body; gRPC requests get RESOURCE_EXHAUSTED with
/// `grpc-retry-pushback-ms`.
#[derive(Clone)]
pub struct RateLimitLayer {
    limiter: Arc<dyn Limiter>,
    key: KeyBy,
}

impl RateLimitLayer {
    /// Limits with `limiter`, keyed by `key`.
    pub fn new(limiter: Arc<dyn Limiter>, key: KeyBy) -> Self {
        RateLimitLayer { limiter, key }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
            key: self.key.clone(),
        }
    }
}

/// A rate-limited service (see [`RateLimitLayer`]).
#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<dyn Limiter>,
    key: KeyBy,
}

// Rejections are responses, never errors: the inner error type passes
// through, so the layer wraps infallible services (axum routes) as they are.
impl<S, B, RB> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + From<String> + Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = EitherFuture<
        S::Future,
        Pin<Box<dyn Future<Output = Result<Response<RB>, S::Error>> + Send>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if !self.limiter.is_limited() {
            // The default (no rate set): no key to build, nothing to ask.
            return EitherFuture::left(self.inner.call(req));
        }
        let limiter = self.limiter.clone();
        let key = self.key.key(&req);
        let grpc = is_grpc(req.headers());
        // Take the service that was driven to readiness; leave a clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let fut = Box::pin(async move {
            match limiter.check(key.as_deref()).await {
                Decision::Allow => inner.call(req).await,
                Decision::Deny { retry_after } => {
                    metrics::counter!("rate_limit_rejections_total").increment(1);
                    let millis = retry_after.as_millis().max(1);
                    let headers = [("grpc-retry-pushback-ms", millis.to_string())];
                    let error = trellis_core::Error::new(
                        trellis_core::Code::ResourceExhausted,
                        "RATE_LIMITED",
                        format!("rate limit exceeded; retry after {millis} ms"),
                    )
                    .with_retry_after(retry_after)
                    .with_http_status(StatusCode::TOO_MANY_REQUESTS);
                    Ok(refuse(error, grpc, if grpc { &headers[..1] } else { &[] }))
                }
            }
        });
        EitherFuture::right(fut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the arrival pattern, GCRA never admits more than
        /// `burst + rate × elapsed` over any stretch starting from idle,
        /// and a request it denies would have broken that bound or the rate.
        #[test]
        fn never_admits_more_than_burst_plus_rate(
            rate in 1u32..1000,
            burst in 1u32..50,
            gaps_us in proptest::collection::vec(0u64..20_000, 1..400),
        ) {
            let quota = Quota::per_second(rate).with_burst(burst);
            let cell = Cell::from(&quota);
            let tat = AtomicU64::new(0);
            let start = 10_000_000_000u64;
            let (mut now, mut admitted) = (start, 0u64);
            for gap in gaps_us {
                now += gap * 1000;
                if gcra(&tat, &cell, now) == Decision::Allow {
                    admitted += 1;
                }
                let elapsed_s = (now - start) as f64 / 1e9;
                let bound = f64::from(burst) + f64::from(rate) * elapsed_s;
                prop_assert!(admitted as f64 <= bound + 1e-9, "admitted {admitted} > {bound}");
            }
        }

        /// Requests spaced at exactly the emission interval are all admitted.
        #[test]
        fn a_steady_stream_at_the_rate_is_never_denied(rate in 1u32..10_000, n in 1usize..500) {
            let quota = Quota::per_second(rate).with_burst(1);
            let cell = Cell::from(&quota);
            let tat = AtomicU64::new(0);
            let mut now = 10_000_000_000u64;
            for _ in 0..n {
                prop_assert_eq!(gcra(&tat, &cell, now), Decision::Allow);
                now += quota.emission_interval_ns();
            }
        }
    }

    #[test]
    fn gcra_allows_the_burst_then_the_rate() {
        let quota = Cell::from(&Quota::per_second(10).with_burst(3));
        let tat = AtomicU64::new(0);
        let t0 = 10_000_000_000u64;
        assert!((0..3).all(|_| gcra(&tat, &quota, t0) == Decision::Allow));
        let Decision::Deny { retry_after } = gcra(&tat, &quota, t0) else {
            panic!("burst exceeded")
        };
        assert_eq!(retry_after, Duration::from_millis(100));
        assert_eq!(
            gcra(&tat, &quota, t0 + 100_000_000),
            Decision::Allow,
            "one interval later"
        );
        assert!(matches!(
            gcra(&tat, &quota, t0 + 100_000_000),
            Decision::Deny { .. }
        ));
        // After a long idle the whole burst is back.
        let later = t0 + 10_000_000_000;
        assert!((0..3).all(|_| gcra(&tat, &quota, later) == Decision::Allow));
    }

    #[test]
    fn the_quota_changes_live_and_zero_lifts_it() {
        let limiter = LocalLimiter::new(Quota::per_second(1).with_burst(1), 10);
        assert_eq!(limiter.check(None), Decision::Allow);
        assert!(matches!(limiter.check(None), Decision::Deny { .. }));
        limiter.set_quota(None);
        assert!((0..100).all(|_| limiter.check(None) == Decision::Allow));
        limiter.set_quota(Some(Quota::per_second(1000).with_burst(5)));
        assert!((0..5).all(|_| limiter.check(Some("k")) == Decision::Allow));
        assert!(matches!(limiter.check(Some("k")), Decision::Deny { .. }));
    }

    #[test]
    fn keys_are_bounded_and_idle_keys_swept() {
        let limiter = LocalLimiter::new(Quota::per_second(1000), 160);
        for i in 0..10_000 {
            limiter.check(Some(&format!("client-{i}")));
        }
        assert!(
            limiter.tracked_keys() <= 160,
            "tracked {}",
            limiter.tracked_keys()
        );
    }
}
