//! Active health checks: an upstream's endpoints probed with `GET {path}`
//! every `interval`; an endpoint that fails `unhealthy_after` probes in a
//! row leaves the set the balancer sees, and comes back after
//! `healthy_after` good ones. The check sits between the instance source
//! (the registry's watch, or the static targets) and the balancer, so the
//! balancer and its outlier ejection are unchanged. When every endpoint
//! fails, all are kept (fail open, as Envoy's panic threshold does): a
//! broken health path must not take a working upstream down.

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;
use http::{Request, header};
use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, sync::watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use trellis_registry::{Instance, InstanceSet};

use crate::config::HealthCheckConfig;

/// The instances of `source` that pass their checks, as they change; the
/// checks stop when the guard is dropped.
pub(crate) fn filter(
    upstream: &str,
    mut source: watch::Receiver<InstanceSet>,
    protocol: String,
    config: HealthCheckConfig,
) -> (watch::Receiver<InstanceSet>, DropGuard) {
    let (tx, rx) = watch::channel(source.borrow_and_update().clone());
    let stop = CancellationToken::new();
    let guard = stop.clone().drop_guard();
    let upstream = upstream.to_owned();
    tokio::spawn(async move {
        // Per instance id: (healthy, how many probes in a row disagreed).
        let mut state: HashMap<String, (bool, u32)> = HashMap::new();
        let mut ticker = tokio::time::interval(config.interval);
        let mut source_open = true;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
                changed = source.changed(), if source_open => {
                    // A source that will not change again (static targets):
                    // keep probing what it last said.
                    if changed.is_err() {
                        source_open = false;
                    }
                }
            }
            let set = source.borrow_and_update().clone();
            let probes = set.iter().map(|instance| {
                let address = instance.endpoint(&protocol).map(str::to_owned);
                let path = config.path.clone();
                let timeout = config.timeout;
                async move {
                    match address {
                        Some(address) => probe(&address, &path, timeout).await,
                        None => false,
                    }
                }
            });
            let results = futures_util::future::join_all(probes).await;
            state.retain(|id, _| set.iter().any(|i| &i.id == id));
            for (instance, ok) in set.iter().zip(results) {
                let entry = state.entry(instance.id.clone()).or_insert((true, 0));
                if entry.0 == ok {
                    entry.1 = 0;
                    continue;
                }
                entry.1 += 1;
                let needed = if ok {
                    config.healthy_after
                } else {
                    config.unhealthy_after
                };
                if entry.1 >= needed.max(1) {
                    *entry = (ok, 0);
                    tracing::info!(%upstream, endpoint = %instance.id, healthy = ok, "health check changed an endpoint's state");
                    metrics::counter!(
                        "gateway_health_transitions_total",
                        "to" => if ok { "healthy" } else { "unhealthy" }
                    )
                    .increment(1);
                }
            }
            let healthy: Vec<Instance> = set
                .iter()
                .filter(|i| state.get(&i.id).is_none_or(|s| s.0))
                .cloned()
                .collect();
            let published: InstanceSet = if healthy.is_empty() {
                set.clone()
            } else {
                healthy.into()
            };
            tx.send_if_modified(|current| {
                let same = current.len() == published.len()
                    && current.iter().zip(published.iter()).all(|(a, b)| a == b);
                if !same {
                    *current = published.clone();
                }
                !same
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    (rx, guard)
}

/// One probe: `GET path` on a fresh connection; healthy on a 2xx within
/// `timeout`.
async fn probe(address: &str, path: &str, timeout: Duration) -> bool {
    let attempt = async {
        let stream = TcpStream::connect(address).await.ok()?;
        let (mut sender, connection) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(connection);
        let request = Request::get(path)
            .header(header::HOST, address)
            .header(header::USER_AGENT, "trellis-gateway-health")
            .body(Empty::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        Some(response.status().is_success())
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}
