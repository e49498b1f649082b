//! `trellis serve user` exports spans to the collector the standard
//! `OTEL_*` variables name, under its own resource, and flushes them on a
//! clean SIGTERM; a variable it cannot use stops it at start, named.

mod support;

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use shop_user::api::v1::{ListUsersRequest, user_service_client::UserServiceClient};
use support::Trellis;
use tonic::{Request, metadata::MetadataValue};
use trellis_testkit::OtlpReceiver;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exports_its_spans_to_the_collector_the_environment_names() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", trellis_testkit::free_port().unwrap())
        .parse()
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "serve",
            "user",
            "--listen",
            &listen.to_string(),
            "--admin-listen",
            "127.0.0.1:0",
            "--data-dir",
            data.path().to_str().unwrap(),
        ])
        .env("RUST_LOG", "info")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())
        .env(
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment.name=test",
        )
        // A long batch delay: only the flush on shutdown can deliver in time.
        .env("OTEL_BSP_SCHEDULE_DELAY", "60000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut server = Trellis::from_child(child);
    server.line_starting_with("user serving");

    let trace_id = "5b8aa5a2d2c872e8321cf37308d69df2";
    let channel = trellis::transport::connect(&listen.to_string(), &Default::default())
        .await
        .unwrap();
    let mut users = UserServiceClient::new(channel);
    let mut request = Request::new(ListUsersRequest {
        page_size: 1,
        page_token: String::new(),
    });
    request.metadata_mut().insert(
        "traceparent",
        MetadataValue::try_from(format!("00-{trace_id}-051581bf3cb55c13-01")).unwrap(),
    );
    users.list_users(request).await.unwrap();

    server.signal(libc::SIGTERM);
    assert_eq!(server.wait(Duration::from_secs(15)).code(), Some(0));
    let (found, spans) = receiver
        .wait_for(Duration::from_secs(5), |s| {
            s.iter().any(|s| s.trace_id() == trace_id)
        })
        .await;
    assert!(
        found,
        "no span of {trace_id} among {} received",
        spans.len()
    );
    let span = spans.iter().find(|s| s.trace_id() == trace_id).unwrap();
    assert_eq!(span.name(), "shop.user.v1.UserService/ListUsers");
    assert_eq!(span.parent_span_id(), "051581bf3cb55c13");
    assert_eq!(
        span.resource.get("service.name").map(String::as_str),
        Some("user")
    );
    assert_eq!(
        span.resource.get("service.version").map(String::as_str),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        span.resource
            .get("deployment.environment.name")
            .map(String::as_str),
        Some("test")
    );
    assert!(
        span.resource
            .get("service.instance.id")
            .is_some_and(|id| !id.is_empty())
    );
}

#[test]
fn an_unusable_otel_variable_stops_the_process_and_is_named() {
    let output = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "serve",
            "user",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env("OTEL_TRACES_SAMPLER", "sometimes")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("OTEL_TRACES_SAMPLER") && stderr.contains("sometimes"),
        "{stderr}"
    );
}

