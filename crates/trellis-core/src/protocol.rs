//! Protocol facts, decided once for every layer that needs them: whether a
//! request is gRPC, the gRPC status a response carries (in its headers for
//! a trailers-only answer, in its trailers after a body), what an outcome
//! says about the server ([`Class`]), and bounded metric labels.
//!
//! Breakers, retries, outlier detection and telemetry all judge outcomes
//! with [`classify_head`] and, when the status comes at the end of the
//! body, [`Classified`] — so a gRPC error in the trailers is a failure to
//! every one of them.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http::{HeaderMap, StatusCode};
use tonic::Code;

/// `grpc-status`, as a header name known in advance (a lookup by string
/// parses the name on every call).
pub const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
/// `grpc-timeout`.
pub const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");
/// W3C `traceparent`.
pub const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
/// W3C `baggage`.
pub const BAGGAGE: http::HeaderName = http::HeaderName::from_static("baggage");

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
    let value = headers.get(GRPC_STATUS)?;
    Some(
        std::str::from_utf8(value.as_bytes())
            .ok()
            .and_then(|s| s.parse::<i32>().ok())
            .filter(|n| (0..=16).contains(n))
            .map_or(Code::Unknown, Code::from_i32),
    )
}

/// What an outcome says about the server that produced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The call did what was asked — or failed for a reason of the
    /// caller's (INVALID_ARGUMENT, NOT_FOUND, 4xx): no sign of trouble.
    Success,
    /// The server failed: UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED,
    /// INTERNAL, UNAVAILABLE, DATA_LOSS, or HTTP 5xx.
    Failure {
        /// The request was not processed (UNAVAILABLE, 502, 503, 504): it
        /// may be sent again, and the endpoint may be unhealthy.
        retryable: bool,
    },
}

impl Class {
    /// Whether the server failed.
    pub fn is_failure(self) -> bool {
        matches!(self, Class::Failure { .. })
    }

    /// Whether the request was not processed and may be sent again.
    pub fn is_retryable(self) -> bool {
        matches!(self, Class::Failure { retryable: true })
    }
}

/// The class of a gRPC status code.
pub fn classify_grpc(code: Code) -> Class {
    match code {
        Code::Unavailable => Class::Failure { retryable: true },
        Code::Unknown
        | Code::DeadlineExceeded
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss => Class::Failure { retryable: false },
        _ => Class::Success,
    }
}

/// The class of an HTTP status.
pub fn classify_http(status: StatusCode) -> Class {
    match status.as_u16() {
        502..=504 => Class::Failure { retryable: true },
        500..=599 => Class::Failure { retryable: false },
        _ => Class::Success,
    }
}

/// The class of a response from its head: its HTTP status, or the gRPC
/// status in its headers (a trailers-only answer). `None` when the head
/// does not say — a gRPC response whose status comes in the trailers:
/// wrap its body in [`Classified`] to learn it at the end.
pub fn classify_head(status: StatusCode, headers: &HeaderMap) -> Option<Class> {
    let http = classify_http(status);
    if http.is_failure() || !is_grpc(headers) {
        return Some(http);
    }
    grpc_status(headers).map(classify_grpc)
}

/// How a response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End {
    /// What it says about the server.
    pub class: Class,
    /// The gRPC status it ended with (from the head or the trailers); for
    /// a gRPC response that never gave one, UNKNOWN.
    pub grpc_status: Option<Code>,
}

/// Where a [`Classified`] body reports how its response ended.
pub trait Report {
    /// Called once: `Some(end)` at the end of the body, `None` when the
    /// body was dropped before its end.
    fn report(self, end: Option<End>);
}

pin_project_lite::pin_project! {
    /// A response body that reports how the response ended, once: from its
    /// trailers (`grpc-status`), its end, or an error; `None` when it is
    /// dropped before the end (the caller went away, which says nothing
    /// about the server). The report of a body known from its head is made
    /// at its end too, so durations can be taken there.
    pub struct Classified<B, F>
    where
        B: http_body::Body,
        F: Report,
    {
        #[pin]
        body: B,
        head: Option<Class>,
        head_status: Option<Code>,
        grpc: bool,
        report: Option<F>,
    }

    impl<B, F> PinnedDrop for Classified<B, F>
    where
        B: http_body::Body,
        F: Report,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(report) = this.report.take() {
                // A body that says it is over is not polled to its end by
                // the server or client: a trailers-only gRPC answer, an
                // empty HTTP one. Dropped then, it ended; dropped
                // earlier, it was cut off.
                let end = this
                    .body
                    .is_end_stream()
                    .then(|| ended_without_trailers(*this.head, *this.head_status, *this.grpc));
                report.report(end);
            }
        }
    }
}

/// How a response that ended without trailers ended: what its head said,
/// or, for gRPC, a response that never gave its status.
fn ended_without_trailers(head: Option<Class>, status: Option<Code>, grpc: bool) -> End {
    match head {
        Some(class) => End {
            class,
            grpc_status: status,
        },
        None if grpc => End {
            class: Class::Failure { retryable: false },
            grpc_status: Some(Code::Unknown),
        },
        None => End {
            class: Class::Success,
            grpc_status: None,
        },
    }
}

