//! Server spans: one per request, child of the caller's `traceparent`,
//! carrying the caller's baggage, named and attributed by the OpenTelemetry
//! semantic conventions.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::extract::MatchedPath;
use http::{Request, Response};
use opentelemetry::{
    Context as OtelContext,
    baggage::BaggageExt,
    trace::{FutureExt as _, WithContext},
};
use tower::{Layer, Service};
use tracing::{Instrument, Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use trellis_core::future::EitherFuture;

use crate::{
    pipeline::{self, SAMPLER},
    propagation,
};

/// The most baggage entries copied onto a span, and the longest value.
const MAX_BAGGAGE_ATTRIBUTES: usize = 16;
const MAX_BAGGAGE_VALUE: usize = 256;

/// Opens a server span for every request (see the crate docs).
#[derive(Debug, Clone, Default)]
pub struct ServerTraceLayer {
    service: Option<Arc<str>>,
}

impl ServerTraceLayer {
    /// A layer for a server whose service is the process's own.
    pub fn new() -> Self {
        ServerTraceLayer { service: None }
    }

    /// Names the service on every span (the `service` field, which JSON log
    /// lines inside the request show); for processes that run several.
    pub fn service(mut self, name: &str) -> Self {
        self.service = Some(name.into());
        self
    }
}

impl<S> Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;

    fn layer(&self, inner: S) -> ServerTrace<S> {
        // The context of a request without a caller's: built once.
        let base = match &self.service {
            Some(service) => OtelContext::new().with_value(ServiceName(service.clone())),
            None => OtelContext::new(),
        };
        ServerTrace {
            inner,
            service: self.service.clone(),
            base,
        }
    }
}

/// A service whose requests are traced.
#[derive(Debug, Clone)]
pub struct ServerTrace<S> {
    inner: S,
    service: Option<Arc<str>>,
    base: OtelContext,
}

/// `/package.Service/Method` → (`package.Service`, `Method`).
pub(crate) fn grpc_parts(path: &str) -> (&str, &str) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    (parts.next().unwrap_or(""), parts.next().unwrap_or(""))
}

pub(crate) fn is_grpc<B>(req: &Request<B>) -> bool {
    trellis_core::protocol::is_grpc(req.headers())
}

/// gRPC codes that mark a *server* span as failed (the semantic
/// conventions: the server's fault, not the caller's).
pub(crate) fn server_error_code(code: &str) -> bool {
    matches!(code, "2" | "4" | "12" | "13" | "14" | "15")
}

impl<S, B, RB> Service<Request<B>> for ServerTrace<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = EitherFuture<
        WithContext<AccessLogged<S::Future>>,
        Pin<Box<dyn Future<Output = Result<Response<RB>, S::Error>> + Send>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let grpc = is_grpc(&req);
        // For the access log. (Asking `tracing::enabled!` whether it is on
        // would be cheaper, but with per-layer filters the answer is left
        // behind and filters out the next span: the server span.)
        let started = Some(std::time::Instant::now());
        let parent = if propagation::carries_context(req.headers()) {
            let parent = propagation::extract(req.headers());
            match &self.service {
                Some(service) => parent.with_value(ServiceName(service.clone())),
                None => parent,
            }
        } else {
            self.base.clone()
        };

        // Not recorded (no exporter, an unsampled caller, sampling at 0):
        // no span at all, only the context, so logs and calls downstream
        // still carry the trace. This is the path that must cost nothing.
        if !SAMPLER.may_record(&parent) {
            let cx = pipeline::unrecorded(parent);
            let fut = {
                let _attached = cx.clone().attach();
                self.inner.call(req)
            };
            return EitherFuture::left(AccessLogged { fut, grpc, started }.with_context(cx));
        }

        let service = self.service.as_deref();
        let span = if grpc {
            let (rpc_service, method) = grpc_parts(req.uri().path());
            tracing::info_span!(
                target: "trellis::server",
                "grpc.server",
                otel.name = %format_args!("{rpc_service}/{method}"),
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = rpc_service,
                rpc.method = method,
                rpc.grpc.status_code = Empty,
                otel.status_code = Empty,
                otel.status_description = Empty,
                service,
            )
        } else {
            // The route a router matched before the layers (a REST
            // template), else axum's; never the raw path.
            let route = req
                .extensions()
                .get::<trellis_core::RouteTemplate>()
                .map(|t| &*t.0)
                .or_else(|| {
                    req.extensions()
                        .get::<MatchedPath>()
                        .map(MatchedPath::as_str)
                });
            let method = trellis_core::protocol::method_label(req.method());
            let name = match route {
                Some(route) => format!("{method} {route}"),
                None => method.to_owned(),
            };
            tracing::info_span!(
                target: "trellis::server",
                "http.server",
                otel.name = name,
                otel.kind = "server",
                http.request.method = method,
                http.route = route,
                url.path = req.uri().path(),
                http.response.status_code = Empty,
                otel.status_code = Empty,
                service,
            )
        };
        for (key, (value, _)) in parent.baggage().iter().take(MAX_BAGGAGE_ATTRIBUTES) {
            let value = value.as_str();
            let cut = value
                .char_indices()
                .nth(MAX_BAGGAGE_VALUE)
                .map_or(value.len(), |(i, _)| i);
            span.set_attribute(key.clone(), value[..cut].to_owned());
        }
        // Only fails when no OpenTelemetry layer is installed, which leaves
        // the span a plain tracing span: nothing to do.
        let _ = span.set_parent(parent);
        let http_method = req.method().clone();
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        EitherFuture::right(Box::pin(
            async move {
                let result = fut.await;
                record_outcome(&Span::current(), grpc, &http_method, &result);
                if let Some(started) = started {
                    access_log(grpc, &result, started);
                }
                result
            }
            .instrument(span),
        ))
    }
}

