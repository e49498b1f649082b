//! One bounded HTTP(S) GET, for key sets: no redirects followed, a
//! deadline, a size limit checked as the body arrives.

use std::{path::Path, time::Duration};

use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A TLS client trusting `ca_file`'s certificates, or the system's roots
/// without one; presenting `identity` (certificate, key) when given.
pub(crate) fn tls_connector(
    ca_file: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<tokio_rustls::TlsConnector, String> {
    trellis_transport::tls::client_config_with(ca_file, identity, vec![b"http/1.1".to_vec()])
        .map(tokio_rustls::TlsConnector::from)
        .map_err(|e| e.to_string())
}

/// GETs `uri` (http or https) within `timeout`; the body must be at most
/// `max_bytes`, the answer a 200.
pub(crate) async fn get(
    uri: &Uri,
    tls: Option<&tokio_rustls::TlsConnector>,
    timeout: Duration,
    max_bytes: usize,
) -> Result<Bytes, String> {
    tokio::time::timeout(timeout, get_inner(uri, tls, max_bytes))
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

async fn get_inner(
    uri: &Uri,
    tls: Option<&tokio_rustls::TlsConnector>,
    max_bytes: usize,
) -> Result<Bytes, String> {
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        other => return Err(format!("scheme {other:?}: expected http or https")),
    };
    let host = uri.host().ok_or("no host")?;
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let stream = TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
    let request = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(header::HOST, authority)
        .header(header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = if https {
        let connector = tls.ok_or("https without a TLS client")?;
        let name =
            rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                .map_err(|e| format!("server name {host:?}: {e}"))?;
        let stream = connector
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        send(TokioIo::new(stream), request).await?
    } else {
        send(TokioIo::new(stream), request).await?
    };
    if response.status() != StatusCode::OK {
        return Err(format!("answered {}", response.status()));
    }
    if let Some(len) = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > max_bytes as u64
    {
        return Err(format!("the body is {len} bytes, over {max_bytes}"));
    }
    let mut body = response.into_body();
    let mut out = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading the body: {e}"))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > max_bytes {
                return Err(format!("the body is over {max_bytes} bytes"));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

async fn send<IO>(
    io: IO,
    request: Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(async move {
        // The connection ends with the response; its error is the
        // request's, reported there.
        let _ = conn.await;
    });
    sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP: {e}"))
}
