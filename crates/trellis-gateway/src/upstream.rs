//! Upstreams: each a [`Balanced`] pool (the generic balancer, with its
//! outlier ejection) over endpoint services, each with one connection pool
//! that every worker thread shares (Pingora's finding: a shared pool
//! reuses more than per-worker pools). HTTP/1.1 connections are kept alive
//! and reused once a response has ended; HTTP/2 connections multiplex.
//! Discovered services follow the registry; static targets are a fixed
//! instance set. A reload keeps every upstream whose settings did not
//! change — its pool, outlier state and connections.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderValue, Request, Response, Uri, header,
    uri::{Authority, PathAndQuery},
};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpStream, sync::watch};
use tower::{BoxError, Service};
use trellis_balance::{BalanceConfig, Balanced, Policy};
use trellis_registry::{Instance, InstanceSet, ServiceRegistry};

use crate::{GatewayError, config::UpstreamConfig, grpc_web::RequestBody};

/// How upstream connections are kept: shared by every upstream and every
/// worker thread.
#[derive(Clone)]
pub(crate) struct Clients {
    idle_timeout: Duration,
    max_idle: usize,
    connect_timeout: Duration,
    reused: metrics::Counter,
    opened: metrics::Counter,
}

impl Clients {
    pub(crate) fn new() -> Clients {
        Clients {
            idle_timeout: Duration::from_secs(90),
            max_idle: 1024,
            connect_timeout: Duration::from_secs(5),
            reused: metrics::counter!("gateway_upstream_requests_total", "connection" => "reused"),
            opened: metrics::counter!("gateway_upstream_requests_total", "connection" => "new"),
        }
    }
}

/// The connections to one endpoint: kept-alive HTTP/1.1 connections
/// (idle ones on a stack, the most recently used first, so a few stay warm
/// and the rest time out) and one multiplexed HTTP/2 connection. One pool
/// per endpoint, shared by every worker thread: no key to hash, no map to
/// search (Pingora's finding: a shared pool reuses more than per-worker
/// pools).
pub(crate) struct EndpointPool {
    authority: Authority,
    clients: Clients,
    /// TLS to this endpoint: the connector and the name to verify.
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    idle: Mutex<Vec<(http1::SendRequest<RequestBody>, Instant)>>,
    /// Kept-alive connections for the in-task client (see [`crate::h1`]).
    raw_idle: Mutex<Vec<(crate::h1::RawConn, Instant)>>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<RequestBody>>>,
}

impl EndpointPool {
    fn new(
        authority: Authority,
        clients: Clients,
        tls: Option<(
            tokio_rustls::TlsConnector,
            rustls::pki_types::ServerName<'static>,
        )>,
    ) -> EndpointPool {
        EndpointPool {
            authority,
            clients,
            tls,
            idle: Mutex::new(Vec::new()),
            raw_idle: Mutex::new(Vec::new()),
            h2: tokio::sync::Mutex::new(None),
        }
    }

    /// A new plain TCP connection, within the connect timeout.
    async fn connect_tcp(&self) -> Result<TcpStream, BoxError> {
        let connecting = async {
            let stream = TcpStream::connect(self.authority.as_str()).await?;
            stream.set_nodelay(true)?;
            Ok::<_, BoxError>(stream)
        };
        tokio::time::timeout(self.clients.connect_timeout, connecting)
            .await
            .map_err(|_| format!("connecting to {} timed out", self.authority))?
    }

    /// An idle in-task connection that is still open and not too old.
    fn raw_checkout(&self) -> Option<crate::h1::RawConn> {
        let mut idle = self.raw_idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some((conn, since)) = idle.pop() {
            if since.elapsed() <= self.clients.idle_timeout && conn.is_open() {
                return Some(conn);
            }
        }
        None
    }

    pub(crate) fn raw_checkin(&self, conn: crate::h1::RawConn) {
        let mut idle = self.raw_idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.clients.max_idle {
            idle.push((conn, Instant::now()));
        }
    }

