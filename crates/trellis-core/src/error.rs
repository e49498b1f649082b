//! One error model for both transports.
//!
//! An [`Error`] carries a gRPC [`Code`], a stable machine-readable `reason`
//! (UPPER_SNAKE, like `USER_NOT_FOUND`), a human `message` and string
//! `metadata`. It travels to gRPC clients as a `tonic::Status` whose details
//! hold a `google.rpc.Status` with a `google.rpc.ErrorInfo` (the layout
//! `tonic-types`, grpc-gateway and Kratos also read), and to HTTP clients as
//! the matching HTTP status with a JSON body `{code, reason, message,
//! metadata}`. Each conversion has its inverse, so a client sees the same
//! error whichever transport it used.

use std::{borrow::Cow, collections::BTreeMap, fmt, time::Duration};

use bytes::Bytes;
use http::StatusCode;
use prost::Message;
use serde::{Deserialize, Serialize};

pub use tonic::Code;

/// The longest message an error carries, in bytes; longer ones are cut (at
/// a character boundary, marked with `…`). Errors travel in one HTTP header
/// (`grpc-message`, percent-encoded) and again in the details trailer, so a
/// message that quotes its input must not grow with it.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// The longest metadata key or value, in bytes; cut like messages.
pub const MAX_METADATA_BYTES: usize = 256;
/// The most characters of an input [`excerpt`] quotes.
pub const EXCERPT_CHARS: usize = 64;

/// A bounded, quoted prefix of an input value for an error message:
/// `"abc"`, or `"abcd…" (4194304 bytes)` for a long one. Use it wherever a
/// message names what the caller sent.
pub fn excerpt(value: &str) -> String {
    match value.char_indices().nth(EXCERPT_CHARS) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &value[..cut], value.len()),
    }
}

/// `text` cut to at most `max` bytes at a character boundary, with `…`.
fn bounded(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max.saturating_sub('…'.len_utf8());
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// The `ErrorInfo.domain` Trellis writes; readers accept any domain.
const DOMAIN: &str = "trellis";
const ERROR_INFO_TYPE: &str = "type.googleapis.com/google.rpc.ErrorInfo";
const RETRY_INFO_TYPE: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// A typed error that both transports render the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    code: Code,
    reason: Cow<'static, str>,
    message: String,
    metadata: BTreeMap<String, String>,
    retry_after: Option<Duration>,
    http_status: Option<StatusCode>,
    challenge: Option<String>,
}

impl Error {
    /// An error with a code, a stable UPPER_SNAKE reason and a message
    /// (cut to [`MAX_MESSAGE_BYTES`]).
    ///
    /// `Code::Ok` is not an error; it is recorded as `Code::Unknown`.
    pub fn new(
        code: Code,
        reason: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        let code = if code == Code::Ok {
            Code::Unknown
        } else {
            code
        };
        let reason = reason.into();
        debug_assert!(
            is_upper_snake(&reason),
            "error reason {reason:?} is not UPPER_SNAKE"
        );
        Error {
            code,
            reason,
            message: bounded(message.into(), MAX_MESSAGE_BYTES),
            metadata: BTreeMap::new(),
            retry_after: None,
            http_status: None,
            challenge: None,
        }
    }

    /// INVALID_ARGUMENT for one field: reason `INVALID_FIELD`, metadata `field`.
    pub fn invalid_argument(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::new(Code::InvalidArgument, "INVALID_FIELD", message).with_metadata("field", field)
    }

    /// NOT_FOUND with the given reason.
    pub fn not_found(reason: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Error::new(Code::NotFound, reason, message)
    }

    /// ALREADY_EXISTS with the given reason.
    pub fn already_exists(
        reason: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Error::new(Code::AlreadyExists, reason, message)
    }

