//! Keys in Redis: one string per key, `P{fingerprint}{owner}` while in
//! progress and `D{fingerprint}{record}` when done, each with its expiry
//! (`PX`); every step is one Lua script, so it is atomic.

use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::{Script, aio::ConnectionManager};

use super::{Begin, Record, Store, StoreError, decode, encode};
use crate::redis_backend::millis;

const BEGIN: &str = r"
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
";

// ARGV[1] the owner: the entry must be in progress and its.
const COMPLETE: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 1) == 'P' and string.sub(v, 66) == ARGV[1] then
  redis.call('SET', KEYS[1], 'D' .. string.sub(v, 2, 65) .. ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

const ABANDON: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 1) == 'P' and string.sub(v, 66) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Keys in Redis (`redis://`, `rediss://…?ca_file=…`), shared by every
/// instance that uses it.
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    begin: Script,
    complete: Script,
    abandon: Script,
    timeout: Duration,
}

const FINGERPRINT_LEN: usize = 64;

fn pending(fingerprint: &str, owner: &str) -> Vec<u8> {
    [b"P", fingerprint.as_bytes(), owner.as_bytes()].concat()
}

impl RedisStore {
    /// The store in the Redis at `url` (connected lazily, reconnected as
    /// needed).
    pub fn connect(url: &str) -> Result<RedisStore, StoreError> {
        let (_, connection) = trellis_resilience::redis_connection(url, Duration::from_millis(500))
            .map_err(|e| StoreError(e.to_string()))?;
        Ok(RedisStore {
            connection,
            begin: Script::new(BEGIN),
            complete: Script::new(COMPLETE),
            abandon: Script::new(ABANDON),
            timeout: Duration::from_secs(1),
        })
    }

    fn key(key: &str) -> String {
        format!("idempotency:{key}")
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut connection = self.connection.clone();
        tokio::time::timeout(self.timeout, invocation.invoke_async(&mut connection))
            .await
            .map_err(|_| StoreError(format!("redis: no answer within {:?}", self.timeout)))?
            .map_err(|e| StoreError(format!("redis: {e}")))
    }
}

impl Store for RedisStore {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        fingerprint: &'a str,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Begin, StoreError>> {
        Box::pin(async move {
            let mut invocation = self.begin.key(Self::key(key));
            invocation
                .arg(pending(fingerprint, owner))
                .arg(millis(lease));
            let found: Option<Vec<u8>> = self.run(invocation).await?;
            let Some(value) = found else {
                return Ok(Begin::Started);
            };
            let damaged = || StoreError(format!("key {key}: a damaged entry"));
            if value.len() < 1 + FINGERPRINT_LEN {
                return Err(damaged());
            }
            let stored = std::str::from_utf8(&value[1..1 + FINGERPRINT_LEN])
                .map_err(|_| damaged())?
                .to_owned();
            match value[0] {
                b'P' => Ok(Begin::InProgress {
                    fingerprint: stored,
                }),
                b'D' => Ok(Begin::Done {
                    fingerprint: stored,
                    record: decode(&value[1 + FINGERPRINT_LEN..]).ok_or_else(damaged)?,
                }),
                _ => Err(damaged()),
            }
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        record: &'a Record,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut invocation = self.complete.key(Self::key(key));
            invocation.arg(owner).arg(encode(record)).arg(millis(ttl));
            let stored: i64 = self.run(invocation).await?;
            Ok(stored == 1)
        })
    }

    fn abandon<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut invocation = self.abandon.key(Self::key(key));
            invocation.arg(owner);
            let _: i64 = self.run(invocation).await?;
            Ok(())
        })
    }
}
