//! REST/JSON from `google.api.http` annotations, for any gRPC service.
//!
//! A [`Transcoder`] is built from file descriptor sets (as protox writes
//! them); [`Transcoder::service`] wraps a gRPC service — the server's own
//! routes in process, or a channel to a remote upstream — in a tower
//! service that takes REST requests: it matches the path template, builds
//! the request message from path variables, the body and the query string
//! (the proto3 JSON mapping, through `prost-reflect`), calls the gRPC
//! service with a real gRPC request, and answers with the response message
//! as JSON, or the error in Trellis' error model. Server-streaming methods
//! answer as Server-Sent Events (or newline-delimited JSON when the client
//! accepts `application/x-ndjson`). Every method is also reachable at
//! `POST /{package.Service}/{Method}` with the request message as the body.
//!
//! ```no_run
//! # fn run(fds: &'static [u8]) -> Result<(), trellis_transport::transcode::TranscodeError> {
//! use trellis_transport::transcode::Transcoder;
//! let transcoder = Transcoder::new(&[fds], &["shop.user.v1.UserService"])?;
//! for b in transcoder.bindings() {
//!     println!("{} {} -> {}", b.method, b.template, b.rpc.full_name());
//! }
//! # Ok(()) }
//! ```

mod openapi;
mod template;

pub use openapi::openapi;

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::{body::Body, response::IntoResponse};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor,
    MethodDescriptor, ReflectMessage, SerializeOptions, Value,
};
use tower::{BoxError, Service, ServiceExt};
use trellis_core::{Code, Error, excerpt};

use self::template::PathTemplate;

/// Why a transcoder could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    /// A descriptor set did not decode.
    #[error("file descriptor set: {0}")]
    Descriptors(String),
    /// A named service is not in the descriptor sets.
    #[error("service {0} is not in the descriptor sets")]
    UnknownService(String),
    /// An annotation is malformed; the message names the method.
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
    /// The largest request body read (bytes). Default: 4 MiB.
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
enum BodyRule {
    /// No body (GET, DELETE): every unbound field may come from the query.
    None,
    /// `body: "*"`: the whole message, minus path variables.
    Whole,
    /// `body: "field"`: one top-level field; the rest from the query.
    Field(FieldDescriptor),
}

