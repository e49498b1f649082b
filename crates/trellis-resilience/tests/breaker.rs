//! Circuit breakers: the state machine under tokio's paused clock, a model
//! check, and a breaker in front of a real gRPC upstream.

mod support;

use std::{sync::atomic::Ordering, time::Duration};

use proptest::prelude::*;
use trellis_resilience::{
    Breaker, BreakerConfig, BreakerPolicy, BreakerState, CircuitBreakerLayer, Clock, Outcome,
    Permit, SreBreaker, SreConfig, Trip,
};

const FAST: Duration = Duration::from_millis(1);

fn ratio_only(min_calls: u32, ratio: f64) -> BreakerConfig {
    BreakerConfig {
        min_calls,
        failure_ratio: ratio,
        consecutive_failures: None,
        ..BreakerConfig::default()
    }
}

fn call(b: &Breaker, outcome: Outcome) -> bool {
    match b.acquire() {
        Some(permit) => {
            b.record(permit, outcome, FAST);
            true
        }
        None => false,
    }
}

#[tokio::test(start_paused = true)]
async fn opens_on_a_failure_ratio_fails_fast_then_half_opens_and_closes() {
    let b = Breaker::with_clock(
        BreakerConfig {
            open_duration: Duration::from_secs(5),
            half_open_probes: 3,
            ..ratio_only(10, 0.5)
        },
        Clock::Tokio,
    );
    let mut events = b.subscribe();
    for i in 0..9 {
        call(
            &b,
            if i % 2 == 0 {
                Outcome::Failure
            } else {
                Outcome::Success
            },
        );
    }
    assert_eq!(
        b.state(),
        BreakerState::Closed,
        "below min_calls nothing trips"
    );
    call(&b, Outcome::Failure); // 10 calls, 6 failures
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(
        *events.borrow_and_update(),
        (BreakerState::Open, Some(Trip::FailureRatio))
    );
    assert!(b.acquire().is_none(), "open fails fast");

    tokio::time::advance(Duration::from_secs(4)).await;
    assert!(b.acquire().is_none(), "still open before open_duration");
    tokio::time::advance(Duration::from_secs(1)).await;
    let probes: Vec<Permit> = (0..3).map(|_| b.acquire().unwrap()).collect();
    assert_eq!(b.state(), BreakerState::HalfOpen);
    assert!(probes.iter().all(|p| *p == Permit::Probe));
    assert!(
        b.acquire().is_none(),
        "only half_open_probes calls go through"
    );
    for p in probes {
        b.record(p, Outcome::Success, FAST);
    }
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(events.borrow_and_update().0, BreakerState::Closed);
    // The old failures are forgotten: one failure does not reopen it.
    call(&b, Outcome::Failure);
    assert_eq!(b.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_opens_it_again() {
    let b = Breaker::with_clock(
        BreakerConfig {
            consecutive_failures: Some(3),
            ..BreakerConfig::default()
        },
        Clock::Tokio,
    );
    for _ in 0..3 {
        call(&b, Outcome::Failure);
    }
    assert_eq!(
        *b.subscribe().borrow(),
        (BreakerState::Open, Some(Trip::ConsecutiveFailures))
    );
    tokio::time::advance(Duration::from_secs(5)).await;
    let probe = b.acquire().unwrap();
    b.record(probe, Outcome::Failure, FAST);
    assert_eq!(
        *b.subscribe().borrow(),
        (BreakerState::Open, Some(Trip::ProbeFailed))
    );
    assert!(b.acquire().is_none());
}

#[tokio::test(start_paused = true)]
async fn slow_calls_trip_when_configured() {
    let b = Breaker::with_clock(
        BreakerConfig {
            slow_call_ratio: Some(0.5),
            slow_call_threshold: Duration::from_millis(200),
            ..ratio_only(4, 0.9)
        },
        Clock::Tokio,
    );
    for slow in [false, true, false, true] {
        let p = b.acquire().unwrap();
        b.record(
            p,
            Outcome::Success,
            if slow {
                Duration::from_millis(300)
            } else {
                FAST
            },
        );
    }
    assert_eq!(
        *b.subscribe().borrow(),
        (BreakerState::Open, Some(Trip::SlowCallRatio))
    );
}

#[tokio::test(start_paused = true)]
async fn failures_age_out_of_the_window() {
    let b = Breaker::with_clock(
        BreakerConfig {
            window: Duration::from_secs(10),
            ..ratio_only(10, 0.5)
        },
        Clock::Tokio,
    );
    for _ in 0..4 {
        call(&b, Outcome::Failure);
    }
    tokio::time::advance(Duration::from_secs(11)).await;
    for _ in 0..5 {
        call(&b, Outcome::Success);
    }
    call(&b, Outcome::Failure);
    // 6 calls in the window now, only 1 failure: the 4 old ones are gone.
    for _ in 0..4 {
        call(&b, Outcome::Success);
    }
    assert_eq!(b.state(), BreakerState::Closed);
}

#[test]
fn a_count_window_judges_the_last_n_calls_whenever_they_happened() {
    let b = Breaker::new(BreakerConfig {
        count_window: Some(10),
        ..ratio_only(10, 0.5)
    });
    // 4 old failures, then 10 successes push them out of the window.
    for _ in 0..4 {
        call(&b, Outcome::Failure);
    }
    for _ in 0..10 {
        call(&b, Outcome::Success);
    }
    // 4 failures in the last 10: below half.
    for _ in 0..4 {
        call(&b, Outcome::Failure);
    }
    assert_eq!(b.state(), BreakerState::Closed);
    // The 5th failure in the last 10 trips it.
    call(&b, Outcome::Failure);
    assert_eq!(
        *b.subscribe().borrow(),
        (BreakerState::Open, Some(Trip::FailureRatio))
    );
}

proptest! {
    /// A count window behaves like the model over the last N calls.
    #[test]
    fn a_count_window_opens_exactly_when_the_last_n_say(
        outcomes in proptest::collection::vec(any::<bool>(), 1..200),
        n in 1u32..30,
        ratio_pct in 10u32..100,
    ) {
        let ratio = f64::from(ratio_pct) / 100.0;
        let b = Breaker::new(BreakerConfig { count_window: Some(n), ..ratio_only(n, ratio) });
        let mut last: std::collections::VecDeque<bool> = Default::default();
        let mut open = false;
        for failed in outcomes {
            let admitted = call(&b, if failed { Outcome::Failure } else { Outcome::Success });
            prop_assert_eq!(admitted, !open);
            if !open {
                last.push_back(failed);
                if last.len() > n as usize {
                    last.pop_front();
                }
                let failures = last.iter().filter(|f| **f).count() as f64;
                open = failed && last.len() >= n as usize && failures / last.len() as f64 >= ratio;
            }
            prop_assert_eq!(b.state() == BreakerState::Open, open);
        }
    }

    /// Within one window, the breaker opens exactly when a model that counts
    /// calls and failures says it should, and never before.
    #[test]
    fn opens_exactly_when_the_model_says(
        outcomes in proptest::collection::vec(any::<bool>(), 1..200),
        min_calls in 1u32..30,
        ratio_pct in 10u32..100,
    ) {
        let ratio = f64::from(ratio_pct) / 100.0;
        let b = Breaker::new(ratio_only(min_calls, ratio));
        let (mut calls, mut failures, mut open) = (0u32, 0u32, false);
        for failed in outcomes {
            let admitted = call(&b, if failed { Outcome::Failure } else { Outcome::Success });
            prop_assert_eq!(admitted, !open);
            if !open {
                calls += 1;
                failures += u32::from(failed);
                open = failed && calls >= min_calls && f64::from(failures) / f64::from(calls) >= ratio;
            }
            prop_assert_eq!(b.state() == BreakerState::Open, open);
        }
    }

    /// SRE throttling follows max(0, (requests − k·accepts) / (requests + 1)).
    #[test]
    fn sre_rejection_probability_follows_the_formula(accepts in 0u32..100, extra in 0u32..100) {
        let b = SreBreaker::new(SreConfig { min_requests: 0, ..SreConfig::default() });
        let requests = accepts + extra;
        for i in 0..requests {
            // Drive the counts directly: acquire counts a request; record an accept.
            let permit = b.acquire().unwrap_or(Permit::Normal);
            b.record(permit, if i < accepts { Outcome::Success } else { Outcome::Failure }, FAST);
        }
        let expected = ((f64::from(requests) - 1.5 * f64::from(accepts)) / (f64::from(requests) + 1.0)).max(0.0);
        prop_assert!((b.rejection_probability() - expected).abs() < 1e-9);
        prop_assert!(b.rejection_probability() < 1.0);
    }
}

#[test]
fn sre_throttles_a_failing_dependency_and_not_a_healthy_one() {
    let healthy = SreBreaker::new(SreConfig::default());
    let failing = SreBreaker::new(SreConfig::default());
    let (mut healthy_rejects, mut failing_rejects) = (0, 0);
    for _ in 0..2000 {
        match healthy.acquire() {
            Some(p) => healthy.record(p, Outcome::Success, FAST),
            None => healthy_rejects += 1,
        }
        match failing.acquire() {
            Some(p) => failing.record(p, Outcome::Failure, FAST),
            None => failing_rejects += 1,
        }
    }
    assert_eq!(healthy_rejects, 0);
    assert!(
        failing_rejects > 1800,
        "a dependency failing every call should be throttled: {failing_rejects}"
    );
}

/// Each thread keeps its own window; the throttle holds on every thread,
/// and the probability reported is over all of them.
#[test]
fn sre_throttles_on_every_thread_and_reports_over_all() {
    let failing = std::sync::Arc::new(SreBreaker::new(SreConfig::default()));
    let rejects: Vec<u32> = (0..3)
        .map(|_| {
            let failing = failing.clone();
            std::thread::spawn(move || {
                let mut rejects = 0;
                for _ in 0..2000 {
                    match failing.acquire() {
                        Some(p) => failing.record(p, Outcome::Failure, FAST),
                        None => rejects += 1,
                    }
                }
                rejects
            })
        })
        .map(|t| t.join().unwrap())
        .collect();
    assert!(rejects.iter().all(|r| *r > 1800), "{rejects:?}");
    assert!(failing.rejection_probability() > 0.9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opens_under_an_error_burst_and_closes_when_the_upstream_recovers() {
    let upstream = support::serve(support::hop(Duration::ZERO, None)).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", upstream.addr))
        .unwrap()
        .connect_lazy();
    let config = BreakerConfig {
        consecutive_failures: Some(5),
        open_duration: Duration::from_millis(300),
        half_open_probes: 2,
        ..BreakerConfig::default()
    };
    let stack = tower::Layer::layer(
        &CircuitBreakerLayer::per_method(move || Breaker::new(config.clone())),
        channel,
    );
    let mut client = tonic::client::Grpc::new(stack);

    support::call(&mut client).await.unwrap();
    upstream.hop.failing.store(true, Ordering::SeqCst);
    for _ in 0..5 {
        let err = support::call(&mut client).await.unwrap_err();
        assert_eq!(err.message(), "hop is failing");
    }
    let reached = upstream.hop.seen.lock().unwrap().len();
    // Open: the next calls fail fast without reaching the upstream.
    for _ in 0..20 {
        let err = support::call(&mut client).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.message().contains("circuit open"), "{err}");
    }
    assert_eq!(
        upstream.hop.seen.lock().unwrap().len(),
        reached,
        "an open breaker let calls through"
    );

    upstream.hop.failing.store(false, Ordering::SeqCst);
    // Open for 300 ms: calls keep failing fast (never reaching the
    // upstream) until the first probe goes through.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Err(err) = support::call(&mut client).await {
        assert!(err.message().contains("circuit open"), "{err}");
        assert!(
            std::time::Instant::now() < deadline,
            "the breaker never let a probe through"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..4 {
        support::call(&mut client).await.unwrap();
    }
    assert_eq!(
        upstream.hop.seen.lock().unwrap().len(),
        reached + 5,
        "probes, then normal traffic"
    );
}

#[test]
fn state_changes_are_counted_and_the_open_gauge_follows() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        let b = Breaker::new(BreakerConfig {
            consecutive_failures: Some(3),
            open_duration: Duration::ZERO,
            half_open_probes: 1,
            ..BreakerConfig::default()
        });
        for _ in 0..3 {
            call(&b, Outcome::Failure);
        }
        assert_eq!(b.state(), BreakerState::Open);
        let text = handle.render();
        assert!(
            text.contains("circuit_breaker_transitions_total{to=\"open\"} 1"),
            "{text}"
        );
        assert!(text.contains("circuit_breaker_open 1"), "{text}");

        let probe = b.acquire().expect("open_duration is over: a probe");
        b.record(probe, Outcome::Success, FAST);
        assert_eq!(b.state(), BreakerState::Closed);
        let text = handle.render();
        assert!(
            text.contains("circuit_breaker_transitions_total{to=\"half_open\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("circuit_breaker_transitions_total{to=\"closed\"} 1"),
            "{text}"
        );
        assert!(text.contains("circuit_breaker_open 0"), "{text}");
    });
}

/// A gRPC upstream that answers with a message and then fails in the
/// trailers (what a server stream that breaks, or a proxy, sends): the
/// head looks like success, the end does not.
fn failing_in_the_trailers(
    code: &'static str,
) -> impl tower::Service<
    http::Request<tonic::body::Body>,
    Response = http::Response<tonic::body::Body>,
    Error = std::convert::Infallible,
    Future = std::future::Ready<
        Result<http::Response<tonic::body::Body>, std::convert::Infallible>,
    >,
> + Clone {
    tower::service_fn(move |_req: http::Request<tonic::body::Body>| {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static(code));
        let frames = vec![
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from_static(
                b"\0\0\0\0\0",
            ))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let body = tonic::body::Body::new(http_body_util::StreamBody::new(
            futures_util::stream::iter(frames),
        ));
        let mut response = http::Response::new(body);
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        std::future::ready(Ok(response))
    })
}

/// The one classifier judges the end of the response: an error in the
/// trailers is a failure (it used to count as a success, the head being
/// fine), and the breaker opens on a run of them.
#[tokio::test]
async fn a_grpc_error_in_the_trailers_counts_as_a_failure() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let config = BreakerConfig {
        consecutive_failures: Some(3),
        ..BreakerConfig::default()
    };
    for (code, opens) in [("13", true), ("0", false), ("5", false)] {
        let breaker = std::sync::Arc::new(Breaker::new(config.clone()));
        let layer = CircuitBreakerLayer::new(Shared(breaker.clone()));
        let service = tower::Layer::layer(&layer, failing_in_the_trailers(code));
        for _ in 0..3 {
            let request = http::Request::new(tonic::body::Body::empty());
            let response = service.clone().oneshot(request).await.unwrap();
            // The outcome is known once the body has ended.
            let _ = response.into_body().collect().await;
        }
        assert_eq!(
            breaker.state() == BreakerState::Open,
            opens,
            "grpc-status {code} in the trailers"
        );
    }
}

/// A breaker shared with the test, to read its state.
struct Shared(std::sync::Arc<Breaker>);

impl BreakerPolicy for Shared {
    fn acquire(&self) -> Option<Permit> {
        self.0.acquire()
    }
    fn record(&self, permit: Permit, outcome: Outcome, elapsed: Duration) {
        self.0.record(permit, outcome, elapsed)
    }
}
