//! Mutual TLS on the serving core: a client is refused at the handshake
//! without a certificate, with one from another authority or with an
//! expired one; a verified client's identity (its SPIFFE ID) reaches the
//! handler; the gRPC client speaks mTLS; a renewed server certificate is
//! used by new connections while open ones carry on.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use axum::{Router, extract::Request, routing::get};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use trellis_core::{Drain, Lifecycle, PeerIdentity, Server, State};
use trellis_transport::{ClientConfig, GrpcHttpServer, ServerConfig, tls};

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// (certificate PEM, key PEM) for `service`, signed by `ca`.
fn leaf(ca: &Ca, service: &str, expired: bool) -> (String, String) {
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, service);
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    params.subject_alt_names.push(SanType::URI(
        format!("spiffe://trellis/{service}").try_into().unwrap(),
    ));
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

struct Running {
    addr: SocketAddr,
    tls: Arc<ArcSwap<rustls::ServerConfig>>,
    stop: CancellationToken,
    _lifecycle: Lifecycle,
}

async fn server(ca: &Ca) -> Running {
    let (cert, key) = leaf(ca, "user", false);
    let config =
        tls::server_config_mtls(cert.as_bytes(), key.as_bytes(), ca.pem.as_bytes(), "test")
            .unwrap();
    let tls = Arc::new(ArcSwap::new(config));
    // Echoes the caller's identity as the server saw it.
    let whoami = Router::new().route(
        "/whoami",
        get(|request: Request| async move {
            request
                .extensions()
                .get::<PeerIdentity>()
                .map_or_else(|| "nobody".to_owned(), |p| p.0.to_string())
        }),
    );
    let server = GrpcHttpServer::builder(ServerConfig {
        tls: Some(tls.clone()),
        ..ServerConfig::default()
    })
    .http_router(whoami)
    .bind()
    .await
    .unwrap();
    let addr = server.local_addr();
    let lifecycle = Lifecycle::new();
    lifecycle.advance(State::Ready);
    let stop = CancellationToken::new();
    tokio::spawn(Box::new(server).serve(
        lifecycle.subscribe(),
        Drain::new(stop.clone(), Duration::from_millis(100)),
    ));
    Running {
        addr,
        tls,
        stop,
        _lifecycle: lifecycle,
    }
}

