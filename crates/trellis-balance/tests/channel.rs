//! A balanced pool against real servers found through a registry: gRPC
//! over tonic channels, and plain HTTP/1.1 over a hyper client — the same
//! pool, two kinds of endpoint service.

use std::{net::SocketAddr, time::Duration};

use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tower::ServiceExt;
use trellis_balance::{BalanceConfig, Balanced, Endpoint, OutlierDetection, Policy};
use trellis_core::{Drain, Lifecycle, Server, State};
use trellis_registry::{Instance, MemoryRegistry, Registration, Registry};
use trellis_transport::{ClientConfig, GrpcHttpServer, ServerConfig};

type BalancedChannel = Balanced<tonic::transport::Channel>;

/// A pool of lazily-connected tonic channels over `svc`.
async fn discover(registry: &MemoryRegistry, config: BalanceConfig) -> BalancedChannel {
    Balanced::discover(registry, "svc", config, |e: &Endpoint| {
        Ok(trellis_transport::connect_lazy(
            e.address(),
            &ClientConfig::default(),
        )?)
    })
    .await
    .unwrap()
}

/// A ready gRPC server (health only) that stops when dropped.
struct Backend {
    addr: SocketAddr,
    stop: CancellationToken,
    _lifecycle: Lifecycle,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn backend_on(listen: SocketAddr) -> Backend {
    serve(GrpcHttpServer::builder(ServerConfig {
        listen,
        ..Default::default()
    }))
    .await
}

async fn serve(builder: trellis_transport::GrpcHttpServerBuilder) -> Backend {
    let server = builder.bind().await.unwrap();
    let addr = server.local_addr();
    let lifecycle = Lifecycle::new();
    lifecycle.advance(State::Ready);
    let stop = CancellationToken::new();
    let fut = Box::new(server).serve(
        lifecycle.subscribe(),
        Drain::new(stop.clone(), Duration::from_millis(100)),
    );
    tokio::spawn(fut);
    Backend {
        addr,
        stop,
        _lifecycle: lifecycle,
    }
}

async fn backend() -> Backend {
    backend_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
}

async fn register(
    registry: &MemoryRegistry,
    id: &str,
    addr: SocketAddr,
    zone: &str,
) -> Registration {
    registry
        .register(
            Instance::new("svc", id)
                .with_endpoint("grpc", addr.to_string())
                .with_zone(zone),
        )
        .await
        .unwrap()
}

async fn call(channel: &BalancedChannel) -> Result<(), tonic::Status> {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .map(drop)
}

fn requests_by_id(channel: &BalancedChannel) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = channel
        .endpoints()
        .iter()
        .map(|e| (e.id().to_owned(), e.requests()))
        .collect();
    v.sort();
    v
}

