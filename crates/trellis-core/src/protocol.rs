//! Protocol facts, decided once for every layer that needs them: whether a
//! request is gRPC, and the gRPC status a response carries (in its headers
//! for a trailers-only answer, in its trailers after a body).

use http::HeaderMap;
use tonic::Code;

/// Whether a request (or response) is gRPC, by its content type
/// (`application/grpc`, `application/grpc+proto`, `application/grpc-web`...).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The gRPC status in `headers` (response headers or trailers): `None` when
/// there is none; a value that is not a code (0 to 16) reads as UNKNOWN, as
/// the gRPC spec says a client must treat it.
pub fn grpc_status(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?;
    Some(
        std::str::from_utf8(value.as_bytes())
            .ok()
            .and_then(|s| s.parse::<i32>().ok())
            .filter(|n| (0..=16).contains(n))
            .map_or(Code::Unknown, Code::from_i32),
    )
}

/// An HTTP method as a metric label: the standard methods by name, any
/// other as `_OTHER` (the OpenTelemetry semantic conventions), so a client
/// cannot grow a label set by inventing methods.
pub fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        _ => OTHER,
    }
}

/// The label of anything outside a bounded set (an unknown method, route
/// or gRPC method).
pub const OTHER: &str = "_OTHER";

/// A gRPC code as a metric label (`"0"` to `"16"`).
pub fn code_label(code: Code) -> &'static str {
    const LABELS: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    LABELS.get(code as i32 as usize).copied().unwrap_or("2")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_content_types_and_statuses() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        h.insert(
            http::header::CONTENT_TYPE,
            "application/grpc+proto".parse().unwrap(),
        );
        assert!(is_grpc(&h));
        h.insert(
            http::header::CONTENT_TYPE,
            "application/json".parse().unwrap(),
        );
        assert!(!is_grpc(&h));
        assert_eq!(grpc_status(&h), None);
        for (value, code) in [
            ("0", Code::Ok),
            ("14", Code::Unavailable),
            ("99", Code::Unknown),
            ("x", Code::Unknown),
        ] {
            h.insert("grpc-status", value.parse().unwrap());
            assert_eq!(grpc_status(&h), Some(code), "{value}");
        }
    }

    #[test]
    fn labels_come_from_bounded_sets() {
        assert_eq!(method_label(&http::Method::GET), "GET");
        assert_eq!(
            method_label(&http::Method::from_bytes(b"BREW").unwrap()),
            "_OTHER"
        );
        assert_eq!(code_label(Code::Unavailable), "14");
    }
}
