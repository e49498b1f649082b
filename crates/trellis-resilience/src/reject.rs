//! How the layers answer when they refuse a request: a trailers-only gRPC
//! status for gRPC callers, the Trellis JSON error body for HTTP callers.

use http::{HeaderValue, Response};

pub(crate) use trellis_core::protocol::is_grpc;

/// A refusal, rendered for the caller's protocol from the one error
/// model: for gRPC a trailers-only status whose details carry the reason
/// (`ErrorInfo`) and the retry hint (`RetryInfo`); for HTTP the JSON error
/// body with `Retry-After`. `headers` are added to either (e.g.
/// `grpc-retry-pushback-ms`).
pub(crate) fn refuse<RB: Default + From<String>>(
    error: trellis_core::Error,
    grpc: bool,
    headers: &[(&'static str, String)],
) -> Response<RB> {
    let mut response = error.to_response::<RB>(grpc);
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            response.headers_mut().insert(*name, v);
        }
    }
    response
}
