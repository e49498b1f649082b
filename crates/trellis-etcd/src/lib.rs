//! What Trellis' etcd backends (registry, config) share.
//!
//! [`mirror_prefix`] keeps a local copy of everything under a key prefix:
//! it lists the prefix, then watches from the listed revision + 1. A broken
//! stream resumes from the last revision seen; a watch cancelled because its
//! start revision was compacted lists again, so no change in between is
//! missed. The receiver always holds the last known state, also while etcd
//! is unreachable. The mirror stops when every receiver is gone.
//!
//! ```no_run
//! # async fn run() -> Result<(), etcd_client::Error> {
//! let client = etcd_client::Client::connect(["http://127.0.0.1:2379"], None).await?;
//! let rx = trellis_etcd::mirror_prefix(client, "/app/", |kv| kv.value_str().ok().map(str::to_owned)).await?;
//! println!("{} values", rx.borrow().len());
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use etcd_client::{Client, EventType, GetOptions, KeyValue, WatchOptions};
use tokio::sync::watch;
use tracing::{debug, info};

/// Capped exponential backoff for reconnect loops: 100 ms doubling to 2 s.
#[derive(Debug)]
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// Starts at 100 ms.
    pub fn new() -> Self {
        Backoff(Duration::from_millis(100))
    }

    /// Sleeps for the current delay, then doubles it (up to 2 s).
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(2));
    }

    /// Back to 100 ms after a success.
    pub fn reset(&mut self) {
        self.0 = Duration::from_millis(100);
    }
}

/// Mirrors the values under `prefix`, decoded by `decode` (entries it
/// returns `None` for are skipped), in key order.
///
/// The first listing happens before this returns, so an unreachable etcd is
/// an error here; after that the mirror rides out outages on its own.
pub async fn mirror_prefix<T, D>(
    mut client: Client,
    prefix: impl Into<String>,
    decode: D,
) -> Result<watch::Receiver<Arc<[T]>>, etcd_client::Error>
where
    T: Clone + Send + Sync + 'static,
    D: Fn(&KeyValue) -> Option<T> + Send + Sync + 'static,
{
    let prefix = prefix.into();
    let (entries, revision) = list(&mut client, &prefix, &decode).await?;
    let (tx, rx) = watch::channel(snapshot(&entries));
    tokio::spawn(follow(client, prefix, decode, entries, revision, tx));
    Ok(rx)
}

async fn list<T, D: Fn(&KeyValue) -> Option<T>>(
    client: &mut Client,
    prefix: &str,
    decode: &D,
) -> Result<(BTreeMap<Vec<u8>, T>, i64), etcd_client::Error> {
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let entries = resp
        .kvs()
        .iter()
        .filter_map(|kv| decode(kv).map(|v| (kv.key().to_vec(), v)))
        .collect();
    Ok((entries, revision))
}

fn snapshot<T: Clone>(entries: &BTreeMap<Vec<u8>, T>) -> Arc<[T]> {
    entries.values().cloned().collect()
}

