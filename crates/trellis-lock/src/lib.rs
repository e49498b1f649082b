//! Distributed locks with **fencing tokens**.
//!
//! A lock is held for a lease, extended by the guard while it lives, and
//! every grant carries a token that strictly increases per resource. A
//! lease can be lost without the holder noticing in time — a pause longer
//! than the lease (GC, swap, SIGSTOP), a clock jump, a partition — and then
//! two holders believe they hold the lock. Mutual exclusion alone cannot
//! prevent the stale holder's write; the token can: the storage the lock
//! protects remembers the highest token it has seen and refuses writes
//! with an older one. Use the token on every write the lock guards.
//!
//! Backends: [`MemoryLocks`] (in process, the default: one process's
//! tasks) and, with feature `redis`, `RedisLocks` (one Redis instance:
//! `SET NX PX` and compare-and-delete in Lua; the token from a counter in
//! the same script) and `RedlockLocks` (a majority of N independent
//! instances, within the lease less a drift allowance).
//!
//! ```
//! # async fn run() -> Result<(), trellis_lock::LockError> {
//! use std::time::Duration;
//! use trellis_lock::{Locks, MemoryLocks};
//!
//! let locks = Locks::new(MemoryLocks::default());
//! let guard = locks.lock("stock:tea", Duration::from_secs(5)).await?;
//! let token = guard.token(); // send it with every write the lock guards
//! # let _ = token;
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! The same crate holds [`idempotency`]: the layer that makes a repeated
//! request (same `Idempotency-Key`, or same fingerprint) get the first
//! answer instead of running again, over the same engines.
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `redis` | no | `RedisLocks`, `RedlockLocks` (a majority of N instances); the Redis idempotency store |
//! | `etcd` | no | `EtcdLocks` (a lease; the write's revision as the token) |
//! | `sqlite`, `postgres` | no | `fence`: the storage-side token check; the SQL idempotency store |

#![warn(missing_docs)]

#[cfg(feature = "etcd")]
mod etcd_backend;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod fence;
pub mod idempotency;
mod memory;
#[cfg(feature = "redis")]
mod redis_backend;
#[cfg(feature = "redis")]
mod redlock;

use std::{sync::Arc, time::Duration};

use futures_util::future::BoxFuture;

#[cfg(feature = "etcd")]
pub use etcd_backend::EtcdLocks;
pub use memory::MemoryLocks;
#[cfg(feature = "redis")]
pub use redis_backend::RedisLocks;
#[cfg(feature = "redis")]
pub use redlock::RedlockLocks;

/// The longest resource name accepted.
pub const MAX_RESOURCE_BYTES: usize = 256;

/// Why a lock operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// The lock stayed taken until the timeout.
    #[error("{resource}: still held by another after {waited:?}")]
    Timeout {
        /// Which lock.
        resource: String,
        /// How long it was waited for.
        waited: Duration,
    },
    /// The resource name is empty, too long or not printable.
    #[error("lock name {0:?}: 1 to 256 printable ASCII characters")]
    BadName(String),
    /// The backend failed (Redis unreachable, ...).
    #[error("lock backend: {0}")]
    Backend(String),
}

/// A held lock as a backend grants it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The fencing token: greater than every earlier grant's for the
    /// resource.
    pub token: u64,
}

/// A lock as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The resource.
    pub resource: String,
    /// Who holds it (the grant's random holder id).
    pub holder: String,
    /// How long its lease has left, as the backend knows it.
    pub expires_in: Option<Duration>,
}

/// Locks listed at most.
pub const MAX_LISTED: usize = 10_000;

/// What a lock backend does; [`Locks`] adds waiting, keep-alive and the
/// guard.
pub trait Backend: Send + Sync + 'static {
    /// The locks held now (at most [`MAX_LISTED`]), for operators.
    fn list(&self) -> BoxFuture<'_, Result<Vec<Held>, LockError>> {
        Box::pin(std::future::ready(Err(LockError::Backend(
            "this backend does not list its locks".into(),
        ))))
    }

    /// Takes `resource` for `holder` for `ttl` if nobody holds it.
    fn try_acquire<'a>(
        &'a self,
        resource: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Grant>, LockError>>;

    /// Extends `holder`'s lease to `ttl` from now; false if it no longer
    /// holds the lock.
    fn extend<'a>(
        &'a self,
        resource: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, LockError>>;

    /// Lets go of `resource` if `holder` still holds it; whether it did.
    fn release<'a>(
        &'a self,
        resource: &'a str,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<bool, LockError>>;
}

