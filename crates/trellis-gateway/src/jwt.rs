//! Bearer tokens at the gateway: `[jwt]` compiled into a verifier of
//! `trellis-auth` (the same verifier and decision every service's
//! `AuthLayer` uses), and the claims sent upstream as headers.

use std::{str::FromStr, sync::Arc};

use http::{HeaderMap, HeaderName, HeaderValue};
use trellis_auth::{Access, Claims, Verifier};
use trellis_config::Invalid;
use trellis_core::Error;

use crate::config::{JwtConfig, RouteJwtConfig};

/// The compiled `[jwt]` section.
pub(crate) struct GatewayJwt {
    /// What it was compiled from: an unchanged section keeps its verifier
    /// (and its key cache) across reloads.
    pub(crate) config: JwtConfig,
    pub(crate) verifier: Arc<Verifier>,
    claim_headers: Vec<(Claim, HeaderName)>,
    warmed: std::sync::atomic::AtomicBool,
}

#[derive(Clone, Copy)]
enum Claim {
    Sub,
    Tenant,
    Roles,
    Permissions,
    Scope,
    Iss,
    Jti,
}

impl GatewayJwt {
    pub(crate) fn compile(config: &JwtConfig) -> Result<GatewayJwt, Invalid> {
        let verifier = trellis_auth::VerifierSettings {
            jwks_url: config.jwks_url.clone(),
            jwks_file: config.jwks_file.clone(),
            ca_file: config.ca_file.clone(),
            cert_file: config.cert_file.clone(),
            key_file: config.key_file.clone(),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            algorithms: config.algorithms.clone(),
            leeway: config.leeway,
            refresh: config.refresh,
            cooldown: config.cooldown,
            realm: config.realm.clone(),
        }
        .build()
        .map_err(|(key, e)| Invalid::new(format!("jwt.{key}"), e))?;
        let mut claim_headers = Vec::new();
        for (claim, header) in &config.claims_to_headers {
            let key = format!("jwt.claims_to_headers.{claim}");
            let claim = match claim.as_str() {
                "sub" => Claim::Sub,
                "tenant" => Claim::Tenant,
                "roles" => Claim::Roles,
                "permissions" => Claim::Permissions,
                "scope" => Claim::Scope,
                "iss" => Claim::Iss,
                "jti" => Claim::Jti,
                other => {
                    return Err(Invalid::new(
                        key,
                        format!(
                            "{other:?}: expected sub, tenant, roles, permissions, scope, iss or jti"
                        ),
                    ));
                }
            };
            let name = HeaderName::from_str(header)
                .map_err(|e| Invalid::new(key, format!("{header:?}: {e}")))?;
            claim_headers.push((claim, name));
        }
        Ok(GatewayJwt {
            config: config.clone(),
            verifier: Arc::new(verifier),
            claim_headers,
            warmed: Default::default(),
        })
    }

    /// Fetches the key set in the background the first time the section
    /// goes live, so the first request does not wait for it.
    pub(crate) fn warm(&self) {
        if !self.warmed.swap(true, std::sync::atomic::Ordering::Relaxed) {
            let keys = self.verifier.keys().clone();
            tokio::spawn(async move {
                // A failure is logged by the cache and retried on demand.
                let _ = keys.warm().await;
            });
        }
    }

    /// Decides for a route (see [`Access::check`]); on the way, the
    /// client's copies of the claim headers go and the verified claims'
    /// values take their place.
    pub(crate) async fn check(
        &self,
        access: &Access,
        headers: &mut HeaderMap,
    ) -> Result<Option<Arc<Claims>>, Error> {
        let claims = access.check(&self.verifier, headers).await?;
        for (_, name) in &self.claim_headers {
            headers.remove(name);
        }
        if let Some(claims) = &claims {
            for (claim, name) in &self.claim_headers {
                let value = match claim {
                    Claim::Sub => Some(claims.sub.clone()),
                    Claim::Tenant => claims.tenant.clone(),
                    Claim::Roles => (!claims.roles.is_empty()).then(|| claims.roles.join(",")),
                    Claim::Permissions => {
                        (!claims.permissions.is_empty()).then(|| claims.permissions.join(","))
                    }
                    Claim::Scope => claims.scope.clone(),
                    Claim::Iss => Some(claims.iss.clone()),
                    Claim::Jti => claims.jti.clone(),
                };
                // A value that cannot be a header (a control byte) is left
                // out rather than sent altered.
                if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
                    headers.insert(name.clone(), value);
                }
            }
        }
        Ok(claims)
    }
}

/// What a route's `jwt` asks.
pub(crate) fn access(route: &RouteJwtConfig) -> Access {
    if route.optional {
        Access::Public
    } else if route.require.is_empty() {
        Access::Authenticated
    } else {
        Access::Require(route.require.clone())
    }
}
