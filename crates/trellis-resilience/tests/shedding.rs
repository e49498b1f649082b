//! Load shedding on the Trellis server: an adaptive limit finds a slow
//! handler's capacity and sheds the rest; a fixed bulkhead sheds exactly
//! what exceeds it.

mod support;

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use trellis_core::Lifecycle;
use trellis_resilience::{ConcurrencyLimit, ConcurrencyLimitLayer, LimitKind};
use trellis_testkit::http;
use trellis_transport::{GrpcHttpServer, ServerConfig};

async fn serve(
    router: axum::Router,
    limit: Arc<ConcurrencyLimit>,
    hop: Option<support::Hop>,
) -> (std::net::SocketAddr, CancellationToken, Lifecycle) {
    let mut builder = GrpcHttpServer::builder(ServerConfig::default()).http_router(router);
    if let Some(hop) = hop {
        builder = builder.grpc_service(hop);
    }
    support::start(
        builder
            .layer(ConcurrencyLimitLayer::new(limit))
            .bind()
            .await
            .unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adaptive_limit_finds_the_capacity_and_sheds_the_rest() {
    let limit = ConcurrencyLimit::new(LimitKind::Adaptive {
        initial: 64,
        min: 2,
        max: 256,
    });
    let (addr, stop, _lifecycle) = serve(slow_handler(), limit.clone(), None).await;

    let mut callers = Vec::new();
    for _ in 0..64 {
        callers.push(tokio::spawn(async move {
            let (mut ok, mut shed) = (0u32, 0u32);
            for _ in 0..30 {
                let res = http::get(addr, "/work").await.unwrap();
                match res.status {
                    200 => ok += 1,
                    503 => {
                        assert!(res.body.contains("OVERLOADED"), "{}", res.body);
                        shed += 1;
                    }
                    other => panic!("unexpected status {other}"),
                }
            }
            (ok, shed)
        }));
    }
    let (mut ok, mut shed) = (0, 0);
    for c in callers {
        let (o, s) = c.await.unwrap();
        ok += o;
        shed += s;
    }
    eprintln!(
        "adaptive limit settled at {} (started at 64); {ok} served, {shed} shed",
        limit.limit()
    );
    assert!(shed > 0, "an overloaded handler must shed");
    assert!(ok > 100, "and still serve: {ok}");
    assert!(
        limit.limit() < 32,
        "the limit should have come down towards the capacity of 4: {}",
        limit.limit()
    );
    assert_eq!(
        limit.in_flight(),
        0,
        "every admitted request released its slot"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulkhead_sheds_exactly_what_exceeds_it_on_both_faces() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let waiting = gate.clone();
    let router = axum::Router::new().route(
        "/hold",
        axum::routing::get(move || {
            let waiting = waiting.clone();
            async move {
                waiting.notified().await;
                "released"
            }
        }),
    );
    let limit = ConcurrencyLimit::new(LimitKind::Fixed(3));
    let (addr, stop, _lifecycle) = serve(
        router,
        limit.clone(),
        Some(support::hop(Duration::ZERO, None)),
    )
    .await;
    let held: Vec<_> = (0..3)
        .map(|_| tokio::spawn(http::get(addr, "/hold")))
        .collect();
    support::until("three requests held", || limit.in_flight() == 3).await;
    assert_eq!(http::get(addr, "/hold").await.unwrap().status, 503);
    let err = support::call(&mut support::client(addr, None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(
        http::get(addr, "/readyz").await.unwrap().status,
        200,
        "probes are never shed"
    );
    gate.notify_waiters();
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().status, 200);
    }
    assert_eq!(limit.shed_total(), 2);
    stop.cancel();
}

/// A handler that can do 4 things at once, 5 ms each (800/s).
fn slow_handler() -> axum::Router {
    let capacity = Arc::new(tokio::sync::Semaphore::new(4));
    axum::Router::new().route(
        "/work",
        axum::routing::get(move || {
            let capacity = capacity.clone();
            async move {
                let _permit = capacity.acquire().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                "done"
            }
        }),
    )
}

async fn serve_with_delay_shedder(
    shedder: Arc<trellis_resilience::DelayShedder>,
) -> (std::net::SocketAddr, CancellationToken, Lifecycle) {
    let builder = GrpcHttpServer::builder(ServerConfig::default())
        .http_router(slow_handler())
        .layer(trellis_resilience::DelayShedLayer::new(shedder));
    support::start(builder.bind().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_delay_shedding_leaves_a_busy_service_alone_and_sheds_real_overload() {
    let shedder = trellis_resilience::DelayShedder::new(Duration::from_millis(5));
    let (addr, stop, _lifecycle) = serve_with_delay_shedder(shedder.clone()).await;

    // Busy but keeping up: 6 callers in a closed loop on a capacity of 4.
    let mut callers = Vec::new();
    for _ in 0..6 {
        callers.push(tokio::spawn(async move {
            for _ in 0..60 {
                assert_eq!(http::get(addr, "/work").await.unwrap().status, 200);
            }
        }));
    }
    for c in callers {
        c.await.unwrap();
    }
    assert_eq!(shedder.shed_total(), 0, "a bounded queue is not overload");

    // Open-loop arrivals at ~3x capacity for 1.5 s: a queue that would grow
    // without bound. The shedder must shed, and what it admits must finish.
    let mut arrivals = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_micros(400));
    for _ in 0..3750 {
        tick.tick().await;
        arrivals.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let status = http::get(addr, "/work")
                .await
                .map(|r| r.status)
                .unwrap_or(0);
            (status, started.elapsed())
        }));
    }
    let (mut ok, mut shed, mut slowest_ok) = (0, 0, Duration::ZERO);
    for a in arrivals {
        let (status, took) = a.await.unwrap();
        match status {
            200 => {
                ok += 1;
                slowest_ok = slowest_ok.max(took);
            }
            503 => shed += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    eprintln!("open-loop overload: {ok} served, {shed} shed, slowest served {slowest_ok:?}");
    assert!(shed > 1000, "overload must be shed: {shed}");
    assert!(ok > 400, "and capacity still used: {ok}");
    stop.cancel();
}
