//! The transcoder: REST routes built once from the descriptors, and the
//! tower service that answers REST requests by calling a gRPC service.
//!
//! A request goes through three stages: the route ([`RouteMatchLayer`]
//! matches it first and leaves a [`MatchedRoute`] in the request, so layers
//! in between see it; [`TranscodeService`] matches itself when nothing did),
//! the request ([`crate::request`]: body, query and path into the message,
//! then validation), and the response ([`crate::response`] for unary calls,
//! [`crate::stream`] for server streams).

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MethodDescriptor};
use tower::{BoxError, Layer, Service, ServiceExt};
use trellis_core::{Code, Error, RouteTemplate, excerpt};

use crate::{
    Body, UpstreamBody, annotations, framing, full, json,
    request::{self, field_path, is_scalar_wkt},
    response,
    routes::{Lookup, RouteTable},
    stream::{self, StreamFormat},
    template::{PathTemplate, PathVars},
    validate::Validator,
};

/// Why a transcoder could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    /// A descriptor set did not decode.
    #[error("file descriptor set: {0}")]
    Descriptors(String),
    /// A named service is not in the descriptor sets.
    #[error("service {0} is not in the descriptor sets")]
    UnknownService(String),
    /// An annotation is malformed, or two RPCs claim one route; the message
    /// names the method.
    #[error("{method}: {message}")]
    Rule {
        /// `package.Service.Method`.
        method: String,
        /// What is wrong.
        message: String,
    },
}

/// How requests are read and answers written.
#[derive(Debug, Clone)]
pub struct TranscodeOptions {
    /// Accept JSON fields and query parameters the message does not have
    /// (ignored). Default: false — they are a 400 naming the field.
    pub allow_unknown_fields: bool,
    /// Write fields that hold their default value (`0`, `""`, `[]`) too, so
    /// every response has the same shape. Default: true.
    pub emit_defaults: bool,
    /// The largest request body read (bytes); larger is 413 naming the
    /// limit, refused from `Content-Length` before anything is read.
    /// Default: 4 MiB (a server sets it from its `max_body_bytes`).
    pub max_body_bytes: usize,
    /// Check requests against `field_behavior = REQUIRED` and the
    /// `buf.validate` rules in the descriptors (see [`crate::validate`]).
    /// Default: true.
    pub validate: bool,
}

impl Default for TranscodeOptions {
    fn default() -> Self {
        TranscodeOptions {
            allow_unknown_fields: false,
            emit_defaults: true,
            max_body_bytes: 4 << 20,
            validate: true,
        }
    }
}

/// Where the request body goes.
#[derive(Debug, Clone)]
pub(crate) enum BodyRule {
    /// No body (GET, DELETE): every unbound field may come from the query.
    None,
    /// `body: "*"`: the whole message, minus path variables.
    Whole,
    /// `body: "field"`: one top-level field; the rest from the query.
    Field(FieldDescriptor),
}

/// One REST route for one RPC.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) method: Method,
    pub(crate) template: PathTemplate,
    pub(crate) body: BodyRule,
    pub(crate) response_body: Option<FieldDescriptor>,
    pub(crate) rpc: MethodDescriptor,
    /// `/package.Service/Method`, the gRPC request path.
    pub(crate) grpc_path: http::uri::PathAndQuery,
    /// The response type's plan in [`json::Plans`].
    pub(crate) output_plan: usize,
    /// How a request with no body and no query is written straight to the
    /// wire, when the route allows it.
    pub(crate) direct: Option<DirectRequest>,
}

/// A request message written straight on the wire, for routes whose path
/// variables are all top-level string fields (`GET /v1/users/{id}`) and
/// whose message has no rule but `REQUIRED`: with no body and no query the
/// message is those strings, and building a `DynamicMessage` to encode
/// them (and to check them) is most of the request's cost.
#[derive(Debug, Clone)]
pub(crate) struct DirectRequest {
    /// (index among the path variables, field number), by field number.
    fields: Vec<(usize, u32)>,
    /// The `REQUIRED` fields' numbers: all must be bound and non-empty.
    required: Vec<u32>,
}