/// Follows the prefix from `revision` until every receiver is gone.
async fn follow<T, D>(
    mut client: Client,
    prefix: String,
    decode: D,
    mut entries: BTreeMap<Vec<u8>, T>,
    mut revision: i64,
    tx: watch::Sender<Arc<[T]>>,
) where
    T: Clone + Send + Sync + 'static,
    D: Fn(&KeyValue) -> Option<T> + Send + Sync + 'static,
{
    let mut backoff = Backoff::new();
    // `Some(rev)`: resume the watch after `rev`; `None`: list again first.
    let mut resume = Some(revision);
    loop {
        let after = match resume {
            Some(rev) => rev,
            None => {
                match tokio::select! { _ = tx.closed() => return, r = list(&mut client, &prefix, &decode) => r }
                {
                    Ok((fresh, rev)) => {
                        entries = fresh;
                        revision = rev;
                        tx.send_replace(snapshot(&entries));
                        rev
                    }
                    Err(err) => {
                        debug!(%prefix, error = %err, "list failed; keeping the last known state");
                        tokio::select! { _ = tx.closed() => return, _ = backoff.wait() => {} }
                        continue;
                    }
                }
            }
        };
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(after + 1);
        let watched = tokio::select! { _ = tx.closed() => return, w = client.watch(prefix.as_str(), Some(options)) => w };
        let mut stream = match watched {
            Ok(stream) => stream,
            Err(err) => {
                debug!(%prefix, error = %err, "watch failed; keeping the last known state");
                tokio::select! { _ = tx.closed() => return, _ = backoff.wait() => {} }
                continue;
            }
        };
        loop {
            let msg = tokio::select! { _ = tx.closed() => return, m = stream.message() => m };
            match msg {
                Ok(Some(resp)) => {
                    backoff.reset();
                    if resp.compact_revision() > 0 {
                        info!(%prefix, compact_revision = resp.compact_revision(), "watch compacted; listing again");
                        resume = None;
                        break;
                    }
                    if resp.canceled() {
                        debug!(%prefix, reason = resp.cancel_reason(), "watch cancelled; resuming");
                        resume = Some(revision);
                        break;
                    }
                    let mut changed = false;
                    for event in resp.events() {
                        let Some(kv) = event.kv() else { continue };
                        match event.event_type() {
                            EventType::Put => match decode(kv) {
                                Some(value) => {
                                    entries.insert(kv.key().to_vec(), value);
                                    changed = true;
                                }
                                // A key that no longer decodes is no longer there.
                                None => changed |= entries.remove(kv.key()).is_some(),
                            },
                            EventType::Delete => changed |= entries.remove(kv.key()).is_some(),
                        }
                        revision = revision.max(kv.mod_revision());
                    }
                    if let Some(h) = resp.header() {
                        revision = revision.max(h.revision());
                    }
                    if changed {
                        tx.send_replace(snapshot(&entries));
                    }
                }
                Ok(None) | Err(_) => {
                    debug!(%prefix, revision, "watch stream ended; resuming from the last revision");
                    resume = Some(revision);
                    tokio::select! { _ = tx.closed() => return, _ = backoff.wait() => {} }
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(kv: &KeyValue) -> Option<String> {
        kv.value_str().ok().map(str::to_owned)
    }

    /// A mirror that resumes after a revision etcd has since compacted must
    /// list again rather than miss what happened in between.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn resuming_past_a_compaction_lists_again() {
        let etcd = trellis_testkit::Etcd::start().unwrap();
        let mut client = Client::connect([etcd.endpoint()], None).await.unwrap();
        client.put("/p/a", "a", None).await.unwrap();
        let (stale, stale_revision) = list(&mut client, "/p/", &text).await.unwrap();

        // What the stale mirror has not seen: b arrives, a leaves, history is compacted.
        client.put("/p/b", "b", None).await.unwrap();
        let deleted = client.delete("/p/a", None).await.unwrap();
        client
            .compact(deleted.header().map(|h| h.revision()).unwrap(), None)
            .await
            .unwrap();

        let (tx, mut rx) = watch::channel(snapshot(&stale));
        tokio::spawn(follow(
            client,
            "/p/".to_owned(),
            text,
            stale,
            stale_revision,
            tx,
        ));
        tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|s| s.len() == 1 && s[0] == "b"),
        )
        .await
        .expect("the mirror did not recover from the compaction")
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn follows_puts_and_deletes_and_skips_undecodable_values() {
        let etcd = trellis_testkit::Etcd::start().unwrap();
        let mut client = Client::connect([etcd.endpoint()], None).await.unwrap();
        client.put("/p/a", "1", None).await.unwrap();
        let decode = |kv: &KeyValue| kv.value_str().ok().and_then(|v| v.parse::<u32>().ok());
        let mut rx = mirror_prefix(client.clone(), "/p/", decode).await.unwrap();
        assert_eq!(rx.borrow().to_vec(), [1]);
        client.put("/p/b", "2", None).await.unwrap();
        client.put("/p/c", "not a number", None).await.unwrap();
        client.put("/other", "9", None).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.len() == 2))
            .await
            .unwrap()
            .unwrap();
        client.put("/p/a", "oops", None).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| **s == [2]))
            .await
            .unwrap()
            .unwrap();
    }
}
