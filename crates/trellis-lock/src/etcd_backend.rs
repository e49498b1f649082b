//! Locks in etcd: a key written under a lease only if it does not exist
//! (a transaction comparing its create revision with 0); the token is the
//! revision of that write — etcd's revisions only grow, across the whole
//! cluster. The lease is kept alive by the guard; release deletes the key
//! only if it still names the holder, and revokes the lease.
//!
//! What this guarantees: mutual exclusion through etcd's consensus — a
//! majority of the cluster agreed on the write — for as long as the lease
//! lives (whole seconds: a TTL rounds up to the next second). What it does
//! not: that a holder paused past its lease is not still running; the
//! token, checked by the store, covers that.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};
use futures_util::future::BoxFuture;

use crate::{Backend, Grant, Held, LockError, MAX_LISTED};

/// Locks in an etcd cluster.
#[derive(Clone)]
pub struct EtcdLocks {
    client: Client,
    prefix: String,
    /// Each holder's lease.
    leases: std::sync::Arc<Mutex<HashMap<String, i64>>>,
}

fn backend(e: etcd_client::Error) -> LockError {
    LockError::Backend(format!("etcd: {e}"))
}

impl EtcdLocks {
    /// Locks under keys starting with `prefix` in the cluster at
    /// `endpoints` (`http://host:port`, or `https://` with `tls`).
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        tls: &trellis_etcd::EtcdTls,
    ) -> Result<EtcdLocks, LockError> {
        let options = tls
            .apply(
                ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(2))
                    .with_timeout(Duration::from_secs(2)),
            )
            .map_err(LockError::Backend)?;
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(backend)?;
        Ok(EtcdLocks {
            client,
            prefix: prefix.to_owned(),
            leases: Default::default(),
        })
    }

    fn key(&self, resource: &str) -> String {
        format!("{}lock/{resource}", self.prefix)
    }

    fn lease_of(&self, holder: &str) -> Option<i64> {
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(holder)
            .copied()
    }

    fn forget(&self, holder: &str) -> Option<i64> {
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(holder)
    }
}

fn seconds(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis().div_ceil(1000))
        .unwrap_or(i64::MAX)
        .max(1)
}

impl Backend for EtcdLocks {
    fn list(&self) -> BoxFuture<'_, Result<Vec<Held>, LockError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let prefix = format!("{}lock/", self.prefix);
            let listing = client
                .get(
                    prefix.as_str(),
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_limit(MAX_LISTED as i64),
                    ),
                )
                .await
                .map_err(backend)?;
            let mut held = Vec::new();
            for kv in listing.kvs() {
                let ttl = match kv.lease() {
                    0 => None,
                    lease => client
                        .lease_time_to_live(lease, None)
                        .await
                        .ok()
                        .and_then(|t| u64::try_from(t.ttl()).ok())
                        .map(Duration::from_secs),
                };
                held.push(Held {
                    resource: String::from_utf8_lossy(kv.key())
                        .strip_prefix(&prefix)
                        .unwrap_or_default()
                        .to_owned(),
                    holder: String::from_utf8_lossy(kv.value()).into_owned(),
                    expires_in: ttl,
                });
            }
            Ok(held)
        })
    }

    fn try_acquire<'a>(
        &'a self,
        resource: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Grant>, LockError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let key = self.key(resource);
            let lease = client
                .lease_grant(seconds(ttl), None)
                .await
                .map_err(backend)?
                .id();
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.as_str(),
                    holder,
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            let response = match client.txn(txn).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = client.lease_revoke(lease).await;
                    return Err(backend(e));
                }
            };
            if !response.succeeded() {
                let _ = client.lease_revoke(lease).await;
                return Ok(None);
            }
            let revision = response.header().map_or(0, |h| h.revision());
            self.leases
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(holder.to_owned(), lease);
            Ok(Some(Grant {
                token: u64::try_from(revision).unwrap_or(0),
            }))
        })
    }

    fn extend<'a>(
        &'a self,
        _resource: &'a str,
        holder: &'a str,
        _ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, LockError>> {
        Box::pin(async move {
            let Some(lease) = self.lease_of(holder) else {
                return Ok(false);
            };
            let mut client = self.client.clone();
            let (mut keeper, mut stream) = client.lease_keep_alive(lease).await.map_err(backend)?;
            keeper.keep_alive().await.map_err(backend)?;
            match stream.message().await.map_err(backend)? {
                // TTL 0: the lease is gone, and the key with it.
                Some(answer) => Ok(answer.ttl() > 0),
                None => Err(LockError::Backend("etcd: keep-alive stream closed".into())),
            }
        })
    }

    fn release<'a>(
        &'a self,
        resource: &'a str,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<bool, LockError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let key = self.key(resource);
            let txn = Txn::new()
                .when([Compare::value(key.as_str(), CompareOp::Equal, holder)])
                .and_then([TxnOp::delete(key.as_str(), None)]);
            let deleted = client.txn(txn).await.map_err(backend)?.succeeded();
            if let Some(lease) = self.forget(holder) {
                let _ = client.lease_revoke(lease).await;
            }
            Ok(deleted)
        })
    }
}