impl DirectRequest {
    fn new(
        template: &PathTemplate,
        input: &prost_reflect::MessageDescriptor,
        validator: Option<&Validator>,
    ) -> Option<DirectRequest> {
        let mut fields = Vec::new();
        for (i, path) in template.fields().enumerate() {
            let field = input.get_field_by_name(path)?;
            if path.contains('.')
                || field.is_list()
                || field.is_map()
                || field.kind() != Kind::String
            {
                return None;
            }
            fields.push((i, field.number()));
        }
        fields.sort_by_key(|(_, number)| *number);
        let required = match validator {
            Some(v) if v.applies_to(input) => v
                .presence_only(input)?
                .into_iter()
                .map(|(number, _, _)| number)
                .collect(),
            _ => Vec::new(),
        };
        Some(DirectRequest { fields, required })
    }

    /// The framed request, or `None` when a required field is missing (the
    /// general path then reports it).
    fn encode(&self, vars: &PathVars) -> Option<Bytes> {
        use prost::encoding::{encode_varint, encoded_len_varint};
        let value = |i: usize| vars.get(i).map(|(_, v)| v.as_str()).unwrap_or("");
        for number in &self.required {
            let bound = self
                .fields
                .iter()
                .any(|(i, n)| n == number && !value(*i).is_empty());
            if !bound {
                return None;
            }
        }
        // An empty string is the default, which proto3 does not encode.
        let key = |number: u32| u64::from(number << 3 | 2);
        let len: usize = self
            .fields
            .iter()
            .map(|(i, n)| (value(*i), *n))
            .filter(|(v, _)| !v.is_empty())
            .map(|(v, n)| encoded_len_varint(key(n)) + encoded_len_varint(v.len() as u64) + v.len())
            .sum();
        let mut out = bytes::BytesMut::with_capacity(framing::HEADER_LEN + len);
        out.extend_from_slice(&[0]);
        out.extend_from_slice(&u32::try_from(len).ok()?.to_be_bytes());
        for (i, n) in &self.fields {
            let v = value(*i);
            if v.is_empty() {
                continue;
            }
            encode_varint(key(*n), &mut out);
            encode_varint(v.len() as u64, &mut out);
            out.extend_from_slice(v.as_bytes());
        }
        Some(out.freeze())
    }
}

/// A route, as [`Transcoder::bindings`] lists it.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The HTTP method.
    pub method: Method,
    /// The path template as annotated, e.g. `/v1/users/{id}`.
    pub template: String,
    /// The variables in the template, as field paths.
    pub path_fields: Vec<String>,
    /// The body field (`*` for the whole message), if any.
    pub body: Option<String>,
    /// The response field sent as the body, if not the whole response.
    pub response_body: Option<String>,
    /// The RPC.
    pub rpc: MethodDescriptor,
}

/// REST routes for gRPC methods, built once from descriptors. Cheap to clone.
#[derive(Clone)]
pub struct Transcoder {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// Every annotated route, and every method as `POST /package.Service/Method`.
    table: RouteTable<Arc<Route>>,
    /// The annotated routes alone, most specific first (for listings).
    annotated: Vec<Arc<Route>>,
    pool: DescriptorPool,
    options: TranscodeOptions,
    validator: Option<Validator>,
    /// The response types, compiled for writing JSON from the wire.
    json: Arc<json::Plans>,
}

impl std::fmt::Debug for Transcoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transcoder")
            .field("routes", &self.inner.table.len())
            .finish_non_exhaustive()
    }
}

impl Transcoder {
    /// Routes for every method of `services` (full names), from their
    /// `google.api.http` annotations, with the default options.
    pub fn new(descriptor_sets: &[&[u8]], services: &[&str]) -> Result<Transcoder, TranscodeError> {
        Self::with_options(descriptor_sets, services, TranscodeOptions::default())
    }

