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
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use tower::{Layer, Service};

use crate::{
    clock::Stamp,
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

    fn update(&mut self, rtt: Duration, in_flight: usize) -> usize {
        let rtt = (rtt.as_nanos() as f64).max(1.0);
        self.samples += 1;
        if self.rtt_noload == 0.0
            || rtt < self.rtt_noload
            || self.samples.is_multiple_of(Self::PROBE_EVERY)
        {
            self.rtt_noload = rtt;
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

/// A concurrency limit shared by every clone of the layer.
pub struct ConcurrencyLimit {
    in_flight: AtomicUsize,
    limit: AtomicUsize,
    adaptive: Option<Mutex<Vegas>>,
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
        Arc::new(ConcurrencyLimit {
            in_flight: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
            adaptive,
            shed: AtomicUsize::new(0),
        })
    }

    /// The limit now.
    pub fn limit(&self) -> usize {
        self.limit.load(Relaxed)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }

    /// Requests shed since start.
    pub fn shed_total(&self) -> usize {
        self.shed.load(Relaxed)
    }

    /// Admits one request, or `None` when at the limit.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Admitted> {
        let now = self.in_flight.fetch_add(1, Relaxed) + 1;
        if now > self.limit.load(Relaxed) {
            self.in_flight.fetch_sub(1, Relaxed);
            self.shed.fetch_add(1, Relaxed);
            return None;
        }
        // Only the adaptive limit learns from latency; a bulkhead skips the clock.
        let started = self.adaptive.as_ref().map(|_| Stamp::now());
        Some(Admitted {
            limit: self.clone(),
            started,
        })
    }

    fn release(&self, rtt: Option<Duration>) {
        let in_flight = self.in_flight.fetch_sub(1, Relaxed);
        if let (Some(g), Some(rtt)) = (&self.adaptive, rtt) {
            let next = g
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .update(rtt, in_flight);
            self.limit.store(next, Relaxed);
        }
    }
}

/// An admitted request; dropping it releases its slot and feeds its latency
/// to the adaptive limit.
pub struct Admitted {
    limit: Arc<ConcurrencyLimit>,
    started: Option<Stamp>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.limit.release(self.started.map(|s| s.elapsed()));
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
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, S::Error>> + Send>>;

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
            return Box::pin(std::future::ready(Ok(refuse(
                error,
                is_grpc(req.headers()),
                &[],
            ))));
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            drop(admitted);
            result
        })
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
