//! gRPC message framing: each message on the wire is one flag byte (1 when
//! compressed), a 4-byte big-endian length, then the message. One decoder
//! for every reader in this crate — the unary and streaming responses of
//! the transcoder and the first request message validation looks at — so
//! the limit and the compression check are made in one place.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{BufMut, Bytes, BytesMut};
use http::Request;
use tower::{BoxError, Layer, Service};
use trellis_core::{Code, Error};

/// The flag byte and the length before every message.
pub const HEADER_LEN: usize = 5;

/// One message framed for the wire.
pub fn encode(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut out = BytesMut::with_capacity(HEADER_LEN + len);
    out.put_u8(0);
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // Encoding into a buffer with room for the message cannot fail.
    let _ = message.encode(&mut out);
    out.freeze()
}

/// What a frame header says, read before the message has arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The compressed flag.
    pub compressed: bool,
    /// The message length.
    pub len: usize,
}

/// The header at the front of `bytes`, once its five bytes are there.
pub fn header(bytes: &[u8]) -> Option<Header> {
    let head: &[u8; HEADER_LEN] = bytes.get(..HEADER_LEN)?.try_into().ok()?;
    Some(Header {
        compressed: head[0] != 0,
        len: u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize,
    })
}

/// Takes whole messages off a buffer that grows as a body arrives, without
/// copying them. A message over `max_len` is refused from its header,
/// before it is buffered; a compressed one is refused (Trellis never asks
/// for compression on these paths).
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_len: usize,
}

impl FrameDecoder {
    /// A decoder refusing messages longer than `max_len` bytes.
    pub fn new(max_len: usize) -> FrameDecoder {
        FrameDecoder {
            buf: BytesMut::new(),
            max_len,
        }
    }

    /// Adds bytes as they arrive.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes received and not yet taken as a message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole message, if one has arrived.
    pub fn next_message(&mut self) -> Result<Option<Bytes>, Error> {
        let Some(head) = header(&self.buf) else {
            return Ok(None);
        };
        if head.compressed {
            return Err(Error::new(
                Code::Internal,
                "COMPRESSED_MESSAGE",
                "a gRPC message is compressed, which was not asked for",
            ));
        }
        if head.len > self.max_len {
            return Err(Error::new(
                Code::ResourceExhausted,
                "MESSAGE_TOO_LARGE",
                format!(
                    "a {}-byte message is over the {}-byte limit",
                    head.len, self.max_len
                ),
            ));
        }
        if self.buf.len() < HEADER_LEN + head.len {
            return Ok(None);
        }
        let _ = self.buf.split_to(HEADER_LEN);
        Ok(Some(self.buf.split_to(head.len).freeze()))
    }
}

/// Refuses gRPC request messages over a size, on the wire: each frame's
/// header is read as the body streams past, and one that declares more than
/// the limit ends the body with a RESOURCE_EXHAUSTED status, which the
/// gRPC server answers with. Nothing is buffered or copied, so it costs the
/// same for every method and every streaming shape; a message is refused
/// before its bytes have arrived.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimitLayer {
    max_len: usize,
}

impl MessageLimitLayer {
    /// Messages up to `max_len` bytes pass.
    pub fn new(max_len: usize) -> MessageLimitLayer {
        MessageLimitLayer { max_len }
    }
}

impl<S> Layer<S> for MessageLimitLayer {
    type Service = MessageLimit<S>;

    fn layer(&self, inner: S) -> MessageLimit<S> {
        MessageLimit {
            inner,
            max_len: self.max_len,
        }
    }
}

/// A gRPC service whose request messages are held to a size (see
/// [`MessageLimitLayer`]).
#[derive(Debug, Clone)]
pub struct MessageLimit<S> {
    inner: S,
    max_len: usize,
}

impl<S, B> Service<Request<B>> for MessageLimit<S>
where
    S: Service<Request<LimitedFrames<B>>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let max_len = self.max_len;
        self.inner.call(req.map(|body| LimitedFrames {
            body,
            max_len,
            header: [0; HEADER_LEN],
            have: 0,
            left: 0,
        }))
    }
}

