//! BalancedChannel against real gRPC servers found through a registry.

use std::{net::SocketAddr, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use trellis_balance::{BalanceConfig, BalancedChannel, OutlierDetection, Policy};
use trellis_core::{Drain, Lifecycle, Server, State};
use trellis_registry::{Instance, MemoryRegistry, Registration, Registry};
use trellis_transport::{GrpcHttpServer, ServerConfig};

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
    let server = GrpcHttpServer::builder(ServerConfig {
        listen,
        ..Default::default()
    })
    .bind()
    .await
    .unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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
    let channel = BalancedChannel::discover(&registry, "svc", config)
        .await
        .unwrap();
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
    let channel = BalancedChannel::discover(&registry, "svc", BalanceConfig::default())
        .await
        .unwrap();
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
    let channel = BalancedChannel::discover(&registry, "svc", config)
        .await
        .unwrap();

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
    let channel = BalancedChannel::discover(&registry, "svc", config)
        .await
        .unwrap();
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
    let channel = BalancedChannel::discover(&registry, "svc", config)
        .await
        .unwrap();
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
    let channel = BalancedChannel::discover(&registry, "svc", config)
        .await
        .unwrap();
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
