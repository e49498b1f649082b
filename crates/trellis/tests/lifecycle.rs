//! The App lifecycle seen from outside, over real sockets: gRPC health,
//! HTTP probes, and graceful drain.

mod support;

use std::{net::SocketAddr, time::Duration};

use support::Running;
use tokio::sync::oneshot;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use trellis::{
    App, State,
    transport::{GrpcHttpServer, ServerConfig},
};
use trellis_testkit::http;

async fn grpc_status(addr: SocketAddr) -> ServingStatus {
    let channel = trellis::transport::connect(&addr.to_string(), &Default::default())
        .await
        .unwrap();
    let res = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    res.into_inner().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_not_serving_then_serving_then_not_serving() {
    let server = GrpcHttpServer::builder(ServerConfig::default())
        .bind()
        .await
        .unwrap();
    let addr = server.local_addr();
    let (gate_tx, gate_rx) = oneshot::channel::<()>();
    let app = App::builder("probe-test")
        .server(server)
        .after_start(|| async move { gate_rx.await.map_err(|e| e.to_string()) })
        // Long enough to observe the draining state while still accepting.
        .pre_stop_delay(Duration::from_millis(1500))
        .build();
    let mut running = Running::spawn(app);

    // Starting: serving connections, but not ready.
    assert_eq!(grpc_status(addr).await, ServingStatus::NotServing);
    assert_eq!(http::get(addr, "/readyz").await.unwrap().status, 503);
    assert_eq!(http::get(addr, "/startupz").await.unwrap().status, 503);
    assert_eq!(http::get(addr, "/livez").await.unwrap().status, 200);

    // A watcher sees every transition from here on.
    let channel = trellis::transport::connect(&addr.to_string(), &Default::default())
        .await
        .unwrap();
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );

    gate_tx.send(()).unwrap();
    running.wait_for(State::Ready).await;
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    assert_eq!(grpc_status(addr).await, ServingStatus::Serving);
    let ready = http::get(addr, "/readyz").await.unwrap();
    assert_eq!(ready.status, 200);
    assert!(ready.body.contains("\"ready\""), "{}", ready.body);
    assert_eq!(http::get(addr, "/startupz").await.unwrap().status, 200);

    running.begin_stop();
    running.wait_for(State::Draining).await;
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    // During the pre-stop delay the server still answers, but is not ready.
    assert_eq!(grpc_status(addr).await, ServingStatus::NotServing);
    assert_eq!(http::get(addr, "/readyz").await.unwrap().status, 503);
    assert_eq!(http::get(addr, "/livez").await.unwrap().status, 200);

    let lifecycle = running.lifecycle.clone();
    running.join().await.unwrap();
    assert_eq!(*lifecycle.borrow(), State::Stopped);
}

/// `/slow` answers after 800 ms, `/forever` never; each says on `arrived`
/// when a request reaches it, so a test knows the server has it in flight.
fn slow_server_router(arrived: tokio::sync::mpsc::UnboundedSender<&'static str>) -> axum::Router {
    let also = arrived.clone();
    axum::Router::new()
        .route(
            "/slow",
            axum::routing::get(move || async move {
                let _ = arrived.send("slow");
                tokio::time::sleep(Duration::from_millis(800)).await;
                "done"
            }),
        )
        .route(
            "/forever",
            axum::routing::get(move || async move {
                let _ = also.send("forever");
                std::future::pending::<()>().await;
                "never"
            }),
        )
}

/// Waits (up to 10 s) for the next request to reach a handler.
async fn reached(arrived: &mut tokio::sync::mpsc::UnboundedReceiver<&'static str>) -> &'static str {
    tokio::time::timeout(Duration::from_secs(10), arrived.recv())
        .await
        .expect("the request never reached the server")
        .expect("the router is gone")
}

/// Waits (up to 10 s) until `addr` refuses connections.
async fn refused(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr} still accepts connections 10 s after draining began"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_and_refuses_new_connections() {
    let (tx, mut arrived) = tokio::sync::mpsc::unbounded_channel();
    let server = GrpcHttpServer::builder(ServerConfig::default())
        .http_router(slow_server_router(tx))
        .bind()
        .await
        .unwrap();
    let addr = server.local_addr();
    let mut running = Running::ready(
        App::builder("drain-test")
            .server(server)
            .shutdown_timeout(Duration::from_secs(5))
            .build(),
    )
    .await;

    let in_flight = tokio::spawn(http::get(addr, "/slow"));
    assert_eq!(reached(&mut arrived).await, "slow");
    let started = std::time::Instant::now();
    running.begin_stop();
    running.wait_for(State::Draining).await;
    refused(addr).await;

    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body, "done");
    running.join().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "drain waited for the full timeout: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_cuts_requests_that_outlive_the_shutdown_timeout() {
    let (tx, mut arrived) = tokio::sync::mpsc::unbounded_channel();
    let server = GrpcHttpServer::builder(ServerConfig::default())
        .http_router(slow_server_router(tx))
        .bind()
        .await
        .unwrap();
    let addr = server.local_addr();
    let running = Running::ready(
        App::builder("deadline-test")
            .server(server)
            .shutdown_timeout(Duration::from_millis(500))
            .build(),
    )
    .await;
    let stuck = tokio::spawn(http::get(addr, "/forever"));
    // In flight on the server, so it is the drain that must cut it.
    assert_eq!(reached(&mut arrived).await, "forever");

    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(3), running.stop())
        .await
        .expect("app did not stop near its deadline")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(500));
    let cut = tokio::time::timeout(Duration::from_secs(5), stuck)
        .await
        .expect("the cut request's client is still waiting")
        .unwrap();
    assert!(
        cut.is_err() || cut.as_ref().is_ok_and(|r| r.status != 200),
        "stuck request completed: {cut:?}"
    );
}

