//! A rate limit on the Trellis server: HTTP gets 429 + Retry-After + JSON,
//! gRPC gets RESOURCE_EXHAUSTED + grpc-retry-pushback-ms; probes, health and
//! reflection are never limited.

mod support;

use std::{sync::Arc, time::Duration};

use trellis_resilience::{KeyBy, LocalLimiter, Quota, RateLimitLayer};
use trellis_testkit::http;
use trellis_transport::{GrpcHttpServer, ServerConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_each_route_on_both_faces_but_never_the_probes() {
    let limiter = Arc::new(LocalLimiter::new(
        Quota {
            rate: 2,
            period: Duration::from_secs(60),
            burst: 2,
        },
        1000,
    ));
    let router = axum::Router::new().route("/hello", axum::routing::get(|| async { "hi" }));
    let hop = support::hop(Duration::ZERO, None);
    let builder = GrpcHttpServer::builder(ServerConfig::default())
        .grpc_service(hop)
        .http_router(router)
        .layer(RateLimitLayer::new(limiter.clone(), KeyBy::Route));
    let (addr, stop, _lifecycle) = support::start(builder.bind().await.unwrap()).await;

    // HTTP: two allowed, then 429 with the error body and Retry-After.
    for _ in 0..2 {
        assert_eq!(http::get(addr, "/hello").await.unwrap().status, 200);
    }
    let limited = http::get(addr, "/hello").await.unwrap();
    assert_eq!(limited.status, 429);
    let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry_after), "retry-after {retry_after}");
    let body: serde_json::Value = serde_json::from_str(&limited.body).unwrap();
    assert_eq!(
        (body["code"].as_str(), body["reason"].as_str()),
        (Some("RESOURCE_EXHAUSTED"), Some("RATE_LIMITED"))
    );

    // gRPC: its own route, its own budget.
    let mut client = support::client(addr, None);
    for _ in 0..2 {
        support::call(&mut client).await.unwrap();
    }
    let err = support::call(&mut client).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    let pushback: u64 = err
        .metadata()
        .get("grpc-retry-pushback-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(pushback > 1000, "pushback {pushback} ms");

    // Probes and health keep answering.
    for _ in 0..20 {
        assert_eq!(http::get(addr, "/readyz").await.unwrap().status, 200);
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for _ in 0..20 {
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap();
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_keys_come_from_the_connection() {
    let limiter = Arc::new(LocalLimiter::new(
        Quota {
            rate: 1,
            period: Duration::from_secs(60),
            burst: 3,
        },
        1000,
    ));
    let router = axum::Router::new().route("/hello", axum::routing::get(|| async { "hi" }));
    let builder = GrpcHttpServer::builder(ServerConfig::default())
        .http_router(router)
        .layer(RateLimitLayer::new(limiter.clone(), KeyBy::ClientIp));
    let (addr, stop, _lifecycle) = support::start(builder.bind().await.unwrap()).await;
    let statuses: Vec<u16> = futures(addr, 4).await;
    assert_eq!(statuses, [200, 200, 200, 429]);
    assert_eq!(limiter.tracked_keys(), 1, "one client IP, one key");
    stop.cancel();
}

async fn futures(addr: std::net::SocketAddr, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(http::get(addr, "/hello").await.unwrap().status);
    }
    out
}
