//! gRPC-Web to gRPC (the protocol browsers can speak, PROTOCOL-WEB.md):
//! requests with `application/grpc-web[+proto]` (binary) or
//! `application/grpc-web-text[+proto]` (base64) become gRPC requests over
//! HTTP/2 to the upstream; the answer's messages pass through (base64
//! encoded for text), and its trailers become the final frame of the body
//! (flag `0x80`, then `name: value\r\n` lines), since a browser cannot read
//! HTTP trailers. Works over HTTP/1.1 and HTTP/2 from the client.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use base64::{Engine as _, prelude::BASE64_STANDARD};
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tower::BoxError;

/// Which gRPC-Web a request speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Frames as in gRPC.
    Binary,
    /// The same frames, base64-encoded.
    Text,
}

impl Mode {
    /// The request's gRPC-Web mode, if it is gRPC-Web.
    pub(crate) fn of(headers: &HeaderMap) -> Option<Mode> {
        let ct = headers.get(header::CONTENT_TYPE)?.as_bytes();
        if ct.starts_with(b"application/grpc-web-text") {
            Some(Mode::Text)
        } else if ct.starts_with(b"application/grpc-web") {
            Some(Mode::Binary)
        } else {
            None
        }
    }

    /// Makes the request's headers gRPC's.
    pub(crate) fn request_headers(self, headers: &mut HeaderMap) {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        // The body's length changes in text mode; gRPC needs none.
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(header::ACCEPT);
    }

    /// Makes the response's headers gRPC-Web's.
    pub(crate) fn response_headers(self, headers: &mut HeaderMap) {
        let ct = match self {
            Mode::Binary => "application/grpc-web+proto",
            Mode::Text => "application/grpc-web-text+proto",
        };
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
        headers.remove(header::CONTENT_LENGTH);
    }
}

pin_project_lite::pin_project! {
    /// The body the gateway sends upstream: the client's as it came, a
    /// gRPC-Web-text body decoded from base64 as it streams, or none (a
    /// request sent again).
    pub struct RequestBody {
        #[pin]
        body: Option<Incoming>,
        // A request the gateway made itself (the transcoder's): one buffer.
        full: Option<Bytes>,
        // Text mode: base64 characters not yet decoded (a group split
        // between chunks).
        text: Option<Vec<u8>>,
        // The most the client may send, and what it has sent (a body
        // without a declared length is counted as it streams).
        limit: u64,
        seen: u64,
        // The longest wait for the client's next bytes, and its timer
        // (made the first time the client keeps the gateway waiting).
        idle_for: Option<std::time::Duration>,
        idle: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

/// The client sent nothing of its body for the route's `body_timeout`:
/// answered 408.
#[derive(Debug)]
pub(crate) struct BodyTimeout(pub(crate) std::time::Duration);

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the client sent nothing of its body for {:?}", self.0)
    }
}

impl std::error::Error for BodyTimeout {}

/// A streamed request body went over `max_body_bytes`: answered 413.
#[derive(Debug)]
pub(crate) struct BodyTooLarge(pub(crate) u64);

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the body is over {} bytes", self.0)
    }
}

impl std::error::Error for BodyTooLarge {}

impl RequestBody {
    /// The client's body, unchanged.
    pub(crate) fn plain(body: Incoming) -> RequestBody {
        RequestBody {
            body: Some(body),
            full: None,
            text: None,
            limit: u64::MAX,
            seen: 0,
            idle_for: None,
            idle: None,
        }
    }

    /// At most `limit` bytes from the client; past it the body fails with
    /// [`BodyTooLarge`].
    pub(crate) fn limited(mut self, limit: u64) -> RequestBody {
        self.limit = limit;
        self
    }

    /// Fails with [`BodyTimeout`] when the client sends nothing for `idle`
    /// (a slow-body attack holds a connection and an upstream's with it).
    pub(crate) fn idle_timeout(mut self, idle: std::time::Duration) -> RequestBody {
        self.idle_for = Some(idle);
        self
    }

    /// A gRPC-Web-text body, decoded.
    pub(crate) fn from_text(body: Incoming) -> RequestBody {
        RequestBody {
            body: Some(body),
            full: None,
            text: Some(Vec::new()),
            limit: u64::MAX,
            seen: 0,
            idle_for: None,
            idle: None,
        }
    }

    /// No body.
    pub(crate) fn empty() -> RequestBody {
        RequestBody {
            body: None,
            full: None,
            text: None,
            limit: u64::MAX,
            seen: 0,
            idle_for: None,
            idle: None,
        }
    }