    /// [`new`](Self::new) with options.
    pub fn with_options(
        descriptor_sets: &[&[u8]],
        services: &[&str],
        options: TranscodeOptions,
    ) -> Result<Transcoder, TranscodeError> {
        let mut pool = DescriptorPool::new();
        for set in descriptor_sets {
            pool.decode_file_descriptor_set(*set)
                .map_err(|e| TranscodeError::Descriptors(e.to_string()))?;
        }
        let validator = if options.validate {
            Some(Validator::new(&pool).map_err(|e| TranscodeError::Rule {
                method: e.field,
                message: e.message,
            })?)
        } else {
            None
        };
        let mut table = RouteTable::new();
        let mut annotated = Vec::new();
        let mut plans = json::Plans::default();
        for name in services {
            let service = pool
                .get_service_by_name(name)
                .ok_or_else(|| TranscodeError::UnknownService((*name).to_owned()))?;
            for rpc in service.methods() {
                let rule_error = |message: String| TranscodeError::Rule {
                    method: rpc.full_name().to_owned(),
                    message,
                };
                let by_name = format!("/{}/{}", service.full_name(), rpc.name());
                let grpc_path: http::uri::PathAndQuery = by_name
                    .parse()
                    .map_err(|e: http::uri::InvalidUri| rule_error(e.to_string()))?;
                let template =
                    PathTemplate::parse(&by_name).map_err(|e| rule_error(e.to_string()))?;
                let output_plan = plans.add(&rpc.output());
                let fallback = Route {
                    direct: DirectRequest::new(&template, &rpc.input(), validator.as_ref()),
                    method: Method::POST,
                    template: template.clone(),
                    body: BodyRule::Whole,
                    response_body: None,
                    rpc: rpc.clone(),
                    grpc_path: grpc_path.clone(),
                    output_plan,
                };
                table
                    .insert(Method::POST, template, Arc::new(fallback))
                    .map_err(|e| rule_error(e.to_string()))?;
                for binding in annotations::http_bindings(&rpc).map_err(rule_error)? {
                    let route = Arc::new(route(
                        &rpc,
                        binding,
                        grpc_path.clone(),
                        output_plan,
                        validator.as_ref(),
                    )?);
                    table
                        .insert(route.method.clone(), route.template.clone(), route.clone())
                        .map_err(|e| rule_error(e.to_string()))?;
                    annotated.push(route);
                }
            }
        }
        annotated.sort_by_key(|r| std::cmp::Reverse(r.template.specificity()));
        Ok(Transcoder {
            inner: Arc::new(Inner {
                table,
                annotated,
                pool,
                options,
                validator,
                json: Arc::new(plans),
            }),
        })
    }

    /// Every annotated route, most specific first.
    pub fn bindings(&self) -> Vec<Binding> {
        self.inner
            .annotated
            .iter()
            .map(|r| Binding {
                method: r.method.clone(),
                template: r.template.source().to_owned(),
                path_fields: r.template.fields().map(str::to_owned).collect(),
                body: match &r.body {
                    BodyRule::None => None,
                    BodyRule::Whole => Some("*".to_owned()),
                    BodyRule::Field(f) => Some(f.name().to_owned()),
                },
                response_body: r.response_body.as_ref().map(|f| f.name().to_owned()),
                rpc: r.rpc.clone(),
            })
            .collect()
    }

    /// The request rules, when validation is on.
    pub fn validator(&self) -> Option<&Validator> {
        self.inner.validator.as_ref()
    }

    /// The descriptors the routes were built from.
    pub fn pool(&self) -> &DescriptorPool {
        &self.inner.pool
    }

    /// The options the transcoder reads requests with.
    pub fn options(&self) -> &TranscodeOptions {
        &self.inner.options
    }

    /// Matches a REST request to its route.
    pub fn match_route(&self, method: &Method, path: &str) -> Result<MatchedRoute, RouteMiss> {
        match self.inner.table.lookup(method, path) {
            Lookup::Found(found) => Ok(MatchedRoute {
                route: found.value.clone(),
                template: found.template.clone(),
                vars: found.vars,
            }),
            Lookup::MethodNotAllowed(allowed) => Err(RouteMiss::MethodNotAllowed(allowed)),
            Lookup::NotFound => Err(RouteMiss::NotFound),
            Lookup::BadPath(why) => Err(RouteMiss::BadPath(why)),
        }
    }

    /// A REST service over `grpc`, which gets real gRPC requests
    /// (`application/grpc`, one framed protobuf message) and must answer
    /// them: the server's own routes in process, a tonic channel, a
    /// balanced channel — adapt a client that takes another body type with
    /// `ServiceExt::map_request`.
    pub fn service<S>(&self, grpc: S) -> TranscodeService<S> {
        TranscodeService {
            inner: self.inner.clone(),
            grpc,
        }
    }

    /// A layer that matches REST requests to their routes before anything
    /// else sees them (see [`RouteMatchLayer`]).
    pub fn route_layer(&self) -> RouteMatchLayer {
        RouteMatchLayer {
            transcoder: self.clone(),
        }
    }
}

