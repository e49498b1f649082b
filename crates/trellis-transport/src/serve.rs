//! The serving core every Trellis server shares — the gRPC + HTTP server,
//! its admin listener, the gateway: one accept loop with the HTTP/1.1 and
//! HTTP/2 (h2c and prior knowledge) settings of [`Limits`], a cap on open
//! connections, the header-read timeout, and graceful drain.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use std::{convert::Infallible, time::Duration};
//! use trellis_core::Drain;
//! use trellis_transport::{Limits, serve::serve};
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let app = tower::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
//!     Ok::<_, Infallible>(http::Response::new(String::from("hello")))
//! });
//! let stop = tokio_util::sync::CancellationToken::new();
//! serve(listener, move |_peer| app.clone(), &Limits::default(), Drain::new(stop, Duration::from_secs(10))).await;
//! # Ok(()) }
//! ```

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore, task::JoinSet};
use tower::{BoxError, Service};
use tracing::{debug, info, warn};
use trellis_core::Drain;

use crate::Limits;

/// Serves connections accepted on `listener` until `drain` starts, each
/// with the service `make(peer)` returns.
///
/// - At most `limits.max_connections` are open at once: past it the loop
///   stops accepting (new connections wait in the kernel's backlog) until
///   one closes, so a flood cannot exhaust file descriptors or memory.
/// - With `limits.max_connections_per_client`, a client address past its
///   share is closed at once (`server_connections_refused_total`), leaving
///   the slots to the others.
/// - When the drain starts the listener closes (new connections are
///   refused from that moment), every connection is asked to finish
///   (HTTP/2 GOAWAY, HTTP/1.1 close after the response), and those still
///   open after [`Drain::grace`] are cut.
pub async fn serve<M, S, B>(listener: TcpListener, make: M, limits: &Limits, drain: Drain)
where
    M: Fn(SocketAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    serve_with(listener, make, limits, drain, None).await
}

/// [`serve`] over TLS: each connection's handshake (within the header-read
/// timeout) uses the configuration `tls` holds when it arrives, so
/// certificates can be replaced while serving; ALPN offers `h2` and
/// `http/1.1` (see [`crate::tls::server_config`]).
#[cfg(feature = "tls")]
pub async fn serve_tls<M, S, B>(
    listener: TcpListener,
    make: M,
    limits: &Limits,
    drain: Drain,
    tls: Arc<arc_swap::ArcSwap<rustls::ServerConfig>>,
) where
    M: Fn(SocketAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    serve_with(listener, make, limits, drain, Some(tls)).await
}

/// Where a listener's TLS configuration comes from, if it has one.
#[cfg(feature = "tls")]
pub(crate) type TlsSource = Option<Arc<arc_swap::ArcSwap<rustls::ServerConfig>>>;
/// Where a listener's TLS configuration comes from: nowhere, without the
/// `tls` feature.
#[cfg(not(feature = "tls"))]
pub(crate) type TlsSource = Option<std::convert::Infallible>;

