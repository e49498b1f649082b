//! The client side: a span per outbound call, the W3C headers injected from
//! it, and the client duration histograms.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use http::{Request, Response};
use metrics::histogram;
use tower::{Layer, Service};
use tracing::{Instrument, Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{
    propagation,
    server::{grpc_parts, is_grpc},
};

/// Traces, propagates and measures outbound gRPC and HTTP calls:
///
/// - a client span (`otel.kind = client`), child of whatever span is
///   current — the server span of the request being handled, so a chain of
///   services forms one trace;
/// - `traceparent`, `tracestate` and `baggage` written from that span's
///   context, so the next hop continues the trace and sees the baggage;
/// - `rpc_client_duration_seconds{rpc_system, rpc_service, rpc_method,
///   rpc_grpc_status_code}` or `http_client_request_duration_seconds
///   {http_request_method, server_address, http_response_status_code}`.
///
/// Put it inside retries, so each attempt is a span of its own.
#[derive(Debug, Clone, Default)]
pub struct ClientTelemetryLayer;

impl ClientTelemetryLayer {
    /// The layer.
    pub fn new() -> Self {
        ClientTelemetryLayer
    }
}

impl<S> Layer<S> for ClientTelemetryLayer {
    type Service = ClientTelemetry<S>;

    fn layer(&self, inner: S) -> ClientTelemetry<S> {
        ClientTelemetry { inner }
    }
}

/// A client whose calls are traced and measured.
#[derive(Debug, Clone)]
pub struct ClientTelemetry<S> {
    inner: S,
}

impl<S> ClientTelemetry<S> {
    /// The wrapped client.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the client.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

enum Kind {
    Grpc { service: String, method: String },
    Http { method: String, address: String },
}

impl<S, B, RB> Service<Request<B>> for ClientTelemetry<S>
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

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let address = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let (span, kind) = if is_grpc(&req) {
            let (service, method) = grpc_parts(req.uri().path());
            let span = tracing::info_span!(
                target: "trellis::client",
                "grpc.client",
                otel.name = %format_args!("{service}/{method}"),
                otel.kind = "client",
                rpc.system = "grpc",
                rpc.service = service,
                rpc.method = method,
                server.address = address.as_str(),
                rpc.grpc.status_code = Empty,
                otel.status_code = Empty,
            );
            (
                span,
                Kind::Grpc {
                    service: service.to_owned(),
                    method: method.to_owned(),
                },
            )
        } else {
            let method = req.method().as_str().to_owned();
            let span = tracing::info_span!(
                target: "trellis::client",
                "http.client",
                otel.name = method.as_str(),
                otel.kind = "client",
                http.request.method = method.as_str(),
                server.address = address.as_str(),
                url.path = req.uri().path(),
                http.response.status_code = Empty,
                otel.status_code = Empty,
            );
            (span, Kind::Http { method, address })
        };
        // The span's context when it is traced; otherwise whatever context
        // is current (a caller using OpenTelemetry directly).
        let cx = span.context();
        if opentelemetry::trace::TraceContextExt::has_active_span(&cx) {
            propagation::inject(&cx, req.headers_mut());
        } else {
            propagation::inject(&opentelemetry::Context::current(), req.headers_mut());
        }
        let started = Instant::now();
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        Box::pin(
            async move {
                let result = fut.await;
                let seconds = started.elapsed().as_secs_f64();
                let span = Span::current();
                match kind {
                    Kind::Grpc { service, method } => {
                        let code = match &result {
                            Ok(r) => r.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("0").to_owned(),
                            // The transport failed: what tonic reports as UNAVAILABLE.
                            Err(_) => "14".to_owned(),
                        };
                        span.record("rpc.grpc.status_code", code.parse::<i64>().unwrap_or(2));
                        if code != "0" {
                            span.record("otel.status_code", "ERROR");
                        }
                        histogram!("rpc_client_duration_seconds", "rpc_system" => "grpc", "rpc_service" => service, "rpc_method" => method, "rpc_grpc_status_code" => code)
                            .record(seconds);
                    }
                    Kind::Http { method, address } => {
                        let status = match &result {
                            Ok(r) => r.status().as_u16(),
                            Err(_) => 0,
                        };
                        if status == 0 {
                            span.record("otel.status_code", "ERROR");
                        } else {
                            span.record("http.response.status_code", status);
                            if status >= 400 {
                                span.record("otel.status_code", "ERROR");
                            }
                        }
                        let status = if status == 0 { "error".to_owned() } else { status.to_string() };
                        histogram!("http_client_request_duration_seconds", "http_request_method" => method, "server_address" => address, "http_response_status_code" => status)
                            .record(seconds);
                    }
                }
                result
            }
            .instrument(span),
        )
    }
}
