//! An HTTP/1.1 upstream connection driven by the request that holds it —
//! no task of its own, no channel between the request and the socket.
//!
//! hyper's client connection runs in a task of its own: every request is
//! handed to it through a channel, the task writes it, reads the answer and
//! hands the response and each body chunk back, so every proxied request
//! crosses tasks several times. Here (as in Pingora) the request's own task
//! writes the head and reads the response head, and the response body reads
//! the socket from whatever task polls it — the client connection's. When
//! the body ends cleanly the connection goes back to its endpoint's pool.
//!
//! Used for requests without a body (the common GET) over plain TCP;
//! requests with bodies, TLS, upgrades and HTTP/2 go through hyper.
//!
//! Bounded like a server reads a client: a response head of at most
//! [`MAX_HEAD_BYTES`] and [`MAX_HEADERS`] headers, chunk-size lines and
//! trailers of bounded length; anything malformed is an error (502) and the
//! connection is closed, never reused.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tower::BoxError;

use crate::upstream::EndpointPool;

/// The largest response head read.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most response headers read.
pub(crate) const MAX_HEADERS: usize = 128;
/// The longest chunk-size line (with extensions) and trailer section.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;
/// How much is read at a time.
const READ_SIZE: usize = 16 * 1024;

/// A kept-alive HTTP/1.1 connection to an upstream.
pub(crate) struct RawConn {
    stream: TcpStream,
    /// Read but not yet consumed; empty between requests.
    buf: BytesMut,
    /// The request head being written (kept for its capacity).
    head: Vec<u8>,
}

/// Why a request failed, and whether it may go again on a new connection.
#[derive(Debug)]
pub(crate) struct SendError {
    /// The upstream closed a kept-alive connection without answering: the
    /// usual race with its idle timeout. The request was not processed.
    pub(crate) stale: bool,
    pub(crate) error: BoxError,
}

impl RawConn {
    pub(crate) fn new(stream: TcpStream) -> RawConn {
        RawConn {
            stream,
            buf: BytesMut::new(),
            head: Vec::new(),
        }
    }

    /// Whether an idle connection is still usable: the upstream has not
    /// closed it and has sent nothing unasked. No syscall unless the
    /// socket has signalled something.
    pub(crate) fn is_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Sends a bodiless request (`parts`, origin form, `Host` set) and
    /// reads the response head; the body reads the rest.
    pub(crate) async fn send(
        mut self,
        parts: &http::request::Parts,
        pool: Arc<EndpointPool>,
    ) -> Result<Response<RawBody>, SendError> {
        let fail = |error: BoxError| SendError {
            stale: false,
            error,
        };
        encode_head(parts, &mut self.head);
        if let Err(e) = self.stream.write_all(&self.head).await {
            // A kept-alive connection the upstream had closed.
            return Err(SendError {
                stale: true,
                error: e.into(),
            });
        }
        let head = loop {
            if !self.buf.is_empty() {
                match parse_head(&self.buf).map_err(fail)? {
                    Some((head, len)) => {
                        self.buf.advance(len);
                        // Interim answers (100 Continue, 103 Early Hints)
                        // are skipped; 101 never comes to a bodiless
                        // request that asked for no upgrade.
                        if head.status.is_informational() {
                            continue;
                        }
                        break head;
                    }
                    None if self.buf.len() >= MAX_HEAD_BYTES => {
                        return Err(fail(
                            format!("the response head is over {MAX_HEAD_BYTES} bytes").into(),
                        ));
                    }
                    None => {}
                }
            }
            self.buf.reserve(READ_SIZE);
            let read = self.stream.read_buf(&mut self.buf).await;
            match read {
                Ok(0) if self.buf.is_empty() => {
                    return Err(SendError {
                        stale: true,
                        error: "the upstream closed the connection without answering".into(),
                    });
                }
                Ok(0) => return Err(fail("the upstream closed inside the response head".into())),
                Ok(_) => {}
                Err(e) => {
                    let stale = self.buf.is_empty()
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                        );
                    return Err(SendError {
                        stale,
                        error: e.into(),
                    });
                }
            }
        };
        let framing = framing(&parts.method, &head).map_err(fail)?;
        let reusable = head.keep_alive && !matches!(framing, Framing::Eof);
        let mut response = Response::new(RawBody {
            conn: Some(self),
            framing,
            reusable,
            pool,
        });
        *response.status_mut() = head.status;
        *response.headers_mut() = head.headers;
        response.body_mut().finish_if_done();
        Ok(response)
    }
}