    /// A body the gateway made, whole.
    pub(crate) fn bytes(bytes: Bytes) -> RequestBody {
        RequestBody {
            body: None,
            full: Some(bytes),
            text: None,
            limit: u64::MAX,
            seen: 0,
            idle_for: None,
            idle: None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            let Some(body) = this.body.as_mut().as_pin_mut() else {
                return Poll::Ready(this.full.take().map(|b| Ok(Frame::data(b))));
            };
            let polled = body.poll_frame(cx);
            if polled.is_pending() {
                if let Some(idle_for) = *this.idle_for {
                    let timer = this
                        .idle
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle_for)));
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Some(Err(Box::new(BodyTimeout(idle_for)))));
                    }
                }
                return Poll::Pending;
            }
            if let (Some(timer), Some(idle_for)) = (this.idle.as_mut(), *this.idle_for) {
                timer.as_mut().reset(tokio::time::Instant::now() + idle_for);
            }
            let frame = match std::task::ready!(polled) {
                None => {
                    return Poll::Ready(match this.text.as_ref() {
                        Some(rest) if !rest.is_empty() => Some(Err(
                            "the gRPC-Web-text body ends inside a base64 group".into(),
                        )),
                        _ => None,
                    });
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                Some(Ok(frame)) => frame,
            };
            if let Some(data) = frame.data_ref() {
                *this.seen += data.len() as u64;
                if *this.seen > *this.limit {
                    return Poll::Ready(Some(Err(Box::new(BodyTooLarge(*this.limit)))));
                }
            }
            let Some(pending) = this.text.as_mut() else {
                return Poll::Ready(Some(Ok(frame)));
            };
            let Ok(data) = frame.into_data() else {
                // Trailers on a request: nothing gRPC uses.
                continue;
            };
            pending.extend(data.iter().filter(|b| !b.is_ascii_whitespace()));
            let whole = pending.len() / 4 * 4;
            if whole == 0 {
                continue;
            }
            // Each 4-character group on its own: padded segments may be
            // concatenated (each message encoded separately).
            let mut out = BytesMut::with_capacity(whole / 4 * 3);
            let mut group = [0u8; 3];
            for chunk in pending[..whole].chunks_exact(4) {
                match BASE64_STANDARD.decode_slice(chunk, &mut group) {
                    Ok(n) => out.put_slice(&group[..n]),
                    Err(e) => {
                        return Poll::Ready(Some(Err(format!(
                            "the gRPC-Web-text body is not base64: {e}"
                        )
                        .into())));
                    }
                }
            }
            pending.drain(..whole);
            return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
            && self.text.as_ref().is_none_or(Vec::is_empty)
            && self.full.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.body, &self.text) {
            (None, _) => SizeHint::with_exact(self.full.as_ref().map_or(0, |b| b.len() as u64)),
            (Some(body), None) => body.size_hint(),
            (Some(_), Some(_)) => SizeHint::default(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The upstream's gRPC answer as gRPC-Web: messages as they come (base64
    /// in text mode), the trailers as a last frame.
    pub struct ResponseBody<B> {
        #[pin]
        body: B,
        mode: Mode,
        done: bool,
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn new(body: B, mode: Mode) -> Self {
        ResponseBody {
            body,
            mode,
            done: false,
        }
    }
}

/// Trailers as gRPC-Web's trailer frame: `0x80`, the length, then the
/// trailers in HTTP/1 form with lower-case names.
fn trailer_frame(trailers: &HeaderMap) -> Bytes {
    let mut block = Vec::new();
    for (name, value) in trailers {
        block.extend_from_slice(name.as_str().as_bytes());
        block.extend_from_slice(b": ");
        block.extend_from_slice(value.as_bytes());
        block.extend_from_slice(b"\r\n");
    }
    let mut out = BytesMut::with_capacity(5 + block.len());
    out.put_u8(0x80);
    out.put_u32(u32::try_from(block.len()).unwrap_or(u32::MAX));
    out.put_slice(&block);
    out.freeze()
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        let encode = |bytes: Bytes, mode: Mode| match mode {
            Mode::Binary => bytes,
            Mode::Text => Bytes::from(BASE64_STANDARD.encode(&bytes)),
        };
        match std::task::ready!(this.body.poll_frame(cx)) {
            None => {
                *this.done = true;
                Poll::Ready(None)
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => Poll::Ready(Some(Ok(Frame::data(encode(data, *this.mode))))),
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => {
                        *this.done = true;
                        Poll::Ready(Some(Ok(Frame::data(encode(
                            trailer_frame(&trailers),
                            *this.mode,
                        )))))
                    }
                    Err(_) => Poll::Ready(None),
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
