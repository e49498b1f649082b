//! What Trellis' etcd backends (registry, config) share: the mirror below,
//! and [`EtcdTls`] — TLS to etcd from the URL's `ca_file`, `cert_file` and
//! `key_file` parameters.
//!
//! [`mirror_prefix`] keeps a local copy of everything under a key prefix:
//! it lists the prefix, then watches from the listed revision + 1. A broken
//! stream resumes from the last revision seen; a watch cancelled because its
//! start revision was compacted lists again, so no change in between is
//! missed. A response from a cluster that lost its data (its id changed, or
//! its raft term or revision went back below what the mirror has seen:
//! wiped and restarted, restored from an old backup) also lists again, since
//! a watch from the old, now future, revision would never fire. A cancelled
//! watch is retried with backoff. The receiver always holds the last known state, also while etcd
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

use etcd_client::{Client, EventType, GetOptions, KeyValue, ResponseHeader, WatchOptions};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// TLS to etcd (tonic on rustls/aws-lc-rs): the authorities that sign
/// etcd's certificate and, for `--client-cert-auth`, a client certificate.
/// Read from an `etcd://` URL's query (`?ca_file=…&cert_file=…&key_file=…`);
/// with any of them the endpoints are `https://`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM: the authorities trusted for etcd's certificate.
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM: the client certificate.
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM: its key.
    pub key_file: Option<std::path::PathBuf>,
}

impl EtcdTls {
    /// Takes `key=value` if it is one of the TLS parameters; whether it was.
    pub fn take(&mut self, key: &str, value: &str) -> bool {
        let slot = match key {
            "ca_file" => &mut self.ca_file,
            "cert_file" => &mut self.cert_file,
            "key_file" => &mut self.key_file,
            _ => return false,
        };
        *slot = Some(value.into());
        true
    }

    /// Whether TLS is asked for.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some()
    }

    /// `http://` or `https://`, for the endpoints.
    pub fn scheme(&self) -> &'static str {
        if self.is_set() { "https" } else { "http" }
    }

    /// `options` with TLS as set (unchanged when not); the error names the
    /// file that could not be read.
    pub fn apply(
        &self,
        options: etcd_client::ConnectOptions,
    ) -> Result<etcd_client::ConnectOptions, String> {
        if !self.is_set() {
            return Ok(options);
        }
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &self.ca_file {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        }
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            (None, None) => {}
            _ => return Err("cert_file and key_file come together".into()),
        }
        Ok(options.with_tls(tls))
    }
}

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
    let listed = list(&mut client, &prefix, &decode).await?;
    let (tx, rx) = watch::channel(snapshot(&listed.entries));
    tokio::spawn(follow(client, prefix, decode, listed, tx));
    Ok(rx)
}

/// Where the mirror stands in etcd's history: the cluster it has seen, the
/// highest revision and raft term it has seen there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    cluster_id: u64,
    raft_term: u64,
    revision: i64,
}

impl Position {
    fn of(header: Option<&ResponseHeader>) -> Position {
        Position {
            cluster_id: header.map_or(0, ResponseHeader::cluster_id),
            raft_term: header.map_or(0, ResponseHeader::raft_term),
            revision: header.map_or(0, ResponseHeader::revision),
        }
    }

    /// Whether a response at `then` comes from a history other than the
    /// one this position is in: a different cluster, or one whose raft term
    /// or revision went backwards. Both only move forwards in one cluster's
    /// life, so either going back means the cluster lost its data (wiped
    /// and restarted, restored from an old backup) and what the mirror
    /// holds must be listed again. A zero field means the response did not
    /// say, and is not a signal.
    fn diverged(&self, then: Position) -> Option<String> {
        if self.cluster_id != 0 && then.cluster_id != 0 && then.cluster_id != self.cluster_id {
            return Some(format!(
                "cluster id changed from {:x} to {:x}",
                self.cluster_id, then.cluster_id
            ));
        }
        if then.raft_term != 0 && then.raft_term < self.raft_term {
            return Some(format!(
                "raft term went back from {} to {}",
                self.raft_term, then.raft_term
            ));
        }
        if then.revision != 0 && then.revision < self.revision {
            return Some(format!(
                "revision went back from {} to {}",
                self.revision, then.revision
            ));
        }
        None
    }