    /// A bodiless request on plain TCP, sent and answered from this task
    /// ([`crate::h1`]). A kept-alive connection the upstream closed without
    /// answering is replaced once for methods that may be repeated.
    async fn send_raw(
        self: Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<PoolBody>, BoxError> {
        self.origin_form(&mut req);
        let (parts, _) = req.into_parts();
        if let Some(conn) = self.raw_checkout() {
            match conn.send(&parts, self.clone()).await {
                Ok(response) => {
                    self.clients.reused.increment(1);
                    return Ok(response.map(PoolBody::Raw));
                }
                Err(e) if e.stale && parts.method.is_idempotent() => {}
                Err(e) => return Err(e.error),
            }
        }
        let conn = crate::h1::RawConn::new(self.connect_tcp().await?);
        self.clients.opened.increment(1);
        let response = conn.send(&parts, self.clone()).await.map_err(|e| e.error)?;
        Ok(response.map(PoolBody::Raw))
    }

    async fn connect(&self) -> Result<TokioIo<Conn>, BoxError> {
        let connecting = async {
            let stream = TcpStream::connect(self.authority.as_str()).await?;
            stream.set_nodelay(true)?;
            Ok::<_, BoxError>(match &self.tls {
                None => Conn::Plain(stream),
                Some((connector, name)) => {
                    Conn::Tls(Box::new(connector.connect(name.clone(), stream).await?))
                }
            })
        };
        let conn = tokio::time::timeout(self.clients.connect_timeout, connecting)
            .await
            .map_err(|_| format!("connecting to {} timed out", self.authority))??;
        Ok(TokioIo::new(conn))
    }

    /// An idle HTTP/1.1 connection that is still open and not too old.
    async fn checkout(&self) -> Option<http1::SendRequest<RequestBody>> {
        loop {
            let (mut sender, since) = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop()?;
            if since.elapsed() > self.clients.idle_timeout || sender.is_closed() {
                continue;
            }
            // Returned as soon as its response ended: the connection task
            // may still be finishing it.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn checkin(&self, sender: http1::SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.clients.max_idle {
            idle.push((sender, Instant::now()));
        }
    }

    /// An HTTP/1.1 request as it goes on the wire: origin form, the
    /// upstream's authority as `Host` unless the route kept the client's.
    fn origin_form(&self, req: &mut Request<RequestBody>) {
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(path);
        *req.version_mut() = http::Version::HTTP_11;
        if !req.headers().contains_key(header::HOST)
            && let Ok(host) = HeaderValue::from_str(self.authority.as_str())
        {
            req.headers_mut().insert(header::HOST, host);
        }
    }

    async fn send_h1(
        self: Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<PoolBody>, BoxError> {
        self.origin_form(&mut req);
        // A kept-alive connection first. One the upstream closed while it
        // sat idle refuses the request unsent: it goes on a new one.
        if let Some(mut sender) = self.checkout().await {
            match sender.try_send_request(req).await {
                Ok(response) => {
                    self.clients.reused.increment(1);
                    return Ok(self.pooled(response, sender));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        let io = self.connect().await?;
        let (mut sender, connection) = http1::handshake(io).await?;
        tokio::spawn(async move {
            // The connection's own errors reach the request that saw them.
            let _ = connection.await;
        });
        self.clients.opened.increment(1);
        let response = sender.send_request(req).await?;
        Ok(self.pooled(response, sender))
    }

    /// A request asking to switch protocols (WebSocket): always on a new
    /// HTTP/1.1 connection of its own, which the upgrade then takes over.
    async fn send_upgrade(
        self: Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<PoolBody>, BoxError> {
        self.origin_form(&mut req);
        let io = self.connect().await?;
        let (mut sender, connection) = http1::handshake(io).await?;
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        self.clients.opened.increment(1);
        let response = sender.send_request(req).await?;
        Ok(response.map(PoolBody::hyper))
    }

    /// The response, whose body puts the connection back once it ends.
    fn pooled(
        self: &Arc<Self>,
        response: Response<Incoming>,
        sender: http1::SendRequest<RequestBody>,
    ) -> Response<PoolBody> {
        response.map(|body| {
            let mut body = PoolBody::Hyper {
                body,
                back: Some((self.clone(), sender)),
            };
            body.check_end();
            body
        })
    }

    async fn send_h2(
        self: Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<PoolBody>, BoxError> {
        let uri = Uri::builder()
            .scheme(if self.tls.is_some() { "https" } else { "http" })
            .authority(self.authority.clone())
            .path_and_query(
                req.uri()
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            )
            .build()?;
        *req.uri_mut() = uri;
        *req.version_mut() = http::Version::HTTP_2;
        req.headers_mut().remove(header::HOST);
        let mut sender = {
            let mut shared = self.h2.lock().await;
            match shared.as_ref() {
                Some(sender) if !sender.is_closed() => {
                    self.clients.reused.increment(1);
                    sender.clone()
                }
                _ => {
                    let io = self.connect().await?;
                    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .keep_alive_interval(Duration::from_secs(30))
                        .handshake(io)
                        .await?;
                    tokio::spawn(async move {
                        let _ = connection.await;
                    });
                    self.clients.opened.increment(1);
                    *shared = Some(sender.clone());
                    sender
                }
            }
        };
        sender.ready().await?;
        let response = sender.send_request(req).await?;
        Ok(response.map(PoolBody::hyper))
    }
}

/// An upstream response body: hyper's (HTTP/2, bodies, TLS), which returns
/// its HTTP/1.1 connection to the pool when it ends (dropped before its
/// end, the connection closes instead), or the in-task client's.
pub enum PoolBody {
    /// From a hyper connection.
    Hyper {
        /// The body.
        body: Incoming,
        /// Where its HTTP/1.1 connection goes back.
        back: Option<(Arc<EndpointPool>, http1::SendRequest<RequestBody>)>,
    },
    /// From the in-task HTTP/1.1 client.
    Raw(crate::h1::RawBody),
}

impl PoolBody {
    fn hyper(body: Incoming) -> PoolBody {
        PoolBody::Hyper { body, back: None }
    }

    fn check_end(&mut self) {
        if let PoolBody::Hyper { body, back } = self
            && http_body::Body::is_end_stream(body)
            && let Some((pool, sender)) = back.take()
        {
            pool.checkin(sender);
        }
    }
}

impl http_body::Body for PoolBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let (body, back) = match self.get_mut() {
            PoolBody::Raw(raw) => return Pin::new(raw).poll_frame(cx),
            PoolBody::Hyper { body, back } => (body, back),
        };
        let polled = Pin::new(&mut *body).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => http_body::Body::is_end_stream(&*body),
            Poll::Ready(Some(Err(_))) => {
                // A broken body: the connection is not reused.
                back.take();
                false
            }
            Poll::Pending => false,
        };
        if ended && let Some((pool, sender)) = back.take() {
            pool.checkin(sender);
        }
        polled.map(|frame| frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        match self {
            PoolBody::Hyper { body, .. } => body.is_end_stream(),
            PoolBody::Raw(raw) => raw.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            PoolBody::Hyper { body, .. } => body.size_hint(),
            PoolBody::Raw(raw) => raw.size_hint(),
        }
    }
}

/// Talks to one endpoint through its pool: HTTP/1.1, or HTTP/2 for h2c
/// upstreams and gRPC requests.
#[derive(Clone)]
pub(crate) struct EndpointClient {
    pool: Arc<EndpointPool>,
    h2c: bool,
}

impl Service<Request<RequestBody>> for EndpointClient {
    type Response = Response<PoolBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<PoolBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        let pool = self.pool.clone();
        if req.headers().contains_key(header::UPGRADE) {
            Box::pin(pool.send_upgrade(req))
        } else if self.h2c || trellis_core::protocol::is_grpc(req.headers()) {
            Box::pin(pool.send_h2(req))
        } else if pool.tls.is_none() && http_body::Body::is_end_stream(req.body()) {
            Box::pin(pool.send_raw(req))
        } else {
            Box::pin(pool.send_h1(req))
        }
    }
}

/// A connector trusting `tls.ca_file` (the system's roots without one),
/// presenting `tls.cert_file` when set (mutual TLS), offering `h2` (for
/// h2c/gRPC upstreams) or `http/1.1` by ALPN.
pub(crate) fn tls_connector(
    tls: &crate::config::UpstreamTlsConfig,
    h2: bool,
) -> Result<tokio_rustls::TlsConnector, String> {
    let alpn = if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    };
    if tls.cert_file.is_some() != tls.key_file.is_some() {
        return Err("cert_file and key_file come together".to_owned());
    }
    trellis_transport::tls::client_config_with(
        tls.ca_file.as_deref(),
        tls.cert_file.as_deref().zip(tls.key_file.as_deref()),
        vec![alpn],
    )
    .map(tokio_rustls::TlsConnector::from)
    .map_err(|e| e.to_string())
}

/// A connection to an endpoint, plain or TLS.
pub(crate) enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An upstream's pool taking gRPC requests the gateway makes itself, their
/// bodies buffered: the transcoder's (one message), server reflection's.
#[derive(Clone)]
pub(crate) struct GrpcCalls(pub(crate) Balanced<EndpointClient>);

impl<B> Service<Request<B>> for GrpcCalls
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<trellis_balance::BalancedBody<PoolBody>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let mut pool = self.0.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let bytes = http_body_util::BodyExt::collect(body)
                .await
                .map_err(Into::into)?
                .to_bytes();
            pool.call(Request::from_parts(parts, RequestBody::bytes(bytes)))
                .await
        })
    }
}