fn route(
    rpc: &MethodDescriptor,
    binding: annotations::HttpBinding,
    grpc_path: http::uri::PathAndQuery,
    output_plan: usize,
    validator: Option<&Validator>,
) -> Result<Route, TranscodeError> {
    let err = |message: String| TranscodeError::Rule {
        method: rpc.full_name().to_owned(),
        message,
    };
    let template = PathTemplate::parse(&binding.path).map_err(|e| err(e.to_string()))?;
    let input = rpc.input();
    for field in template.fields() {
        let resolved =
            field_path(&input, field).map_err(|e| err(format!("path variable {field}: {e}")))?;
        if resolved.is_list()
            || resolved.is_map()
            || matches!(resolved.kind(), Kind::Message(_)) && !is_scalar_wkt(&resolved)
        {
            return Err(err(format!(
                "path variable {field} must be a singular scalar field"
            )));
        }
    }
    let body =
        match binding.body.as_str() {
            "" => BodyRule::None,
            "*" => BodyRule::Whole,
            name => BodyRule::Field(input.get_field_by_name(name).ok_or_else(|| {
                err(format!("body field {name} is not in {}", input.full_name()))
            })?),
        };
    let response_body = match binding.response_body.as_str() {
        "" => None,
        name => Some(rpc.output().get_field_by_name(name).ok_or_else(|| {
            err(format!(
                "response_body field {name} is not in {}",
                rpc.output().full_name()
            ))
        })?),
    };
    let direct = DirectRequest::new(&template, &input, validator);
    Ok(Route {
        method: binding.method,
        template,
        body,
        response_body,
        direct,
        rpc: rpc.clone(),
        grpc_path,
        output_plan,
    })
}

/// The route a REST request matched, in the request's extensions once
/// [`RouteMatchLayer`] has seen it: its template (a bounded label), its RPC
/// and the path variables.
#[derive(Debug, Clone)]
pub struct MatchedRoute {
    route: Arc<Route>,
    template: Arc<str>,
    vars: PathVars,
}

impl MatchedRoute {
    /// The path template as written, e.g. `/v1/users/{id}`.
    pub fn template(&self) -> &Arc<str> {
        &self.template
    }

    /// The RPC the route calls.
    pub fn rpc(&self) -> &MethodDescriptor {
        &self.route.rpc
    }

    /// The HTTP method of the route.
    pub fn method(&self) -> &Method {
        &self.route.method
    }

    /// The variables the path bound: (field path, decoded value).
    pub fn vars(&self) -> &[(Arc<str>, String)] {
        &self.vars
    }
}

/// Why no REST route matched, in the request's extensions when
/// [`RouteMatchLayer`] found none (the request may still be for a route of
/// another router).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteMiss {
    /// No template matches the path.
    NotFound,
    /// The path has routes, under these methods only.
    MethodNotAllowed(Vec<Method>),
    /// A bound path segment does not decode; the text names it.
    BadPath(String),
}

impl RouteMiss {
    /// The answer: 404, 405 with `Allow`, or 400.
    pub fn error(&self, method: &Method, path: &str) -> Error {
        match self {
            RouteMiss::NotFound => Error::not_found(
                "ROUTE_NOT_FOUND",
                format!("no route for {method} {}", excerpt(path)),
            ),
            RouteMiss::MethodNotAllowed(_) => Error::new(
                Code::Unimplemented,
                "METHOD_NOT_ALLOWED",
                format!("{method} is not allowed on {}", excerpt(path)),
            )
            .with_http_status(StatusCode::METHOD_NOT_ALLOWED),
            RouteMiss::BadPath(why) => Error::new(Code::InvalidArgument, "BAD_PATH", why.clone()),
        }
    }

    fn response(&self, method: &Method, path: &str) -> Response<Body> {
        let mut response = self
            .error(method, path)
            .to_http_response::<Bytes>()
            .map(full);
        if let RouteMiss::MethodNotAllowed(allowed) = self {
            let allow: Vec<&str> = allowed.iter().map(Method::as_str).collect();
            if let Ok(allow) = HeaderValue::from_str(&allow.join(", ")) {
                response.headers_mut().insert(header::ALLOW, allow);
            }
        }
        response
    }
}

/// Matches REST requests to their routes before the layers below see them,
/// leaving a [`MatchedRoute`] and a [`RouteTemplate`] (or a [`RouteMiss`]) in
/// the request's extensions: auth, rate limits and metrics by route read
/// them; [`TranscodeService`] then does not match again. gRPC requests pass
/// untouched.
#[derive(Debug, Clone)]
pub struct RouteMatchLayer {
    transcoder: Transcoder,
}

impl<S> Layer<S> for RouteMatchLayer {
    type Service = RouteMatch<S>;

