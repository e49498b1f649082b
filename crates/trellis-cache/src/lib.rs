//! A two-level read cache for services: a bounded local cache (moka) in
//! front of Redis, in front of the service's own store.
//!
//! - **Single flight**: concurrent misses of one key in one process share
//!   one load (the local cache coalesces them); a stampede of a thousand
//!   readers is one query.
//! - **TTL with jitter**: every entry lives `ttl` ± `jitter`, so keys
//!   loaded together do not expire together.
//! - **Negative caching**: a key the store does not have is remembered as
//!   missing for `negative_ttl`, so probes for absent ids do not reach it.
//! - **Invalidation broadcast**: [`Cache::invalidate`] drops the key here
//!   and in Redis, and publishes it; every instance subscribed drops its
//!   local copy within one round trip. An instance that loses the
//!   subscription clears its local level when it gets it back (it may
//!   have missed invalidations).
//! - **Degraded, not failed**: when Redis is down, reads are served from
//!   the local level and the store (Redis is skipped for a second after
//!   each failure), and invalidations still reach the local level.
//!
//! Metrics: `cache_requests_total{cache,result}` with `result` one of
//! `local_hit`, `redis_hit`, `load`, `coalesced`; `cache_redis_errors_total{cache}`.
//!
//! ```
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use trellis_cache::{Cache, CacheSettings};
//!
//! let cache: Cache<String> = Cache::new("users", &CacheSettings::default()).await?;
//! let name = cache
//!     .get_or_load("42", || async { Ok::<_, String>(Some("Ann".to_owned())) })
//!     .await?;
//! assert_eq!(name.as_deref().map(String::as_str), Some("Ann"));
//! cache.invalidate("42").await; // after the row changed
//! # Ok(()) }
//! ```
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `redis` | no | the Redis level and the invalidation broadcast (`redis = "redis://…"`) |

#![warn(missing_docs)]

#[cfg(feature = "redis")]
mod remote;

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use trellis_config::Invalid;
use trellis_core::Secret;

/// `cache.*` in a service's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheSettings {
    /// Whether reads go through the cache. Default: true.
    pub enabled: bool,
    /// Entries held locally, at most. Default: 10 000.
    pub capacity: u64,
    /// How long an entry lives (each level). Default: 60s.
    #[serde(with = "trellis_config::duration")]
    pub ttl: Duration,
    /// How long a missing key is remembered. Default: 5s.
    #[serde(with = "trellis_config::duration")]
    pub negative_ttl: Duration,
    /// Each entry's lifetime varies by up to this fraction either way.
    /// Default: 0.1.
    pub jitter: f64,
    /// The second level and invalidation broadcast: `redis://host:port`
    /// or `rediss://…`. Default: none (local only).
    pub redis: Option<Secret<String>>,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            enabled: true,
            capacity: 10_000,
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
            jitter: 0.1,
            redis: None,
        }
    }
}

impl CacheSettings {
    /// Checks the settings, naming keys under `prefix` (`cache`).
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        Invalid::check_range(&format!("{prefix}.capacity"), self.capacity, 1, 100_000_000)?;
        Invalid::check_range(
            &format!("{prefix}.ttl"),
            self.ttl,
            Duration::from_millis(10),
            Duration::from_secs(7 * 24 * 3600),
        )?;
        Invalid::check_range(
            &format!("{prefix}.negative_ttl"),
            self.negative_ttl,
            Duration::ZERO,
            Duration::from_secs(24 * 3600),
        )?;
        Invalid::check_range(&format!("{prefix}.jitter"), self.jitter, 0.0, 0.5)?;
        if let Some(url) = &self.redis {
            let url = url.expose();
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(Invalid::new(
                    format!("{prefix}.redis"),
                    "expected redis://host:port or rediss://host:port",
                ));
            }
        }
        Ok(())
    }
}

/// Why the cache could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The Redis URL is bad, or this build has no Redis support.
    #[error("cache redis: {0}")]
    Redis(String),
}

/// What one level holds for a key.
enum Slot<V> {
    Found(Arc<V>),
    Missing,
}

impl<V> Clone for Slot<V> {
    fn clone(&self) -> Self {
        match self {
            Slot::Found(v) => Slot::Found(v.clone()),
            Slot::Missing => Slot::Missing,
        }
    }
}

/// An entry with its own lifetime (jittered at insertion).
struct Entry<V> {
    slot: Slot<V>,
    ttl: Duration,
}

impl<V> Clone for Entry<V> {
    fn clone(&self) -> Self {
        Entry {
            slot: self.slot.clone(),
            ttl: self.ttl,
        }
    }
}

struct PerEntry;

