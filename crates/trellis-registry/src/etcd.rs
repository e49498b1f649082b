//! The etcd v3 backend.
//!
//! Registration: a lease with a TTL (default 5 s) and the instance's JSON at
//! `{prefix}{service}/{id}` attached to it, renewed every TTL/3. If renewal
//! fails (etcd restarted, a partition) or etcd reports the lease gone, the
//! session grants a new lease and writes the key again, retrying with
//! backoff until it succeeds, so an instance re-registers by itself. A
//! process that dies stops renewing and its key expires with the lease.
//!
//! Discovery: a [`trellis_etcd::mirror_prefix`] of the service's prefix
//! (list, watch from the listed revision, resume after a broken stream,
//! list again after compaction); the receiver keeps the last known set.

use std::{sync::Arc, time::Duration};

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use trellis_etcd::Backoff;

use crate::{
    BoxFuture, Discovery, Instance, InstanceSet, Listed, Registration, Registry, RegistryError,
    Session,
};

/// How to reach etcd and how to use it.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client endpoints, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix for services. Default: `/trellis/services/`.
    pub prefix: String,
    /// Lease TTL: how long a dead instance stays visible. Default: 5 s.
    pub ttl: Duration,
    /// Per-request timeout. Default: 3 s.
    pub request_timeout: Duration,
    /// TLS to etcd (`?ca_file=…&cert_file=…&key_file=…`). Default: none.
    pub tls: trellis_etcd::EtcdTls,
}

impl EtcdOptions {
    /// Options for `endpoints` with defaults for the rest.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        EtcdOptions {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: "/trellis/services/".into(),
            ttl: Duration::from_secs(5),
            request_timeout: Duration::from_secs(3),
            tls: trellis_etcd::EtcdTls::default(),
        }
    }

    /// Parses what follows `etcd://`: `host:port[,host:port][?ttl=5s&prefix=/x/]`.
    pub(crate) fn from_url_rest(rest: &str) -> Result<Self, String> {
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let hosts: Vec<&str> = hosts
            .trim_end_matches('/')
            .split(',')
            .filter(|h| !h.is_empty())
            .collect();
        if hosts.is_empty() {
            return Err("no etcd endpoint; expected etcd://host:port".into());
        }
        let mut options = EtcdOptions::new(hosts.iter().map(|h| format!("http://{h}")));
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            if let Some((k, v)) = pair.split_once('=')
                && options.tls.take(k, v)
            {
                continue;
            }
            match pair.split_once('=') {
                Some(("ttl", v)) => {
                    let secs: u64 = v
                        .trim_end_matches('s')
                        .parse()
                        .map_err(|_| format!("ttl {v:?} is not whole seconds"))?;
                    if secs == 0 {
                        return Err("ttl must be at least 1s".into());
                    }
                    options.ttl = Duration::from_secs(secs);
                }
                Some(("prefix", v)) => {
                    options.prefix = if v.ends_with('/') {
                        v.to_owned()
                    } else {
                        format!("{v}/")
                    };
                }
                _ => {
                    return Err(format!(
                        "unknown option {pair:?}; known: ttl, prefix, ca_file, cert_file, key_file"
                    ));
                }
            }
        }
        let scheme = options.tls.scheme();
        options.endpoints = hosts.iter().map(|h| format!("{scheme}://{h}")).collect();
        Ok(options)
    }
}

/// Services in etcd v3.
#[derive(Clone)]
pub struct EtcdRegistry {
    client: Client,
    options: Arc<EtcdOptions>,
}

impl EtcdRegistry {
    /// Connects to etcd.
    pub async fn connect(options: EtcdOptions) -> Result<Self, RegistryError> {
        let connect = ConnectOptions::new()
            .with_connect_timeout(options.request_timeout)
            .with_timeout(options.request_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let connect = options
            .tls
            .apply(connect)
            .map_err(|reason| RegistryError::Unavailable {
                endpoint: options.endpoints.join(","),
                reason,
            })?;
        let client = Client::connect(&options.endpoints, Some(connect))
            .await
            .map_err(|e| unavailable(&options, e))?;
        Ok(EtcdRegistry {
            client,
            options: Arc::new(options),
        })
    }

    fn key(&self, instance: &Instance) -> String {
        format!(
            "{}{}/{}",
            self.options.prefix, instance.service, instance.id
        )
    }

    fn service_prefix(&self, service: &str) -> String {
        format!("{}{service}/", self.options.prefix)
    }
}

fn unavailable(options: &EtcdOptions, e: etcd_client::Error) -> RegistryError {
    RegistryError::Unavailable {
        endpoint: options.endpoints.join(","),
        reason: e.to_string(),
    }
}

/// Grants a lease and writes the instance under it; returns the lease id.
async fn publish(
    client: &mut Client,
    key: &str,
    value: &str,
    ttl: Duration,
) -> Result<i64, etcd_client::Error> {
    let lease = client
        .lease_grant(ttl.as_secs().max(1) as i64, None)
        .await?
        .id();
    client
        .put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await?;
    Ok(lease)
}

/// Keeps one instance published until `cancel`; then deletes it.
async fn run_session(
    mut client: Client,
    key: String,
    value: String,
    ttl: Duration,
    mut lease: Option<i64>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new();
    loop {
        let id = match lease.take() {
            Some(id) => id,
            None => {
                let attempt = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = publish(&mut client, &key, &value, ttl) => r,
                };
                match attempt {
                    Ok(id) => {
                        info!(%key, lease = id, "registered");
                        event("registered");
                        backoff.reset();
                        id
                    }
                    Err(err) => {
                        warn!(%key, error = %err, "registration failed; retrying");
                        event("register_failed");
                        tokio::select! { _ = cancel.cancelled() => return, _ = backoff.wait() => {} }
                        continue;
                    }
                }
            }
        };
        // Renew until cancelled or the lease is lost.
        let lost = match client.lease_keep_alive(id).await {
            Ok((mut keeper, mut responses)) => {
                let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(200)));
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => {
                            // Deregister: delete the key first (watchers see it at
                            // once), then revoke the lease.
                            let _ = client.delete(key.as_str(), None).await;
                            let _ = client.lease_revoke(id).await;
                            info!(%key, "deregistered");
                            event("deregistered");
                            return;
                        }
                        _ = tick.tick() => {
                            if let Err(err) = keeper.keep_alive().await {
                                break format!("keep-alive send failed: {err}");
                            }
                        }
                        msg = responses.message() => match msg {
                            Ok(Some(r)) if r.ttl() > 0 => {}
                            Ok(Some(_)) => break "lease expired".to_owned(),
                            Ok(None) => break "keep-alive stream closed".to_owned(),
                            Err(err) => break format!("keep-alive stream failed: {err}"),
                        }
                    }
                }
            }
            Err(err) => format!("cannot start keep-alive: {err}"),
        };
        warn!(%key, lease = id, reason = %lost, "lease lost; registering again");
        event("lease_lost");
        tokio::select! { _ = cancel.cancelled() => return, _ = backoff.wait() => {} }
    }
}