/// `METHOD path HTTP/1.1`, `Host` when the request has none, the headers,
/// `content-length: 0` for methods that carry a body.
fn encode_head(parts: &http::request::Parts, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH)
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
    {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

struct Head {
    status: StatusCode,
    headers: HeaderMap,
    keep_alive: bool,
}

/// The response head at the start of `buf` and its length, or `None` when
/// more is needed.
fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, BoxError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut slots);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(format!("the response has over {MAX_HEADERS} headers").into());
        }
        Err(e) => return Err(format!("a malformed response head: {e}").into()),
    };
    let status = StatusCode::from_u16(parsed.code.unwrap_or(0))
        .map_err(|_| "a response status out of range")?;
    let mut keep_alive = parsed.version == Some(1);
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("a malformed response header name {:?}", h.name))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| format!("a malformed value for response header {name}"))?;
        if name == header::CONNECTION
            && value
                .as_bytes()
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
        {
            keep_alive = false;
        }
        headers.append(name, value);
    }
    Ok(Some((
        Head {
            status,
            headers,
            keep_alive,
        },
        len,
    )))
}

/// How the response body is delimited (RFC 9112 §6.3).
enum Framing {
    /// No body: a HEAD, 204, 304, or `Content-Length` bytes still to come.
    Length(u64),
    Chunked(Chunked),
    /// Until the upstream closes (the connection is not reused).
    Eof,
}

fn framing(method: &Method, head: &Head) -> Result<Framing, BoxError> {
    if *method == Method::HEAD
        || head.status == StatusCode::NO_CONTENT
        || head.status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Length(0));
    }
    if let Some(te) = head.headers.get(header::TRANSFER_ENCODING) {
        // Chunked must be the last coding; anything else is read to the end.
        let last = te.as_bytes().rsplit(|b| *b == b',').next().unwrap_or(b"");
        return Ok(if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked(Chunked::Size {
                value: 0,
                digits: 0,
                line: 0,
                ext: false,
                cr: false,
            })
        } else {
            Framing::Eof
        });
    }
    let mut length = None;
    for value in head.headers.get_all(header::CONTENT_LENGTH) {
        let n = std::str::from_utf8(value.as_bytes())
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or("a malformed Content-Length")?;
        if length.is_some_and(|l| l != n) {
            return Err("conflicting Content-Length values".into());
        }
        length = Some(n);
    }
    Ok(length.map_or(Framing::Eof, Framing::Length))
}

/// Where a chunked body's decoder is.
#[derive(Debug)]
enum Chunked {
    /// In a chunk-size line: its value, hex digits, length; past a `;`
    /// (extensions, ignored); a CR seen.
    Size {
        value: u64,
        digits: u8,
        line: usize,
        ext: bool,
        cr: bool,
    },
    /// Chunk data still to come.
    Data(u64),
    /// The CRLF after a chunk's data: how much of it has been seen.
    DataEnd(u8),
    /// The trailer section (dropped): its length, the current line's, a
    /// CR seen.
    Trailers {
        total: usize,
        line: usize,
        cr: bool,
    },
    Done,
}

enum Decoded {
    Data(Bytes),
    NeedMore,
    Done,
}

impl Chunked {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BoxError> {
        loop {
            if let Chunked::Data(remaining) = self {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = (*remaining).min(buf.len() as u64) as usize;
                let data = buf.split_to(n).freeze();
                *remaining -= n as u64;
                if *remaining == 0 {
                    *self = Chunked::DataEnd(0);
                }
                return Ok(Decoded::Data(data));
            }
            if let Chunked::Done = self {
                return Ok(Decoded::Done);
            }
            let Some(&byte) = buf.first() else {
                return Ok(Decoded::NeedMore);
            };
            buf.advance(1);
            match self {
                Chunked::Size {
                    value,
                    digits,
                    line,
                    ext,
                    cr,
                } => {
                    *line += 1;
                    if *line > MAX_CHUNK_LINE {
                        return Err("a chunk-size line is too long".into());
                    }
                    match byte {
                        b'\n' if *cr => {
                            if *digits == 0 {
                                return Err("a chunk without a size".into());
                            }
                            *self = if *value == 0 {
                                Chunked::Trailers {
                                    total: 0,
                                    line: 0,
                                    cr: false,
                                }
                            } else {
                                Chunked::Data(*value)
                            };
                        }
                        b'\r' if !*cr => *cr = true,
                        _ if *cr => return Err("a bare CR in a chunk-size line".into()),
                        b';' | b' ' | b'\t' => *ext = true,
                        _ if *ext => {}
                        _ => {
                            let digit = (byte as char)
                                .to_digit(16)
                                .ok_or("a malformed chunk size")?;
                            *digits += 1;
                            if *digits > 15 {
                                return Err("a chunk size out of range".into());
                            }
                            *value = *value * 16 + u64::from(digit);
                        }
                    }
                }
                Chunked::DataEnd(seen) => match (*seen, byte) {
                    (0, b'\r') => *seen = 1,
                    (1, b'\n') => {
                        *self = Chunked::Size {
                            value: 0,
                            digits: 0,
                            line: 0,
                            ext: false,
                            cr: false,
                        }
                    }
                    _ => return Err("chunk data is not followed by CRLF".into()),
                },
                Chunked::Trailers { total, line, cr } => {
                    *total += 1;
                    if *total > MAX_TRAILERS {
                        return Err("the trailers are too long".into());
                    }
                    match byte {
                        b'\r' if !*cr => *cr = true,
                        b'\n' if *cr => {
                            if *line == 0 {
                                *self = Chunked::Done;
                            } else {
                                *line = 0;
                                *cr = false;
                            }
                        }
                        _ if *cr => return Err("a bare CR in the trailers".into()),
                        _ => *line += 1,
                    }
                }
                Chunked::Data(_) | Chunked::Done => {}
            }
        }
    }
}

