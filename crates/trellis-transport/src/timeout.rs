//! The server's request timeout, as a layer: a request must produce its
//! response head within the smaller of the server's own timeout and the
//! caller's (`grpc-timeout`, or `x-request-timeout-ms` for HTTP). The
//! deadline is scoped as a task-local for the handler, so the calls it makes
//! inherit what is left ([`trellis_core::deadline`]); a request that runs out
//! is answered DEADLINE_EXCEEDED (gRPC) or 504 (HTTP).

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use tower::{Layer, Service};
use trellis_core::{Code, Error, deadline, protocol};

/// The server's request timeout, adjustable while it runs (from the config
/// centre). Reading it costs one relaxed atomic load per request.
#[derive(Debug, Clone)]
pub struct RequestTimeout(Arc<AtomicU64>);

impl RequestTimeout {
    /// A timeout; `None` disables it.
    pub fn new(timeout: Option<Duration>) -> Self {
        let t = RequestTimeout(Arc::new(AtomicU64::new(0)));
        t.set(timeout);
        t
    }

    /// The timeout in force.
    pub fn get(&self) -> Option<Duration> {
        match self.0.load(Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Changes the timeout for requests that start from now on.
    pub fn set(&self, timeout: Option<Duration>) {
        let ms = timeout
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1))
            .unwrap_or(0);
        self.0.store(ms, Relaxed);
    }
}

/// Applies [`ServerTimeout`].
#[derive(Debug, Clone)]
pub struct ServerTimeoutLayer {
    timeout: RequestTimeout,
}

impl ServerTimeoutLayer {
    /// Requests get `timeout` (or less, when the caller asks for less).
    pub fn new(timeout: RequestTimeout) -> Self {
        ServerTimeoutLayer { timeout }
    }
}

impl<S> Layer<S> for ServerTimeoutLayer {
    type Service = ServerTimeout<S>;

    fn layer(&self, inner: S) -> ServerTimeout<S> {
        ServerTimeout {
            inner,
            timeout: self.timeout.clone(),
        }
    }
}

/// A service whose requests must answer within their deadline (see the
/// module docs).
#[derive(Debug, Clone)]
pub struct ServerTimeout<S> {
    inner: S,
    timeout: RequestTimeout,
}

/// The caller's own timeout: `grpc-timeout` for gRPC, the
/// `x-request-timeout-ms` Trellis clients send for HTTP.
fn callers_timeout(headers: &http::HeaderMap, grpc: bool) -> Option<Duration> {
    if grpc {
        headers
            .get(protocol::GRPC_TIMEOUT)
            .and_then(|v| deadline::parse_grpc_timeout(v.as_bytes()))
    } else {
        headers
            .get(deadline::HTTP_TIMEOUT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis)
    }
}

impl<S, B, RB> Service<Request<B>> for ServerTimeout<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = Infallible>,
    S::Future: Send + 'static,
    RB: Default + From<Bytes> + Send + 'static,
{
    type Response = Response<RB>;
    type Error = Infallible;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let grpc = protocol::is_grpc(req.headers());
        let timeout = match (self.timeout.get(), callers_timeout(req.headers(), grpc)) {
            (Some(own), Some(theirs)) => Some(own.min(theirs)),
            (own, theirs) => own.or(theirs),
        };
        let fut = self.inner.call(req);
        let Some(timeout) = timeout else {
            return TimeoutFuture {
                state: TimeoutState::Unbounded { fut },
            };
        };
        // Outbound calls made while handling this request inherit what is left.
        let deadline = tokio::time::Instant::now() + timeout;
        TimeoutFuture {
            state: TimeoutState::Bounded {
                fut: Deadlined {
                    fut: deadline::scope(deadline, fut),
                    deadline,
                    timeout,
                    grpc,
                    sleep: None,
                },
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`ServerTimeout`].
    pub struct TimeoutFuture<F> {
        #[pin]
        state: TimeoutState<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = TimeoutProj]
    enum TimeoutState<F> {
        Unbounded { #[pin] fut: F },
        Bounded { #[pin] fut: Deadlined<deadline::Scoped<F>> },
    }
}

impl<F, RB> Future for TimeoutFuture<F>
where
    F: Future<Output = Result<Response<RB>, Infallible>>,
    RB: Default + From<Bytes>,
{
    type Output = Result<Response<RB>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            TimeoutProj::Unbounded { fut } => fut.poll(cx),
            TimeoutProj::Bounded { fut } => fut.poll(cx),
        }
    }
}

pin_project_lite::pin_project! {
    /// A response future held to its deadline. The timer is set only if
    /// the response is not ready on the first poll: most answers are, and
    /// arming and disarming a timer for each is most of a timeout's cost.
    struct Deadlined<F> {
        #[pin]
        fut: F,
        deadline: tokio::time::Instant,
        timeout: Duration,
        grpc: bool,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
    }
}

impl<F, RB> Future for Deadlined<F>
where
    F: Future<Output = Result<Response<RB>, Infallible>>,
    RB: Default + From<Bytes>,
{
    type Output = Result<Response<RB>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(response) = this.fut.poll(cx) {
            return Poll::Ready(response);
        }
        if this.sleep.is_none() {
            this.sleep
                .set(Some(tokio::time::sleep_until(*this.deadline)));
        }
        let Some(sleep) = this.sleep.as_pin_mut() else {
            return Poll::Pending;
        };
        if sleep.poll(cx).is_pending() {
            return Poll::Pending;
        }
        let message = format!("request did not complete within {:?}", this.timeout);
        Poll::Ready(Ok(if *this.grpc {
            tonic::Status::new(Code::DeadlineExceeded, message).into_http()
        } else {
            Error::new(Code::DeadlineExceeded, "REQUEST_TIMEOUT", message).to_http_response()
        }))
    }
}
