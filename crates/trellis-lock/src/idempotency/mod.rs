//! Idempotent requests: a request sent twice has one effect, and the
//! second caller gets the first answer.
//!
//! A client names its attempt with the `Idempotency-Key` header (the IETF
//! httpapi draft; for gRPC the `idempotency-key` metadata, the same HTTP/2
//! header), or — on a route configured for it — the request is named by
//! its **fingerprint**: the principal, the route and a hash of its
//! canonical body. [`IdempotencyLayer`] then, in front of the handler:
//!
//! 1. records the key as *in progress* in the [`Store`], atomically — one
//!    caller wins;
//! 2. a concurrent duplicate waits for the winner's answer (up to
//!    `wait`), or with `wait = 0` is refused at once: 409 / ABORTED,
//!    reason `IDEMPOTENCY_KEY_IN_USE`;
//! 3. the winner runs the request; a final answer (any 2xx–4xx, a gRPC
//!    status the caller must act on) is stored with the request's
//!    fingerprint for `ttl`, and later duplicates get it **byte for byte**
//!    (status, headers, body, trailers) with `idempotent-replayed: true`;
//! 4. an answer that asks to be retried (5xx, 408, 429; UNAVAILABLE,
//!    DEADLINE_EXCEEDED, INTERNAL …) is not stored: the key is freed and a
//!    retry runs again;
//! 5. the same key with a different request (another body or route) is
//!    refused: 422 / INVALID_ARGUMENT, reason `IDEMPOTENCY_KEY_REUSED`.
//!
//! Keys are scoped to the principal (the token's subject, the gateway's
//! `x-user-id`), so one user cannot read another's answers. An instance
//! that dies mid-request holds its key for `lease` at most. The store is
//! [`MemoryStore`] (one process), SQLite and PostgreSQL (features `sqlite`,
//! `postgres`), or Redis (feature `redis`): [`connect`] picks it by URL.
//! When the store cannot be reached the request is refused (503 /
//! UNAVAILABLE) rather than run without the guarantee.
//!
//! ```
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use trellis_lock::idempotency::{IdempotencyLayer, IdempotencySettings, connect};
//!
//! let settings = IdempotencySettings {
//!     routes: vec!["/shop.order.v1.OrderService/CreateOrder".into()],
//!     ..Default::default()
//! };
//! let store = connect(settings.store.expose(), std::path::Path::new("./.trellis")).await?;
//! let layer = IdempotencyLayer::new("order", store, &settings);
//! // server.layer(layer) …
//! # let _ = layer; Ok(()) }
//! ```

mod body;
mod memory;
#[cfg(feature = "redis")]
mod redis_store;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;

use std::{
    borrow::Cow,
    collections::HashMap,
    convert::Infallible,
    path::Path,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, request::Parts};
use http_body::Body;
use serde::{Deserialize, Serialize};
use trellis_core::{Code, Error, Secret, protocol};

pub use body::Replayable;
pub use memory::MemoryStore;
#[cfg(feature = "redis")]
pub use redis_store::RedisStore;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use sql::{MIGRATIONS_TABLE, SqlStore};

/// The request header that names an attempt (and the gRPC metadata key).
pub const KEY_HEADER: &str = "idempotency-key";
/// The response header on a replayed answer.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// The longest key accepted.
pub const MAX_KEY_BYTES: usize = 255;

/// A stored answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The HTTP status.
    pub status: u16,
    /// The response headers, in order.
    pub headers: Vec<(String, Bytes)>,
    /// The body.
    pub body: Bytes,
    /// The trailers (a gRPC answer's status).
    pub trailers: Vec<(String, Bytes)>,
}

/// What [`Store::begin`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// The key was free (or expired): this caller runs the request.
    Started,
    /// Another caller runs it, for the request with this fingerprint.
    InProgress {
        /// The running request's fingerprint.
        fingerprint: String,
    },
    /// It ran; its answer.
    Done {
        /// The fingerprint of the request that ran.
        fingerprint: String,
        /// Its answer.
        record: Record,
    },
}

/// Why the store failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("idempotency store: {0}")]
pub struct StoreError(pub String);

