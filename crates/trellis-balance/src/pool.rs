//! A balanced pool over a discovered service, generic over what talks to
//! each endpoint.
//!
//! The endpoint set follows the registry watch. Each endpoint has one
//! service made for it by the pool's connector (a lazily-connected tonic
//! channel, a pooled HTTP/1.1 client pointed at it, anything) and
//! statistics that survive set changes. The pool is an immutable snapshot
//! swapped whole on each change, so a request reads it without a lock:
//! pick an endpoint (same zone when any there is not ejected; never an
//! ejected one unless all are), call its service, and feed back what the
//! response says — latency when its head arrives, the outcome (trailers
//! included) when its body ends.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use http::{HeaderName, Request, Response};
use tokio::sync::{oneshot, watch};
use tonic::Status;
use tower::{Service, ServiceExt};
use tracing::{debug, warn};
use trellis_core::{
    BoxError,
    protocol::{Classified, End, Report},
};
use trellis_registry::{Discovery, Instance, InstanceSet, RegistryError};

use crate::{
    Balancer, ConsistentHash, Endpoint, LeastRequest, OutlierDetection, P2cEwma, PickSet,
    RandomPick, RoundRobin, SmoothWeightedRoundRobin,
    endpoint::{nanos_at, now_ns},
    hash::hash_key,
};

/// The latency a failed request counts as, for p2c's cost.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// The error type of [`Balanced`]: always a `tonic::Status` (UNAVAILABLE,
/// naming the service and the endpoint) inside, so generated clients report
/// it as such and HTTP callers can map it to 503.
pub type BalanceError = BoxError;

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
            Policy::RoundRobin => Box::new(RoundRobin),
            Policy::SmoothWeightedRoundRobin => Box::new(SmoothWeightedRoundRobin),
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

/// How a [`Balanced`] pool chooses and watches endpoints.
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
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            policy: Policy::default(),
            protocol: "grpc".into(),
            prefer_zone: None,
            filter: Filter::default(),
            outlier: OutlierDetection::default(),
        }
    }
}

/// Makes the service that talks to one endpoint; called once per endpoint
/// as it joins (not per request). An error skips the endpoint with a
/// warning (an address the client cannot use).
pub type Connect<S> = dyn Fn(&Endpoint) -> Result<S, BoxError> + Send + Sync;

/// One endpoint set as a request sees it: who, how to pick, and what to do
/// with outcomes. Immutable; replaced whole.
struct EndpointSet {
    service: Arc<str>,
    outlier: OutlierDetection,
    all: PickSet,
    /// The preferred zone's endpoints, and where each sits in `all`.
    local: Option<(PickSet, Box<[usize]>)>,
}

impl EndpointSet {
    /// The endpoint for one request (an index into `all`).
    #[inline]
    fn choose(&self, key: Option<u64>, now: u64) -> Option<usize> {
        if let Some((local, at)) = &self.local
            && let Some(i) = local.pick(key, now)
        {
            return Some(at[i]);
        }
        self.all
            .pick(key, now)
            // Everything ejected: better to try than to fail every request.
            .or_else(|| self.all.pick(key, u64::MAX))
    }

    /// [`choose`](Self::choose), but not the endpoint at `avoid` while
    /// another one can be had (a retry after that endpoint failed): picked
    /// again a few times, then the next endpoint in the set that is not
    /// ejected.
    fn choose_avoiding(&self, key: Option<u64>, now: u64, avoid: &str) -> Option<usize> {
        let avoided = |i: usize| self.endpoint(i).address() == avoid;
        let mut last = None;
        for _ in 0..4 {
            match self.choose(key, now) {
                Some(i) if avoided(i) => last = Some(i),
                other => return other,
            }
        }
        let all = self.all.endpoints();
        let start = last?;
        (1..all.len())
            .map(|step| (start + step) % all.len())
            .find(|&i| !avoided(i) && !all[i].is_ejected_at(now))
            .or(Some(start))
    }

