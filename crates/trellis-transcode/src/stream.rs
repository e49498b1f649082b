//! The response stage of a server stream: each message as it arrives, as a
//! Server-Sent Event (`data: {...}`) or a line of newline-delimited JSON,
//! never buffered; a failure (status in the trailers, a broken stream)
//! ends it with an error event in the error model.

use std::{convert::Infallible, sync::Arc};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response, header};
use tower::BoxError;
use trellis_core::Error;

use crate::{
    Body, TranscodeOptions,
    framing::FrameDecoder,
    json::Plans,
    response::{check_status, error_json, message_json},
    service::Route,
};

/// How a client asked to receive a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamFormat {
    /// `text/event-stream` (the default).
    Sse,
    /// `application/x-ndjson`, when the client accepts it and not SSE.
    NdJson,
}

impl StreamFormat {
    /// The format the request's `Accept` asks for.
    pub(crate) fn of(headers: &HeaderMap) -> StreamFormat {
        let accepts = |t: &str| {
            headers
                .get_all(header::ACCEPT)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| v.contains(t)))
        };
        if accepts("application/x-ndjson") && !accepts("text/event-stream") {
            StreamFormat::NdJson
        } else {
            StreamFormat::Sse
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            StreamFormat::Sse => "text/event-stream",
            StreamFormat::NdJson => "application/x-ndjson",
        }
    }

    /// One streamed message (or the closing error) for the wire.
    fn event(self, json: &[u8], error: bool) -> Bytes {
        let mut out = BytesMut::with_capacity(json.len() + 24);
        match (self, error) {
            (StreamFormat::Sse, false) => out.extend_from_slice(b"data: "),
            (StreamFormat::Sse, true) => out.extend_from_slice(b"event: error\ndata: "),
            (StreamFormat::NdJson, true) => out.extend_from_slice(b"{\"error\":"),
            (StreamFormat::NdJson, false) => {}
        }
        out.extend_from_slice(json);
        match (self, error) {
            (StreamFormat::Sse, _) => out.extend_from_slice(b"\n\n"),
            (StreamFormat::NdJson, true) => out.extend_from_slice(b"}\n"),
            (StreamFormat::NdJson, false) => out.extend_from_slice(b"\n"),
        }
        out.freeze()
    }
}

/// The stream's state between events: the gRPC body, the decoder, done.
type State<B> = (std::pin::Pin<Box<B>>, FrameDecoder, bool);

/// Streams the gRPC answer as events.
pub(crate) fn respond<B>(
    options: &TranscodeOptions,
    plans: Arc<Plans>,
    route: Arc<Route>,
    response: Response<B>,
    format: StreamFormat,
) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (parts, body) = response.into_parts();
    if let Err(e) = check_status(&parts.headers) {
        return e.to_http_response::<Bytes>().map(crate::full);
    }
    let options = options.clone();
    let state: State<B> = (Box::pin(body), FrameDecoder::new(usize::MAX), false);
    let events = futures_util::stream::unfold(state, move |(mut body, mut frames, done)| {
        let (route, options, plans) = (route.clone(), options.clone(), plans.clone());
        async move {
            if done {
                return None;
            }
            let last = |e: Error, body, frames| {
                Some((
                    Ok::<_, Infallible>(format.event(&error_json(&e), true)),
                    (body, frames, true),
                ))
            };
            loop {
                // A whole message buffered: send it.
                match frames.next_message() {
                    Ok(Some(message)) => {
                        let event = message_json(&options, &plans, &route, &message);
                        return match event {
                            Ok(json) => {
                                Some((Ok(format.event(&json, false)), (body, frames, false)))
                            }
                            Err(e) => last(e, body, frames),
                        };
                    }
                    Ok(None) => {}
                    Err(e) => return last(e, body, frames),
                }
                match std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            frames.push(data);
                        } else if let Some(trailers) = frame.trailers_ref() {
                            return match check_status(trailers) {
                                Ok(()) => None,
                                Err(e) => last(e, body, frames),
                            };
                        }
                    }
                    Some(Err(e)) => {
                        let e: BoxError = e.into();
                        return last(
                            Error::unavailable(format!("the gRPC stream broke off: {e}")),
                            body,
                            frames,
                        );
                    }
                    None => return None,
                }
            }
        }
    });
    let stream_body = http_body_util::StreamBody::new(futures_util::StreamExt::map(events, |e| {
        e.map(http_body::Frame::data)
    }));
    let mut answer = Response::new(Body::new(http_body_util::BodyExt::map_err(
        stream_body,
        |never: Infallible| -> BoxError { match never {} },
    )));
    let headers = answer.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    answer
}
