//! `trellis gateway` as a process in front of `trellis serve user`, both
//! registered in a real etcd: the gateway discovers the service, proxies
//! REST and gRPC to it, reports RED metrics by route on its admin port,
//! and exits 0 on SIGTERM.

mod support;

use std::time::Duration;

use trellis_testkit::{Etcd, http};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_discovers_a_service_and_proxies_to_it() {
    let etcd = Etcd::start().expect("etcd starts");
    let registry = format!("etcd://{}", etcd.addr());
    let data = tempfile::tempdir().expect("temp dir");
    let listen = format!("127.0.0.1:{}", trellis_testkit::free_port().expect("port"));
    let mut user = support::spawn(&[
        "serve",
        "user",
        "--listen",
        &listen,
        "--data-dir",
        data.path().to_str().expect("utf-8 path"),
        "--registry",
        &registry,
    ]);
    user.line_starting_with("user serving");

    let doc = data.path().join("gateway.toml");
    std::fs::write(
        &doc,
        r#"
[upstreams.user]
discover = "user"

[routes.users]
prefix = "/v1/users"
upstream = "user"

[routes.user_grpc]
prefix = "/shop.user.v1.UserService"
upstream = "user"
"#,
    )
    .expect("write the gateway document");
    let admin: std::net::SocketAddr =
        format!("127.0.0.1:{}", trellis_testkit::free_port().expect("port"))
            .parse()
            .expect("address");
    let gateway_port = trellis_testkit::free_port().expect("port");
    let mut gateway = support::spawn(&[
        "gateway",
        "--config",
        doc.to_str().expect("utf-8 path"),
        "--listen",
        &format!("127.0.0.1:{gateway_port}"),
        "--admin-listen",
        &admin.to_string(),
        "--registry",
        &registry,
    ]);
    let line = gateway.line_starting_with("gateway");
    assert!(line.contains("2 routes"), "{line}");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{gateway_port}")
        .parse()
        .expect("address");

    // The discovered instance may take a moment to appear: wait for the
    // first answer that is not "no endpoints", with a deadline.
    // The gateway finds the instance in etcd once it has registered; the
    // gateway is another process, so it is asked until it answers.
    let found = http::poll_until(addr, "/v1/users", Duration::from_secs(10), |r| {
        r.status == 200
    })
    .await
    .expect("GET through the gateway");
    assert_eq!(
        found.status, 200,
        "the gateway never found the user service: {}",
        found.body
    );
    let created = http::request(
        addr,
        "POST",
        "/v1/users",
        Some(r#"{"email":"ada@example.com","displayName":"Ada"}"#),
    )
    .await
    .expect("POST through the gateway");
    assert_eq!(created.status, 200, "{}", created.body);
    let user_json: serde_json::Value = serde_json::from_str(&created.body).expect("JSON");
    let id = user_json["id"].as_str().expect("an id").to_owned();

    let got = http::get(addr, &format!("/v1/users/{id}"))
        .await
        .expect("GET");
    assert_eq!(got.status, 200, "{}", got.body);
    assert!(got.body.contains("ada@example.com"), "{}", got.body);

    // gRPC through the same port.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = shop_user::api::v1::user_service_client::UserServiceClient::new(channel);
    let reply = client
        .get_user(shop_user::api::v1::GetUserRequest { id: id.clone() })
        .await
        .expect("GetUser through the gateway");
    assert_eq!(reply.into_inner().email, "ada@example.com");

    // RED metrics by route name, on the admin port only.
    let metrics = http::get(admin, "/metrics").await.expect("metrics");
    assert!(
        metrics.body.contains("gateway_routes 2"),
        "{}",
        metrics.body
    );
    assert!(
        metrics.body.contains(r#"route="users""#),
        "{}",
        metrics.body
    );
    // And by upstream: every attempt's answer class and time to head.
    assert!(
        metrics
            .body
            .lines()
            .any(|l| l
                .starts_with(r#"gateway_upstream_responses_total{upstream="user",class="2xx"}"#)),
        "{}",
        metrics.body
    );
    assert!(
        metrics
            .body
            .contains(r#"gateway_upstream_duration_seconds_count{upstream="user"}"#),
        "{}",
        metrics.body
    );
    trellis_testkit::Prometheus::check_metrics(&metrics.body)
        .unwrap_or_else(|complaints| panic!("promtool: {complaints}\n{}", metrics.body));
    assert_eq!(
        http::get(addr, "/metrics").await.expect("main port").status,
        404
    );
    assert_eq!(
        http::get(admin, "/readyz").await.expect("readyz").status,
        200
    );
    // What it runs, on the admin port: routes, the discovered endpoint.
    let view = http::get(admin, "/gateway").await.expect("admin view");
    assert_eq!(view.status, 200, "{}", view.body);
    let view: serde_json::Value = serde_json::from_str(&view.body).expect("JSON");
    assert_eq!(view["routes"][0]["name"], "user_grpc");
    let endpoints = view["upstreams"]["user"]["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(endpoints.len(), 1, "{view}");
    assert_eq!(endpoints[0]["address"], listen.as_str());
    assert_eq!(view["reloads"][0]["result"], "applied");
    assert_eq!(
        http::get(addr, "/gateway").await.expect("main port").status,
        404
    );
    // The same, printed.
    let printed = tokio::process::Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["gateway", "routes", "--admin", &admin.to_string()])
        .output()
        .await
        .expect("trellis gateway routes runs");
    let out = String::from_utf8_lossy(&printed.stdout);
    assert!(
        printed.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&printed.stderr)
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("users ") && l.contains("user (100 %)")),
        "{out}"
    );
    assert!(out.contains(listen.as_str()), "{out}");

    gateway.signal(15);
    let status = gateway.wait(Duration::from_secs(15));
    assert!(
        status.success(),
        "exit on SIGTERM: {status:?}; {}",
        gateway.stderr()
    );
    user.signal(15);
    user.wait(Duration::from_secs(15));
}