/// Where keys and answers are kept. Every operation is atomic per key.
pub trait Store: Send + Sync + 'static {
    /// Marks `key` in progress for `owner` for `lease` if it is free or
    /// expired; otherwise says what holds it.
    fn begin<'a>(
        &'a self,
        key: &'a str,
        fingerprint: &'a str,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Begin, StoreError>>;

    /// Stores `owner`'s answer for `ttl`; false if `owner` no longer holds
    /// the key (its lease ran out and another took it).
    fn complete<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        record: &'a Record,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Frees `key` if `owner` still holds it in progress.
    fn abandon<'a>(&'a self, key: &'a str, owner: &'a str)
    -> BoxFuture<'a, Result<(), StoreError>>;
}

/// What a concurrent duplicate does while the first runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InFlight {
    /// Waits up to `wait` for the first answer, then 409.
    Wait,
    /// Refused at once: 409 / ABORTED with `Retry-After`.
    Conflict,
}

/// `server.idempotency`: which routes are idempotent and where keys live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct IdempotencySettings {
    /// `memory://` (this process; the default), `sqlite://PATH` (relative
    /// to the data dir), `postgres://…`, `redis://…` / `rediss://…`.
    /// Restart.
    pub store: Secret<String>,
    /// Routes that honour `Idempotency-Key`: gRPC methods
    /// (`/pkg.Service/Method`, which also covers their REST face) or HTTP
    /// paths — besides those the service declares itself
    /// (`Service::IDEMPOTENT`). Restart. Default: none.
    pub routes: Vec<String>,
    /// Routes that, without a key, are named by their fingerprint
    /// (principal + route + canonical body): an identical request within
    /// `ttl` is answered from the first. Restart. Default: none.
    pub fingerprint_routes: Vec<String>,
    /// How long an answer is kept. Default: 24h.
    #[serde(with = "trellis_config::duration")]
    pub ttl: Duration,
    /// How long an in-progress key holds off others if its instance dies.
    /// Default: 60s.
    #[serde(with = "trellis_config::duration")]
    pub lease: Duration,
    /// What a concurrent duplicate does. Default: `wait`.
    pub in_flight: InFlight,
    /// How long a duplicate waits for the first answer. Default: 10s.
    #[serde(with = "trellis_config::duration")]
    pub wait: Duration,
    /// The largest request body and answer recorded (bytes): a larger
    /// request is refused (413), a larger answer is passed on unrecorded.
    /// Default: 1 MiB.
    pub max_body_bytes: usize,
}

impl Default for IdempotencySettings {
    fn default() -> Self {
        IdempotencySettings {
            store: Secret::new("memory://".into()),
            routes: Vec::new(),
            fingerprint_routes: Vec::new(),
            ttl: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(60),
            in_flight: InFlight::Wait,
            wait: Duration::from_secs(10),
            max_body_bytes: 1 << 20,
        }
    }
}

impl IdempotencySettings {
    /// Whether any route is idempotent.
    pub fn enabled(&self) -> bool {
        !self.routes.is_empty() || !self.fingerprint_routes.is_empty()
    }

    /// Checks the settings, naming keys under `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<(), trellis_config::Invalid> {
        use trellis_config::Invalid;
        let store = self.store.expose();
        let scheme = store.split_once("://").map(|(s, _)| s).unwrap_or("");
        if !matches!(
            scheme,
            "memory" | "sqlite" | "postgres" | "postgresql" | "redis" | "rediss"
        ) {
            return Err(Invalid::new(
                format!("{prefix}.store"),
                "expected memory://, sqlite://PATH, postgres://… or redis://…",
            ));
        }
        Invalid::check_range(
            &format!("{prefix}.ttl"),
            self.ttl,
            Duration::from_secs(1),
            Duration::from_secs(30 * 24 * 3600),
        )?;
        Invalid::check_range(
            &format!("{prefix}.lease"),
            self.lease,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?;
        Invalid::check_range(
            &format!("{prefix}.wait"),
            self.wait,
            Duration::ZERO,
            Duration::from_secs(600),
        )?;
        Invalid::check_range(
            &format!("{prefix}.max_body_bytes"),
            self.max_body_bytes,
            1,
            64 << 20,
        )?;
        for route in self.routes.iter().chain(&self.fingerprint_routes) {
            if !route.starts_with('/') || route.len() > 512 {
                return Err(Invalid::new(
                    format!("{prefix}.routes"),
                    format!("{route:?}: expected a path or /pkg.Service/Method"),
                ));
            }
        }
        Ok(())
    }
}