impl<V> moka::Expiry<String, Entry<V>> for PerEntry {
    fn expire_after_create(
        &self,
        _: &String,
        entry: &Entry<V>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

/// Counts since the cache was made (also exported as metrics).
#[derive(Debug, Default)]
pub struct Stats {
    /// Calls of [`Cache::get_or_load`].
    pub requests: AtomicU64,
    /// Answered by the local level.
    pub local_hits: AtomicU64,
    /// Answered by Redis.
    pub redis_hits: AtomicU64,
    /// Loads from the store.
    pub loads: AtomicU64,
    /// Callers that waited for another caller's load.
    pub coalesced: AtomicU64,
    /// Redis calls that failed.
    pub redis_errors: AtomicU64,
}

struct Inner<V> {
    name: &'static str,
    local: moka::future::Cache<String, Entry<V>>,
    ttl: Duration,
    negative_ttl: Duration,
    jitter: f64,
    stats: Stats,
    #[cfg(feature = "redis")]
    remote: Option<remote::Remote>,
}

/// A two-level cache of `V` by string key (see the crate docs). Cheap to
/// clone; clones share the cache.
pub struct Cache<V> {
    inner: Arc<Inner<V>>,
}

impl<V> Clone for Cache<V> {
    fn clone(&self) -> Self {
        Cache {
            inner: self.inner.clone(),
        }
    }
}

impl<V> Cache<V>
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// The cache called `name` (its Redis keys and channel, its metrics'
    /// label) as `settings` say. With Redis, subscribes to invalidations
    /// first (waiting up to 2 s; the subscription reconnects on its own).
    pub async fn new(name: &'static str, settings: &CacheSettings) -> Result<Cache<V>, CacheError> {
        let local = moka::future::Cache::builder()
            .max_capacity(settings.capacity)
            .expire_after(PerEntry)
            .build();
        #[cfg(feature = "redis")]
        let remote = match &settings.redis {
            Some(url) => Some(remote::Remote::connect(url.expose(), name)?),
            None => None,
        };
        #[cfg(not(feature = "redis"))]
        if settings.redis.is_some() {
            return Err(CacheError::Redis(
                "this build has no Redis support (cargo feature `redis`)".into(),
            ));
        }
        let cache = Cache {
            inner: Arc::new(Inner {
                name,
                local,
                ttl: settings.ttl,
                negative_ttl: settings.negative_ttl,
                jitter: settings.jitter,
                stats: Stats::default(),
                #[cfg(feature = "redis")]
                remote,
            }),
        };
        #[cfg(feature = "redis")]
        if let Some(remote) = &cache.inner.remote {
            let subscribed =
                remote.subscribe(Arc::downgrade(&cache.inner), |inner: &Inner<V>, key| {
                    let local = inner.local.clone();
                    let key = key.map(str::to_owned);
                    async move {
                        match key {
                            Some(key) => local.invalidate(&key).await,
                            None => local.invalidate_all(),
                        }
                    }
                });
            // Listening before the cache is used, so no invalidation
            // published after this returns is missed; with Redis down the
            // cache starts degraded and subscribes when it can.
            if tokio::time::timeout(Duration::from_secs(2), subscribed)
                .await
                .is_err()
            {
                tracing::warn!(
                    cache = name,
                    "cache invalidations not subscribed yet: Redis is unreachable"
                );
            }
        }
        Ok(cache)
    }

    /// The value for `key`: from the local level, else Redis, else
    /// `load` (its `None` remembered as missing) — one load per key at a
    /// time in this process, whoever asks. A failed load is not cached;
    /// the callers that waited for it get its error.
    pub async fn get_or_load<F, Fut, E>(&self, key: &str, load: F) -> Result<Option<Arc<V>>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<V>, E>>,
        E: Clone + Send + Sync + 'static,
    {
        let inner = &self.inner;
        inner.stats.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(entry) = inner.local.get(key).await {
            self.count("local_hit", &inner.stats.local_hits);
            return Ok(entry.slot.into_option());
        }
        let ran = std::sync::atomic::AtomicBool::new(false);
        let init = async {
            ran.store(true, Ordering::Relaxed);
            #[cfg(feature = "redis")]
            if let Some(remote) = &inner.remote {
                match remote.get(key).await {
                    Ok(Some(bytes)) => {
                        if let Some(slot) = decode::<V>(&bytes) {
                            self.count("redis_hit", &inner.stats.redis_hits);
                            let ttl = match slot {
                                Slot::Found(_) => inner.ttl,
                                Slot::Missing => inner.negative_ttl,
                            };
                            return Ok(Entry {
                                slot,
                                ttl: self.jittered(ttl),
                            });
                        }
                    }
                    Ok(None) => {}
                    Err(e) => self.redis_failed(&e),
                }
            }
            self.count("load", &inner.stats.loads);
            let slot = match load().await? {
                Some(v) => Slot::Found(Arc::new(v)),
                None => Slot::Missing,
            };
            let ttl = self.jittered(match slot {
                Slot::Found(_) => inner.ttl,
                Slot::Missing => inner.negative_ttl,
            });
            #[cfg(feature = "redis")]
            if let Some(remote) = &inner.remote
                && let Some(bytes) = encode(&slot)
                && let Err(e) = remote.set(key, bytes, ttl).await
            {
                self.redis_failed(&e);
            }
            Ok(Entry { slot, ttl })
        };
        match inner.local.try_get_with(key.to_owned(), init).await {
            Ok(entry) => {
                if !ran.load(Ordering::Relaxed) {
                    self.count("coalesced", &inner.stats.coalesced);
                }
                Ok(entry.slot.into_option())
            }
            // Callers that waited for a failed load get its error too.
            Err(e) => Err(Arc::try_unwrap(e).unwrap_or_else(|shared| E::clone(&shared))),
        }
    }

    /// Drops `key` here, in Redis, and (published) in every other
    /// instance's local level. Call it after the store's write commits.
    pub async fn invalidate(&self, key: &str) {
        self.inner.local.invalidate(key).await;
        #[cfg(feature = "redis")]
        if let Some(remote) = &self.inner.remote
            && let Err(e) = remote.invalidate(key).await
        {
            self.redis_failed(&e);
        }
    }

    /// The counts so far.
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// Entries held locally now (approximate: moka counts lazily).
    pub fn local_len(&self) -> u64 {
        self.inner.local.entry_count()
    }

    fn count(&self, result: &'static str, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("cache_requests_total", "cache" => self.inner.name, "result" => result)
            .increment(1);
    }

    #[cfg(feature = "redis")]
    fn redis_failed(&self, e: &str) {
        self.inner
            .stats
            .redis_errors
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!("cache_redis_errors_total", "cache" => self.inner.name).increment(1);
        tracing::debug!(cache = self.inner.name, error = %e, "cache redis level failed: serving without it");
    }

    fn jittered(&self, ttl: Duration) -> Duration {
        let spread = self.inner.jitter;
        if spread <= 0.0 || ttl.is_zero() {
            return ttl.max(Duration::from_millis(1));
        }
        let factor = 1.0 + spread * (2.0 * random_unit() - 1.0);
        ttl.mul_f64(factor).max(Duration::from_millis(1))
    }
}

impl<V> Slot<V> {
    fn into_option(self) -> Option<Arc<V>> {
        match self {
            Slot::Found(v) => Some(v),
            Slot::Missing => None,
        }
    }
}

/// A random number in [0, 1) from the thread's clock-seeded state (jitter
/// needs spread, not secrecy).
fn random_unit() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x9e37_79b9_7f4a_7c15)
                | 1,
        );
    }
    STATE.with(|s| {
        // xorshift64*
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// The Redis form of a slot: `+` and JSON, or `-` for missing.
#[cfg(feature = "redis")]
fn encode<V: Serialize>(slot: &Slot<V>) -> Option<Vec<u8>> {
    match slot {
        Slot::Found(v) => {
            let mut out = b"+".to_vec();
            serde_json::to_writer(&mut out, v.as_ref()).ok()?;
            Some(out)
        }
        Slot::Missing => Some(b"-".to_vec()),
    }
}

#[cfg(feature = "redis")]
fn decode<V: DeserializeOwned>(bytes: &[u8]) -> Option<Slot<V>> {
    match bytes.split_first()? {
        (b'+', json) => serde_json::from_slice(json)
            .ok()
            .map(|v| Slot::Found(Arc::new(v))),
        (b'-', []) => Some(Slot::Missing),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_keys_are_remembered_and_invalidation_reloads() {
        let cache: Cache<String> = Cache::new("t", &CacheSettings::default()).await.unwrap();
        let loads = AtomicU64::new(0);
        let load = |v: Option<&'static str>| {
            loads.fetch_add(1, Ordering::Relaxed);
            async move { Ok::<_, std::convert::Infallible>(v.map(str::to_owned)) }
        };
        assert_eq!(cache.get_or_load("a", || load(None)).await.unwrap(), None);
        assert_eq!(
            cache.get_or_load("a", || load(Some("x"))).await.unwrap(),
            None
        );
        assert_eq!(loads.load(Ordering::Relaxed), 1, "the miss was cached");
        cache.invalidate("a").await;
        let got = cache.get_or_load("a", || load(Some("x"))).await.unwrap();
        assert_eq!(got.as_deref().map(String::as_str), Some("x"));
        assert_eq!(loads.load(Ordering::Relaxed), 2);
        assert_eq!(cache.stats().local_hits.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_failed_load_is_not_cached() {
        let cache: Cache<String> = Cache::new("t", &CacheSettings::default()).await.unwrap();
        let failed = cache
            .get_or_load("a", || async { Err::<Option<String>, _>("down") })
            .await;
        assert_eq!(failed, Err("down"));
        let got = cache
            .get_or_load("a", || async { Ok::<_, &str>(Some("x".to_owned())) })
            .await
            .unwrap();
        assert!(got.is_some());
    }

    #[test]
    fn jitter_spreads_within_its_bounds() {
        let samples: Vec<f64> = (0..1000).map(|_| random_unit()).collect();
        assert!(samples.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(samples.iter().any(|x| *x < 0.2) && samples.iter().any(|x| *x > 0.8));
    }
}
