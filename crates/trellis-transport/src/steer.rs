//! Routes each request on the shared port by content type, under a deadline.
//!
//! gRPC requests (`content-type: application/grpc*`) go to the tonic routes,
//! everything else to the axum router. Steering by content type rather than
//! by path lets a later JSON face of an RPC (`POST /pkg.Service/Method` with
//! a JSON body) live on the HTTP side under the same path as the gRPC method.

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

use axum::{body::Body, response::IntoResponse};
use http::{Request, Response};
use tower::Service;
use trellis_core::{Code, Error};

pub use trellis_core::protocol::is_grpc;

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

/// The per-connection service: gRPC or HTTP, with the request timeout.
#[derive(Clone)]
pub(crate) struct Steer {
    pub(crate) grpc: axum::Router,
    pub(crate) http: axum::Router,
    pub(crate) timeout: RequestTimeout,
    /// The connection's peer, set per connection.
    pub(crate) peer: Option<std::net::SocketAddr>,
    /// The served gRPC methods, by path: a request for one carries its
    /// [`trellis_core::RouteTemplate`] into the layers.
    pub(crate) grpc_routes:
        std::sync::Arc<std::collections::HashMap<Box<str>, trellis_core::RouteTemplate>>,
}

impl<B> Service<Request<B>> for Steer
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both routers are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if let Some(peer) = self.peer {
            req.extensions_mut().insert(trellis_core::PeerAddr(peer));
        }
        let grpc = is_grpc(req.headers());
        if grpc && let Some(route) = self.grpc_routes.get(req.uri().path()) {
            req.extensions_mut().insert(route.clone());
        }
        let caller = if grpc {
            req.headers()
                .get("grpc-timeout")
                .and_then(|v| trellis_core::deadline::parse_grpc_timeout(v.as_bytes()))
        } else {
            req.headers()
                .get(trellis_core::deadline::HTTP_TIMEOUT_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_millis)
        };
        let timeout = match (self.timeout.get(), caller) {
            (Some(own), Some(theirs)) => Some(own.min(theirs)),
            (own, theirs) => own.or(theirs),
        };
        let fut = if grpc {
            self.grpc.call(req)
        } else {
            self.http.call(req)
        };
        Box::pin(async move {
            let Some(timeout) = timeout else {
                return fut.await;
            };
            // Outbound calls made while handling this request inherit what is left.
            let deadline = tokio::time::Instant::now() + timeout;
            let fut = trellis_core::deadline::scope(deadline, fut);
            match tokio::time::timeout_at(deadline, fut).await {
                Ok(response) => response,
                Err(_) if grpc => Ok(tonic::Status::new(
                    Code::DeadlineExceeded,
                    format!("request did not complete within {timeout:?}"),
                )
                .into_http()),
                Err(_) => Ok(Error::new(
                    Code::DeadlineExceeded,
                    "REQUEST_TIMEOUT",
                    format!("request did not complete within {timeout:?}"),
                )
                .into_response()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    #[test]
    fn recognises_grpc_content_types() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        h.insert(
            http::header::CONTENT_TYPE,
            "application/grpc+proto".parse().unwrap(),
        );
        assert!(is_grpc(&h));
        h.insert(
            http::header::CONTENT_TYPE,
            "application/json".parse().unwrap(),
        );
        assert!(!is_grpc(&h));
    }
}
