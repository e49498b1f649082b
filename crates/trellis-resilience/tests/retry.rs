//! Retries against a real gRPC upstream: the budget bounds amplification,
//! and a transient failure becomes a success.

mod support;

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use trellis_resilience::{Backoff, RetryBudget, RetryLayer, RetryPolicy};

fn retrying(
    addr: std::net::SocketAddr,
    budget: Arc<RetryBudget>,
    backoff: Backoff,
) -> tonic::client::Grpc<trellis_resilience::Retry<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let policy = RetryPolicy {
        max_attempts: 3,
        backoff,
        ..RetryPolicy::default()
    };
    tonic::client::Grpc::new(tower::Layer::layer(
        &RetryLayer::new(policy, budget),
        channel,
    ))
}

async fn amplification(ratio: f64) -> f64 {
    let upstream = support::serve(support::hop(Duration::ZERO, None)).await;
    upstream.hop.failing.store(true, Ordering::SeqCst);
    let mut client = retrying(
        upstream.addr,
        Arc::new(RetryBudget::new(ratio, 0)),
        Backoff::Fixed(Duration::from_millis(1)),
    );
    let requests = 200;
    for _ in 0..requests {
        let err = support::call(&mut client).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
    }
    upstream.hop.seen.lock().unwrap().len() as f64 / f64::from(requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_bounds_what_retries_add_to_a_failing_upstream() {
    let unbounded = amplification(100.0).await;
    let budgeted = amplification(0.2).await;
    eprintln!(
        "load on a failing upstream, 3 attempts: {unbounded:.2}x without a budget, {budgeted:.2}x with a 20% budget"
    );
    assert!(
        (unbounded - 3.0).abs() < 0.01,
        "every request tried 3 times without a budget: {unbounded}"
    );
    assert!(budgeted <= 1.21, "a 20% budget allowed {budgeted}x");
    assert!(
        budgeted >= 1.15,
        "the budget should still be spent: {budgeted}x"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_is_retried_into_a_success() {
    let upstream = support::serve(support::hop(Duration::ZERO, None)).await;
    upstream.hop.fail_next.store(1, Ordering::SeqCst);
    let mut client = retrying(
        upstream.addr,
        Arc::new(RetryBudget::new(0.2, 10)),
        Backoff::Fixed(Duration::from_millis(10)),
    );
    support::call(&mut client).await.unwrap();
    assert_eq!(
        upstream.hop.seen.lock().unwrap().len(),
        2,
        "one failure, one successful retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_refused_is_retried_until_the_attempts_run_out() {
    let port = trellis_testkit::free_port().unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut client = retrying(
        addr,
        Arc::new(RetryBudget::new(0.2, 10)),
        Backoff::Fixed(Duration::from_millis(150)),
    );
    let started = std::time::Instant::now();
    let err = support::call(&mut client).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    // Three attempts mean two 150 ms waits between them; without retries
    // a refused connection fails in about a millisecond. (A lower bound the
    // waits guarantee, however loaded the machine.)
    let took = started.elapsed();
    eprintln!("three attempts on a refused port took {took:?}");
    assert!(
        took >= Duration::from_millis(300),
        "no retries happened: {took:?}"
    );
}
