//! The shared-port server: gRPC and HTTP on one listener (steered by
//! content type), health, probes, reflection, the REST face, and an admin
//! listener, all served by [`crate::serve`].

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc};

use axum::response::IntoResponse;
use axum::{Router, extract::DefaultBodyLimit, routing::Route};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tonic::{server::NamedService, service::RoutesBuilder};
use tower::{
    ServiceBuilder,
    layer::util::{Identity, Stack},
};
use tracing::warn;
use trellis_core::{BoxError, Drain, RouteTemplate, Server, ServerFuture, State};

use crate::{
    Limits, ServerConfig, TransportError,
    health::{self, LifecycleHealth},
    steer::Steer,
    timeout::{RequestTimeout, ServerTimeoutLayer},
};

/// Builds a [`GrpcHttpServer`]: add tonic services, descriptor sets for
/// reflection, an axum router and the layers in front of them, then
/// [`bind`](Self::bind). `L` is the layer stack, built like tower's
/// `ServiceBuilder`: the first layer added sees a request first.
pub struct GrpcHttpServerBuilder<L = Identity> {
    config: ServerConfig,
    routes: RoutesBuilder,
    service_names: Vec<String>,
    descriptor_sets: Vec<&'static [u8]>,
    http: Router,
    debug: Router,
    layer: L,
    rest: Option<trellis_transcode::TranscodeOptions>,
}

/// What the user's layers ([`GrpcHttpServerBuilder::layer`]) wrap on a
/// gRPC route: the service with validation (when the protos have rules),
/// the request timeout and the message limit around it. (On an HTTP route
/// they wrap the axum [`Route`] itself.)
pub type GrpcRoute = tower::util::Either<
    trellis_transcode::validate::Validate<
        crate::ServerTimeout<trellis_transcode::framing::MessageLimit<Route>>,
    >,
    crate::ServerTimeout<trellis_transcode::framing::MessageLimit<Route>>,
>;

/// What an axum route accepts as its service (the bounds of
/// `Router::route_layer`), for the services the user's layers make.
pub trait RouteService:
    tower::Service<
        http::Request<axum::body::Body>,
        Error = Infallible,
        Response: IntoResponse + 'static,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> RouteService for T where
    T: tower::Service<
            http::Request<axum::body::Body>,
            Error = Infallible,
            Response: IntoResponse + 'static,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

