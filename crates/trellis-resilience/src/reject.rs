//! How the layers answer when they refuse a request: a trailers-only gRPC
//! status for gRPC callers, the Trellis JSON error body for HTTP callers.

use http::{HeaderMap, HeaderValue, Response, StatusCode};

/// Whether a request is gRPC, by its content type.
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A refusal, rendered for the caller's protocol.
pub(crate) struct Refusal<'a> {
    /// The gRPC status code number, e.g. "8".
    pub grpc_status: &'static str,
    /// The HTTP status.
    pub http_status: StatusCode,
    /// The canonical code name for the JSON body, e.g. "RESOURCE_EXHAUSTED".
    pub code: &'static str,
    /// The stable reason, e.g. "RATE_LIMITED".
    pub reason: &'static str,
    /// The message.
    pub message: String,
    /// Extra headers (`retry-after`, `grpc-retry-pushback-ms`).
    pub headers: &'a [(&'static str, String)],
}

impl Refusal<'_> {
    /// The response for a gRPC (`grpc = true`) or HTTP caller.
    pub(crate) fn into_response<RB: Default + From<String>>(self, grpc: bool) -> Response<RB> {
        let mut response = if grpc {
            let mut r = Response::new(RB::default());
            let h = r.headers_mut();
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from_static(self.grpc_status));
            if let Ok(v) = HeaderValue::from_str(&percent_encode(&self.message)) {
                h.insert("grpc-message", v);
            }
            r
        } else {
            let body = serde_json::json!({
                "code": self.code,
                "reason": self.reason,
                "message": self.message,
                "metadata": {},
            });
            let mut r = Response::new(RB::from(body.to_string()));
            *r.status_mut() = self.http_status;
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        };
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(value) {
                response.headers_mut().insert(*name, v);
            }
        }
        response
    }
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if (0x20..0x7f).contains(&b) && b != b'%' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
