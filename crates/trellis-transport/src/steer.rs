//! Routes each request on the shared port by content type.
//!
//! gRPC requests (`content-type: application/grpc*`) go to the tonic routes,
//! everything else to the axum router. Steering by content type rather than
//! by path lets the JSON face of an RPC (`POST /pkg.Service/Method` with a
//! JSON body) live on the HTTP side under the same path as the gRPC method.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
};

use axum::body::Body;
use http::{Request, Response};
use tower::Service;
use trellis_core::RouteTemplate;

pub use trellis_core::protocol::is_grpc;

/// The per-connection service: gRPC or HTTP. It also puts the connection's
/// peer and, for a served gRPC method, its route template in the request.
#[derive(Clone)]
pub(crate) struct Steer {
    pub(crate) grpc: axum::Router,
    pub(crate) http: axum::Router,
    /// The connection's peer, set per connection.
    pub(crate) peer: Option<SocketAddr>,
    /// The served gRPC methods, by path: a request for one carries its
    /// [`RouteTemplate`] into the layers.
    pub(crate) grpc_routes: Arc<HashMap<Box<str>, RouteTemplate>>,
}

impl<B> Service<Request<B>> for Steer
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = axum::routing::future::RouteFuture<Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both routers are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if let Some(peer) = self.peer {
            req.extensions_mut().insert(trellis_core::PeerAddr(peer));
        }
        let grpc = is_grpc(req.headers());
        if grpc && let Some(route) = self.grpc_routes.get(req.uri().path()) {
            req.extensions_mut().insert(route.clone());
        }
        if grpc {
            self.grpc.call(req)
        } else {
            self.http.call(req)
        }
    }
}