/// One REST route for one RPC.
#[derive(Debug, Clone)]
struct Route {
    method: Method,
    template: PathTemplate,
    /// The template as written, for metrics and traces.
    label: Arc<str>,
    body: BodyRule,
    response_body: Option<FieldDescriptor>,
    rpc: MethodDescriptor,
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

/// REST routes for gRPC methods, built once from descriptors.
#[derive(Clone)]
pub struct Transcoder {
    inner: Arc<Inner>,
}

struct Inner {
    routes: Vec<Arc<Route>>,
    /// `package.Service/Method` → its route as `POST /package.Service/Method`.
    rpcs: HashMap<String, Arc<Route>>,
    pool: DescriptorPool,
    options: TranscodeOptions,
    validator: Option<crate::validate::Validator>,
}

impl std::fmt::Debug for Transcoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transcoder")
            .field("routes", &self.inner.routes.len())
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
        let http = pool.get_extension_by_name("google.api.http");
        let mut routes = Vec::new();
        let mut rpcs = HashMap::new();
        for name in services {
            let service = pool
                .get_service_by_name(name)
                .ok_or_else(|| TranscodeError::UnknownService((*name).to_owned()))?;
            for rpc in service.methods() {
                let by_name = format!("/{}/{}", service.full_name(), rpc.name());
                let template = PathTemplate::parse(&by_name).map_err(|e| TranscodeError::Rule {
                    method: rpc.full_name().to_owned(),
                    message: e.to_string(),
                })?;
                let fallback = Route {
                    method: Method::POST,
                    label: by_name.clone().into(),
                    template,
                    body: BodyRule::Whole,
                    response_body: None,
                    rpc: rpc.clone(),
                };
                rpcs.insert(by_name[1..].to_owned(), Arc::new(fallback));
                let Some(http) = &http else { continue };
                let options = rpc.options();
                if !options.has_extension(http) {
                    continue;
                }
                if let Value::Message(rule) = options.get_extension(http).as_ref() {
                    let mut rules = vec![rule.clone()];
                    if let Some(Value::List(more)) =
                        rule.get_field_by_name("additional_bindings").as_deref()
                    {
                        rules.extend(more.iter().filter_map(|v| v.as_message().cloned()));
                    }
                    for rule in rules {
                        routes.push(Arc::new(route(&rpc, &rule)?));
                    }
                }
            }
        }
        // The most specific template wins when several match.
        routes.sort_by_key(|r| std::cmp::Reverse(r.template.specificity()));
        let validator = if options.validate {
            let validator =
                crate::validate::Validator::new(&pool).map_err(|e| TranscodeError::Rule {
                    method: e.field,
                    message: e.message,
                })?;
            Some(validator)
        } else {
            None
        };
        Ok(Transcoder {
            inner: Arc::new(Inner {
                routes,
                rpcs,
                pool,
                options,
                validator,
            }),
        })
    }

    /// Every annotated route, most specific first.
    pub fn bindings(&self) -> Vec<Binding> {
        self.inner
            .routes
            .iter()
            .map(|r| Binding {
                method: r.method.clone(),
                template: r.template.source().to_owned(),
                path_fields: r.template.vars.iter().map(|v| v.field.clone()).collect(),
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
    pub fn validator(&self) -> Option<&crate::validate::Validator> {
        self.inner.validator.as_ref()
    }

    /// The descriptors the routes were built from.
    pub fn pool(&self) -> &DescriptorPool {
        &self.inner.pool
    }

    /// A REST service over `grpc`, which gets real gRPC requests
    /// (`application/grpc`, framed protobuf) and must answer them.
    pub fn service<S>(&self, grpc: S) -> TranscodeService<S> {
        TranscodeService {
            inner: self.inner.clone(),
            grpc,
        }
    }
}

fn route(rpc: &MethodDescriptor, rule: &DynamicMessage) -> Result<Route, TranscodeError> {
    let err = |message: String| TranscodeError::Rule {
        method: rpc.full_name().to_owned(),
        message,
    };
    let text = |name: &str| {
        rule.get_field_by_name(name)
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    let mut pattern = None;
    for (field, method) in [
        ("get", Method::GET),
        ("put", Method::PUT),
        ("post", Method::POST),
        ("delete", Method::DELETE),
        ("patch", Method::PATCH),
    ] {
        if rule.has_field_by_name(field) {
            pattern = Some((method, text(field)));
        }
    }
    if rule.has_field_by_name("custom")
        && let Some(Value::Message(custom)) = rule.get_field_by_name("custom").as_deref()
    {
        let kind = custom
            .get_field_by_name("kind")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let path = custom
            .get_field_by_name("path")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let method = Method::from_bytes(kind.as_bytes())
            .map_err(|_| err(format!("custom kind {kind:?} is not an HTTP method")))?;
        pattern = Some((method, path));
    }
    let (method, path) = pattern.ok_or_else(|| err("google.api.http has no pattern".into()))?;
    let template = PathTemplate::parse(&path).map_err(|e| err(e.to_string()))?;
    let input = rpc.input();
    for var in &template.vars {
        let field = field_path(&input, &var.field)
            .map_err(|e| err(format!("path variable {}: {e}", var.field)))?;
        if field.is_list()
            || field.is_map()
            || matches!(field.kind(), Kind::Message(_)) && !is_scalar_wkt(&field)
        {
            return Err(err(format!(
                "path variable {} must be a singular scalar field",
                var.field
            )));
        }
    }
    let body =
        match text("body").as_str() {
            "" => BodyRule::None,
            "*" => BodyRule::Whole,
            name => BodyRule::Field(input.get_field_by_name(name).ok_or_else(|| {
                err(format!("body field {name} is not in {}", input.full_name()))
            })?),
        };
    let response_body = match text("response_body").as_str() {
        "" => None,
        name => Some(rpc.output().get_field_by_name(name).ok_or_else(|| {
            err(format!(
                "response_body field {name} is not in {}",
                rpc.output().full_name()
            ))
        })?),
    };
    Ok(Route {
        method,
        label: template.source().into(),
        template,
        body,
        response_body,
        rpc: rpc.clone(),
    })
}

/// Resolves a dotted path of field names (proto or JSON names).
fn field_path(message: &MessageDescriptor, path: &str) -> Result<FieldDescriptor, String> {
    let mut current = message.clone();
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let field = current
            .get_field_by_name(part)
            .or_else(|| current.get_field_by_json_name(part))
            .ok_or_else(|| format!("no field {part} in {}", current.full_name()))?;
        if parts.peek().is_none() {
            return Ok(field);
        }
        match field.kind() {
            Kind::Message(m) if !field.is_list() && !field.is_map() => current = m,
            _ => return Err(format!("{part} is not a message field")),
        }
    }
    Err("empty field path".into())
}

/// Well-known types whose JSON form is a string or number, so they can come
/// from a path segment or a query parameter.
fn is_scalar_wkt(field: &FieldDescriptor) -> bool {
    match field.kind() {
        Kind::Message(m) => matches!(
            m.full_name(),
            "google.protobuf.Timestamp"
                | "google.protobuf.Duration"
                | "google.protobuf.FieldMask"
                | "google.protobuf.StringValue"
                | "google.protobuf.BytesValue"
                | "google.protobuf.BoolValue"
                | "google.protobuf.Int32Value"
                | "google.protobuf.Int64Value"
                | "google.protobuf.UInt32Value"
                | "google.protobuf.UInt64Value"
                | "google.protobuf.FloatValue"
                | "google.protobuf.DoubleValue"
        ),
        _ => true,
    }
}

/// The REST face of a gRPC service (see [`Transcoder::service`]).
#[derive(Clone)]
pub struct TranscodeService<S> {
    inner: Arc<Inner>,
    grpc: S,
}

impl<S, B> Service<Request<Body>> for TranscodeService<S>
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness is the gRPC service's, checked per call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        let grpc = self.grpc.clone();
        Box::pin(async move {
            let (template, result) = inner.handle(req, grpc).await;
            let mut response = match result {
                Ok(response) => response,
                Err(error) => error.into_response(),
            };
            if let Some(template) = template {
                response
                    .extensions_mut()
                    .insert(trellis_core::RouteTemplate(template));
            }
            Ok(response)
        })
    }
}

