//! The vocabulary every Trellis crate shares: the [`Error`] model that both
//! transports speak, and the service [`lifecycle`].
//!
//! Nothing here does I/O. Higher crates (`trellis-transport`, the registry,
//! telemetry) follow the lifecycle and convert errors at their edges; keeping
//! both here lets them agree without depending on each other.
//!
//! ```
//! use trellis_core::{Code, Error};
//!
//! let err = Error::invalid_argument("email", "email must contain '@'");
//! assert_eq!(err.code(), Code::InvalidArgument);
//! assert_eq!(err.reason(), "INVALID_FIELD");
//! assert_eq!(err.metadata().get("field").map(String::as_str), Some("email"));
//!
//! // The same error reaches a gRPC client as a Status ...
//! let status = tonic::Status::from(err.clone());
//! assert_eq!(Error::from(status), err);
//! // ... and an HTTP client as 400 with a JSON body.
//! assert_eq!(err.http_status(), http::StatusCode::BAD_REQUEST);
//! ```

#![warn(missing_docs)]

pub mod deadline;
pub mod der;
mod error;
pub mod future;
pub mod lifecycle;
pub mod protocol;
mod secret;
mod server;
pub mod stripe;

pub use error::{
    Code, EXCERPT_CHARS, Error, ErrorBody, MAX_MESSAGE_BYTES, MAX_METADATA_BYTES,
    code_from_http_status, code_name, code_to_http_status, excerpt,
};
pub use lifecycle::{Lifecycle, State};
pub use secret::{REDACTED, Secret, redact_url};
pub use server::{BoxError, Drain, Server, ServerFuture};

/// The peer address of the connection a request arrived on; the Trellis
/// server puts it in every request's extensions (for per-IP limits, logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// Who the client proved to be with its TLS certificate (mutual TLS): the
/// certificate's first URI subject alternative name — a SPIFFE ID such as
/// `spiffe://trellis/order` — or, without one, its first DNS name. The
/// Trellis server puts it in the extensions of every request on a
/// connection whose client presented a certificate it verified.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity(pub std::sync::Arc<str>);

impl PeerIdentity {
    /// The workload in a SPIFFE ID (`order` in `spiffe://trellis/order`,
    /// `ns/order` in `spiffe://trellis/ns/order`), or the whole identity
    /// when it is not one.
    pub fn name(&self) -> &str {
        self.0
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.split_once('/'))
            .map_or(&self.0, |(_, path)| path)
    }
}

/// The route template a request matched (`/v1/users/{id}`, or a gRPC
/// method's `/package.Service/Method`): a bounded label, so metrics, rate
/// limits and traces never key on the raw path. Routers that match before
/// the layers run put it in the request's extensions; the transcoder also
/// sets it on its response.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteTemplate(pub std::sync::Arc<str>);
