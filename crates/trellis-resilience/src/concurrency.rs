//! Concurrency limits: a fixed cap per dependency (a bulkhead) or an
//! adaptive limit that finds the concurrency a service can take (Vegas, as
//! in Netflix's concurrency-limits), shedding what is above it.
//!
//! Admission is two atomic operations (increment, compare with the limit);
//! a request over the limit is shed at once with 503 / UNAVAILABLE, which
//! costs less than queueing it. The adaptive limit learns from each
//! completion: the ratio of its latency to the no-load latency says how many
//! requests are queued; the limit shrinks when that queue is long and grows
//! while it is short. (Gradient2, which compares with a long-run average,
//! drifts upwards under sustained overload because the average absorbs the
//! queueing delay; measured, it rose from 64 to 124 where Vegas falls.)

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicIsize, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use tower::{Layer, Service};

use trellis_core::stripe::{Handle, Handles, STRIPES, Striped};

use crate::{
    EitherFuture,
    clock::now_ns,
    reject::{is_grpc, refuse},
};

/// How the limit is chosen.
pub enum LimitKind {
    /// A fixed cap (a bulkhead).
    Fixed(usize),
    /// Vegas-style: adapts between `min` and `max`, starting at `initial`.
    Adaptive {
        /// The starting limit.
        initial: usize,
        /// Never below this.
        min: usize,
        /// Never above this.
        max: usize,
    },
}

/// TCP Vegas' idea applied to requests: compare each latency with the
/// no-load latency (the minimum seen) to estimate how many requests are
/// queued; grow while few are, shrink when many are.
struct Vegas {
    limit: f64,
    min: f64,
    max: f64,
    rtt_noload: f64,
    samples: u64,
}

impl Vegas {
    /// The no-load latency is re-learnt this often (samples), so that a
    /// service that got slower for good is not judged by an old minimum.
    const PROBE_EVERY: u64 = 1000;

    #[cfg(test)]
    fn update(&mut self, rtt: Duration, in_flight: usize) -> usize {
        let ns = rtt.as_nanos() as u64;
        self.update_window(ns, ns, in_flight, 1)
    }

    /// Learns from a window of `n` samples: their mean and least latency
    /// (ns) and the most requests in flight among them.
    fn update_window(&mut self, mean_ns: u64, min_ns: u64, in_flight: usize, n: u64) -> usize {
        let rtt = (mean_ns as f64).max(1.0);
        let least = (min_ns as f64).max(1.0);
        let before = self.samples;
        self.samples += n;
        if self.rtt_noload == 0.0
            || least < self.rtt_noload
            || before / Self::PROBE_EVERY != self.samples / Self::PROBE_EVERY
        {
            self.rtt_noload = least;
        }
        let log = self.limit.log10().max(1.0);
        let queued = (self.limit * (1.0 - self.rtt_noload / rtt)).ceil();
        let (alpha, beta) = (3.0 * log, 6.0 * log);
        if queued >= beta {
            self.limit -= log;
        } else if queued <= alpha && (in_flight as f64) * 2.0 >= self.limit {
            // Only grow when the limit is actually in use.
            self.limit += log;
        }
        self.limit = self.limit.clamp(self.min, self.max);
        self.limit as usize
    }
}

/// A counting semaphore whose permits are cached per thread.
///
/// One shared in-flight counter costs two contended read-modify-writes per
/// request when several cores admit at once (137 ns a request with two
/// threads, against 17 ns alone). Here each thread takes permits from its
/// own stripe's cache and refills it from the shared pool a batch at a
/// time, so the shared pool is touched once per batch. The cap stays
/// exact: a thread whose cache and the pool are empty takes a permit from
/// another thread's cache before refusing. While the limit is being
/// lowered (the pool is negative), permits go straight back to the pool.
struct Permits {
    /// Permits in no cache and not in use; negative while a lowered limit
    /// is still above what is in use.
    pool: AtomicIsize,
    cached: Striped<AtomicIsize>,
    limit: AtomicUsize,
}