    fn endpoint(&self, index: usize) -> &Arc<Endpoint> {
        &self.all.endpoints()[index]
    }

    /// Feeds one outcome to outlier detection.
    fn record(&self, index: usize, failed: bool) {
        let endpoint = self.endpoint(index);
        if !failed {
            endpoint.record_success();
            return;
        }
        let od = &self.outlier;
        if od.consecutive_failures == 0 || endpoint.record_failure() < od.consecutive_failures {
            return;
        }
        let now = now_ns();
        let all = self.all.endpoints();
        let ejected = all.iter().filter(|e| e.is_ejected_at(now)).count();
        if od.may_eject(ejected, all.len()) {
            let duration = endpoint.eject(od.base_ejection, od.max_ejection);
            warn!(service = %self.service, address = endpoint.address(), ?duration, "ejecting a failing endpoint");
        }
    }
}

/// The snapshot: the set and, in the same order, each endpoint's service.
struct Snapshot<S> {
    set: Arc<EndpointSet>,
    services: Box<[S]>,
}

struct Shared<S> {
    service: Arc<str>,
    config: BalanceConfig,
    balancer: Box<dyn Balancer>,
    hash_header: Option<HeaderName>,
    connect: Box<Connect<S>>,
    snapshot: ArcSwap<Snapshot<S>>,
    /// How many endpoint sets have been taken in, published after each.
    updates: watch::Sender<u64>,
    // Dropping the pool drops this, which ends the watch task.
    _stop: oneshot::Sender<()>,
}

impl<S: Clone> Shared<S> {
    /// A snapshot of `endpoints` and their services.
    fn snapshot(&self, endpoints: Vec<(Arc<Endpoint>, S)>) -> Snapshot<S> {
        let (endpoints, services): (Vec<_>, Vec<_>) = endpoints.into_iter().unzip();
        let local = self.config.prefer_zone.as_ref().map(|zone| {
            let (at, members): (Vec<usize>, Vec<Arc<Endpoint>>) = endpoints
                .iter()
                .enumerate()
                .filter(|(_, e)| e.zone() == zone)
                .map(|(i, e)| (i, e.clone()))
                .unzip();
            (
                PickSet::new(self.balancer.as_ref(), members),
                at.into_boxed_slice(),
            )
        });
        Snapshot {
            set: Arc::new(EndpointSet {
                service: self.service.clone(),
                outlier: self.config.outlier.clone(),
                all: PickSet::new(self.balancer.as_ref(), endpoints),
                local,
            }),
            services: services.into_boxed_slice(),
        }
    }

    /// Rebuilds the pool from a new instance set, keeping the services and
    /// statistics of endpoints that stay.
    fn update(&self, instances: &InstanceSet) {
        let old = self.snapshot.load_full();
        let previous: HashMap<(&str, &str), (&Arc<Endpoint>, &S)> = old
            .set
            .all
            .endpoints()
            .iter()
            .zip(old.services.iter())
            .map(|(e, s)| ((e.id(), e.address()), (e, s)))
            .collect();
        let mut next = Vec::new();
        for instance in instances.iter().filter(|i| self.config.filter.accepts(i)) {
            let Some(address) = instance.endpoint(&self.config.protocol) else {
                continue;
            };
            let fresh = || Endpoint::new(&instance.id, address, instance.weight, &instance.zone);
            match previous.get(&(instance.id.as_str(), address)) {
                Some((e, s))
                    if e.weight() == instance.weight.max(1) && e.zone() == instance.zone =>
                {
                    next.push((Arc::clone(e), (*s).clone()));
                }
                Some((e, s)) => {
                    let endpoint = fresh();
                    endpoint.inherit(e);
                    next.push((Arc::new(endpoint), (*s).clone()));
                }
                None => {
                    let endpoint = fresh();
                    match (self.connect)(&endpoint) {
                        Ok(service) => next.push((Arc::new(endpoint), service)),
                        Err(error) => {
                            warn!(service = %self.service, %address, %error, "skipping an endpoint the client cannot use");
                        }
                    }
                }
            }
        }
        let snapshot = self.snapshot(next);
        debug!(
            service = %self.service,
            endpoints = snapshot.services.len(),
            local = snapshot.set.local.as_ref().map_or(0, |(l, _)| l.endpoints().len()),
            "endpoint set updated"
        );
        self.snapshot.store(Arc::new(snapshot));
        self.updates.send_modify(|n| *n += 1);
    }
}