/// The store at `url`: `memory://`, `sqlite://PATH` (relative paths under
/// `data_dir`; feature `sqlite`), `postgres://…` (feature `postgres`),
/// `redis://…` / `rediss://…?ca_file=…` (feature `redis`).
#[cfg_attr(
    not(any(feature = "sqlite", feature = "postgres", feature = "redis")),
    allow(unused_variables)
)]
pub async fn connect(url: &str, data_dir: &Path) -> Result<Arc<dyn Store>, StoreError> {
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    match scheme {
        "memory" => Ok(Arc::new(MemoryStore::default())),
        #[cfg(feature = "sqlite")]
        "sqlite" => {
            let path = url.trim_start_matches("sqlite://");
            let path = data_dir.join(path);
            Ok(Arc::new(
                SqlStore::open(&format!("sqlite://{}", path.display())).await?,
            ))
        }
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => Ok(Arc::new(SqlStore::open(url).await?)),
        #[cfg(feature = "redis")]
        "redis" | "rediss" => Ok(Arc::new(RedisStore::connect(url)?)),
        _ => Err(StoreError(format!(
            "{}: not an idempotency store in this build (memory://, and with their cargo features sqlite://, postgres://, redis://)",
            trellis_core::redact_url(url)
        ))),
    }
}

/// The hex SHA-256 of `parts`, each length-prefixed.
fn digest(parts: &[&[u8]]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for part in parts {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    let sum = ctx.finish();
    let mut hex = String::with_capacity(64);
    for byte in sum.as_ref() {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// The request's fingerprint: method, route and body — a JSON body in
/// canonical form (keys sorted, no insignificant space), so two encodings
/// of one request match; any other body as its bytes.
pub fn fingerprint(method: &str, route: &str, headers: &HeaderMap, body: &[u8]) -> String {
    let json = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let canonical: Cow<'_, [u8]> = if json {
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(value) => Cow::Owned(canonical_json(&value).into_bytes()),
            Err(_) => Cow::Borrowed(body),
        }
    } else {
        Cow::Borrowed(body)
    };
    digest(&[method.as_bytes(), route.as_bytes(), &canonical])
}

fn canonical_json(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let fields: Vec<String> = keys
                .into_iter()
                .map(|k| {
                    format!(
                        "{}:{}",
                        Value::String(k.clone()),
                        canonical_json(&map[k.as_str()])
                    )
                })
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(items) => format!(
            "[{}]",
            items
                .iter()
                .map(canonical_json)
                .collect::<Vec<_>>()
                .join(",")
        ),
        other => other.to_string(),
    }
}

/// How a route is made idempotent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// By the client's key only.
    Key,
    /// By the key, or without one by the fingerprint.
    Fingerprint,
}

/// Names a request's route (a gRPC method for the REST face too).
pub type RouteOf = fn(&Parts) -> Cow<'_, str>;
/// Names a request's principal.
pub type PrincipalOf = fn(&Parts) -> Option<String>;

fn path_of(parts: &Parts) -> Cow<'_, str> {
    Cow::Borrowed(parts.uri.path())
}

/// The principal as the gateway passes it (`x-user-id`), else the mutual
/// TLS peer.
pub fn default_principal(parts: &Parts) -> Option<String> {
    if let Some(user) = parts.headers.get("x-user-id").and_then(|v| v.to_str().ok()) {
        return Some(format!("user:{user}"));
    }
    parts
        .extensions
        .get::<trellis_core::PeerIdentity>()
        .map(|p| format!("peer:{}", p.name()))
}

