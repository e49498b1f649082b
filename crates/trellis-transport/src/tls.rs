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
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| invalid("certificate chain", e.to_string()))?;
    if chain.is_empty() {
        return Err(invalid("certificate chain", "no CERTIFICATE block".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| invalid("private key", e.to_string()))?;
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
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| TlsError::Read {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            let invalid = |reason: String| TlsError::Invalid {
                what: format!("certificate authorities in {}", path.display()),
                reason,
            };
            for cert in CertificateDer::pem_slice_iter(&pem) {
                roots
                    .add(cert.map_err(|e| invalid(e.to_string()))?)
                    .map_err(|e| invalid(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(invalid("no CERTIFICATE block".into()));
            }
        }
        None => {
            // Unreadable entries are skipped; an empty store is refused.
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if roots.is_empty() {
                return Err(TlsError::Invalid {
                    what: "the system's certificate authorities".into(),
                    reason: "none found (install ca-certificates, or name a ca_file)".into(),
                });
            }
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError::Invalid {
        what: "protocol versions".into(),
        reason: e.to_string(),
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
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