/// An upstream: its settings and its pool.
pub(crate) struct Upstream {
    config: UpstreamConfig,
    pub(crate) pool: Balanced<EndpointClient>,
    /// Its RED series, made once (the upstream's name is a bounded label).
    pub(crate) red: UpstreamRed,
    /// Stops the health checks with the upstream.
    _checks: Option<tokio_util::sync::DropGuard>,
}

/// `gateway_upstream_responses_total{upstream, class}` (`2xx` … `5xx`, or
/// `error` when no answer came) and `gateway_upstream_duration_seconds
/// {upstream}` (sent to response head, every attempt), as handles.
pub(crate) struct UpstreamRed {
    classes: [metrics::Counter; 6],
    duration: metrics::Histogram,
}

impl UpstreamRed {
    fn new(name: &str) -> UpstreamRed {
        let class = |c: &'static str| metrics::counter!("gateway_upstream_responses_total", "upstream" => name.to_owned(), "class" => c);
        UpstreamRed {
            classes: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
                class("error"),
            ],
            duration: metrics::histogram!("gateway_upstream_duration_seconds", "upstream" => name.to_owned()),
        }
    }

    /// One attempt: its status (`None`: no answer) and how long it took.
    pub(crate) fn record(&self, status: Option<http::StatusCode>, took: Duration) {
        let class = status.map_or(5, |s| usize::from(s.as_u16() / 100).clamp(1, 5) - 1);
        self.classes[class].increment(1);
        self.duration.record(took.as_secs_f64());
    }
}

