//! A tiny async HTTP/1.1 client for tests: one request per connection.
//!
//! Enough to probe `/readyz` or post JSON without a full client crate, and
//! explicit about connection refusal, which drain tests need to see.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A response: status, headers (lower-cased names) and body.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
    /// The body as text.
    pub body: String,
}

impl Response {
    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` on `addr` until `done` accepts the answer, for up to
/// `within`; the last answer (or the last error) when it never does.
///
/// For state that lives in another process (a child's readiness, a
/// gateway that has yet to see an instance in the registry): asking is
/// the only way to observe it, so this asks every
/// [`POLL_INTERVAL`](crate::wait::POLL_INTERVAL) until the deadline.
/// Within one process, wait on the event itself instead.
pub async fn poll_until(
    addr: SocketAddr,
    path: &str,
    within: Duration,
    done: impl Fn(&Response) -> bool,
) -> std::io::Result<Response> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let answer = get(addr, path).await;
        let finished = answer.as_ref().is_ok_and(&done);
        if finished || tokio::time::Instant::now() >= deadline {
            return answer;
        }
        tokio::time::sleep_until(
            (tokio::time::Instant::now() + crate::wait::POLL_INTERVAL).min(deadline),
        )
        .await;
    }
}

/// `GET path` on `addr`.
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    request(addr, "GET", path, None).await
}

/// Sends one request with an optional JSON body and reads the whole response.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json: Option<&str>,
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(addr).await?;
    let body = json.unwrap_or("");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if json.is_some() {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut raw))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no response within 60 s")
        })??;
    parse(&raw)
}

/// Writes `request` as it is (head and body, for requests the other helpers
/// cannot make: any content type, a lying `Content-Length`, bytes that are
/// not UTF-8) and reads the response; `within` bounds the wait, so a server
/// that does not answer fails the test instead of hanging it. The request
/// should ask for `Connection: close`. A response the server sends before
/// it has read the whole request is read all the same.
pub async fn raw(addr: SocketAddr, request: &[u8], within: Duration) -> std::io::Result<Response> {
    let stream = TcpStream::connect(addr).await?;
    let (mut read, mut write) = stream.into_split();
    let request = request.to_vec();
    // Written on the side: a server that answers early stops reading, and
    // then a write blocks or fails, which is not the test's business.
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&request).await;
        write
    });
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, read.read(&mut chunk)).await {
            Err(_) => {
                writer.abort();
                if raw.is_empty() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no response within {within:?}"),
                    ));
                }
                break;
            }
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => raw.extend_from_slice(&chunk[..n]),
        }
    }
    writer.abort();
    parse(&raw)
}

fn parse(raw: &[u8]) -> std::io::Result<Response> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