/// A matched route and its path variables.
type Found = (Arc<Route>, Vec<(String, String)>);

/// How a client asked to receive a stream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StreamFormat {
    Sse,
    NdJson,
}

impl Inner {
    /// Finds the route; `Err` is 404 or 405.
    /// Finds the route; a miss is 404, or 405 with the methods allowed.
    fn find(&self, method: &Method, path: &str) -> Result<Found, Box<Response<Body>>> {
        let mut allowed: Vec<&str> = Vec::new();
        for route in &self.routes {
            if let Some(vars) = route.template.matches(path) {
                if route.method == method {
                    return Ok((Arc::clone(route), vars));
                }
                if !allowed.contains(&route.method.as_str()) {
                    allowed.push(route.method.as_str());
                }
            }
        }
        // Every method, by its gRPC name.
        if let Some(route) = self.rpcs.get(path.trim_start_matches('/')) {
            if method == Method::POST {
                return Ok((Arc::clone(route), Vec::new()));
            }
            allowed.push("POST");
        }
        if allowed.is_empty() {
            let error = Error::not_found(
                "ROUTE_NOT_FOUND",
                format!("no route for {method} {}", excerpt(path)),
            );
            return Err(Box::new(error.into_response()));
        }
        let error = Error::new(
            Code::Unimplemented,
            "METHOD_NOT_ALLOWED",
            format!("{method} is not allowed on {}", excerpt(path)),
        );
        let mut response = error.into_response();
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        if let Ok(allow) = HeaderValue::from_str(&allowed.join(", ")) {
            response.headers_mut().insert(header::ALLOW, allow);
        }
        Err(Box::new(response))
    }