impl<B: http_body::Body, F: Report> Classified<B, F> {
    /// Wraps a response's body, given its head (status and headers).
    pub fn new(status: StatusCode, headers: &HeaderMap, body: B, report: F) -> Self {
        Classified {
            body,
            head: classify_head(status, headers),
            head_status: grpc_status(headers),
            grpc: is_grpc(headers),
            report: Some(report),
        }
    }

    /// How the response ended, if its head already says (an HTTP response,
    /// a trailers-only gRPC one).
    pub fn head(&self) -> Option<Class> {
        self.head
    }
}

impl<B, F> http_body::Body for Classified<B, F>
where
    B: http_body::Body,
    F: Report,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.body.poll_frame(cx);
        let from_head = |head: &Option<Class>, status: &Option<Code>| {
            head.map(|class| End {
                class,
                grpc_status: *status,
            })
        };
        let ended = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.trailers_ref().map(|trailers| {
                from_head(this.head, this.head_status).unwrap_or_else(|| {
                    let status = grpc_status(trailers);
                    End {
                        class: status.map_or(Class::Success, classify_grpc),
                        grpc_status: status,
                    }
                })
            }),
            Poll::Ready(Some(Err(_))) => Some(End {
                class: Class::Failure { retryable: false },
                grpc_status: this.grpc.then_some(Code::Unknown),
            }),
            Poll::Ready(None) => Some(ended_without_trailers(
                *this.head,
                *this.head_status,
                *this.grpc,
            )),
            Poll::Pending => None,
        };
        if let Some(end) = ended
            && let Some(report) = this.report.take()
        {
            report.report(Some(end));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
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
    fn classes_of_outcomes() {
        assert_eq!(classify_grpc(Code::Ok), Class::Success);
        assert_eq!(classify_grpc(Code::NotFound), Class::Success);
        assert!(classify_grpc(Code::Unavailable).is_retryable());
        assert!(classify_grpc(Code::Internal).is_failure());
        assert!(!classify_grpc(Code::Internal).is_retryable());
        assert!(classify_http(StatusCode::BAD_GATEWAY).is_retryable());
        assert!(classify_http(StatusCode::INTERNAL_SERVER_ERROR).is_failure());
        assert_eq!(classify_http(StatusCode::NOT_FOUND), Class::Success);
        let mut grpc = HeaderMap::new();
        grpc.insert(
            http::header::CONTENT_TYPE,
            "application/grpc".parse().unwrap(),
        );
        assert_eq!(
            classify_head(StatusCode::OK, &grpc),
            None,
            "the status is still to come"
        );
        grpc.insert("grpc-status", "13".parse().unwrap());
        assert!(classify_head(StatusCode::OK, &grpc).unwrap().is_failure());
        assert_eq!(
            classify_head(StatusCode::OK, &HeaderMap::new()),
            Some(Class::Success)
        );
    }

    struct Seen(std::sync::Arc<std::sync::Mutex<Vec<Option<Class>>>>);

    impl Report for Seen {
        fn report(self, end: Option<End>) {
            self.0.lock().unwrap().push(end.map(|e| e.class));
        }
    }

    /// The status in the trailers, after a message: a failure, reported once.
    #[tokio::test]
    async fn a_grpc_error_in_the_trailers_is_a_failure() {
        use http_body_util::BodyExt;
        let run = |trailer: Option<&'static str>, drop_early: bool| async move {
            let mut frames = vec![Ok::<_, std::convert::Infallible>(http_body::Frame::data(
                bytes::Bytes::from_static(b"\0\0\0\0\0"),
            ))];
            if let Some(code) = trailer {
                let mut t = HeaderMap::new();
                t.insert("grpc-status", code.parse().unwrap());
                frames.push(Ok(http_body::Frame::trailers(t)));
            }
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
            let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let mut head = HeaderMap::new();
            head.insert(
                http::header::CONTENT_TYPE,
                "application/grpc".parse().unwrap(),
            );
            let mut classified = Classified::new(StatusCode::OK, &head, body, Seen(seen.clone()));
            if drop_early {
                let _ = classified.frame().await;
                drop(classified);
            } else {
                while classified.frame().await.is_some() {}
            }
            let seen: Vec<Option<Class>> = seen.lock().unwrap().clone();
            seen
        };
        assert_eq!(
            run(Some("13"), false).await,
            [Some(Class::Failure { retryable: false })]
        );
        assert_eq!(run(Some("0"), false).await, [Some(Class::Success)]);
        assert_eq!(
            run(None, false).await,
            [Some(Class::Failure { retryable: false })],
            "a gRPC response must end with a status"
        );
        assert_eq!(
            run(Some("13"), true).await,
            [None],
            "dropped before the end"
        );
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