struct Shared {
    store: Arc<dyn Store>,
    namespace: String,
    routes: HashMap<String, Mode>,
    ttl: Duration,
    lease: Duration,
    wait: Option<Duration>,
    max_body: usize,
    route_of: RouteOf,
    principal_of: PrincipalOf,
}

/// The idempotency layer (see the module docs).
#[derive(Clone)]
pub struct IdempotencyLayer {
    shared: Arc<Shared>,
}

impl IdempotencyLayer {
    /// The layer for `namespace` (the service's name: keys of services
    /// sharing a store stay apart) over `store`, as `settings` say.
    pub fn new(namespace: &str, store: Arc<dyn Store>, settings: &IdempotencySettings) -> Self {
        let mut routes = HashMap::new();
        for route in &settings.routes {
            routes.insert(route.clone(), Mode::Key);
        }
        for route in &settings.fingerprint_routes {
            routes.insert(route.clone(), Mode::Fingerprint);
        }
        IdempotencyLayer {
            shared: Arc::new(Shared {
                store,
                namespace: namespace.to_owned(),
                routes,
                ttl: settings.ttl,
                lease: settings.lease,
                wait: match settings.in_flight {
                    InFlight::Wait if !settings.wait.is_zero() => Some(settings.wait),
                    _ => None,
                },
                max_body: settings.max_body_bytes,
                route_of: path_of,
                principal_of: default_principal,
            }),
        }
    }

    /// Names routes with `route_of` (default: the path).
    pub fn route_with(mut self, route_of: RouteOf) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.route_of = route_of;
        }
        self
    }

    /// Names principals with `principal_of` (default: [`default_principal`]).
    pub fn principal_with(mut self, principal_of: PrincipalOf) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.principal_of = principal_of;
        }
        self
    }
}

impl<S> tower::Layer<S> for IdempotencyLayer {
    type Service = Idempotent<S>;