    async fn handle<S, B>(
        &self,
        req: Request<Body>,
        grpc: S,
    ) -> (Option<Arc<str>>, Result<Response<Body>, Error>)
    where
        S: Service<Request<Body>, Response = Response<B>> + Send,
        S::Future: Send,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (route, vars) = match self.find(req.method(), req.uri().path()) {
            Ok(found) => found,
            Err(miss) => return (None, Ok(*miss)),
        };
        let template = route.label.clone();
        let result = self.transcode(route, vars, req, grpc).await;
        (Some(template), result)
    }

    async fn transcode<S, B>(
        &self,
        route: Arc<Route>,
        vars: Vec<(String, String)>,
        req: Request<Body>,
        grpc: S,
    ) -> Result<Response<Body>, Error>
    where
        S: Service<Request<Body>, Response = Response<B>> + Send,
        S::Future: Send,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
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
            .then(|| stream_format(req.headers()));
        let (mut parts, body) = req.into_parts();
        let query = parts.uri.query().unwrap_or("").to_owned();
        let body = axum::body::to_bytes(body, self.options.max_body_bytes)
            .await
            .map_err(|e| {
                Error::new(
                    Code::InvalidArgument,
                    "BODY_UNREADABLE",
                    format!("cannot read the request body: {e}"),
                )
            })?;
        let message = self.request_message(&route, &vars, &query, &body)?;
        if let Some(validator) = &self.validator {
            validator.check(&message)?;
        }

        // A real gRPC request: the caller's headers (auth, trace context,
        // baggage) become metadata; its extensions (peer address) carry over.
        let mut framed = BytesMut::with_capacity(5 + message.encoded_len());
        framed.put_u8(0);
        framed.put_u32(message.encoded_len() as u32);
        message
            .encode(&mut framed)
            .map_err(|e| Error::internal(e.to_string()))?;
        let uri = format!(
            "/{}/{}",
            route.rpc.parent_service().full_name(),
            route.rpc.name()
        );
        parts.uri = uri
            .parse()
            .map_err(|e: http::uri::InvalidUri| Error::internal(e.to_string()))?;
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
        if let Some(left) = trellis_core::deadline::remaining()
            && let Ok(v) = HeaderValue::from_str(&trellis_core::deadline::grpc_timeout_value(left))
        {
            parts.headers.insert("grpc-timeout", v);
        }
        let request = Request::from_parts(parts, Body::from(framed.freeze()));
        let response = grpc.oneshot(request).await.map_err(|e| {
            let e: BoxError = e.into();
            Error::unavailable(format!("the gRPC service failed: {e}"))
        })?;

        match stream_format {
            Some(format) => Ok(self.stream_response(route, response, format)),
            None => self.unary_response(&route, response).await,
        }
    }

    /// The request message: the body first, then the query string, then the
    /// path variables, each overriding what came before.
    fn request_message(
        &self,
        route: &Route,
        vars: &[(String, String)],
        query: &str,
        body: &[u8],
    ) -> Result<DynamicMessage, Error> {
        let input = route.rpc.input();
        let mut message = DynamicMessage::new(input.clone());
        let mut body_keys = Vec::new();
        match &route.body {
            BodyRule::None => {
                if !body.iter().all(u8::is_ascii_whitespace) {
                    return Err(Error::new(
                        Code::InvalidArgument,
                        "UNEXPECTED_BODY",
                        format!("{} {} takes no body", route.method, route.template.source()),
                    ));
                }
            }
            BodyRule::Whole => {
                if !body.iter().all(u8::is_ascii_whitespace) {
                    message = self.parse_json(&input, body)?;
                }
            }
            BodyRule::Field(field) => {
                if !body.iter().all(u8::is_ascii_whitespace) {
                    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
                        Error::invalid_argument(
                            field.json_name(),
                            format!("the body is not JSON: {e}"),
                        )
                    })?;
                    if let serde_json::Value::Object(map) = &value {
                        body_keys = map.keys().cloned().collect();
                    }
                    let wrapped = serde_json::json!({ field.json_name(): value });
                    let bytes =
                        serde_json::to_vec(&wrapped).map_err(|e| Error::internal(e.to_string()))?;
                    message = self.parse_json(&input, &bytes)?;
                }
            }
        }

        let bound: HashSet<&str> = vars.iter().map(|(f, _)| f.as_str()).collect();
        let mut from_query = HashSet::new();
        if !query.is_empty() {
            let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).map_err(|e| {
                Error::new(
                    Code::InvalidArgument,
                    "BAD_QUERY",
                    format!("the query string does not parse: {e}"),
                )
            })?;
            for (key, value) in pairs {
                if matches!(route.body, BodyRule::Whole) {
                    return Err(Error::invalid_argument(
                        key,
                        "this route takes every field from the body",
                    ));
                }
                if bound.contains(key.as_str()) {
                    return Err(Error::invalid_argument(
                        key,
                        "this field is taken from the path",
                    ));
                }
                let field = match field_path(&input, &key) {
                    Ok(f) => f,
                    Err(_) if self.options.allow_unknown_fields => continue,
                    Err(e) => {
                        return Err(Error::invalid_argument(
                            key,
                            format!("unknown query parameter: {e}"),
                        ));
                    }
                };
                if let BodyRule::Field(body) = &route.body
                    && key
                        .split('.')
                        .next()
                        .is_some_and(|top| top == body.name() || top == body.json_name())
                {
                    return Err(Error::invalid_argument(
                        key,
                        "this field is taken from the body",
                    ));
                }
                if field.is_map()
                    || matches!(field.kind(), Kind::Message(_)) && !is_scalar_wkt(&field)
                {
                    return Err(Error::invalid_argument(
                        key,
                        "only scalar fields can come from the query",
                    ));
                }
                self.set_path(&mut message, &key, &field, &value)?;
                from_query.insert(field.full_name().to_owned());
            }
        }
        for (path, value) in vars {
            let field = field_path(&input, path).map_err(Error::internal)?;
            self.set_path(&mut message, path, &field, value)?;
        }

        // PATCH with a FieldMask left empty: the fields the body named.
        if let BodyRule::Field(body_field) = &route.body
            && let Kind::Message(body_type) = body_field.kind()
            && !body_keys.is_empty()
        {
            for mask in input.fields() {
                let is_mask = matches!(mask.kind(), Kind::Message(m) if m.full_name() == "google.protobuf.FieldMask");
                if is_mask && !message.has_field(&mask) && !from_query.contains(mask.full_name()) {
                    let paths: Vec<Value> = body_keys
                        .iter()
                        .filter_map(|k| {
                            body_type
                                .get_field_by_json_name(k)
                                .or_else(|| body_type.get_field_by_name(k))
                        })
                        .map(|f| Value::String(f.name().to_owned()))
                        .collect();
                    if let Kind::Message(mask_type) = mask.kind() {
                        let mut value = DynamicMessage::new(mask_type);
                        value.set_field_by_name("paths", Value::List(paths));
                        message.set_field(&mask, Value::Message(value));
                    }
                }
            }
        }
        Ok(message)
    }

    /// A message from JSON, the error naming the field path at fault.
    fn parse_json(&self, desc: &MessageDescriptor, json: &[u8]) -> Result<DynamicMessage, Error> {
        let mut de = serde_json::Deserializer::from_slice(json);
        let mut track = serde_path_to_error::Track::new();
        let options =
            DeserializeOptions::new().deny_unknown_fields(!self.options.allow_unknown_fields);
        let parsed = DynamicMessage::deserialize_with_options(
            desc.clone(),
            serde_path_to_error::Deserializer::new(&mut de, &mut track),
            &options,
        )
        .and_then(|m| de.end().map(|()| m));
        parsed.map_err(|e| {
            let message = strip_position(&e.to_string());
            let mut field = match track.path().to_string().as_str() {
                "." | "" | "?" => String::new(),
                path => path.to_owned(),
            };
            // An unknown field is reported at its parent; name it.
            if let Some(name) = message
                .strip_prefix("unrecognized field name '")
                .and_then(|r| r.split('\'').next())
            {
                field = if field.is_empty() {
                    name.to_owned()
                } else {
                    format!("{field}.{name}")
                };
            }
            let field = if field.is_empty() {
                "(body)".to_owned()
            } else {
                field
            };
            Error::invalid_argument(field, format!("invalid JSON: {message}"))
        })
    }

    /// Sets the field at `path` from a text value (a path segment or query
    /// parameter), parsed by the field's JSON mapping; repeated fields append.
    fn set_path(
        &self,
        message: &mut DynamicMessage,
        path: &str,
        field: &FieldDescriptor,
        text: &str,
    ) -> Result<(), Error> {
        // The common case, a top-level string (`/v1/users/{id}`), directly.
        if !path.contains('.') && !field.is_list() && field.kind() == Kind::String {
            message.set_field(field, Value::String(text.to_owned()));
            return Ok(());
        }
        let leaf = match field.kind() {
            Kind::Bool => match text {
                "true" => serde_json::Value::Bool(true),
                "false" => serde_json::Value::Bool(false),
                _ => {
                    return Err(Error::invalid_argument(
                        path,
                        format!("{text:?} is not true or false"),
                    ));
                }
            },
            Kind::Enum(_) => match text.parse::<i32>() {
                Ok(n) => serde_json::Value::from(n),
                Err(_) => serde_json::Value::String(text.to_owned()),
            },
            _ => serde_json::Value::String(text.to_owned()),
        };
        let leaf = if field.is_list() {
            serde_json::Value::Array(vec![leaf])
        } else {
            leaf
        };
        // Wrap the value in its parents: {"user": {"id": "7"}}.
        let input = message.descriptor();
        let mut names = Vec::new();
        let mut current = input.clone();
        for part in path.split('.') {
            let f = current
                .get_field_by_name(part)
                .or_else(|| current.get_field_by_json_name(part))
                .ok_or_else(|| Error::invalid_argument(path, "no such field"))?;
            names.push(f.json_name().to_owned());
            if let Kind::Message(m) = f.kind() {
                current = m;
            }
        }
        let json = names
            .iter()
            .rev()
            .fold(leaf, |inner, name| serde_json::json!({ name: inner }));
        let bytes = serde_json::to_vec(&json).map_err(|e| Error::internal(e.to_string()))?;
        let part = self.parse_json(&input, &bytes).map_err(|e| {
            Error::invalid_argument(
                path,
                e.message().trim_start_matches("invalid JSON: ").to_owned(),
            )
        })?;
        // Protobuf merge: scalars overwrite, repeated fields append.
        message
            .merge(part.encode_to_vec().as_slice())
            .map_err(|e| Error::internal(e.to_string()))?;
        Ok(())
    }

    async fn unary_response<B>(
        &self,
        route: &Route,
        response: Response<B>,
    ) -> Result<Response<Body>, Error>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = response.into_parts();
        check_status(&parts.headers)?;
        let collected = http_body_util::BodyExt::collect(body).await.map_err(|e| {
            let e: BoxError = e.into();
            Error::unavailable(format!("the gRPC response broke off: {e}"))
        })?;
        let trailers = collected.trailers().cloned();
        if let Some(trailers) = &trailers {
            check_status(trailers)?;
        } else if parts.headers.get("grpc-status").is_none() {
            return Err(Error::internal("the gRPC response ended without a status"));
        }
        let mut data = collected.to_bytes();
        let message = next_frame(&mut data)?
            .ok_or_else(|| Error::internal("the gRPC response carried no message"))?;
        let output = DynamicMessage::decode(route.rpc.output(), message)
            .map_err(|e| Error::internal(e.to_string()))?;
        let json = to_json(&self.options, route, &output)?;
        Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
    }

    fn stream_response<B>(
        &self,
        route: Arc<Route>,
        response: Response<B>,
        format: StreamFormat,
    ) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = response.into_parts();
        if let Err(e) = check_status(&parts.headers) {
            return e.into_response();
        }
        let options = self.options.clone();
        let state = (Box::pin(body), BytesMut::new(), false);
        let stream = futures_util::stream::unfold(state, move |(mut body, mut buf, done)| {
            let route = route.clone();
            let options = options.clone();
            let this_events = event_writer(format);
            async move {
                if done {
                    return None;
                }
                loop {
                    // A whole message buffered: send it.
                    match take_frame(&mut buf) {
                        Ok(Some(message)) => {
                            let event = DynamicMessage::decode(route.rpc.output(), message)
                                .map_err(|e| Error::internal(e.to_string()))
                                .and_then(|m| to_json(&options, &route, &m));
                            return Some(match event {
                                Ok(json) => (
                                    Ok::<_, Infallible>(this_events(&json, false)),
                                    (body, buf, false),
                                ),
                                Err(e) => {
                                    (Ok(this_events(&error_json(&e), true)), (body, buf, true))
                                }
                            });
                        }
                        Ok(None) => {}
                        Err(e) => {
                            return Some((
                                Ok(this_events(&error_json(&e), true)),
                                (body, buf, true),
                            ));
                        }
                    }
                    match std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
                        Some(Ok(frame)) => {
                            if let Some(data) = frame.data_ref() {
                                buf.extend_from_slice(data);
                            } else if let Some(trailers) = frame.trailers_ref() {
                                let end = match check_status(trailers) {
                                    Ok(()) => None,
                                    Err(e) => Some(this_events(&error_json(&e), true)),
                                };
                                return end.map(|bytes| (Ok(bytes), (body, buf, true)));
                            }
                        }
                        Some(Err(e)) => {
                            let e: BoxError = e.into();
                            let error =
                                Error::unavailable(format!("the gRPC stream broke off: {e}"));
                            return Some((
                                Ok(this_events(&error_json(&error), true)),
                                (body, buf, true),
                            ));
                        }
                        None => return None,
                    }
                }
            }
        });
        let content_type = match format {
            StreamFormat::Sse => "text/event-stream",
            StreamFormat::NdJson => "application/x-ndjson",
        };
        (
            [
                (header::CONTENT_TYPE, content_type),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from_stream(stream),
        )
            .into_response()
    }
}