impl Permits {
    fn new(limit: usize) -> Permits {
        Permits {
            pool: AtomicIsize::new(limit as isize),
            cached: Striped::default(),
            limit: AtomicUsize::new(limit),
        }
    }

    /// How many permits a cache takes from the pool at once: a small share
    /// of the limit, so the caches never hold much of it.
    fn batch(&self) -> isize {
        (self.limit.load(Relaxed) / (STRIPES * 8)).max(1) as isize
    }

    fn try_acquire(&self) -> bool {
        if take_one(self.cached.local()) {
            return true;
        }
        let batch = self.batch();
        let mut pool = self.pool.load(Relaxed);
        while pool > 0 {
            let take = pool.min(batch);
            match self
                .pool
                .compare_exchange_weak(pool, pool - take, Relaxed, Relaxed)
            {
                Ok(_) => {
                    if take > 1 {
                        self.cached.local().fetch_add(take - 1, Relaxed);
                    }
                    return true;
                }
                Err(seen) => pool = seen,
            }
        }
        // At the limit, as far as this thread can see: another thread's
        // cache may still hold a permit.
        self.cached.iter().any(take_one)
    }

    fn release(&self) {
        if self.pool.load(Relaxed) < 0 {
            self.pool.fetch_add(1, Relaxed);
            return;
        }
        let own = self.cached.local();
        let cached = own.fetch_add(1, Relaxed) + 1;
        let batch = self.batch();
        if cached > 2 * batch {
            // Give back all but a batch, for other threads to use.
            let give = own.swap(batch, Relaxed) - batch;
            self.pool.fetch_add(give, Relaxed);
        }
    }

    fn set_limit(&self, limit: usize) {
        let old = self.limit.swap(limit, Relaxed);
        if old != limit {
            self.pool.fetch_add(limit as isize - old as isize, Relaxed);
        }
    }

    /// Permits in use (an estimate while threads are admitting).
    fn in_use(&self) -> usize {
        let cached: isize = self.cached.iter().map(|c| c.load(Relaxed)).sum();
        (self.limit.load(Relaxed) as isize - self.pool.load(Relaxed) - cached).max(0) as usize
    }
}

/// Takes one permit from a cache, if it holds any.
fn take_one(cache: &AtomicIsize) -> bool {
    let mut held = cache.load(Relaxed);
    while held > 0 {
        match cache.compare_exchange_weak(held, held - 1, Relaxed, Relaxed) {
            Ok(_) => return true,
            Err(seen) => held = seen,
        }
    }
    false
}

/// Completions a thread gathers before the adaptive limit learns from
/// them at once (Netflix's `WindowedLimit`): one lock per window, not per
/// request, so completions on several cores do not queue on it.
const SAMPLE_WINDOW: u32 = 16;
/// … or after this long, so a quiet service still learns.
const SAMPLE_WINDOW_NS: u64 = 50_000_000;
/// One admitted request in this many (per thread) has its latency
/// measured: the two clock reads cost 19 ns here, more than the rest of a
/// decision, and the mean of a window of samples is as good a signal.
const SAMPLE_EVERY: u32 = 4;

/// One thread's window of completions.
#[derive(Default)]
struct Samples {
    /// Admissions on this stripe, to pick which are measured.
    admitted: AtomicU32,
    count: AtomicU32,
    started_ns: AtomicU64,
    sum_ns: AtomicU64,
    min_ns: AtomicU64,
}

/// A concurrency limit shared by every clone of the layer.
pub struct ConcurrencyLimit {
    state: Arc<LimitState>,
    /// What tickets hold: a handle per thread, so admitting does not bump
    /// one reference count on every core.
    handles: Handles<LimitState>,
}

struct LimitState {
    permits: Permits,
    adaptive: Option<Mutex<Vegas>>,
    samples: Striped<Samples>,
    shed: AtomicUsize,
}