impl<L> GrpcHttpServerBuilder<L> {
    /// Adds a generated tonic service (e.g. `UserServiceServer::new(svc)`).
    /// Its health status follows the lifecycle under its full name.
    pub fn grpc_service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<http::Request<tonic::body::Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.service_names.push(S::NAME.to_owned());
        self.routes.add_service(service);
        self
    }

    /// Registers an encoded `FileDescriptorSet` (as produced by protox or
    /// `tonic-prost-build`) with the reflection service.
    pub fn file_descriptor_set(mut self, encoded: &'static [u8]) -> Self {
        self.descriptor_sets.push(encoded);
        self
    }

    /// Merges routes into the HTTP side. The probe paths (`/livez`,
    /// `/readyz`, `/startupz`) are reserved.
    pub fn http_router(mut self, router: Router) -> Self {
        self.http = self.http.merge(router);
        self
    }

    /// Puts `layer` in front of the user's gRPC services and HTTP routes
    /// (not health, reflection or probes, which must answer even when a
    /// limit rejects traffic). Layers run in the order they are added, as
    /// with tower's `ServiceBuilder`: the first added sees a request first.
    /// Rejections must be responses, not errors.
    pub fn layer<T>(self, layer: T) -> GrpcHttpServerBuilder<Stack<T, L>> {
        GrpcHttpServerBuilder {
            config: self.config,
            routes: self.routes,
            service_names: self.service_names,
            descriptor_sets: self.descriptor_sets,
            http: self.http,
            debug: self.debug,
            layer: Stack::new(layer, self.layer),
            rest: self.rest,
        }
    }

    /// Serves every gRPC service's REST/JSON face on the same port, from
    /// the `google.api.http` annotations in the registered descriptor sets
    /// (see [`trellis_transcode`]), plus `POST /package.Service/Method` for
    /// every method and the OpenAPI document at `/openapi.json`. REST
    /// requests are matched to their route before any layer runs (layers
    /// see a [`trellis_transcode::MatchedRoute`]), go through the same layers
    /// as the HTTP routes, then to the gRPC services in process. The body
    /// limit is the server's `max_body_bytes`.
    pub fn rest(mut self, options: trellis_transcode::TranscodeOptions) -> Self {
        self.rest = Some(options);
        self
    }

    /// Merges operator routes (`/debug/config`, `/metrics`). They are served
    /// on the admin listener only, never on the main port: without an admin
    /// listener they are not served at all (and a warning says so).
    pub fn debug_router(mut self, router: Router) -> Self {
        self.debug = self.debug.merge(router);
        self
    }

    /// Binds the listeners. A taken or invalid address fails here, before
    /// anything starts.
    pub async fn bind(self) -> Result<GrpcHttpServer, TransportError>
    where
        L: tower::Layer<GrpcRoute> + tower::Layer<Route> + Clone + Send + Sync + 'static,
        <L as tower::Layer<GrpcRoute>>::Service: RouteService,
        <L as tower::Layer<Route>>::Service: RouteService,
    {
        let (probes, probes_rx) = watch::channel(State::Starting);
        let closed = CancellationToken::new();
        let health_service =
            LifecycleHealth::new(&self.service_names, probes_rx.clone(), closed.clone());

        let reflection = || {
            self.descriptor_sets.iter().fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
                |b, fds| b.register_encoded_file_descriptor_set(fds),
            )
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| TransportError::Reflection(e.to_string()))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| TransportError::Reflection(e.to_string()))?;
        let reflection_on = self.config.reflection;

        // Layers wrap the user's routes only: health, reflection and the
        // probes must answer even when a limit or breaker rejects traffic.
        // They are layered from the inside out (the last layer added runs
        // first): the request timeout nearest the handler, so every layer
        // above (metrics, traces, limits) sees a timed-out request answered,
        // not dropped.
        let timeout = RequestTimeout::new(self.config.limits.request_timeout);
        let raw_grpc = self.routes.routes();
        let mut user_grpc = raw_grpc.clone();
        let mut validate = None;
        let mut user_http = self.http;
        if user_http.has_routes() {
            user_http = user_http.route_layer(ServerTimeoutLayer::new(timeout.clone()));
        }
        let mut route_match = None;
        if let Some(mut options) = self.rest {
            options.max_body_bytes = self.config.limits.max_body_bytes;
            let names: Vec<&str> = self.service_names.iter().map(String::as_str).collect();
            let transcoder =
                trellis_transcode::Transcoder::with_options(&self.descriptor_sets, &names, options)
                    .map_err(|e| TransportError::Transcode(e.to_string()))?;
            let openapi = trellis_transcode::openapi(&transcoder);
            route_match = Some(transcoder.route_layer());
            // The gRPC face checks the same rules the REST face does.
            if let Some(validator) = transcoder.validator() {
                validate = Some(trellis_transcode::validate::ValidateLayer::new(
                    transcoder.pool(),
                    validator.clone(),
                    self.config.limits.max_body_bytes,
                ));
            }
            // The services themselves, not their layered routes: a REST
            // request is limited and measured once, as HTTP.
            let rest = ServiceBuilder::new()
                .layer(ServerTimeoutLayer::new(timeout.clone()))
                .map_response(IntoResponse::into_response)
                .service(transcoder.service(tower::ServiceExt::map_request(
                    raw_grpc.prepare().into_axum_router(),
                    forget_matched_path,
                )));
            user_http = user_http
                .route(
                    "/openapi.json",
                    axum::routing::get(move || {
                        let doc = openapi.clone();
                        async move { axum::Json(doc) }
                    }),
                )
                .route_service("/{*path}", rest);
        }
        // The user's gRPC services, one layered service per route (each
        // `route_layer` would box and clone per request): the user's stack;
        // the same rules the REST face checks; the request timeout; every
        // request message held to the body limit, on the wire.
        if user_grpc.axum_router_mut().has_routes() {
            let inner = ServiceBuilder::new()
                .option_layer(validate)
                .layer(ServerTimeoutLayer::new(timeout.clone()))
                .layer(trellis_transcode::framing::MessageLimitLayer::new(
                    self.config.limits.max_body_bytes,
                ));
            let stack = self.layer.clone();
            let router = std::mem::take(user_grpc.axum_router_mut());
            *user_grpc.axum_router_mut() =
                router.route_layer(tower::layer::layer_fn(move |route: Route| {
                    let route: GrpcRoute = inner.service(route);
                    tower::Layer::<GrpcRoute>::layer(&stack, route)
                }));
        }
        // The HTTP routes: the route is known before any layer runs, so
        // limits, metrics and traces see its template — a REST route's,
        // matched by the transcoder's table, or an axum route's — then the
        // user's stack.
        if user_http.has_routes() {
            let stack = self.layer.clone();
            user_http = user_http.route_layer(tower::layer::layer_fn(move |route: Route| {
                ServiceBuilder::new()
                    .option_layer(route_match.clone())
                    .map_request(name_axum_route)
                    .service(tower::Layer::<Route>::layer(&stack, route))
            }));
        }
        let grpc_routes = Arc::new(grpc_routes(&self.descriptor_sets, &self.service_names));
        let mut grpc = user_grpc.add_service(health_service);
        if reflection_on {
            grpc = grpc
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha);
        }
        let grpc = grpc.prepare().into_axum_router();

        let http = user_http.merge(health::probe_router(probes_rx.clone()));
        let mut admin_http = health::probe_router(probes_rx);
        if self.config.admin_listen.is_some() {
            admin_http = admin_http.merge(self.debug);
        } else if self.debug.has_routes() {
            warn!(
                "operator routes (/metrics, /debug/config) are served on an admin listener only; none is configured"
            );
        }
        let http = http.layer(DefaultBodyLimit::max(self.config.limits.max_body_bytes));

        let listener = bind(self.config.listen).await?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| TransportError::Bind {
                addr: self.config.listen,
                source,
            })?;
        let admin = match self.config.admin_listen {
            Some(addr) => {
                let l = bind(addr).await?;
                let a = l
                    .local_addr()
                    .map_err(|source| TransportError::Bind { addr, source })?;
                Some((l, a))
            }
            None => None,
        };
        let admin_addr = admin.as_ref().map(|(_, a)| *a);

        Ok(GrpcHttpServer {
            listener,
            local_addr,
            admin,
            admin_addr,
            steer: Steer {
                grpc,
                http,
                peer: None,
                grpc_routes,
            },
            admin_steer: Steer {
                grpc: tonic::service::Routes::default().into_axum_router(),
                http: admin_http,
                peer: None,
                grpc_routes: Arc::default(),
            },
            timeout,
            probes,
            closed,
            service_names: self.service_names,
            limits: self.config.limits,
            #[cfg(feature = "tls")]
            tls: self.config.tls,
        })
    }
}