fn to_json(
    options: &TranscodeOptions,
    route: &Route,
    output: &DynamicMessage,
) -> Result<Vec<u8>, Error> {
    let options = SerializeOptions::new().skip_default_fields(!options.emit_defaults);
    let mut out = serde_json::Serializer::new(Vec::with_capacity(128));
    let result = match &route.response_body {
        Some(field) => {
            let value = output.get_field(field);
            // One field: serialize a message with only that field, then
            // take the field's JSON out of it.
            let mut only = DynamicMessage::new(output.descriptor());
            only.set_field(field, value.into_owned());
            let full = only
                .serialize_with_options(
                    serde_json::value::Serializer,
                    &options.clone().skip_default_fields(false),
                )
                .map_err(|e| Error::internal(e.to_string()))?;
            let part = full
                .get(field.json_name())
                .cloned()
                .unwrap_or(serde_json::Value::Null);
            return serde_json::to_vec(&part).map_err(|e| Error::internal(e.to_string()));
        }
        None => output.serialize_with_options(&mut out, &options),
    };
    result.map_err(|e| Error::internal(e.to_string()))?;
    Ok(out.into_inner())
}

/// serde_json's " at line 1 column 17" means nothing to a REST caller.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) if message[i..].contains(" column ") => message[..i].to_owned(),
        _ => message.to_owned(),
    }
}