/// A balanced pool over a discovered service: a tower service that sends
/// each request to one endpoint's service `S`.
///
/// `S` is whatever talks to one endpoint — a tonic channel (the facade's
/// `trellis::BalancedChannel`), an HTTP client aimed at the endpoint, an
/// in-process service in tests. Clones share the pool.
pub struct Balanced<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for Balanced<S> {
    fn clone(&self) -> Self {
        Balanced {
            shared: self.shared.clone(),
        }
    }
}

impl<S: Clone + Send + Sync + 'static> Balanced<S> {
    /// Follows `service` through `discovery`, making each endpoint's
    /// service with `connect`.
    pub async fn discover(
        discovery: &dyn Discovery,
        service: &str,
        config: BalanceConfig,
        connect: impl Fn(&Endpoint) -> Result<S, BoxError> + Send + Sync + 'static,
    ) -> Result<Balanced<S>, RegistryError> {
        let rx = discovery.watch(service).await?;
        Ok(Self::from_watch(service, rx, config, connect))
    }

    /// Follows an instance-set receiver (from any discovery source).
    pub fn from_watch(
        service: &str,
        mut rx: watch::Receiver<InstanceSet>,
        config: BalanceConfig,
        connect: impl Fn(&Endpoint) -> Result<S, BoxError> + Send + Sync + 'static,
    ) -> Balanced<S> {
        let hash_header = match &config.policy {
            Policy::ConsistentHash { header } => {
                HeaderName::from_bytes(header.to_ascii_lowercase().as_bytes()).ok()
            }
            _ => None,
        };
        let (stop, mut stopped) = oneshot::channel();
        let balancer = config.policy.balancer();
        let service: Arc<str> = service.into();
        let empty = Snapshot {
            set: Arc::new(EndpointSet {
                service: service.clone(),
                outlier: config.outlier.clone(),
                all: PickSet::new(balancer.as_ref(), Vec::new()),
                local: None,
            }),
            services: Box::new([]),
        };
        let shared = Arc::new(Shared {
            service,
            balancer,
            config,
            hash_header,
            connect: Box::new(connect),
            snapshot: ArcSwap::from_pointee(empty),
            updates: watch::Sender::new(0),
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
        Balanced { shared }
    }
}

impl<S> Balanced<S> {
    /// The endpoints currently in use (for inspection and tests).
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.shared.snapshot.load().set.all.endpoints().to_vec()
    }

    /// The number of endpoint sets the pool has taken in, as it changes:
    /// a new value once [`endpoints`](Self::endpoints) shows a new set (for
    /// tests and admin views that wait on discovery).
    pub fn updates(&self) -> watch::Receiver<u64> {
        self.shared.updates.subscribe()
    }

    /// The balancer's name.
    pub fn policy_name(&self) -> &'static str {
        self.shared.balancer.name()
    }

    /// The service followed.
    pub fn service(&self) -> &str {
        &self.shared.service
    }
}

/// What a request owes the endpoint it went to: it is in flight until
/// this is dropped, and its outcome — reported by the response body's end
/// — feeds outlier detection.
pub struct Outcome {
    set: Arc<EndpointSet>,
    index: usize,
}

impl Report for Outcome {
    fn report(self, end: Option<End>) {
        // Dropped before the end says nothing about the endpoint.
        if let Some(end) = end {
            self.set.record(self.index, end.class.is_retryable());
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        self.set.endpoint(self.index).release();
    }
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outcome")
            .field("endpoint", &self.set.endpoint(self.index).address())
            .finish()
    }
}