    fn layer(&self, inner: S) -> RouteMatch<S> {
        RouteMatch {
            inner,
            transcoder: self.transcoder.clone(),
        }
    }
}

/// A service whose REST requests carry their matched route (see [`RouteMatchLayer`]).
#[derive(Debug, Clone)]
pub struct RouteMatch<S> {
    inner: S,
    transcoder: Transcoder,
}

impl<S, B> Service<Request<B>> for RouteMatch<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if !trellis_core::protocol::is_grpc(req.headers()) {
            match self.transcoder.match_route(req.method(), req.uri().path()) {
                Ok(matched) => {
                    let extensions = req.extensions_mut();
                    extensions.insert(RouteTemplate(matched.template.clone()));
                    extensions.insert(matched);
                }
                Err(miss) => {
                    req.extensions_mut().insert(miss);
                }
            }
        }
        self.inner.call(req)
    }
}

/// The REST face of a gRPC service (see [`Transcoder::service`]). Takes
/// requests with any body type; answers with [`Body`].
#[derive(Clone)]
pub struct TranscodeService<S> {
    inner: Arc<Inner>,
    grpc: S,
}

impl<S, B, RB> Service<Request<B>> for TranscodeService<S>
where
    S: Service<Request<UpstreamBody>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness is the gRPC service's, checked per call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        let grpc = self.grpc.clone();
        let matched = match req.extensions_mut().remove::<MatchedRoute>() {
            Some(matched) => Ok(matched),
            None => match req.extensions_mut().remove::<RouteMiss>() {
                Some(miss) => Err(miss),
                None => Transcoder {
                    inner: inner.clone(),
                }
                .match_route(req.method(), req.uri().path()),
            },
        };
        Box::pin(async move {
            let matched = match matched {
                Ok(matched) => matched,
                Err(miss) => return Ok(miss.response(req.method(), req.uri().path())),
            };
            let template = matched.template.clone();
            let mut response = match transcode(&inner, matched, req, grpc).await {
                Ok(response) => response,
                Err(error) => error.to_http_response::<Bytes>().map(full),
            };
            response.extensions_mut().insert(RouteTemplate(template));
            Ok(response)
        })
    }
}

async fn transcode<S, B, RB>(
    inner: &Inner,
    matched: MatchedRoute,
    req: Request<B>,
    grpc: S,
) -> Result<Response<Body>, Error>
where
    S: Service<Request<UpstreamBody>, Response = Response<RB>> + Send,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let route = matched.route.clone();
    if route.rpc.is_client_streaming() {
        return Err(Error::new(
            Code::Unimplemented,
            "STREAMING_NOT_SUPPORTED",
            format!(
                "{} takes a stream of requests, which has no REST form",
                route.rpc.full_name()
            ),
        ));
    }
    let stream_format = route
        .rpc
        .is_server_streaming()
        .then(|| StreamFormat::of(req.headers()));
    let (mut parts, body) = req.into_parts();
    let body = request::read_body(&parts.headers, body, inner.options.max_body_bytes)
        .await
        .map_err(|e| match e.reason() {
            "BODY_TOO_LARGE" => e.with_http_status(StatusCode::PAYLOAD_TOO_LARGE),
            _ => e,
        })?;
    if !body.is_empty() {
        request::check_content_type(&parts.headers)
            .map_err(|e| e.with_http_status(StatusCode::UNSUPPORTED_MEDIA_TYPE))?;
    }
    let query = parts.uri.query().unwrap_or("");
    let direct = match &route.direct {
        Some(direct) if query.is_empty() && body.is_empty() => direct.encode(&matched.vars),
        _ => None,
    };
    let payload = match direct {
        Some(payload) => payload,
        None => {
            let message =
                request::request_message(&inner.options, &route, &matched.vars, query, &body)?;
            if let Some(validator) = &inner.validator {
                validator.check(&message)?;
            }
            framing::encode(&message)
        }
    };

    // A real gRPC request: the caller's headers (auth, trace context,
    // baggage) become metadata; its extensions (peer address) carry over.
    parts.uri = http::Uri::from(route.grpc_path.clone());
    parts.method = Method::POST;
    parts.version = http::Version::HTTP_2;
    strip_hop_headers(&mut parts.headers);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    parts
        .headers
        .insert(header::TE, HeaderValue::from_static("trailers"));
    if let Some(left) = trellis_core::deadline::remaining() {
        parts.headers.insert(
            trellis_core::protocol::GRPC_TIMEOUT,
            trellis_core::deadline::grpc_timeout_header(left),
        );
    }
    let request = Request::from_parts(parts, http_body_util::Full::new(payload));
    let response = grpc.oneshot(request).await.map_err(|e| {
        let e: BoxError = e.into();
        Error::unavailable(format!("the gRPC service failed: {e}"))
    })?;
    match stream_format {
        Some(format) => Ok(stream::respond(
            &inner.options,
            inner.json.clone(),
            route,
            response,
            format,
        )),
        None => response::unary(&inner.options, &inner.json, &route, response).await,
    }
}