/// Names an axum route by its path pattern (`/users/{id}`), unless a router
/// before it named the request already. (A plain function, not an axum
/// middleware: nothing is boxed per request.)
fn name_axum_route(mut req: http::Request<axum::body::Body>) -> http::Request<axum::body::Body> {
    if req.extensions().get::<RouteTemplate>().is_none()
        && let Some(path) = req.extensions().get::<axum::extract::MatchedPath>()
    {
        let template = RouteTemplate(path.as_str().into());
        req.extensions_mut().insert(template);
    }
    req
}

/// The REST face's own route (`/{*path}`) is not the gRPC route's parent:
/// without this the gRPC router would join the two into a nested path (an
/// allocation per request, and a wrong name).
fn forget_matched_path(
    mut req: http::Request<trellis_transcode::UpstreamBody>,
) -> http::Request<trellis_transcode::UpstreamBody> {
    req.extensions_mut().remove::<axum::extract::MatchedPath>();
    req
}

/// `/package.Service/Method` of every method of the served gRPC services
/// found in the descriptor sets: the routes gRPC requests are labelled by
/// (a method not in it is `_OTHER` to metrics).
fn grpc_routes(descriptor_sets: &[&[u8]], services: &[String]) -> HashMap<Box<str>, RouteTemplate> {
    let mut pool = prost_reflect::DescriptorPool::new();
    for set in descriptor_sets {
        // A set that does not decode fails the transcoder and reflection
        // builds with a clear error; here it only means fewer labels.
        let _ = pool.decode_file_descriptor_set(*set);
    }
    trellis_transcode::grpc_methods(&pool)
        .into_keys()
        .filter(|path| {
            services.iter().any(|s| {
                path.strip_prefix('/')
                    .and_then(|p| p.strip_prefix(s.as_str()))
                    .is_some_and(|r| r.starts_with('/'))
            })
        })
        .map(|path| {
            let template = RouteTemplate(path.as_str().into());
            (path.into_boxed_str(), template)
        })
        .collect()
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, TransportError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| TransportError::Bind { addr, source })
}

