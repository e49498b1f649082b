//! The default client stack, written top-down in one place, and the
//! settings it is built from — typed config (the `client` section of a
//! service's config, or per upstream) or code.
//!
//! A call passes, in order:
//!
//! 1. the deadline — what is left of the inbound request's, or the client's
//!    own timeout — sent on and enforced here;
//! 2. retries within a budget, never past the deadline;
//! 3. a client span and measurement per attempt (so each retry shows);
//! 4. a circuit breaker per method — inside the retries, so a retry of an
//!    open circuit fails fast instead of waiting;
//!
//! then the balancer over the discovered endpoints.

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tower::{Layer, ServiceBuilder};
use trellis_balance::{BalanceConfig, OutlierDetection, Policy};
use trellis_config::Invalid;
use trellis_resilience::{
    Backoff, Breaker, BreakerConfig, BreakerPolicy, CircuitBreaker, CircuitBreakerLayer, Deadline,
    DeadlineLayer, Outcome, Permit, Retry, RetryBudget, RetryLayer, RetryPolicy,
};
use trellis_telemetry::{ClientTelemetry, ClientTelemetryLayer};

/// How a client calls an upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientSettings {
    /// The client's own timeout per call (what is left of an inbound
    /// request's deadline applies too); null relies on that alone.
    /// Default: 10s.
    #[serde(with = "trellis_config::duration::option")]
    pub timeout: Option<Duration>,
    /// Retries.
    pub retry: RetrySettings,
    /// The circuit breaker per method.
    pub breaker: BreakerSettings,
    /// How endpoints are chosen.
    pub balancer: BalancerSettings,
    /// TLS to the service's endpoints (with a certificate: mutual TLS).
    /// Default: none (plaintext HTTP/2).
    pub tls: Option<crate::ClientTlsSettings>,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            timeout: Some(Duration::from_secs(10)),
            retry: RetrySettings::default(),
            breaker: BreakerSettings::default(),
            balancer: BalancerSettings::default(),
            tls: None,
        }
    }
}

/// When and how often a call is sent again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetrySettings {
    /// Attempts in all, the first included; 1 turns retries off. Default: 3.
    pub attempts: u32,
    /// The first wait's upper bound (full jitter). Default: 25ms.
    #[serde(with = "trellis_config::duration")]
    pub backoff_base: Duration,
    /// The longest wait. Default: 1s.
    #[serde(with = "trellis_config::duration")]
    pub backoff_max: Duration,
    /// Retries may add at most this share of recent calls. Default: 0.2.
    pub budget_ratio: f64,
    /// … plus this many per second. Default: 10.
    pub budget_per_second: u32,
    /// The longest server pushback honoured. Default: 10s.
    #[serde(with = "trellis_config::duration")]
    pub max_pushback: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        let policy = RetryPolicy::default();
        RetrySettings {
            attempts: policy.max_attempts,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_secs(1),
            budget_ratio: 0.2,
            budget_per_second: 10,
            max_pushback: policy.max_pushback,
        }
    }
}

/// The breaker in front of each method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BreakerSettings {
    /// Whether calls go through a breaker. Default: true.
    pub enabled: bool,
    /// Open after this many failures in a row; null disables. Default: 10.
    pub consecutive_failures: Option<u32>,
    /// Open when failures reach this share of the window's calls. Default: 0.5.
    pub failure_ratio: f64,
    /// No ratio opens the breaker before this many calls. Default: 20.
    pub min_calls: u32,
    /// The window ratios are judged over. Default: 10s.
    #[serde(with = "trellis_config::duration")]
    pub window: Duration,
    /// How long to stay open before probing. Default: 5s.
    #[serde(with = "trellis_config::duration")]
    pub open_duration: Duration,
    /// Probes let through when half-open. Default: 3.
    pub half_open_probes: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        let config = BreakerConfig::default();
        BreakerSettings {
            enabled: true,
            consecutive_failures: config.consecutive_failures,
            failure_ratio: config.failure_ratio,
            min_calls: config.min_calls,
            window: config.window,
            open_duration: config.open_duration,
            half_open_probes: config.half_open_probes,
        }
    }
}