/// Headers that belong to the HTTP/1.1 hop or to the JSON body, not to the
/// gRPC request.
fn strip_hop_headers(headers: &mut HeaderMap) {
    for name in [
        header::HOST,
        header::CONTENT_LENGTH,
        header::CONTENT_TYPE,
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::ACCEPT,
        header::ACCEPT_ENCODING,
        header::EXPECT,
        header::TE,
    ] {
        headers.remove(name);
    }
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
}

/// The RPCs of a pool's services by gRPC path, for code that needs to know
/// which gRPC methods exist (metrics labels, validation plans).
pub fn grpc_methods(pool: &DescriptorPool) -> HashMap<String, MethodDescriptor> {
    let mut methods = HashMap::new();
    for service in pool.services() {
        for m in service.methods() {
            methods.insert(format!("/{}/{}", service.full_name(), m.name()), m);
        }
    }
    methods
}

#[cfg(test)]
mod tests {
    //! The direct request path against the general one: the same bytes for
    //! every value a path variable can carry, and the general path (with
    //! its error) whenever a required field is missing.

    use prost_reflect::DescriptorPool;

    use super::*;

    fn pool() -> DescriptorPool {
        crate::test_pool("conformance/v1/mirror.proto")
    }

    fn route(pool: &DescriptorPool, method: &str, template: &str) -> Route {
        let rpc = pool
            .get_service_by_name("conformance.v1.Mirror")
            .and_then(|s| s.methods().find(|m| m.name() == method))
            .expect("method");
        let template = PathTemplate::parse(template).expect("template");
        let validator = Validator::new(pool).expect("rules");
        Route {
            method: Method::GET,
            direct: DirectRequest::new(&template, &rpc.input(), Some(&validator)),
            template,
            body: BodyRule::None,
            response_body: None,
            grpc_path: "/conformance.v1.Mirror/Get".parse().expect("path"),
            rpc,
            output_plan: 0,
        }
    }

    #[test]
    fn a_direct_request_is_the_message_the_general_path_builds() {
        let pool = pool();
        let route = route(&pool, "Get", "/v1/things/{id}/{name}");
        let direct = route.direct.as_ref().expect("two string fields: direct");
        let options = TranscodeOptions::default();
        for (id, name) in [
            ("42", "n"),
            ("", "only-name"),
            ("ünïcödé ✓", ""),
            ("a/b%2Fc", "x".repeat(300).as_str()),
        ] {
            let vars: PathVars = vec![
                ("id".into(), id.to_owned()),
                ("name".into(), name.to_owned()),
            ];
            let general = request::request_message(&options, &route, &vars, "", b"")
                .map(|m| framing::encode(&m))
                .expect("general path");
            assert_eq!(
                direct.encode(&vars),
                Some(general),
                "id {id:?}, name {name:?}"
            );
        }
    }

    #[test]
    fn a_missing_required_field_takes_the_general_path() {
        let pool = pool();
        // `Ref.id` is REQUIRED; `Ref.parent` too, and no path binds it.
        let route = route(&pool, "Lookup", "/v1/refs/{id}");
        let direct = route
            .direct
            .as_ref()
            .expect("REQUIRED is the only rule: checked on the direct path");
        let vars: PathVars = vec![("id".into(), "7".to_owned())];
        assert_eq!(
            direct.encode(&vars),
            None,
            "a request without its required parent must be checked the general way"
        );
        // Not a top-level string, or rules beyond REQUIRED: no direct path.
        let nested = super::tests::route(&pool, "Update", "/v1/things/{nested.key}");
        assert!(nested.direct.is_none());
        let order = super::tests::route(&pool, "Place", "/v1/orders/{sku}");
        assert!(
            order.direct.is_none(),
            "Order.sku has length and pattern rules"
        );
    }
}
