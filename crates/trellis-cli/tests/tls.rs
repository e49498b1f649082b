//! `trellis up --tls`: development certificates made under the data dir,
//! mutual TLS between the services, HTTPS at the gateway — and the whole
//! token flow through it (register, which calls the user service over
//! mTLS; login; a protected route, reached over mTLS to the upstream).

mod support;

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tls_config(certs: &Path, identity: Option<&str>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(certs.join("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(name) => {
            let chain = CertificateDer::pem_file_iter(certs.join(format!("{name}.pem")))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(certs.join(format!("{name}-key.pem"))).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// One HTTPS request; (status, body), or why the connection failed.
async fn https(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from(addr.ip().to_string()).unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let body = body.unwrap_or("");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    head.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut out))
        .await
        .map_err(|_| "no answer in 20 s".to_owned())?
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {text:?}"))?;
    Ok((
        status,
        text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_tls_runs_the_token_flow_over_mutual_tls() {
    let data = tempfile::tempdir().unwrap();
    let mut trellis = support::spawn(&[
        "up",
        "--tls",
        "--base-port",
        "0",
        "--data-dir",
        data.path().to_str().unwrap(),
    ]);
    let gateway: SocketAddr = trellis
        .line_starting_with("gateway")
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let user_row = trellis.line_starting_with("user");
    let user: SocketAddr = user_row.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(user_row.contains("https://"), "{user_row}");
    let saga_row = trellis.line_starting_with("saga");
    let coordinator = saga_row.split_whitespace().nth(1).unwrap().to_owned();
    let certs = data.path().join("certs");
    let public = tls_config(&certs, None);

    // The gateway reaches the auth service's key set over mTLS once the
    // instance is registered (another process: asked until it answers).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let jwks = loop {
        let answer = https(
            gateway,
            public.clone(),
            "GET",
            "/.well-known/jwks.json",
            None,
            None,
        )
        .await;
        if answer.as_ref().is_ok_and(|(s, _)| *s == 200) || tokio::time::Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        jwks.as_ref().is_ok_and(|(_, b)| b.contains("Ed25519")),
        "{jwks:?}"
    );

    let account =
        r#"{"email":"ann@example.com","password":"correct horse battery","display_name":"Ann"}"#;
    let (status, body) = https(
        gateway,
        public.clone(),
        "POST",
        "/v1/auth/register",
        None,
        Some(account),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let login = r#"{"email":"ann@example.com","password":"correct horse battery"}"#;
    let (status, body) = https(
        gateway,
        public.clone(),
        "POST",
        "/v1/auth/login",
        None,
        Some(login),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let tokens: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = tokens["access_token"].as_str().unwrap();
    let (status, body) = https(
        gateway,
        public.clone(),
        "GET",
        "/v1/users",
        Some(token),
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("ann@example.com"), "{body}");

    // Straight to the user service: a shop certificate is served (so the
    // refusal below is the missing certificate's doing)...
    let (status, _) = https(
        user,
        tls_config(&certs, Some("gateway")),
        "GET",
        "/readyz",
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    // ...and a client without one never gets an answer.
    let refused = https(user, public.clone(), "GET", "/readyz", None, None).await;
    assert!(
        refused.is_err(),
        "served without a client certificate: {refused:?}"
    );

    // The operator's saga listing over mutual TLS: with a shop
    // certificate it answers, without one it cannot connect.
    let cert = |name: &str| certs.join(name).to_str().unwrap().to_owned();
    let saga_ls = |tls: &[String]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args(["saga", "ls", "--coordinator", &coordinator])
            .args(tls)
            .output()
            .unwrap()
    };
    let listed = saga_ls(&[
        "--ca-file".into(),
        cert("ca.pem"),
        "--cert-file".into(),
        cert("saga.pem"),
        "--key-file".into(),
        cert("saga-key.pem"),
    ]);
    assert!(
        listed.status.success() && String::from_utf8_lossy(&listed.stdout).starts_with("GID"),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(!saga_ls(&[]).status.success(), "listed without TLS");

    trellis.signal(libc::SIGTERM);
    let status = trellis.wait(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "stderr: {}", trellis.stderr());
}
