//! Who may call what, and the tower layer that enforces it on a service's
//! HTTP routes and gRPC methods.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{HeaderMap, Request, Response};
use tower::{Layer, Service};
use trellis_core::{Error, protocol::is_grpc};

use crate::{Claims, Refusal, Verifier, verify::forbidden};

/// What a call needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Access {
    /// Anyone; a token that comes is still verified (a bad one is refused)
    /// and its claims passed on.
    Public,
    /// A valid token.
    #[default]
    Authenticated,
    /// A valid token granting every one of these (roles, permissions or
    /// scopes).
    Require(Vec<String>),
}

impl Access {
    /// Decides for a request's `headers`: the claims of its token (`None`
    /// for a public call without one), or the answer refusing it —
    /// 401 with `WWW-Authenticate`, 403 naming the missing permission, 503
    /// while no keys could be fetched. The one decision the service layer
    /// and the gateway both make.
    pub async fn check(
        &self,
        verifier: &Verifier,
        headers: &HeaderMap,
    ) -> Result<Option<Arc<Claims>>, Error> {
        let realm = &verifier.config().realm;
        let decided = match verifier.verify_headers(headers).await {
            Ok(Some(claims)) => match self {
                Access::Require(required) => match claims.missing(required) {
                    Some(missing) => Err(forbidden(realm, missing)),
                    None => Ok(Some(claims)),
                },
                _ => Ok(Some(claims)),
            },
            Ok(None) if *self == Access::Public => Ok(None),
            Ok(None) => Err(Refusal::Missing.to_error(realm)),
            Err(refusal) => Err(refusal.to_error(realm)),
        };
        let outcome = match &decided {
            Ok(Some(_)) => "allowed",
            Ok(None) => "anonymous",
            Err(e) if e.code() == tonic::Code::PermissionDenied => "forbidden",
            Err(e) if e.code() == tonic::Code::Unavailable => "unavailable",
            Err(_) => "refused",
        };
        metrics::counter!("auth_decisions_total", "outcome" => outcome).increment(1);
        decided
    }
}

/// Access rules by path: exact paths (`/shop.order.v1.Orders/Create`,
/// `/v1/orders`) and prefixes ending in `*` (`/shop.order.v1.Orders/*`,
/// `/admin/*`); the exact rule wins, then the longest prefix, then the
/// default — [`Access::Authenticated`]: what is not opened explicitly is
/// protected.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    exact: HashMap<String, Access>,
    /// Longest first.
    prefixes: Vec<(String, Access)>,
    default: Access,
    /// Paths (exact, or prefixes ending in `*`) only some peers may call.
    peers: Vec<(String, Vec<String>)>,
}

impl Policy {
    /// Every call needs a valid token unless a rule says otherwise.
    pub fn new() -> Policy {
        Policy::default()
    }

    /// What a path no rule names needs.
    pub fn default_access(mut self, access: Access) -> Policy {
        self.default = access;
        self
    }

    /// A rule for `pattern` (exact, or a prefix ending in `*`).
    pub fn rule(mut self, pattern: impl Into<String>, access: Access) -> Policy {
        let pattern = pattern.into();
        match pattern.strip_suffix('*') {
            Some(prefix) => {
                self.prefixes.retain(|(p, _)| p != prefix);
                self.prefixes.push((prefix.to_owned(), access));
                self.prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
            }
            None => {
                self.exact.insert(pattern, access);
            }
        }
        self
    }

    /// Only the services named (by their mTLS identity, see
    /// [`trellis_core::PeerIdentity::name`]) may call `pattern` (exact, or
    /// a prefix ending in `*`).
    pub fn peers(mut self, pattern: impl Into<String>, allowed: Vec<String>) -> Policy {
        let pattern = pattern.into();
        self.peers.retain(|(p, _)| *p != pattern);
        self.peers.push((pattern, allowed));
        // Exact rules, then longer prefixes, first.
        self.peers
            .sort_by_key(|(p, _)| (p.ends_with('*'), std::cmp::Reverse(p.len())));
        self
    }