    fn layer(&self, inner: S) -> Idempotent<S> {
        Idempotent {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The idempotency service (see [`IdempotencyLayer`]).
#[derive(Clone)]
pub struct Idempotent<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B, RB> tower::Service<Request<B>> for Idempotent<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    B::Error: Into<trellis_core::BoxError>,
    RB: Body<Data = Bytes> + Send + Unpin + 'static,
    RB::Error: Into<trellis_core::BoxError>,
{
    type Response = Response<Replayable<RB>>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let (parts, body) = request.into_parts();
        let route = (shared.route_of)(&parts).into_owned();
        let Some(&mode) = shared.routes.get(&route) else {
            return Box::pin(async move {
                let response = inner.call(Request::from_parts(parts, body)).await?;
                Ok(response.map(Replayable::pass))
            });
        };
        Box::pin(async move {
            Ok(
                match handle(&shared, &mut inner, mode, route, parts, body).await {
                    Ok(response) => response,
                    Err(refusal) => refusal,
                },
            )
        })
    }
}

/// Counts an outcome (a bounded set of names).
fn count(outcome: &'static str) {
    metrics::counter!("idempotency_requests_total", "outcome" => outcome).increment(1);
}

type Answer<RB> = Response<Replayable<RB>>;

fn refuse<RB>(grpc: bool, error: &Error) -> Answer<RB> {
    let response: Response<Bytes> = if grpc {
        tonic::Status::from(error.clone())
            .into_http::<tonic::body::Body>()
            .map(|_| Bytes::new())
    } else {
        error.to_http_response::<Bytes>()
    };
    response.map(|body| Replayable::full(body, None))
}

async fn handle<S, B, RB>(
    shared: &Shared,
    inner: &mut S,
    mode: Mode,
    route: String,
    parts: Parts,
    body: B,
) -> Result<Answer<RB>, Answer<RB>>
where
    S: tower::Service<Request<B>, Response = Response<RB>, Error = Infallible>,
    B: Body<Data = Bytes> + From<Bytes>,
    B::Error: Into<trellis_core::BoxError>,
    RB: Body<Data = Bytes> + Send + Unpin + 'static,
    RB::Error: Into<trellis_core::BoxError>,
{
    let grpc = protocol::is_grpc(&parts.headers);
    let key = match parts.headers.get(KEY_HEADER) {
        Some(value) => Some(parse_key(value).map_err(|e| refuse(grpc, &e))?),
        None => None,
    };
    if key.is_none() && mode == Mode::Key {
        count("no_key");
        return Ok(inner
            .call(Request::from_parts(parts, body))
            .await
            .map(|r| r.map(Replayable::pass))
            .unwrap_or_else(|e| match e {}));
    }
    let bytes =
        match http_body_util::BodyExt::collect(http_body_util::Limited::new(body, shared.max_body))
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                let too_large = e.is::<http_body_util::LengthLimitError>();
                let error = if too_large {
                    Error::new(
                        Code::InvalidArgument,
                        "IDEMPOTENT_BODY_TOO_LARGE",
                        format!(
                            "an idempotent request's body is at most {} bytes",
                            shared.max_body
                        ),
                    )
                    .with_http_status(StatusCode::PAYLOAD_TOO_LARGE)
                } else {
                    Error::new(
                        Code::InvalidArgument,
                        "BODY_READ_FAILED",
                        format!("reading the request body: {e}"),
                    )
                };
                return Err(refuse(grpc, &error));
            }
        };
    let fingerprint = fingerprint(parts.method.as_str(), &route, &parts.headers, &bytes);
    let principal = (shared.principal_of)(&parts).unwrap_or_default();
    let store_key = match &key {
        Some(key) => digest(&[principal.as_bytes(), b"key", key.as_bytes()]),
        None => digest(&[principal.as_bytes(), b"fingerprint", fingerprint.as_bytes()]),
    };
    let store_key = format!("{}:{store_key}", shared.namespace);
    let owner = uuid::Uuid::new_v4().to_string();
    let unavailable = |e: StoreError| {
        count("store_error");
        tracing::warn!(error = %e, "idempotency store unavailable: request refused");
        refuse(grpc, &Error::unavailable(e.to_string()))
    };
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        match shared
            .store
            .begin(&store_key, &fingerprint, &owner, shared.lease)
            .await
            .map_err(unavailable)?
        {
            Begin::Started => break,
            Begin::Done {
                fingerprint: stored,
                record,
            } => {
                if stored != fingerprint {
                    return Err(reused(grpc));
                }
                count("replayed");
                return Ok(replay(record));
            }
            Begin::InProgress {
                fingerprint: stored,
            } => {
                if stored != fingerprint {
                    return Err(reused(grpc));
                }
                let waited = started.elapsed();
                match shared.wait {
                    Some(wait) if waited < wait => {
                        tokio::time::sleep(pause.min(wait - waited)).await;
                        pause = (pause * 2).min(Duration::from_millis(50));
                    }
                    _ => {
                        count("conflict");
                        return Err(refuse(
                            grpc,
                            &Error::new(
                                Code::Aborted,
                                "IDEMPOTENCY_KEY_IN_USE",
                                "a request with this idempotency key is still in progress",
                            )
                            .with_http_status(StatusCode::CONFLICT)
                            .with_retry_after(Duration::from_secs(1)),
                        ));
                    }
                }
            }
        }
    }
    // This caller runs it; the key is freed if it stops before the answer
    // is stored (a dropped connection, a panic, a retryable answer).
    let mut guard = Abandon {
        store: Some(shared.store.clone()),
        key: store_key.clone(),
        owner: owner.clone(),
    };
    let response = inner
        .call(Request::from_parts(parts, B::from(bytes)))
        .await
        .unwrap_or_else(|e| match e {});
    let (head, body) = response.into_parts();
    let collected = body::collect(body, shared.max_body).await;
    let (data, trailers, rest) = match collected {
        body::Collected::Whole { data, trailers } => (data, trailers, None),
        body::Collected::TooLarge { prefix, rest } => (prefix, None, Some(rest)),
        body::Collected::Failed(e) => {
            count("failed");
            tracing::warn!(error = %e, "answer body failed: not recorded");
            return Err(refuse(
                grpc,
                &Error::internal("the answer failed while it was read"),
            ));
        }
    };
    if let Some(rest) = rest {
        count("too_large");
        tracing::warn!(
            max = shared.max_body,
            "answer larger than idempotency.max_body_bytes: not recorded"
        );
        return Ok(Response::from_parts(head, Replayable::partial(data, rest)));
    }
    if retryable(head.status, &head.headers, trailers.as_ref()) {
        count("not_stored");
        return Ok(Response::from_parts(head, Replayable::full(data, trailers)));
    }
    let record = Record {
        status: head.status.as_u16(),
        headers: pairs(&head.headers),
        body: data.clone(),
        trailers: trailers.as_ref().map(pairs).unwrap_or_default(),
    };
    match shared
        .store
        .complete(&store_key, &owner, &record, shared.ttl)
        .await
    {
        Ok(true) => {
            guard.store = None;
            count("executed");
        }
        Ok(false) => {
            guard.store = None;
            count("lease_lost");
            tracing::warn!("idempotency lease ran out before the answer: not recorded");
        }
        Err(e) => {
            count("store_error");
            tracing::warn!(error = %e, "answer not recorded");
        }
    }
    Ok(Response::from_parts(head, Replayable::full(data, trailers)))
}