/// Every upstream of a document, by name.
#[derive(Default)]
pub(crate) struct Upstreams {
    by_name: HashMap<String, Arc<Upstream>>,
}

impl Upstreams {
    /// The upstreams `configs` names, reusing those of `previous` whose
    /// settings are the same.
    pub(crate) async fn build(
        configs: &std::collections::BTreeMap<String, UpstreamConfig>,
        previous: Option<&Upstreams>,
        clients: &Clients,
        registry: Option<&Arc<dyn ServiceRegistry>>,
    ) -> Result<Upstreams, GatewayError> {
        let mut by_name = HashMap::with_capacity(configs.len());
        for (name, config) in configs {
            if let Some(old) = previous.and_then(|p| p.by_name.get(name))
                && old.config == *config
            {
                by_name.insert(name.clone(), old.clone());
                continue;
            }
            let upstream = Upstream::new(name, config, clients, registry).await?;
            by_name.insert(name.clone(), Arc::new(upstream));
        }
        Ok(Upstreams { by_name })
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.by_name.get(name)
    }

    /// Every upstream with its endpoints' state, for the admin view.
    pub(crate) fn describe(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        let mut names: Vec<&String> = self.by_name.keys().collect();
        names.sort();
        for name in names {
            let upstream = &self.by_name[name];
            let endpoints: Vec<serde_json::Value> = upstream
                .pool
                .endpoints()
                .iter()
                .map(|e| {
                    serde_json::json!({
                        "address": e.address(),
                        "weight": e.weight(),
                        "zone": e.zone(),
                        "in_flight": e.in_flight(),
                        "requests": e.requests(),
                        "latency_ms": e.latency_ns() / 1e6,
                        "ejected": e.is_ejected(),
                    })
                })
                .collect();
            out.insert(
                name.clone(),
                serde_json::json!({
                    "discover": upstream.config.discover,
                    "balance": upstream.pool.policy_name(),
                    "endpoints": endpoints,
                }),
            );
        }
        serde_json::Value::Object(out)
    }
}

