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