/// How the balancer picks endpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BalancerSettings {
    /// `p2c_ewma`, `round_robin`, `weighted_round_robin`,
    /// `least_request`, `random`, or `consistent_hash:HEADER`. Default:
    /// `p2c_ewma`.
    pub policy: String,
    /// Prefer instances in this zone while any is healthy. Default: none.
    pub prefer_zone: Option<String>,
    /// Consecutive failures that eject an endpoint; 0 disables. Default: 5.
    pub eject_after: u32,
    /// The first ejection's length (the n-th lasts n times as long).
    /// Default: 5s.
    #[serde(with = "trellis_config::duration")]
    pub base_ejection: Duration,
    /// Never eject more than this share of the set (percent). Default: 50.
    pub max_ejection_percent: u8,
}

impl Default for BalancerSettings {
    fn default() -> Self {
        let outlier = OutlierDetection::default();
        BalancerSettings {
            policy: "p2c_ewma".into(),
            prefer_zone: None,
            eject_after: outlier.consecutive_failures,
            base_ejection: outlier.base_ejection,
            max_ejection_percent: outlier.max_ejection_percent,
        }
    }
}

impl BalancerSettings {
    fn policy(&self) -> Option<Policy> {
        Some(match self.policy.as_str() {
            "p2c_ewma" => Policy::P2cEwma,
            "round_robin" => Policy::RoundRobin,
            "weighted_round_robin" => Policy::SmoothWeightedRoundRobin,
            "least_request" => Policy::LeastRequest,
            "random" => Policy::Random,
            other => Policy::ConsistentHash {
                header: other
                    .strip_prefix("consistent_hash:")
                    .filter(|h| http::HeaderName::from_bytes(h.as_bytes()).is_ok())?
                    .to_ascii_lowercase(),
            },
        })
    }
}

impl ClientSettings {
    /// Checks ranges; `prefix` is where these settings sit (e.g. `client`).
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        let bad = |key: &str, why: &str| Err(Invalid::new(format!("{prefix}.{key}"), why));
        if let Some(tls) = &self.tls {
            tls.validate(&format!("{prefix}.tls"))?;
        }
        if self.timeout.is_some_and(|t| t < Duration::from_millis(1)) {
            return bad("timeout", "must be at least 1ms (or null)");
        }
        if !(1..=10).contains(&self.retry.attempts) {
            return bad("retry.attempts", "must be between 1 and 10");
        }
        if self.retry.backoff_base > self.retry.backoff_max {
            return bad("retry.backoff_base", "must not exceed retry.backoff_max");
        }
        if !(0.0..=10.0).contains(&self.retry.budget_ratio) {
            return bad("retry.budget_ratio", "must be between 0 and 10");
        }
        if !(0.0..=1.0).contains(&self.breaker.failure_ratio) {
            return bad("breaker.failure_ratio", "must be between 0 and 1");
        }
        if self.breaker.window < Duration::from_millis(10) {
            return bad("breaker.window", "must be at least 10ms");
        }
        if self.breaker.half_open_probes == 0 {
            return bad("breaker.half_open_probes", "must be at least 1");
        }
        if self.balancer.policy().is_none() {
            return bad(
                "balancer.policy",
                "must be p2c_ewma, round_robin, weighted_round_robin, least_request, random or consistent_hash:HEADER",
            );
        }
        if self.balancer.max_ejection_percent > 100 {
            return bad("balancer.max_ejection_percent", "is a percentage: 0 to 100");
        }
        Ok(())
    }

    /// The balancer these settings describe.
    pub fn balance_config(&self) -> BalanceConfig {
        BalanceConfig {
            // Validation guarantees a policy; unchecked settings get the default.
            policy: self.balancer.policy().unwrap_or_default(),
            prefer_zone: self.balancer.prefer_zone.clone(),
            outlier: OutlierDetection {
                consecutive_failures: self.balancer.eject_after,
                base_ejection: self.balancer.base_ejection,
                max_ejection_percent: self.balancer.max_ejection_percent,
                ..OutlierDetection::default()
            },
            ..BalanceConfig::default()
        }
    }
}

/// The client stack's breaker: a classic [`Breaker`], or none (every call
/// admitted, nothing counted) when `breaker.enabled` is false — one type
/// either way, so the stack's type does not change with a setting.
pub enum ClientBreaker {
    /// A breaker per method.
    On(Box<Breaker>),
    /// No breaking.
    Off,
}

