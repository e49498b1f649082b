//! The lock suite against a real Redis, and Redis going away.

mod suite;

use std::time::Duration;

use trellis_lock::{LockConfig, LockError, Locks, RedisLocks};
use trellis_testkit::Redis;

fn locks(redis: &Redis, config: LockConfig) -> Locks {
    Locks::with_config(RedisLocks::connect(&redis.url(), "test:").unwrap(), config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_locks_exclude() {
    let redis = Redis::start().unwrap();
    suite::mutual_exclusion(locks(&redis, LockConfig::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_try_lock_and_timeouts() {
    let redis = Redis::start().unwrap();
    suite::try_lock_and_timeouts(locks(&redis, LockConfig::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lost_leases_are_fenced() {
    let redis = Redis::start().unwrap();
    suite::a_lost_lease_is_known_and_fenced(|config| locks(&redis, config)).await;
}

/// Redis gone: acquiring is a backend error naming Redis, not a hang and
/// not a grant; a held lock's keep-alive fails past its lease and the
/// guard says it is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_refuses_and_held_leases_are_lost() {
    let mut redis = Redis::start().unwrap();
    let kept = locks(
        &redis,
        LockConfig {
            ttl: Duration::from_millis(400),
            extend_every: Some(Duration::from_millis(100)),
            retry: Duration::from_millis(5),
        },
    );
    let guard = kept.try_lock("held").await.unwrap().expect("free");
    redis.engine().kill();
    tokio::time::timeout(Duration::from_secs(10), guard.lost())
        .await
        .expect("the guard learns its lease is gone");
    let err = kept.try_lock("other").await.unwrap_err();
    assert!(
        matches!(err, LockError::Backend(ref m) if m.contains("redis")),
        "{err:?}"
    );
}

fn redlock(instances: &[Redis], config: LockConfig) -> Locks {
    let urls: Vec<String> = instances.iter().map(|r| r.url()).collect();
    Locks::with_config(
        trellis_lock::RedlockLocks::connect(&urls, "test:").unwrap(),
        config,
    )
}

fn three() -> Vec<Redis> {
    (0..3).map(|_| Redis::start().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_excludes_and_fences() {
    let instances = three();
    suite::mutual_exclusion(redlock(&instances, LockConfig::default())).await;
    suite::try_lock_and_timeouts(redlock(&instances, LockConfig::default())).await;
    suite::a_lost_lease_is_known_and_fenced(|config| redlock(&instances, config)).await;
}

/// One of three instances down: a majority still grants, and the tokens
/// still grow. Two down: refused, naming the instances that did not
/// answer. Fewer than three instances: refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_needs_a_majority() {
    let mut instances = three();
    let locks = redlock(&instances, LockConfig::default());
    let before = locks.try_lock("r").await.unwrap().expect("free");
    let first = before.token();
    assert!(before.release().await.unwrap());
    instances[0].engine().kill();
    let granted = locks
        .try_lock("r")
        .await
        .unwrap()
        .expect("two of three grant");
    assert!(granted.token() > first, "{} after {first}", granted.token());
    assert!(locks.try_lock("r").await.unwrap().is_none(), "and exclude");
    assert!(granted.release().await.unwrap());
    instances[1].engine().kill();
    let refused = locks.try_lock("r").await.unwrap_err();
    assert!(
        matches!(refused, LockError::Backend(ref m) if m.contains("2 of 3")),
        "{refused:?}"
    );
    let urls: Vec<String> = instances.iter().take(2).map(|r| r.url()).collect();
    assert!(trellis_lock::RedlockLocks::connect(&urls, "test:").is_err());
}
