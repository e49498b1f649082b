//! RED metrics (rate, errors, duration) for every request through a server.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use axum::extract::MatchedPath;
use http::{Request, Response};
use metrics::{SharedString, Unit, describe_gauge, describe_histogram, gauge, histogram};
use tonic::Code;
use tower::{Layer, Service};
use trellis_core::{
    RouteTemplate,
    protocol::{self, Classified, End, Report},
};

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

/// What a request is, for labels. Every label comes from a bounded set:
/// gRPC service and method from the route the server matched (a method it
/// does not serve is `_OTHER`), the HTTP method from the standard ones
/// (`_OTHER` for the rest), the HTTP route from the matched template, never
/// the raw path.
enum Kind {
    Grpc {
        service: SharedString,
        method: SharedString,
    },
    Http {
        method: &'static str,
        route: SharedString,
    },
}

/// One request in flight: counted in the gauge from creation, and recorded
/// exactly once — when its response has ended (the gRPC status from the
/// trailers when it comes there), or when it is dropped first (the client
/// went away, a timeout outside cut it), then as CANCELLED (gRPC 1) or 499
/// (HTTP, the code nginx and Envoy use for a client that closed the
/// request). Without this the gauge would keep every cancelled request
/// forever.
pub struct InFlight {
    kind: Option<Kind>,
    started: Instant,
    /// The HTTP status and the route template a router below named, once
    /// the response head has come.
    head: Option<(SharedString, Option<SharedString>)>,
}

impl InFlight {
    fn start(kind: Kind) -> InFlight {
        match &kind {
            Kind::Grpc { service, .. } => gauge!("rpc_server_active_requests", "rpc_system" => "grpc", "rpc_service" => service.clone()).increment(1.0),
            Kind::Http { method, route } => gauge!("http_server_active_requests", "http_request_method" => *method, "http_route" => route.clone())
                .increment(1.0),
        }
        InFlight {
            kind: Some(kind),
            started: Instant::now(),
            head: None,
        }
    }

    /// Records the outcome: the gRPC code or HTTP status, and the route
    /// template a router below matched (when none had before).
    fn finish(&mut self, code: SharedString, template: Option<SharedString>) {
        let seconds = self.started.elapsed().as_secs_f64();
        match self.kind.take() {
            Some(Kind::Grpc { service, method }) => {
                gauge!("rpc_server_active_requests", "rpc_system" => "grpc", "rpc_service" => service.clone()).decrement(1.0);
                histogram!("rpc_server_duration_seconds", "rpc_system" => "grpc", "rpc_service" => service, "rpc_method" => method, "rpc_grpc_status_code" => code)
                    .record(seconds);
            }
            Some(Kind::Http { method, route }) => {
                gauge!("http_server_active_requests", "http_request_method" => method, "http_route" => route.clone())
                    .decrement(1.0);
                // A route matched below this layer names its template; the
                // in-flight gauge keeps the route it was counted under.
                let route = template.unwrap_or(route);
                histogram!("http_server_request_duration_seconds", "http_request_method" => method, "http_route" => route, "http_response_status_code" => code)
                    .record(seconds);
            }
            None => {}
        }
    }
}

