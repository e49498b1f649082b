//! A hand-written gRPC service for the resilience tests: `trellis.test.Hop`
//! records the deadline it saw, waits, optionally calls the next hop, and can
//! be told to fail. Served by the real Trellis server (`GrpcHttpServer`), so
//! the server-side deadline handling is the production one.

#![allow(dead_code)]

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, body::Body, codegen::http, server::NamedService};
use trellis_core::{Drain, Lifecycle, Server, State};
use trellis_resilience::{BoxError, DeadlineLayer};
use trellis_transport::{GrpcHttpServer, ServerConfig};

#[derive(Clone, PartialEq, prost::Message)]
pub struct Call {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Reply {
    /// The remaining budget each hop saw, in microseconds (0: none).
    #[prost(uint64, repeated, tag = "1")]
    pub budgets_us: Vec<u64>,
}

type NextHop = Arc<
    tokio::sync::Mutex<
        tonic::client::Grpc<trellis_resilience::Deadline<tonic::transport::Channel>>,
    >,
>;

/// How one hop behaves.
#[derive(Clone)]
pub struct Hop {
    pub delay: Duration,
    pub failing: Arc<AtomicBool>,
    /// Fail this many more calls, then serve.
    pub fail_next: Arc<AtomicU32>,
    pub next: Option<NextHop>,
    pub seen: Arc<Mutex<Vec<Option<Duration>>>>,
    /// Handler runs that are over: answered, or dropped unanswered (a
    /// deadline cut them).
    pub ended: Arc<AtomicU32>,
}

/// Counts a handler run as ended however it ends.
struct Ended(Arc<AtomicU32>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl NamedService for Hop {
    const NAME: &'static str = "trellis.test.Hop";
}

impl tower::Service<http::Request<Body>> for Hop {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let hop = self.clone();
        Box::pin(async move {
            let mut grpc =
                tonic::server::Grpc::new(tonic_prost::ProstCodec::<Reply, Call>::default());
            Ok(grpc.unary(Handler(hop), req).await)
        })
    }
}

struct Handler(Hop);

impl tonic::server::UnaryService<Call> for Handler {
    type Response = Reply;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Reply>, Status>> + Send>>;

    fn call(&mut self, _request: Request<Call>) -> Self::Future {
        let hop = self.0.clone();
        Box::pin(async move {
            let _ended = Ended(hop.ended.clone());
            let budget = trellis_core::deadline::remaining();
            hop.seen.lock().unwrap().push(budget);
            let fail_once = hop
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if hop.failing.load(Ordering::SeqCst) || fail_once {
                return Err(Status::unavailable("hop is failing"));
            }
            tokio::time::sleep(hop.delay).await;
            let mut budgets_us = vec![budget.map_or(0, |b| b.as_micros() as u64)];
            if let Some(next) = &hop.next {
                let mut client = next.lock().await.clone();
                let reply = call(&mut client).await?;
                budgets_us.extend(reply.budgets_us);
            }
            Ok(Response::new(Reply { budgets_us }))
        })
    }
}

/// Calls a hop through any gRPC service stack.
pub async fn call<T>(client: &mut tonic::client::Grpc<T>) -> Result<Reply, Status>
where
    T: tonic::client::GrpcService<Body>,
    T::Error: Into<BoxError>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<BoxError> + Send,
{
    client
        .ready()
        .await
        .map_err(|e| Status::unknown(format!("not ready: {}", e.into())))?;
    let path = http::uri::PathAndQuery::from_static("/trellis.test.Hop/Call");
    let codec = tonic_prost::ProstCodec::<Call, Reply>::default();
    client
        .unary(Request::new(Call {}), path, codec)
        .await
        .map(Response::into_inner)
}

/// A client for the hop at `addr` with a deadline layer.
pub fn client(
    addr: SocketAddr,
    timeout: Option<Duration>,
) -> tonic::client::Grpc<trellis_resilience::Deadline<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    tonic::client::Grpc::new(tower::Layer::layer(&DeadlineLayer::new(timeout), channel))
}

/// A running hop on the Trellis server; stops when dropped.
pub struct Running {
    pub addr: SocketAddr,
    pub hop: Hop,
    stop: CancellationToken,
    _lifecycle: Lifecycle,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn serve(hop: Hop) -> Running {
    let server = GrpcHttpServer::builder(ServerConfig::default())
        .grpc_service(hop.clone())
        .bind()
        .await
        .unwrap();
    let (addr, stop, lifecycle) = start(server).await;
    Running {
        addr,
        hop,
        stop,
        _lifecycle: lifecycle,
    }
}

/// Waits (up to 10 s) until `f` holds; fails naming `what` if it never does.
pub async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after 10 s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Serves a bound server as Ready until the token is cancelled (or the
/// lifecycle dropped).
pub async fn start(server: GrpcHttpServer) -> (SocketAddr, CancellationToken, Lifecycle) {
    let addr = server.local_addr();
    let lifecycle = Lifecycle::new();
    lifecycle.advance(State::Ready);
    let stop = CancellationToken::new();
    tokio::spawn(Box::new(server).serve(
        lifecycle.subscribe(),
        Drain::new(stop.clone(), Duration::from_millis(100)),
    ));
    (addr, stop, lifecycle)
}

pub fn hop(delay: Duration, next: Option<SocketAddr>) -> Hop {
    Hop {
        delay,
        failing: Arc::new(AtomicBool::new(false)),
        fail_next: Arc::new(AtomicU32::new(0)),
        ended: Arc::new(AtomicU32::new(0)),
        // Each hop calls on with no timeout of its own: only the inherited deadline.
        next: next.map(|a| Arc::new(tokio::sync::Mutex::new(client(a, None)))),
        seen: Arc::new(Mutex::new(Vec::new())),
    }
}