/// A request body whose frames are checked against a size as they pass.
#[derive(Debug)]
pub struct LimitedFrames<B> {
    body: B,
    max_len: usize,
    /// The frame header being read, and how much of it has arrived.
    header: [u8; HEADER_LEN],
    have: usize,
    /// Message bytes still to pass before the next header.
    left: usize,
}

impl<B> LimitedFrames<B> {
    /// Follows `data` through the frame boundaries; an error for a message
    /// over the limit.
    fn scan(&mut self, mut data: &[u8]) -> Result<(), tonic::Status> {
        while !data.is_empty() {
            if self.left > 0 {
                let step = self.left.min(data.len());
                self.left -= step;
                data = &data[step..];
                continue;
            }
            let step = (HEADER_LEN - self.have).min(data.len());
            self.header[self.have..self.have + step].copy_from_slice(&data[..step]);
            self.have += step;
            data = &data[step..];
            if self.have == HEADER_LEN {
                self.have = 0;
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                if len > self.max_len {
                    return Err(tonic::Status::from(Error::new(
                        Code::ResourceExhausted,
                        "MESSAGE_TOO_LARGE",
                        format!(
                            "a {len}-byte message is over the {}-byte limit",
                            self.max_len
                        ),
                    )));
                }
                self.left = len;
            }
        }
        Ok(())
    }
}

impl<B> http_body::Body for LimitedFrames<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(status) = self.scan(data)
                {
                    return Poll::Ready(Some(Err(status.into())));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_come_off_whole_however_they_arrive() {
        let one = encode(&"first".to_owned());
        let two = encode(&"second".to_owned());
        let wire: Vec<u8> = [one.as_ref(), two.as_ref()].concat();
        for chunk in 1..wire.len() {
            let mut decoder = FrameDecoder::new(1024);
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                decoder.push(piece);
                while let Some(m) = decoder.next_message().unwrap() {
                    got.push(m);
                }
            }
            let decoded: Vec<String> = got
                .iter()
                .map(|m| <String as prost::Message>::decode(m.clone()).unwrap())
                .collect();
            assert_eq!(decoded, ["first", "second"], "chunks of {chunk}");
            assert_eq!(decoder.buffered(), 0);
        }
    }

    #[test]
    fn oversize_and_compressed_messages_are_refused_from_the_header() {
        let mut decoder = FrameDecoder::new(10);
        decoder.push(&[0, 0, 0, 1, 0]);
        let err = decoder.next_message().unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(
            err.message()
                .contains("256-byte message is over the 10-byte limit")
        );
        let mut decoder = FrameDecoder::new(10);
        decoder.push(&[1, 0, 0, 0, 1, 7]);
        assert_eq!(decoder.next_message().unwrap_err().code(), Code::Internal);
        assert_eq!(header(&[0, 0, 0]), None);
    }

    #[tokio::test]
    async fn a_limited_body_passes_small_messages_and_stops_a_large_one() {
        use http_body_util::BodyExt;
        let small = encode(&"x".repeat(10));
        let large = encode(&"y".repeat(100));
        let wire = Bytes::from([small.as_ref(), small.as_ref(), large.as_ref()].concat());
        // Delivered a few bytes at a time, so headers straddle chunks.
        let chunks: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = wire
            .chunks(3)
            .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
        let mut limited = LimitedFrames {
            body,
            max_len: 50,
            header: [0; HEADER_LEN],
            have: 0,
            left: 0,
        };
        let mut passed = 0;
        let err = loop {
            match limited.frame().await {
                Some(Ok(frame)) => passed += frame.into_data().map_or(0, |d| d.len()),
                Some(Err(e)) => break e,
                None => panic!("the large message passed"),
            }
        };
        assert!(passed >= 2 * small.len(), "passed {passed}");
        assert!(passed < 2 * small.len() + HEADER_LEN + 3, "passed {passed}");
        let status = err.downcast::<tonic::Status>().unwrap();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status
                .message()
                .contains("102-byte message is over the 50-byte limit"),
            "{}",
            status.message()
        );
    }
}