fn error_json(e: &Error) -> Vec<u8> {
    serde_json::to_vec(&e.to_body()).unwrap_or_else(|_| b"{}".to_vec())
}

/// Formats one streamed message (or the closing error) for the wire.
fn event_writer(format: StreamFormat) -> impl Fn(&[u8], bool) -> Bytes {
    move |json, error| {
        let mut out = BytesMut::with_capacity(json.len() + 24);
        match (format, error) {
            (StreamFormat::Sse, false) => out.extend_from_slice(b"data: "),
            (StreamFormat::Sse, true) => out.extend_from_slice(b"event: error\ndata: "),
            (StreamFormat::NdJson, true) => out.extend_from_slice(b"{\"error\":"),
            (StreamFormat::NdJson, false) => {}
        }
        out.extend_from_slice(json);
        match (format, error) {
            (StreamFormat::Sse, _) => out.extend_from_slice(b"\n\n"),
            (StreamFormat::NdJson, true) => out.extend_from_slice(b"}\n"),
            (StreamFormat::NdJson, false) => out.extend_from_slice(b"\n"),
        }
        out.freeze()
    }
}

fn stream_format(headers: &HeaderMap) -> StreamFormat {
    let accepts = |t: &str| {
        headers
            .get_all(header::ACCEPT)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.contains(t)))
    };
    if accepts("application/x-ndjson") && !accepts("text/event-stream") {
        StreamFormat::NdJson
    } else {
        StreamFormat::Sse
    }
}

