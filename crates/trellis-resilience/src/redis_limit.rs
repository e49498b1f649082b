//! A GCRA limit shared by every instance, kept in Redis.
//!
//! One Lua script does the whole decision atomically on the server, using
//! Redis' own clock (`TIME`), so instances with skewed clocks still share
//! one budget. Each key's TAT expires when it no longer matters, so idle
//! keys cost nothing. When Redis cannot answer within the timeout, the
//! configured [`RedisFallback`] decides: a local limiter, allow, or deny.

use std::{
    future::Future,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant},
};

use redis::{Script, aio::ConnectionManager};
use tracing::warn;

use crate::rate_limit::{Decision, Limiter, LocalLimiter, Quota};

const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if tat - now > tolerance then
  return tat - now - tolerance
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return 0
"#;

/// What to do when Redis does not answer.
pub enum RedisFallback {
    /// Limit per process with this limiter (e.g. the shared quota divided
    /// by the number of instances).
    Local(LocalLimiter),
    /// Let everything through.
    Allow,
    /// Reject everything.
    Deny,
}

/// A GCRA limiter in Redis.
pub struct RedisLimiter {
    connection: ConnectionManager,
    script: Script,
    quota: Quota,
    prefix: String,
    timeout: Duration,
    fallback: RedisFallback,
    // After a failure Redis is not asked again until this time (ms since
    // `created`), so a dead Redis costs one timeout per second, not one
    // per request.
    created: Instant,
    skip_until_ms: AtomicU64,
}

/// A lazily connected, self-reconnecting connection to the Redis at `url`
/// (as [`redis_client`] reads it) with bounded waits: `timeout` to connect
/// and per answer, one retry. Shared by the rate limiter, the locks, the
/// idempotency store and the cache.
pub fn redis_connection(
    url: &str,
    timeout: Duration,
) -> Result<(redis::Client, ConnectionManager), redis::RedisError> {
    let client = redis_client(url)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    let connection = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
    Ok((client, connection))
}

/// A Redis client for `url`. `rediss://` speaks TLS (rustls on aws-lc-rs),
/// trusting the system's roots, or with `?ca_file=PATH` the authorities in
/// that PEM file; `&cert_file=PATH&key_file=PATH` add a client certificate
/// (Redis' `tls-auth-clients`). The three parameters are read here and
/// removed before the rest of the URL goes to the driver.
pub fn redis_client(url: &str) -> Result<redis::Client, redis::RedisError> {
    let invalid = |what: String| {
        redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "redis url", what))
    };
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let (mut ca, mut cert, mut key) = (None, None, None);
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("ca_file", v)) => ca = Some(v),
            Some(("cert_file", v)) => cert = Some(v),
            Some(("key_file", v)) => key = Some(v),
            _ => rest.push(pair),
        }
    }
    let url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    if ca.is_none() && cert.is_none() && key.is_none() {
        return redis::Client::open(url);
    }
    if !base.starts_with("rediss://") {
        return Err(invalid(
            "ca_file, cert_file and key_file need a rediss:// URL".into(),
        ));
    }
    let read =
        |path: &str| std::fs::read(path).map_err(|e| invalid(format!("cannot read {path}: {e}")));
    let client_tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert)?,
            client_key: read(key)?,
        }),
        (None, None) => None,
        _ => return Err(invalid("cert_file and key_file come together".into())),
    };
    let root_cert = ca.map(read).transpose()?;
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
}

/// How long to use the fallback without asking Redis after it failed.
const RETRY_REDIS_AFTER: Duration = Duration::from_secs(1);

impl RedisLimiter {
    /// A limiter at `url` (`redis://host:port`, or `rediss://` for TLS —
    /// see [`redis_client`]), keys under `prefix`. Connects lazily: a
    /// limiter can start while Redis is down (and uses the fallback until
    /// it is up).
    pub fn new(
        url: &str,
        prefix: &str,
        quota: Quota,
        fallback: RedisFallback,
    ) -> Result<Self, redis::RedisError> {
        let (_, connection) = redis_connection(url, Duration::from_millis(200))?;
        Ok(RedisLimiter {
            connection,
            script: Script::new(GCRA),
            quota,
            prefix: prefix.to_owned(),
            timeout: Duration::from_millis(50),
            fallback,
            created: Instant::now(),
            skip_until_ms: AtomicU64::new(0),
        })
    }

    /// How long to wait for Redis before falling back (default 50 ms).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn ask(&self, key: &str) -> Result<Decision, String> {
        let mut connection = self.connection.clone();
        let mut invocation = self.script.key(format!("{}{key}", self.prefix));
        invocation
            .arg(self.quota.emission_interval_ns() / 1000)
            .arg(self.quota.burst_tolerance_ns() / 1000);
        let wait_us: i64 =
            tokio::time::timeout(self.timeout, invocation.invoke_async(&mut connection))
                .await
                .map_err(|_| format!("no answer within {:?}", self.timeout))?
                .map_err(|e| e.to_string())?;
        Ok(if wait_us <= 0 {
            Decision::Allow
        } else {
            Decision::Deny {
                retry_after: Duration::from_micros(wait_us as u64),
            }
        })
    }
}

impl Limiter for RedisLimiter {
    fn check<'a>(
        &'a self,
        key: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = Decision> + Send + 'a>> {
        Box::pin(async move {
            let now_ms = self.created.elapsed().as_millis() as u64;
            let answer = if now_ms < self.skip_until_ms.load(Relaxed) {
                Err(None)
            } else {
                self.ask(key.unwrap_or("_global")).await.map_err(Some)
            };
            match answer {
                Ok(decision) => decision,
                Err(err) => {
                    if let Some(err) = err {
                        warn!(error = %err, retry_in = ?RETRY_REDIS_AFTER, "redis rate limit unavailable; using the fallback");
                        let retry_at = self.created.elapsed() + RETRY_REDIS_AFTER;
                        self.skip_until_ms
                            .store(retry_at.as_millis() as u64, Relaxed);
                    }
                    match &self.fallback {
                        RedisFallback::Local(local) => local.check(key),
                        RedisFallback::Allow => Decision::Allow,
                        RedisFallback::Deny => Decision::Deny {
                            retry_after: Duration::from_secs(1),
                        },
                    }
                }
            }
        })
    }
}
