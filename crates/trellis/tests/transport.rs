//! The shared-port server's contract beyond the lifecycle: admin listener,
//! error bodies, limits, gRPC steering, client errors.

mod support;

use std::{net::SocketAddr, time::Duration};

use ::http as h;
use support::Running;
use trellis::{
    App, Code, Error,
    transport::{GrpcHttpServer, ServerConfig, TransportError},
};
use trellis_testkit::http;

/// Runs `server` in an app until stopped.
async fn run(server: GrpcHttpServer) -> Running {
    Running::ready(App::builder("transport-test").server(server).build()).await
}

fn router() -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route(
            "/users/{id}",
            get(
                |axum::extract::Path(id): axum::extract::Path<String>| async move {
                    Err::<String, _>(
                        Error::not_found("USER_NOT_FOUND", format!("no user {id}"))
                            .with_metadata("id", id),
                    )
                },
            ),
        )
        .route(
            "/echo",
            post(|axum::Json(v): axum::Json<serde_json::Value>| async move { axum::Json(v) }),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_serves_probes_only() {
    let config = ServerConfig {
        admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..Default::default()
    };
    let server = GrpcHttpServer::builder(config)
        .http_router(router())
        .bind()
        .await
        .unwrap();
    let (main, admin) = (server.local_addr(), server.admin_addr().unwrap());
    assert_ne!(main, admin);
    let running = run(server).await;
    for path in ["/livez", "/readyz", "/startupz"] {
        assert_eq!(
            http::get(admin, path).await.unwrap().status,
            200,
            "admin {path}"
        );
        assert_eq!(
            http::get(main, path).await.unwrap().status,
            200,
            "main {path}"
        );
    }
    assert_eq!(
        http::get(admin, "/users/7").await.unwrap().status,
        404,
        "service routes stay off the admin port"
    );
    running.stop().await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(admin).await.is_err(),
        "admin port still open after stop"
    );
}