    /// The services allowed to call `path`, if a rule limits them.
    pub fn allowed_peers(&self, path: &str) -> Option<&[String]> {
        self.peers
            .iter()
            .find(|(p, _)| match p.strip_suffix('*') {
                Some(prefix) => path.starts_with(prefix),
                None => p == path,
            })
            .map(|(_, allowed)| allowed.as_slice())
    }

    /// What a call to `path` needs.
    pub fn access(&self, path: &str) -> &Access {
        if let Some(access) = self.exact.get(path) {
            return access;
        }
        self.prefixes
            .iter()
            .find(|(p, _)| path.starts_with(p.as_str()))
            .map_or(&self.default, |(_, a)| a)
    }
}

/// The client's address, when the server recorded it.
fn client_ip<B>(req: &Request<B>) -> Option<String> {
    req.extensions()
        .get::<trellis_core::PeerAddr>()
        .map(|p| p.0.ip().to_string())
}

/// The calling service's mTLS identity, when it showed a certificate.
fn peer<B>(req: &Request<B>) -> Option<String> {
    req.extensions()
        .get::<trellis_core::PeerIdentity>()
        .map(|p| crate::audit::bounded(&p.0))
}

/// 403 for a caller whose certificate does not name an allowed service.
fn peer_refused(who: Option<&str>) -> Error {
    Error::new(
        tonic::Code::PermissionDenied,
        "PEER_NOT_ALLOWED",
        match who {
            Some(who) => format!("{who} may not call this method"),
            None => {
                "this method is for named services only: call with a client certificate".to_owned()
            }
        },
    )
    .with_metadata("peer", who.unwrap_or("none"))
}

/// The longest subject or tenant put in baggage (W3C baggage is bounded).
const MAX_BAGGAGE_VALUE: usize = 256;

/// The current context with the caller's identity as baggage:
/// `enduser.id` (the subject, OpenTelemetry's name for it) and `tenant`.
pub fn with_identity(claims: &Claims) -> opentelemetry::Context {
    use opentelemetry::{KeyValue, baggage::BaggageExt as _};
    let bounded = |v: &str| v.chars().take(MAX_BAGGAGE_VALUE).collect::<String>();
    let mut pairs = vec![KeyValue::new("enduser.id", bounded(&claims.sub))];
    if let Some(tenant) = &claims.tenant {
        pairs.push(KeyValue::new("tenant", bounded(tenant)));
    }
    opentelemetry::Context::current_with_baggage(pairs)
}

/// Verifies bearer tokens and applies a [`Policy`] in front of a service:
/// the claims go into the request's extensions (`Arc<Claims>`) and the
/// subject and tenant into its context's baggage ([`with_identity`]), a refusal
/// is answered in the caller's protocol (a gRPC status for gRPC calls).
#[derive(Clone)]
pub struct AuthLayer {
    verifier: Arc<Verifier>,
    policy: Arc<Policy>,
    audit: Option<Arc<crate::audit::Recorder>>,
}

impl AuthLayer {
    /// The layer for `verifier` and `policy`.
    pub fn new(verifier: Arc<Verifier>, policy: Policy) -> AuthLayer {
        AuthLayer {
            verifier,
            policy: Arc::new(policy),
            audit: None,
        }
    }

    /// Records decisions in `audit`: every refusal (capped per second), and
    /// every call that passed a rule requiring permissions or that changes
    /// something over HTTP (POST, PUT, PATCH, DELETE), with its outcome.
    pub fn with_audit(mut self, audit: Arc<crate::audit::Recorder>) -> AuthLayer {
        self.audit = Some(audit);
        self
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            verifier: self.verifier.clone(),
            policy: self.policy.clone(),
            audit: self.audit.clone(),
        }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    verifier: Arc<Verifier>,
    policy: Arc<Policy>,
    audit: Option<Arc<crate::audit::Recorder>>,
}

