//! The compiled route table: the document's routes indexed by host and by
//! path in the transcoder's [`RouteTable`] (a segment trie — no linear
//! scan), each candidate then filtered by its header and query matchers.
//!
//! Order: hosts first — an exact host's routes, then wildcard hosts
//! (`*.example.com`, the longest suffix first), then routes for any host;
//! within them the highest `priority`, then the most specific path (more
//! literal segments; exact before template before prefix), then the name.

use std::{collections::HashMap, sync::Arc, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use trellis_config::Invalid;
use trellis_transcode::{PathTemplate, RouteTable};

use trellis_resilience::{
    Breaker, BreakerConfig,
    rate_limit::{Decision, LocalLimiter, Quota},
    retry::RetryBudget,
};

use crate::config::{
    CircuitBreakerConfig, CorsConfig, Defaults, GatewayConfig, HeaderRules, RateLimitConfig,
    RouteConfig, header_name, header_value, method,
};

/// Methods a route without `methods` answers. (CONNECT and TRACE are never
/// proxied.)
const ANY_METHOD: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::OPTIONS,
];

/// The routes, compiled. Immutable; a reload builds a new one.
pub(crate) struct Table {
    /// The document's settings for every route.
    pub(crate) defaults: Defaults,
    routes: Vec<Route>,
    exact_hosts: HashMap<String, RouteTable<Vec<usize>>>,
    /// (suffix with its dot, `.example.com`; table), longest first.
    wildcard_hosts: Vec<(String, RouteTable<Vec<usize>>)>,
    any_host: RouteTable<Vec<usize>>,
    /// `[jwt]`, for routes with `jwt`.
    pub(crate) jwt: Option<Arc<crate::jwt::GatewayJwt>>,
    /// `[listener] trusted_proxies`.
    pub(crate) trusted: TrustedProxies,
}

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Default)]
pub(crate) struct TrustedProxies(Vec<Cidr>);

/// The most `X-Forwarded-For` entries looked at, nearest first.
const MAX_FORWARDED_HOPS: usize = 16;

