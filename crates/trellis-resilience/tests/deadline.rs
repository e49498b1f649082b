//! Deadline propagation across three services over real gRPC.

mod support;

use std::time::{Duration, Instant};

use support::{call, client, hop, serve, until};

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
    // Lower bounds are what the mechanism guarantees (each hop sleeps
    // 100 ms before calling on); the upper slack is generous, so a loaded
    // machine does not fail it, yet a hop that passed its own deadline on
    // instead of what is left of it (≥ 1 s) would.
    assert!(
        at_a <= 1_000_000 && at_a > 500_000,
        "a saw {at_a}us of a 1s deadline"
    );
    assert!(
        at_b <= at_a - 100_000 && at_b > at_a - 500_000,
        "b saw {at_b}us after a's {at_a}us"
    );
    assert!(
        at_c <= at_b - 100_000 && at_c > at_b - 500_000,
        "c saw {at_c}us after b's {at_b}us"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caller_gets_deadline_exceeded_on_time_and_the_last_hop_is_never_called_late() {
    // c would take 10 s; the caller gives the chain 600 ms.
    let c = serve(hop(Duration::from_secs(10), None)).await;
    let b = serve(hop(Duration::from_millis(100), Some(c.addr))).await;
    let a = serve(hop(Duration::from_millis(100), Some(b.addr))).await;

    let started = Instant::now();
    let mut caller = client(a.addr, Some(Duration::from_millis(600)));
    let err = call(&mut caller).await.unwrap_err();
    let took = started.elapsed();
    eprintln!("DEADLINE_EXCEEDED after {took:?} (deadline 600 ms, chain 10.2 s)");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err}");
    assert!(
        took >= Duration::from_millis(590) && took < Duration::from_secs(5),
        "took {took:?}"
    );
    // c was reached after a's and b's 100 ms, and knew how little was left.
    let seen_by_c = c.hop.seen.lock().unwrap().clone();
    eprintln!("c saw {seen_by_c:?} left");
    assert_eq!(seen_by_c.len(), 1);
    assert!(
        seen_by_c[0].is_some_and(|d| d <= Duration::from_millis(400)),
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
    // a's handler is over (cut by the deadline, or done): had it called b,
    // b would have seen the call by now.
    until("a's handler to end", || {
        a.hop.ended.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(a.hop.seen.lock().unwrap().len(), 1, "a was reached");
    assert!(
        b.hop.seen.lock().unwrap().is_empty(),
        "b was called after the deadline"
    );
}
