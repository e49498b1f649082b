//! The behaviour every lock backend shows, run against each.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use trellis_lock::{LockConfig, LockError, Locks};

/// K workers each take the lock N times and, holding it, read a shared
/// counter, yield, and write it back plus one: with mutual exclusion no
/// increment is lost. At no moment do two hold it; tokens only grow.
pub async fn mutual_exclusion(locks: Locks) {
    let counter = Arc::new(AtomicU64::new(0));
    let inside = Arc::new(AtomicU32::new(0));
    let last_token = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (locks, counter, inside, last_token) = (
            locks.clone(),
            counter.clone(),
            inside.clone(),
            last_token.clone(),
        );
        workers.spawn(async move {
            for _ in 0..25 {
                let guard = locks
                    .lock("counter", Duration::from_secs(20))
                    .await
                    .unwrap();
                assert_eq!(
                    inside.fetch_add(1, Ordering::SeqCst),
                    0,
                    "two holders at once"
                );
                let previous = last_token.swap(guard.token(), Ordering::SeqCst);
                assert!(
                    guard.token() > previous,
                    "token {} after {previous}",
                    guard.token()
                );
                let seen = counter.load(Ordering::SeqCst);
                tokio::task::yield_now().await;
                counter.store(seen + 1, Ordering::SeqCst);
                inside.fetch_sub(1, Ordering::SeqCst);
                assert!(guard.release().await.unwrap(), "released while held");
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.unwrap();
    }
    assert_eq!(counter.load(Ordering::SeqCst), 8 * 25);
}

/// try_lock fails while held and succeeds once released; a bad name is
/// refused; a wait times out, naming the lock.
pub async fn try_lock_and_timeouts(locks: Locks) {
    let held = locks.try_lock("stock:tea").await.unwrap().expect("free");
    assert!(
        locks.try_lock("stock:tea").await.unwrap().is_none(),
        "taken"
    );
    assert!(
        locks.try_lock("stock:cups").await.unwrap().is_some(),
        "another resource is free"
    );
    let err = locks
        .lock("stock:tea", Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(
        matches!(err, LockError::Timeout { ref resource, .. } if resource == "stock:tea"),
        "{err:?}"
    );
    let listed = locks.list().await.unwrap();
    let mut names: Vec<&str> = listed.iter().map(|h| h.resource.as_str()).collect();
    names.sort_unstable();
    assert!(names.contains(&"stock:tea"), "{listed:?}");
    assert!(
        listed.iter().all(|h| h
            .expires_in
            .is_some_and(|e| e <= std::time::Duration::from_secs(11))),
        "{listed:?}"
    );
    let first = held.token();
    assert!(held.release().await.unwrap());
    let after = locks.list().await.unwrap();
    assert!(
        after.iter().all(|h| h.resource != "stock:tea"),
        "released: {after:?}"
    );
    let again = locks
        .try_lock("stock:tea")
        .await
        .unwrap()
        .expect("released");
    assert!(again.token() > first);
    assert!(matches!(
        locks.try_lock("").await,
        Err(LockError::BadName(_))
    ));
    assert!(matches!(
        locks.try_lock(&"x".repeat(257)).await,
        Err(LockError::BadName(_))
    ));
    assert!(matches!(
        locks.try_lock("a b").await,
        Err(LockError::BadName(_))
    ));
}

/// A holder that stops extending (paused past its lease): another takes
/// the lock with a greater token, the first guard knows it lost the lock,
/// and its late release does not free the new holder's.
pub async fn a_lost_lease_is_known_and_fenced(make: impl Fn(LockConfig) -> Locks) {
    let short = LockConfig {
        ttl: Duration::from_millis(300),
        extend_every: None,
        retry: Duration::from_millis(5),
    };
    let paused = make(short.clone());
    let stale = paused.try_lock("ledger").await.unwrap().expect("free");
    assert!(!stale.is_lost());
    // Could have been taken now, if exclusion were broken: it is not.
    assert!(paused.try_lock("ledger").await.unwrap().is_none());
    tokio::time::timeout(Duration::from_secs(5), stale.lost())
        .await
        .expect("the lease ends");
    assert!(stale.is_lost());
    let successor = make(LockConfig::default())
        .lock("ledger", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        successor.token() > stale.token(),
        "fencing: the newer grant's token is greater"
    );
    assert!(
        !stale.release().await.unwrap(),
        "the stale holder released nothing"
    );
    assert!(
        make(short).try_lock("ledger").await.unwrap().is_none(),
        "still the successor's"
    );

    // With keep-alive the lease outlives its TTL many times over.
    let kept = make(LockConfig {
        ttl: Duration::from_millis(200),
        extend_every: Some(Duration::from_millis(50)),
        retry: Duration::from_millis(5),
    });
    let guard = kept.try_lock("kept").await.unwrap().expect("free");
    let outlived = tokio::time::timeout(Duration::from_millis(800), guard.lost()).await;
    assert!(outlived.is_err(), "lost while extended");
    assert!(kept.try_lock("kept").await.unwrap().is_none());
    drop(guard); // dropping lets go too
    kept.lock("kept", Duration::from_secs(5)).await.unwrap();
}