/// Waits (up to 10 s) until `f` holds; fails naming `what` if it never does.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after 10 s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// One thread: round robin is per thread, and the exact counts below
// assume one sequence of turns.
#[tokio::test(flavor = "current_thread")]
async fn follows_the_registry_and_spreads_calls() {
    let registry = MemoryRegistry::new();
    let (a, b, c) = (backend().await, backend().await, backend().await);
    let _ra = register(&registry, "a", a.addr, "").await;
    let rb = register(&registry, "b", b.addr, "").await;
    let _rc = register(&registry, "c", c.addr, "").await;
    let config = BalanceConfig {
        policy: Policy::RoundRobin,
        ..Default::default()
    };
    let channel = discover(&registry, config).await;
    assert_eq!(channel.policy_name(), "round_robin");
    for _ in 0..30 {
        call(&channel).await.unwrap();
    }
    assert_eq!(
        requests_by_id(&channel),
        [("a".into(), 10), ("b".into(), 10), ("c".into(), 10)]
    );

    rb.deregister().await.unwrap();
    until("b to leave the pool", || channel.endpoints().len() == 2).await;
    for _ in 0..10 {
        call(&channel).await.unwrap();
    }
    // Stats survive set changes: a and c carry on from 10.
    assert_eq!(
        requests_by_id(&channel),
        [("a".into(), 15), ("c".into(), 15)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_endpoints_is_unavailable_with_the_service_named() {
    let registry = MemoryRegistry::new();
    let channel = discover(&registry, BalanceConfig::default()).await;
    let err = call(&channel).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.message().contains("svc"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejects_an_endpoint_that_refuses_connections_and_brings_it_back() {
    let registry = MemoryRegistry::new();
    let (a, b) = (backend().await, backend().await);
    let dead: SocketAddr = format!("127.0.0.1:{}", trellis_testkit::free_port().unwrap())
        .parse()
        .unwrap();
    let _ra = register(&registry, "a", a.addr, "").await;
    let _rb = register(&registry, "b", b.addr, "").await;
    let _rd = register(&registry, "dead", dead, "").await;
    let config = BalanceConfig {
        policy: Policy::RoundRobin,
        outlier: OutlierDetection {
            consecutive_failures: 3,
            base_ejection: Duration::from_millis(700),
            ..Default::default()
        },
        ..Default::default()
    };
    let channel = discover(&registry, config).await;

    let mut failures = 0;
    for _ in 0..60 {
        if call(&channel).await.is_err() {
            failures += 1;
        }
    }
    assert_eq!(failures, 3, "exactly the failures before ejection");
    let dead_ep = channel
        .endpoints()
        .into_iter()
        .find(|e| e.id() == "dead")
        .unwrap();
    assert!(dead_ep.is_ejected());
    assert_eq!(dead_ep.requests(), 3);

    // The endpoint comes back to life; after the ejection it gets traffic again.
    let _revived = backend_on(dead).await;
    until("the 700 ms ejection to end", || !dead_ep.is_ejected()).await;
    for _ in 0..30 {
        call(&channel).await.unwrap();
    }
    let revived_ep = channel
        .endpoints()
        .into_iter()
        .find(|e| e.id() == "dead")
        .unwrap();
    assert!(
        revived_ep.requests() >= 3 + 9,
        "revived endpoint got {} requests",
        revived_ep.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_ejects_more_than_the_allowed_share() {
    let registry = MemoryRegistry::new();
    let a = backend().await;
    let dead1: SocketAddr = format!("127.0.0.1:{}", trellis_testkit::free_port().unwrap())
        .parse()
        .unwrap();
    let dead2: SocketAddr = format!("127.0.0.1:{}", trellis_testkit::free_port().unwrap())
        .parse()
        .unwrap();
    let _r = (
        register(&registry, "a", a.addr, "").await,
        register(&registry, "d1", dead1, "").await,
        register(&registry, "d2", dead2, "").await,
    );
    let config = BalanceConfig {
        policy: Policy::RoundRobin,
        outlier: OutlierDetection {
            consecutive_failures: 1,
            max_ejection_percent: 34,
            ..Default::default()
        },
        ..Default::default()
    };
    let channel = discover(&registry, config).await;
    for _ in 0..30 {
        let _ = call(&channel).await;
    }
    let ejected = channel
        .endpoints()
        .iter()
        .filter(|e| e.is_ejected())
        .count();
    assert_eq!(ejected, 1, "34% of 3 endpoints allows one ejection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefers_its_zone_and_falls_back_to_others() {
    let registry = MemoryRegistry::new();
    let (a, b) = (backend().await, backend().await);
    let _ra = register(&registry, "a", a.addr, "z1").await;
    let rb = register(&registry, "b", b.addr, "z2").await;
    let config = BalanceConfig {
        prefer_zone: Some("z2".into()),
        ..Default::default()
    };
    let channel = discover(&registry, config).await;
    for _ in 0..20 {
        call(&channel).await.unwrap();
    }
    assert_eq!(
        requests_by_id(&channel),
        [("a".into(), 0), ("b".into(), 20)]
    );
    rb.deregister().await.unwrap();
    until("b to leave", || channel.endpoints().len() == 1).await;
    call(&channel).await.unwrap();
    assert_eq!(requests_by_id(&channel), [("a".into(), 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_a_key_on_one_endpoint() {
    let registry = MemoryRegistry::new();
    let backends = [backend().await, backend().await, backend().await];
    let mut regs = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        regs.push(register(&registry, &format!("e{i}"), b.addr, "").await);
    }
    let config = BalanceConfig {
        policy: Policy::ConsistentHash {
            header: "x-user-id".into(),
        },
        ..Default::default()
    };
    let channel = discover(&registry, config).await;
    let mut client = HealthClient::new(channel.clone());
    for _ in 0..20 {
        let mut req = tonic::Request::new(HealthCheckRequest::default());
        req.metadata_mut()
            .insert("x-user-id", "user-42".parse().unwrap());
        client.check(req).await.unwrap();
    }
    let counts: Vec<u64> = channel.endpoints().iter().map(|e| e.requests()).collect();
    assert_eq!(
        counts.iter().filter(|c| **c > 0).count(),
        1,
        "one key went to several endpoints: {counts:?}"
    );
    assert_eq!(counts.iter().sum::<u64>(), 20);
    drop(regs);
}

/// A gRPC method whose answer starts well (200, `application/grpc`) and
/// fails in its trailers: UNAVAILABLE after the headers, as a streaming
/// server that breaks mid-response sends it.
#[derive(Clone)]
struct FailsInTrailers;

impl tonic::server::NamedService for FailsInTrailers {
    const NAME: &'static str = "test.Trailers";
}

impl tower::Service<http::Request<tonic::body::Body>> for FailsInTrailers {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
        trailers.insert("grpc-message", http::HeaderValue::from_static("down"));
        let body = http_body_util::Empty::<bytes::Bytes>::new()
            .with_trailers(std::future::ready(Some(Ok(trailers))));
        let response = http::Response::builder()
            .header("content-type", "application/grpc")
            .body(tonic::body::Body::new(body))
            .unwrap();
        std::future::ready(Ok(response))
    }
}

/// Outlier detection reads the outcome where gRPC puts it — the trailers —
/// not only the head: an endpoint answering 200 whose trailers say
/// UNAVAILABLE is ejected after the configured streak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_in_its_trailers_is_ejected() {
    let registry = MemoryRegistry::new();
    let bad =
        serve(GrpcHttpServer::builder(ServerConfig::default()).grpc_service(FailsInTrailers)).await;
    let good = backend().await;
    let _rb = register(&registry, "bad", bad.addr, "").await;
    let _rg = register(&registry, "good", good.addr, "").await;
    let config = BalanceConfig {
        policy: Policy::RoundRobin,
        outlier: OutlierDetection {
            consecutive_failures: 3,
            ..Default::default()
        },
        ..Default::default()
    };
    let pool = discover(&registry, config).await;
    let mut failed_in_trailers = 0;
    for _ in 0..20 {
        let request = http::Request::post("http://svc/test.Trailers/Call")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::empty())
            .unwrap();
        let response = pool.clone().oneshot(request).await.unwrap();
        let head_status = response.headers().get("grpc-status").cloned();
        let body = response.into_body().collect().await.unwrap();
        let trailer_status = body.trailers().and_then(|t| t.get("grpc-status")).cloned();
        if trailer_status.as_ref().is_some_and(|s| s == "14") {
            // The head said nothing: only the trailers could tell.
            assert_eq!(head_status, None);
            failed_in_trailers += 1;
        }
    }
    assert_eq!(failed_in_trailers, 3, "exactly the streak before ejection");
    let bad_ep = pool
        .endpoints()
        .into_iter()
        .find(|e| e.id() == "bad")
        .unwrap();
    assert!(bad_ep.is_ejected());
    assert_eq!(
        bad_ep.in_flight(),
        0,
        "every finished call released its endpoint"
    );
}

/// The same pool over plain HTTP/1.1: each endpoint's service is a pooled
/// hyper client aimed at it. A backend answering 503 is ejected by what
/// its responses say.
#[tokio::test(flavor = "current_thread")]
async fn balances_http1_upstreams_and_ejects_one_answering_503() {
    async fn http_backend(name: &'static str, status: u16) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/who",
            axum::routing::get(move || async move {
                (http::StatusCode::from_u16(status).unwrap(), name)
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }
    let registry = MemoryRegistry::new();
    let mut regs = Vec::new();
    for (id, status) in [("a", 200), ("b", 200), ("down", 503)] {
        let addr = http_backend(id, status).await;
        let instance = Instance::new("web", id).with_endpoint("http", addr.to_string());
        regs.push(registry.register(instance).await.unwrap());
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<String>();
    let config = BalanceConfig {
        policy: Policy::RoundRobin,
        protocol: "http".into(),
        outlier: OutlierDetection {
            consecutive_failures: 2,
            ..Default::default()
        },
        ..Default::default()
    };
    let pool = Balanced::discover(&registry, "web", config, move |e: &Endpoint| {
        let authority: http::uri::Authority = e.address().parse()?;
        let client = client.clone();
        Ok(tower::service_fn(
            move |mut request: http::Request<String>| {
                let mut uri = request.uri().clone().into_parts();
                uri.scheme = Some(http::uri::Scheme::HTTP);
                uri.authority = Some(authority.clone());
                *request.uri_mut() =
                    http::Uri::from_parts(uri).expect("scheme, authority and path");
                client.request(request)
            },
        ))
    })
    .await
    .unwrap();
    assert_eq!(pool.endpoints().len(), 3);

    let mut answers = std::collections::BTreeMap::new();
    for _ in 0..30 {
        let request = http::Request::get("/who").body(String::new()).unwrap();
        let response = pool.clone().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        *answers
            .entry((status, String::from_utf8(body.to_vec()).unwrap()))
            .or_insert(0) += 1;
    }
    assert_eq!(answers.get(&(503, "down".into())), Some(&2), "{answers:?}");
    // a and b share the rest: each has its own 10 turns of the 30, and
    // the ejected endpoint's turns go to either at random.
    let ok = |name: &str| answers.get(&(200, name.into())).copied().unwrap_or(0);
    assert_eq!(ok("a") + ok("b"), 28, "{answers:?}");
    assert!(ok("a") >= 10 && ok("b") >= 10, "{answers:?}");
    let down = pool
        .endpoints()
        .into_iter()
        .find(|e| e.id() == "down")
        .unwrap();
    assert!(down.is_ejected());
}
