//! The user service with `server.tls` (mutual TLS) and a peer rule in its
//! config: only `order` may create users; any service with a certificate
//! from the shop's authority may read; a client without one never gets past
//! the handshake. No change to the service's code.

mod support;

use shop_user::{
    UserSettings,
    api::v1::{CreateUserRequest, GetUserRequest, User, user_service_client::UserServiceClient},
};
use trellis::{
    auth::SigningKey,
    config::Config,
    transport::{ClientConfig, certs, tls},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_named_peer_may_create_users_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs_dir = dir.path().join("certs");
    let made = certs::init(&certs_dir, "trellis", &["user", "order", "auth"]).unwrap();
    let key = SigningKey::generate_ed25519("k1").unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        serde_json::to_vec(&serde_json::json!({ "keys": [key.jwk()] })).unwrap(),
    )
    .unwrap();
    let (cert, key_file) = certs::DevCerts::paths(&certs_dir, "user");
    let trail = dir.path().join("audit.jsonl");
    let doc = dir.path().join("user.toml");
    std::fs::write(
        &doc,
        format!(
            r#"
[server.tls]
cert_file = "{}"
key_file = "{}"
client_ca_file = "{}"

[server.auth.tokens]
jwks_file = "{}"
issuer = "https://auth.shop"
audience = ["shop"]

[server.auth.access]
public = ["/shop.user.v1.UserService/*"]
peers = {{ "/shop.user.v1.UserService/CreateUser" = ["order"] }}

[server.auth.audit]
file = "{}"
"#,
            cert.display(),
            key_file.display(),
            made.ca.display(),
            jwks.display(),
            trail.display()
        ),
    )
    .unwrap();
    let config = Config::<UserSettings>::builder()
        .env_vars(Vec::new())
        .file(&doc)
        .build()
        .await
        .unwrap();
    let running = support::serve(config, dir.path()).await;
    let addr = running.addr;

    let client_as = |service: Option<&str>| {
        let identity = service.map(|s| certs::DevCerts::paths(&certs_dir, s));
        let tls = tls::load_client(
            &made.ca,
            identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        )
        .unwrap();
        ClientConfig {
            tls: Some(tls::fixed(tls)),
            ..ClientConfig::default()
        }
    };
    let create = |email: &str| CreateUserRequest {
        user: Some(User {
            email: email.into(),
            display_name: "Ann".into(),
            ..User::default()
        }),
    };

    // `order` may create; the user is there to read.
    let channel = trellis::transport::connect(&addr.to_string(), &client_as(Some("order")))
        .await
        .unwrap();
    let mut order = UserServiceClient::new(channel);
    let created = order
        .create_user(create("ann@example.com"))
        .await
        .unwrap()
        .into_inner();

    // `auth` has a good certificate, and may read, but not create.
    let channel = trellis::transport::connect(&addr.to_string(), &client_as(Some("auth")))
        .await
        .unwrap();
    let mut auth = UserServiceClient::new(channel);
    let got = auth
        .get_user(GetUserRequest {
            id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.email, "ann@example.com");
    let refused = auth
        .create_user(create("bob@example.com"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("auth may not call"),
        "{refused:?}"
    );

    // Without a certificate: no connection at all.
    let bare = trellis::transport::connect(&addr.to_string(), &client_as(None)).await;
    let served = match bare {
        Err(_) => false,
        Ok(channel) => UserServiceClient::new(channel)
            .get_user(GetUserRequest { id: created.id })
            .await
            .is_ok(),
    };
    assert!(!served, "a client without a certificate was served");

    // The refusal is in the trail, with the peer's identity.
    let records = trellis::auth::audit::read_all(&trail).unwrap();
    let refusal = records
        .iter()
        .find(|r| r.entry.kind == "forbidden")
        .unwrap_or_else(|| panic!("no refusal in {records:#?}"));
    assert_eq!(refusal.entry.outcome, "refused: peer auth");
    assert_eq!(refusal.entry.peer.as_deref(), Some("spiffe://trellis/auth"));
    running.stop().await;
}
