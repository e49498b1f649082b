//! A tonic-compatible channel over a discovered service.
//!
//! The endpoint set follows the registry watch; each endpoint keeps one
//! lazily-connected HTTP/2 channel and its statistics across set changes.
//! A request: choose the eligible endpoints (same zone when any are
//! healthy, never ejected ones unless all are), let the balancer pick, send
//! on that endpoint's channel, and feed latency and outcome back.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    future::Future,
    pin::Pin,
    sync::{Arc, PoisonError, RwLock},
    task::{Context, Poll},
    time::Instant,
};

use http::{HeaderName, Request, Response};
use tokio::sync::{oneshot, watch};
use tonic::{Status, body::Body};
use tower::{Service, ServiceExt};
use tracing::{debug, warn};
use trellis_registry::{Discovery, Instance, InstanceSet, RegistryError};
use trellis_transport::ClientConfig;

use crate::{
    Balancer, ConsistentHash, Endpoint, LeastRequest, OutlierDetection, P2cEwma, RandomPick,
    RoundRobin, SmoothWeightedRoundRobin, endpoint::now_ns, hash::hash_key,
};

/// The latency a failed request counts as, for p2c's cost.
const FAILURE_PENALTY: std::time::Duration = std::time::Duration::from_secs(1);

/// The error type of [`BalancedChannel`]: always a `tonic::Status` inside,
/// so generated clients report UNAVAILABLE with the reason.
pub type BalanceError = Box<dyn std::error::Error + Send + Sync>;

/// Which algorithm picks endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Policy {
    /// Power of two choices over latency × in flight (default).
    #[default]
    P2cEwma,
    /// Each endpoint in turn.
    RoundRobin,
    /// nginx's smooth weighted round robin.
    SmoothWeightedRoundRobin,
    /// Fewer requests in flight of two random endpoints.
    LeastRequest,
    /// Consistent hashing on the value of a request header / gRPC metadata key.
    ConsistentHash {
        /// The header whose value is the key, e.g. `x-user-id`.
        header: String,
    },
    /// Uniformly at random.
    Random,
}

impl Policy {
    fn balancer(&self) -> Box<dyn Balancer> {
        match self {
            Policy::P2cEwma => Box::new(P2cEwma),
            Policy::RoundRobin => Box::new(RoundRobin::new()),
            Policy::SmoothWeightedRoundRobin => Box::new(SmoothWeightedRoundRobin::new()),
            Policy::LeastRequest => Box::new(LeastRequest),
            Policy::ConsistentHash { .. } => Box::new(ConsistentHash::default()),
            Policy::Random => Box::new(RandomPick),
        }
    }
}

/// Instances must match this to be used (a hard filter).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this version, when set.
    pub version: Option<String>,
    /// Only instances carrying all these metadata entries.
    pub metadata: BTreeMap<String, String>,
}

impl Filter {
    fn accepts(&self, instance: &Instance) -> bool {
        self.version.as_ref().is_none_or(|v| *v == instance.version)
            && self
                .metadata
                .iter()
                .all(|(k, v)| instance.metadata.get(k) == Some(v))
    }
}

/// How a [`BalancedChannel`] chooses and watches endpoints.
#[derive(Debug, Clone)]
pub struct BalanceConfig {
    /// The algorithm. Default: p2c-EWMA.
    pub policy: Policy,
    /// Which of an instance's endpoints to call. Default: `grpc`.
    pub protocol: String,
    /// Prefer instances in this zone while any of them is healthy.
    pub prefer_zone: Option<String>,
    /// Instances that do not match are never used.
    pub filter: Filter,
    /// When to eject failing endpoints.
    pub outlier: OutlierDetection,
    /// Connect/request timeouts and keep-alive of each endpoint's channel.
    pub client: ClientConfig,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            policy: Policy::default(),
            protocol: "grpc".into(),
            prefer_zone: None,
            filter: Filter::default(),
            outlier: OutlierDetection::default(),
            client: ClientConfig::default(),
        }
    }
}

