//! Verifiers and access rules from configuration: the same keys wherever
//! tokens are checked (a service's `server.auth`, the gateway's `[jwt]`).

use std::{collections::BTreeMap, path::PathBuf, str::FromStr, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    Access, Algorithm, FileSource, Jwks, JwksTiming, Policy, UrlSource, Verifier, VerifierConfig,
};

/// Where the keys come from and what a token must say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerifierSettings {
    /// The key set's URL (`https://…/.well-known/jwks.json`). One of this
    /// and `jwks_file`.
    pub jwks_url: Option<String>,
    /// A key set file, read again on every refetch.
    pub jwks_file: Option<PathBuf>,
    /// PEM: the authorities trusted for an `https://` key set. Default:
    /// the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM: a client certificate for a key set served over mutual TLS
    /// (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM: its private key.
    pub key_file: Option<PathBuf>,
    /// The accepted `iss` (required).
    pub issuer: String,
    /// Accepted audiences: a token's `aud` must name one (required).
    pub audience: Vec<String>,
    /// The algorithm allowlist. Default: `EdDSA`, `ES256`, `RS256`.
    pub algorithms: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf` (`"30s"`). Default 30 s.
    #[serde(with = "trellis_config::duration")]
    pub leeway: Duration,
    /// A key set older than this is fetched again. Default 5 min.
    #[serde(with = "trellis_config::duration")]
    pub refresh: Duration,
    /// At most one fetch per this long for unknown `kid`s. Default 10 s.
    #[serde(with = "trellis_config::duration")]
    pub cooldown: Duration,
    /// The `realm` of `WWW-Authenticate` challenges. Default `trellis`.
    pub realm: String,
}

impl Default for VerifierSettings {
    fn default() -> Self {
        VerifierSettings {
            jwks_url: None,
            jwks_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            issuer: String::new(),
            audience: Vec::new(),
            algorithms: vec!["EdDSA".into(), "ES256".into(), "RS256".into()],
            leeway: Duration::from_secs(30),
            refresh: Duration::from_secs(300),
            cooldown: Duration::from_secs(10),
            realm: "trellis".into(),
        }
    }
}

/// A settings error: which key (relative to the section) and why.
pub type SettingsError = (&'static str, String);

impl VerifierSettings {
    /// The verifier these settings describe (its key set not yet fetched:
    /// see [`Jwks::warm`]).
    pub fn build(&self) -> Result<Verifier, SettingsError> {
        let timing = JwksTiming {
            refresh: self.refresh,
            cooldown: self.cooldown,
        };
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err((
                "cert_file",
                "cert_file and key_file come together".to_owned(),
            ));
        }
        let keys = match (&self.jwks_url, &self.jwks_file) {
            (Some(url), None) => Jwks::new(
                UrlSource::with_identity(
                    url,
                    self.ca_file.as_deref(),
                    self.cert_file.as_deref().zip(self.key_file.as_deref()),
                )
                .map_err(|e| ("jwks_url", e))?,
                timing,
            ),
            (None, Some(path)) => Jwks::new(FileSource(path.clone()), timing),
            _ => {
                return Err((
                    "jwks_url",
                    "name the key set: one of jwks_url and jwks_file".to_owned(),
                ));
            }
        };
        if self.issuer.is_empty() {
            return Err(("issuer", "required".to_owned()));
        }
        if self.audience.is_empty() {
            return Err(("audience", "name at least one".to_owned()));
        }
        let algorithms = self
            .algorithms
            .iter()
            .map(|a| {
                Algorithm::from_str(a)
                    .map_err(|_| ("algorithms", format!("{a:?}: no such algorithm")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Verifier::new(
            VerifierConfig {
                realm: self.realm.clone(),
                issuers: vec![self.issuer.clone()],
                audiences: self.audience.clone(),
                algorithms,
                leeway: self.leeway,
                ..VerifierConfig::new("", "")
            },
            keys,
        )
        .map_err(|e| ("algorithms", e))
    }
}

/// Who may call what, by path: gRPC methods (`/pkg.Service/Method`, or
/// `/pkg.Service/*`) and HTTP paths (exact, or a prefix ending in `*`).
/// REST calls transcoded to a method are judged by the method's path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicySettings {
    /// What a path no rule names needs: `authenticated` (default) or
    /// `public`.
    pub default: String,
    /// Paths anyone may call.
    pub public: Vec<String>,
    /// Paths that need every permission listed (roles, permissions or
    /// scopes).
    pub require: BTreeMap<String, Vec<String>>,
    /// Paths only the named services may call, by the identity in their
    /// mTLS certificate (`order` for `spiffe://trellis/order`), on top of
    /// the token rules: `"/shop.payment.v1.PaymentService/Charge" = ["order"]`.
    pub peers: BTreeMap<String, Vec<String>>,
}

impl Default for PolicySettings {
    fn default() -> Self {
        PolicySettings {
            default: "authenticated".into(),
            public: Vec::new(),
            require: BTreeMap::new(),
            peers: BTreeMap::new(),
        }
    }
}

impl PolicySettings {
    /// The policy these settings describe.
    pub fn build(&self) -> Result<Policy, SettingsError> {
        let default = match self.default.as_str() {
            "authenticated" => Access::Authenticated,
            "public" => Access::Public,
            other => {
                return Err((
                    "default",
                    format!("{other:?}: expected authenticated or public"),
                ));
            }
        };
        let mut policy = Policy::new().default_access(default);
        for path in &self.public {
            if !path.starts_with('/') {
                return Err(("public", format!("{path:?}: paths start with /")));
            }
            policy = policy.rule(path.clone(), Access::Public);
        }
        for (path, permissions) in &self.require {
            if !path.starts_with('/') {
                return Err(("require", format!("{path:?}: paths start with /")));
            }
            policy = policy.rule(path.clone(), Access::Require(permissions.clone()));
        }
        for (path, peers) in &self.peers {
            if !path.starts_with('/') {
                return Err(("peers", format!("{path:?}: paths start with /")));
            }
            if peers.is_empty() {
                return Err(("peers", format!("{path:?}: name at least one service")));
            }
            policy = policy.peers(path.clone(), peers.clone());
        }
        Ok(policy)
    }
}

/// A service's `server.auth`: its verifier and its rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// How tokens are verified.
    pub tokens: VerifierSettings,
    /// Who may call what.
    #[serde(default)]
    pub access: PolicySettings,
    /// The audit trail of the decisions (see [`AuthLayer::with_audit`]).
    #[serde(default)]
    pub audit: Option<crate::audit::AuditSettings>,
}

impl AuthSettings {
    /// The layer these settings describe; the key set is fetched in the
    /// background when a Tokio runtime is running.
    pub fn layer(&self) -> Result<crate::AuthLayer, String> {
        let verifier = self
            .tokens
            .build()
            .map_err(|(key, e)| format!("tokens.{key}: {e}"))?;
        let policy = self
            .access
            .build()
            .map_err(|(key, e)| format!("access.{key}: {e}"))?;
        let verifier = Arc::new(verifier);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let keys = verifier.keys().clone();
            runtime.spawn(async move {
                // A failure is logged by the cache and retried on demand.
                let _ = keys.warm().await;
            });
        }
        let layer = crate::AuthLayer::new(verifier, policy);
        Ok(match &self.audit {
            Some(audit) => layer.with_audit(Arc::new(
                crate::audit::Recorder::open(audit).map_err(|e| format!("audit.file: {e}"))?,
            )),
            None => layer,
        })
    }
}