impl BreakerPolicy for ClientBreaker {
    fn acquire(&self) -> Option<Permit> {
        match self {
            ClientBreaker::On(b) => b.acquire(),
            ClientBreaker::Off => Some(Permit::Normal),
        }
    }

    fn record(&self, permit: Permit, outcome: Outcome, elapsed: Duration) {
        if let ClientBreaker::On(b) = self {
            b.record(permit, outcome, elapsed);
        }
    }
}

/// The default client stack (see the module docs).
#[derive(Clone)]
pub struct ClientStack {
    deadline: DeadlineLayer,
    retry: RetryLayer,
    telemetry: ClientTelemetryLayer,
    breaker: CircuitBreakerLayer<ClientBreaker>,
}

/// The service the default client stack makes of `S`.
pub type ClientStackService<S> = Deadline<Retry<ClientTelemetry<CircuitBreaker<S, ClientBreaker>>>>;

impl ClientStack {
    /// The stack `settings` describe. Share one per upstream: its retry
    /// budget and breakers are per stack.
    pub fn new(settings: &ClientSettings) -> ClientStack {
        let retry = RetryPolicy {
            max_attempts: settings.retry.attempts.max(1),
            backoff: Backoff::FullJitter {
                base: settings.retry.backoff_base,
                max: settings.retry.backoff_max,
            },
            max_pushback: settings.retry.max_pushback,
            ..RetryPolicy::default()
        };
        let budget = Arc::new(RetryBudget::new(
            settings.retry.budget_ratio,
            settings.retry.budget_per_second,
        ));
        let b = &settings.breaker;
        let breaker = BreakerConfig {
            consecutive_failures: b.consecutive_failures,
            failure_ratio: b.failure_ratio,
            min_calls: b.min_calls,
            window: b.window,
            open_duration: b.open_duration,
            half_open_probes: b.half_open_probes,
            ..BreakerConfig::default()
        };
        ClientStack {
            deadline: DeadlineLayer::new(settings.timeout),
            retry: RetryLayer::new(retry, budget),
            telemetry: ClientTelemetryLayer::new(),
            breaker: if b.enabled {
                CircuitBreakerLayer::per_method(move || {
                    ClientBreaker::On(Box::new(Breaker::new(breaker.clone())))
                })
            } else {
                CircuitBreakerLayer::new(ClientBreaker::Off)
            },
        }
    }
}

impl<S> Layer<S> for ClientStack {
    type Service = ClientStackService<S>;

    fn layer(&self, upstream: S) -> Self::Service {
        ServiceBuilder::new()
            // The deadline first: what is left of the inbound request's, or
            // the client's own, sent on and enforced for all attempts.
            .layer(self.deadline.clone())
            // Retries within a budget, never past that deadline.
            .layer(self.retry.clone())
            // A span and a measurement per attempt, so each retry shows.
            .layer(self.telemetry.clone())
            // A breaker per method, inside the retries: retrying an open
            // circuit fails fast instead of waiting.
            .layer(self.breaker.clone())
            .service(upstream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_read_from_config_and_are_checked() {
        let settings: ClientSettings = serde_json::from_value(serde_json::json!({
            "timeout": "2s",
            "retry": {"attempts": 5, "backoff_base": "10ms"},
            "breaker": {"enabled": false},
            "balancer": {"policy": "consistent_hash:X-User-Id", "prefer_zone": "z1"}
        }))
        .unwrap();
        assert_eq!(settings.timeout, Some(Duration::from_secs(2)));
        assert_eq!(settings.retry.attempts, 5);
        assert_eq!(settings.validate("client"), Ok(()));
        let balance = settings.balance_config();
        assert_eq!(
            balance.policy,
            Policy::ConsistentHash {
                header: "x-user-id".into()
            }
        );
        assert_eq!(balance.prefer_zone.as_deref(), Some("z1"));

        let mut bad = ClientSettings::default();
        bad.balancer.policy = "fastest".into();
        assert_eq!(
            bad.validate("client").unwrap_err().key,
            "client.balancer.policy"
        );
        let mut bad = ClientSettings::default();
        bad.retry.attempts = 0;
        assert_eq!(
            bad.validate("client").unwrap_err().key,
            "client.retry.attempts"
        );
    }
}
