//! Upstreams: each a [`Balanced`] pool (the generic balancer, with its
//! outlier ejection) over endpoint services that all share one HTTP
//! client, so every worker thread reuses the same kept-alive connections
//! (one pool keyed by scheme and authority, as Pingora found best).
//! Discovered services follow the registry; static targets are a fixed
//! instance set. A reload keeps every upstream whose settings did not
//! change — its pool, outlier state and connections.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response, Uri, uri::Authority};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use tokio::sync::watch;
use tower::{BoxError, Service};
use trellis_balance::{BalanceConfig, Balanced, Policy};
use trellis_registry::{Instance, InstanceSet, ServiceRegistry};

use crate::{GatewayError, config::UpstreamConfig};

/// The one HTTP client every upstream shares: HTTP/1.1 and, for h2c and
/// gRPC upstreams, HTTP/2 with prior knowledge.
#[derive(Clone)]
pub(crate) struct Clients {
    h1: Client<HttpConnector, Incoming>,
    h2: Client<HttpConnector, Incoming>,
}

impl Clients {
    pub(crate) fn new() -> Clients {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.enforce_http(true);
        let mut h1 = Client::builder(TokioExecutor::new());
        h1.pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .pool_timer(TokioTimer::new());
        let mut h2 = Client::builder(TokioExecutor::new());
        h2.http2_only(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_keep_alive_interval(Duration::from_secs(30));
        Clients {
            h1: h1.build(connector.clone()),
            h2: h2.build(connector),
        }
    }
}

/// Talks to one endpoint: aims the request at it and sends it through the
/// shared client.
#[derive(Clone)]
pub(crate) struct EndpointClient {
    clients: Clients,
    authority: Authority,
    h2c: bool,
}

impl Service<Request<Incoming>> for EndpointClient {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let uri = Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query(path)
            .build();
        let uri = match uri {
            Ok(uri) => uri,
            Err(e) => return Box::pin(std::future::ready(Err(e.into()))),
        };
        *req.uri_mut() = uri;
        let h2 = self.h2c || trellis_core::protocol::is_grpc(req.headers());
        let client = if h2 {
            *req.version_mut() = http::Version::HTTP_2;
            self.clients.h2.clone()
        } else {
            *req.version_mut() = http::Version::HTTP_11;
            self.clients.h1.clone()
        };
        Box::pin(async move { client.request(req).await.map_err(BoxError::from) })
    }
}

/// An upstream: its settings and its pool.
pub(crate) struct Upstream {
    config: UpstreamConfig,
    pub(crate) pool: Balanced<EndpointClient>,
}

/// Every upstream of a document, by name.
#[derive(Default)]
pub(crate) struct Upstreams {
    by_name: HashMap<String, Arc<Upstream>>,
}

impl Upstreams {
    /// The upstreams `configs` names, reusing those of `previous` whose
    /// settings are the same.
    pub(crate) async fn build(
        configs: &std::collections::BTreeMap<String, UpstreamConfig>,
        previous: Option<&Upstreams>,
        clients: &Clients,
        registry: Option<&Arc<dyn ServiceRegistry>>,
    ) -> Result<Upstreams, GatewayError> {
        let mut by_name = HashMap::with_capacity(configs.len());
        for (name, config) in configs {
            if let Some(old) = previous.and_then(|p| p.by_name.get(name))
                && old.config == *config
            {
                by_name.insert(name.clone(), old.clone());
                continue;
            }
            let upstream = Upstream::new(name, config, clients, registry).await?;
            by_name.insert(name.clone(), Arc::new(upstream));
        }
        Ok(Upstreams { by_name })
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.by_name.get(name)
    }
}

impl Upstream {
    async fn new(
        name: &str,
        config: &UpstreamConfig,
        clients: &Clients,
        registry: Option<&Arc<dyn ServiceRegistry>>,
    ) -> Result<Upstream, GatewayError> {
        let h2c = config.h2c;
        let clients = clients.clone();
        let connect = move |endpoint: &trellis_balance::Endpoint| {
            let authority: Authority = endpoint.address().parse()?;
            Ok::<_, BoxError>(EndpointClient {
                clients: clients.clone(),
                authority,
                h2c,
            })
        };
        let mut balance = BalanceConfig {
            protocol: config.endpoint.clone().unwrap_or_else(|| "http".into()),
            ..BalanceConfig::default()
        };
        let pool = match &config.discover {
            Some(service) => {
                if let Some(b) = &config.balance {
                    balance.policy = policy(b).map_err(GatewayError::Config)?;
                }
                let registry = registry.ok_or_else(|| {
                    GatewayError::Config(format!(
                        "upstreams.{name}.discover: no registry (start the gateway with --registry)"
                    ))
                })?;
                Balanced::discover(registry.as_ref(), service, balance, connect)
                    .await
                    .map_err(|e| GatewayError::Registry(e.to_string()))?
            }
            None => {
                balance.policy = match &config.balance {
                    Some(b) => policy(b).map_err(GatewayError::Config)?,
                    None => Policy::SmoothWeightedRoundRobin,
                };
                balance.protocol = "http".into();
                let mut instances = Vec::with_capacity(config.targets.len());
                for (i, target) in config.targets.iter().enumerate() {
                    let authority = crate::config::parse_target(&target.url).map_err(|e| {
                        GatewayError::Config(format!("upstreams.{name}.targets.{i}.url: {e}"))
                    })?;
                    instances.push(Instance {
                        id: format!("{name}-{i}"),
                        service: name.to_owned(),
                        version: String::new(),
                        endpoints: [("http".to_owned(), authority.to_string())].into(),
                        zone: String::new(),
                        weight: target.weight,
                        metadata: Default::default(),
                    });
                }
                let set: InstanceSet = instances.into();
                let (_tx, rx) = watch::channel(set);
                Balanced::from_watch(name, rx, balance, connect)
            }
        };
        Ok(Upstream {
            config: config.clone(),
            pool,
        })
    }
}

/// A balancing policy by its config name.
pub(crate) fn policy(name: &str) -> Result<Policy, String> {
    Ok(match name {
        "p2c_ewma" => Policy::P2cEwma,
        "round_robin" => Policy::RoundRobin,
        "weighted_round_robin" => Policy::SmoothWeightedRoundRobin,
        "least_request" => Policy::LeastRequest,
        "random" => Policy::Random,
        header if crate::config::header_name(header).is_ok() && header.contains('-') => {
            Policy::ConsistentHash {
                header: header.to_owned(),
            }
        }
        other => {
            return Err(format!(
                "{other:?}: expected p2c_ewma, round_robin, weighted_round_robin, least_request, random, or a header name (with a dash) to hash on"
            ));
        }
    })
}