#[derive(Default)]
struct Pool {
    all: Vec<Arc<Endpoint>>,
    local: Vec<Arc<Endpoint>>,
}

struct Shared {
    service: String,
    config: BalanceConfig,
    balancer: Box<dyn Balancer>,
    hash_header: Option<HeaderName>,
    pool: RwLock<Arc<Pool>>,
    // Dropping the channel drops this, which ends the watch task.
    _stop: oneshot::Sender<()>,
}

impl Shared {
    fn pool(&self) -> Arc<Pool> {
        self.pool
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Rebuilds the pool from a new instance set, keeping the channels and
    /// statistics of endpoints that stay.
    fn update(&self, set: &InstanceSet) {
        let old = self.pool();
        let previous: HashMap<(&str, &str), &Arc<Endpoint>> =
            old.all.iter().map(|e| ((e.id(), e.address()), e)).collect();
        let mut all = Vec::new();
        for instance in set.iter().filter(|i| self.config.filter.accepts(i)) {
            let Some(address) = instance.endpoint(&self.config.protocol) else {
                continue;
            };
            let endpoint = match previous.get(&(instance.id.as_str(), address)) {
                Some(e) if e.weight() == instance.weight.max(1) && e.zone() == instance.zone => {
                    Arc::clone(e)
                }
                found => {
                    let mut e =
                        Endpoint::new(&instance.id, address, instance.weight, &instance.zone);
                    match found {
                        Some(old) => {
                            e.inherit(old);
                            e.channel = old.channel.clone();
                        }
                        None => match trellis_transport::connect_lazy(address, &self.config.client)
                        {
                            Ok(channel) => e.channel = Some(channel),
                            Err(err) => {
                                warn!(service = %self.service, %address, error = %err, "skipping an endpoint with an invalid address");
                                continue;
                            }
                        },
                    }
                    Arc::new(e)
                }
            };
            all.push(endpoint);
        }
        let local = match &self.config.prefer_zone {
            Some(zone) => all.iter().filter(|e| e.zone() == zone).cloned().collect(),
            None => Vec::new(),
        };
        self.balancer.rebuild(&all);
        debug!(service = %self.service, endpoints = all.len(), local = local.len(), "endpoint set updated");
        *self.pool.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(Pool { all, local });
    }

    /// The endpoint for one request.
    fn choose(&self, key: Option<u64>) -> Option<Arc<Endpoint>> {
        let pool = self.pool();
        let now = now_ns();
        let local = eligible(&pool.local, now);
        let candidates = if !local.is_empty() {
            local
        } else {
            let all = eligible(&pool.all, now);
            // Everything ejected: better to try than to fail every request.
            if all.is_empty() {
                Cow::Borrowed(pool.all.as_slice())
            } else {
                all
            }
        };
        let i = self.balancer.pick(&candidates, key)?;
        candidates.get(i).cloned()
    }

    fn record(&self, endpoint: &Endpoint, failed: bool) {
        if !failed {
            endpoint.record_success();
            return;
        }
        let od = &self.config.outlier;
        if od.consecutive_failures == 0 || endpoint.record_failure() < od.consecutive_failures {
            return;
        }
        let pool = self.pool();
        let now = now_ns();
        let ejected = pool.all.iter().filter(|e| e.is_ejected_at(now)).count();
        if od.may_eject(ejected, pool.all.len()) {
            let duration = endpoint.eject(od.base_ejection, od.max_ejection);
            warn!(service = %self.service, address = endpoint.address(), ?duration, "ejecting a failing endpoint");
        }
    }
}

/// The endpoints of `list` not ejected at `now`; borrowed when none is.
fn eligible(list: &[Arc<Endpoint>], now: u64) -> Cow<'_, [Arc<Endpoint>]> {
    if list.iter().any(|e| e.is_ejected_at(now)) {
        Cow::Owned(
            list.iter()
                .filter(|e| !e.is_ejected_at(now))
                .cloned()
                .collect(),
        )
    } else {
        Cow::Borrowed(list)
    }
}

