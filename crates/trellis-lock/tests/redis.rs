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
