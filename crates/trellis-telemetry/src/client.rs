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
use opentelemetry::Context as OtelContext;
use tower::{Layer, Service};
use tracing::{Instrument, Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{
    pipeline::{self, SAMPLER},
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
        let kind = if is_grpc(&req) {
            let (service, method) = grpc_parts(req.uri().path());
            Kind::Grpc {
                service: service.to_owned(),
                method: method.to_owned(),
            }
        } else {
            Kind::Http {
                method: trellis_core::protocol::method_label(req.method()).to_owned(),
                address,
            }
        };
        let started = Instant::now();
        let current = OtelContext::current();

        // Not recorded: no span, the context passed on as it is.
        if !SAMPLER.may_record(&current) {
            propagation::inject(&pipeline::unrecorded(current), req.headers_mut());
            let fut = self.inner.call(req);
            return Box::pin(async move {
                let result = fut.await;
                kind.measure(&result, started, None);
                result
            });
        }

        let span = match &kind {
            Kind::Grpc { service, method } => tracing::info_span!(
                target: "trellis::client",
                "grpc.client",
                otel.name = %format_args!("{service}/{method}"),
                otel.kind = "client",
                rpc.system = "grpc",
                rpc.service = service.as_str(),
                rpc.method = method.as_str(),
                server.address = req.uri().authority().map(|a| a.as_str()),
                rpc.grpc.status_code = Empty,
                otel.status_code = Empty,
            ),
            Kind::Http { method, address } => tracing::info_span!(
                target: "trellis::client",
                "http.client",
                otel.name = method.as_str(),
                otel.kind = "client",
                http.request.method = method.as_str(),
                server.address = address.as_str(),
                url.path = req.uri().path(),
                http.response.status_code = Empty,
                otel.status_code = Empty,
            ),
        };
        propagation::inject(&span.context(), req.headers_mut());
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        Box::pin(
            async move {
                let result = fut.await;
                kind.measure(&result, started, Some(&Span::current()));
                result
            }
            .instrument(span),
        )
    }
}

impl Kind {
    /// Records the call's duration and, when traced, its outcome on `span`.
    fn measure<RB, E>(
        self,
        result: &Result<Response<RB>, E>,
        started: Instant,
        span: Option<&Span>,
    ) {
        let seconds = started.elapsed().as_secs_f64();
        match self {
            Kind::Grpc { service, method } => {
                let code = match result {
                    Ok(r) => trellis_core::protocol::code_label(
                        trellis_core::protocol::grpc_status(r.headers()).unwrap_or(tonic::Code::Ok),
                    ),
                    // The transport failed: what tonic reports as UNAVAILABLE.
                    Err(_) => "14",
                };
                if let Some(span) = span {
                    span.record("rpc.grpc.status_code", code.parse::<i64>().unwrap_or(2));
                    if code != "0" {
                        span.record("otel.status_code", "ERROR");
                    }
                }
                histogram!("rpc_client_duration_seconds", "rpc_system" => "grpc", "rpc_service" => service, "rpc_method" => method, "rpc_grpc_status_code" => code)
                    .record(seconds);
            }
            Kind::Http { method, address } => {
                let status = match result {
                    Ok(r) => Some(r.status().as_u16()),
                    Err(_) => None,
                };
                if let Some(span) = span {
                    match status {
                        Some(status) => {
                            span.record("http.response.status_code", status);
                            if status >= 400 {
                                span.record("otel.status_code", "ERROR");
                            }
                        }
                        None => {
                            span.record("otel.status_code", "ERROR");
                        }
                    }
                }
                // No response at all is `error`, as the conventions' `error.type` would say.
                let status = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
                histogram!("http_client_request_duration_seconds", "http_request_method" => method, "server_address" => address, "http_response_status_code" => status)
                    .record(seconds);
            }
        }
    }
}
