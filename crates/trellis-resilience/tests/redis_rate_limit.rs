//! The shared limit in a real Redis: several instances, one budget; Redis
//! killed: the fallback decides, without stalling.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use trellis_resilience::{Decision, Limiter, LocalLimiter, Quota, RedisFallback, RedisLimiter};
use trellis_testkit::Redis;

/// Hammers `limiter` with `key` until `until`; returns how many were allowed.
async fn hammer(limiter: Arc<RedisLimiter>, key: &'static str, until: Instant) -> u32 {
    let mut allowed = 0;
    while Instant::now() < until {
        if limiter.check(Some(key)).await == Decision::Allow {
            allowed += 1;
        }
    }
    allowed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_one_budget() {
    let redis = Redis::start().unwrap();
    let quota = Quota::per_second(100).with_burst(50);
    let instances: Vec<Arc<RedisLimiter>> = (0..3)
        .map(|_| {
            Arc::new(
                RedisLimiter::new(&redis.url(), "rl:", quota, RedisFallback::Deny)
                    .unwrap()
                    .with_timeout(Duration::from_secs(1)),
            )
        })
        .collect();
    // Warm the connections (lazy) without spending the key's budget.
    for i in &instances {
        i.check(Some("warm-up")).await;
    }
    let started = Instant::now();
    let until = started + Duration::from_secs(2);
    let tasks: Vec<_> = instances
        .iter()
        .map(|i| tokio::spawn(hammer(i.clone(), "tenant-a", until)))
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    // Requests went out for exactly `window`; the last answers may land a
    // little later (`elapsed`), under a loaded machine more so. One budget
    // admits 50 + 100/s over that time; three separate budgets would admit
    // three times as much.
    let window = (until - started).as_secs_f64();
    let elapsed = started.elapsed().as_secs_f64();
    let (low, high) = (50.0 + 100.0 * window, 50.0 + 100.0 * elapsed);
    eprintln!(
        "3 instances admitted {total} in {window:.2}-{elapsed:.2}s; one limit allows {low:.0}-{high:.0}"
    );
    assert!(
        f64::from(total) >= low * 0.95 - 2.0 && f64::from(total) <= high * 1.05 + 2.0,
        "admitted {total}, expected {low:.0}-{high:.0}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_dies_the_fallback_decides_without_stalling() {
    let mut redis = Redis::start().unwrap();
    let quota = Quota::per_second(1000);
    let local = LocalLimiter::new(Quota::per_second(5).with_burst(5), 1000);
    let with_local =
        RedisLimiter::new(&redis.url(), "rl:", quota, RedisFallback::Local(local)).unwrap();
    let allow = RedisLimiter::new(&redis.url(), "rl:", quota, RedisFallback::Allow).unwrap();
    let deny = RedisLimiter::new(&redis.url(), "rl:", quota, RedisFallback::Deny).unwrap();
    assert_eq!(
        with_local.check(Some("k")).await,
        Decision::Allow,
        "redis answers while it is up"
    );

    redis.engine().kill();
    let started = Instant::now();
    let decisions: Vec<Decision> = futures_collect(&with_local, 100).await;
    let allowed = decisions.iter().filter(|d| **d == Decision::Allow).count();
    // One timeout, then straight to the fallback: its burst of 5 (a sixth
    // if a refill lands inside the test), then denial.
    assert!(
        (5..=6).contains(&allowed),
        "the local fallback's burst, then denial: {decisions:?}"
    );
    for _ in 0..100 {
        assert_eq!(allow.check(Some("k")).await, Decision::Allow);
        assert!(matches!(deny.check(Some("k")).await, Decision::Deny { .. }));
    }
    let took = started.elapsed();
    eprintln!("300 decisions with redis down took {took:?}");
    // Three limiters, one timeout each (50 ms) at most; a stall per request
    // would take 300 × 50 ms = 15 s. The bound is generous for a loaded
    // machine and still far below that.
    assert!(
        took < Duration::from_secs(3),
        "a dead redis stalled the limiter: {took:?}"
    );
}

async fn futures_collect(limiter: &RedisLimiter, n: usize) -> Vec<Decision> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(limiter.check(Some("k")).await);
    }
    out
}

/// `rediss://` with the shop's CA and a client certificate: the limiter
/// asks Redis over mutual TLS (its fallback denies, so an allowed request
/// is Redis' answer); without the certificate Redis refuses the handshake
/// and the fallback decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_is_shared_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = trellis_transport::certs::init(dir.path(), "trellis", &["redis", "order"]).unwrap();
    let (_, cert, key) = &certs.services[0];
    let redis = Redis::start_tls(cert, key, &certs.ca).unwrap();
    let (_, client_cert, client_key) = &certs.services[1];
    let base = redis.tls_url().unwrap();
    let url = format!(
        "{base}?ca_file={}&cert_file={}&key_file={}",
        certs.ca.display(),
        client_cert.display(),
        client_key.display()
    );
    let quota = Quota::per_second(1).with_burst(2);
    let limiter = RedisLimiter::new(&url, "rl:", quota, RedisFallback::Deny)
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    let decisions = futures_collect(&limiter, 4).await;
    assert_eq!(decisions[0], Decision::Allow, "{decisions:?}");
    assert!(
        decisions.contains(&Decision::Allow) && decisions.iter().any(|d| *d != Decision::Allow),
        "{decisions:?}"
    );

    let bare = format!("{base}?ca_file={}", certs.ca.display());
    let refused = RedisLimiter::new(&bare, "rl:", quota, RedisFallback::Deny)
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    assert_ne!(
        refused.check(Some("k")).await,
        Decision::Allow,
        "served without a certificate"
    );
    assert!(
        trellis_resilience::redis_client(&format!(
            "redis://127.0.0.1:1?ca_file={}",
            certs.ca.display()
        ))
        .is_err(),
        "TLS files on a plaintext URL are refused"
    );
}