/// Counts a registry event (`registry_events_total{event}`).
fn event(kind: &'static str) {
    metrics::counter!("registry_events_total", "event" => kind).increment(1);
}

struct EtcdSession {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Session for EtcdSession {
    fn deregister(self: Box<Self>) -> BoxFuture<'static, Result<(), RegistryError>> {
        Box::pin(async move {
            self.cancel.cancel();
            // The session deletes the key on its way out; bounded so an
            // unreachable etcd cannot hold up a shutdown (the lease expires).
            let _ = tokio::time::timeout(Duration::from_secs(3), self.task).await;
            Ok(())
        })
    }
}

impl Registry for EtcdRegistry {
    fn register(&self, instance: Instance) -> BoxFuture<'_, Result<Registration, RegistryError>> {
        Box::pin(async move {
            crate::check_publishable(&instance)?;
            let key = self.key(&instance);
            let value = serde_json::to_string(&instance).map_err(|e| RegistryError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            })?;
            let mut client = self.client.clone();
            // First attempt inline so the caller learns of a bad setup; if etcd
            // is merely down, the session keeps trying in the background.
            let lease = match publish(&mut client, &key, &value, self.options.ttl).await {
                Ok(id) => {
                    info!(%key, lease = id, "registered");
                    event("registered");
                    Some(id)
                }
                Err(err) => {
                    warn!(%key, error = %err, "etcd unreachable at registration; will keep trying");
                    event("register_failed");
                    None
                }
            };
            let cancel = CancellationToken::new();
            let task = tokio::spawn(run_session(
                client,
                key,
                value,
                self.options.ttl,
                lease,
                cancel.clone(),
            ));
            Ok(Registration::new(EtcdSession { cancel, task }))
        })
    }
}

/// A stored record as an instance, or `None` (logged and counted) when it
/// breaks the record limits: a peer's record is checked before anything is
/// built from it.
fn decode(key: &[u8], value: &[u8]) -> Option<Instance> {
    match Instance::from_record(value) {
        Ok(instance) => Some(instance),
        Err(invalid) => {
            let key = String::from_utf8_lossy(&key[..key.len().min(256)]);
            warn!(%key, error = %invalid, "ignoring an instance record");
            crate::count_rejected(&invalid);
            None
        }
    }
}

impl Discovery for EtcdRegistry {
    fn watch(
        &self,
        service: &str,
    ) -> BoxFuture<'_, Result<watch::Receiver<InstanceSet>, RegistryError>> {
        let prefix = self.service_prefix(service);
        Box::pin(async move {
            trellis_etcd::mirror_prefix(self.client.clone(), prefix, |kv| {
                decode(kv.key(), kv.value())
            })
            .await
            .map_err(|e| unavailable(&self.options, e))
        })
    }

    fn list(&self, service: Option<&str>) -> BoxFuture<'_, Result<Vec<Listed>, RegistryError>> {
        let prefix = match service {
            Some(s) => self.service_prefix(s),
            None => self.options.prefix.clone(),
        };
        Box::pin(async move {
            let mut client = self.client.clone();
            let resp = client
                .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
                .await
                .map_err(|e| unavailable(&self.options, e))?;
            let mut out = Vec::new();
            for kv in resp.kvs() {
                let Some(instance) = decode(kv.key(), kv.value()) else {
                    continue;
                };
                let ttl_left = if kv.lease() != 0 {
                    client
                        .lease_time_to_live(kv.lease(), None)
                        .await
                        .ok()
                        .and_then(|r| u64::try_from(r.ttl()).ok())
                        .map(Duration::from_secs)
                } else {
                    None
                };
                out.push(Listed { instance, ttl_left });
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let o = EtcdOptions::from_url_rest("a:1,b:2").unwrap();
        assert_eq!(o.endpoints, ["http://a:1", "http://b:2"]);
        assert_eq!(o.ttl, Duration::from_secs(5));
        let o = EtcdOptions::from_url_rest("a:1/?ttl=10s&prefix=/x").unwrap();
        assert_eq!(o.endpoints, ["http://a:1"]);
        assert_eq!((o.ttl, o.prefix.as_str()), (Duration::from_secs(10), "/x/"));
        assert!(EtcdOptions::from_url_rest("").is_err());
        assert!(EtcdOptions::from_url_rest("a:1?ttl=0").is_err());
        assert!(EtcdOptions::from_url_rest("a:1?color=red").is_err());
    }
}
