//! The `trellis` binary end to end: real processes, real ports, real signals.

mod support;

use std::{net::SocketAddr, process::Command, time::Duration};

use shop_user::api::v1::{
    CreateUserRequest, GetUserRequest, User, user_service_client::UserServiceClient,
};
use trellis_testkit::http;

async fn wait_ready(addr: SocketAddr) {
    let ready = http::poll_until(addr, "/readyz", Duration::from_secs(20), |r| {
        r.status == 200
    })
    .await;
    assert!(
        ready.as_ref().is_ok_and(|r| r.status == 200),
        "{addr} never became ready: {ready:?}"
    );
}

async fn create_and_get(addr: SocketAddr, email: &str) {
    create_and_get_as(addr, email, None).await
}

/// Creates a user over gRPC and reads it back, with a bearer token when
/// one is given.
async fn create_and_get_as(addr: SocketAddr, email: &str, token: Option<&str>) {
    let channel = trellis::transport::connect(&addr.to_string(), &Default::default())
        .await
        .unwrap();
    let bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
        token.map(|t| format!("Bearer {t}").parse().unwrap());
    let mut client =
        UserServiceClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
            if let Some(b) = &bearer {
                request.metadata_mut().insert("authorization", b.clone());
            }
            Ok(request)
        });
    let created = client
        .create_user(CreateUserRequest {
            user: Some(User {
                email: email.into(),
                display_name: "Grace".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let got = client
        .get_user(GetUserRequest {
            id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_the_shop_and_exits_zero_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let mut trellis = support::spawn(&[
        "up",
        "--base-port",
        "0",
        "--data-dir",
        data.path().to_str().unwrap(),
    ]);
    let header = trellis.line_starting_with("SERVICE");
    assert!(header.contains("ADMIN"), "{header}");
    // The gateway first, in front of every service.
    let front = trellis.line_starting_with("gateway");
    let gateway: SocketAddr = front.split_whitespace().nth(1).unwrap().parse().unwrap();
    let gateway_admin: SocketAddr = front.split_whitespace().nth(2).unwrap().parse().unwrap();
    let row = trellis.line_starting_with("user");
    let addr: SocketAddr = row.split_whitespace().nth(1).unwrap().parse().unwrap();
    let admin: SocketAddr = row.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(row.contains(&format!("http://{addr}/readyz")), "{row}");
    assert!(admin.ip().is_loopback(), "{row}");

    wait_ready(addr).await;
    create_and_get(addr, "grace@example.com").await;
    // Through the gateway: gRPC, and REST on the routes generated from the
    // protos. The user instance registers once ready; the gateway follows.
    wait_ready(gateway_admin).await;
    // The user routes want a token: register and log in through the
    // gateway (the auth service's routes are public), then call with it.
    let refused = http::poll_until(gateway, "/v1/users", Duration::from_secs(20), |r| {
        r.status != 503
    })
    .await
    .unwrap();
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert!(
        refused
            .header("www-authenticate")
            .is_some_and(|c| c.starts_with("Bearer"))
    );
    let token = &support::token_through(gateway, "ann@example.com").await;
    let listed = http::raw(
        gateway,
        format!("GET /v1/users HTTP/1.1\r\nHost: shop\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n").as_bytes(),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert!(listed.body.contains("grace@example.com"), "{}", listed.body);
    // The registered account is a user of the user service.
    assert!(listed.body.contains("ann@example.com"), "{}", listed.body);
    create_and_get_as(gateway, "ada@example.com", Some(token)).await;
    // Refresh and log out through the gateway: the refresh token rotates,
    // and after logout the login's tokens no longer refresh.
    let login = r#"{"email":"ann@example.com","password":"correct horse battery"}"#;
    let tokens = http::request(gateway, "POST", "/v1/auth/login", Some(login))
        .await
        .unwrap();
    let tokens: serde_json::Value = serde_json::from_str(&tokens.body).unwrap();
    let refresh = |token: &serde_json::Value| format!(r#"{{"refresh_token":{token}}}"#);
    let rotated = http::request(
        gateway,
        "POST",
        "/v1/auth/refresh",
        Some(&refresh(&tokens["refresh_token"])),
    )
    .await
    .unwrap();
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    let rotated: serde_json::Value = serde_json::from_str(&rotated.body).unwrap();
    assert_ne!(rotated["refresh_token"], tokens["refresh_token"]);
    let out = http::request(
        gateway,
        "POST",
        "/v1/auth/logout",
        Some(&refresh(&rotated["refresh_token"])),
    )
    .await
    .unwrap();
    assert_eq!(out.status, 200, "{}", out.body);
    let after = http::request(
        gateway,
        "POST",
        "/v1/auth/refresh",
        Some(&refresh(&rotated["refresh_token"])),
    )
    .await
    .unwrap();
    assert_eq!(after.status, 401, "{}", after.body);
    assert_eq!(http::get(gateway, "/metrics").await.unwrap().status, 404);
    // Operator endpoints: on the admin listener, never on the public port.
    for path in ["/metrics", "/debug/config"] {
        assert_eq!(http::get(admin, path).await.unwrap().status, 200, "{path}");
        assert_eq!(http::get(addr, path).await.unwrap().status, 404, "{path}");
    }
    for file in ["user.db", "auth.db", "auth-keys.secret", "auth-audit.jsonl"] {
        assert!(
            data.path().join(file).exists(),
            "{file} is not under --data-dir"
        );
    }

    trellis.signal(libc::SIGTERM);
    let status = trellis.wait(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "stderr: {}", trellis.stderr());
}

/// A call through the gateway with a bearer token.
async fn authed(
    gateway: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&str>,
) -> http::Response {
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: shop\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    http::raw(gateway, request.as_bytes(), Duration::from_secs(10))
        .await
        .unwrap()
}

/// Places an order through the gateway and waits for its checkout to end;
/// the order as GetOrder shows it.
async fn checkout(gateway: SocketAddr, token: &str, lines: &str) -> serde_json::Value {
    let placed = authed(gateway, "POST", "/v1/orders", token, Some(lines)).await;
    assert_eq!(placed.status, 200, "{}", placed.body);
    let placed: serde_json::Value = serde_json::from_str(&placed.body).unwrap();
    let id = placed["id"].as_str().unwrap().to_owned();
    trellis_testkit::eventually(Duration::from_secs(20), "the checkout ended", || async {
        let got = authed(gateway, "GET", &format!("/v1/orders/{id}"), token, None).await;
        assert_eq!(got.status, 200, "{}", got.body);
        let order: serde_json::Value = serde_json::from_str(&got.body).unwrap();
        if order["status"] == "ORDER_STATUS_PENDING" {
            Err(order)
        } else {
            Ok(order)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_checks_out_orders_with_sagas_behind_the_gateway() {
    let data = tempfile::tempdir().unwrap();
    let mut trellis = support::spawn(&[
        "up",
        "--base-port",
        "0",
        "--data-dir",
        data.path().to_str().unwrap(),
    ]);
    let front = trellis.line_starting_with("gateway");
    let gateway: SocketAddr = front.split_whitespace().nth(1).unwrap().parse().unwrap();
    let row = trellis.line_starting_with("saga");
    let coordinator: SocketAddr = row.split_whitespace().nth(1).unwrap().parse().unwrap();
    let token = &support::token_through(gateway, "cy@example.com").await;

    // The catalogue is public; the coordinator is not routed at all.
    let products = http::poll_until(
        gateway,
        "/v1/products/teapot",
        Duration::from_secs(20),
        |r| r.status != 503,
    )
    .await
    .unwrap();
    assert_eq!(products.status, 200, "{}", products.body);
    assert!(
        products.body.contains(r#""stock":"10""#),
        "{}",
        products.body
    );
    assert_eq!(
        authed(gateway, "GET", "/v1/sagas", token, None)
            .await
            .status,
        404
    );

    // Two teas: reserved, charged, committed, confirmed.
    let tea = checkout(gateway, token, r#"{"lines":[{"sku":"tea","quantity":2}]}"#).await;
    assert_eq!(tea["status"], "ORDER_STATUS_CONFIRMED", "{tea}");
    assert_eq!(tea["totalCents"], "900");
    assert_eq!(tea["saga"]["status"], "STATUS_SUCCEEDED", "{tea}");
    // Two teapots cost more than is left: the charge is refused, the
    // stock released, the order failed with the reason.
    let pots = checkout(
        gateway,
        token,
        r#"{"lines":[{"sku":"teapot","quantity":2}]}"#,
    )
    .await;
    assert_eq!(pots["status"], "ORDER_STATUS_FAILED", "{pots}");
    assert!(
        pots["failureReason"]
            .as_str()
            .unwrap()
            .contains("insufficient funds"),
        "{pots}"
    );
    assert_eq!(pots["saga"]["status"], "STATUS_COMPENSATED", "{pots}");
    assert_eq!(pots["saga"]["failedStep"], "charge", "{pots}");
    let teapot = http::get(gateway, "/v1/products/teapot").await.unwrap();
    assert!(
        teapot.body.contains(r#""stock":"10""#),
        "released: {}",
        teapot.body
    );
    let user = tea["userId"].as_str().unwrap();
    let account = authed(gateway, "GET", &format!("/v1/accounts/{user}"), token, None).await;
    assert!(
        account.body.contains(r#""balanceCents":"9100""#),
        "{}",
        account.body
    );
    // The orders are the caller's own.
    let mine = authed(gateway, "GET", "/v1/orders", token, None).await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&mine.body).unwrap()["orders"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "{}",
        mine.body
    );
    let other = support::token_through(gateway, "dee@example.com").await;
    let theirs = authed(
        gateway,
        "GET",
        &format!("/v1/orders/{}", tea["id"].as_str().unwrap()),
        &other,
        None,
    )
    .await;
    assert_eq!(theirs.status, 404, "{}", theirs.body);

    // The operator's view.
    let ls = std::process::Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["saga", "ls", "--coordinator", &coordinator.to_string()])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&ls.stdout);
    assert!(
        ls.status.success(),
        "{}",
        String::from_utf8_lossy(&ls.stderr)
    );
    assert!(
        listed.contains("compensated") && listed.contains("succeeded"),
        "{listed}"
    );
    let gid = pots["saga"]["gid"].as_str().unwrap();
    let show = std::process::Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "saga",
            "show",
            gid,
            "--coordinator",
            &coordinator.to_string(),
        ])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(shown.contains("failed   at charge"), "{shown}");
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("reserve") && l.contains("compensated")),
        "{shown}"
    );

    trellis.signal(libc::SIGTERM);
    let status = trellis.wait(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "stderr: {}", trellis.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_one_service_and_exits_zero_on_sigint() {
    let data = tempfile::tempdir().unwrap();
    let port = trellis_testkit::free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let mut trellis = support::spawn(&[
        "serve",
        "user",
        "--listen",
        &listen,
        "--data-dir",
        data.path().to_str().unwrap(),
    ]);
    let line = trellis.line_starting_with("user serving");
    let admin: SocketAddr = line
        .trim()
        .rsplit("admin on ")
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("no admin address in {line:?}: {e}"));
    let addr: SocketAddr = listen.parse().unwrap();
    wait_ready(addr).await;
    create_and_get(addr, "grace@example.com").await;
    assert_eq!(http::get(admin, "/metrics").await.unwrap().status, 200);
    assert_eq!(http::get(addr, "/metrics").await.unwrap().status, 404);
    trellis.signal(libc::SIGINT);
    assert_eq!(
        trellis.wait(Duration::from_secs(15)).code(),
        Some(0),
        "stderr: {}",
        trellis.stderr()
    );
}

#[test]
fn a_taken_port_names_the_port_and_the_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "serve",
            "user",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            "127.0.0.1:0",
            "--data-dir",
            data.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("port {port} is already in use")),
        "{stderr}"
    );
    assert!(stderr.contains("--listen"), "{stderr}");
}

#[test]
fn a_bad_database_url_names_it() {
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "serve",
            "user",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--data-dir",
            data.path().to_str().unwrap(),
        ])
        .args(["--database-url", "mysql://nowhere/shop"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The key and the flag that set it; not the value, a secret (a URL
    // may hold a password).
    assert!(
        stderr.contains("database.url") && stderr.contains("--database-url"),
        "{stderr}"
    );
    assert!(!stderr.contains("nowhere"), "{stderr}");
}