/// Whether a response counts as a failure for outlier detection.
fn is_failure(response: &Response<Body>) -> bool {
    matches!(response.status().as_u16(), 502..=504)
        || response
            .headers()
            .get("grpc-status")
            .is_some_and(|s| s.as_bytes() == b"14")
}

/// A balanced, discovered channel: pass it to any generated tonic client.
#[derive(Clone)]
pub struct BalancedChannel {
    shared: Arc<Shared>,
}

impl BalancedChannel {
    /// Follows `service` through `discovery`.
    pub async fn discover(
        discovery: &dyn Discovery,
        service: &str,
        config: BalanceConfig,
    ) -> Result<BalancedChannel, RegistryError> {
        let rx = discovery.watch(service).await?;
        Ok(Self::from_watch(service, rx, config))
    }

    /// Follows an instance-set receiver (from any discovery source).
    pub fn from_watch(
        service: &str,
        mut rx: watch::Receiver<InstanceSet>,
        config: BalanceConfig,
    ) -> BalancedChannel {
        let hash_header = match &config.policy {
            Policy::ConsistentHash { header } => {
                HeaderName::from_bytes(header.to_ascii_lowercase().as_bytes()).ok()
            }
            _ => None,
        };
        let (stop, mut stopped) = oneshot::channel();
        let shared = Arc::new(Shared {
            service: service.to_owned(),
            balancer: config.policy.balancer(),
            config,
            hash_header,
            pool: RwLock::new(Arc::new(Pool::default())),
            _stop: stop,
        });
        shared.update(&rx.borrow_and_update().clone());
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    changed = rx.changed() => {
                        // The discovery source is gone: keep the last pool.
                        if changed.is_err() { return; }
                    }
                }
                let set = rx.borrow_and_update().clone();
                match weak.upgrade() {
                    Some(shared) => shared.update(&set),
                    None => return,
                }
            }
        });
        BalancedChannel { shared }
    }

    /// The endpoints currently in use (for inspection and tests).
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.shared.pool().all.clone()
    }

    /// The balancer's name.
    pub fn policy_name(&self) -> &'static str {
        self.shared.balancer.name()
    }
}

/// Keeps the in-flight count right even if the caller drops the request.
struct InFlight {
    endpoint: Arc<Endpoint>,
    started: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.finish(self.started.elapsed());
    }
}

impl Service<Request<Body>> for BalancedChannel {
    type Response = Response<Body>;
    type Error = BalanceError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, BalanceError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is per endpoint; it is awaited after the pick.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            let key = shared
                .hash_header
                .as_ref()
                .and_then(|h| request.headers().get(h))
                .map(|v| hash_key(v.as_bytes()));
            let Some(endpoint) = shared.choose(key) else {
                return Err(Box::new(Status::unavailable(format!(
                    "no endpoints for service {}",
                    shared.service
                ))) as BalanceError);
            };
            let Some(channel) = endpoint.channel.clone() else {
                return Err(Box::new(Status::unavailable(format!(
                    "{} has no channel",
                    endpoint.address()
                ))) as BalanceError);
            };
            endpoint.start();
            let guard = InFlight {
                endpoint: endpoint.clone(),
                started: Instant::now(),
            };
            let result = channel.oneshot(request).await;
            let failed = result.as_ref().map_or(true, is_failure);
            if failed {
                // A refused connection fails fast; without a penalty p2c
                // would prefer the dead endpoint until it is ejected.
                endpoint.observe(FAILURE_PENALTY);
            }
            shared.record(&endpoint, failed);
            drop(guard);
            result.map_err(|e| {
                Box::new(Status::unavailable(format!(
                    "{} at {}: {e}",
                    shared.service,
                    endpoint.address()
                ))) as BalanceError
            })
        })
    }
}