/// gRPC and HTTP on one bound port (plus an optional admin port), ready to
/// be run by a `trellis::App` (it implements [`trellis_core::Server`]).
pub struct GrpcHttpServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    admin: Option<(TcpListener, SocketAddr)>,
    admin_addr: Option<SocketAddr>,
    steer: Steer,
    admin_steer: Steer,
    timeout: RequestTimeout,
    probes: watch::Sender<State>,
    closed: CancellationToken,
    service_names: Vec<String>,
    limits: Limits,
    #[cfg(feature = "tls")]
    tls: Option<std::sync::Arc<arc_swap::ArcSwap<rustls::ServerConfig>>>,
}

impl GrpcHttpServer {
    /// Starts building a server.
    pub fn builder(config: ServerConfig) -> GrpcHttpServerBuilder {
        GrpcHttpServerBuilder {
            config,
            routes: RoutesBuilder::default(),
            service_names: Vec::new(),
            descriptor_sets: Vec::new(),
            http: Router::new(),
            debug: Router::new(),
            layer: Identity::new(),
            rest: None,
        }
    }

    /// The bound address of the main (gRPC + HTTP) listener.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound address of the admin listener, if one was configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The request timeout, adjustable while the server runs.
    pub fn request_timeout(&self) -> RequestTimeout {
        self.timeout.clone()
    }

    /// The full names of the gRPC services this server reports health for.
    pub fn service_names(&self) -> &[String] {
        &self.service_names
    }
}

impl Server for GrpcHttpServer {
    fn describe(&self) -> String {
        match self.admin_addr {
            Some(admin) => format!("grpc+http {} (admin {admin})", self.local_addr),
            None => format!("grpc+http {}", self.local_addr),
        }
    }

    fn endpoints(&self) -> Vec<(String, SocketAddr)> {
        vec![
            ("grpc".to_owned(), self.local_addr),
            ("http".to_owned(), self.local_addr),
        ]
    }

    fn serve(self: Box<Self>, lifecycle: watch::Receiver<State>, drain: Drain) -> ServerFuture {
        Box::pin(async move {
            let this = *self;
            tokio::spawn(follow_lifecycle(lifecycle, this.probes));
            let (closed, watching) = (this.closed, drain.clone());
            tokio::spawn(async move {
                watching.started().await;
                closed.cancel();
            });
            let (steer, admin_steer) = (this.steer, this.admin_steer);
            #[cfg(feature = "tls")]
            let tls = this.tls;
            #[cfg(not(feature = "tls"))]
            let tls = None;
            let main = crate::serve::serve_with(
                this.listener,
                move |peer| Steer {
                    peer: Some(peer),
                    ..steer.clone()
                },
                &this.limits,
                drain.clone(),
                tls.clone(),
            );
            match this.admin {
                Some((listener, _)) => {
                    let admin = crate::serve::serve_with(
                        listener,
                        move |peer| Steer {
                            peer: Some(peer),
                            ..admin_steer.clone()
                        },
                        &this.limits,
                        drain,
                        tls,
                    );
                    tokio::join!(main, admin);
                }
                None => main.await,
            }
            Ok::<(), BoxError>(())
        })
    }
}

/// Mirrors the instance lifecycle into the server's own state channel (read
/// by probes and gRPC health) until the lifecycle's owner goes away.
async fn follow_lifecycle(mut lifecycle: watch::Receiver<State>, probes: watch::Sender<State>) {
    loop {
        let state = *lifecycle.borrow_and_update();
        probes.send_replace(state);
        if state == State::Stopped || lifecycle.changed().await.is_err() {
            return;
        }
    }
}