/// `otlp.headers` from config reach the collector with every export, and
/// never show: `/debug/config` says `[redacted]`, and the logs do not
/// carry the value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_headers_from_config_are_sent_and_never_shown() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("user.toml");
    std::fs::write(
        &file,
        format!(
            "[otlp]\nendpoint = \"{}\"\nheaders = {{ x-api-key = \"k-secret-123\" }}\n",
            receiver.endpoint()
        ),
    )
    .unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", trellis_testkit::free_port().unwrap())
        .parse()
        .unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", trellis_testkit::free_port().unwrap())
        .parse()
        .unwrap();
    let mut server = support::spawn_with_log(
        &[
            "serve",
            "user",
            "--listen",
            &listen.to_string(),
            "--admin-listen",
            &admin.to_string(),
            "--data-dir",
            data.path().to_str().unwrap(),
            "--config",
            file.to_str().unwrap(),
        ],
        Some("debug"),
    );
    server.line_starting_with("user serving");
    let view = trellis_testkit::http::get(admin, "/debug/config")
        .await
        .unwrap();
    let view: serde_json::Value = serde_json::from_str(&view.body).unwrap();
    assert_eq!(view["config"]["otlp"]["headers"], "[redacted]", "{view}");

    let trace_id = "6c8aa5a2d2c872e8321cf37308d69df3";
    let channel = trellis::transport::connect(&listen.to_string(), &Default::default())
        .await
        .unwrap();
    let mut request = Request::new(ListUsersRequest {
        page_size: 1,
        page_token: String::new(),
    });
    request.metadata_mut().insert(
        "traceparent",
        MetadataValue::try_from(format!("00-{trace_id}-051581bf3cb55c13-01")).unwrap(),
    );
    UserServiceClient::new(channel)
        .list_users(request)
        .await
        .unwrap();
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait(Duration::from_secs(15)).code(), Some(0));
    let (found, spans) = receiver
        .wait_for(Duration::from_secs(5), |s| {
            s.iter().any(|s| s.trace_id() == trace_id)
        })
        .await;
    assert!(
        found,
        "no span of {trace_id} among {} received",
        spans.len()
    );
    let span = spans.iter().find(|s| s.trace_id() == trace_id).unwrap();
    assert_eq!(
        span.metadata.get("x-api-key").map(String::as_str),
        Some("k-secret-123"),
        "{:?}",
        span.metadata
    );
    let stderr = server.stderr();
    assert!(stderr.contains("exporting over OTLP"), "{stderr}");
    assert!(!stderr.contains("k-secret-123"), "the secret was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_exports_a_span_per_request_and_one_per_upstream_attempt() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let user_listen = format!("127.0.0.1:{}", trellis_testkit::free_port().unwrap());
    let mut user = support::spawn(&[
        "serve",
        "user",
        "--listen",
        &user_listen,
        "--data-dir",
        data.path().to_str().unwrap(),
    ]);
    user.line_starting_with("user serving");
    // An endpoint that refuses connections: a free port nothing listens on.
    let dead = format!("127.0.0.1:{}", trellis_testkit::free_port().unwrap());
    let doc = data.path().join("gateway.toml");
    std::fs::write(
        &doc,
        format!(
            r#"
[upstreams.user]
targets = [{{ url = "http://{dead}" }}, {{ url = "http://{user_listen}" }}]
balance = "round_robin"
[routes.users]
prefix = "/v1/users"
upstream = "user"
retries = {{ attempts = 2, budget = 1.0 }}
"#
        ),
    )
    .unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", trellis_testkit::free_port().unwrap())
        .parse()
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "gateway",
            "--config",
            doc.to_str().unwrap(),
            "--listen",
            &listen.to_string(),
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "60000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut gateway = Trellis::from_child(child);
    gateway.line_starting_with("gateway");

    // Two traced requests: round robin sends one of them to the dead
    // endpoint first, and it goes again to the live one.
    let traces = [
        "0af7651916cd43dd8448eb211c80319c",
        "1af7651916cd43dd8448eb211c80319d",
    ];
    for trace in traces {
        let request = format!(
            "GET /v1/users HTTP/1.1\r\nhost: gw\r\nconnection: close\r\ntraceparent: 00-{trace}-b7ad6b7169203331-01\r\n\r\n"
        );
        let answer =
            trellis_testkit::http::raw(listen, request.as_bytes(), Duration::from_secs(10))
                .await
                .unwrap();
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    gateway.signal(libc::SIGTERM);
    assert_eq!(gateway.wait(Duration::from_secs(15)).code(), Some(0));
    let (found, spans) = receiver
        .wait_for(Duration::from_secs(5), |s| {
            traces
                .iter()
                .all(|t| s.iter().filter(|s| s.trace_id() == *t).count() >= 2)
        })
        .await;
    assert!(found, "spans of both traces: {} received", spans.len());
    let mut attempts = Vec::new();
    for trace in traces {
        let of: Vec<_> = spans.iter().filter(|s| s.trace_id() == trace).collect();
        let server: Vec<_> = of
            .iter()
            .filter(|s| s.kind() == trellis_testkit::opentelemetry_proto::tonic::trace::v1::span::SpanKind::Server)
            .collect();
        assert_eq!(server.len(), 1, "one server span per request: {of:#?}");
        assert_eq!(server[0].parent_span_id(), "b7ad6b7169203331");
        let clients: Vec<_> = of
            .iter()
            .filter(|s| s.kind() == trellis_testkit::opentelemetry_proto::tonic::trace::v1::span::SpanKind::Client)
            .collect();
        assert!(
            clients
                .iter()
                .all(|c| c.parent_span_id() == server[0].span_id()),
            "client spans are children of the server span: {of:#?}"
        );
        if clients.len() == 2 {
            // The attempt at the dead endpoint failed, the other did not.
            let errors = clients
                .iter()
                .filter(|c| {
                    c.status()
                        == trellis_testkit::opentelemetry_proto::tonic::trace::v1::status::StatusCode::Error
                })
                .count();
            assert_eq!(errors, 1, "{clients:#?}");
        }
        attempts.push(clients.len());
    }
    // Round robin sends a first attempt to the dead endpoint at least once.
    assert!(
        attempts.iter().all(|n| (1..=2).contains(n)) && attempts.contains(&2),
        "attempts per request: {attempts:?}"
    );
}

/// One trace from an order to every branch of its checkout: the order's
/// CreateOrder (the caller's trace), the coordinator's `saga.drive` (the
/// trace stored with the saga), and each branch the coordinator called,
/// served by inventory, payment and the order service — all in `trellis
/// up`, exported to one collector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_is_one_trace_from_the_order_to_every_branch() {
    use shop_order::api::v1::{
        CreateOrderRequest, GetOrderRequest, OrderLine, OrderStatus,
        order_service_client::OrderServiceClient,
    };

    let receiver = OtlpReceiver::start().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "up",
            "--base-port",
            "0",
            "--data-dir",
            data.path().to_str().unwrap(),
        ])
        .env("RUST_LOG", "info")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut up = Trellis::from_child(child);
    let row = up.line_starting_with("order");
    let order_addr: SocketAddr = row.split_whitespace().nth(1).unwrap().parse().unwrap();
    let channel = trellis::transport::connect(&order_addr.to_string(), &Default::default())
        .await
        .unwrap();
    let orders = OrderServiceClient::new(channel);
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let mut request = Request::new(CreateOrderRequest {
        lines: vec![OrderLine {
            sku: "tea".into(),
            quantity: 1,
            price_cents: 0,
        }],
        user_id: "trace-user".into(),
    });
    request.metadata_mut().insert(
        "traceparent",
        MetadataValue::try_from(format!("00-{trace_id}-b7ad6b7169203331-01")).unwrap(),
    );
    // The services find each other through the registry as they become
    // ready: the first order may come before inventory is found.
    let placed = trellis_testkit::eventually(Duration::from_secs(20), "an order placed", || {
        let mut orders = orders.clone();
        let request = Request::from_parts(
            request.metadata().clone(),
            Default::default(),
            request.get_ref().clone(),
        );
        async move { orders.create_order(request).await.map(|r| r.into_inner()) }
    })
    .await;
    trellis_testkit::eventually(Duration::from_secs(20), "the order confirmed", || {
        let mut orders = orders.clone();
        let id = placed.id.clone();
        async move {
            let got = orders
                .get_order(GetOrderRequest { id })
                .await
                .map_err(|s| format!("{s:?}"))?
                .into_inner();
            if got.status == OrderStatus::Confirmed as i32 {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        }
    })
    .await;
    up.signal(libc::SIGTERM);
    assert_eq!(up.wait(Duration::from_secs(15)).code(), Some(0));
    let wanted = [
        "shop.order.v1.OrderService/CreateOrder",
        "saga.drive",
        "shop.order.v1.OrderBranches/Accept",
        "shop.inventory.v1.StockBranches/Reserve",
        "shop.payment.v1.PaymentBranches/Charge",
        "shop.inventory.v1.StockBranches/Commit",
        "shop.order.v1.OrderBranches/Confirm",
    ];
    let (found, spans) = receiver
        .wait_for(Duration::from_secs(10), |s| {
            wanted.iter().all(|name| {
                s.iter()
                    .any(|s| s.trace_id() == trace_id && s.name() == *name)
            })
        })
        .await;
    let mine: Vec<&str> = spans
        .iter()
        .filter(|s| s.trace_id() == trace_id)
        .map(|s| s.name())
        .collect();
    assert!(
        found,
        "missing from the trace {trace_id}: {:?}; it has {mine:?}",
        wanted
            .iter()
            .filter(|w| !mine.contains(w))
            .collect::<Vec<_>>()
    );
}