    /// UNAVAILABLE with reason `UNAVAILABLE`: the caller may retry.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Error::new(Code::Unavailable, "UNAVAILABLE", message)
    }

    /// INTERNAL with reason `INTERNAL`. Keep details out of `message`; log them.
    pub fn internal(message: impl Into<String>) -> Self {
        Error::new(Code::Internal, "INTERNAL", message)
    }

    /// Adds one metadata entry (builder style); key and value are cut to
    /// [`MAX_METADATA_BYTES`].
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(
            bounded(key.into(), MAX_METADATA_BYTES),
            bounded(value.into(), MAX_METADATA_BYTES),
        );
        self
    }

    /// Says when a retry may succeed (builder style): a
    /// `google.rpc.RetryInfo` detail for gRPC clients, `Retry-After` for
    /// HTTP ones. For UNAVAILABLE and RESOURCE_EXHAUSTED.
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// The HTTP status to answer with instead of the code's own (builder
    /// style): 413 for a body over its limit, 415 for a body that is not
    /// JSON, 405 for a method a route does not take. The code stays what
    /// gRPC clients see.
    pub fn with_http_status(mut self, status: StatusCode) -> Self {
        self.http_status = Some(status);
        self
    }

    /// The authentication challenge HTTP clients receive as
    /// `WWW-Authenticate` (RFC 9110 §11.6.1), e.g. `Bearer realm="shop",
    /// error="invalid_token"` (builder style). For UNAUTHENTICATED, and
    /// PERMISSION_DENIED with `error="insufficient_scope"` (RFC 6750 §3.1).
    pub fn with_challenge(mut self, challenge: impl Into<String>) -> Self {
        self.challenge = Some(challenge.into());
        self
    }

    /// The authentication challenge, if the error carries one.
    pub fn challenge(&self) -> Option<&str> {
        self.challenge.as_deref()
    }

    /// When a retry may succeed, if the error says.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The gRPC status code.
    pub fn code(&self) -> Code {
        self.code
    }

    /// The stable machine-readable reason, e.g. `USER_NOT_FOUND`.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Structured context, e.g. `field` for INVALID_ARGUMENT.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The HTTP status this error maps to.
    pub fn http_status(&self) -> StatusCode {
        self.http_status
            .unwrap_or_else(|| code_to_http_status(self.code))
    }

    /// The JSON body an HTTP client receives.
    pub fn to_body(&self) -> ErrorBody {
        ErrorBody {
            code: code_name(self.code).to_owned(),
            reason: self.reason.to_string(),
            message: self.message.clone(),
            metadata: self.metadata.clone(),
        }
    }

    /// Rebuilds an error from an HTTP response's status and body.
    ///
    /// A body in the Trellis shape is read as is; anything else (a proxy's
    /// HTML page, an empty body) becomes an error whose code follows the HTTP
    /// status and whose message is the start of the body.
    pub fn from_http(status: StatusCode, body: &[u8]) -> Self {
        if let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body)
            && let Some(code) = code_from_name(&parsed.code)
        {
            let reason = if parsed.reason.is_empty() {
                code_name(code).to_owned()
            } else {
                parsed.reason
            };
            return Error {
                code: if code == Code::Ok {
                    Code::Unknown
                } else {
                    code
                },
                reason: Cow::Owned(reason),
                message: bounded(parsed.message, MAX_MESSAGE_BYTES),
                metadata: parsed.metadata,
                retry_after: None,
                // A status other than the code's own (413 for
                // RESOURCE_EXHAUSTED) is kept, so the error is rendered again as it came.
                http_status: (status != code_to_http_status(code)
                    && (status.is_client_error() || status.is_server_error()))
                .then_some(status),
                challenge: None,
            };
        }
        let code = code_from_http_status(status);
        let text = String::from_utf8_lossy(&body[..body.len().min(1024)])
            .trim()
            .to_owned();
        let message = if text.is_empty() {
            status
                .canonical_reason()
                .unwrap_or("unknown HTTP status")
                .to_owned()
        } else {
            text
        };
        Error::new(code, code_name(code), message).with_metadata("http_status", status.as_str())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            code_name(self.code),
            self.reason,
            self.message
        )
    }
}

impl std::error::Error for Error {}

/// The JSON body of an error response: `{code, reason, message, metadata}`.
///
/// `code` is the gRPC code's canonical name (`NOT_FOUND`); a number is
/// accepted when reading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The gRPC code's canonical name, e.g. `INVALID_ARGUMENT`.
    #[serde(deserialize_with = "code_from_json")]
    pub code: String,
    /// The stable machine-readable reason.
    #[serde(default)]
    pub reason: String,
    /// The human-readable message.
    #[serde(default)]
    pub message: String,
    /// Structured context.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

fn code_from_json<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NameOrNumber {
        Name(String),
        Number(i32),
    }
    Ok(match NameOrNumber::deserialize(d)? {
        NameOrNumber::Name(name) => name,
        NameOrNumber::Number(n) => code_name(Code::from_i32(n)).to_owned(),
    })
}

impl Error {
    /// The HTTP response an HTTP client receives: the status, the JSON body,
    /// `Retry-After` when the error carries a retry hint. Generic over the
    /// body type, so any HTTP stack can send it.
    pub fn to_http_response<B: From<Bytes>>(&self) -> http::Response<B> {
        let body = serde_json::to_vec(&self.to_body()).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = http::Response::new(B::from(Bytes::from(body)));
        *response.status_mut() = self.http_status();
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        if let Some(delay) = self.retry_after {
            // Whole seconds, rounded up: Retry-After has no finer unit.
            let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
        }
        if let Some(challenge) = self
            .challenge
            .as_deref()
            .and_then(|c| http::HeaderValue::from_str(c).ok())
        {
            response
                .headers_mut()
                .insert(http::header::WWW_AUTHENTICATE, challenge);
        }
        response
    }
}

