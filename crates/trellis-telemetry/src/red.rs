//! RED metrics (rate, errors, duration) for every request through a server.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use axum::extract::MatchedPath;
use http::{Request, Response};
use metrics::{
    Gauge, Histogram, SharedString, Unit, describe_gauge, describe_histogram, gauge, histogram,
};
use tonic::Code;
use tower::{Layer, Service};
use trellis_core::{
    RouteTemplate,
    protocol::{self, Classified, End, Report},
    stripe::{Handle, Handles},
};

use crate::series::{SeriesCache, SeriesKey};

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
#[derive(Debug, Clone)]
pub struct RedLayer {
    series: Arc<Handles<RedSeries>>,
}

impl Default for RedLayer {
    fn default() -> Self {
        RedLayer::new()
    }
}

impl RedLayer {
    /// A layer recording into the global `metrics` recorder (the one in
    /// force where its first request is recorded: handles are kept).
    pub fn new() -> Self {
        RedLayer {
            series: Arc::new(Handles::new(Arc::new(RedSeries::default()))),
        }
    }
}

impl<S> Layer<S> for RedLayer {
    type Service = Red<S>;

    fn layer(&self, inner: S) -> Red<S> {
        Red {
            inner,
            series: self.series.clone(),
        }
    }
}

/// A service whose requests are measured.
#[derive(Debug, Clone)]
pub struct Red<S> {
    inner: S,
    series: Arc<Handles<RedSeries>>,
}

/// The handles of the series this layer has recorded into.
#[derive(Default)]
pub struct RedSeries {
    active: SeriesCache<Gauge>,
    duration: SeriesCache<Histogram>,
}

const GRPC: u8 = 0;
const HTTP: u8 = 1;

/// What a request is, for labels. Every label comes from a bounded set:
/// gRPC service and method from the route the server matched (a method it
/// does not serve is `_OTHER`), the HTTP method from the standard ones
/// (`_OTHER` for the rest), the HTTP route from the matched template, never
/// the raw path.
struct Kind {
    metric: u8,
    /// `/package.Service/Method` for gRPC (none: a method not served), the
    /// route template for HTTP (none: no route matched).
    route: Option<Route>,
    /// The HTTP method label; empty for gRPC.
    method: &'static str,
}

/// A route as the request carries it (no copy of the text).
enum Route {
    Template(Arc<str>),
    Matched(MatchedPath),
}

impl Kind {
    fn route(&self) -> &str {
        match &self.route {
            Some(Route::Template(t)) => t,
            Some(Route::Matched(m)) => m.as_str(),
            None => "",
        }
    }

    /// `(service, method)` of a gRPC route.
    fn grpc_names(&self) -> (SharedString, SharedString) {
        match self
            .route()
            .strip_prefix('/')
            .and_then(|t| t.split_once('/'))
        {
            Some((service, method)) => (
                SharedString::from(service.to_owned()),
                SharedString::from(method.to_owned()),
            ),
            None => (
                SharedString::const_str(protocol::OTHER),
                SharedString::const_str(protocol::OTHER),
            ),
        }
    }

    fn http_route(&self) -> SharedString {
        match &self.route {
            Some(_) => SharedString::from(self.route().to_owned()),
            None => SharedString::const_str("unmatched"),
        }
    }

    fn key(&self, code: u16) -> SeriesKey<'_> {
        SeriesKey {
            metric: self.metric,
            route: self.route(),
            method: self.method,
            code,
        }
    }

    /// Moves the in-flight gauge by `delta`.
    fn active(&self, series: &RedSeries, delta: f64) {
        series.active.with(
            self.key(0),
            || {
                if self.metric == GRPC {
                    let (service, _) = self.grpc_names();
                    gauge!("rpc_server_active_requests", "rpc_system" => "grpc", "rpc_service" => service)
                } else {
                    gauge!("http_server_active_requests", "http_request_method" => self.method, "http_route" => self.http_route())
                }
            },
            |g| g.increment(delta),
        );
    }

    /// Records a duration with a gRPC code or an HTTP status.
    fn duration(&self, series: &RedSeries, code: u16, seconds: f64) {
        series.duration.with(
            self.key(code),
            || {
                if self.metric == GRPC {
                    let (service, method) = self.grpc_names();
                    let code = SharedString::const_str(protocol::code_label(Code::from_i32(i32::from(code))));
                    histogram!("rpc_server_duration_seconds", "rpc_system" => "grpc", "rpc_service" => service, "rpc_method" => method, "rpc_grpc_status_code" => code)
                } else {
                    histogram!("http_server_request_duration_seconds", "http_request_method" => self.method, "http_route" => self.http_route(), "http_response_status_code" => code.to_string())
                }
            },
            |h| h.record(seconds),
        );
    }
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
    series: Handle<RedSeries>,
    started: Instant,
    /// The HTTP status and the route template a router below named, once
    /// the response head has come.
    head: Option<(u16, Option<Arc<str>>)>,
}