/// Asks a [`Balanced`] pool for another endpoint than the one at this
/// address when the set has one (in the request's extensions): a retry
/// after that endpoint failed should not go back to it (Envoy's
/// `previous_hosts`, nginx's "next upstream").
#[derive(Debug, Clone)]
pub struct AvoidEndpoint(pub Arc<str>);

/// The endpoint a failed call went to: the source of the error a
/// [`Balanced`] pool returns, so a caller can retry elsewhere
/// ([`AvoidEndpoint`]); its own source is the endpoint service's error.
#[derive(Debug)]
pub struct EndpointFailed {
    /// The endpoint's address.
    pub address: Arc<str>,
    /// What failed.
    pub error: BoxError,
}

impl std::fmt::Display for EndpointFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.address, self.error)
    }
}

impl std::error::Error for EndpointFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.error.as_ref())
    }
}

impl EndpointFailed {
    /// The endpoint that failed somewhere in `error`'s source chain.
    pub fn find<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a EndpointFailed> {
        let mut source = Some(error);
        while let Some(e) = source {
            if let Some(found) = e.downcast_ref::<EndpointFailed>() {
                return Some(found);
            }
            source = e.source();
        }
        None
    }
}

/// The response body of a [`Balanced`] pool: the endpoint's, reporting
/// how it ended.
pub type BalancedBody<B> = Classified<B, Outcome>;

fn unavailable(message: String) -> BalanceError {
    Box::new(Status::unavailable(message))
}

impl<S, B, RB> Service<Request<B>> for Balanced<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Send + 'static,
    RB: http_body::Body + Send + 'static,
{
    type Response = Response<BalancedBody<RB>>;
    type Error = BalanceError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BalanceError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is per endpoint; it is awaited after the pick.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let started = Instant::now();
        let snapshot = self.shared.snapshot.load();
        let key = self
            .shared
            .hash_header
            .as_ref()
            .and_then(|h| request.headers().get(h))
            .map(|v| hash_key(v.as_bytes()));
        let picked = match request.extensions().get::<AvoidEndpoint>() {
            Some(avoid) => snapshot
                .set
                .choose_avoiding(key, nanos_at(started), &avoid.0),
            None => snapshot.set.choose(key, nanos_at(started)),
        };
        let Some(index) = picked else {
            let message = format!("no endpoints for service {}", self.shared.service);
            return Box::pin(std::future::ready(Err(unavailable(message))));
        };
        let service = snapshot.services[index].clone();
        let set = snapshot.set.clone();
        drop(snapshot);
        set.endpoint(index).start();
        let outcome = Outcome { set, index };
        Box::pin(async move {
            let endpoint = outcome.set.endpoint(outcome.index);
            match service.oneshot(request).await {
                Ok(response) => {
                    // Latency at the head: time to first byte, for streams too.
                    endpoint.observe(started.elapsed());
                    let (parts, body) = response.into_parts();
                    let body = Classified::new(parts.status, &parts.headers, body, outcome);
                    Ok(Response::from_parts(parts, body))
                }
                Err(error) => {
                    // A refused connection fails fast; without a penalty
                    // p2c would prefer the dead endpoint until it is ejected.
                    endpoint.observe(FAILURE_PENALTY);
                    outcome.set.record(outcome.index, true);
                    let error: BoxError = error.into();
                    let mut status = Status::unavailable(format!(
                        "{} at {}: {error}",
                        outcome.set.service,
                        endpoint.address()
                    ));
                    // The cause stays reachable (a proxy tells a body it
                    // refused from an endpoint that failed), with the
                    // endpoint (a retry goes elsewhere).
                    status.set_source(std::sync::Arc::new(EndpointFailed {
                        address: Arc::from(endpoint.address()),
                        error,
                    }));
                    Err(Box::new(status) as BalanceError)
                }
            }
        })
    }
}