fn client_config(ca: &Ca, identity: Option<&(String, String)>) -> Arc<rustls::ClientConfig> {
    let config = tls::client_config_mtls(
        ca.pem.as_bytes(),
        identity.map(|(c, k)| (c.as_bytes(), k.as_bytes())),
        "test",
    )
    .unwrap();
    // HTTP/1.1 for the hand-written requests below.
    let mut config = (*config).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// One TLS connection: the handshake's outcome, then (if it succeeded)
/// `GET path`'s body and the server certificate's DER.
async fn get_over_tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    path: &str,
) -> Result<(String, Vec<u8>), String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut stream = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let server_cert = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    // With TLS 1.3 a refused client certificate shows up as an alert on the
    // first read, not in the client's handshake.
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .map_err(|_| "no answer in 10 s".to_owned())?
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Ok((body, server_cert))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_current_certificates_of_the_authority() {
    let shop = ca("trellis dev CA");
    let s = server(&shop).await;
    // A client with a certificate from the authority: served, and the
    // handler sees who it is.
    let order = leaf(&shop, "order", false);
    let (body, _) = get_over_tls(s.addr, client_config(&shop, Some(&order)), "/whoami")
        .await
        .unwrap();
    assert!(body.contains("spiffe://trellis/order"), "{body}");

    // No certificate, another authority's, an expired one: refused.
    let stranger = ca("another CA");
    let foreign = leaf(&stranger, "order", false);
    let expired = leaf(&shop, "order", true);
    for (what, config) in [
        ("no certificate", client_config(&shop, None)),
        ("another authority", client_config(&shop, Some(&foreign))),
        ("expired", client_config(&shop, Some(&expired))),
    ] {
        let outcome = get_over_tls(s.addr, config, "/whoami").await;
        assert!(
            outcome.is_err(),
            "{what}: served anyway: {:?}",
            outcome.map(|o| o.0)
        );
    }
    s.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_client_speaks_mutual_tls() {
    let shop = ca("trellis dev CA");
    let s = server(&shop).await;
    let (cert, key) = leaf(&shop, "order", false);
    let config = ClientConfig {
        tls: Some(tls::fixed(
            tls::client_config_mtls(
                shop.pem.as_bytes(),
                Some((cert.as_bytes(), key.as_bytes())),
                "test",
            )
            .unwrap(),
        )),
        ..ClientConfig::default()
    };
    let channel = trellis_transport::connect(&s.addr.to_string(), &config)
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    assert_eq!(answer.into_inner().status, 1, "SERVING");
    // Without its certificate the same client is refused.
    let bare = ClientConfig {
        tls: Some(tls::fixed(
            tls::client_config_mtls(shop.pem.as_bytes(), None, "test").unwrap(),
        )),
        ..ClientConfig::default()
    };
    let refused = match trellis_transport::connect(&s.addr.to_string(), &bare).await {
        Err(_) => true,
        Ok(channel) => tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate was served");
    s.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_used_by_new_connections_without_dropping_open_ones() {
    let shop = ca("trellis dev CA");
    let s = server(&shop).await;
    let order = leaf(&shop, "order", false);
    let (cert, key) = leaf(&shop, "order", false);
    let grpc = ClientConfig {
        tls: Some(tls::fixed(
            tls::client_config_mtls(
                shop.pem.as_bytes(),
                Some((cert.as_bytes(), key.as_bytes())),
                "test",
            )
            .unwrap(),
        )),
        ..ClientConfig::default()
    };
    let channel = trellis_transport::connect(&s.addr.to_string(), &grpc)
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    let (_, before) = get_over_tls(s.addr, client_config(&shop, Some(&order)), "/whoami")
        .await
        .unwrap();

    // Renew: a new certificate and key for the server.
    let (new_cert, new_key) = leaf(&shop, "user", false);
    s.tls.store(
        tls::server_config_mtls(
            new_cert.as_bytes(),
            new_key.as_bytes(),
            shop.pem.as_bytes(),
            "renewed",
        )
        .unwrap(),
    );
    let (_, after) = get_over_tls(s.addr, client_config(&shop, Some(&order)), "/whoami")
        .await
        .unwrap();
    assert_ne!(
        before, after,
        "a new connection still got the old certificate"
    );
    let renewed = rustls::pki_types::CertificateDer::from_pem_slice(new_cert.as_bytes()).unwrap();
    assert_eq!(after, renewed.to_vec());
    // The connection opened before the renewal still works.
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    s.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_are_reloaded_when_they_change() {
    let shop = ca("trellis dev CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file, ca_file) = (
        dir.path().join("user.pem"),
        dir.path().join("user-key.pem"),
        dir.path().join("ca.pem"),
    );
    let (cert, key) = leaf(&shop, "user", false);
    std::fs::write(&cert_file, &cert).unwrap();
    std::fs::write(&key_file, &key).unwrap();
    std::fs::write(&ca_file, &shop.pem).unwrap();
    let (c, k, a) = (cert_file.clone(), key_file.clone(), ca_file.clone());
    let (reloading, mut reloads) = tls::follow_files_counted(
        vec![cert_file.clone(), key_file.clone(), ca_file.clone()],
        Duration::from_millis(50),
        move || tls::load_server(&c, &k, Some(&a)),
    )
    .unwrap();
    let server = GrpcHttpServer::builder(ServerConfig {
        tls: Some(reloading.clone()),
        ..ServerConfig::default()
    })
    .bind()
    .await
    .unwrap();
    let addr = server.local_addr();
    let lifecycle = Lifecycle::new();
    lifecycle.advance(State::Ready);
    let stop = CancellationToken::new();
    tokio::spawn(Box::new(server).serve(
        lifecycle.subscribe(),
        Drain::new(stop.clone(), Duration::from_millis(100)),
    ));
    let order = leaf(&shop, "order", false);
    let (_, first) = get_over_tls(addr, client_config(&shop, Some(&order)), "/readyz")
        .await
        .unwrap();

    // A renewal written in two steps: a certificate without its key fails
    // to build and is skipped until the key is there too.
    let (new_cert, new_key) = leaf(&shop, "user", false);
    std::fs::write(&cert_file, &new_cert).unwrap();

    std::fs::write(&key_file, &new_key).unwrap();
    let renewed = rustls::pki_types::CertificateDer::from_pem_slice(new_cert.as_bytes())
        .unwrap()
        .to_vec();
    // Wait for the rebuild itself; with the key written last, the first
    // rebuild that succeeds is the whole renewal.
    tokio::time::timeout(Duration::from_secs(10), reloads.changed())
        .await
        .expect("the renewal was never picked up")
        .unwrap();
    let (_, seen) = get_over_tls(addr, client_config(&shop, Some(&order)), "/readyz")
        .await
        .unwrap();
    assert_ne!(seen, first);
    assert_eq!(seen, renewed, "the renewed certificate was never served");
    stop.cancel();
}