#[tokio::test]
async fn failing_start_hook_stops_the_app_with_its_stage() {
    let server = GrpcHttpServer::builder(ServerConfig::default())
        .bind()
        .await
        .unwrap();
    let app = App::builder("hook-test")
        .server(server)
        .before_start(|| async { Err::<(), _>("database unreachable") })
        .build();
    let err = app.run_until(std::future::pending()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "before_start hook failed: database unreachable"
    );
}

#[tokio::test]
async fn request_timeout_answers_504_and_follows_live_changes() {
    let mut config = ServerConfig::default();
    config.limits.request_timeout = Some(Duration::from_millis(100));
    let (tx, _arrived) = tokio::sync::mpsc::unbounded_channel();
    let server = GrpcHttpServer::builder(config)
        .http_router(slow_server_router(tx))
        .bind()
        .await
        .unwrap();
    let addr = server.local_addr();
    let timeout = server.request_timeout();
    let running = Running::ready(App::builder("timeout-test").server(server).build()).await;
    let res = http::get(addr, "/slow").await.unwrap();
    assert_eq!(res.status, 504);
    let body: serde_json::Value = serde_json::from_str(&res.body).unwrap();
    assert_eq!(body["code"], "DEADLINE_EXCEEDED");
    assert_eq!(body["reason"], "REQUEST_TIMEOUT");

    // Changed while running (what the config centre does): the next request sees it.
    timeout.set(Some(Duration::from_secs(5)));
    assert_eq!(http::get(addr, "/slow").await.unwrap().status, 200);
    timeout.set(Some(Duration::from_millis(50)));
    assert_eq!(http::get(addr, "/slow").await.unwrap().status, 504);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_when_ready_and_deregisters_before_the_listener_closes() {
    use trellis::registry::{Discovery, MemoryRegistry};
    let registry = MemoryRegistry::new();
    let mut instances = registry.watch("reg-test").await.unwrap();
    let server = GrpcHttpServer::builder(ServerConfig::default())
        .bind()
        .await
        .unwrap();
    let addr = server.local_addr();
    let (gate_tx, gate_rx) = oneshot::channel::<()>();
    let (entered_tx, entered_rx) = oneshot::channel::<()>();
    let app = App::builder("reg-test")
        .version("1.2.3")
        .zone("z1")
        .registry(std::sync::Arc::new(registry.clone()))
        .server(server)
        .after_start(|| async move {
            let _ = entered_tx.send(());
            gate_rx.await.map_err(|e| e.to_string())
        })
        .pre_stop_delay(Duration::from_millis(800))
        .build();
    let mut running = Running::spawn(app);
    // Everything before Ready has run (the listener serves, the last start
    // hook is waiting): an early registration would be visible now.
    tokio::time::timeout(Duration::from_secs(10), entered_rx)
        .await
        .expect("the after_start hook never ran")
        .unwrap();
    assert_eq!(http::get(addr, "/livez").await.unwrap().status, 200);
    assert!(instances.borrow().is_empty(), "registered before Ready");

    gate_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), instances.wait_for(|s| s.len() == 1))
        .await
        .unwrap()
        .unwrap();
    let published = instances.borrow().first().cloned().unwrap();
    assert_eq!(published.endpoint("grpc"), Some(addr.to_string().as_str()));
    assert_eq!(published.endpoint("http"), Some(addr.to_string().as_str()));
    assert_eq!(
        (published.version.as_str(), published.zone.as_str()),
        ("1.2.3", "z1")
    );

    running.begin_stop();
    tokio::time::timeout(Duration::from_secs(5), instances.wait_for(|s| s.is_empty()))
        .await
        .unwrap()
        .unwrap();
    // Gone from the registry while the listener still serves (pre-stop delay).
    assert_eq!(http::get(addr, "/livez").await.unwrap().status, 200);
    running.join().await.unwrap();
}
