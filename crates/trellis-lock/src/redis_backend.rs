//! Locks in one Redis instance: `SET key holder NX PX ttl` and the token
//! from one counter in the same script; extension and release compare the
//! holder first (Lua), so a holder whose lease ran out cannot extend or
//! delete its successor's lock.
//!
//! What this guarantees: mutual exclusion while Redis keeps its data and
//! holders extend in time. What it does not: a Redis failover (a replica
//! promoted without the latest writes) or a holder paused past its lease
//! can leave two holders — which is why every grant carries a token and the
//! guarded storage must check it.

use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::{Script, aio::ConnectionManager};

use crate::{Backend, Grant, Held, LockError, MAX_LISTED};

/// Takes the lock if free and counts the grant (the token), atomically.
pub(crate) const ACQUIRE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0
";

const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Locks in one Redis instance (`redis://`, or `rediss://…?ca_file=…`).
#[derive(Clone)]
pub struct RedisLocks {
    connection: ConnectionManager,
    prefix: String,
    acquire: Script,
    extend: Script,
    release: Script,
    timeout: Duration,
}

impl RedisLocks {
    /// Locks under keys starting with `prefix` in the Redis at `url`
    /// (connected lazily, reconnected as needed).
    pub fn connect(url: &str, prefix: &str) -> Result<RedisLocks, LockError> {
        let (_, connection) = trellis_resilience::redis_connection(url, Duration::from_millis(500))
            .map_err(|e| LockError::Backend(e.to_string()))?;
        Ok(RedisLocks {
            connection,
            prefix: prefix.to_owned(),
            acquire: Script::new(ACQUIRE),
            extend: Script::new(EXTEND),
            release: Script::new(RELEASE),
            timeout: Duration::from_secs(1),
        })
    }

    pub(crate) fn key(&self, resource: &str) -> String {
        format!("{}lock:{resource}", self.prefix)
    }

    pub(crate) fn tokens_key(&self) -> String {
        format!("{}lock-tokens", self.prefix)
    }

    async fn run(&self, invocation: redis::ScriptInvocation<'_>) -> Result<i64, LockError> {
        self.run_within(invocation, self.timeout).await
    }

    pub(crate) async fn run_within(
        &self,
        invocation: redis::ScriptInvocation<'_>,
        timeout: Duration,
    ) -> Result<i64, LockError> {
        let mut connection = self.connection.clone();
        tokio::time::timeout(timeout, invocation.invoke_async(&mut connection))
            .await
            .map_err(|_| LockError::Backend(format!("redis: no answer within {timeout:?}")))?
            .map_err(|e| LockError::Backend(format!("redis: {e}")))
    }
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Backend for RedisLocks {
    fn list(&self) -> BoxFuture<'_, Result<Vec<Held>, LockError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let pattern = format!("{}lock:*", self.prefix);
            let strip = format!("{}lock:", self.prefix);
            let mut held = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(500)
                    .query_async(&mut connection)
                    .await
                    .map_err(|e| LockError::Backend(format!("redis: {e}")))?;
                for key in keys {
                    if held.len() >= MAX_LISTED {
                        return Ok(held);
                    }
                    let (holder, ttl): (Option<String>, i64) = redis::pipe()
                        .get(&key)
                        .pttl(&key)
                        .query_async(&mut connection)
                        .await
                        .map_err(|e| LockError::Backend(format!("redis: {e}")))?;
                    if let Some(holder) = holder {
                        held.push(Held {
                            resource: key.strip_prefix(&strip).unwrap_or(&key).to_owned(),
                            holder,
                            expires_in: u64::try_from(ttl).ok().map(Duration::from_millis),
                        });
                    }
                }
                if next == 0 {
                    return Ok(held);
                }
                cursor = next;
            }
        })
    }

    fn try_acquire<'a>(
        &'a self,
        resource: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Grant>, LockError>> {
        Box::pin(async move {
            let mut invocation = self.acquire.key(self.key(resource));
            invocation
                .key(self.tokens_key())
                .arg(holder)
                .arg(millis(ttl));
            let token = self.run(invocation).await?;
            Ok(u64::try_from(token)
                .ok()
                .filter(|t| *t > 0)
                .map(|token| Grant { token }))
        })
    }

    fn extend<'a>(
        &'a self,
        resource: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, LockError>> {
        Box::pin(async move {
            let mut invocation = self.extend.key(self.key(resource));
            invocation.arg(holder).arg(millis(ttl));
            Ok(self.run(invocation).await? == 1)
        })
    }

    fn release<'a>(
        &'a self,
        resource: &'a str,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<bool, LockError>> {
        Box::pin(async move {
            let mut invocation = self.release.key(self.key(resource));
            invocation.arg(holder);
            Ok(self.run(invocation).await? == 1)
        })
    }
}
