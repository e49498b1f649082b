//! Bearer tokens verified against a key set, and the reasons one is refused.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use http::{HeaderMap, StatusCode, header};
use jsonwebtoken::{Algorithm, Validation, errors::ErrorKind};
use trellis_core::{Code, Error};

use crate::{
    Claims,
    jwks::{Jwks, KeyMiss},
};

/// The longest token read (the header limit bounds it anyway).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// What a verifier accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierConfig {
    /// The `realm` in `WWW-Authenticate` challenges.
    pub realm: String,
    /// Accepted `iss` values (required, at least one).
    pub issuers: Vec<String>,
    /// Accepted `aud` values: the token must name one (required, at least
    /// one).
    pub audiences: Vec<String>,
    /// The algorithm allowlist. Symmetric algorithms (`HS*`) are never
    /// accepted from a key set.
    pub algorithms: Vec<Algorithm>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Accepted `typ` header values (compared without case); a token
    /// without `typ` is accepted.
    pub types: Vec<String>,
}

impl VerifierConfig {
    /// Tokens from `issuer` for `audience`: Ed25519, ES256 or RS256, 30 s
    /// of leeway, `typ` `JWT` or `at+jwt` (RFC 9068).
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> VerifierConfig {
        VerifierConfig {
            realm: "trellis".to_owned(),
            issuers: vec![issuer.into()],
            audiences: vec![audience.into()],
            algorithms: vec![Algorithm::EdDSA, Algorithm::ES256, Algorithm::RS256],
            leeway: Duration::from_secs(30),
            types: vec!["JWT".to_owned(), "at+jwt".to_owned()],
        }
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No `Authorization: Bearer` credential.
    #[error("no bearer token")]
    Missing,
    /// Not a compact JWS, or over [`MAX_TOKEN_BYTES`].
    #[error("the token is malformed")]
    Malformed,
    /// The header's `alg` is not on the allowlist.
    #[error("algorithm {0} is not accepted")]
    Algorithm(String),
    /// The header's `typ` is not accepted.
    #[error("token type {0:?} is not accepted")]
    Type(String),
    /// The header has `crit` parameters (none are understood).
    #[error("the token has critical header parameters")]
    Critical,
    /// No key in the set has the token's `kid` (after a refetch).
    #[error("no key for this token")]
    UnknownKey,
    /// The signature does not verify.
    #[error("the signature does not verify")]
    Signature,
    /// `exp` has passed (beyond the leeway).
    #[error("the token has expired")]
    Expired,
    /// `nbf` is still ahead (beyond the leeway).
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `iss` is not an accepted issuer.
    #[error("the token's issuer is not accepted")]
    Issuer,
    /// `aud` names no accepted audience.
    #[error("the token is not for this audience")]
    Audience,
    /// A required claim is missing or of the wrong type.
    #[error("claim {0} is missing or malformed")]
    Claim(String),
    /// No key set could be fetched yet: not the client's fault (503).
    #[error("the keys to verify tokens are unavailable")]
    KeysUnavailable,
}

impl Refusal {
    /// A stable label for metrics and audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Malformed => "malformed",
            Refusal::Algorithm(_) => "algorithm",
            Refusal::Type(_) => "type",
            Refusal::Critical => "critical",
            Refusal::UnknownKey => "unknown_key",
            Refusal::Signature => "signature",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::Issuer => "issuer",
            Refusal::Audience => "audience",
            Refusal::Claim(_) => "claim",
            Refusal::KeysUnavailable => "keys_unavailable",
        }
    }

    /// The answer, in the error model: UNAUTHENTICATED (401) with a
    /// `WWW-Authenticate` challenge — without an error code when no token
    /// came (RFC 6750 §3.1), `invalid_token` otherwise — or UNAVAILABLE
    /// (503) when there are no keys yet.
    pub fn to_error(&self, realm: &str) -> Error {
        match self {
            Refusal::KeysUnavailable => {
                Error::unavailable(self.to_string()).with_retry_after(Duration::from_secs(1))
            }
            Refusal::Missing => Error::new(
                Code::Unauthenticated,
                "UNAUTHENTICATED",
                "this call needs a bearer token",
            )
            .with_http_status(StatusCode::UNAUTHORIZED)
            .with_challenge(format!("Bearer realm=\"{}\"", quoted(realm))),
            other => Error::new(Code::Unauthenticated, "INVALID_TOKEN", other.to_string())
                .with_metadata("why", other.reason())
                .with_http_status(StatusCode::UNAUTHORIZED)
                .with_challenge(format!(
                    "Bearer realm=\"{}\", error=\"invalid_token\", error_description=\"{}\"",
                    quoted(realm),
                    quoted(&other.to_string())
                )),
        }
    }
}

