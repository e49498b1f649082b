//! Client channels to one address over HTTP/2.
//!
//! The direct form, for a known address; `trellis::balanced_channel`
//! makes one of these per discovered endpoint under a balancer.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::TransportError;

/// Timeouts and keep-alive for a client channel.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// How long to wait for the TCP connection and HTTP/2 handshake. Default: 3 s.
    pub connect_timeout: Duration,
    /// Per-request timeout, also sent as `grpc-timeout` so the server gives
    /// up at the same time. `None` leaves calls unbounded. Default: 10 s.
    pub request_timeout: Option<Duration>,
    /// HTTP/2 keep-alive ping interval; `None` disables pings. Default: 30 s.
    pub keepalive_interval: Option<Duration>,
    /// How long to wait for a ping's ack before the connection is closed. Default: 10 s.
    pub keepalive_timeout: Duration,
    /// Speak TLS with this configuration (its roots verify the server;
    /// with a client certificate, mutual TLS). The address may still be
    /// written `http://` or bare. Default: none (plaintext HTTP/2).
    /// Held as [`crate::tls::Reloading`] so a renewed client certificate is
    /// used by the next connection.
    #[cfg(feature = "tls")]
    pub tls: Option<crate::tls::Reloading<rustls::ClientConfig>>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Some(Duration::from_secs(10)),
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(10),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

fn endpoint(target: &str, config: &ClientConfig) -> Result<Endpoint, TransportError> {
    let uri = if target.contains("://") {
        target.to_owned()
    } else {
        format!("http://{target}")
    };
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|e| TransportError::InvalidUri {
            uri,
            reason: e.to_string(),
        })?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .keep_alive_timeout(config.keepalive_timeout)
        .keep_alive_while_idle(config.keepalive_interval.is_some());
    if let Some(interval) = config.keepalive_interval {
        endpoint = endpoint.http2_keep_alive_interval(interval);
    }
    if let Some(timeout) = config.request_timeout {
        endpoint = endpoint.timeout(timeout);
    }
    Ok(endpoint)
}

/// Connects to `target` (`host:port` or `http://host:port`) and returns a
/// channel for generated tonic clients; fails if the connection cannot be
/// made within the connect timeout.
pub async fn connect(target: &str, config: &ClientConfig) -> Result<Channel, TransportError> {
    let endpoint = endpoint(target, config)?;
    #[cfg(feature = "tls")]
    if let Some(tls) = &config.tls {
        return endpoint
            .connect_with_connector(tls_connector(tls.clone()))
            .await
            .map_err(|source| TransportError::Connect {
                uri: target.to_owned(),
                source,
            });
    }
    endpoint
        .connect()
        .await
        .map_err(|source| TransportError::Connect {
            uri: target.to_owned(),
            source,
        })
}

/// Like [`connect`], but connects on first use and reconnects as needed.
pub fn connect_lazy(target: &str, config: &ClientConfig) -> Result<Channel, TransportError> {
    let endpoint = endpoint(target, config)?;
    #[cfg(feature = "tls")]
    if let Some(tls) = &config.tls {
        return Ok(endpoint.connect_with_connector_lazy(tls_connector(tls.clone())));
    }
    Ok(endpoint.connect_lazy())
}

/// TCP, then a TLS handshake naming the URI's host (an IP address or a DNS
/// name, verified against the server's certificate).
#[cfg(feature = "tls")]
fn tls_connector(
    config: crate::tls::Reloading<rustls::ClientConfig>,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |uri: http::Uri| {
        let connector = tokio_rustls::TlsConnector::from(config.load_full());
        async move {
            let invalid = |what: &str| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{uri}: {what}"))
            };
            let host = uri.host().ok_or_else(|| invalid("no host"))?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| invalid("not a host name or address"))?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        }
    })
}
