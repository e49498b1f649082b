//! The proxy: one request through the live table to an upstream and back,
//! bodies streamed both ways (never buffered), trailers kept (gRPC).
//!
//! On the way up: hop-by-hop headers go (RFC 9110 §7.6.1: `Connection` and
//! what it names, `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`,
//! `Upgrade`, `TE` except `trailers`), `X-Forwarded-For`/`-Proto`/`-Host`
//! are set, the route's prefix rules and header rules apply, `Host` becomes
//! the upstream's unless the route preserves it. On the way down: hop-by-hop
//! headers go and the route's response rules apply. Failures answer in the
//! error model — JSON for HTTP, a gRPC status for gRPC: no route 404, no
//! endpoint 503, a connection refused or broken 502, no response head
//! within the route's timeout 504.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body as _;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use tower::{BoxError, Service, ServiceExt};
use trellis_core::{Code, Error, RouteTemplate, protocol::is_grpc};

use trellis_resilience::rate_limit::Decision;

use crate::{
    Shared, State,
    grpc_web::{self, RequestBody},
};

/// The body of the gateway's responses: the upstream's, streamed, or an
/// error of its own.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

const X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: http::HeaderName = http::HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: http::HeaderName = http::HeaderName::from_static("x-forwarded-host");
const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
const KEEP_ALIVE: http::HeaderName = http::HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: http::HeaderName = http::HeaderName::from_static("proxy-connection");

/// The gateway as a tower service for one client connection.
#[derive(Clone)]
pub struct Proxy {
    pub(crate) shared: Arc<Shared>,
    /// The client's address as an `X-Forwarded-For` entry, made once per
    /// connection.
    pub(crate) peer: Option<HeaderValue>,
    /// The client's address, for address rules.
    pub(crate) peer_ip: Option<std::net::IpAddr>,
    /// `X-Forwarded-Proto`: how the client reached the gateway.
    pub(crate) proto: HeaderValue,
}

impl Proxy {
    pub(crate) fn new(shared: Arc<Shared>, peer: Option<SocketAddr>, tls: bool) -> Proxy {
        Proxy {
            shared,
            peer: peer.and_then(|p| HeaderValue::from_str(&p.ip().to_string()).ok()),
            peer_ip: peer.map(|p| p.ip()),
            proto: HeaderValue::from_static(if tls { "https" } else { "http" }),
        }
    }
}

impl Service<Request<Incoming>> for Proxy {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        // The table in force when the request arrived serves it to the end,
        // whatever reload happens meanwhile.
        let state = self.shared.state.load_full();
        let peer = self.peer.clone();
        let peer_ip = self.peer_ip;
        let proto = self.proto.clone();
        let random = crate::random_u32();
        Box::pin(async move {
            let grpc = is_grpc(req.headers());
            Ok(
                match forward(&state, peer, peer_ip, proto, random, req).await {
                    Ok(response) => response,
                    Err((error, route)) => {
                        let mut response = if grpc {
                            tonic::Status::from(error).into_http::<Body>()
                        } else {
                            error.to_http_response::<Bytes>().map(full)
                        };
                        if let Some(route) = route {
                            response.extensions_mut().insert(RouteTemplate(route));
                        }
                        response
                    }
                },
            )
        })
    }
}

type Failure = (Error, Option<Arc<str>>);

/// A mutating call's audit record, written with the upstream's status —
/// or, if the call ends without one (502, 504, the client gone), as
/// `failed` when this is dropped.
struct AuditedCall(
    Option<(
        Arc<trellis_auth::audit::Recorder>,
        trellis_auth::audit::Entry,
    )>,
);

impl Drop for AuditedCall {
    fn drop(&mut self) {
        if let Some((audit, mut entry)) = self.0.take() {
            entry.outcome = "failed".to_owned();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { audit.record(entry, false).await });
            }
        }
    }
}

/// One access log line, written when the response body ends (or is cut,
/// or dropped), under the request's trace.
struct AccessLine {
    cx: opentelemetry::Context,
    route: Arc<str>,
    upstream: Arc<str>,
    method: Method,
    status: u16,
    attempts: u32,
    started: std::time::Instant,
    head: std::time::Duration,
    bytes: u64,
}