/// The answer to a verified token that lacks `permission`: PERMISSION_DENIED
/// (403) naming it, with an `insufficient_scope` challenge.
pub fn forbidden(realm: &str, permission: &str) -> Error {
    Error::new(
        Code::PermissionDenied,
        "MISSING_PERMISSION",
        format!("this call needs permission {permission:?}"),
    )
    .with_metadata("permission", permission)
    .with_challenge(format!(
        "Bearer realm=\"{}\", error=\"insufficient_scope\", scope=\"{}\"",
        quoted(realm),
        quoted(permission)
    ))
}

/// A value fit for a quoted-string: no quote, backslash or control byte.
fn quoted(value: &str) -> String {
    value
        .chars()
        .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
        .collect()
}

/// The bearer token of `Authorization` (HTTP header or gRPC metadata, the
/// same thing on the wire), if there is one.
pub fn bearer(headers: &HeaderMap) -> Result<Option<&str>, Refusal> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| Refusal::Malformed)?;
    let Some((scheme, token)) = value.split_once(' ') else {
        return Err(Refusal::Malformed);
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        // Another scheme (Basic): not ours to judge, so no token.
        return Ok(None);
    }
    let token = token.trim();
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        return Err(Refusal::Malformed);
    }
    Ok(Some(token))
}

/// Verifies tokens against one key set (see the crate docs for what is
/// checked). Tokens that verified are remembered until they expire or the
/// key set changes, so a client's next request costs a hash lookup instead
/// of a signature check.
pub struct Verifier {
    config: VerifierConfig,
    keys: Arc<Jwks>,
    validation: HashMap<Algorithm, Validation>,
    verified: VerifiedCache,
}

impl Verifier {
    /// A verifier of tokens signed by keys from `keys`. The config must
    /// name at least one issuer, audience and asymmetric algorithm.
    pub fn new(config: VerifierConfig, keys: Arc<Jwks>) -> Result<Verifier, String> {
        if config.issuers.is_empty() {
            return Err("issuer: name at least one".to_owned());
        }
        if config.audiences.is_empty() {
            return Err("audience: name at least one".to_owned());
        }
        let mut validation = HashMap::new();
        for alg in &config.algorithms {
            if alg.family() == jsonwebtoken::AlgorithmFamily::Hmac {
                return Err(format!(
                    "algorithms: {alg:?} is symmetric; a key set verifies asymmetric algorithms only"
                ));
            }
            let mut v = Validation::new(*alg);
            v.leeway = config.leeway.as_secs();
            v.validate_nbf = true;
            v.set_issuer(&config.issuers);
            v.set_audience(&config.audiences);
            v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            validation.insert(*alg, v);
        }
        if validation.is_empty() {
            return Err("algorithms: name at least one".to_owned());
        }
        Ok(Verifier {
            config,
            keys,
            validation,
            verified: VerifiedCache::new(),
        })
    }

    /// What this verifier accepts.
    pub fn config(&self) -> &VerifierConfig {
        &self.config
    }

    /// The key set it reads.
    pub fn keys(&self) -> &Arc<Jwks> {
        &self.keys
    }