/// Records the request when its response ends (see [`Classified`]).
impl Report for InFlight {
    fn report(mut self, end: Option<End>) {
        let grpc = matches!(self.kind, Some(Kind::Grpc { .. }));
        let Some(end) = end else {
            // Dropped before the end: the Drop below says cancelled.
            return;
        };
        let (status, template) = self
            .head
            .take()
            .unwrap_or((SharedString::const_str("200"), None));
        if grpc {
            let code = end.grpc_status.unwrap_or(Code::Unknown);
            self.finish(SharedString::const_str(protocol::code_label(code)), None);
        } else {
            self.finish(status, template);
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
        self.finish(SharedString::const_str(cancelled), None);
    }
}

impl<S, B, RB> Service<Request<B>> for Red<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: http_body::Body + Send + 'static,
{
    type Response = Response<Classified<RB, InFlight>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let template = req.extensions().get::<RouteTemplate>();
        let kind = if protocol::is_grpc(req.headers()) {
            // `/package.Service/Method`, known to the server; anything else
            // (a method it does not serve) is one label.
            match template.and_then(|t| t.0.strip_prefix('/')?.split_once('/')) {
                Some((service, method)) => Kind::Grpc {
                    service: SharedString::from(service.to_owned()),
                    method: SharedString::from(method.to_owned()),
                },
                None => Kind::Grpc {
                    service: SharedString::const_str(protocol::OTHER),
                    method: SharedString::const_str(protocol::OTHER),
                },
            }
        } else {
            let route = match template {
                Some(t) => SharedString::from(t.0.to_string()),
                None => req
                    .extensions()
                    .get::<MatchedPath>()
                    .map(|m| SharedString::from(m.as_str().to_owned()))
                    .unwrap_or(SharedString::const_str("unmatched")),
            };
            Kind::Http {
                method: protocol::method_label(req.method()),
                route,
            }
        };
        let mut in_flight = InFlight::start(kind);
        let fut = self.inner.call(req);
        Box::pin(async move {
            match fut.await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    // A route matched below this layer names itself on the response.
                    let template = parts
                        .extensions
                        .get::<RouteTemplate>()
                        .map(|t| SharedString::from(t.0.to_string()));
                    in_flight.head = Some((
                        SharedString::from(parts.status.as_u16().to_string()),
                        template,
                    ));
                    let body = Classified::new(parts.status, &parts.headers, body, in_flight);
                    Ok(Response::from_parts(parts, body))
                }
                Err(err) => {
                    let failed = match in_flight.kind {
                        Some(Kind::Grpc { .. }) => "2",
                        _ => "500",
                    };
                    in_flight.finish(SharedString::const_str(failed), None);
                    Err(err)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hundred requests dropped mid-flight (clients gone, or cut by a
    /// timeout outside): the in-flight gauges return to zero, and each is
    /// recorded once, as cancelled.
    /// Random methods, random paths, random gRPC methods: a bounded, small
    /// number of series.
    #[test]
    fn labels_stay_bounded_whatever_the_requests() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let ok = tower::service_fn(|_req: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(
                http_body_util::Empty::<bytes::Bytes>::new(),
            ))
        });
        let mut red = RedLayer::new().layer(ok);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        for i in 0..1000u32 {
            let method = http::Method::from_bytes(format!("M{i}").as_bytes()).unwrap();
            let mut req = Request::builder()
                .method(method)
                .uri(format!("/v1/users/{i}"))
                .body(())
                .unwrap();
            if i % 2 == 0 {
                // A REST route a router matched: its template, not the path.
                req.extensions_mut()
                    .insert(RouteTemplate("/v1/users/{id}".into()));
            }
            let mut fut = red.call(req);
            assert!(fut.as_mut().poll(&mut cx).is_ready());
            let grpc = Request::post(format!("/pkg.Svc{i}/Method{i}"))
                .header("content-type", "application/grpc")
                .body(())
                .unwrap();
            let mut fut = red.call(grpc);
            assert!(fut.as_mut().poll(&mut cx).is_ready());
        }
        let text = handle.render();
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .count();
        assert!(series < 60, "{series} series:\n{text}");
        assert!(!text.contains("M17") && !text.contains("/v1/users/17") && !text.contains("Svc17"));
        assert!(
            text.contains("http_request_method=\"_OTHER\",http_route=\"/v1/users/{id}\""),
            "{text}"
        );
        assert!(text.contains("rpc_service=\"_OTHER\""), "{text}");
    }

    /// The status a gRPC response ends with in its trailers is the one
    /// recorded, once the body has ended.
    #[tokio::test]
    async fn a_grpc_status_in_the_trailers_is_the_one_recorded() {
        use http_body_util::BodyExt;
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let stream = tower::service_fn(|_req: Request<()>| async {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("13"));
            let frames = vec![
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(
                    bytes::Bytes::from_static(b"\0\0\0\0\0"),
                )),
                Ok(http_body::Frame::trailers(trailers)),
            ];
            let mut response = Response::new(http_body_util::StreamBody::new(
                futures_util::stream::iter(frames),
            ));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            Ok::<_, std::convert::Infallible>(response)
        });
        let mut red = RedLayer::new().layer(stream);
        let mut req = Request::post("/pkg.Svc/Watch")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        req.extensions_mut()
            .insert(RouteTemplate("/pkg.Svc/Watch".into()));
        let response = red.call(req).await.unwrap();
        assert!(
            !handle
                .render()
                .contains("rpc_server_duration_seconds_count"),
            "nothing is recorded before the end"
        );
        let _ = response.into_body().collect().await;
        let text = handle.render();
        assert!(
            text.lines()
                .any(|l| l.starts_with("rpc_server_duration_seconds_count{")
                    && l.contains("rpc_method=\"Watch\"")
                    && l.contains("rpc_grpc_status_code=\"13\"")
                    && l.ends_with(" 1")),
            "{text}"
        );
    }

    #[test]
    fn cancelled_requests_leave_the_gauges_right_and_are_recorded() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let never = tower::service_fn(|_req: Request<()>| {
            std::future::pending::<
                Result<Response<http_body_util::Empty<bytes::Bytes>>, std::convert::Infallible>,
            >()
        });
        let mut red = RedLayer::new().layer(never);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut pending = Vec::new();
        for i in 0..100 {
            let req = if i % 2 == 0 {
                Request::get("/v1/users/7").body(()).unwrap()
            } else {
                let mut req = Request::post("/shop.user.v1.UserService/GetUser")
                    .header("content-type", "application/grpc")
                    .body(())
                    .unwrap();
                req.extensions_mut()
                    .insert(RouteTemplate("/shop.user.v1.UserService/GetUser".into()));
                req
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
