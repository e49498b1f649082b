//! A breaker in front of a service, one for all calls or one per method.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, PoisonError, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use tokio::time::Instant;
use tonic::Status;
use tower::{Layer, Service};
use trellis_core::protocol::{Classified, End, Report};

use super::{BreakerPolicy, Outcome, Permit};
use crate::BoxError;

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

impl<P: BreakerPolicy> CircuitBreakerLayer<P> {
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

impl<S, P: BreakerPolicy> Layer<S> for CircuitBreakerLayer<P> {
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

/// One admitted call, recorded exactly once: when its response has ended
/// (its class from the head, or from the trailers), when it failed, or —
/// dropped before either — as cancelled.
struct Call<P: BreakerPolicy> {
    breaker: Arc<P>,
    permit: Permit,
    started: Instant,
    /// Time to the response head, which slow-call thresholds judge (a
    /// stream's length is the caller's business).
    to_head: Option<Duration>,
    done: bool,
}

impl<P: BreakerPolicy> Call<P> {
    fn record(mut self, outcome: Outcome) {
        self.done = true;
        let elapsed = self.to_head.unwrap_or_else(|| self.started.elapsed());
        self.breaker.record(self.permit, outcome, elapsed);
    }
}

impl<P: BreakerPolicy> Drop for Call<P> {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            let elapsed = self.started.elapsed();
            self.breaker
                .record(self.permit, Outcome::Cancelled, elapsed);
        }
    }
}

/// Records a call when its response body ends (see [`Classified`]).
pub struct BreakerReport<P: BreakerPolicy>(Call<P>);

impl<P: BreakerPolicy> Report for BreakerReport<P> {
    fn report(self, end: Option<End>) {
        self.0.record(Outcome::of(end.map(|e| e.class)));
    }
}

impl<S, P, B, RB> Service<Request<B>> for CircuitBreaker<S, P>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    P: BreakerPolicy,
    RB: http_body::Body,
{
    type Response = Response<Classified<RB, BreakerReport<P>>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

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
        let mut call = Call {
            breaker,
            permit,
            started: Instant::now(),
            to_head: None,
            done: false,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            match fut.await {
                Ok(response) => {
                    call.to_head = Some(call.started.elapsed());
                    let (parts, body) = response.into_parts();
                    let body =
                        Classified::new(parts.status, &parts.headers, body, BreakerReport(call));
                    Ok(Response::from_parts(parts, body))
                }
                Err(err) => {
                    call.record(Outcome::Failure);
                    Err(err.into())
                }
            }
        })
    }
}
