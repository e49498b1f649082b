//! The contract between an `App` and the servers it runs.

use std::{future::Future, net::SocketAddr, pin::Pin, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::State;

/// A boxed error from a server, for the `App` to report.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The future a [`Server`] returns from [`Server::serve`].
pub type ServerFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'static>>;

/// Something an `App` runs for the life of the instance: a gRPC/HTTP
/// listener, an admin listener, a background consumer.
///
/// A server is bound before it is handed to the app (so a taken port fails
/// before anything starts), then [`serve`](Server::serve)d until the app
/// cancels its [`Drain`].
pub trait Server: Send + 'static {
    /// A short description for logs, e.g. `grpc+http 127.0.0.1:8082`.
    fn describe(&self) -> String;

    /// What this server offers to clients, by protocol (`grpc`, `http`), for
    /// registration. Servers that clients do not call (admin, consumers)
    /// return nothing, the default.
    fn endpoints(&self) -> Vec<(String, SocketAddr)> {
        Vec::new()
    }

    /// Serves until `drain` is cancelled, then stops accepting, lets in-flight
    /// work finish within [`Drain::grace`], and returns.
    ///
    /// `lifecycle` lets the server follow the instance (health reports).
    fn serve(self: Box<Self>, lifecycle: watch::Receiver<State>, drain: Drain) -> ServerFuture;
}

/// The app's instruction to stop, and how long in-flight work may take.
#[derive(Debug, Clone)]
pub struct Drain {
    token: CancellationToken,
    grace: Duration,
}

impl Drain {
    /// A drain signal with a grace period for in-flight work.
    pub fn new(token: CancellationToken, grace: Duration) -> Self {
        Drain { token, grace }
    }

    /// Resolves once the app asks servers to stop accepting and drain.
    pub async fn started(&self) {
        self.token.cancelled().await
    }

    /// Whether draining has begun.
    pub fn is_started(&self) -> bool {
        self.token.is_cancelled()
    }

    /// How long in-flight work may take once draining has begun.
    pub fn grace(&self) -> Duration {
        self.grace
    }
}