impl AccessLine {
    fn write(self, end: &'static str) {
        let _trace = self.cx.attach();
        tracing::debug!(
            target: "trellis::gateway::access",
            route = &*self.route,
            upstream = &*self.upstream,
            method = self.method.as_str(),
            status = self.status,
            attempts = self.attempts,
            bytes = self.bytes,
            head_us = self.head.as_micros() as u64,
            total_us = self.started.elapsed().as_micros() as u64,
            end,
            "request served"
        );
    }
}

/// A response body that writes the access log line at its end.
struct Logged {
    body: Body,
    line: Option<AccessLine>,
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(line) = self.line.take() {
            // hyper does not poll a body that says it is over.
            line.write(if self.body.is_end_stream() {
                "complete"
            } else {
                "dropped"
            });
        }
    }
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(line), Some(data)) = (this.line.as_mut(), frame.data_ref()) {
                    line.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => {
                if let Some(line) = this.line.take() {
                    line.write("complete");
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(line) = this.line.take() {
                    line.write("cut");
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A response body cut at the route's `total_timeout`.
    struct Deadline<B> {
        #[pin]
        body: B,
        until: Pin<Box<tokio::time::Sleep>>,
        total: std::time::Duration,
    }
}

impl<B: http_body::Body<Data = Bytes, Error = BoxError>> http_body::Body for Deadline<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.body.poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if this.until.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(format!(
                "the exchange went over the route's total_timeout ({:?})",
                this.total
            )
            .into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

async fn forward(
    state: &State,
    peer: Option<HeaderValue>,
    peer_ip: Option<std::net::IpAddr>,
    proto: HeaderValue,
    random: u32,
    req: Request<Incoming>,
) -> Result<Response<Body>, Failure> {
    let (mut parts, body) = req.into_parts();
    let host = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    // A CORS preflight is matched as the request it announces.
    let origin = parts.headers.get(header::ORIGIN).cloned();
    let preflight = (parts.method == Method::OPTIONS && origin.is_some())
        .then(|| {
            parts
                .headers
                .get(header::ACCESS_CONTROL_REQUEST_METHOD)
                .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        })
        .flatten();
    let Some(matched) = state.table.find(
        host.as_deref(),
        preflight.as_ref().unwrap_or(&parts.method),
        parts.uri.path(),
        &parts.headers,
        parts.uri.query(),
    ) else {
        return Err((
            Error::not_found(
                "ROUTE_NOT_FOUND",
                format!(
                    "no route for {} {}",
                    parts.method,
                    trellis_core::excerpt(parts.uri.path())
                ),
            ),
            None,
        ));
    };
    let route = matched.route;
    let name = route.name.clone();
    // The access log (`trellis::gateway::access` at debug): only when
    // something logs at debug at all, so it costs nothing otherwise.
    let logging = tracing::level_enabled!(tracing::Level::DEBUG).then(|| parts.method.clone());
    let fail = |e: Error| (e, Some(name.clone()));
    // The client: the peer, or who a trusted proxy says it forwards.
    let client_ip = state.table.trusted.client(peer_ip, &parts.headers);
    let client_key = if client_ip == peer_ip {
        peer.clone()
    } else {
        client_ip.and_then(|ip| HeaderValue::from_str(&ip.to_string()).ok())
    };
    if !route.ips.permits(client_ip) {
        return Err(fail(
            Error::new(
                Code::PermissionDenied,
                "ADDRESS_REFUSED",
                format!("route {name} does not take requests from this address"),
            )
            .with_http_status(StatusCode::FORBIDDEN),
        ));
    }
    // CORS: a preflight is answered here; an allowed origin's answer gets
    // the Access-Control headers on the way back.
    let cors_origin = match (&route.cors, &origin) {
        (Some(cors), Some(origin)) if cors.allows(origin) => {
            if preflight.is_some() {
                let mut answer = Response::new(full(Bytes::new()));
                *answer.status_mut() = StatusCode::NO_CONTENT;
                cors.preflight(
                    origin,
                    parts.headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS),
                    answer.headers_mut(),
                );
                answer.extensions_mut().insert(RouteTemplate(name));
                return Ok(answer);
            }
            Some(origin.clone())
        }
        (Some(_), Some(_)) if preflight.is_some() => {
            return Err(fail(
                Error::new(
                    Code::PermissionDenied,
                    "CORS_ORIGIN_REFUSED",
                    format!("route {name} does not take calls from this origin"),
                )
                .with_http_status(StatusCode::FORBIDDEN),
            ));
        }
        _ => None,
    };
    let defaults = &state.table.defaults;
    if parts
        .uri
        .path_and_query()
        .is_some_and(|p| p.as_str().len() > defaults.max_uri_bytes)
    {
        return Err(fail(
            Error::new(
                Code::InvalidArgument,
                "URI_TOO_LONG",
                format!(
                    "the path and query are over {} bytes",
                    defaults.max_uri_bytes
                ),
            )
            .with_http_status(StatusCode::URI_TOO_LONG),
        ));
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > defaults.max_body_bytes) {
        return Err(fail(
            Error::new(
                Code::ResourceExhausted,
                "BODY_TOO_LARGE",
                format!("the body is over {} bytes", defaults.max_body_bytes),
            )
            .with_http_status(StatusCode::PAYLOAD_TOO_LARGE),
        ));
    }
    // Bearer tokens: 401/403 here, the claims' headers set for upstream.
    let claims = match (&route.jwt, &state.table.jwt) {
        (Some(access), Some(jwt)) => match jwt.check(access, &mut parts.headers).await {
            Ok(claims) => claims,
            Err(e) => {
                if let Some(audit) = &state.audit {
                    let forbidden = e.code() == Code::PermissionDenied;
                    let why = e
                        .metadata()
                        .get(if forbidden { "permission" } else { "why" })
                        .map_or("missing", String::as_str);
                    let entry = trellis_auth::audit::Entry {
                        client_ip: client_ip.map(|ip| ip.to_string()),
                        trace_id: trellis_auth::audit::current_trace_id(),
                        resource: Some(trellis_auth::audit::bounded(parts.uri.path())),
                        ..trellis_auth::audit::Entry::new(
                            if forbidden {
                                "forbidden"
                            } else {
                                "token_refused"
                            },
                            format!("{} {name}", parts.method),
                            format!("refused: {why}"),
                        )
                    };
                    audit.record(entry, true).await;
                }
                return Err(fail(e));
            }
        },
        _ => None,
    };
    if let Some(limit) = &route.rate_limit
        && let Decision::Deny { retry_after } = limit
            .check(
                &parts.headers,
                client_key.as_ref(),
                claims.as_ref().map(|c| c.sub.as_str()),
            )
            .await
    {
        return Err(fail(
            Error::new(
                Code::ResourceExhausted,
                "RATE_LIMITED",
                format!("route {name} is over its rate limit"),
            )
            .with_retry_after(retry_after)
            .with_http_status(StatusCode::TOO_MANY_REQUESTS),
        ));
    }
    for plugin in &route.plugins {
        plugin.on_request(&mut parts).map_err(&fail)?;
    }
    // A mutating call through a protected route that passed every check
    // here is audited with its outcome once the upstream has answered.
    let audited = match (&state.audit, &route.jwt) {
        (Some(audit), Some(_))
            if matches!(
                parts.method,
                Method::POST | Method::PUT | Method::PATCH | Method::DELETE
            ) =>
        {
            Some(AuditedCall(Some((
                audit.clone(),
                trellis_auth::audit::Entry {
                    subject: claims.as_ref().map(|c| c.sub.clone()),
                    tenant: claims.as_ref().and_then(|c| c.tenant.clone()),
                    client_ip: client_ip.map(|ip| ip.to_string()),
                    trace_id: trellis_auth::audit::current_trace_id(),
                    resource: Some(trellis_auth::audit::bounded(parts.uri.path())),
                    ..trellis_auth::audit::Entry::new(
                        "call",
                        format!("{} {name}", parts.method),
                        String::new(),
                    )
                },
            ))))
        }
        _ => None,
    };
    let request_id = if defaults.request_id {
        match parts.headers.get(X_REQUEST_ID) {
            Some(id) => Some(id.clone()),
            None => {
                // A version-4 UUID from the per-thread generator: no
                // syscall per request (ids need to be unique, not secret).
                let mut bytes = [0u8; 16];
                for chunk in bytes.chunks_mut(4) {
                    chunk.copy_from_slice(&crate::random_u32().to_le_bytes());
                }
                let uuid = uuid::Builder::from_random_bytes(bytes).into_uuid();
                let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
                let id =
                    HeaderValue::from_bytes(uuid.hyphenated().encode_lower(&mut text).as_bytes())
                        .ok();
                if let Some(id) = &id {
                    parts.headers.insert(X_REQUEST_ID, id.clone());
                }
                id
            }
        }
    } else {
        None
    };
    let upstream_name = route.targets.pick(random);
    let upstream = state.upstreams.get(upstream_name).ok_or_else(|| {
        fail(Error::unavailable(format!(
            "upstream {upstream_name} is not running"
        )))
    })?;

    // The path the upstream sees.
    let path = parts.uri.path();
    let mut new_path = match &route.strip_prefix {
        Some(prefix) if path == prefix || path.starts_with(&format!("{prefix}/")) => {
            let rest = &path[prefix.len()..];
            if rest.is_empty() {
                "/".to_owned()
            } else {
                rest.to_owned()
            }
        }
        _ => path.to_owned(),
    };
    if let Some(prefix) = &route.add_prefix {
        new_path = if new_path == "/" {
            prefix.clone()
        } else {
            format!("{prefix}{new_path}")
        };
    }
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    };
    parts.uri = path_and_query
        .parse::<http::Uri>()
        .map_err(|e| fail(Error::invalid_argument("path", e.to_string())))?;

    // Headers. A protocol switch (WebSocket) keeps its `Upgrade` and
    // `Connection: upgrade` for the upstream, and the client's side of the
    // switch is taken now, to be joined to the upstream's after its 101.
    let client_host = host.clone();
    let upgrade = (parts.version == http::Version::HTTP_11)
        .then(|| parts.headers.get(header::UPGRADE).cloned())
        .flatten();
    let client_upgrade = upgrade
        .as_ref()
        .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
    strip_hop_by_hop(&mut parts.headers, true);
    if let Some(protocol) = &upgrade {
        parts.headers.insert(header::UPGRADE, protocol.clone());
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if let Some(ip) = peer {
        let earlier = parts
            .headers
            .get(X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
            .map(|earlier| format!("{earlier}, {}", ip.to_str().unwrap_or("")));
        match earlier.and_then(|v| HeaderValue::from_str(&v).ok()) {
            Some(joined) => parts.headers.insert(X_FORWARDED_FOR, joined),
            None => parts.headers.insert(X_FORWARDED_FOR, ip),
        };
    }
    parts.headers.insert(X_FORWARDED_PROTO, proto);
    if let Some(h) = client_host
        .as_deref()
        .and_then(|h| HeaderValue::from_str(h).ok())
    {
        parts.headers.insert(X_FORWARDED_HOST, h.clone());
        if route.preserve_host {
            parts.headers.insert(header::HOST, h);
        } else {
            parts.headers.remove(header::HOST);
        }
    }
    if !route.request_headers.is_empty() {
        route.request_headers.apply(&mut parts.headers);
    }

    // REST on a transcoding route: the transcoder makes the gRPC call
    // through the same upstream pool and writes the JSON answer.
    if let Some(transcoder) = &route.transcoder
        && !is_grpc(&parts.headers)
    {
        // The trace goes on: this request's span is the upstream's parent.
        trellis_telemetry::propagation::inject_current(&mut parts.headers);
        let grpc = crate::upstream::GrpcCalls(upstream.pool.clone());
        let request = Request::from_parts(parts, body);
        let Ok(mut response) = transcoder.service(grpc).oneshot(request).await;
        if let Some((audit, mut entry)) = audited.and_then(|mut a| a.0.take()) {
            entry.outcome = response.status().as_u16().to_string();
            audit.record(entry, false).await;
        }
        if let (Some(cors), Some(origin)) = (&route.cors, &cors_origin) {
            cors.answer(origin, response.headers_mut());
        }
        response.extensions_mut().insert(RouteTemplate(name));
        return Ok(response);
    }
    // gRPC-Web becomes gRPC on the way up, and back on the way down.
    let web = grpc_web::Mode::of(&parts.headers);
    let body = match web {
        Some(mode) => {
            mode.request_headers(&mut parts.headers);
            match mode {
                grpc_web::Mode::Text => RequestBody::from_text(body),
                grpc_web::Mode::Binary => RequestBody::plain(body),
            }
        }
        None => RequestBody::plain(body),
    }
    .limited(defaults.max_body_bytes)
    .idle_timeout(defaults.body_timeout);
    // A request with no body and a method that may be repeated can be sent
    // again when the upstream could not take it (nginx's proxy_next_upstream
    // "error"), within the route's budget.
    let replay = (body.is_end_stream()
        && client_upgrade.is_none()
        && route.retry.attempts > 1
        && matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
        ))
    .then(|| {
        let mut copy = Request::new(());
        *copy.method_mut() = parts.method.clone();
        *copy.uri_mut() = parts.uri.clone();
        *copy.version_mut() = parts.version;
        *copy.headers_mut() = parts.headers.clone();
        copy
    });
    // An open breaker fails the call here, without touching the upstream.
    let permit = match &route.breaker {
        Some(b) => match trellis_resilience::BreakerPolicy::acquire(&*b.breaker) {
            Some(permit) => Some(permit),
            None => {
                return Err(fail(
                    Error::new(
                        Code::Unavailable,
                        "CIRCUIT_OPEN",
                        format!("route {name}: upstream {upstream_name} is failing; not called"),
                    )
                    .with_retry_after(b.open_duration)
                    .with_http_status(StatusCode::SERVICE_UNAVAILABLE),
                ));
            }
        },
        None => None,
    };
    let called = std::time::Instant::now();
    route.retry.budget.deposit();
    // Traced (an exporter may record this request): each attempt is a
    // client span of its own, whose context the upstream receives. Not
    // traced: no span to make; the request's context goes up as it is.
    let traced = trellis_telemetry::may_record_current();
    if !traced {
        trellis_telemetry::propagation::inject_current(&mut parts.headers);
    }
    let mut request = Some(Request::from_parts(parts, body));
    let mut attempt = 1;
    let response = loop {
        let Some(current) = request.take() else {
            return Err(fail(Error::internal("no request to send")));
        };
        let call = if traced {
            let traced_call = tower::Layer::layer(
                &trellis_telemetry::ClientTelemetryLayer::new(),
                upstream.pool.clone(),
            )
            .oneshot(current);
            futures_util::future::Either::Left(async move {
                traced_call
                    .await
                    .map(|r| r.map(|b| UnsyncBoxBody::new(b.map_err(BoxError::from))))
            })
        } else {
            let call = upstream.pool.clone().oneshot(current);
            futures_util::future::Either::Right(async move {
                call.await
                    .map(|r| r.map(|b| UnsyncBoxBody::new(b.map_err(BoxError::from))))
            })
        };
        let sent = std::time::Instant::now();
        // The head within the route's timeout, and within what is left of
        // the total.
        let head_within = match route.total_timeout {
            Some(total) => route.timeout.min(total.saturating_sub(called.elapsed())),
            None => route.timeout,
        };
        let outcome = tokio::time::timeout(head_within, call).await;
        upstream.red.record(
            match &outcome {
                Ok(Ok(response)) => Some(response.status()),
                _ => None,
            },
            sent.elapsed(),
        );
        let again = attempt < route.retry.attempts
            && match &outcome {
                Ok(Ok(response)) => route.retry.on_status.contains(&response.status().as_u16()),
                Ok(Err(_)) => true,
                Err(_) => false,
            };
        if again
            && let Some(copy) = &replay
            && route.retry.budget.withdraw()
        {
            attempt += 1;
            let mut next = Request::new(RequestBody::empty());
            *next.method_mut() = copy.method().clone();
            *next.uri_mut() = copy.uri().clone();
            *next.version_mut() = copy.version();
            *next.headers_mut() = copy.headers().clone();
            // Not back to the endpoint that just failed, while there is
            // another.
            if let Ok(Err(e)) = &outcome
                && let Some(failed) = trellis_balance::EndpointFailed::find(e.as_ref())
            {
                next.extensions_mut()
                    .insert(trellis_balance::AvoidEndpoint(failed.address.clone()));
            }
            request = Some(next);
            metrics::counter!("gateway_retries_total", "route" => name.to_string()).increment(1);
            continue;
        }
        let failed = match &outcome {
            Ok(Ok(response)) => response.status().is_server_error(),
            _ => true,
        };
        if let (Some(b), Some(permit)) = (&route.breaker, permit) {
            trellis_resilience::BreakerPolicy::record(
                &*b.breaker,
                permit,
                if failed {
                    trellis_resilience::Outcome::Failure
                } else {
                    trellis_resilience::Outcome::Success
                },
                called.elapsed(),
            );
        }
        match outcome {
            Ok(Ok(response)) => break response,
            Ok(Err(e)) => return Err(fail(upstream_error(upstream_name, e))),
            Err(_) => {
                return Err(fail(
                    Error::new(
                        Code::DeadlineExceeded,
                        "UPSTREAM_TIMEOUT",
                        format!(
                            "upstream {upstream_name} sent no response within {:?}",
                            route
                                .total_timeout
                                .map_or(route.timeout, |t| t.min(route.timeout))
                        ),
                    )
                    .with_http_status(StatusCode::GATEWAY_TIMEOUT),
                ));
            }
        }
    };
    let (mut parts, body) = response.into_parts();
    if let Some((audit, mut entry)) = audited.and_then(|mut a| a.0.take()) {
        entry.outcome = parts.status.as_u16().to_string();
        audit.record(entry, false).await;
    }
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        let (Some(client), Some(upstream)) = (
            client_upgrade,
            parts.extensions.remove::<hyper::upgrade::OnUpgrade>(),
        ) else {
            return Err(fail(
                Error::new(
                    Code::Unavailable,
                    "UPGRADE_FAILED",
                    format!("upstream {upstream_name} switched protocols unasked"),
                )
                .with_http_status(StatusCode::BAD_GATEWAY),
            ));
        };
        let protocol = parts.headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers, false);
        if let Some(protocol) = protocol {
            parts.headers.insert(header::UPGRADE, protocol);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        tokio::spawn(tunnel(client, upstream, route.idle_timeout));
        parts.extensions.insert(RouteTemplate(name));
        return Ok(Response::from_parts(parts, full(Bytes::new())));
    }
    strip_hop_by_hop(&mut parts.headers, false);
    if let Some(id) = request_id
        && !parts.headers.contains_key(X_REQUEST_ID)
    {
        parts.headers.insert(X_REQUEST_ID, id);
    }
    if let (Some(cors), Some(origin)) = (&route.cors, &cors_origin) {
        cors.answer(origin, &mut parts.headers);
    }
    if !route.response_headers.is_empty() {
        route.response_headers.apply(&mut parts.headers);
    }
    for plugin in &route.plugins {
        plugin.on_response(&mut parts);
    }
    let line = logging.map(|method| AccessLine {
        cx: opentelemetry::Context::current(),
        route: name.clone(),
        upstream: upstream_name.clone(),
        method,
        status: parts.status.as_u16(),
        attempts: attempt,
        started: called,
        head: called.elapsed(),
        bytes: 0,
    });
    parts.extensions.insert(RouteTemplate(name));
    let body: Body = match web {
        Some(mode) => {
            mode.response_headers(&mut parts.headers);
            UnsyncBoxBody::new(grpc_web::ResponseBody::new(body, mode))
        }
        None => body,
    };
    let body = match route.total_timeout {
        Some(total) => UnsyncBoxBody::new(Deadline {
            body,
            until: Box::pin(tokio::time::sleep_until(
                tokio::time::Instant::from_std(called) + total,
            )),
            total,
        }),
        None => body,
    };
    let body = match line {
        Some(line) => UnsyncBoxBody::new(Logged {
            body,
            line: Some(line),
        }),
        None => body,
    };
    Ok(Response::from_parts(parts, body))
}

/// Joins the client's and the upstream's upgraded connections (a
/// WebSocket, or any protocol switched to): bytes both ways until either
/// side closes, or nothing moves for `idle`.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    idle: std::time::Duration,
) {
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (Ok(client), Ok(upstream)) = (client.await, upstream.await) else {
        return;
    };
    let (mut client_read, mut client_write) = tokio::io::split(TokioIo::new(client));
    let (mut upstream_read, mut upstream_write) = tokio::io::split(TokioIo::new(upstream));
    // Each direction copies until its reader ends; the whole tunnel closes
    // when either direction has seen nothing for `idle`.
    async fn pump<R, W>(reader: &mut R, writer: &mut W, idle: std::time::Duration) -> bool
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match tokio::time::timeout(idle, reader.read(&mut buf)).await {
                Ok(Ok(0)) => {
                    let _ = writer.shutdown().await;
                    return true;
                }
                Ok(Ok(n)) => {
                    if writer.write_all(&buf[..n]).await.is_err() {
                        return false;
                    }
                }
                // Idle, or broken.
                Ok(Err(_)) | Err(_) => return false,
            }
        }
    }
    let up = pump(&mut client_read, &mut upstream_write, idle);
    let down = pump(&mut upstream_read, &mut client_write, idle);
    tokio::pin!(up, down);
    // A clean close on one side lets the other finish; anything else ends both.
    tokio::select! {
        clean = &mut up => if clean { let _ = down.await; },
        clean = &mut down => if clean { let _ = up.await; },
    }
}

