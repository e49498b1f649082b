//! RED metrics (rate, errors, duration) for every request through a server.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use axum::extract::MatchedPath;
use http::{Request, Response};
use metrics::{Unit, describe_gauge, describe_histogram, gauge, histogram};
use tower::{Layer, Service};

pub(crate) fn describe() {
    describe_histogram!(
        "rpc_server_duration_seconds",
        Unit::Seconds,
        "rpc.server.duration: gRPC server call duration"
    );
    describe_histogram!(
        "http_server_request_duration_seconds",
        Unit::Seconds,
        "http.server.request.duration: HTTP server request duration"
    );
    describe_gauge!("rpc_server_active_requests", "gRPC calls in flight");
    describe_gauge!(
        "http_server_active_requests",
        "http.server.active_requests: HTTP requests in flight"
    );
    metrics::describe_counter!(
        "config_reload_failures_total",
        "Config updates rejected (the last good config stayed)"
    );
    metrics::describe_counter!(
        "rate_limit_rejections_total",
        "Requests refused by a rate limit"
    );
    metrics::describe_counter!("load_shed_total", "Requests shed under load, by reason");
    describe_histogram!(
        "rpc_client_duration_seconds",
        Unit::Seconds,
        "rpc.client.duration: gRPC client call duration"
    );
    describe_histogram!(
        "http_client_request_duration_seconds",
        Unit::Seconds,
        "http.client.request.duration: HTTP client request duration"
    );
    metrics::describe_counter!(
        "circuit_breaker_transitions_total",
        "Circuit breaker state changes, by the state entered"
    );
    metrics::describe_gauge!(
        "circuit_breaker_open",
        "Circuit breakers currently open or half-open"
    );
    metrics::describe_counter!(
        "registry_events_total",
        "Registry and discovery events, by kind"
    );
}

/// Records RED metrics for every request (see the crate docs).
#[derive(Debug, Clone, Default)]
pub struct RedLayer;

impl RedLayer {
    /// A layer recording into the global `metrics` recorder.
    pub fn new() -> Self {
        RedLayer
    }
}

impl<S> Layer<S> for RedLayer {
    type Service = Red<S>;

    fn layer(&self, inner: S) -> Red<S> {
        Red { inner }
    }
}

/// A service whose requests are measured.
#[derive(Debug, Clone)]
pub struct Red<S> {
    inner: S,
}

/// What a request is, for labels.
enum Kind {
    Grpc { service: String, method: String },
    Http { method: String, route: String },
}

/// One request in flight: counted in the gauge from creation, and recorded
/// exactly once — when the response head arrives, or when the request is
/// dropped unanswered (the client went away, a timeout outside cut it),
/// then as CANCELLED (gRPC 1) or 499 (HTTP, the code nginx and Envoy use for
/// a client that closed the request). Without this the gauge would keep
/// every cancelled request forever.
struct InFlight {
    kind: Option<Kind>,
    started: Instant,
}

impl InFlight {
    fn start(kind: Kind) -> InFlight {
        match &kind {
            Kind::Grpc { service, .. } => gauge!("rpc_server_active_requests", "rpc_system" => "grpc", "rpc_service" => service.clone()).increment(1.0),
            Kind::Http { method, route } => gauge!("http_server_active_requests", "http_request_method" => method.clone(), "http_route" => route.clone())
                .increment(1.0),
        }
        InFlight {
            kind: Some(kind),
            started: Instant::now(),
        }
    }