impl ConcurrencyLimit {
    /// A limit of the given kind.
    pub fn new(kind: LimitKind) -> Arc<Self> {
        let (limit, adaptive) = match kind {
            LimitKind::Fixed(n) => (n.max(1), None),
            LimitKind::Adaptive { initial, min, max } => {
                let (min, max) = (min.max(1), max.max(min.max(1)));
                let initial = initial.clamp(min, max);
                let g = Vegas {
                    limit: initial as f64,
                    min: min as f64,
                    max: max as f64,
                    rtt_noload: 0.0,
                    samples: 0,
                };
                (initial, Some(Mutex::new(g)))
            }
        };
        let state = Arc::new(LimitState {
            permits: Permits::new(limit),
            adaptive,
            samples: Striped::new(|_| Samples {
                min_ns: AtomicU64::new(u64::MAX),
                ..Samples::default()
            }),
            shed: AtomicUsize::new(0),
        });
        Arc::new(ConcurrencyLimit {
            handles: Handles::new(state.clone()),
            state,
        })
    }

    /// The limit now.
    pub fn limit(&self) -> usize {
        self.state.permits.limit.load(Relaxed)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.state.permits.in_use()
    }

    /// Requests shed since start.
    pub fn shed_total(&self) -> usize {
        self.state.shed.load(Relaxed)
    }

    /// Admits one request, or `None` when at the limit.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Admitted> {
        let state = &self.state;
        if !state.permits.try_acquire() {
            state.shed.fetch_add(1, Relaxed);
            return None;
        }
        // Only the adaptive limit learns from latency, from a sample of
        // requests; a bulkhead never reads the clock.
        let started = match state.adaptive {
            Some(_) => {
                let own = state.samples.local();
                let admitted = own.admitted.load(Relaxed).wrapping_add(1);
                own.admitted.store(admitted, Relaxed);
                admitted.is_multiple_of(SAMPLE_EVERY).then(now_ns)
            }
            None => None,
        };
        Some(Admitted {
            limit: self.handles.local(),
            started,
        })
    }
}

impl LimitState {
    fn release(&self, started: Option<u64>) {
        self.permits.release();
        let (Some(vegas), Some(started)) = (&self.adaptive, started) else {
            return;
        };
        let now = now_ns();
        let rtt = now.saturating_sub(started);
        // Plain loads and stores, not read-modify-writes: a stripe is one
        // thread's unless more threads than stripes share it, and then a
        // lost sample only makes the window a little smaller.
        let own = self.samples.local();
        let count = own.count.load(Relaxed) + 1;
        own.count.store(count, Relaxed);
        if count == 1 {
            own.started_ns.store(now, Relaxed);
        }
        own.sum_ns
            .store(own.sum_ns.load(Relaxed).saturating_add(rtt), Relaxed);
        if rtt < own.min_ns.load(Relaxed) {
            own.min_ns.store(rtt, Relaxed);
        }
        let age = now.saturating_sub(own.started_ns.load(Relaxed));
        if count < SAMPLE_WINDOW && age < SAMPLE_WINDOW_NS {
            return;
        }
        // Take the window (a thread sharing the stripe may add to the next).
        let n = u64::from(own.count.swap(0, Relaxed));
        if n == 0 {
            return;
        }
        let sum = own.sum_ns.swap(0, Relaxed);
        let min = own.min_ns.swap(u64::MAX, Relaxed);
        // What is in flight as the window closes (counting this request):
        // read once per window, not per request.
        let in_flight = self.permits.in_use() + 1;
        let next = vegas
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .update_window(sum / n, min.min(sum / n), in_flight, n);
        self.permits.set_limit(next);
    }
}

/// An admitted request; dropping it releases its slot and feeds its latency
/// to the adaptive limit.
pub struct Admitted {
    limit: Handle<LimitState>,
    started: Option<u64>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.limit.release(self.started);
    }
}

/// Decides whether a request is admitted; the ticket is held until it
/// completes. Implemented by [`ConcurrencyLimit`] and
/// [`CpuShedder`](crate::CpuShedder).
pub trait Admission: Send + Sync + 'static {
    /// Held while the request runs; dropping it records the completion.
    type Ticket: Send + 'static;
    /// The `reason` label of `load_shed_total` for requests this sheds.
    const REASON: &'static str;
    /// Admits one request, or `None` to shed it.
    fn admit(self: &Arc<Self>) -> Option<Self::Ticket>;
}

