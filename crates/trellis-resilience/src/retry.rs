//! Retries with backoff and a budget.
//!
//! A retry is only worth it when the failure says the request was not
//! processed or the server asked for it: a connect error, a trailers-only
//! UNAVAILABLE, RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms` (waiting
//! that long), or 502/503/504 for an idempotent HTTP method. A retry never
//! sleeps past the caller's deadline. The [`RetryBudget`] caps retries at a
//! share of recent requests (plus a small floor per second), so a failing
//! upstream sees little more than the original load instead of N times it.
//!
//! Bodies are buffered (up to `max_buffered_body`) so they can be sent
//! again; larger bodies are sent once, without retries.

use std::{
    future::Future,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use tower::{Layer, Service, ServiceExt};

use crate::{BoxError, clock::Clock};

/// How long to wait before each retry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Backoff {
    /// The same wait every time.
    Fixed(Duration),
    /// base × 2^n, capped.
    Exponential {
        /// The first wait.
        base: Duration,
        /// The longest wait.
        max: Duration,
    },
    /// A uniform random wait in [0, base × 2^n], capped (AWS "full jitter").
    FullJitter {
        /// The first wait's upper bound.
        base: Duration,
        /// The longest wait.
        max: Duration,
    },
    /// min(max, random in [base, previous × 3]) (AWS "decorrelated jitter").
    DecorrelatedJitter {
        /// The shortest wait.
        base: Duration,
        /// The longest wait.
        max: Duration,
    },
}

impl Backoff {
    /// The wait before retry number `n` (0 = the first retry), given the
    /// previous wait.
    pub fn delay(&self, n: u32, previous: Duration, random: f64) -> Duration {
        let exp = |base: Duration, max: Duration| {
            base.saturating_mul(1u32.checked_shl(n.min(30)).unwrap_or(u32::MAX))
                .min(max)
        };
        match *self {
            Backoff::Fixed(d) => d,
            Backoff::Exponential { base, max } => exp(base, max),
            Backoff::FullJitter { base, max } => exp(base, max).mul_f64(random.clamp(0.0, 1.0)),
            Backoff::DecorrelatedJitter { base, max } => {
                let upper = previous.max(base).saturating_mul(3);
                (base + (upper.saturating_sub(base)).mul_f64(random.clamp(0.0, 1.0))).min(max)
            }
        }
    }
}

/// Retries may add at most `ratio` × recent requests plus `min_per_second`.
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    window_ms: u64,
    clock: Clock,
    start: tokio::time::Instant,
    // Two rotating halves of the window: (epoch, requests, retries).
    halves: [(AtomicU64, AtomicU64, AtomicU64); 2],
}

impl RetryBudget {
    /// A budget over a 10 s window.
    pub fn new(ratio: f64, min_per_second: u32) -> Self {
        RetryBudget {
            ratio: ratio.max(0.0),
            min_per_second,
            window_ms: 10_000,
            clock: Clock::Coarse,
            start: tokio::time::Instant::now(),
            halves: Default::default(),
        }
    }

    fn half(&self) -> &(AtomicU64, AtomicU64, AtomicU64) {
        let now = match self.clock {
            Clock::Coarse => crate::clock::coarse_now_ms(),
            Clock::Tokio => self.start.elapsed().as_millis() as u64,
        };
        let epoch = now / (self.window_ms / 2) + 1;
        let half = &self.halves[(epoch % 2) as usize];
        let seen = half.0.load(Relaxed);
        if seen != epoch
            && half
                .0
                .compare_exchange(seen, epoch, Relaxed, Relaxed)
                .is_ok()
        {
            half.1.store(0, Relaxed);
            half.2.store(0, Relaxed);
        }
        half
    }

    /// Records an original request.
    pub fn deposit(&self) {
        self.half().1.fetch_add(1, Relaxed);
    }

    /// Takes one retry from the budget, if there is one.
    pub fn withdraw(&self) -> bool {
        let current = self.half();
        let (requests, retries) = self.halves.iter().fold((0u64, 0u64), |(q, r), h| {
            (q + h.1.load(Relaxed), r + h.2.load(Relaxed))
        });
        let allowed = self.ratio * requests as f64
            + f64::from(self.min_per_second) * (self.window_ms as f64 / 1000.0);
        if (retries as f64) < allowed {
            current.2.fetch_add(1, Relaxed);
            true
        } else {
            false
        }
    }
}

