//! Deadline propagation on the client side.
//!
//! A call made while handling a request inherits what is left of that
//! request's deadline (see [`trellis_core::deadline`]); the layer sends the
//! smaller of that and its own timeout downstream, fails with
//! DEADLINE_EXCEEDED without sending anything once no time is left, and
//! stops waiting when the time runs out.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderValue, Request};
use tonic::Status;
use tower::{Layer, Service};
use trellis_core::deadline;

use crate::BoxError;

/// Applies [`Deadline`] to a service.
#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    timeout: Option<Duration>,
}

impl DeadlineLayer {
    /// The client's own timeout per call; `None` relies on the inherited
    /// deadline alone.
    pub fn new(timeout: Option<Duration>) -> Self {
        DeadlineLayer { timeout }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            timeout: self.timeout,
        }
    }
}

/// A service whose calls carry and honour a deadline.
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    timeout: Option<Duration>,
}

fn min_opt(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl<S> Deadline<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S, B> Service<Request<B>> for Deadline<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let budget = min_opt(self.timeout, deadline::remaining());
        if let Some(budget) = budget {
            if budget.is_zero() {
                return Box::pin(async {
                    Err(Box::new(Status::deadline_exceeded(
                        "no time left before the caller's deadline",
                    )) as BoxError)
                });
            }
            if crate::reject::is_grpc(req.headers()) {
                // A deadline the caller set on the request itself also counts.
                let set = req
                    .headers()
                    .get(trellis_core::protocol::GRPC_TIMEOUT)
                    .and_then(|v| deadline::parse_grpc_timeout(v.as_bytes()));
                let value =
                    deadline::grpc_timeout_header(min_opt(Some(budget), set).unwrap_or(budget));
                req.headers_mut()
                    .insert(trellis_core::protocol::GRPC_TIMEOUT, value);
            } else if let Ok(value) = HeaderValue::from_str(&budget.as_millis().max(1).to_string())
            {
                req.headers_mut()
                    .insert(deadline::HTTP_TIMEOUT_HEADER, value);
            }
        }
        let started = tokio::time::Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let exceeded = |budget: Duration| {
                Box::new(Status::deadline_exceeded(format!(
                    "no response within {budget:?}"
                ))) as BoxError
            };
            match budget {
                Some(budget) => match tokio::time::timeout(budget, fut).await {
                    // tonic's channel enforces `grpc-timeout` too and reports
                    // it as CANCELLED; whatever fails once the time is up
                    // failed because the time is up.
                    Ok(Err(_)) if started.elapsed() >= budget => Err(exceeded(budget)),
                    Ok(result) => result.map_err(Into::into),
                    Err(_) => Err(exceeded(budget)),
                },
                None => fut.await.map_err(Into::into),
            }
        })
    }
}
