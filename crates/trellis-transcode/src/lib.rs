//! REST/JSON for gRPC services, from their `google.api.http` annotations.
//!
//! A [`Transcoder`] is built once from file descriptor sets (as protox
//! writes them). [`Transcoder::service`] wraps any gRPC service — a
//! server's own routes in process, a tonic channel to a remote upstream, a
//! balanced channel — in a tower service that takes REST requests: it
//! matches the path template, builds the request message from path
//! variables, the body and the query string (the proto3 JSON mapping,
//! through `prost-reflect`), checks it against the proto's rules, calls the
//! gRPC service with a real gRPC request, and answers with the response
//! message as JSON — written straight from the wire bytes by a plan
//! compiled per response type, byte for byte what `prost-reflect` writes —
//! or the error in Trellis' error model. Server-streaming
//! methods answer as Server-Sent Events (or newline-delimited JSON when the
//! client accepts `application/x-ndjson`). Every method is also reachable at
//! `POST /{package.Service}/{Method}` with the request message as the body.
//!
//! The pieces stand alone too:
//!
//! | piece | what it is for |
//! |---|---|
//! | [`RouteTable`] | a segment trie over path templates, generic over what a route carries (the gateway routes with it) |
//! | [`RouteMatchLayer`] | matches first and puts the [`MatchedRoute`] (template, RPC, variables) and a [`trellis_core::RouteTemplate`] in the request, for the layers before the handler |
//! | [`validate`] | `field_behavior` and `buf.validate` rules, checked on REST and gRPC requests alike |
//! | [`openapi`] | the OpenAPI 3.1 document of the routes, with the proto comments |
//! | [`annotations`] | the one reader of those annotations, which all of the above share |
//! | [`framing`] | the gRPC message framing every reader here uses |
//!
//! ```no_run
//! # async fn run(fds: &'static [u8]) -> Result<(), Box<dyn std::error::Error>> {
//! use tower::ServiceExt;
//! use trellis_transcode::Transcoder;
//!
//! let transcoder = Transcoder::new(&[fds], &["shop.user.v1.UserService"])?;
//! for b in transcoder.bindings() {
//!     println!("{} {} -> {}", b.method, b.template, b.rpc.full_name());
//! }
//! // In front of a remote gRPC upstream:
//! let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:8082").connect_lazy();
//! let upstream = channel.map_request(|r: http::Request<trellis_transcode::UpstreamBody>| {
//!     r.map(tonic::body::Body::new)
//! });
//! let rest = transcoder.service(upstream);
//! let request = http::Request::get("/v1/users/42").body(http_body_util::Empty::<bytes::Bytes>::new())?;
//! let response = rest.oneshot(request).await?;
//! println!("{}", response.status());
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod annotations;
pub mod framing;
mod json;
mod openapi;
mod request;
mod response;
mod routes;
mod service;
mod stream;
mod template;
pub mod validate;

use bytes::Bytes;
use tower::BoxError;

pub use openapi::openapi;
pub use routes::{DuplicateRoute, Found, Lookup, RouteTable};
pub use service::{
    Binding, MatchedRoute, RouteMatch, RouteMatchLayer, RouteMiss, TranscodeError,
    TranscodeOptions, TranscodeService, Transcoder, grpc_methods,
};
pub use template::{PathTemplate, PathVars, TemplateError};

/// The body of the transcoder's answers (and of the requests validation
/// passes on): any HTTP body, boxed.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// The body of the gRPC requests the transcoder makes: one framed message.
pub type UpstreamBody = http_body_util::Full<Bytes>;

/// The descriptors of a test proto under `tests/proto` (imports included).
#[cfg(test)]
pub(crate) fn test_pool(file: &str) -> prost_reflect::DescriptorPool {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut compiler = protox::Compiler::new([root.join("tests/proto"), root.join("../../proto")])
        .expect("include paths");
    compiler
        .include_imports(true)
        .open_files([file])
        .unwrap_or_else(|e| panic!("{file} compiles: {e}"));
    prost_reflect::DescriptorPool::decode(compiler.encode_file_descriptor_set().as_slice())
        .expect("descriptor set decodes")
}

/// `bytes` as a [`Body`].
pub(crate) fn full(bytes: Bytes) -> Body {
    Body::new(http_body_util::BodyExt::map_err(
        http_body_util::Full::new(bytes),
        |never| match never {},
    ))
}