/// A response body read from its upstream connection by whoever polls it;
/// the connection goes back to the pool when the body ends cleanly, and is
/// closed when it is dropped before that.
pub struct RawBody {
    conn: Option<RawConn>,
    framing: Framing,
    reusable: bool,
    pool: Arc<EndpointPool>,
}

impl RawBody {
    fn done(&self) -> bool {
        matches!(
            self.framing,
            Framing::Length(0) | Framing::Chunked(Chunked::Done)
        )
    }

    /// Gives the connection back once the body has ended.
    fn finish_if_done(&mut self) {
        if self.done()
            && let Some(conn) = self.conn.take()
            && self.reusable
            // Bytes past the response: the upstream is confused.
            && conn.buf.is_empty()
        {
            self.pool.raw_checkin(conn);
        }
    }
}

impl Body for RawBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.done() {
                this.finish_if_done();
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // What is already read.
            let data = match &mut this.framing {
                Framing::Length(remaining) if !conn.buf.is_empty() => {
                    let n = (*remaining).min(conn.buf.len() as u64) as usize;
                    *remaining -= n as u64;
                    Some(conn.buf.split_to(n).freeze())
                }
                Framing::Eof if !conn.buf.is_empty() => Some(conn.buf.split().freeze()),
                Framing::Chunked(chunked) => match chunked.decode(&mut conn.buf) {
                    Ok(Decoded::Data(data)) => Some(data),
                    Ok(Decoded::Done) => continue,
                    Ok(Decoded::NeedMore) => None,
                    Err(e) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                _ => None,
            };
            if let Some(data) = data {
                this.finish_if_done();
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            // More from the socket.
            conn.buf.reserve(READ_SIZE);
            let read = std::task::ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.stream),
                cx,
                &mut conn.buf
            ));
            match read {
                Ok(0) => {
                    this.conn = None;
                    return Poll::Ready(match this.framing {
                        // Read to the end: this is the end.
                        Framing::Eof => {
                            this.framing = Framing::Length(0);
                            None
                        }
                        _ => Some(Err("the upstream closed before the body's end".into())),
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], split: usize) -> Result<Vec<u8>, BoxError> {
        let mut chunked = Chunked::Size {
            value: 0,
            digits: 0,
            line: 0,
            ext: false,
            cr: false,
        };
        let mut out = Vec::new();
        let mut buf = BytesMut::new();
        for piece in input.chunks(split.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                match chunked.decode(&mut buf)? {
                    Decoded::Data(d) => out.extend_from_slice(&d),
                    Decoded::NeedMore => break,
                    Decoded::Done => return Ok(out),
                }
            }
        }
        Err("unfinished".into())
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let body = b"5;name=value\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-checksum: 1\r\n\r\n";
        for split in 1..body.len() {
            assert_eq!(
                decode_all(body, split).unwrap(),
                b"helloabcdefghijklmnopqrstuvwxyz",
                "split every {split}"
            );
        }
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"\r\n",
            b"5\rX\nhello\r\n0\r\n\r\n",
            b"ffffffffffffffff\r\n",
        ] {
            assert!(
                decode_all(bad, 3).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn heads_are_parsed_with_their_framing() {
        let (head, len) =
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: b\r\n\r\nhello")
                .unwrap()
                .unwrap();
        assert_eq!(
            (head.status, len, head.keep_alive),
            (StatusCode::OK, 46, true)
        );
        assert!(matches!(
            framing(&Method::GET, &head).unwrap(),
            Framing::Length(5)
        ));
        assert!(matches!(
            framing(&Method::HEAD, &head).unwrap(),
            Framing::Length(0)
        ));
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-le")
                .unwrap()
                .is_none()
        );
        let (close, _) = parse_head(b"HTTP/1.1 200 OK\r\nconnection: keep-alive, close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!close.keep_alive);
        assert!(matches!(
            framing(&Method::GET, &close).unwrap(),
            Framing::Eof
        ));
        let (old, _) = parse_head(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!old.keep_alive);
        let (two, _) =
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(framing(&Method::GET, &two).is_err());
        let (te, _) = parse_head(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 3\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(matches!(
            framing(&Method::GET, &te).unwrap(),
            Framing::Chunked(_)
        ));
        let many: String = (0..200).map(|i| format!("x-{i}: v\r\n")).collect();
        assert!(parse_head(format!("HTTP/1.1 200 OK\r\n{many}\r\n").as_bytes()).is_err());
        assert!(parse_head(b"HTTP/1.1 2000 OK\r\n\r\n").is_err());
    }
}