/// A failed upstream call as the error model: no endpoint is 503, a
/// connection that failed is 502.
fn upstream_error(upstream: &str, error: BoxError) -> Error {
    // The client's streamed body went over the limit on the way up.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
    while let Some(e) = source {
        if let Some(slow) = e.downcast_ref::<grpc_web::BodyTimeout>() {
            return Error::new(Code::DeadlineExceeded, "BODY_TIMEOUT", slow.to_string())
                .with_http_status(StatusCode::REQUEST_TIMEOUT);
        }
        if let Some(too_large) = e.downcast_ref::<grpc_web::BodyTooLarge>() {
            return Error::new(
                Code::ResourceExhausted,
                "BODY_TOO_LARGE",
                too_large.to_string(),
            )
            .with_http_status(StatusCode::PAYLOAD_TOO_LARGE);
        }
        source = e.source();
    }
    // The balancer reports "no endpoints" as UNAVAILABLE.
    if let Some(status) = error.downcast_ref::<tonic::Status>()
        && status.message().starts_with("no endpoints")
    {
        return Error::unavailable(format!("upstream {upstream} has no endpoints"));
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
    let mut text = String::new();
    while let Some(e) = source {
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&e.to_string());
        source = e.source();
    }
    Error::new(
        Code::Unavailable,
        "UPSTREAM_FAILED",
        format!("upstream {upstream}: {}", trellis_core::excerpt(&text)),
    )
    .with_http_status(StatusCode::BAD_GATEWAY)
}