fn operator_routes() -> axum::Router {
    axum::Router::new().route("/debug/config", axum::routing::get(|| async { "{}" }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_routes_are_served_on_the_admin_listener_only() {
    // With an admin listener: there, and not on the main port.
    let config = ServerConfig {
        admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..Default::default()
    };
    let server = GrpcHttpServer::builder(config)
        .http_router(router())
        .debug_router(operator_routes())
        .bind()
        .await
        .unwrap();
    let (main, admin) = (server.local_addr(), server.admin_addr().unwrap());
    let running = run(server).await;
    assert_eq!(http::get(admin, "/debug/config").await.unwrap().status, 200);
    assert_eq!(http::get(main, "/debug/config").await.unwrap().status, 404);
    running.stop().await.unwrap();

    // Without one: not served at all (it used to fall back to the main port).
    let server = GrpcHttpServer::builder(ServerConfig::default())
        .http_router(router())
        .debug_router(operator_routes())
        .bind()
        .await
        .unwrap();
    let main = server.local_addr();
    let running = run(server).await;
    assert_eq!(http::get(main, "/debug/config").await.unwrap().status, 404);
    assert_eq!(http::get(main, "/readyz").await.unwrap().status, 200);
    running.stop().await.unwrap();
}

/// Past `max_connections` the listener stops accepting: a third client
/// waits in the backlog until one of the first two leaves, then is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_for_a_free_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = ServerConfig::default();
    config.limits.max_connections = 2;
    let server = GrpcHttpServer::builder(config).bind().await.unwrap();
    let addr = server.local_addr();
    let running = run(server).await;
    // Two connections that hold their slots (each has been served once,
    // so the server has surely accepted both).
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(c);
    }
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    third
        .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read_exact(&mut buf)).await;
    assert!(
        early.is_err(),
        "the third connection was served past the cap"
    );
    drop(held.pop());
    tokio::time::timeout(Duration::from_secs(10), third.read_exact(&mut buf))
        .await
        .expect("the third connection was never served after a slot freed")
        .unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_can_be_turned_off() {
    for on in [true, false] {
        let config = ServerConfig {
            reflection: on,
            ..Default::default()
        };
        let server = GrpcHttpServer::builder(config).bind().await.unwrap();
        let addr = server.local_addr();
        let running = run(server).await;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        // A unary call to the reflection service's streaming method: an
        // empty request stream is answered with OK when it exists, and
        // UNIMPLEMENTED when it does not.
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let path = h::uri::PathAndQuery::from_static(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        );
        let outcome = grpc
            .streaming::<_, (), (), _>(tonic::Request::new(tokio_stream::empty()), path, EmptyCodec)
            .await;
        let code = match outcome {
            Ok(mut stream) => match stream.get_mut().message().await {
                Ok(_) => Code::Ok,
                Err(status) => status.code(),
            },
            Err(status) => status.code(),
        };
        if on {
            assert_eq!(code, Code::Ok, "reflection on");
        } else {
            assert_eq!(code, Code::Unimplemented, "reflection off");
        }
        running.stop().await.unwrap();
    }
}

/// Encodes and decodes nothing: enough to call a method without its types.
#[derive(Debug, Clone, Copy)]
struct EmptyCodec;

impl tonic::codec::Codec for EmptyCodec {
    type Encode = ();
    type Decode = ();
    type Encoder = EmptyCodec;
    type Decoder = EmptyCodec;
    fn encoder(&mut self) -> Self::Encoder {
        EmptyCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        EmptyCodec
    }
}

impl tonic::codec::Encoder for EmptyCodec {
    type Item = ();
    type Error = tonic::Status;
    fn encode(&mut self, _: (), _: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        Ok(())
    }
}

impl tonic::codec::Decoder for EmptyCodec {
    type Item = ();
    type Error = tonic::Status;
    fn decode(&mut self, _: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        Ok(Some(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_errors_reach_http_clients_as_status_and_json() {
    let server = GrpcHttpServer::builder(ServerConfig::default())
        .http_router(router())
        .bind()
        .await
        .unwrap();
    let addr = server.local_addr();
    let running = run(server).await;
    let res = http::get(addr, "/users/7").await.unwrap();
    assert_eq!(res.status, 404);
    assert_eq!(res.header("content-type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_str(&res.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"code": "NOT_FOUND", "reason": "USER_NOT_FOUND", "message": "no user 7", "metadata": {"id": "7"}})
    );
    // And back: a client rebuilds the same error from the response.
    let status = h::StatusCode::from_u16(res.status).unwrap();
    let err = Error::from_http(status, res.body.as_bytes());
    assert_eq!(
        err,
        Error::not_found("USER_NOT_FOUND", "no user 7").with_metadata("id", "7")
    );
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413() {
    let mut config = ServerConfig::default();
    config.limits.max_body_bytes = 1024;
    let server = GrpcHttpServer::builder(config)
        .http_router(router())
        .bind()
        .await
        .unwrap();
    let addr = server.local_addr();
    let running = run(server).await;
    let small = http::request(addr, "POST", "/echo", Some(r#"{"a":1}"#))
        .await
        .unwrap();
    assert_eq!(small.status, 200);
    let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(2048));
    let res = http::request(addr, "POST", "/echo", Some(&big))
        .await
        .unwrap();
    assert_eq!(res.status, 413);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_grpc_services_get_unimplemented() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let server = GrpcHttpServer::builder(ServerConfig::default())
        .bind()
        .await
        .unwrap();
    let addr = server.local_addr();
    let running = run(server).await;
    // A gRPC call to a path no service owns: the health client pointed at a
    // different service name via a raw path.
    let channel = trellis::transport::connect(&addr.to_string(), &Default::default())
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let path = h::uri::PathAndQuery::from_static("/no.such.v1.Service/Call");
    let codec = tonic_prost::ProstCodec::<HealthCheckRequest, tonic_health::pb::HealthCheckResponse>::default();
    let status = grpc
        .unary(
            tonic::Request::new(HealthCheckRequest::default()),
            path,
            codec,
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    // The same port still answers real services.
    assert!(
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .is_ok()
    );
    running.stop().await.unwrap();
}

#[tokio::test]
async fn connecting_to_a_closed_port_fails_with_the_target() {
    let port = trellis_testkit::free_port().unwrap();
    let target = format!("127.0.0.1:{port}");
    let config = trellis::transport::ClientConfig {
        connect_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let err = trellis::transport::connect(&target, &config)
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Connect { .. }), "{err}");
    assert!(err.to_string().contains(&target), "{err}");
    let bad = trellis::transport::connect("http://[not a uri", &config)
        .await
        .unwrap_err();
    assert!(matches!(bad, TransportError::InvalidUri { .. }), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_routes_answer_over_h2c_as_well_as_http1() {
    use tower::ServiceExt;
    let server = GrpcHttpServer::builder(ServerConfig::default())
        .http_router(router())
        .bind()
        .await
        .unwrap();
    let addr = server.local_addr();
    let running = run(server).await;
    // A tonic channel speaks HTTP/2 with prior knowledge: plain h2c.
    let channel = trellis::transport::connect(&addr.to_string(), &Default::default())
        .await
        .unwrap();
    let request = h::Request::get(format!("http://{addr}/readyz"))
        .body(tonic::body::Body::empty())
        .unwrap();
    let response = channel.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), h::Version::HTTP_2);
    // And HTTP/1.1 on the same port.
    assert_eq!(http::get(addr, "/readyz").await.unwrap().status, 200);
    running.stop().await.unwrap();
}

/// A gRPC service that answers UNAVAILABLE and counts the calls.
#[derive(Clone, Default)]
struct Unavailable(std::sync::Arc<std::sync::atomic::AtomicU32>);

impl tonic::server::NamedService for Unavailable {
    const NAME: &'static str = "test.Unavailable";
}

impl tower::Service<h::Request<tonic::body::Body>> for Unavailable {
    type Response = h::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: h::Request<tonic::body::Body>) -> Self::Future {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::future::ready(Ok(tonic::Status::unavailable("down").into_http()))
    }
}

/// `resilient_client_with` takes its retry policy, breaker and balancer
/// from settings (here built in code): one attempt, then five.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resilient_client_follows_its_settings() {
    use trellis::registry::{Discovery, MemoryRegistry};
    let calls = Unavailable::default();
    let server = GrpcHttpServer::builder(ServerConfig::default())
        .grpc_service(calls.clone())
        .bind()
        .await
        .unwrap();
    let registry = MemoryRegistry::new();
    let mut seen = registry.watch("unavailable").await.unwrap();
    let running = Running::ready(
        App::builder("unavailable")
            .registry(std::sync::Arc::new(registry.clone()))
            .server(server)
            .build(),
    )
    .await;
    tokio::time::timeout(Duration::from_secs(10), seen.wait_for(|s| s.len() == 1))
        .await
        .unwrap()
        .unwrap();
    for (attempts, expected) in [(1, 1), (5, 5)] {
        let mut settings = trellis::settings::ClientSettings::default();
        settings.retry.attempts = attempts;
        settings.retry.backoff_base = Duration::from_millis(1);
        settings.retry.backoff_max = Duration::from_millis(1);
        settings.retry.budget_per_second = 100;
        settings.breaker.enabled = false;
        settings.balancer.policy = "round_robin".into();
        let channel = trellis::resilient_client_with(&registry, "unavailable", &settings)
            .await
            .unwrap();
        assert_eq!(channel.balanced().policy_name(), "round_robin");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while channel.balanced().endpoints().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "never discovered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = calls.0.load(std::sync::atomic::Ordering::SeqCst);
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let err = grpc
            .unary::<(), (), _>(
                tonic::Request::new(()),
                h::uri::PathAndQuery::from_static("/test.Unavailable/Call"),
                EmptyCodec,
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        let made = calls.0.load(std::sync::atomic::Ordering::SeqCst) - before;
        assert_eq!(made, expected, "{attempts} attempts");
    }
    running.stop().await.unwrap();
}