/// Locks at `url`, keys under `prefix`: `memory://` (this process),
/// `redis://host:port` or `rediss://…?ca_file=…` (feature `redis`),
/// `redlock://host:port,host:port,host:port` (feature `redis`; N ≥ 3
/// independent instances), `etcd://host:port[,host:port][?ca_file=…&cert_file=…&key_file=…]`
/// (feature `etcd`).
#[cfg_attr(not(any(feature = "redis", feature = "etcd")), allow(unused_variables))]
pub async fn connect(url: &str, prefix: &str, config: LockConfig) -> Result<Locks, LockError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| LockError::Backend(format!("{url:?}: expected scheme://…")))?;
    match scheme {
        "memory" => Ok(Locks::with_config(MemoryLocks::default(), config)),
        #[cfg(feature = "redis")]
        "redis" | "rediss" => Ok(Locks::with_config(
            RedisLocks::connect(url, prefix)?,
            config,
        )),
        #[cfg(feature = "redis")]
        "redlock" => {
            let urls: Vec<String> = rest
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| format!("redis://{h}"))
                .collect();
            Ok(Locks::with_config(
                RedlockLocks::connect(&urls, prefix)?,
                config,
            ))
        }
        #[cfg(feature = "etcd")]
        "etcd" => {
            let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
            let mut tls = trellis_etcd::EtcdTls::default();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                match pair.split_once('=') {
                    Some((k, v)) if tls.take(k, v) => {}
                    _ => {
                        return Err(LockError::Backend(format!(
                            "{pair:?}: known options are ca_file, cert_file, key_file"
                        )));
                    }
                }
            }
            let endpoints: Vec<String> = hosts
                .trim_end_matches('/')
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| format!("{}://{h}", tls.scheme()))
                .collect();
            if endpoints.is_empty() {
                return Err(LockError::Backend(
                    "no etcd endpoint; expected etcd://host:port".into(),
                ));
            }
            Ok(Locks::with_config(
                EtcdLocks::connect(&endpoints, prefix, &tls).await?,
                config,
            ))
        }
        other => Err(LockError::Backend(format!(
            "{other}:// is not a lock backend here (memory://{}{})",
            if cfg!(feature = "redis") {
                ", redis://, redlock://"
            } else {
                ""
            },
            if cfg!(feature = "etcd") {
                ", etcd://"
            } else {
                ""
            },
        ))),
    }
}

/// One backend shared by several [`Locks`] (different leases, say).
impl<B: Backend> Backend for Arc<B> {
    fn list(&self) -> BoxFuture<'_, Result<Vec<Held>, LockError>> {
        (**self).list()
    }

    fn try_acquire<'a>(
        &'a self,
        resource: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Grant>, LockError>> {
        (**self).try_acquire(resource, holder, ttl)
    }

    fn extend<'a>(
        &'a self,
        resource: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, LockError>> {
        (**self).extend(resource, holder, ttl)
    }

    fn release<'a>(
        &'a self,
        resource: &'a str,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<bool, LockError>> {
        (**self).release(resource, holder)
    }
}

/// How locks are held.
#[derive(Debug, Clone)]
pub struct LockConfig {
    /// The lease: how long a lock outlives a holder that stopped extending
    /// it. Default 10 s.
    pub ttl: Duration,
    /// Extend the lease this often while the guard lives (a third of the
    /// TTL by default); `None` holds it for one TTL only.
    pub extend_every: Option<Duration>,
    /// The first wait between attempts while the lock is taken; doubled up
    /// to 100 ms, with jitter. Default 5 ms.
    pub retry: Duration,
}

impl Default for LockConfig {
    fn default() -> Self {
        LockConfig {
            ttl: Duration::from_secs(10),
            extend_every: Some(Duration::from_secs(10) / 3),
            retry: Duration::from_millis(5),
        }
    }
}

/// Locks over a backend.
#[derive(Clone)]
pub struct Locks {
    backend: Arc<dyn Backend>,
    config: LockConfig,
}

fn check_name(resource: &str) -> Result<(), LockError> {
    let ok = !resource.is_empty()
        && resource.len() <= MAX_RESOURCE_BYTES
        && resource.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(LockError::BadName(resource.chars().take(64).collect()))
    }
}

impl Locks {
    /// Locks over `backend`, with the default lease (10 s, extended every
    /// third).
    pub fn new(backend: impl Backend) -> Locks {
        Locks::with_config(backend, LockConfig::default())
    }

    /// Locks over `backend`, held as `config` says.
    pub fn with_config(backend: impl Backend, config: LockConfig) -> Locks {
        Locks {
            backend: Arc::new(backend),
            config,
        }
    }

    /// The locks held now, as the backend knows them.
    pub async fn list(&self) -> Result<Vec<Held>, LockError> {
        self.backend.list().await
    }