fn reused<RB>(grpc: bool) -> Answer<RB> {
    count("mismatch");
    refuse(
        grpc,
        &Error::new(
            Code::InvalidArgument,
            "IDEMPOTENCY_KEY_REUSED",
            "this idempotency key was used for a different request",
        )
        .with_http_status(StatusCode::UNPROCESSABLE_ENTITY),
    )
}

fn parse_key(value: &HeaderValue) -> Result<String, Error> {
    let bad = || {
        Error::invalid_argument(
            KEY_HEADER,
            format!("1 to {MAX_KEY_BYTES} printable ASCII characters, optionally quoted"),
        )
    };
    let text = value.to_str().map_err(|_| bad())?.trim();
    // A structured-field string ("…") or a bare token.
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    if text.is_empty()
        || text.len() > MAX_KEY_BYTES
        || !text.bytes().all(|b| (0x20..0x7f).contains(&b))
    {
        return Err(bad());
    }
    Ok(text.to_owned())
}

/// Whether the answer asks to be retried: not stored as final.
fn retryable(status: StatusCode, headers: &HeaderMap, trailers: Option<&HeaderMap>) -> bool {
    if status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        return true;
    }
    let code = protocol::grpc_status(headers).or_else(|| trailers.and_then(protocol::grpc_status));
    matches!(
        code,
        Some(
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::ResourceExhausted
                | Code::Aborted
                | Code::Internal
                | Code::Unknown
                | Code::Cancelled
                | Code::DataLoss
        )
    )
}

fn pairs(headers: &HeaderMap) -> Vec<(String, Bytes)> {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}

fn header_map(pairs: &[(String, Bytes)]) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(pairs.len());
    for (name, value) in pairs {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_maybe_shared(value.clone()),
        ) {
            map.append(name, value);
        }
    }
    map
}

fn replay<RB>(record: Record) -> Answer<RB> {
    let mut response = Response::new(Replayable::full(
        record.body,
        (!record.trailers.is_empty()).then(|| header_map(&record.trailers)),
    ));
    *response.status_mut() = StatusCode::from_u16(record.status).unwrap_or(StatusCode::OK);
    *response.headers_mut() = header_map(&record.headers);
    response
        .headers_mut()
        .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    response
}

/// Frees the key on drop unless the answer was stored.
struct Abandon {
    store: Option<Arc<dyn Store>>,
    key: String,
    owner: String,
}

impl Drop for Abandon {
    fn drop(&mut self) {
        let Some(store) = self.store.take() else {
            return;
        };
        let (key, owner) = (
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.owner),
        );
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(e) = store.abandon(&key, &owner).await {
                    tracing::warn!(error = %e, "idempotency key not freed: it expires with its lease");
                }
            });
        }
    }
}

/// A [`Record`] as bytes (the SQL and Redis stores keep it so).
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis", test))]
pub(crate) fn encode(record: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(record.body.len() + 256);
    out.extend_from_slice(&record.status.to_be_bytes());
    for list in [&record.headers, &record.trailers] {
        out.extend_from_slice(&(list.len() as u32).to_be_bytes());
        for (name, value) in list {
            out.extend_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value);
        }
    }
    out.extend_from_slice(&record.body);
    out
}