impl InFlight {
    fn start(kind: Kind, series: Handle<RedSeries>) -> InFlight {
        kind.active(&series, 1.0);
        InFlight {
            kind: Some(kind),
            series,
            started: Instant::now(),
            head: None,
        }
    }

    /// Records the outcome: the gRPC code or HTTP status, and the route
    /// template a router below matched (when none had before).
    fn finish(&mut self, code: u16, template: Option<Arc<str>>) {
        let seconds = self.started.elapsed().as_secs_f64();
        let Some(mut kind) = self.kind.take() else {
            return;
        };
        kind.active(&self.series, -1.0);
        // A route matched below this layer names its template; the
        // in-flight gauge kept the route it was counted under.
        if kind.metric == HTTP
            && let Some(template) = template
        {
            kind.route = Some(Route::Template(template));
        }
        kind.duration(&self.series, code, seconds);
    }
}

/// Records the request when its response ends (see [`Classified`]).
impl Report for InFlight {
    fn report(mut self, end: Option<End>) {
        let grpc = matches!(self.kind, Some(Kind { metric: GRPC, .. }));
        let Some(end) = end else {
            // Dropped before the end: the Drop below says cancelled.
            return;
        };
        let (status, template) = self.head.take().unwrap_or((200, None));
        if grpc {
            let code = end.grpc_status.unwrap_or(Code::Unknown);
            self.finish(code as u16, None);
        } else {
            self.finish(status, template);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let cancelled = match &self.kind {
            Some(Kind { metric: GRPC, .. }) => Code::Cancelled as u16,
            Some(_) => 499,
            None => return,
        };
        self.finish(cancelled, None);
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
    type Future = RedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let template = req.extensions().get::<RouteTemplate>().map(|t| t.0.clone());
        let kind = if protocol::is_grpc(req.headers()) {
            // `/package.Service/Method`, known to the server; anything else
            // (a method it does not serve) is one label.
            let served = template.filter(|t| t.strip_prefix('/').is_some_and(|r| r.contains('/')));
            Kind {
                metric: GRPC,
                route: served.map(Route::Template),
                method: "",
            }
        } else {
            let route = template.map(Route::Template).or_else(|| {
                req.extensions()
                    .get::<MatchedPath>()
                    .cloned()
                    .map(Route::Matched)
            });
            Kind {
                metric: HTTP,
                route,
                method: protocol::method_label(req.method()),
            }
        };
        let in_flight = InFlight::start(kind, self.series.local());
        RedFuture {
            fut: self.inner.call(req),
            in_flight: Some(in_flight),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`Red`]: the response, its body wrapped to
    /// record the request when it ends.
    pub struct RedFuture<F> {
        #[pin]
        fut: F,
        in_flight: Option<InFlight>,
    }
}

impl<F, RB, E> Future for RedFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    RB: http_body::Body,
{
    type Output = Result<Response<Classified<RB, InFlight>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // Polled again after it completed (a caller's mistake): fused, the
        // inner future is not polled again.
        if this.in_flight.is_none() {
            return Poll::Pending;
        }
        let result = std::task::ready!(this.fut.poll(cx));
        let Some(mut in_flight) = this.in_flight.take() else {
            return Poll::Pending;
        };
        Poll::Ready(match result {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                // A route matched below this layer names itself on the response.
                let template = parts.extensions.get::<RouteTemplate>().map(|t| t.0.clone());
                in_flight.head = Some((parts.status.as_u16(), template));
                let body = Classified::new(parts.status, &parts.headers, body, in_flight);
                Ok(Response::from_parts(parts, body))
            }
            Err(err) => {
                let failed = match in_flight.kind {
                    Some(Kind { metric: GRPC, .. }) => Code::Unknown as u16,
                    _ => 500,
                };
                in_flight.finish(failed, None);
                Err(err)
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
            let mut fut = Box::pin(red.call(req));
            assert!(fut.as_mut().poll(&mut cx).is_ready());
            let grpc = Request::post(format!("/pkg.Svc{i}/Method{i}"))
                .header("content-type", "application/grpc")
                .body(())
                .unwrap();
            let mut fut = Box::pin(red.call(grpc));
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
            let mut fut = Box::pin(red.call(req));
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