    /// Takes `resource` if it is free now.
    pub async fn try_lock(&self, resource: &str) -> Result<Option<Guard>, LockError> {
        check_name(resource)?;
        let holder = uuid::Uuid::new_v4().to_string();
        match self
            .backend
            .try_acquire(resource, &holder, self.config.ttl)
            .await?
        {
            Some(grant) => Ok(Some(self.guard(resource, holder, grant))),
            None => Ok(None),
        }
    }

    /// Takes `resource`, waiting up to `timeout` for its holder to let go
    /// (or its lease to run out).
    pub async fn lock(&self, resource: &str, timeout: Duration) -> Result<Guard, LockError> {
        check_name(resource)?;
        let holder = uuid::Uuid::new_v4().to_string();
        let started = tokio::time::Instant::now();
        let mut wait = self.config.retry.max(Duration::from_millis(1));
        loop {
            if let Some(grant) = self
                .backend
                .try_acquire(resource, &holder, self.config.ttl)
                .await?
            {
                return Ok(self.guard(resource, holder, grant));
            }
            let waited = started.elapsed();
            if waited >= timeout {
                return Err(LockError::Timeout {
                    resource: resource.to_owned(),
                    waited,
                });
            }
            // Jittered, so waiters do not retry in step.
            let jitter =
                wait.mul_f64(f64::from(uuid::Uuid::new_v4().as_fields().0 % 1000) / 2000.0);
            tokio::time::sleep((wait / 2 + jitter).min(timeout - waited)).await;
            wait = (wait * 2).min(Duration::from_millis(100));
        }
    }

    fn guard(&self, resource: &str, holder: String, grant: Grant) -> Guard {
        let (lost_tx, lost) = tokio::sync::watch::channel(false);
        let keepalive = self.config.extend_every.map(|every| {
            let backend = self.backend.clone();
            let (resource, holder) = (resource.to_owned(), holder.clone());
            let ttl = self.config.ttl;
            tokio::spawn(async move {
                let mut held_until = tokio::time::Instant::now() + ttl;
                loop {
                    tokio::time::sleep(every).await;
                    match backend.extend(&resource, &holder, ttl).await {
                        Ok(true) => held_until = tokio::time::Instant::now() + ttl,
                        Ok(false) => break,
                        // A failed extension may still be in time; past
                        // the lease it is lost.
                        Err(e) if tokio::time::Instant::now() < held_until => {
                            tracing::warn!(%resource, error = %e, "lock not extended");
                        }
                        Err(_) => break,
                    }
                }
                let _ = lost_tx.send(true);
            })
        });
        let expires = match keepalive {
            Some(_) => None,
            None => Some(tokio::time::Instant::now() + self.config.ttl),
        };
        Guard {
            locks: self.clone(),
            resource: resource.to_owned(),
            holder,
            token: grant.token,
            lost,
            keepalive,
            expires,
            released: false,
        }
    }
}

/// A held lock. Dropping it lets go (in the background); [`release`]
/// lets go and says whether it was still held.
///
/// [`release`]: Guard::release
pub struct Guard {
    locks: Locks,
    resource: String,
    holder: String,
    token: u64,
    lost: tokio::sync::watch::Receiver<bool>,
    keepalive: Option<tokio::task::JoinHandle<()>>,
    /// Without keep-alive: when the lease runs out.
    expires: Option<tokio::time::Instant>,
    released: bool,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("resource", &self.resource)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl Guard {
    /// The fencing token of this grant: send it with every write the lock
    /// guards, and have the storage refuse older ones.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The resource.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// Whether the lease is known lost (an extension found another holder,
    /// or failed past the lease; without keep-alive, the lease ran out).
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
            || self
                .expires
                .is_some_and(|e| tokio::time::Instant::now() >= e)
    }

    /// Resolves when the lease is lost: race the guarded work against it.
    pub async fn lost(&self) {
        if let Some(expires) = self.expires {
            tokio::time::sleep_until(expires).await;
            return;
        }
        let mut lost = self.lost.clone();
        // The sender goes with the keep-alive task, which only ends by
        // sending: a closed channel means lost as well.
        let _ = lost.wait_for(|l| *l).await;
    }

    /// Lets go; whether the lock was still this guard's.
    pub async fn release(mut self) -> Result<bool, LockError> {
        self.released = true;
        if let Some(k) = self.keepalive.take() {
            k.abort();
        }
        self.locks
            .backend
            .release(&self.resource, &self.holder)
            .await
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(k) = self.keepalive.take() {
            k.abort();
        }
        if self.released {
            return;
        }
        let backend = self.locks.backend.clone();
        let (resource, holder) = (
            std::mem::take(&mut self.resource),
            std::mem::take(&mut self.holder),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = backend.release(&resource, &holder).await {
                    tracing::warn!(%resource, error = %e, "lock not released; its lease will end it");
                }
            });
        }
    }
}