/// Retry settings.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. Default: 3.
    pub max_attempts: u32,
    /// The wait between attempts. Default: full jitter from 25 ms to 1 s.
    pub backoff: Backoff,
    /// Bodies up to this size are buffered for replay. Default: 64 KiB.
    pub max_buffered_body: usize,
    /// The longest `grpc-retry-pushback-ms` honoured. A server asking for a
    /// longer wait (or one past the caller's deadline) is not retried: its
    /// answer goes back at once, rather than a peer's header parking the
    /// call. Default: 10 s.
    pub max_pushback: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            backoff: Backoff::FullJitter {
                base: Duration::from_millis(25),
                max: Duration::from_secs(1),
            },
            max_buffered_body: 64 * 1024,
            max_pushback: Duration::from_secs(10),
        }
    }
}

/// Why an attempt may be retried, and the server's pushback if it gave one.
fn retryable<B>(
    result: &Result<Response<B>, BoxError>,
    idempotent: bool,
) -> Option<Option<Duration>> {
    match result {
        // Transport errors: the request may not have been sent. tonic's
        // channel surfaces connect failures here.
        Err(_) => Some(None),
        Ok(response) => {
            match response
                .headers()
                .get(trellis_core::protocol::GRPC_STATUS)
                .map(|v| v.as_bytes())
            {
                Some(b"14") => return Some(None),
                Some(b"8") => {
                    // Only when the server says when (gRPC retry design).
                    return response
                        .headers()
                        .get("grpc-retry-pushback-ms")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .map(|ms| Some(Duration::from_millis(ms)));
                }
                _ => {}
            }
            (idempotent && matches!(response.status().as_u16(), 502..=504)).then_some(None)
        }
    }
}

/// Applies [`Retry`].
#[derive(Clone)]
pub struct RetryLayer {
    policy: RetryPolicy,
    budget: std::sync::Arc<RetryBudget>,
}

impl RetryLayer {
    /// Retries by `policy` within `budget` (share it between layers that
    /// call the same upstream).
    pub fn new(policy: RetryPolicy, budget: std::sync::Arc<RetryBudget>) -> Self {
        RetryLayer { policy, budget }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            policy: self.policy.clone(),
            budget: self.budget.clone(),
        }
    }
}

/// A service whose failed calls are retried when it is safe and affordable.
#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    policy: RetryPolicy,
    budget: std::sync::Arc<RetryBudget>,
}

