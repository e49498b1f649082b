//! Deadline propagation across three services over real gRPC.

mod support;

use std::time::{Duration, Instant};

use support::{call, client, hop, serve};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hop_sees_what_is_left_of_the_callers_deadline() {
    let c = serve(hop(Duration::ZERO, None)).await;
    let b = serve(hop(Duration::from_millis(100), Some(c.addr))).await;
    let a = serve(hop(Duration::from_millis(100), Some(b.addr))).await;

    let mut caller = client(a.addr, Some(Duration::from_secs(1)));
    let reply = call(&mut caller).await.unwrap();
    let [at_a, at_b, at_c] = reply.budgets_us[..] else {
        panic!("{:?}", reply.budgets_us)
    };
    let ms = |us: u64| us / 1000;
    eprintln!(
        "budget seen: a {} ms, b {} ms, c {} ms",
        ms(at_a),
        ms(at_b),
        ms(at_c)
    );
    assert!(
        at_a <= 1_000_000 && at_a > 900_000,
        "a saw {at_a}us of a 1s deadline"
    );
    // Each hop spends ~100 ms before calling on; what arrives shrinks by that.
    assert!(
        at_b <= at_a - 100_000 && at_b > at_a - 200_000,
        "b saw {at_b}us after a's {at_a}us"
    );
    assert!(
        at_c <= at_b - 100_000 && at_c > at_b - 200_000,
        "c saw {at_c}us after b's {at_b}us"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caller_gets_deadline_exceeded_on_time_and_the_last_hop_is_never_called_late() {
    let c = serve(hop(Duration::from_millis(100), None)).await;
    let b = serve(hop(Duration::from_millis(100), Some(c.addr))).await;
    let a = serve(hop(Duration::from_millis(100), Some(b.addr))).await;

    let started = Instant::now();
    let mut caller = client(a.addr, Some(Duration::from_millis(250)));
    let err = call(&mut caller).await.unwrap_err();
    let took = started.elapsed();
    eprintln!("DEADLINE_EXCEEDED after {took:?} (deadline 250 ms)");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err}");
    assert!(
        took >= Duration::from_millis(240) && took < Duration::from_millis(400),
        "took {took:?}"
    );
    // c was reached with ~50 ms left and knew it.
    let seen_by_c = c.hop.seen.lock().unwrap().clone();
    assert_eq!(seen_by_c.len(), 1);
    assert!(
        seen_by_c[0].is_some_and(|d| d < Duration::from_millis(60)),
        "c saw {seen_by_c:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_call_leaves_once_the_deadline_has_passed() {
    // b never gets called: a's own work uses up the whole deadline.
    let b = serve(hop(Duration::ZERO, None)).await;
    let a = serve(hop(Duration::from_millis(200), Some(b.addr))).await;
    let mut caller = client(a.addr, Some(Duration::from_millis(150)));
    let err = call(&mut caller).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        b.hop.seen.lock().unwrap().is_empty(),
        "b was called after the deadline"
    );
}