    /// Records the outcome: the gRPC code or HTTP status, and for REST the
    /// route template the transcoder matched.
    fn finish(&mut self, code: String, template: Option<String>) {
        let seconds = self.started.elapsed().as_secs_f64();
        match self.kind.take() {
            Some(Kind::Grpc { service, method }) => {
                gauge!("rpc_server_active_requests", "rpc_system" => "grpc", "rpc_service" => service.clone()).decrement(1.0);
                // Any method name under a known service reaches here; one
                // that does not exist must not become a label of its own,
                // or callers could grow the registry without bound.
                let method = if code == "12" {
                    "unknown".to_owned()
                } else {
                    method
                };
                histogram!("rpc_server_duration_seconds", "rpc_system" => "grpc", "rpc_service" => service, "rpc_method" => method, "rpc_grpc_status_code" => code)
                    .record(seconds);
            }
            Some(Kind::Http { method, route }) => {
                gauge!("http_server_active_requests", "http_request_method" => method.clone(), "http_route" => route.clone())
                    .decrement(1.0);
                // A route matched below axum (transcoded REST) names its
                // template; the in-flight gauge keeps the axum route it
                // was counted under.
                let route = template.unwrap_or(route);
                histogram!("http_server_request_duration_seconds", "http_request_method" => method, "http_route" => route, "http_response_status_code" => code)
                    .record(seconds);
            }
            None => {}
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let cancelled = match &self.kind {
            Some(Kind::Grpc { .. }) => "1",
            Some(Kind::Http { .. }) => "499",
            None => return,
        };
        self.finish(cancelled.to_owned(), None);
    }
}

impl<S, B, RB> Service<Request<B>> for Red<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let kind = if grpc {
            // `/package.Service/Method`
            let mut parts = req.uri().path().trim_start_matches('/').splitn(2, '/');
            let service = parts.next().unwrap_or("").to_owned();
            let method = parts.next().unwrap_or("").to_owned();
            // Per service only: the method is not known to exist until the call ends.
            Kind::Grpc { service, method }
        } else {
            let route = req
                .extensions()
                .get::<MatchedPath>()
                .map(|m| m.as_str().to_owned())
                .unwrap_or_else(|| "unmatched".into());
            let method = req.method().as_str().to_owned();
            Kind::Http { method, route }
        };
        let mut in_flight = InFlight::start(kind);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let grpc = matches!(in_flight.kind, Some(Kind::Grpc { .. }));
            let (code, template) = match (&result, grpc) {
                // Errors from handlers travel trailers-only (status in the
                // headers); a status sent in trailers after a body (a
                // streaming failure) is counted as the headers say: OK.
                (Ok(r), true) => (
                    r.headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("0")
                        .to_owned(),
                    None,
                ),
                (Err(_), true) => ("2".to_owned(), None),
                (Ok(r), false) => (
                    r.status().as_u16().to_string(),
                    r.extensions()
                        .get::<trellis_core::RouteTemplate>()
                        .map(|t| t.0.to_string()),
                ),
                (Err(_), false) => ("500".to_owned(), None),
            };
            in_flight.finish(code, template);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hundred requests dropped mid-flight (clients gone, or cut by a
    /// timeout outside): the in-flight gauges return to zero, and each is
    /// recorded once, as cancelled.
    #[test]
    fn cancelled_requests_leave_the_gauges_right_and_are_recorded() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let never = tower::service_fn(|_req: Request<()>| {
            std::future::pending::<Result<Response<()>, std::convert::Infallible>>()
        });
        let mut red = RedLayer::new().layer(never);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut pending = Vec::new();
        for i in 0..100 {
            let req = if i % 2 == 0 {
                Request::get("/v1/users/7").body(()).unwrap()
            } else {
                Request::post("/shop.user.v1.UserService/GetUser")
                    .header("content-type", "application/grpc")
                    .body(())
                    .unwrap()
            };
            let mut fut = red.call(req);
            assert!(fut.as_mut().poll(&mut cx).is_pending());
            pending.push(fut);
        }
        let during = handle.render();
        assert!(
            during.contains("http_server_active_requests{http_request_method=\"GET\",http_route=\"unmatched\"} 50"),
            "{during}"
        );
        drop(pending);
        let after = handle.render();
        assert!(
            after.contains("http_server_active_requests{http_request_method=\"GET\",http_route=\"unmatched\"} 0"),
            "{after}"
        );
        assert!(
            after.contains("rpc_server_active_requests{rpc_system=\"grpc\",rpc_service=\"shop.user.v1.UserService\"} 0"),
            "{after}"
        );
        assert!(
            after.lines().any(
                |l| l.starts_with("http_server_request_duration_seconds_count{")
                    && l.contains("http_response_status_code=\"499\"")
                    && l.ends_with(" 50")
            ),
            "{after}"
        );
        assert!(
            after
                .lines()
                .any(|l| l.starts_with("rpc_server_duration_seconds_count{")
                    && l.contains("rpc_grpc_status_code=\"1\"")
                    && l.ends_with(" 50")),
            "{after}"
        );
    }
}
