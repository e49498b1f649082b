//! Redlock: one lock over N independent Redis instances, granted when a
//! majority grants it within the lease, as the algorithm's description
//! has it: each instance asked with a short timeout, the time taken and a
//! clock-drift allowance (1 % of the lease + 2 ms) subtracted from the
//! lease, the grant valid only if some remains; otherwise every instance
//! is released.
//!
//! Fencing: Redlock has no token of its own. Each instance counts its
//! grants; the grant's token is the largest count among the majority that
//! granted it, written back (raised, never lowered) to a majority before
//! the grant is returned. Any later grant's majority shares an instance
//! with that write-back, so its token is greater.
//!
//! What this does not guarantee, like every lease: that a holder paused
//! past its lease is not still running. The token is what protects the
//! data (`fence::check`).

use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, join_all};
use redis::Script;

use crate::{Backend, Grant, Held, LockError, RedisLocks};

const RAISE: &str = r"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
";

/// A lock over several independent Redis instances (at least 3, an odd
/// number is best).
#[derive(Clone)]
pub struct RedlockLocks {
    instances: Vec<RedisLocks>,
    acquire: Script,
    raise: Script,
    /// Each instance's answer is waited for this long.
    per_instance: Duration,
}

impl RedlockLocks {
    /// Locks over the Redis instances at `urls`, keys under `prefix`.
    pub fn connect(urls: &[String], prefix: &str) -> Result<RedlockLocks, LockError> {
        if urls.len() < 3 {
            return Err(LockError::Backend(format!(
                "redlock needs at least 3 independent instances, not {}",
                urls.len()
            )));
        }
        let instances = urls
            .iter()
            .map(|u| RedisLocks::connect(u, prefix))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RedlockLocks {
            instances,
            acquire: Script::new(crate::redis_backend::ACQUIRE),
            raise: Script::new(RAISE),
            per_instance: Duration::from_millis(50),
        })
    }

    fn quorum(&self) -> usize {
        self.instances.len() / 2 + 1
    }

    async fn release_all(&self, resource: &str, holder: &str) -> usize {
        join_all(self.instances.iter().map(|i| i.release(resource, holder)))
            .await
            .into_iter()
            .filter(|r| matches!(r, Ok(true)))
            .count()
    }
}

impl Backend for RedlockLocks {
    /// The locks a majority of the instances show, each with the shortest
    /// lease left among them.
    fn list(&self) -> BoxFuture<'_, Result<Vec<Held>, LockError>> {
        Box::pin(async move {
            let lists = join_all(self.instances.iter().map(|i| i.list())).await;
            let mut seen: std::collections::BTreeMap<(String, String), (usize, Option<Duration>)> =
                Default::default();
            for held in lists.into_iter().flatten().flatten() {
                let entry = seen
                    .entry((held.resource, held.holder))
                    .or_insert((0, held.expires_in));
                entry.0 += 1;
                entry.1 = entry.1.min(held.expires_in);
            }
            Ok(seen
                .into_iter()
                .filter(|(_, (n, _))| *n >= self.quorum())
                .map(|((resource, holder), (_, expires_in))| Held {
                    resource,
                    holder,
                    expires_in,
                })
                .collect())
        })
    }

    fn try_acquire<'a>(
        &'a self,
        resource: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Grant>, LockError>> {
        Box::pin(async move {
            let started = Instant::now();
            let asks = self.instances.iter().map(|instance| {
                let mut invocation = self.acquire.key(instance.key(resource));
                invocation
                    .key(instance.tokens_key())
                    .arg(holder)
                    .arg(crate::redis_backend::millis(ttl));
                instance.run_within(invocation, self.per_instance)
            });
            let answers = join_all(asks).await;
            let counts: Vec<(usize, u64)> = answers
                .iter()
                .enumerate()
                .filter_map(|(i, a)| match a {
                    Ok(n) if *n > 0 => Some((i, u64::try_from(*n).unwrap_or(0))),
                    _ => None,
                })
                .collect();
            let drift = ttl / 100 + Duration::from_millis(2);
            let validity = ttl.checked_sub(started.elapsed() + drift);
            let errors = answers.iter().filter(|a| a.is_err()).count();
            if counts.len() < self.quorum() || validity.is_none() {
                self.release_all(resource, holder).await;
                // Refused by a majority: taken. Unanswered by too many to
                // tell: the backend is failing.
                if errors > self.instances.len() - self.quorum() {
                    return Err(LockError::Backend(format!(
                        "redlock: {errors} of {} instances did not answer",
                        self.instances.len()
                    )));
                }
                return Ok(None);
            }
            let token = counts.iter().map(|(_, n)| *n).max().unwrap_or(0);
            // Written back to a majority before the grant is returned.
            let raises = self.instances.iter().map(|instance| {
                let mut invocation = self.raise.key(instance.tokens_key());
                invocation.arg(token);
                instance.run_within(invocation, self.per_instance)
            });
            let raised = join_all(raises).await.iter().filter(|r| r.is_ok()).count();
            if raised < self.quorum() || started.elapsed() + drift >= ttl {
                self.release_all(resource, holder).await;
                return Err(LockError::Backend(format!(
                    "redlock: the token reached {raised} of {} instances",
                    self.instances.len()
                )));
            }
            Ok(Some(Grant { token }))
        })
    }

    fn extend<'a>(
        &'a self,
        resource: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, LockError>> {
        Box::pin(async move {
            let extended = join_all(
                self.instances
                    .iter()
                    .map(|i| i.extend(resource, holder, ttl)),
            )
            .await
            .into_iter()
            .filter(|r| matches!(r, Ok(true)))
            .count();
            Ok(extended >= self.quorum())
        })
    }

    fn release<'a>(
        &'a self,
        resource: &'a str,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<bool, LockError>> {
        Box::pin(async move { Ok(self.release_all(resource, holder).await >= self.quorum()) })
    }
}
