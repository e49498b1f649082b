//! TLS for the serving core (feature `tls`): rustls on aws-lc-rs, the
//! platform's one crypto backend.
//!
//! ```no_run
//! # fn run() -> Result<(), trellis_transport::tls::TlsError> {
//! let config = trellis_transport::tls::load("cert.pem".as_ref(), "key.pem".as_ref())?;
//! // serve::serve_tls(listener, make, &limits, drain, Arc::new(ArcSwap::new(config)))
//! # Ok(()) }
//! ```

use std::{path::Path, sync::Arc};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// Why a TLS configuration could not be built; names the file.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// Which file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The PEM holds no certificate or no key, or rustls refused them.
    #[error("{what}: {reason}")]
    Invalid {
        /// What was being read (`certificate chain in cert.pem`).
        what: String,
        /// Why.
        reason: String,
    },
}

/// A server configuration from PEM text: the certificate chain (leaf
/// first) and its private key (PKCS#8, PKCS#1 or SEC1). ALPN offers `h2`
/// then `http/1.1`; TLS 1.2 and 1.3.
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    source: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let invalid = |what: &str, reason: String| TlsError::Invalid {
        what: format!("{what} in {source}"),
        reason,
    };
    let (chain, key) = identity_from_pem(cert_pem, key_pem, source)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| invalid("protocol versions", e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| invalid("certificate and key", e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration trusting the authorities in `ca_file` (PEM), or
/// the system's roots without one (`/etc/ssl/certs`, as `openssl` finds
/// them), offering `alpn` (e.g. `h2`, `http/1.1`); TLS 1.2 and 1.3.
pub fn client_config(
    ca_file: Option<&Path>,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_config_with(ca_file, None, alpn)
}

/// [`client_config`], presenting the certificate and key in `identity`
/// (PEM files) to servers that ask for one (mutual TLS).
pub fn client_config_with(
    ca_file: Option<&Path>,
    identity: Option<(&Path, &Path)>,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = match ca_file {
        Some(path) => roots_from_pem(
            &read(path)?,
            &format!("certificate authorities in {}", path.display()),
        )?,
        None => {
            // Unreadable entries are skipped; an empty store is refused.
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if roots.is_empty() {
                return Err(TlsError::Invalid {
                    what: "the system's certificate authorities".into(),
                    reason: "none found (install ca-certificates, or name a ca_file)".into(),
                });
            }
            roots
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError::Invalid {
        what: "protocol versions".into(),
        reason: e.to_string(),
    })?
    .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let source = cert.display().to_string();
            let (chain, key) = identity_from_pem(&read(cert)?, &read(key)?, &source)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Invalid {
                    what: format!("client certificate and key in {source}"),
                    reason: e.to_string(),
                })?
        }
    };
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
}

/// A certificate chain and its key from PEM text.
fn identity_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    source: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let invalid = |what: &str, reason: String| TlsError::Invalid {
        what: format!("{what} in {source}"),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| invalid("certificate chain", e.to_string()))?;
    if chain.is_empty() {
        return Err(invalid("certificate chain", "no CERTIFICATE block".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| invalid("private key", e.to_string()))?;
    Ok((chain, key))
}

/// [`server_config`] from two PEM files.
pub fn load(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| TlsError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    };
    server_config(
        &read(cert)?,
        &read(key)?,
        &format!("{} and {}", cert.display(), key.display()),
    )
}