/// Whether `name` is a hop-by-hop header (or `TE`, kept only as `trailers`).
fn is_hop_by_hop(name: &http::HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || *name == header::PROXY_AUTHENTICATE
        || *name == header::TRAILER
        || *name == header::TE
        || *name == KEEP_ALIVE
        || *name == PROXY_CONNECTION
}

/// Takes out the headers that belong to one hop (RFC 9110 §7.6.1). A
/// request keeps `TE: trailers`, which gRPC needs end to end. One pass over
/// the names finds which are there (usually none, or `Connection`), and
/// only those are looked up and removed.
fn strip_hop_by_hop(headers: &mut HeaderMap, request: bool) {
    let present: Vec<http::HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    if present.is_empty() {
        return;
    }
    let mut trailers = false;
    let mut named: Vec<http::HeaderName> = Vec::new();
    for name in &present {
        if *name == header::CONNECTION {
            named.extend(
                headers
                    .get_all(header::CONNECTION)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .map(str::trim)
                    // Options, not header names.
                    .filter(|t| {
                        !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close")
                    })
                    .filter_map(|t| http::HeaderName::from_bytes(t.as_bytes()).ok()),
            );
        } else if request && *name == header::TE {
            trailers = headers.get_all(header::TE).iter().any(|v| {
                v.to_str().is_ok_and(|v| {
                    v.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
                })
            });
        }
    }
    for name in present.into_iter().chain(named) {
        headers.remove(name);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

fn full(bytes: Bytes) -> Body {
    UnsyncBoxBody::new(Full::new(bytes).map_err(|never| match never {}))
}