impl Error {
    /// The answer for the caller's protocol: for gRPC (`grpc`) a
    /// trailers-only status whose details carry the reason and the retry
    /// hint, for HTTP [`to_http_response`](Self::to_http_response). For
    /// layers that refuse a request, over any body type.
    pub fn to_response<RB: Default + From<String>>(&self, grpc: bool) -> http::Response<RB> {
        if grpc {
            tonic::Status::from(self.clone()).into_http::<RB>()
        } else {
            self.to_http_response::<Bytes>()
                .map(|body| RB::from(String::from_utf8_lossy(&body).into_owned()))
        }
    }
}

impl axum_core::response::IntoResponse for Error {
    fn into_response(self) -> axum_core::response::Response {
        self.to_http_response()
    }
}

// google.rpc.Status and google.rpc.ErrorInfo, declared by hand: two small
// messages do not justify a codegen step or another dependency.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<Any>,
}

#[derive(Clone, PartialEq, Message)]
struct Any {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<ProtoDuration>,
}

#[derive(Clone, PartialEq, Message)]
struct ProtoDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

#[derive(Clone, PartialEq, Message)]
struct ErrorInfo {
    #[prost(string, tag = "1")]
    reason: String,
    #[prost(string, tag = "2")]
    domain: String,
    #[prost(btree_map = "string, string", tag = "3")]
    metadata: BTreeMap<String, String>,
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let info = ErrorInfo {
            reason: err.reason.to_string(),
            domain: DOMAIN.to_owned(),
            metadata: err.metadata,
        };
        let mut details = vec![Any {
            type_url: ERROR_INFO_TYPE.to_owned(),
            value: info.encode_to_vec(),
        }];
        if let Some(delay) = err.retry_after {
            let retry = RetryInfo {
                retry_delay: Some(ProtoDuration {
                    seconds: i64::try_from(delay.as_secs()).unwrap_or(i64::MAX),
                    nanos: delay.subsec_nanos() as i32,
                }),
            };
            details.push(Any {
                type_url: RETRY_INFO_TYPE.to_owned(),
                value: retry.encode_to_vec(),
            });
        }
        let details = RpcStatus {
            code: err.code as i32,
            message: err.message.clone(),
            details,
        };
        tonic::Status::with_details(err.code, err.message, Bytes::from(details.encode_to_vec()))
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let code = if status.code() == Code::Ok {
            Code::Unknown
        } else {
            status.code()
        };
        let details = RpcStatus::decode(status.details())
            .map(|s| s.details)
            .unwrap_or_default();
        let info = details
            .iter()
            .find(|d| d.type_url == ERROR_INFO_TYPE)
            .and_then(|any| ErrorInfo::decode(any.value.as_slice()).ok());
        let retry_after = details
            .iter()
            .find(|d| d.type_url == RETRY_INFO_TYPE)
            .and_then(|any| RetryInfo::decode(any.value.as_slice()).ok())
            .and_then(|r| r.retry_delay)
            .and_then(|d| {
                Some(Duration::new(
                    u64::try_from(d.seconds).ok()?,
                    u32::try_from(d.nanos).ok()?.min(999_999_999),
                ))
            });
        let (reason, metadata) = match info {
            Some(info) if !info.reason.is_empty() => (Cow::Owned(info.reason), info.metadata),
            Some(info) => (Cow::Borrowed(code_name(code)), info.metadata),
            None => (Cow::Borrowed(code_name(code)), BTreeMap::new()),
        };
        Error {
            code,
            reason,
            message: bounded(status.message().to_owned(), MAX_MESSAGE_BYTES),
            metadata,
            retry_after,
            http_status: None,
            challenge: None,
        }
    }
}

/// The canonical UPPER_SNAKE name of a gRPC code, e.g. `NOT_FOUND`.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

const ALL_CODES: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

fn code_from_name(name: &str) -> Option<Code> {
    ALL_CODES.into_iter().find(|c| code_name(*c) == name)
}

/// The HTTP status for a gRPC code (the mapping in `google/rpc/code.proto`).
pub fn code_to_http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
    }
}

/// The gRPC code for an HTTP status when the body says nothing better.
pub fn code_from_http_status(status: StatusCode) -> Code {
    match status.as_u16() {
        200..=299 => Code::Ok,
        400 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        408 | 504 => Code::DeadlineExceeded,
        409 => Code::Aborted,
        413 | 429 => Code::ResourceExhausted,
        499 => Code::Cancelled,
        501 => Code::Unimplemented,
        502 | 503 => Code::Unavailable,
        402..=499 => Code::FailedPrecondition,
        _ => Code::Unknown,
    }
}