/// A gRPC status in these headers, as an error (`Ok` for OK or none).
fn check_status(headers: &HeaderMap) -> Result<(), Error> {
    match headers.get("grpc-status") {
        None => Ok(()),
        Some(v) if v == "0" => Ok(()),
        Some(_) => Err(tonic::Status::from_header_map(headers)
            .map(Error::from)
            .unwrap_or_else(|| Error::internal("an unreadable gRPC status"))),
    }
}

/// [`next_frame`] on a buffer that grows as a stream arrives, without copying.
fn take_frame(buf: &mut BytesMut) -> Result<Option<Bytes>, Error> {
    if buf.len() < 5 {
        return Ok(None);
    }
    if buf[0] != 0 {
        return Err(Error::internal(
            "the gRPC response is compressed, which the transcoder did not ask for",
        ));
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return Ok(None);
    }
    buf.advance(5);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Takes one length-prefixed gRPC message off the front of `data`.
fn next_frame(data: &mut Bytes) -> Result<Option<Bytes>, Error> {
    if data.len() < 5 {
        return Ok(None);
    }
    if data[0] != 0 {
        return Err(Error::internal(
            "the gRPC response is compressed, which the transcoder did not ask for",
        ));
    }
    let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
    if data.len() < 5 + len {
        return Ok(None);
    }
    data.advance(5);
    Ok(Some(data.split_to(len)))
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
    headers.remove("keep-alive");
    headers.remove("x-request-timeout-ms");
}
