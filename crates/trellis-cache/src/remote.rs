//! The Redis level: values under `cache:{name}:{key}` with their expiry,
//! invalidations published on `cache:{name}:invalidate`.

use std::{
    future::Future,
    sync::{
        Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use tokio::time::Instant;

use crate::CacheError;

/// How long Redis is skipped after it failed.
const SKIP_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// The longest key sent to Redis (longer ones are cached locally only).
const MAX_KEY_BYTES: usize = 512;

pub(crate) struct Remote {
    client: redis::Client,
    connection: ConnectionManager,
    prefix: String,
    channel: String,
    timeout: Duration,
    started: Instant,
    /// Milliseconds after `started` before which Redis is not asked.
    skip_until: AtomicU64,
}

impl Remote {
    pub(crate) fn connect(url: &str, name: &str) -> Result<Remote, CacheError> {
        let (client, connection) =
            trellis_resilience::redis_connection(url, Duration::from_millis(500))
                .map_err(|e| CacheError::Redis(e.to_string()))?;
        Ok(Remote {
            client,
            connection,
            prefix: format!("cache:{name}:"),
            channel: format!("cache:{name}:invalidate"),
            timeout: Duration::from_secs(1),
            started: Instant::now(),
            skip_until: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn skipping(&self) -> bool {
        self.now_ms() < self.skip_until.load(Ordering::Relaxed)
    }

    async fn run<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Result<T, String> {
        let mut connection = self.connection.clone();
        let answer = tokio::time::timeout(self.timeout, command.query_async(&mut connection))
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))
            .and_then(|r| r.map_err(|e| e.to_string()));
        if answer.is_err() {
            let until = self.now_ms() + SKIP_AFTER_FAILURE.as_millis() as u64;
            self.skip_until.store(until, Ordering::Relaxed);
        }
        answer
    }

    /// The stored bytes; `Ok(None)` when absent, or while Redis is skipped.
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        if self.skipping() || key.len() > MAX_KEY_BYTES {
            return Ok(None);
        }
        self.run(redis::cmd("GET").arg(format!("{}{key}", self.prefix)))
            .await
    }

    pub(crate) async fn set(&self, key: &str, bytes: Vec<u8>, ttl: Duration) -> Result<(), String> {
        if self.skipping() || key.len() > MAX_KEY_BYTES {
            return Ok(());
        }
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        self.run(
            redis::cmd("SET")
                .arg(format!("{}{key}", self.prefix))
                .arg(bytes)
                .arg("PX")
                .arg(millis),
        )
        .await
    }

    /// Deletes the key and tells every instance. Not skipped: an
    /// invalidation is worth a try even right after a failure.
    pub(crate) async fn invalidate(&self, key: &str) -> Result<(), String> {
        if key.len() <= MAX_KEY_BYTES {
            let _: i64 = self
                .run(redis::cmd("DEL").arg(format!("{}{key}", self.prefix)))
                .await?;
        }
        let _: i64 = self
            .run(redis::cmd("PUBLISH").arg(&self.channel).arg(key))
            .await?;
        Ok(())
    }

    /// Follows the invalidation channel until `owner` is dropped: each key
    /// published goes to `drop_key(Some(key))`; after the subscription was
    /// lost and is back, `drop_key(None)` (everything may be stale).
    ///
    /// The receiver hears once the first subscription is in place.
    pub(crate) fn subscribe<T, F, Fut>(
        &self,
        owner: Weak<T>,
        drop_key: F,
    ) -> tokio::sync::oneshot::Receiver<()>
    where
        T: Send + Sync + 'static,
        F: Fn(&T, Option<&str>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let client = self.client.clone();
        let channel = self.channel.clone();
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        tokio::spawn(async move {
            let mut lost = false;
            let mut pause = Duration::from_millis(50);
            loop {
                if owner.strong_count() == 0 {
                    return;
                }
                let subscribed = async {
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe(&channel).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                };
                let pubsub = match tokio::time::timeout(Duration::from_secs(2), subscribed).await {
                    Ok(Ok(pubsub)) => pubsub,
                    failed => {
                        if !lost {
                            let error = match failed {
                                Ok(Err(e)) => e.to_string(),
                                _ => "no answer within 2s".to_owned(),
                            };
                            tracing::warn!(channel, %error, "cache invalidations: subscription down; retrying");
                        }
                        lost = true;
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(2));
                        continue;
                    }
                };
                pause = Duration::from_millis(50);
                if let Some(tx) = subscribed_tx.take() {
                    let _ = tx.send(());
                }
                if lost {
                    // Invalidations published meanwhile were missed.
                    let Some(owner) = owner.upgrade() else { return };
                    drop_key(&owner, None).await;
                }
                let mut messages = pubsub.into_on_message();
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        message = messages.next() => {
                            let Some(message) = message else { break };
                            let Some(owner) = owner.upgrade() else { return };
                            match message.get_payload::<String>() {
                                Ok(key) => drop_key(&owner, Some(&key)).await,
                                Err(_) => drop_key(&owner, None).await,
                            }
                        }
                        _ = tick.tick() => {
                            if owner.strong_count() == 0 {
                                return;
                            }
                        }
                    }
                }
                lost = true;
            }
        });
        subscribed_rx
    }
}