impl Upstream {
    async fn new(
        name: &str,
        config: &UpstreamConfig,
        clients: &Clients,
        registry: Option<&Arc<dyn ServiceRegistry>>,
    ) -> Result<Upstream, GatewayError> {
        let h2c = config.h2c;
        let mut clients = clients.clone();
        if let Some(timeout) = config.connect_timeout {
            clients.connect_timeout = timeout;
        }
        // `https://` targets without `tls` trust the system's roots.
        let implied = (config.tls.is_none()
            && config.targets.iter().any(|t| t.url.starts_with("https://")))
        .then(crate::config::UpstreamTlsConfig::default);
        let tls = match config.tls.as_ref().or(implied.as_ref()) {
            Some(t) => Some((
                tls_connector(t, h2c)
                    .map_err(|e| GatewayError::Config(format!("upstreams.{name}.tls: {e}")))?,
                t.server_name.clone(),
            )),
            None => None,
        };
        let connect = move |endpoint: &trellis_balance::Endpoint| {
            let authority: Authority = endpoint.address().parse()?;
            let tls = match &tls {
                Some((connector, name)) => {
                    let name = name.clone().unwrap_or_else(|| authority.host().to_owned());
                    let name = rustls::pki_types::ServerName::try_from(name)?;
                    Some((connector.clone(), name))
                }
                None => None,
            };
            Ok::<_, BoxError>(EndpointClient {
                pool: Arc::new(EndpointPool::new(authority, clients.clone(), tls)),
                h2c,
            })
        };
        let mut balance = BalanceConfig {
            protocol: config.endpoint.clone().unwrap_or_else(|| "http".into()),
            ..BalanceConfig::default()
        };
        let (source, protocol) = match &config.discover {
            Some(service) => {
                if let Some(b) = &config.balance {
                    balance.policy = policy(b).map_err(GatewayError::Config)?;
                }
                let registry = registry.ok_or_else(|| {
                    GatewayError::Config(format!(
                        "upstreams.{name}.discover: no registry (start the gateway with --registry)"
                    ))
                })?;
                let rx = registry
                    .watch(service)
                    .await
                    .map_err(|e| GatewayError::Registry(e.to_string()))?;
                (rx, balance.protocol.clone())
            }
            None => {
                balance.policy = match &config.balance {
                    Some(b) => policy(b).map_err(GatewayError::Config)?,
                    None => Policy::SmoothWeightedRoundRobin,
                };
                balance.protocol = "http".into();
                let mut instances = Vec::with_capacity(config.targets.len());
                for (i, target) in config.targets.iter().enumerate() {
                    let authority = crate::config::parse_target(&target.url).map_err(|e| {
                        GatewayError::Config(format!("upstreams.{name}.targets.{i}.url: {e}"))
                    })?;
                    instances.push(Instance {
                        id: format!("{name}-{i}"),
                        service: name.to_owned(),
                        version: String::new(),
                        endpoints: [("http".to_owned(), authority.to_string())].into(),
                        zone: String::new(),
                        weight: target.weight,
                        metadata: Default::default(),
                    });
                }
                let set: InstanceSet = instances.into();
                let (_tx, rx) = watch::channel(set);
                (rx, "http".to_owned())
            }
        };
        // Active checks, when asked, between the source and the balancer.
        let (source, checks) = match &config.health_check {
            Some(h) => {
                let (rx, guard) = crate::health::filter(name, source, protocol, h.clone());
                (rx, Some(guard))
            }
            None => (source, None),
        };
        let pool = Balanced::from_watch(name, source, balance, connect);
        Ok(Upstream {
            config: config.clone(),
            pool,
            red: UpstreamRed::new(name),
            _checks: checks,
        })
    }
}

/// A balancing policy by its config name.
pub(crate) fn policy(name: &str) -> Result<Policy, String> {
    Ok(match name {
        "p2c_ewma" => Policy::P2cEwma,
        "round_robin" => Policy::RoundRobin,
        "weighted_round_robin" => Policy::SmoothWeightedRoundRobin,
        "least_request" => Policy::LeastRequest,
        "random" => Policy::Random,
        header if crate::config::header_name(header).is_ok() && header.contains('-') => {
            Policy::ConsistentHash {
                header: header.to_owned(),
            }
        }
        other => {
            return Err(format!(
                "{other:?}: expected p2c_ewma, round_robin, weighted_round_robin, least_request, random, or a header name (with a dash) to hash on"
            ));
        }
    })
}