    /// Takes in a later position in the same history.
    fn advance(&mut self, then: Position) {
        if self.cluster_id == 0 {
            self.cluster_id = then.cluster_id;
        }
        self.raft_term = self.raft_term.max(then.raft_term);
        self.revision = self.revision.max(then.revision);
    }
}

struct Listed<T> {
    entries: BTreeMap<Vec<u8>, T>,
    position: Position,
}

async fn list<T, D: Fn(&KeyValue) -> Option<T>>(
    client: &mut Client,
    prefix: &str,
    decode: &D,
) -> Result<Listed<T>, etcd_client::Error> {
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    let entries = resp
        .kvs()
        .iter()
        .filter_map(|kv| decode(kv).map(|v| (kv.key().to_vec(), v)))
        .collect();
    Ok(Listed {
        entries,
        position: Position::of(resp.header()),
    })
}

fn snapshot<T: Clone>(entries: &BTreeMap<Vec<u8>, T>) -> Arc<[T]> {
    entries.values().cloned().collect()
}

/// What to do after a watch stream ends.
enum Next {
    /// Watch again after the position's revision.
    Resume,
    /// List the prefix again first (compaction, a cluster that lost its data).
    Relist,
}

/// Follows the prefix from `listed` until every receiver is gone.
async fn follow<T, D>(
    mut client: Client,
    prefix: String,
    decode: D,
    listed: Listed<T>,
    tx: watch::Sender<Arc<[T]>>,
) where
    T: Clone + Send + Sync + 'static,
    D: Fn(&KeyValue) -> Option<T> + Send + Sync + 'static,
{
    let Listed {
        mut entries,
        mut position,
    } = listed;
    let mut backoff = Backoff::new();
    let mut next = Next::Resume;
    loop {
        if let Next::Relist = next {
            let listed = tokio::select! { _ = tx.closed() => return, r = list(&mut client, &prefix, &decode) => r };
            match listed {
                Ok(fresh) => {
                    entries = fresh.entries;
                    position = fresh.position;
                    tx.send_replace(snapshot(&entries));
                    next = Next::Resume;
                }
                Err(err) => {
                    debug!(%prefix, error = %err, "list failed; keeping the last known state");
                    tokio::select! { _ = tx.closed() => return, _ = backoff.wait() => {} }
                    continue;
                }
            }
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(position.revision + 1);
        let watched = tokio::select! { _ = tx.closed() => return, w = client.watch(prefix.as_str(), Some(options)) => w };
        let mut stream = match watched {
            Ok(stream) => stream,
            Err(err) => {
                debug!(%prefix, error = %err, "watch failed; keeping the last known state");
                tokio::select! { _ = tx.closed() => return, _ = backoff.wait() => {} }
                continue;
            }
        };
        next = loop {
            let msg = tokio::select! { _ = tx.closed() => return, m = stream.message() => m };
            let resp = match msg {
                Ok(Some(resp)) => resp,
                Ok(None) | Err(_) => {
                    debug!(%prefix, revision = position.revision, "watch stream ended; resuming from the last revision");
                    tokio::select! { _ = tx.closed() => return, _ = backoff.wait() => {} }
                    break Next::Resume;
                }
            };
            let then = Position::of(resp.header());
            if let Some(why) = position.diverged(then) {
                warn!(%prefix, %why, "etcd lost its history; listing again");
                metrics::counter!("etcd_mirror_relists_total", "reason" => "diverged").increment(1);
                break Next::Relist;
            }
            if resp.compact_revision() > 0 {
                info!(%prefix, compact_revision = resp.compact_revision(), "watch compacted; listing again");
                metrics::counter!("etcd_mirror_relists_total", "reason" => "compacted")
                    .increment(1);
                break Next::Relist;
            }
            if resp.canceled() {
                // A watch etcd keeps refusing must not become a tight loop.
                debug!(%prefix, reason = resp.cancel_reason(), "watch cancelled; resuming after a pause");
                tokio::select! { _ = tx.closed() => return, _ = backoff.wait() => {} }
                break Next::Resume;
            }
            backoff.reset();
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
                position.revision = position.revision.max(kv.mod_revision());
            }
            position.advance(then);
            if changed {
                tx.send_replace(snapshot(&entries));
            }
        };
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
        let stale = list(&mut client, "/p/", &text).await.unwrap();

        // What the stale mirror has not seen: b arrives, a leaves, history is compacted.
        client.put("/p/b", "b", None).await.unwrap();
        let deleted = client.delete("/p/a", None).await.unwrap();
        client
            .compact(deleted.header().map(|h| h.revision()).unwrap(), None)
            .await
            .unwrap();

        let (tx, mut rx) = watch::channel(snapshot(&stale.entries));
        tokio::spawn(follow(client, "/p/".to_owned(), text, stale, tx));
        tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|s| s.len() == 1 && s[0] == "b"),
        )
        .await
        .expect("the mirror did not recover from the compaction")
        .unwrap();
    }

    /// etcd wiped and restarted on the same address: revisions start again
    /// near 1, below what the mirror has seen. The mirror must notice, list
    /// again, and follow the new history.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn follows_a_cluster_that_lost_its_data() {
        let mut etcd = trellis_testkit::Etcd::start().unwrap();
        let mut client = Client::connect([etcd.endpoint()], None).await.unwrap();
        // Enough history that the new cluster's revisions stay below it.
        for i in 0..20 {
            client.put(format!("/p/{i}"), "old", None).await.unwrap();
        }
        let mut rx = mirror_prefix(client, "/p/", text).await.unwrap();
        assert_eq!(rx.borrow().len(), 20);

        etcd.restart(true).unwrap();
        let mut fresh = Client::connect([etcd.endpoint()], None).await.unwrap();
        let put = fresh.put("/p/new", "new", None).await.unwrap();
        let revision = put.header().map(|h| h.revision()).unwrap();
        assert!(revision < 20, "the wiped cluster is at revision {revision}");

        let seen = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|s| s.len() == 1 && s[0] == "new"),
        )
        .await
        .is_ok();
        assert!(
            seen,
            "the mirror did not follow the wiped cluster within 5 s; it holds {:?}",
            rx.borrow()
        );
        // And it keeps following the new history.
        fresh.put("/p/newer", "newer", None).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.len() == 2))
            .await
            .expect("the mirror stopped following after the relist")
            .unwrap();
    }

    fn at(cluster_id: u64, raft_term: u64, revision: i64) -> Position {
        Position {
            cluster_id,
            raft_term,
            revision,
        }
    }

    #[test]
    fn a_history_diverges_when_cluster_term_or_revision_goes_back() {
        let mut seen = at(7, 3, 100);
        assert_eq!(seen.diverged(at(7, 3, 100)), None);
        assert_eq!(seen.diverged(at(7, 4, 150)), None);
        assert_eq!(seen.diverged(at(0, 0, 0)), None, "unset fields say nothing");
        assert!(seen.diverged(at(8, 3, 100)).unwrap().contains("cluster id"));
        assert!(seen.diverged(at(7, 2, 120)).unwrap().contains("raft term"));
        assert!(seen.diverged(at(7, 3, 99)).unwrap().contains("revision"));
        seen.advance(at(7, 4, 150));
        assert_eq!((seen.raft_term, seen.revision), (4, 150));
        seen.advance(at(7, 4, 120));
        assert_eq!(seen.revision, 150, "never moves back");
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