impl<S, B, RB> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    B: Send + 'static,
    RB: Default + From<String> + Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // The clone waits for its own readiness; this one was made ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let verifier = self.verifier.clone();
        let policy = self.policy.clone();
        let audit = self.audit.clone();
        Box::pin(async move {
            // A REST call transcoded to a gRPC method is judged as that
            // method: one rule covers both faces.
            let path: std::borrow::Cow<'_, str> =
                match req.extensions().get::<trellis_transcode::MatchedRoute>() {
                    Some(route) => std::borrow::Cow::Owned(format!(
                        "/{}/{}",
                        route.rpc().parent_service().full_name(),
                        route.rpc().name()
                    )),
                    None => std::borrow::Cow::Borrowed(req.uri().path()),
                };
            let access = policy.access(&path);
            let grpc = is_grpc(req.headers());
            if let Some(allowed) = policy.allowed_peers(&path) {
                let identity = req.extensions().get::<trellis_core::PeerIdentity>();
                if !identity.is_some_and(|id| allowed.iter().any(|a| a == id.name())) {
                    let who = identity.map(|id| id.name().to_owned());
                    if let Some(recorder) = &audit {
                        let entry = crate::audit::Entry {
                            client_ip: client_ip(&req),
                            peer: peer(&req),
                            trace_id: crate::audit::current_trace_id(),
                            resource: Some(crate::audit::bounded(req.uri().path())),
                            ..crate::audit::Entry::new(
                                "forbidden",
                                crate::audit::bounded(&path),
                                format!("refused: peer {}", who.as_deref().unwrap_or("none")),
                            )
                        };
                        recorder.record(entry, true).await;
                    }
                    return Ok(peer_refused(who.as_deref()).to_response(grpc));
                }
            }
            match access.check(&verifier, req.headers()).await {
                Ok(Some(claims)) => {
                    let audited = audit.as_ref().filter(|_| {
                        matches!(access, Access::Require(_))
                            || (!grpc
                                && matches!(
                                    *req.method(),
                                    http::Method::POST
                                        | http::Method::PUT
                                        | http::Method::PATCH
                                        | http::Method::DELETE
                                ))
                    });
                    let entry = audited.map(|_| crate::audit::Entry {
                        subject: Some(claims.sub.clone()),
                        tenant: claims.tenant.clone(),
                        client_ip: client_ip(&req),
                        peer: peer(&req),
                        trace_id: crate::audit::current_trace_id(),
                        resource: Some(crate::audit::bounded(req.uri().path())),
                        ..crate::audit::Entry::new(
                            "call",
                            crate::audit::bounded(&path),
                            String::new(),
                        )
                    });
                    // Who is calling goes on with the request's context:
                    // into every log line and, as baggage, to the calls
                    // this one makes.
                    let cx = with_identity(&claims);
                    req.extensions_mut().insert(claims);
                    let result =
                        opentelemetry::context::FutureExt::with_context(inner.call(req), cx).await;
                    if let (Some(recorder), Some(mut entry)) = (audited, entry) {
                        entry.outcome = match &result {
                            Ok(response) if grpc => format!(
                                "grpc-status {}",
                                response
                                    .headers()
                                    .get("grpc-status")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("0")
                            ),
                            Ok(response) => response.status().as_u16().to_string(),
                            Err(_) => "failed".to_owned(),
                        };
                        recorder.record(entry, false).await;
                    }
                    result
                }
                Ok(None) => inner.call(req).await,
                Err(error) => {
                    if let Some(recorder) = &audit {
                        let forbidden = error.code() == tonic::Code::PermissionDenied;
                        let why = error
                            .metadata()
                            .get(if forbidden { "permission" } else { "why" })
                            .map_or("missing", String::as_str);
                        let entry = crate::audit::Entry {
                            client_ip: client_ip(&req),
                            peer: peer(&req),
                            trace_id: crate::audit::current_trace_id(),
                            resource: Some(crate::audit::bounded(req.uri().path())),
                            ..crate::audit::Entry::new(
                                if forbidden {
                                    "forbidden"
                                } else {
                                    "token_refused"
                                },
                                crate::audit::bounded(&path),
                                format!("refused: {why}"),
                            )
                        };
                        recorder.record(entry, true).await;
                    }
                    Ok(error.to_response(grpc))
                }
            }
        })
    }
}