/// [`serve`], or [`serve_tls`] when `tls` holds a configuration.
pub(crate) async fn serve_with<M, S, B>(
    listener: TcpListener,
    make: M,
    limits: &Limits,
    drain: Drain,
    tls: TlsSource,
) where
    M: Fn(SocketAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let addr = listener
        .local_addr()
        .map_or_else(|_| "an unbound address".to_owned(), |a| a.to_string());
    let builder = connection_builder(limits);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut connections = JoinSet::new();
    #[cfg_attr(not(feature = "tls"), allow(unused_variables))]
    let handshake_timeout = limits.header_read_timeout;
    let per_client = limits.max_connections_per_client.map(PerClient::new);
    loop {
        // A free slot first: at the cap, stop accepting until one closes.
        let slot = tokio::select! {
            biased;
            _ = drain.started() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            biased;
            _ = drain.started() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(%addr, error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // The client's share: its guard lives as long as the connection.
        let share = match &per_client {
            Some(per_client) => match per_client.take(peer.ip()) {
                Some(share) => Some(share),
                None => {
                    metrics::counter!("server_connections_refused_total", "reason" => "per_client")
                        .increment(1);
                    debug!(%peer, "over the connections allowed per client; closed");
                    drop(stream);
                    continue;
                }
            },
            None => None,
        };
        let slot = (slot, share);
        if let Err(err) = stream.set_nodelay(true) {
            debug!(%peer, error = %err, "cannot set TCP_NODELAY");
        }
        let service = make(peer);
        match &tls {
            None => {
                let service = TowerToHyperService::new(service);
                let connection = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                let connection = graceful.watch(connection);
                connections.spawn(async move {
                    if let Err(err) = connection.await {
                        debug!(%peer, error = %err, "connection closed with an error");
                    }
                    drop(slot);
                });
            }
            #[cfg(feature = "tls")]
            Some(config) => {
                // The handshake runs in the connection's task, bounded like
                // a slow request head, so a slow client holds only its slot.
                let acceptor = tokio_rustls::TlsAcceptor::from(config.load_full());
                let builder = builder.clone();
                let watcher = graceful.watcher();
                connections.spawn(async move {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            // The client's verified certificate, if it sent
                            // one: its identity goes with every request.
                            let identity = tls_stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|chain| chain.first())
                                .and_then(|leaf| crate::tls::peer_identity(leaf));
                            let service = TowerToHyperService::new(WithIdentity {
                                inner: service,
                                identity,
                            });
                            let connection = builder
                                .serve_connection_with_upgrades(TokioIo::new(tls_stream), service)
                                .into_owned();
                            if let Err(err) = watcher.watch(connection).await {
                                debug!(%peer, error = %err, "connection closed with an error");
                            }
                        }
                        Ok(Err(err)) => debug!(%peer, error = %err, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                    drop(slot);
                });
            }
            #[cfg(not(feature = "tls"))]
            Some(never) => match *never {},
        }
    }
    drop(listener);
    info!(%addr, open_connections = connections.len(), grace = ?drain.grace(), "draining");
    if tokio::time::timeout(drain.grace(), graceful.shutdown())
        .await
        .is_err()
    {
        warn!(%addr, remaining = connections.len(), "grace period over; closing remaining connections");
        connections.abort_all();
    }
    while connections.join_next().await.is_some() {}
}

/// Puts the connection's [`trellis_core::PeerIdentity`] (mutual TLS) into
/// every request's extensions.
#[cfg(feature = "tls")]
#[derive(Clone)]
struct WithIdentity<S> {
    inner: S,
    identity: Option<trellis_core::PeerIdentity>,
}

#[cfg(feature = "tls")]
impl<S> Service<Request<Incoming>> for WithIdentity<S>
where
    S: Service<Request<Incoming>, Error = Infallible>,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        if let Some(identity) = &self.identity {
            request.extensions_mut().insert(identity.clone());
        }
        self.inner.call(request)
    }
}

/// Open connections per client address. Only addresses with a connection
/// open have an entry, so the map is bounded by `max_connections`.
struct PerClient {
    max: usize,
    open: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

/// One connection's place in its client's share; gives it back on drop.
struct Share {
    ip: std::net::IpAddr,
    open: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

impl PerClient {
    fn new(max: usize) -> PerClient {
        PerClient {
            max: max.max(1),
            open: Default::default(),
        }
    }

    fn take(&self, ip: std::net::IpAddr) -> Option<Share> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Share {
            ip,
            open: self.open.clone(),
        })
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// hyper's HTTP/1.1 and HTTP/2 settings from the limits.
fn connection_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(limits.header_read_timeout)
        // hyper refuses buffers below 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(limits.http2_keepalive_interval)
        .keep_alive_timeout(limits.http2_keepalive_timeout);
    builder
}
