//! The user service with `server.auth` in its config: tokens verified
//! against a key set, rules per gRPC method that hold for the method's REST
//! face too, 401/403 over HTTP and UNAUTHENTICATED/PERMISSION_DENIED over
//! gRPC — no change to the service's code.

mod support;

use std::time::Duration;

use shop_user::{
    UserSettings,
    api::v1::{DeleteUserRequest, GetUserRequest, user_service_client::UserServiceClient},
};
use trellis::{auth::SigningKey, config::Config};
use trellis_testkit::http;

async fn with_token(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> http::Response {
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: user\r\nconnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    head.push_str(&format!(
        "content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ));
    http::raw(addr, head.as_bytes(), Duration::from_secs(10))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_auth_protects_both_faces_by_method() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate_ed25519("k1").unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        serde_json::to_vec(&serde_json::json!({ "keys": [key.jwk()] })).unwrap(),
    )
    .unwrap();
    let doc = dir.path().join("user.toml");
    std::fs::write(
        &doc,
        format!(
            r#"
[server.auth.tokens]
jwks_file = "{}"
issuer = "https://auth.shop"
audience = ["shop"]

[server.auth.access]
public = ["/shop.user.v1.UserService/GetUser"]
require = {{ "/shop.user.v1.UserService/DeleteUser" = ["admin"] }}

[server.auth.audit]
file = "{}"
"#,
            jwks.display(),
            dir.path().join("audit.jsonl").display()
        ),
    )
    .unwrap();
    let config = Config::<UserSettings>::builder()
        .file(&doc)
        .env_vars(Vec::new())
        .build()
        .await
        .unwrap();
    let running = support::serve(config, dir.path()).await;
    let addr = running.addr;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = |roles: &[&str]| {
        key.sign(&serde_json::json!({
            "iss": "https://auth.shop", "aud": "shop", "sub": "ada",
            "exp": now + 600, "roles": roles,
        }))
        .unwrap()
    };
    let customer = token(&["customer"]);
    let admin = token(&["admin"]);
    let user = r#"{"email":"ada@example.com","displayName":"Ada"}"#;

    // REST. Creating needs a token (the default); reading is public.
    let refused = with_token(addr, "POST", "/v1/users", None, Some(user)).await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert_eq!(
        refused.header("www-authenticate"),
        Some(r#"Bearer realm="trellis""#)
    );
    let created = with_token(addr, "POST", "/v1/users", Some(&customer), Some(user)).await;
    assert_eq!(created.status, 200, "{}", created.body);
    let id = serde_json::from_str::<serde_json::Value>(&created.body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let read = with_token(addr, "GET", &format!("/v1/users/{id}"), None, None).await;
    assert_eq!(read.status, 200, "GetUser's rule holds for its REST face");
    // Deleting needs admin: the method's rule, on the REST route.
    let forbidden = with_token(
        addr,
        "DELETE",
        &format!("/v1/users/{id}"),
        Some(&customer),
        None,
    )
    .await;
    assert_eq!(forbidden.status, 403, "{}", forbidden.body);
    assert!(forbidden.body.contains("admin"), "{}", forbidden.body);
    let bad = with_token(addr, "GET", "/v1/users", Some("a.b.c"), None).await;
    assert_eq!(bad.status, 401);

    // gRPC: the same rules.
    let channel = trellis::transport::connect(&addr.to_string(), &Default::default())
        .await
        .unwrap();
    let mut client = UserServiceClient::new(channel);
    let got = client
        .get_user(GetUserRequest { id: id.clone() })
        .await
        .expect("GetUser is public");
    assert_eq!(got.into_inner().email, "ada@example.com");
    let mut delete = tonic::Request::new(DeleteUserRequest { id: id.clone() });
    delete.metadata_mut().insert(
        "authorization",
        format!("Bearer {customer}").parse().unwrap(),
    );
    let err = client.delete_user(delete).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let err = client
        .delete_user(DeleteUserRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let mut delete = tonic::Request::new(DeleteUserRequest { id: id.clone() });
    delete
        .metadata_mut()
        .insert("authorization", format!("Bearer {admin}").parse().unwrap());
    client.delete_user(delete).await.expect("an admin deletes");

    // The trail: refusals with their reason, and the calls that changed
    // something (a REST POST; the admin's DeleteUser, a rule requiring a
    // permission) with who and the outcome — reads are not recorded.
    let trail = dir.path().join("audit.jsonl");
    let records = trellis::auth::audit::read_all(&trail).unwrap();
    let of = |kind: &str| {
        records
            .iter()
            .filter(|r| r.entry.kind == kind)
            .map(|r| (r.entry.action.clone(), r.entry.outcome.clone()))
            .collect::<Vec<_>>()
    };
    let create = "/shop.user.v1.UserService/CreateUser".to_owned();
    let delete = "/shop.user.v1.UserService/DeleteUser".to_owned();
    assert_eq!(
        of("call"),
        [
            (create.clone(), "200".to_owned()),
            (delete.clone(), "grpc-status 0".to_owned())
        ],
        "{records:#?}"
    );
    assert_eq!(
        of("forbidden"),
        [
            (delete.clone(), "refused: admin".to_owned()),
            (delete.clone(), "refused: admin".to_owned())
        ]
    );
    assert_eq!(
        of("token_refused"),
        [
            (create, "refused: missing".to_owned()),
            (
                "/shop.user.v1.UserService/ListUsers".to_owned(),
                "refused: malformed".to_owned()
            ),
            (delete, "refused: missing".to_owned()),
        ]
    );
    let calls: Vec<_> = records.iter().filter(|r| r.entry.kind == "call").collect();
    assert!(
        calls
            .iter()
            .all(|r| r.entry.subject.as_deref() == Some("ada"))
    );
    assert!(
        calls
            .iter()
            .all(|r| r.entry.client_ip.as_deref() == Some("127.0.0.1")),
        "{calls:#?}"
    );
    let report = trellis::auth::audit::verify(&trail).unwrap();
    assert_eq!(
        (report.records as usize, report.broken),
        (records.len(), None)
    );

    running.stop().await;
}

#[tokio::test]
async fn a_bad_auth_section_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("user.toml");
    std::fs::write(
        &doc,
        "[server.auth.tokens]\nissuer = \"https://auth.shop\"\naudience = [\"shop\"]\n",
    )
    .unwrap();
    let err = Config::<UserSettings>::builder()
        .file(&doc)
        .env_vars(Vec::new())
        .build()
        .await
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("server.auth.tokens.jwks_url"),
        "{err}"
    );
}
