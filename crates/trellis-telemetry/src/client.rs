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
use trellis_core::protocol::{Classified, End, Report};

use crate::{
    pipeline::{self, SAMPLER},
    propagation,
    server::{grpc_parts, is_grpc},
};

/// Whether a span made now, under the current context, could be recorded
/// (an exporter is on and the sampler may keep it). `false` is final: a
/// caller that would only make a span for the exporter can skip the work.
pub fn may_record_current() -> bool {
    SAMPLER.may_record(&OtelContext::current())
}

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
    RB: http_body::Body + Send + 'static,
{
    type Response = Response<Classified<RB, Call>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

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
            propagation::inject_fast(&pipeline::unrecorded(current), req.headers_mut());
            let fut = self.inner.call(req);
            let call = Call {
                kind: Some(kind),
                started,
                span: None,
                http_status: None,
            };
            return Box::pin(call.follow(fut));
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
        let call = Call {
            kind: Some(kind),
            started,
            span: Some(span.clone()),
            http_status: None,
        };
        Box::pin(call.follow(fut).instrument(span))
    }
}

/// One call, measured (and its span closed) when its response ends — the
/// gRPC status read from the trailers when it comes there — or when it
/// fails; a call dropped first is recorded as CANCELLED.
pub struct Call {
    kind: Option<Kind>,
    started: Instant,
    span: Option<Span>,
    http_status: Option<u16>,
}

impl Call {
    async fn follow<F, RB, E>(mut self, fut: F) -> Result<Response<Classified<RB, Call>>, E>
    where
        F: Future<Output = Result<Response<RB>, E>>,
        RB: http_body::Body,
    {
        match fut.await {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                self.http_status = Some(parts.status.as_u16());
                let body = Classified::new(parts.status, &parts.headers, body, self);
                Ok(Response::from_parts(parts, body))
            }
            Err(err) => {
                // The transport failed: what tonic reports as UNAVAILABLE.
                self.measure(Some(tonic::Code::Unavailable), None);
                Err(err)
            }
        }
    }

    fn measure(&mut self, grpc: Option<tonic::Code>, http: Option<u16>) {
        let Some(kind) = self.kind.take() else {
            return;
        };
        let seconds = self.started.elapsed().as_secs_f64();
        let span = self.span.take();
        match kind {
            Kind::Grpc { service, method } => {
                let code = grpc.unwrap_or(tonic::Code::Unknown);
                if let Some(span) = &span {
                    span.record("rpc.grpc.status_code", code as i64);
                    if code != tonic::Code::Ok {
                        span.record("otel.status_code", "ERROR");
                    }
                }
                let code = trellis_core::protocol::code_label(code);
                histogram!("rpc_client_duration_seconds", "rpc_system" => "grpc", "rpc_service" => service, "rpc_method" => method, "rpc_grpc_status_code" => code)
                    .record(seconds);
            }
            Kind::Http { method, address } => {
                if let Some(span) = &span {
                    match http {
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
                let status = http.map_or_else(|| "error".to_owned(), |s| s.to_string());
                histogram!("http_client_request_duration_seconds", "http_request_method" => method, "server_address" => address, "http_response_status_code" => status)
                    .record(seconds);
            }
        }
    }
}

impl Report for Call {
    fn report(mut self, end: Option<End>) {
        let http = self.http_status;
        match end {
            Some(end) => self.measure(end.grpc_status, http),
            // The caller stopped reading: a cancelled call.
            None => self.measure(Some(tonic::Code::Cancelled), http),
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let http = self.http_status;
        self.measure(Some(tonic::Code::Cancelled), http);
    }
}
