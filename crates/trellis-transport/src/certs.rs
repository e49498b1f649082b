//! A development certificate authority (feature `dev-certs`): one CA and a
//! certificate per service, each naming the service as a SPIFFE ID
//! (`spiffe://trellis/<service>`) plus `localhost` and `127.0.0.1`, usable
//! as server and client certificate — what `trellis certs init` writes
//! and `trellis up --tls` runs with. For development and tests; production
//! certificates come from the organisation's CA (or cert-manager, SPIRE).
//!
//! ```no_run
//! # fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let made = trellis_transport::certs::init("./.trellis/certs".as_ref(), "trellis", &["user", "auth"])?;
//! println!("CA: {}", made.ca.display());
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// What [`init`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevCerts {
    /// The authority's certificate (PEM): every service's trust anchor.
    pub ca: PathBuf,
    /// Per service: (name, certificate, key).
    pub services: Vec<(String, PathBuf, PathBuf)>,
}

impl DevCerts {
    /// The files of `service`, as [`init`] names them in `dir`.
    pub fn paths(dir: &Path, service: &str) -> (PathBuf, PathBuf) {
        (
            dir.join(format!("{service}.pem")),
            dir.join(format!("{service}-key.pem")),
        )
    }
}

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// Generating or signing failed.
    #[error("making certificates: {0}")]
    Make(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("cannot write {path}: {error}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// `dir` already holds a CA: certificates are not silently replaced.
    #[error("{0} already exists; remove the directory to make new certificates")]
    Exists(String),
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), CertsError> {
    let fail = |error| CertsError::Write {
        path: path.display().to_string(),
        error,
    };
    #[cfg(unix)]
    {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if private { 0o600 } else { 0o644 })
            .open(path)
            .map_err(fail)?;
        file.write_all(text.as_bytes()).map_err(fail)
    }
    #[cfg(not(unix))]
    {
        let _ = private;
        std::fs::write(path, text).map_err(fail)
    }
}

/// Writes a new CA (`ca.pem`, `ca-key.pem`) and, for each of `services`,
/// `{service}.pem` and `{service}-key.pem` into `dir` (keys mode 0600),
/// with the SPIFFE ID `spiffe://{trust_domain}/{service}`. Refuses a `dir`
/// that already has a `ca.pem`.
pub fn init(dir: &Path, trust_domain: &str, services: &[&str]) -> Result<DevCerts, CertsError> {
    let ca_path = dir.join("ca.pem");
    if ca_path.exists() {
        return Err(CertsError::Exists(ca_path.display().to_string()));
    }
    std::fs::create_dir_all(dir).map_err(|error| CertsError::Write {
        path: dir.display().to_string(),
        error,
    })?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{trust_domain} development CA"));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = params.self_signed(&ca_key)?;
    write(&ca_path, &ca_cert.pem(), false)?;
    write(&dir.join("ca-key.pem"), &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(params, ca_key);
    let mut made = Vec::new();
    for &service in services {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, service);
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.subject_alt_names.push(SanType::URI(
            format!("spiffe://{trust_domain}/{service}").try_into()?,
        ));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        let (cert_path, key_path) = DevCerts::paths(dir, service);
        write(&cert_path, &cert.pem(), false)?;
        write(&key_path, &key.serialize_pem(), true)?;
        made.push((service.to_owned(), cert_path, key_path));
    }
    Ok(DevCerts {
        ca: ca_path,
        services: made,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_service_gets_a_certificate_naming_it_and_keys_stay_private() {
        let dir = tempfile::tempdir().unwrap();
        let made = init(dir.path(), "trellis", &["user", "auth"]).unwrap();
        assert_eq!(made.services.len(), 2);
        let (_, cert, key) = &made.services[0];
        let pem = std::fs::read(cert).unwrap();
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
            .next()
            .unwrap()
            .unwrap();
        let id = crate::tls::peer_identity(&der).unwrap();
        assert_eq!((&*id.0, id.name()), ("spiffe://trellis/user", "user"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // They make a working mutual-TLS pair.
        crate::tls::load_server(cert, key, Some(&made.ca)).unwrap();
        crate::tls::load_client(&made.ca, Some((cert, key))).unwrap();
        assert!(matches!(
            init(dir.path(), "trellis", &["user"]),
            Err(CertsError::Exists(_))
        ));
    }
}