pin_project_lite::pin_project! {
    /// A response future that writes the access log line (when that log
    /// is on) as the response head is ready.
    pub struct AccessLogged<F> {
        #[pin]
        fut: F,
        grpc: bool,
        started: Option<std::time::Instant>,
    }
}

impl<F, RB, E> Future for AccessLogged<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let result = std::task::ready!(this.fut.poll(cx));
        if let Some(started) = this.started.take() {
            access_log(*this.grpc, &result, started);
        }
        Poll::Ready(result)
    }
}

/// The service a request belongs to, in its OpenTelemetry context; JSON log
/// lines show it as `service`, over the process-wide name.
#[derive(Debug, Clone)]
pub(crate) struct ServiceName(pub(crate) Arc<str>);

/// The gRPC code or HTTP status of an outcome.
fn status_of<RB, E>(grpc: bool, result: &Result<Response<RB>, E>) -> u16 {
    match (grpc, result) {
        (true, Ok(r)) => grpc_code(r).parse().unwrap_or(2),
        (true, Err(_)) => 2,
        (false, Ok(r)) => r.status().as_u16(),
        (false, Err(_)) => 500,
    }
}

/// The status a gRPC response head carries: errors from handlers travel
/// trailers-only (the status in the headers); a status in trailers after a
/// body is counted as the headers say, OK.
pub(crate) fn grpc_code<RB>(r: &Response<RB>) -> &str {
    r.headers()
        .get(trellis_core::protocol::GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("0")
}

/// The access log: off unless `trellis::access=debug` is in the filter.
fn access_log<RB, E>(grpc: bool, result: &Result<Response<RB>, E>, started: std::time::Instant) {
    tracing::debug!(
        target: "trellis::access",
        status = status_of(grpc, result),
        duration_us = started.elapsed().as_micros() as u64,
        "request finished"
    );
}

/// Records the outcome on the span.
fn record_outcome<RB, E>(
    span: &Span,
    grpc: bool,
    http_method: &http::Method,
    result: &Result<Response<RB>, E>,
) {
    if grpc {
        // Errors from handlers travel trailers-only (the status in the
        // headers); a status in trailers after a body is counted as OK.
        let (code, message) = match result {
            Ok(r) => (
                r.headers()
                    .get(trellis_core::protocol::GRPC_STATUS)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0"),
                r.headers()
                    .get("grpc-message")
                    .and_then(|v| v.to_str().ok()),
            ),
            Err(_) => ("2", None),
        };
        span.record("rpc.grpc.status_code", code.parse::<u16>().unwrap_or(2));
        if server_error_code(code) {
            span.record("otel.status_code", "ERROR");
            if let Some(message) = message {
                span.record("otel.status_description", message);
            }
        }
    } else {
        let status = match result {
            Ok(r) => r.status().as_u16(),
            Err(_) => 500,
        };
        // Transcoded REST routes are matched below axum; they name themselves.
        if let Ok(r) = result
            && let Some(template) = r.extensions().get::<trellis_core::RouteTemplate>()
        {
            span.record("http.route", &*template.0);
            span.record("otel.name", format!("{http_method} {}", template.0));
        }
        span.record("http.response.status_code", status);
        if status >= 500 {
            span.record("otel.status_code", "ERROR");
        }
    }
}