impl Admission for ConcurrencyLimit {
    type Ticket = Admitted;
    const REASON: &'static str = "concurrency";
    fn admit(self: &Arc<Self>) -> Option<Admitted> {
        self.try_acquire()
    }
}

impl Admission for crate::CpuShedder {
    type Ticket = crate::CpuAdmitted;
    const REASON: &'static str = "cpu";
    fn admit(self: &Arc<Self>) -> Option<crate::CpuAdmitted> {
        self.try_acquire()
    }
}

/// Sheds what its [`Admission`] refuses: HTTP 503 with a JSON error, gRPC
/// UNAVAILABLE.
pub struct ShedLayer<A> {
    gate: Arc<A>,
}

impl<A> Clone for ShedLayer<A> {
    fn clone(&self) -> Self {
        ShedLayer {
            gate: self.gate.clone(),
        }
    }
}

impl<A: Admission> ShedLayer<A> {
    /// Sheds what `gate` refuses.
    pub fn new(gate: Arc<A>) -> Self {
        ShedLayer { gate }
    }
}

/// Sheds above a [`ConcurrencyLimit`].
pub type ConcurrencyLimitLayer = ShedLayer<ConcurrencyLimit>;
/// Sheds when the CPU is hot and the service is over its proven capacity.
pub type CpuShedLayer = ShedLayer<crate::CpuShedder>;
/// The retry hint on a shed request (`RetryInfo`, `Retry-After`): long
/// enough for a standing queue to drain, short enough not to idle a
/// recovered instance.
pub const SHED_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Sheds while a standing queue holds requests longer than a target.
pub type DelayShedLayer = ShedLayer<crate::DelayShedder>;

impl<S, A> Layer<S> for ShedLayer<A> {
    type Service = Shed<S, A>;

    fn layer(&self, inner: S) -> Shed<S, A> {
        Shed {
            inner,
            gate: self.gate.clone(),
        }
    }
}

/// A service behind a [`ShedLayer`].
pub struct Shed<S, A> {
    inner: S,
    gate: Arc<A>,
}

impl<S: Clone, A> Clone for Shed<S, A> {
    fn clone(&self) -> Self {
        Shed {
            inner: self.inner.clone(),
            gate: self.gate.clone(),
        }
    }
}

impl<S, A, B, RB> Service<Request<B>> for Shed<S, A>
where
    A: Admission,
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Default + From<String> + Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = ShedFuture<S::Future, A::Ticket, Response<RB>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(admitted) = self.gate.admit() else {
            metrics::counter!("load_shed_total", "reason" => A::REASON).increment(1);
            // Another instance may have room now; this one in a moment.
            let error = trellis_core::Error::new(
                trellis_core::Code::Unavailable,
                "OVERLOADED",
                "overloaded; retry elsewhere",
            )
            .with_retry_after(SHED_RETRY_AFTER);
            let refusal = refuse(error, is_grpc(req.headers()), &[]);
            return EitherFuture::left(std::future::ready(Ok(refusal)));
        };
        EitherFuture::right(Held {
            fut: self.inner.call(req),
            ticket: Some(admitted),
        })
    }
}

type Refusal<R, E> = std::future::Ready<Result<R, E>>;

/// The response future of [`Shed`]: the refusal, or the request holding
/// its ticket until it completes.
pub type ShedFuture<F, T, R, E> = EitherFuture<Refusal<R, E>, Held<F, T>>;

pin_project_lite::pin_project! {
    /// A request's future holding its admission ticket until it completes.
    pub struct Held<F, T> {
        #[pin]
        fut: F,
        ticket: Option<T>,
    }
}

