//! Server settings: where to listen and the limits that protect a server.

use std::{net::SocketAddr, time::Duration};

/// Where a [`GrpcHttpServer`](crate::GrpcHttpServer) listens, and its limits.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The address serving gRPC and HTTP. Port 0 picks a free port.
    /// Default: `127.0.0.1:0`.
    pub listen: SocketAddr,
    /// A second, HTTP-only listener for probes and the operator endpoints
    /// (`/metrics`, `/debug/config`), which are never served on the main
    /// port. Keep it on loopback or a private interface. Default: none.
    pub admin_listen: Option<SocketAddr>,
    /// Whether to serve gRPC reflection (v1 and v1alpha) for clients such
    /// as grpcurl. Default: true.
    pub reflection: bool,
    /// Limits that protect the server from large or slow peers.
    pub limits: Limits,
    /// Serve TLS on the main and admin listeners with the configuration this
    /// holds when each connection arrives (swap it to renew certificates
    /// without dropping connections); with a client verifier, mutual TLS,
    /// and each request carries the client's `PeerIdentity`. Default: none.
    #[cfg(feature = "tls")]
    pub tls: Option<std::sync::Arc<arc_swap::ArcSwap<rustls::ServerConfig>>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: None,
            reflection: true,
            limits: Limits::default(),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

/// Limits applied to every connection and request.
///
/// The defaults follow what tonic, Envoy and nginx ship with, sized for
/// ordinary RPCs; raise them per service when payloads are large.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The largest HTTP request body an extractor will read (bytes). Larger
    /// bodies get 413. gRPC messages have their own limit, set on each
    /// generated server (`max_decoding_message_size`, 4 MiB by default).
    /// Default: 4 MiB.
    pub max_body_bytes: usize,
    /// The largest request head (HTTP/1.1 buffer, HTTP/2 header list), bytes.
    /// Default: 64 KiB.
    pub max_header_bytes: usize,
    /// Concurrent HTTP/2 streams per connection. Default: 256.
    pub max_concurrent_streams: u32,
    /// Open connections per listener; past it the listener stops accepting
    /// until one closes (new connections wait in the kernel's backlog).
    /// Default: 10 000.
    pub max_connections: usize,
    /// Open connections per client address; a connection past it is closed
    /// as soon as it is accepted, so one client (a flood) cannot take every
    /// slot of `max_connections` from the others. `None`: no cap per client
    /// (right behind a load balancer, where every connection comes from a
    /// few addresses). Default: `None`.
    pub max_connections_per_client: Option<usize>,
    /// How long a request may take to produce its response head. For gRPC the
    /// smaller of this and the caller's `grpc-timeout` applies; a timed-out
    /// call gets DEADLINE_EXCEEDED (gRPC) or 504 (HTTP). `None` disables it.
    /// Default: 30 s.
    pub request_timeout: Option<Duration>,
    /// How long an HTTP/1.1 client may take to send the request head
    /// (slow-loris protection). Default: 10 s.
    pub header_read_timeout: Duration,
    /// HTTP/2 keep-alive ping interval; `None` disables pings. Default: 30 s.
    pub http2_keepalive_interval: Option<Duration>,
    /// How long to wait for a keep-alive ping's ack before closing. Default: 10 s.
    pub http2_keepalive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            max_concurrent_streams: 256,
            max_connections: 10_000,
            max_connections_per_client: None,
            request_timeout: Some(Duration::from_secs(30)),
            header_read_timeout: Duration::from_secs(10),
            http2_keepalive_interval: Some(Duration::from_secs(30)),
            http2_keepalive_timeout: Duration::from_secs(10),
        }
    }
}
