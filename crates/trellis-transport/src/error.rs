//! The transport's error type.

use std::net::SocketAddr;

/// What can go wrong setting up a server or a client.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The listen address could not be bound (taken, not local, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address we tried to bind.
        addr: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// A registered file descriptor set could not be read by the reflection service.
    #[error("invalid file descriptor set for gRPC reflection: {0}")]
    Reflection(String),
    /// The REST routes could not be built from the services' annotations.
    #[error("REST transcoding: {0}")]
    Transcode(String),
    /// The target of a client is not a valid URI.
    #[error("invalid target URI {uri:?}: {reason}")]
    InvalidUri {
        /// The URI as given.
        uri: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The client could not connect within its connect timeout.
    #[error("cannot connect to {uri}: {source}")]
    Connect {
        /// The target.
        uri: String,
        /// The underlying error.
        #[source]
        source: tonic::transport::Error,
    },
}

impl TransportError {
    /// Whether this is a bind failure because the address is already in use.
    pub fn is_addr_in_use(&self) -> bool {
        matches!(self, TransportError::Bind { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse)
    }
}