fn is_upper_snake(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('A'..='Z'))
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_error_code() -> impl Strategy<Value = Code> {
        (1i32..=16).prop_map(Code::from_i32)
    }

    fn any_error() -> impl Strategy<Value = Error> {
        (
            any_error_code(),
            "[A-Z][A-Z0-9_]{0,40}",
            any::<String>(),
            proptest::collection::btree_map("[a-z_]{1,12}", any::<String>(), 0..4),
        )
            .prop_map(|(code, reason, message, metadata)| {
                let mut err = Error::new(code, reason, message);
                err.metadata = metadata;
                err
            })
    }

    proptest! {
        #[test]
        fn survives_grpc_then_http(err in any_error()) {
            let via_grpc = Error::from(tonic::Status::from(err.clone()));
            prop_assert_eq!(&via_grpc, &err);
            let body = serde_json::to_vec(&via_grpc.to_body()).unwrap();
            let via_http = Error::from_http(via_grpc.http_status(), &body);
            prop_assert_eq!(&via_http, &err);
            let back_to_grpc = Error::from(tonic::Status::from(via_http));
            prop_assert_eq!(back_to_grpc, err);
        }

        #[test]
        fn http_status_always_an_error(code in any_error_code()) {
            let status = code_to_http_status(code);
            prop_assert!(status.is_client_error() || status.is_server_error());
        }
    }

    #[test]
    fn messages_and_metadata_stay_bounded_whatever_they_quote() {
        let input = "é".repeat(2 * 1024 * 1024);
        let err = Error::invalid_argument(input.clone(), format!("id {} is bad", excerpt(&input)))
            .with_metadata("value", input.clone());
        assert!(
            err.message().len() <= MAX_MESSAGE_BYTES,
            "{}",
            err.message().len()
        );
        assert!(
            err.message().contains("(4194304 bytes)"),
            "{}",
            err.message()
        );
        assert!(
            err.metadata()
                .iter()
                .all(|(k, v)| k.len() <= MAX_METADATA_BYTES && v.len() <= MAX_METADATA_BYTES)
        );
        let long = Error::internal("x".repeat(10_000));
        assert_eq!(long.message().len(), MAX_MESSAGE_BYTES);
        assert!(long.message().ends_with('…'));
        let status = tonic::Status::from(err);
        assert!(status.message().len() <= MAX_MESSAGE_BYTES);
        assert!(
            status.details().len() < 2 * MAX_MESSAGE_BYTES,
            "{}",
            status.details().len()
        );
        assert_eq!(excerpt("short"), "\"short\"");
    }

    #[test]
    fn a_retry_hint_reaches_both_kinds_of_client() {
        let err = Error::unavailable("store down").with_retry_after(Duration::from_millis(1500));
        let back = Error::from(tonic::Status::from(err.clone()));
        assert_eq!(back.retry_after(), Some(Duration::from_millis(1500)));
        assert_eq!(back, err);
        let response = axum_core::response::IntoResponse::into_response(err);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[http::header::RETRY_AFTER], "2");
    }

    #[test]
    fn an_http_status_of_its_own_survives_a_round_trip_over_http() {
        let err = Error::new(Code::ResourceExhausted, "BODY_TOO_LARGE", "too big")
            .with_http_status(StatusCode::PAYLOAD_TOO_LARGE);
        let response: http::Response<Bytes> = err.to_http_response();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let back = Error::from_http(response.status(), response.body());
        assert_eq!(back.code(), Code::ResourceExhausted);
        assert_eq!(back.http_status(), StatusCode::PAYLOAD_TOO_LARGE);
        // Over gRPC the code is what travels.
        assert_eq!(
            Error::from(tonic::Status::from(err)).http_status(),
            StatusCode::TOO_MANY_REQUESTS
        );
    }

    #[test]
    fn plain_status_gets_code_name_as_reason() {
        let err = Error::from(tonic::Status::not_found("no such user"));
        assert_eq!(err.reason(), "NOT_FOUND");
        assert_eq!(err.message(), "no such user");
    }

    #[test]
    fn foreign_http_body_maps_by_status() {
        let err = Error::from_http(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>");
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(err.message(), "<html>bad gateway</html>");
        assert_eq!(
            err.metadata().get("http_status").map(String::as_str),
            Some("502")
        );
    }

    #[test]
    fn numeric_code_accepted_in_json() {
        let body = br#"{"code":5,"reason":"USER_NOT_FOUND","message":"gone"}"#;
        let err = Error::from_http(StatusCode::NOT_FOUND, body);
        assert_eq!(err.code(), Code::NotFound);
        assert_eq!(err.reason(), "USER_NOT_FOUND");
    }

    #[test]
    fn http_body_has_the_documented_shape() {
        let err = Error::invalid_argument("email", "bad email");
        let json: serde_json::Value = serde_json::to_value(err.to_body()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "code": "INVALID_ARGUMENT",
                "reason": "INVALID_FIELD",
                "message": "bad email",
                "metadata": {"field": "email"}
            })
        );
    }
}