/// [`encode`]'s inverse; `None` for bytes it did not write.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis", test))]
pub(crate) fn decode(bytes: &[u8]) -> Option<Record> {
    fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if input.len() < n {
            return None;
        }
        let (head, rest) = input.split_at(n);
        *input = rest;
        Some(head)
    }
    fn u32_of(input: &mut &[u8]) -> Option<usize> {
        let raw: [u8; 4] = take(input, 4)?.try_into().ok()?;
        Some(u32::from_be_bytes(raw) as usize)
    }
    let mut input = bytes;
    let status = u16::from_be_bytes(take(&mut input, 2)?.try_into().ok()?);
    let mut lists = [Vec::new(), Vec::new()];
    for list in &mut lists {
        let n = u32_of(&mut input)?;
        if n > 10_000 {
            return None;
        }
        for _ in 0..n {
            let len = u32_of(&mut input)?;
            let name = std::str::from_utf8(take(&mut input, len)?).ok()?.to_owned();
            let len = u32_of(&mut input)?;
            let value = Bytes::copy_from_slice(take(&mut input, len)?);
            list.push((name, value));
        }
    }
    let [headers, trailers] = lists;
    Some(Record {
        status,
        headers,
        body: Bytes::copy_from_slice(input),
        trailers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let record = Record {
            status: 201,
            headers: vec![(
                "content-type".into(),
                Bytes::from_static(b"application/json"),
            )],
            body: Bytes::from_static(b"{\"id\":\"1\"}"),
            trailers: vec![("grpc-status".into(), Bytes::from_static(b"0"))],
        };
        assert_eq!(decode(&encode(&record)), Some(record.clone()));
        let bytes = encode(&record);
        assert_eq!(decode(&bytes[..5]), None);
        assert_eq!(decode(&[0, 200, 255, 255, 255, 255]), None);
    }

    #[test]
    fn json_bodies_compare_in_canonical_form() {
        let mut json = HeaderMap::new();
        json.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let a = fingerprint(
            "POST",
            "/v1/orders",
            &json,
            br#"{"b":1,"a":[{"y":2,"x":1}]}"#,
        );
        let b = fingerprint(
            "POST",
            "/v1/orders",
            &json,
            br#" { "a" : [ {"x":1, "y":2} ], "b":1 } "#,
        );
        let c = fingerprint(
            "POST",
            "/v1/orders",
            &json,
            br#"{"b":2,"a":[{"y":2,"x":1}]}"#,
        );
        let d = fingerprint(
            "POST",
            "/v1/other",
            &json,
            br#"{"b":1,"a":[{"y":2,"x":1}]}"#,
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn keys_are_checked() {
        let ok = |v: &'static str| parse_key(&HeaderValue::from_static(v)).map_err(|_| ());
        assert_eq!(ok("abc-1"), Ok("abc-1".into()));
        assert_eq!(ok("\"8e03978e-40d5\""), Ok("8e03978e-40d5".into()));
        assert!(ok("\"\"").is_err());
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(parse_key(&HeaderValue::from_str(&long).unwrap()).is_err());
    }

    #[test]
    fn answers_that_ask_for_a_retry_are_not_final() {
        let none = HeaderMap::new();
        assert!(retryable(StatusCode::SERVICE_UNAVAILABLE, &none, None));
        assert!(retryable(StatusCode::TOO_MANY_REQUESTS, &none, None));
        assert!(!retryable(StatusCode::CREATED, &none, None));
        assert!(!retryable(StatusCode::CONFLICT, &none, None));
        let mut unavailable = HeaderMap::new();
        unavailable.insert("grpc-status", HeaderValue::from_static("14"));
        assert!(retryable(StatusCode::OK, &none, Some(&unavailable)));
        let mut not_found = HeaderMap::new();
        not_found.insert("grpc-status", HeaderValue::from_static("5"));
        assert!(!retryable(StatusCode::OK, &not_found, None));
    }
}