impl<F: Future, T> Future for Held<F, T> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let out = std::task::ready!(this.fut.poll(cx));
        // The completion is recorded as the request ends.
        drop(this.ticket.take());
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_limit_admits_up_to_its_cap() {
        let limit = ConcurrencyLimit::new(LimitKind::Fixed(2));
        let a = limit.try_acquire().unwrap();
        let _b = limit.try_acquire().unwrap();
        assert!(limit.try_acquire().is_none());
        assert_eq!(limit.shed_total(), 1);
        drop(a);
        assert!(limit.try_acquire().is_some());
    }

    #[test]
    fn the_cap_is_exact_though_permits_are_cached_per_thread() {
        let limit = ConcurrencyLimit::new(LimitKind::Fixed(4));
        // Another thread admits and releases, leaving permits in its cache.
        std::thread::spawn({
            let limit = limit.clone();
            move || {
                for _ in 0..100 {
                    drop(limit.try_acquire().unwrap());
                }
            }
        })
        .join()
        .unwrap();
        // This thread still gets all four (taking from that cache) ...
        let held: Vec<_> = (0..4).map(|_| limit.try_acquire()).collect();
        assert!(
            held.iter().all(Option::is_some),
            "the cap was not reachable"
        );
        assert_eq!(limit.in_flight(), 4);
        // ... and no fifth, from any thread.
        assert!(limit.try_acquire().is_none());
        let other = limit.clone();
        assert!(
            std::thread::spawn(move || other.try_acquire().is_none())
                .join()
                .unwrap()
        );
        drop(held);
        assert_eq!(limit.in_flight(), 0);
    }

    #[test]
    fn many_threads_never_hold_more_than_the_cap() {
        use std::sync::atomic::AtomicBool;
        let limit = ConcurrencyLimit::new(LimitKind::Fixed(8));
        let held = Arc::new(AtomicUsize::new(0));
        let over = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (limit, held, over) = (limit.clone(), held.clone(), over.clone());
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        if let Some(ticket) = limit.try_acquire() {
                            if held.fetch_add(1, Relaxed) + 1 > 8 {
                                over.store(true, Relaxed);
                            }
                            held.fetch_sub(1, Relaxed);
                            drop(ticket);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(!over.load(Relaxed), "more than 8 held at once");
        // Everything came back: the whole cap is available again.
        let all: Vec<_> = (0..8).map(|_| limit.try_acquire()).collect();
        assert!(all.iter().all(Option::is_some));
        assert!(limit.try_acquire().is_none());
    }

    #[test]
    fn a_lowered_limit_admits_nothing_until_enough_is_released() {
        let state = Permits::new(4);
        assert!((0..4).all(|_| state.try_acquire()));
        state.set_limit(2);
        assert!(!state.try_acquire(), "4 in use, limit 2");
        state.release();
        state.release();
        assert!(!state.try_acquire(), "2 in use, limit 2");
        state.release();
        assert!(state.try_acquire(), "1 in use, limit 2");
        assert!(!state.try_acquire());
    }

    #[test]
    fn vegas_shrinks_when_requests_queue_and_grows_when_they_do_not() {
        let mut v = Vegas {
            limit: 64.0,
            min: 2.0,
            max: 1000.0,
            rtt_noload: 0.0,
            samples: 0,
        };
        v.update(Duration::from_millis(5), 64);
        // Queueing: latency grows with what is in flight beyond a capacity of 4.
        for _ in 0..200 {
            let in_flight = v.limit as usize;
            let rtt = Duration::from_millis(5).mul_f64((in_flight as f64 / 4.0).max(1.0));
            v.update(rtt, in_flight);
        }
        assert!(
            v.limit < 16.0,
            "limit {} did not come down towards 4",
            v.limit
        );
        let low = v.limit;
        // No queueing any more: latency at no-load level, limit in use.
        for _ in 0..200 {
            v.update(Duration::from_millis(5), v.limit as usize);
        }
        assert!(
            v.limit > low * 2.0,
            "limit {} did not recover from {low}",
            v.limit
        );
    }

    #[test]
    fn an_idle_service_does_not_move_the_limit() {
        let mut v = Vegas {
            limit: 50.0,
            min: 1.0,
            max: 1000.0,
            rtt_noload: 0.0,
            samples: 0,
        };
        for _ in 0..1000 {
            v.update(Duration::from_millis(100), 1);
        }
        assert_eq!(v.limit, 50.0);
    }
}
