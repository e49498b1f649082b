//! TLS settings for servers and clients: certificate files, the authority
//! that verifies the other side, and how often the files are read again.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use trellis_config::Invalid;
use trellis_transport::tls::{self, Reloading, TlsError};

/// `server.tls`: the service's certificate and, for mutual TLS, the
/// authority client certificates must chain to. Restart to turn on or off;
/// the files are followed while serving.
///
/// ```toml
/// [server.tls]
/// cert_file = "certs/user.pem"
/// key_file = "certs/user-key.pem"
/// client_ca_file = "certs/ca.pem"   # mutual TLS: every client shows a certificate
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsSettings {
    /// PEM: the certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM: its private key.
    pub key_file: PathBuf,
    /// PEM: authorities a client certificate must chain to; set, clients
    /// without one are refused at the handshake (mutual TLS), and each
    /// request carries the client's identity.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// How often the files are checked for renewal. Default: 10s.
    #[serde(default = "ten_seconds", with = "trellis_config::duration")]
    pub reload_interval: Duration,
}

/// `tls` of a client: the authority that verifies servers and, for mutual
/// TLS, the client's own certificate.
///
/// ```toml
/// [client.tls]
/// ca_file = "certs/ca.pem"
/// cert_file = "certs/order.pem"
/// key_file = "certs/order-key.pem"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsSettings {
    /// PEM: the authorities server certificates must chain to.
    pub ca_file: PathBuf,
    /// PEM: the client's certificate chain (with `key_file`: mutual TLS).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM: its private key.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// How often the files are checked for renewal. Default: 10s.
    #[serde(default = "ten_seconds", with = "trellis_config::duration")]
    pub reload_interval: Duration,
}

fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}

fn check_interval(prefix: &str, every: Duration) -> Result<(), Invalid> {
    if (Duration::from_millis(10)..=Duration::from_secs(3600)).contains(&every) {
        Ok(())
    } else {
        Err(Invalid::new(
            format!("{prefix}.reload_interval"),
            "must be between 10ms and 1h",
        ))
    }
}

impl ServerTlsSettings {
    /// Checks the settings (the files are read when the server starts).
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        check_interval(prefix, self.reload_interval)
    }

    /// The server configuration, followed as its files change.
    pub fn follow(&self) -> Result<Reloading<rustls::ServerConfig>, TlsError> {
        let mut files = vec![self.cert_file.clone(), self.key_file.clone()];
        files.extend(self.client_ca_file.clone());
        let this = self.clone();
        tls::follow_files(files, self.reload_interval, move || {
            tls::load_server(
                &this.cert_file,
                &this.key_file,
                this.client_ca_file.as_deref(),
            )
        })
    }
}

impl ClientTlsSettings {
    /// Checks the settings (the files are read when a client is built).
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(Invalid::new(
                format!("{prefix}.cert_file"),
                "cert_file and key_file come together",
            ));
        }
        check_interval(prefix, self.reload_interval)
    }

    /// The client configuration, followed as its files change.
    pub fn follow(&self) -> Result<Reloading<rustls::ClientConfig>, TlsError> {
        let mut files = vec![self.ca_file.clone()];
        files.extend(self.cert_file.clone());
        files.extend(self.key_file.clone());
        let this = self.clone();
        tls::follow_files(files, self.reload_interval, move || {
            let identity = this.cert_file.as_deref().zip(this.key_file.as_deref());
            tls::load_client(&this.ca_file, identity)
        })
    }
}