    /// The claims of `token` if it verifies, or why not.
    pub async fn verify(&self, token: &str) -> Result<Arc<Claims>, Refusal> {
        let generation = self.keys.generation();
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(claims) = self.verified.get(token, generation, now) {
            return Ok(claims);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refusal::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            // 12.0 refuses `crit` itself; the reason is kept apart.
            ErrorKind::InvalidToken if token_has_crit(token) => Refusal::Critical,
            _ => Refusal::Malformed,
        })?;
        if header.crit.is_some() {
            return Err(Refusal::Critical);
        }
        let Some(validation) = self.validation.get(&header.alg) else {
            return Err(Refusal::Algorithm(format!("{:?}", header.alg)));
        };
        if let Some(typ) = &header.typ
            && !self
                .config
                .types
                .iter()
                .any(|t| t.eq_ignore_ascii_case(typ))
        {
            return Err(Refusal::Type(typ.chars().take(32).collect()));
        }
        // `jku`, `x5u` and `jwk` are never followed: the key comes from the
        // configured set only.
        let kid = header.kid.as_deref();
        if kid.is_some_and(|k| k.len() > crate::jwks::MAX_KID_BYTES) {
            return Err(Refusal::UnknownKey);
        }
        let key = self.keys.key(kid, header.alg).await.map_err(|m| match m {
            KeyMiss::Unknown => Refusal::UnknownKey,
            KeyMiss::Unavailable => Refusal::KeysUnavailable,
        })?;
        let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, validation).map_err(
            |e| match e.into_kind() {
                ErrorKind::ExpiredSignature => Refusal::Expired,
                ErrorKind::ImmatureSignature => Refusal::NotYetValid,
                ErrorKind::InvalidIssuer => Refusal::Issuer,
                ErrorKind::InvalidAudience => Refusal::Audience,
                ErrorKind::MissingRequiredClaim(c) | ErrorKind::InvalidClaimFormat(c) => {
                    Refusal::Claim(c.chars().take(32).collect())
                }
                ErrorKind::InvalidSignature
                | ErrorKind::InvalidAlgorithm
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidEddsaKey
                | ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidKeyFormat => Refusal::Signature,
                // Our claims type refuses what lacks a required claim.
                ErrorKind::Json(e) => Refusal::Claim(
                    e.to_string()
                        .strip_prefix("missing field `")
                        .and_then(|rest| rest.split('`').next())
                        .unwrap_or("(the claims do not parse)")
                        .chars()
                        .take(32)
                        .collect(),
                ),
                _ => Refusal::Malformed,
            },
        )?;
        let claims = Arc::new(data.claims);
        self.verified.put(
            token,
            claims.clone(),
            generation,
            claims.exp.saturating_add(self.config.leeway.as_secs()),
        );
        Ok(claims)
    }

    /// Verifies the bearer token of `headers`: `Ok(None)` when there is
    /// none (the caller decides whether that is allowed).
    pub async fn verify_headers(
        &self,
        headers: &HeaderMap,
    ) -> Result<Option<Arc<Claims>>, Refusal> {
        match bearer(headers)? {
            Some(token) => self.verify(token).await.map(Some),
            None => Ok(None),
        }
    }
}

/// Whether a token's header names `crit` (read without trusting it, to say
/// why it was refused).
fn token_has_crit(token: &str) -> bool {
    use base64::Engine as _;
    token
        .split('.')
        .next()
        .filter(|h| h.len() <= 4096)
        .and_then(|h| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .ok()
        })
        .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
        .is_some_and(|h| h.get("crit").is_some())
}

/// Tokens already verified, by their whole text, sharded to keep
/// contention low, bounded (an arbitrary entry goes when a shard is full).
struct VerifiedCache {
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<Box<str>, Verified>>>,
}

struct Verified {
    claims: Arc<Claims>,
    generation: u64,
    /// Seconds since the epoch after which the entry is useless.
    until: u64,
}

const SHARDS: usize = 16;
const PER_SHARD: usize = 1024;

impl VerifiedCache {
    fn new() -> VerifiedCache {
        VerifiedCache {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, token: &str) -> &Mutex<HashMap<Box<str>, Verified>> {
        &self.shards[(self.hasher.hash_one(token) as usize) % SHARDS]
    }

    fn get(&self, token: &str, generation: u64, now: u64) -> Option<Arc<Claims>> {
        let mut shard = self
            .shard(token)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = shard.get(token)?;
        if entry.generation == generation && now <= entry.until {
            return Some(entry.claims.clone());
        }
        shard.remove(token);
        None
    }

    fn put(&self, token: &str, claims: Arc<Claims>, generation: u64, until: u64) {
        let mut shard = self
            .shard(token)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shard.len() >= PER_SHARD
            && let Some(victim) = shard.keys().next().cloned()
        {
            shard.remove(&victim);
        }
        shard.insert(
            token.into(),
            Verified {
                claims,
                generation,
                until,
            },
        );
    }
}