impl<S> Retry<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S, RB> Service<Request<tonic::body::Body>> for Retry<S>
where
    S: Service<Request<tonic::body::Body>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut first_service = std::mem::replace(&mut self.inner, clone);
        let service = self.inner.clone();
        let (policy, budget) = (self.policy.clone(), self.budget.clone());
        Box::pin(async move {
            budget.deposit();
            let grpc = crate::reject::is_grpc(req.headers());
            let idempotent = grpc
                || matches!(
                    *req.method(),
                    Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
                );
            let (parts, body) = req.into_parts();
            // Buffer the body so it can be sent again; too big: no retries.
            let limited = http_body_util::Limited::new(body, policy.max_buffered_body);
            let bytes: Bytes = match limited.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(err) => {
                    return Err(format!("cannot buffer the request body for retries: {err}").into());
                }
            };
            let build = |bytes: Bytes| {
                let mut req =
                    Request::new(tonic::body::Body::new(http_body_util::Full::new(bytes)));
                *req.method_mut() = parts.method.clone();
                *req.uri_mut() = parts.uri.clone();
                *req.version_mut() = parts.version;
                *req.headers_mut() = parts.headers.clone();
                req
            };
            let mut result = first_service
                .call(build(bytes.clone()))
                .await
                .map_err(Into::into);
            let mut previous = Duration::ZERO;
            for attempt in 1..policy.max_attempts.max(1) {
                let Some(pushback) = retryable(&result, idempotent) else {
                    break;
                };
                if pushback.is_some_and(|p| p > policy.max_pushback) {
                    break;
                }
                let wait = pushback.unwrap_or_else(|| {
                    policy
                        .backoff
                        .delay(attempt - 1, previous, crate::rng::random_unit())
                });
                previous = wait;
                if trellis_core::deadline::remaining().is_some_and(|left| left <= wait) {
                    break;
                }
                if !budget.withdraw() {
                    break;
                }
                tokio::time::sleep(wait).await;
                result = service
                    .clone()
                    .oneshot(build(bytes.clone()))
                    .await
                    .map_err(Into::into);
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that always answers RESOURCE_EXHAUSTED with `pushback`,
    /// counting the calls.
    fn pushing_back(
        pushback: &'static str,
        calls: std::sync::Arc<AtomicU64>,
    ) -> impl Service<
        Request<tonic::body::Body>,
        Response = Response<tonic::body::Body>,
        Error = BoxError,
        Future = impl Future<Output = Result<Response<tonic::body::Body>, BoxError>> + Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |_req: Request<tonic::body::Body>| {
            calls.fetch_add(1, Relaxed);
            let mut response = Response::new(tonic::body::Body::empty());
            response.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("application/grpc"),
            );
            response
                .headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static("8"));
            response.headers_mut().insert(
                "grpc-retry-pushback-ms",
                http::HeaderValue::from_static(pushback),
            );
            async move { Ok::<_, BoxError>(response) }
        })
    }

    fn grpc_request() -> Request<tonic::body::Body> {
        let mut req = Request::new(tonic::body::Body::empty());
        req.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc"),
        );
        req
    }

    /// A peer's pushback is honoured up to `max_pushback`, and past it the
    /// answer goes back at once instead of parking the call.
    #[tokio::test(start_paused = true)]
    async fn pushback_past_the_maximum_is_not_waited_for() {
        let budget = std::sync::Arc::new(RetryBudget::new(1.0, 100));
        for (pushback, attempts) in [("200", 3), ("1000000000000", 1)] {
            let calls = std::sync::Arc::new(AtomicU64::new(0));
            let mut retry = RetryLayer::new(RetryPolicy::default(), budget.clone())
                .layer(pushing_back(pushback, calls.clone()));
            let started = tokio::time::Instant::now();
            let response = retry.call(grpc_request()).await.unwrap();
            assert_eq!(response.headers()["grpc-status"], "8");
            assert_eq!(calls.load(Relaxed), attempts, "pushback {pushback} ms");
            let waited = started.elapsed();
            assert!(
                waited <= Duration::from_secs(1),
                "pushback {pushback} ms parked the call for {waited:?}"
            );
        }
    }

    #[test]
    fn backoffs() {
        let ms = Duration::from_millis;
        assert_eq!(Backoff::Fixed(ms(10)).delay(5, ms(0), 0.5), ms(10));
        let exp = Backoff::Exponential {
            base: ms(10),
            max: ms(100),
        };
        assert_eq!(
            [0, 1, 2, 3, 4].map(|n| exp.delay(n, ms(0), 0.0)),
            [ms(10), ms(20), ms(40), ms(80), ms(100)]
        );
        let full = Backoff::FullJitter {
            base: ms(10),
            max: ms(100),
        };
        assert_eq!(full.delay(2, ms(0), 0.5), ms(20));
        assert_eq!(full.delay(2, ms(0), 0.0), ms(0));
        let dec = Backoff::DecorrelatedJitter {
            base: ms(10),
            max: ms(100),
        };
        assert_eq!(dec.delay(0, ms(0), 1.0), ms(30));
        assert_eq!(dec.delay(1, ms(30), 1.0), ms(90));
        assert_eq!(dec.delay(2, ms(90), 1.0), ms(100));
        assert_eq!(dec.delay(2, ms(90), 0.0), ms(10));
    }

    #[test]
    fn budget_allows_the_ratio_plus_the_floor() {
        let budget = RetryBudget {
            min_per_second: 0,
            ..RetryBudget::new(0.2, 0)
        };
        for _ in 0..100 {
            budget.deposit();
        }
        let granted = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 20);
        let floor = RetryBudget::new(0.0, 1);
        assert_eq!(
            (0..100).filter(|_| floor.withdraw()).count(),
            10,
            "1/s over a 10 s window"
        );
    }
}