/// A server configuration that also asks every client for a certificate
/// issued by one of the authorities in `client_ca_pem` (mutual TLS) and
/// refuses the handshake without one.
pub fn server_config_mtls(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: &[u8],
    source: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let invalid = |what: &str, reason: String| TlsError::Invalid {
        what: format!("{what} in {source}"),
        reason,
    };
    let (chain, key) = identity_from_pem(cert_pem, key_pem, source)?;
    let roots = roots_from_pem(client_ca_pem, &format!("client authorities in {source}"))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| invalid("client authorities", e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("protocol versions", e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| invalid("certificate and key", e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn roots_from_pem(pem: &[u8], what: &str) -> Result<rustls::RootCertStore, TlsError> {
    let invalid = |reason: String| TlsError::Invalid {
        what: what.to_owned(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        roots
            .add(cert.map_err(|e| invalid(e.to_string()))?)
            .map_err(|e| invalid(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(invalid("no CERTIFICATE block".into()));
    }
    Ok(roots)
}

/// Reads a file for a TLS configuration, naming it when it cannot.
pub fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// The server configuration three files describe: certificate chain, key,
/// and — for mutual TLS — the authorities client certificates must chain to.
pub fn load_server(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let source = format!("{} and {}", cert.display(), key.display());
    match client_ca {
        None => server_config(&read(cert)?, &read(key)?, &source),
        Some(ca) => server_config_mtls(&read(cert)?, &read(key)?, &read(ca)?, &source),
    }
}

/// A client configuration trusting the authorities in `ca_pem` and, with
/// `identity` (certificate chain and key, PEM), presenting it to servers
/// that ask (mutual TLS); ALPN `h2`.
pub fn client_config_mtls(
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
    source: &str,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let invalid = |what: &str, reason: String| TlsError::Invalid {
        what: format!("{what} in {source}"),
        reason,
    };
    let roots = roots_from_pem(ca_pem, &format!("certificate authorities in {source}"))?;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| invalid("protocol versions", e.to_string()))?
    .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let (chain, key) = identity_from_pem(cert_pem, key_pem, source)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| invalid("client certificate and key", e.to_string()))?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration for gRPC from files: trusting `ca`, presenting
/// `identity` (certificate, key) when given; ALPN `h2`.
pub fn load_client(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_config_with(Some(ca), identity, vec![b"h2".to_vec()])
}

/// The identity in a verified peer certificate (DER): its first URI
/// subject alternative name, else its first DNS name.
pub fn peer_identity(cert: &[u8]) -> Option<trellis_core::PeerIdentity> {
    let names = san::names(cert)?;
    names
        .iter()
        .find(|(kind, _)| *kind == san::URI)
        .or_else(|| names.iter().find(|(kind, _)| *kind == san::DNS))
        .and_then(|(_, value)| std::str::from_utf8(value).ok())
        .filter(|s| !s.is_empty() && s.len() <= 512)
        .map(|s| trellis_core::PeerIdentity(s.into()))
}

/// A certificate's subject alternative names (RFC 5280 §4.2.1.6). The
/// certificate was verified by rustls first; this still refuses (None)
/// anything malformed rather than trusting lengths.
mod san {
    /// A `uniformResourceIdentifier` name.
    pub const URI: u8 = 0x86;
    /// A `dNSName` name.
    pub const DNS: u8 = 0x82;
    use trellis_core::der::{BOOLEAN, OCTET_STRING, OID, SEQUENCE, expect, tlv};
    const EXTENSIONS: u8 = 0xa3;
    /// id-ce-subjectAltName, 2.5.29.17.
    const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11];

    /// Every (kind, value) in the certificate's SAN extension.
    pub fn names(cert: &[u8]) -> Option<Vec<(u8, &[u8])>> {
        let (cert, _) = expect(cert, SEQUENCE)?;
        let (mut tbs, _) = expect(cert, SEQUENCE)?;
        while !tbs.is_empty() {
            let (tag, value, rest) = tlv(tbs)?;
            tbs = rest;
            if tag != EXTENSIONS {
                continue;
            }
            let (mut extensions, _) = expect(value, SEQUENCE)?;
            while !extensions.is_empty() {
                let (extension, rest) = expect(extensions, SEQUENCE)?;
                extensions = rest;
                let (oid, mut fields) = expect(extension, OID)?;
                if oid != SAN_OID {
                    continue;
                }
                if let Some((_, rest)) = expect(fields, BOOLEAN) {
                    fields = rest;
                }
                let (octets, _) = expect(fields, OCTET_STRING)?;
                let (mut general, _) = expect(octets, SEQUENCE)?;
                let mut names = Vec::new();
                while !general.is_empty() && names.len() < 64 {
                    let (kind, value, rest) = tlv(general)?;
                    general = rest;
                    names.push((kind, value));
                }
                return Some(names);
            }
        }
        Some(Vec::new())
    }
}

/// A configuration that is replaced while in use (renewed certificates):
/// each new connection takes the one held when it starts.
pub type Reloading<T> = Arc<arc_swap::ArcSwap<T>>;

/// Builds a configuration with `build` and builds it again whenever one of
/// `files` changes (checked every `every`: modification time and size), so
/// renewed certificates and keys are used without a restart and without
/// dropping open connections. A rebuild that fails is logged and the
/// previous configuration stays. Checking stops once nothing else holds the
/// configuration. Needs a Tokio runtime.
pub fn follow_files<T, F>(
    files: Vec<std::path::PathBuf>,
    every: std::time::Duration,
    build: F,
) -> Result<Reloading<T>, TlsError>
where
    T: Send + Sync + 'static,
    F: Fn() -> Result<Arc<T>, TlsError> + Send + 'static,
{
    follow_files_counted(files, every, build).map(|(config, _)| config)
}

/// [`follow_files`], with a receiver of how many times the configuration
/// was rebuilt since (to wait for a renewal instead of guessing when it
/// happened).
pub fn follow_files_counted<T, F>(
    files: Vec<std::path::PathBuf>,
    every: std::time::Duration,
    build: F,
) -> Result<(Reloading<T>, tokio::sync::watch::Receiver<u64>), TlsError>
where
    T: Send + Sync + 'static,
    F: Fn() -> Result<Arc<T>, TlsError> + Send + 'static,
{
    let (reloads, counted) = tokio::sync::watch::channel(0u64);
    let stamp = move |files: &[std::path::PathBuf]| {
        files
            .iter()
            .map(|f| {
                std::fs::metadata(f)
                    .ok()
                    .map(|m| (m.modified().ok(), m.len()))
            })
            .collect::<Vec<_>>()
    };
    let mut seen = stamp(&files);
    let current = Arc::new(arc_swap::ArcSwap::new(build()?));
    let weak = Arc::downgrade(&current);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(current) = weak.upgrade() else {
                return;
            };
            let now = stamp(&files);
            if now == seen {
                continue;
            }
            match build() {
                Ok(config) => {
                    current.store(config);
                    seen = now;
                    reloads.send_modify(|n| *n += 1);
                    tracing::info!(files = ?files, "TLS certificates reloaded");
                }
                // Half-written files: tried again on the next tick.
                Err(e) => tracing::warn!(error = %e, "TLS certificates not reloaded"),
            }
        }
    });
    Ok((current, counted))
}

/// A configuration that never changes, where a [`Reloading`] one is wanted.
pub fn fixed<T>(config: Arc<T>) -> Reloading<T> {
    Arc::new(arc_swap::ArcSwap::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_identity_is_the_first_uri_then_the_first_dns_name() {
        let uri = |s: &str| rcgen::SanType::URI(s.try_into().unwrap());
        let dns = |s: &str| rcgen::SanType::DnsName(s.try_into().unwrap());
        let ip = rcgen::SanType::IpAddress([127, 0, 0, 1].into());
        let der = cert_with(vec![
            dns("order.local"),
            ip.clone(),
            uri("spiffe://trellis/order"),
        ]);
        let id = peer_identity(&der).unwrap();
        assert_eq!(&*id.0, "spiffe://trellis/order");
        assert_eq!(id.name(), "order");
        let der = cert_with(vec![ip.clone(), dns("payment.local")]);
        assert_eq!(&*peer_identity(&der).unwrap().0, "payment.local");
        assert_eq!(peer_identity(&cert_with(vec![ip])), None);
    }

    #[test]
    fn malformed_certificates_have_no_identity_and_do_not_panic() {
        let der = cert_with(vec![rcgen::SanType::URI(
            "spiffe://trellis/order".try_into().unwrap(),
        )]);
        // Every truncation, and every single-byte change of the length
        // bytes near the front, is refused or read within bounds.
        for cut in 0..der.len() {
            let _ = peer_identity(&der[..cut]);
        }
        for i in 0..der.len().min(64) {
            let mut bad = der.clone();
            bad[i] ^= 0xff;
            let _ = peer_identity(&bad);
        }
        assert_eq!(peer_identity(&[]), None);
        assert_eq!(peer_identity(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }
}
