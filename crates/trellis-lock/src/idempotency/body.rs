//! The answer bodies the layer sends: the handler's own (a route that is
//! not idempotent), a recorded one (data and trailers), or a recorded
//! prefix followed by the rest of the handler's (too large to record).

use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use trellis_core::BoxError;

/// An answer body (see the module docs).
pub struct Replayable<B> {
    inner: Inner<B>,
}

enum Inner<B> {
    Pass(B),
    Full {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    Partial {
        prefix: VecDeque<Bytes>,
        rest: B,
    },
}

impl<B> Replayable<B> {
    pub(crate) fn pass(body: B) -> Self {
        Replayable {
            inner: Inner::Pass(body),
        }
    }

    pub(crate) fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Replayable {
            inner: Inner::Full {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }

    pub(crate) fn partial(prefix: Bytes, rest: B) -> Self {
        Replayable {
            inner: Inner::Partial {
                prefix: VecDeque::from([prefix]),
                rest,
            },
        }
    }
}

impl<B> Body for Replayable<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().inner {
            Inner::Pass(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Inner::Full { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            Inner::Partial { prefix, rest } => {
                if let Some(data) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Pin::new(rest).poll_frame(cx).map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Pass(body) => body.is_end_stream(),
            Inner::Full { data, trailers } => data.is_none() && trailers.is_none(),
            Inner::Partial { prefix, rest } => prefix.is_empty() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Pass(body) => body.size_hint(),
            Inner::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Inner::Partial { .. } => SizeHint::default(),
        }
    }
}

/// A handler's answer body, read.
pub(crate) enum Collected<B> {
    /// All of it.
    Whole {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// More than the limit: what was read, and the rest unread.
    TooLarge { prefix: Bytes, rest: B },
    /// The body failed.
    Failed(BoxError),
}

/// Reads `body` up to `limit` bytes.
pub(crate) async fn collect<B>(mut body: B, limit: usize) -> Collected<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut data = bytes::BytesMut::new();
    let mut trailers: Option<HeaderMap> = None;
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => break,
            Some(Err(e)) => return Collected::Failed(e.into()),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(chunk) => {
                    data.extend_from_slice(&chunk);
                    if data.len() > limit {
                        return Collected::TooLarge {
                            prefix: data.freeze(),
                            rest: body,
                        };
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        match &mut trailers {
                            Some(all) => all.extend(t),
                            None => trailers = Some(t),
                        }
                    }
                }
            },
        }
    }
    Collected::Whole {
        data: data.freeze(),
        trailers,
    }
}