impl TrustedProxies {
    /// The client behind `peer`: `peer` itself unless it is a trusted
    /// proxy, else the nearest untrusted address `X-Forwarded-For` names
    /// (the farthest trusted one when all are, `peer` when the header is
    /// missing or unreadable).
    pub(crate) fn client(
        &self,
        peer: Option<std::net::IpAddr>,
        headers: &HeaderMap,
    ) -> Option<std::net::IpAddr> {
        let trusted = |ip: std::net::IpAddr| self.0.iter().any(|c| c.contains(ip));
        let mut client = peer?;
        if self.0.is_empty() || !trusted(client) {
            return Some(client);
        }
        // Every header line, right to left: the nearest hop last.
        let mut hops = Vec::new();
        for value in headers.get_all(X_FORWARDED_FOR) {
            let Ok(text) = value.to_str() else {
                return Some(client);
            };
            hops.extend(text.split(','));
        }
        for hop in hops.iter().rev().take(MAX_FORWARDED_HOPS) {
            match hop.trim().parse::<std::net::IpAddr>() {
                Ok(ip) => {
                    client = ip;
                    if !trusted(ip) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        Some(client)
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// One compiled route.
pub(crate) struct Route {
    /// Its name in the document: a bounded label for metrics.
    pub(crate) name: Arc<str>,
    priority: i32,
    headers: Vec<(HeaderName, HeaderValue)>,
    query: Vec<(String, String)>,
    cookies: Vec<(String, String)>,
    /// Where it goes.
    pub(crate) targets: Targets,
    pub(crate) strip_prefix: Option<String>,
    pub(crate) add_prefix: Option<String>,
    pub(crate) preserve_host: bool,
    pub(crate) request_headers: Rules,
    pub(crate) response_headers: Rules,
    pub(crate) timeout: Duration,
    /// The whole exchange, body included.
    pub(crate) total_timeout: Option<Duration>,
    /// How long an upgraded connection (WebSocket) may carry nothing.
    pub(crate) idle_timeout: Duration,
    pub(crate) rate_limit: Option<RouteLimit>,
    pub(crate) retry: RouteRetry,
    /// JSON → gRPC for REST calls on this route.
    pub(crate) transcoder: Option<trellis_transcode::Transcoder>,
    /// What it was made from; with `reflection`, the transcoder comes once
    /// the upstreams run ([`Table::resolve_reflection`]).
    transcode: Option<crate::config::TranscodeConfig>,
    pub(crate) cors: Option<Cors>,
    pub(crate) ips: IpRules,
    pub(crate) breaker: Option<RouteBreaker>,
    /// What the route's `jwt` asks of a token.
    pub(crate) jwt: Option<trellis_auth::Access>,
    /// The plugins' names, and the plugins once resolved.
    plugin_names: Vec<String>,
    pub(crate) plugins: Vec<Arc<dyn crate::Plugin>>,
}

/// A route's circuit breaker and the settings it was made from.
pub(crate) struct RouteBreaker {
    config: CircuitBreakerConfig,
    pub(crate) breaker: Arc<Breaker>,
    pub(crate) open_duration: Duration,
}

/// A compiled CORS policy.
pub(crate) struct Cors {
    any_origin: bool,
    origins: Vec<HeaderValue>,
    methods: HeaderValue,
    headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    credentials: bool,
    max_age: HeaderValue,
}

impl Cors {
    fn compile(c: &CorsConfig, key: &dyn Fn(&str) -> String) -> Result<Cors, Invalid> {
        let join = |field: &str, items: &[String]| -> Result<Option<HeaderValue>, Invalid> {
            if items.is_empty() {
                return Ok(None);
            }
            header_value(&items.join(", "))
                .map(Some)
                .map_err(|e| Invalid::new(key(field), e))
        };
        let any_origin = c.allow_origins.iter().any(|o| o == "*");
        if c.allow_origins.is_empty() {
            return Err(Invalid::new(
                key("cors.allow_origins"),
                "name the origins, or [\"*\"]",
            ));
        }
        let origins = c
            .allow_origins
            .iter()
            .filter(|o| *o != "*")
            .map(|o| header_value(o).map_err(|e| Invalid::new(key("cors.allow_origins"), e)))
            .collect::<Result<_, _>>()?;
        for m in &c.allow_methods {
            method(m).map_err(|e| Invalid::new(key("cors.allow_methods"), e))?;
        }
        Ok(Cors {
            any_origin,
            origins,
            methods: join("cors.allow_methods", &c.allow_methods)?
                .unwrap_or(HeaderValue::from_static("GET")),
            headers: join("cors.allow_headers", &c.allow_headers)?,
            expose: join("cors.expose_headers", &c.expose_headers)?,
            credentials: c.allow_credentials,
            max_age: HeaderValue::from(c.max_age.as_secs()),
        })
    }

    /// Whether `origin` may call.
    pub(crate) fn allows(&self, origin: &HeaderValue) -> bool {
        self.any_origin || self.origins.iter().any(|o| o == origin)
    }

    /// The headers of an answer to an allowed origin.
    pub(crate) fn answer(&self, origin: &HeaderValue, headers: &mut HeaderMap) {
        use http::header::{
            ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_ORIGIN,
            ACCESS_CONTROL_EXPOSE_HEADERS, VARY,
        };
        let echo = !self.any_origin || self.credentials;
        headers.insert(
            ACCESS_CONTROL_ALLOW_ORIGIN,
            if echo {
                origin.clone()
            } else {
                HeaderValue::from_static("*")
            },
        );
        if echo {
            headers.append(VARY, HeaderValue::from_static("origin"));
        }
        if self.credentials {
            headers.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(expose) = &self.expose {
            headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
    }

    /// The headers of a preflight's answer; `asked` is the browser's
    /// `Access-Control-Request-Headers`.
    pub(crate) fn preflight(
        &self,
        origin: &HeaderValue,
        asked: Option<&HeaderValue>,
        headers: &mut HeaderMap,
    ) {
        use http::header::{
            ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_MAX_AGE,
        };
        self.answer(origin, headers);
        headers.insert(ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone());
        if let Some(allowed) = self.headers.as_ref().or(asked) {
            headers.insert(ACCESS_CONTROL_ALLOW_HEADERS, allowed.clone());
        }
        headers.insert(ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
    }
}

/// Client address rules.
#[derive(Default)]
pub(crate) struct IpRules {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
}

impl IpRules {
    /// Whether `ip` may use the route.
    pub(crate) fn permits(&self, ip: Option<std::net::IpAddr>) -> bool {
        if self.allow.is_empty() && self.deny.is_empty() {
            return true;
        }
        let Some(ip) = ip else { return false };
        !self.deny.iter().any(|c| c.contains(ip))
            && (self.allow.is_empty() || self.allow.iter().any(|c| c.contains(ip)))
    }
}

/// An address block: `10.0.0.0/8`, `2001:db8::/32`, or one address.
struct Cidr {
    net: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let net: std::net::IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an address or block"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix must be 0..={max}"))?,
            None => max,
        };
        Ok(Cidr { net, prefix })
    }

    fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// A route's retry policy and budget.
pub(crate) struct RouteRetry {
    pub(crate) attempts: u32,
    pub(crate) on_status: Vec<u16>,
    pub(crate) budget: RetryBudget,
}

/// A route's limiter and whose budget a request spends.
pub(crate) struct RouteLimit {
    config: RateLimitConfig,
    limiter: RouteLimiter,
    by: LimitBy,
}

/// In this process, or shared through Redis.
#[derive(Clone)]
enum RouteLimiter {
    Local(Arc<LocalLimiter>),
    #[cfg(feature = "redis")]
    Redis(Arc<trellis_resilience::redis_limit::RedisLimiter>),
}

impl RouteLimit {
    /// Spends one request of the budget `headers` and `peer` select.
    pub(crate) async fn check(
        &self,
        headers: &HeaderMap,
        peer: Option<&HeaderValue>,
        subject: Option<&str>,
    ) -> Decision {
        let client_ip = || peer.and_then(|p| p.to_str().ok()).unwrap_or("unknown");
        let key = match &self.by {
            LimitBy::Route => None,
            LimitBy::ClientIp => Some(client_ip()),
            // One budget per subject; anonymous callers (an optional
            // token) by address, in a space no subject can name.
            LimitBy::Subject => Some(subject.unwrap_or_else(|| client_ip())),
            LimitBy::Header(name) => Some(
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or(""),
            ),
        };
        match &self.limiter {
            RouteLimiter::Local(l) => l.check(key),
            #[cfg(feature = "redis")]
            RouteLimiter::Redis(r) => {
                trellis_resilience::rate_limit::Limiter::check(&**r, key).await
            }
        }
    }
}

pub(crate) enum LimitBy {
    Route,
    ClientIp,
    Subject,
    Header(HeaderName),
}

/// Keys a per-client limiter tracks at most (least recently seen go first).
const MAX_LIMIT_KEYS: usize = 100_000;

/// A route's upstream, or a weighted split between several.
pub(crate) enum Targets {
    One(Arc<str>),
    Split {
        /// (upstream, cumulative weight).
        choices: Vec<(Arc<str>, u32)>,
        total: u32,
    },
}

impl Targets {
    /// Whether both name the same single upstream.
    fn same(&self, other: &Targets) -> bool {
        matches!((self, other), (Targets::One(a), Targets::One(b)) if a == b)
    }

    /// The upstream for a request, given a uniform random number.
    pub(crate) fn pick(&self, random: u32) -> &Arc<str> {
        match self {
            Targets::One(name) => name,
            Targets::Split { choices, total } => {
                let at = random % (*total).max(1);
                choices
                    .iter()
                    .find(|(_, upto)| at < *upto)
                    .or(choices.last())
                    .map(|(name, _)| name)
                    .unwrap_or_else(|| &choices[0].0)
            }
        }
    }
}

/// Compiled header changes.
#[derive(Default)]
pub(crate) struct Rules {
    remove: Vec<HeaderName>,
    /// (from, to).
    rename: Vec<(HeaderName, HeaderName)>,
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
}

impl Rules {
    fn compile(rules: &HeaderRules, key: &dyn Fn(&str) -> String) -> Result<Rules, Invalid> {
        let name =
            |field: &str, text: &str| header_name(text).map_err(|e| Invalid::new(key(field), e));
        let value =
            |field: &str, text: &str| header_value(text).map_err(|e| Invalid::new(key(field), e));
        let mut out = Rules::default();
        for h in &rules.remove {
            out.remove.push(name("remove", h)?);
        }
        for (from, to) in &rules.rename {
            out.rename
                .push((name("rename", from)?, name(&format!("rename.{from}"), to)?));
        }
        for (h, v) in &rules.set {
            out.set
                .push((name("set", h)?, value(&format!("set.{h}"), v)?));
        }
        for (h, v) in &rules.add {
            out.add
                .push((name("add", h)?, value(&format!("add.{h}"), v)?));
        }
        Ok(out)
    }

    /// Applies the changes: remove, rename, set, add.
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (from, to) in &self.rename {
            // Every value moves, in order; what `to` held goes.
            if let http::header::Entry::Occupied(entry) = headers.entry(from) {
                let values: Vec<HeaderValue> = entry.remove_entry_mult().1.collect();
                headers.remove(to);
                for value in values {
                    headers.append(to.clone(), value);
                }
            }
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.remove.is_empty()
            && self.rename.is_empty()
            && self.set.is_empty()
            && self.add.is_empty()
    }
}

/// A route a request matched.
pub(crate) struct Matched<'a> {
    pub(crate) route: &'a Route,
}

impl Table {
    /// Compiles `config`; an error names the route (or upstream) and field.
    pub(crate) fn compile(config: &GatewayConfig) -> Result<Table, Invalid> {
        let mut routes = Vec::with_capacity(config.routes.len());
        // (host key, method, template source) → routes, in name order.
        let mut keys: HashMap<(HostKey, Method, String), (PathTemplate, Vec<usize>)> =
            HashMap::new();
        for (index, (name, route)) in config.routes.iter().enumerate() {
            let key = |field: &str| format!("routes.{name}.{field}");
            let template =
                path_template(route).map_err(|(field, e)| Invalid::new(key(field), e))?;
            let methods = if route.methods.is_empty() {
                ANY_METHOD.to_vec()
            } else {
                route
                    .methods
                    .iter()
                    .map(|m| method(m).map_err(|e| Invalid::new(key("methods"), e)))
                    .collect::<Result<_, _>>()?
            };
            let hosts = if route.hosts.is_empty() {
                vec![HostKey::Any]
            } else {
                route
                    .hosts
                    .iter()
                    .map(|h| host_key(h).map_err(|e| Invalid::new(key("hosts"), e)))
                    .collect::<Result<_, _>>()?
            };
            for host in &hosts {
                for m in &methods {
                    keys.entry((host.clone(), m.clone(), template.source().to_owned()))
                        .or_insert_with(|| (template.clone(), Vec::new()))
                        .1
                        .push(index);
                }
            }
            routes.push(compile_route(config, name, route)?);
        }
        let mut table = Table {
            trusted: TrustedProxies(
                config
                    .listener
                    .trusted_proxies
                    .iter()
                    .map(|t| {
                        Cidr::parse(t).map_err(|e| Invalid::new("listener.trusted_proxies", e))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            jwt: match &config.jwt {
                Some(jwt) => Some(Arc::new(crate::jwt::GatewayJwt::compile(jwt)?)),
                None => None,
            },
            defaults: config.defaults.clone(),
            routes,
            exact_hosts: HashMap::new(),
            wildcard_hosts: Vec::new(),
            any_host: RouteTable::new(),
        };
        let mut wildcards: HashMap<String, RouteTable<Vec<usize>>> = HashMap::new();
        for ((host, method, _), (template, indexes)) in keys {
            let first = indexes.first().copied().unwrap_or(0);
            let target = match host {
                HostKey::Any => &mut table.any_host,
                HostKey::Exact(h) => table.exact_hosts.entry(h).or_default(),
                HostKey::Suffix(s) => wildcards.entry(s).or_default(),
            };
            target.insert(method, template, indexes).map_err(|e| {
                let name = config.routes.keys().nth(first).map_or("?", String::as_str);
                Invalid::new(
                    format!("routes.{name}"),
                    format!(
                        "{e}: another route has a path of the same shape with other variable names; write them alike"
                    ),
                )
            })?;
        }
        let mut wildcard_hosts: Vec<_> = wildcards.into_iter().collect();
        wildcard_hosts.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        table.wildcard_hosts = wildcard_hosts;
        Ok(table)
    }

    /// The number of routes.
    pub(crate) fn len(&self) -> usize {
        self.routes.len()
    }

    /// The routes for the admin view, in name order.
    pub(crate) fn describe(&self) -> Vec<serde_json::Value> {
        self.routes
            .iter()
            .map(|r| {
                let upstreams: Vec<serde_json::Value> = match &r.targets {
                    Targets::One(name) => {
                        vec![serde_json::json!({ "upstream": &**name, "share": 1.0 })]
                    }
                    Targets::Split { choices, total } => {
                        let mut before = 0;
                        choices
                            .iter()
                            .map(|(name, upto)| {
                                let share = f64::from(upto - before) / f64::from(*total);
                                before = *upto;
                                serde_json::json!({ "upstream": &**name, "share": share })
                            })
                            .collect()
                    }
                };
                serde_json::json!({
                    "name": &*r.name,
                    "priority": r.priority,
                    "targets": upstreams,
                    "timeout_ms": r.timeout.as_millis() as u64,
                    "rate_limit": r.rate_limit.as_ref().map(|l| serde_json::json!({
                        "rate": l.config.rate,
                        "period_ms": l.config.period.as_millis() as u64,
                        "by": l.config.by,
                    })),
                })
            })
            .collect()
    }

    /// The route for a request, if any.
    pub(crate) fn find(
        &self,
        host: Option<&str>,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Option<Matched<'_>> {
        let host = host.map(normalize_host);
        if let Some(host) = &host {
            if let Some(table) = self.exact_hosts.get(host.as_str())
                && let Some(m) = self.pick(table, method, path, headers, query)
            {
                return Some(m);
            }
            for (suffix, table) in &self.wildcard_hosts {
                if host.ends_with(suffix.as_str())
                    && host.len() > suffix.len()
                    && let Some(m) = self.pick(table, method, path, headers, query)
                {
                    return Some(m);
                }
            }
        }
        self.pick(&self.any_host, method, path, headers, query)
    }

    fn pick(
        &self,
        table: &RouteTable<Vec<usize>>,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Option<Matched<'_>> {
        let found = table.matching(method, path);
        // The highest priority; then the most specific path (its rank in
        // `found`); then the first name.
        let mut best: Option<(i32, usize, usize)> = None;
        let mut pairs: Option<Vec<(String, String)>> = None;
        for (rank, indexes) in found.iter().enumerate() {
            for &index in *indexes {
                let route = &self.routes[index];
                let better = match best {
                    None => true,
                    Some((p, r, i)) => {
                        route.priority > p || (route.priority == p && (rank, index) < (r, i))
                    }
                };
                if better && route.accepts(headers, query, &mut pairs) {
                    best = Some((route.priority, rank, index));
                }
            }
        }
        let (_, _, index) = best?;
        Some(Matched {
            route: &self.routes[index],
        })
    }
}

impl Route {
    /// Whether the request's headers and query parameters match.
    fn accepts(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        pairs: &mut Option<Vec<(String, String)>>,
    ) -> bool {
        let headers_ok = self
            .headers
            .iter()
            .all(|(name, value)| headers.get_all(name).iter().any(|v| v == value));
        if !headers_ok {
            return false;
        }
        let cookies_ok = self.cookies.iter().all(|(name, value)| {
            headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .any(|(k, v)| k == name && v == value)
        });
        if !cookies_ok {
            return false;
        }
        if self.query.is_empty() {
            return true;
        }
        // Decoded once per request, and only when a route asks.
        let pairs = pairs.get_or_insert_with(|| {
            serde_urlencoded::from_str::<Vec<(String, String)>>(query.unwrap_or(""))
                .unwrap_or_default()
        });
        self.query
            .iter()
            .all(|(k, v)| pairs.iter().any(|(pk, pv)| pk == k && pv == v))
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum HostKey {
    Any,
    Exact(String),
    /// `*.example.com` as `.example.com`.
    Suffix(String),
}

fn host_key(text: &str) -> Result<HostKey, String> {
    let host = text.trim().to_ascii_lowercase();
    let valid = |h: &str| {
        !h.is_empty()
            && h.len() <= 253
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    if let Some(rest) = host.strip_prefix("*.") {
        if !valid(rest) {
            return Err(format!("{text:?} is not a host name"));
        }
        return Ok(HostKey::Suffix(format!(".{rest}")));
    }
    if !valid(&host) {
        return Err(format!(
            "{text:?} is not a host name (`*.example.com` for any subdomain)"
        ));
    }
    Ok(HostKey::Exact(host))
}

/// A request's host without its port, lower-cased (`[::1]:8080` → `[::1]`).
fn normalize_host(host: &str) -> String {
    let host = if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.split(':').next().unwrap_or(host)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// The template a route's path rule stands for, or (field, why).
fn path_template(route: &RouteConfig) -> Result<PathTemplate, (&'static str, String)> {
    let given = [
        route.path.as_ref().map(|p| ("path", p)),
        route.prefix.as_ref().map(|p| ("prefix", p)),
        route.template.as_ref().map(|p| ("template", p)),
    ];
    let mut given = given.into_iter().flatten();
    let Some((field, text)) = given.next() else {
        return Err(("path", "give one of path, prefix or template".into()));
    };
    if let Some((other, _)) = given.next() {
        return Err((
            other,
            format!("give one of path, prefix or template, not {field} and {other}"),
        ));
    }
    if !text.starts_with('/') {
        return Err((field, format!("{text:?} must start with /")));
    }
    let source = match field {
        "prefix" => format!("{}/{{rest=**}}", text.trim_end_matches('/')),
        _ => text.clone(),
    };
    let template = PathTemplate::parse(&source).map_err(|e| (field, e.to_string()))?;
    if field == "path" && template.fields().next().is_some() {
        return Err((field, format!("{text:?} has variables: use `template`")));
    }
    Ok(template)
}

fn route_limit(route: &str, limit: &RateLimitConfig) -> Result<RouteLimit, String> {
    if limit.rate == 0 || limit.period.is_zero() {
        return Err("rate and period must be more than 0".into());
    }
    let by = match limit.by.as_str() {
        "route" => LimitBy::Route,
        "client_ip" => LimitBy::ClientIp,
        "subject" => LimitBy::Subject,
        other => match other.strip_prefix("header:") {
            Some(name) => LimitBy::Header(header_name(name)?),
            None => {
                return Err(format!(
                    "by = {other:?}: expected route, client_ip, subject or header:NAME"
                ));
            }
        },
    };
    let quota = Quota {
        rate: limit.rate,
        period: limit.period,
        burst: 1,
    }
    .with_burst(limit.burst.unwrap_or(limit.rate));
    let keys = if matches!(by, LimitBy::Route) {
        1
    } else {
        MAX_LIMIT_KEYS
    };
    let local = LocalLimiter::new(quota, keys);
    let limiter = match &limit.redis {
        None => RouteLimiter::Local(Arc::new(local)),
        #[cfg(feature = "redis")]
        Some(url) => {
            use trellis_resilience::redis_limit::{RedisFallback, RedisLimiter};
            let fallback = match limit.fallback.as_str() {
                "local" => RedisFallback::Local(local),
                "allow" => RedisFallback::Allow,
                "deny" => RedisFallback::Deny,
                other => {
                    return Err(format!(
                        "fallback = {other:?}: expected local, allow or deny"
                    ));
                }
            };
            let prefix = format!("trellis:gateway:{route}:");
            RouteLimiter::Redis(Arc::new(
                RedisLimiter::new(url, &prefix, quota, fallback)
                    .map_err(|e| format!("redis = {url:?}: {e}"))?,
            ))
        }
        #[cfg(not(feature = "redis"))]
        Some(_) => {
            let _ = (route, local);
            return Err("this build has no Redis support (cargo feature `redis`)".into());
        }
    };
    Ok(RouteLimit {
        config: limit.clone(),
        limiter,
        by,
    })
}

impl Table {
    /// Finds every route's plugins; an unknown name is an error naming the
    /// route.
    pub(crate) fn resolve_plugins(&mut self, plugins: &crate::Plugins) -> Result<(), Invalid> {
        for route in &mut self.routes {
            route.plugins = plugins
                .resolve(&route.plugin_names)
                .map_err(|e| Invalid::new(format!("routes.{}.plugins", route.name), e))?;
        }
        Ok(())
    }

    /// Fetches the descriptors of `reflection` transcoding routes from their
    /// upstreams' server reflection — or keeps the transcoder of the same
    /// route in `previous` when its settings are unchanged. An upstream that
    /// cannot answer fails the document, naming the route.
    pub(crate) async fn resolve_reflection(
        &mut self,
        previous: Option<&Table>,
        upstreams: &crate::upstream::Upstreams,
    ) -> Result<(), Invalid> {
        let before: HashMap<&str, &Route> = previous
            .map(|p| p.routes.iter().map(|r| (&*r.name, r)).collect())
            .unwrap_or_default();
        for route in &mut self.routes {
            let Some(t) = route.transcode.as_ref().filter(|t| t.reflection) else {
                continue;
            };
            let key = format!("routes.{}.transcode.reflection", route.name);
            if let Some(old) = before.get(&*route.name)
                && old.transcode == route.transcode
                && old.targets.same(&route.targets)
                && old.transcoder.is_some()
            {
                route.transcoder = old.transcoder.clone();
                continue;
            }
            let Targets::One(name) = &route.targets else {
                return Err(Invalid::new(key, "reflection asks one upstream"));
            };
            let upstream = upstreams
                .get(name)
                .ok_or_else(|| Invalid::new(key.clone(), format!("no upstream named {name:?}")))?;
            let fds = crate::reflect::descriptor_set(
                crate::upstream::GrpcCalls(upstream.pool.clone()),
                &t.services,
            )
            .await
            .map_err(|e| Invalid::new(key.clone(), format!("upstream {name}: {e}")))?;
            let services: Vec<&str> = t.services.iter().map(String::as_str).collect();
            route.transcoder = Some(
                trellis_transcode::Transcoder::new(&[&fds], &services)
                    .map_err(|e| Invalid::new(key, e.to_string()))?,
            );
        }
        Ok(())
    }

    /// Carries each route's limiter and breaker over from `previous` when
    /// its settings are unchanged, so a reload neither hands every client a
    /// fresh burst nor closes an open breaker.
    pub(crate) fn keep_limiters(&mut self, previous: &Table) {
        // An unchanged [jwt] keeps its verifier: its keys and the tokens it
        // has verified.
        if let (Some(jwt), Some(before)) = (&mut self.jwt, &previous.jwt)
            && jwt.config == before.config
        {
            *jwt = before.clone();
        }
        let breakers: HashMap<&str, &RouteBreaker> = previous
            .routes
            .iter()
            .filter_map(|r| r.breaker.as_ref().map(|b| (&*r.name, b)))
            .collect();
        for route in &mut self.routes {
            if let (Some(b), Some(before)) = (&mut route.breaker, breakers.get(&*route.name))
                && b.config == before.config
            {
                b.breaker = before.breaker.clone();
            }
        }
        let old: HashMap<&str, &RouteLimit> = previous
            .routes
            .iter()
            .filter_map(|r| r.rate_limit.as_ref().map(|l| (&*r.name, l)))
            .collect();
        for route in &mut self.routes {
            if let (Some(limit), Some(before)) = (&mut route.rate_limit, old.get(&*route.name))
                && limit.config == before.config
            {
                limit.limiter = before.limiter.clone();
            }
        }
    }
}

fn compile_route(
    config: &GatewayConfig,
    name: &str,
    route: &RouteConfig,
) -> Result<Route, Invalid> {
    let key = |field: &str| format!("routes.{name}.{field}");
    let exists = |upstream: &str, field: &str| {
        if config.upstreams.contains_key(upstream) {
            Ok(())
        } else {
            Err(Invalid::new(
                key(field),
                format!("no upstream named {upstream:?}"),
            ))
        }
    };
    let targets = match (&route.upstream, route.split.is_empty()) {
        (Some(upstream), true) => {
            exists(upstream, "upstream")?;
            Targets::One(upstream.as_str().into())
        }
        (None, false) => {
            let mut choices = Vec::new();
            let mut total = 0u32;
            for (i, s) in route.split.iter().enumerate() {
                exists(&s.upstream, &format!("split.{i}.upstream"))?;
                if s.weight > 10_000 {
                    return Err(Invalid::new(
                        key(&format!("split.{i}.weight")),
                        "must be 0..=10000",
                    ));
                }
                if s.weight > 0 {
                    total += s.weight;
                    choices.push((s.upstream.as_str().into(), total));
                }
            }
            if total == 0 {
                return Err(Invalid::new(key("split"), "every weight is 0"));
            }
            Targets::Split { choices, total }
        }
        (Some(_), false) => {
            return Err(Invalid::new(
                key("split"),
                "give upstream or split, not both",
            ));
        }
        (None, true) => return Err(Invalid::new(key("upstream"), "give upstream or split")),
    };
    let mut headers = Vec::new();
    for (h, v) in &route.headers {
        headers.push((
            header_name(h).map_err(|e| Invalid::new(key("headers"), e))?,
            header_value(v).map_err(|e| Invalid::new(key(&format!("headers.{h}")), e))?,
        ));
    }
    for (field, prefix) in [
        ("strip_prefix", &route.strip_prefix),
        ("add_prefix", &route.add_prefix),
    ] {
        if let Some(p) = prefix
            && (!p.starts_with('/') || p.contains(['?', '#']))
        {
            return Err(Invalid::new(
                key(field),
                format!("{p:?} must be a path starting with /"),
            ));
        }
    }
    Ok(Route {
        name: name.into(),
        priority: route.priority,
        headers,
        query: route
            .query
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        cookies: route
            .cookies
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        targets,
        strip_prefix: route
            .strip_prefix
            .as_ref()
            .map(|p| p.trim_end_matches('/').to_owned()),
        add_prefix: route
            .add_prefix
            .as_ref()
            .map(|p| p.trim_end_matches('/').to_owned()),
        preserve_host: route.preserve_host,
        request_headers: Rules::compile(&route.request_headers, &|f| {
            key(&format!("request_headers.{f}"))
        })?,
        response_headers: Rules::compile(&route.response_headers, &|f| {
            key(&format!("response_headers.{f}"))
        })?,
        timeout: route.timeout.unwrap_or(config.defaults.timeout),
        total_timeout: route.total_timeout,
        idle_timeout: route.idle_timeout.unwrap_or(config.defaults.idle_timeout),
        retry: {
            let r = &route.retries;
            if !(1..=5).contains(&r.attempts) {
                return Err(Invalid::new(key("retries.attempts"), "must be 1..=5"));
            }
            if !(0.0..=1.0).contains(&r.budget) {
                return Err(Invalid::new(key("retries.budget"), "must be 0..=1"));
            }
            if let Some(s) = r.on_status.iter().find(|s| !(500..=599).contains(*s)) {
                return Err(Invalid::new(
                    key("retries.on_status"),
                    format!("{s}: only 5xx statuses are retried"),
                ));
            }
            RouteRetry {
                attempts: r.attempts,
                on_status: r.on_status.clone(),
                // At least a few retries a second even when quiet.
                budget: RetryBudget::new(r.budget, 10),
            }
        },
        jwt: match &route.jwt {
            None => None,
            Some(jwt) => {
                if config.jwt.is_none() {
                    return Err(Invalid::new(
                        key("jwt"),
                        "the document has no [jwt] section saying how to verify tokens",
                    ));
                }
                if jwt.optional && !jwt.require.is_empty() {
                    return Err(Invalid::new(
                        key("jwt"),
                        "optional and require contradict each other",
                    ));
                }
                Some(crate::jwt::access(jwt))
            }
        },
        plugin_names: route.plugins.clone(),
        plugins: Vec::new(),
        breaker: match &route.circuit_breaker {
            None => None,
            Some(c) => {
                if !(0.0..=1.0).contains(&c.failure_ratio)
                    || c.window.is_zero()
                    || c.half_open_probes == 0
                {
                    return Err(Invalid::new(
                        key("circuit_breaker"),
                        "failure_ratio must be 0..=1, window more than 0, half_open_probes at least 1",
                    ));
                }
                Some(RouteBreaker {
                    config: c.clone(),
                    breaker: Arc::new(Breaker::new(BreakerConfig {
                        window: c.window,
                        min_calls: c.min_calls,
                        failure_ratio: c.failure_ratio,
                        consecutive_failures: (c.consecutive_failures > 0)
                            .then_some(c.consecutive_failures),
                        open_duration: c.open_duration,
                        half_open_probes: c.half_open_probes,
                        ..BreakerConfig::default()
                    })),
                    open_duration: c.open_duration,
                })
            }
        },
        cors: match &route.cors {
            None => None,
            Some(c) => Some(Cors::compile(c, &key)?),
        },
        ips: IpRules {
            allow: route
                .allow_ips
                .iter()
                .map(|t| Cidr::parse(t).map_err(|e| Invalid::new(key("allow_ips"), e)))
                .collect::<Result<_, _>>()?,
            deny: route
                .deny_ips
                .iter()
                .map(|t| Cidr::parse(t).map_err(|e| Invalid::new(key("deny_ips"), e)))
                .collect::<Result<_, _>>()?,
        },
        transcode: route.transcode.clone(),
        transcoder: match &route.transcode {
            None => None,
            Some(t) => match (&t.descriptor_set, t.reflection) {
                (Some(path), false) => {
                    let fds = std::fs::read(path).map_err(|e| {
                        Invalid::new(
                            key("transcode.descriptor_set"),
                            format!("{}: {e}", path.display()),
                        )
                    })?;
                    let services: Vec<&str> = t.services.iter().map(String::as_str).collect();
                    Some(
                        trellis_transcode::Transcoder::new(&[&fds], &services)
                            .map_err(|e| Invalid::new(key("transcode"), e.to_string()))?,
                    )
                }
                (None, true) => {
                    if route.upstream.is_none() {
                        return Err(Invalid::new(
                            key("transcode.reflection"),
                            "reflection asks one upstream: use `upstream`, not `split`",
                        ));
                    }
                    None
                }
                _ => {
                    return Err(Invalid::new(
                        key("transcode"),
                        "name the descriptors: one of descriptor_set and reflection = true",
                    ));
                }
            },
        },
        rate_limit: match &route.rate_limit {
            None => None,
            Some(limit) => {
                let limit =
                    route_limit(name, limit).map_err(|e| Invalid::new(key("rate_limit"), e))?;
                if matches!(limit.by, LimitBy::Subject) && route.jwt.is_none() {
                    return Err(Invalid::new(
                        key("rate_limit.by"),
                        "\"subject\" needs jwt on the route (a verified token's sub)",
                    ));
                }
                Some(limit)
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(rate_limit: &str) -> GatewayConfig {
        let text = format!(
            "[upstreams.a]\ntargets = [{{ url = \"http://127.0.0.1:1\" }}]\n\
             [routes.r]\nprefix = \"/\"\nupstream = \"a\"\nrate_limit = {rate_limit}\n"
        );
        toml_doc(&text)
    }

    fn toml_doc(text: &str) -> GatewayConfig {
        toml::from_str(text).expect("a gateway document")
    }

    fn spend(table: &Table) -> bool {
        let route = &table.routes[0];
        let limit = route.rate_limit.as_ref().expect("a limit");
        let decision =
            futures_util::FutureExt::now_or_never(limit.check(&HeaderMap::new(), None, None))
                .expect("a local limit decides at once");
        matches!(decision, Decision::Allow)
    }

    #[test]
    fn address_blocks_contain_what_they_should() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("address");
        let block = |s: &str| Cidr::parse(s).expect("block");
        assert!(block("10.0.0.0/8").contains(ip("10.200.1.2")));
        assert!(!block("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(block("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(block("192.168.1.7").contains(ip("192.168.1.7")));
        assert!(!block("192.168.1.7").contains(ip("192.168.1.8")));
        assert!(block("2001:db8::/32").contains(ip("2001:db8:1::5")));
        assert!(!block("2001:db8::/32").contains(ip("2001:db9::5")));
        // An IPv4 client seen through an IPv6 socket.
        assert!(block("127.0.0.0/8").contains(ip("::ffff:127.0.0.1")));
        assert!(!block("10.0.0.0/8").contains(ip("2001:db8::1")));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nonsense").is_err());
    }

    #[test]
    fn a_reload_keeps_a_routes_spent_budget_unless_its_limit_changed() {
        let first =
            Table::compile(&doc("{ rate = 1, period = \"1h\", burst = 2 }")).expect("compiles");
        assert!(spend(&first) && spend(&first));
        assert!(!spend(&first), "the burst of 2 is spent");
        let mut same =
            Table::compile(&doc("{ rate = 1, period = \"1h\", burst = 2 }")).expect("compiles");
        same.keep_limiters(&first);
        assert!(!spend(&same), "the same limit keeps the spent budget");
        let mut changed =
            Table::compile(&doc("{ rate = 1, period = \"1h\", burst = 3 }")).expect("compiles");
        changed.keep_limiters(&first);
        assert!(spend(&changed), "a changed limit starts afresh");
    }
}
