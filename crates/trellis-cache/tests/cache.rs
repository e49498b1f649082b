//! The two-level cache against a real Redis: a stampede of 1 000 readers
//! is one load, an invalidation on one instance reaches the others, the
//! Redis level serves a second instance, and with Redis down reads are
//! still served.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use trellis_cache::{Cache, CacheSettings};
use trellis_core::Secret;

/// The store the cache fronts: a map, and how often it was read.
#[derive(Clone, Default)]
struct Store {
    rows: Arc<Mutex<HashMap<String, String>>>,
    reads: Arc<AtomicUsize>,
}

impl Store {
    fn put(&self, key: &str, value: &str) {
        self.rows
            .lock()
            .unwrap()
            .insert(key.to_owned(), value.to_owned());
    }

    async fn read(&self, key: &str) -> Result<Option<String>, String> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        Ok(self.rows.lock().unwrap().get(key).cloned())
    }
}

fn settings(redis: &str) -> CacheSettings {
    CacheSettings {
        ttl: Duration::from_secs(3600),
        redis: Some(Secret::new(redis.to_owned())),
        ..Default::default()
    }
}

async fn get(cache: &Cache<String>, store: &Store, key: &str) -> Option<String> {
    cache
        .get_or_load(key, || store.read(key))
        .await
        .unwrap()
        .map(|v| v.as_ref().clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_cold_readers_make_one_load() {
    let redis = trellis_testkit::Redis::start().unwrap();
    let cache: Cache<String> = Cache::new("stampede", &settings(&redis.url()))
        .await
        .unwrap();
    let store = Store::default();
    store.put("u-1", "Ann");
    let mut readers = Vec::new();
    for _ in 0..1000 {
        let (cache, store) = (cache.clone(), store.clone());
        readers.push(tokio::spawn(async move {
            cache
                .get_or_load("u-1", || async {
                    // The load lasts until every reader has asked.
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                    while cache.stats().requests.load(Ordering::SeqCst) < 1000 {
                        assert!(
                            tokio::time::Instant::now() < deadline,
                            "only {} readers asked",
                            cache.stats().requests.load(Ordering::SeqCst)
                        );
                        tokio::task::yield_now().await;
                    }
                    store.read("u-1").await
                })
                .await
                .unwrap()
        }));
    }
    for r in readers {
        assert_eq!(r.await.unwrap().as_deref().map(String::as_str), Some("Ann"));
    }
    assert_eq!(store.reads.load(Ordering::SeqCst), 1, "one load");
    let stats = cache.stats();
    assert_eq!(stats.loads.load(Ordering::SeqCst), 1);
    assert_eq!(
        stats.coalesced.load(Ordering::SeqCst) + stats.local_hits.load(Ordering::SeqCst),
        999
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_on_one_instance_invalidates_the_others() {
    let redis = trellis_testkit::Redis::start().unwrap();
    let store = Store::default();
    store.put("u-1", "Ann");
    let a: Cache<String> = Cache::new("users", &settings(&redis.url())).await.unwrap();
    let b: Cache<String> = Cache::new("users", &settings(&redis.url())).await.unwrap();
    assert_eq!(get(&a, &store, "u-1").await.as_deref(), Some("Ann"));
    // The second instance finds it in Redis, not the store.
    assert_eq!(get(&b, &store, "u-1").await.as_deref(), Some("Ann"));
    assert_eq!(store.reads.load(Ordering::SeqCst), 1);
    assert_eq!(b.stats().redis_hits.load(Ordering::SeqCst), 1);
    // The row changes: until invalidated, both serve the cached value
    // (the hour-long ttl will not end it).
    store.put("u-1", "Bea");
    assert_eq!(get(&b, &store, "u-1").await.as_deref(), Some("Ann"));
    a.invalidate("u-1").await;
    assert_eq!(get(&a, &store, "u-1").await.as_deref(), Some("Bea"));
    trellis_testkit::eventually(
        Duration::from_secs(5),
        "the other instance to drop the key",
        || async {
            match get(&b, &store, "u-1").await.as_deref() {
                Some("Bea") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    // Missing keys are cached too, and invalidated the same way.
    assert_eq!(get(&b, &store, "u-2").await, None);
    store.put("u-2", "Cy");
    assert_eq!(get(&b, &store, "u-2").await, None, "remembered as missing");
    a.invalidate("u-2").await;
    trellis_testkit::eventually(Duration::from_secs(5), "u-2 to appear on b", || async {
        match get(&b, &store, "u-2").await.as_deref() {
            Some("Cy") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_reads_are_served_degraded() {
    let redis = trellis_testkit::Redis::start().unwrap();
    let store = Store::default();
    store.put("u-1", "Ann");
    store.put("u-2", "Bea");
    let cache: Cache<String> = Cache::new("down", &settings(&redis.url())).await.unwrap();
    assert_eq!(get(&cache, &store, "u-1").await.as_deref(), Some("Ann"));
    drop(redis);
    // The local level still answers; a miss is loaded from the store.
    assert_eq!(get(&cache, &store, "u-1").await.as_deref(), Some("Ann"));
    assert_eq!(get(&cache, &store, "u-2").await.as_deref(), Some("Bea"));
    assert_eq!(store.reads.load(Ordering::SeqCst), 2);
    assert!(cache.stats().redis_errors.load(Ordering::SeqCst) >= 1);
    // Invalidation still reaches this instance's local level.
    store.put("u-1", "Ada");
    cache.invalidate("u-1").await;
    assert_eq!(get(&cache, &store, "u-1").await.as_deref(), Some("Ada"));
}
