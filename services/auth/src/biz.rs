//! The rules of accounts and tokens: registration, login with limits on
//! failures, refresh-token rotation with reuse detection, logout, and
//! introspection. Every decision is audited.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;
use trellis::{
    Code, Error,
    auth::{
        Claims, Jwks, StaticSource, Verifier, VerifierConfig,
        audit::{Entry, Recorder},
    },
};
use trellis_store::Failure;

use crate::{
    TokenSettings,
    data::{AuthStore, Credential, RefreshRow, Rotation},
    keys::{self, KeyRing},
    limiter::FailureLimiter,
    now_ms,
    passwords::Passwords,
    users::UserDirectory,
};

/// Who is asking: for limits and the audit trail.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The client's address (through trusted proxies).
    pub ip: Option<IpAddr>,
}

/// Tokens handed out by login and refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// The JWT.
    pub access_token: String,
    /// Seconds until it expires.
    pub expires_in: u64,
    /// The opaque refresh token.
    pub refresh_token: String,
    /// Seconds until the refresh token expires.
    pub refresh_expires_in: u64,
}

/// What introspection found (RFC 7662).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Introspection {
    /// Whether the token is active; nothing else is set when not.
    pub active: bool,
    /// `access_token` or `refresh_token`.
    pub token_type: String,
    /// The access token's claims, or the refresh token's subject and expiry.
    pub claims: Option<Claims>,
}

/// The limits on failed logins.
#[derive(Debug, Clone)]
pub struct LoginLimits {
    /// Failures per account per window.
    pub per_account: u32,
    /// Failures per client address per window.
    pub per_ip: u32,
    /// The window.
    pub window: Duration,
}

/// The longest password hashed (Argon2 takes any length; this bounds the
/// work an attacker can ask for).
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// The shortest password accepted at registration.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Refresh tokens are `rt_` and 32 random bytes: anything longer is not one.
const MAX_REFRESH_TOKEN_BYTES: usize = 128;
const REFRESH_PREFIX: &str = "rt_";

/// The auth use cases.
pub struct Accounts {
    store: AuthStore,
    ring: Arc<KeyRing>,
    published: StaticSource,
    verifier: Verifier,
    passwords: Passwords,
    per_account: FailureLimiter<String>,
    per_ip: FailureLimiter<IpAddr>,
    users: UserDirectory,
    tokens: TokenSettings,
    audit: Arc<Recorder>,
}

/// The access token's claims as issued (the verifier's [`Claims`] plus
/// nothing it would not read).
#[derive(Serialize)]
struct Issued<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a [String],
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    roles: &'a [String],
    tenant: &'a str,
}

fn store_error(err: Failure) -> Error {
    match err {
        Failure::Duplicate => Error::internal("a stored row collided"),
        Failure::Unavailable(detail) => {
            tracing::warn!(error = %detail, "auth store unavailable");
            Error::unavailable("the auth store is unavailable; retry later")
                .with_retry_after(Duration::from_secs(1))
        }
        Failure::Other(detail) => {
            tracing::error!(error = %detail, "auth store error");
            Error::internal("the auth store failed")
        }
    }
}

fn invalid_credentials() -> Error {
    Error::new(
        Code::Unauthenticated,
        "INVALID_CREDENTIALS",
        "the email or password is wrong",
    )
}

fn invalid_grant() -> Error {
    Error::new(
        Code::Unauthenticated,
        "INVALID_GRANT",
        "the refresh token is invalid, expired or revoked",
    )
}

fn ms_to_secs(ms: i64) -> u64 {
    u64::try_from(ms.max(0) / 1000).unwrap_or(0)
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The email as stored: trimmed, lower-cased, checked.
pub fn normalise_email(email: &str) -> Result<String, Error> {
    let email = email.trim().to_lowercase();
    let valid = email.len() <= 254
        && email
            .split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'))
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid {
        Ok(email)
    } else {
        Err(Error::invalid_argument(
            "email",
            "must be an email address (name@domain), at most 254 characters",
        ))
    }
}

impl Accounts {
    /// The use cases over their parts.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: AuthStore,
        ring: Arc<KeyRing>,
        passwords: Passwords,
        limits: LoginLimits,
        users: UserDirectory,
        tokens: TokenSettings,
        audit: Arc<Recorder>,
    ) -> Result<Accounts, String> {
        let published = StaticSource::default();
        let mut config = VerifierConfig::new(tokens.issuer.clone(), "");
        config.audiences = tokens.audience.clone();
        config.realm = tokens.issuer.clone();
        let verifier = Verifier::new(
            config,
            Jwks::new(published.clone(), trellis::auth::JwksTiming::default()),
        )?;
        Ok(Accounts {
            store,
            ring,
            published,
            verifier,
            passwords,
            per_account: FailureLimiter::new(limits.per_account, limits.window, 100_000),
            per_ip: FailureLimiter::new(limits.per_ip, limits.window, 100_000),
            users,
            tokens,
            audit,
        })
    }

    /// The key ring.
    pub fn ring(&self) -> &Arc<KeyRing> {
        &self.ring
    }

    /// The store.
    pub fn store(&self) -> &AuthStore {
        &self.store
    }

    /// Reloads the keys from the store and republishes them to the
    /// service's own verifier.
    pub async fn reload_keys(&self) -> Result<usize, Error> {
        let n = self.ring.reload(&self.store).await.map_err(store_error)?;
        let keys = self
            .ring
            .published(now_ms())
            .iter()
            .map(|k| k.key.jwk().clone())
            .collect();
        self.published.set(trellis::auth::JwkSet { keys });
        if let Err(e) = self.verifier.keys().load().await {
            tracing::warn!(error = %e, "own key set not loaded");
        }
        Ok(n)
    }

    async fn record(&self, mut entry: Entry, caller: &Caller, refusal: bool) {
        entry.client_ip = caller.ip.map(|ip| ip.to_string());
        entry.trace_id = trellis::auth::audit::current_trace_id();
        self.audit.record(entry, refusal).await;
    }

    /// Creates an account: the user in the user service, then its
    /// credentials. If the credentials cannot be stored the user is deleted
    /// again.
    pub async fn register(
        &self,
        email: &str,
        password: &str,
        display_name: &str,
        caller: &Caller,
    ) -> Result<Credential, Error> {
        let email = normalise_email(email)?;
        let chars = password.chars().count();
        if chars < MIN_PASSWORD_CHARS || password.len() > MAX_PASSWORD_BYTES {
            return Err(Error::invalid_argument(
                "password",
                format!(
                    "must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_BYTES} bytes long ({chars} characters given)"
                ),
            ));
        }
        let taken = || {
            Error::already_exists(
                "EMAIL_TAKEN",
                format!("an account with email {email} already exists"),
            )
            .with_metadata("field", "email")
        };
        if self
            .store
            .credential_by_email(&email)
            .await
            .map_err(store_error)?
            .is_some()
        {
            return Err(taken());
        }
        // The slow part before any side effect.
        let password_hash = self.passwords.hash(password).await?;
        let user_id =
            self.users
                .create(&email, display_name)
                .await
                .map_err(|e| match e.code() {
                    Code::AlreadyExists => taken(),
                    _ => e,
                })?;
        let credential = Credential {
            user_id: user_id.clone(),
            email: email.clone(),
            password_hash,
            roles: self.tokens.default_roles.clone(),
            tenant: self.tokens.tenant.clone(),
            create_time_ms: now_ms(),
        };
        if let Err(err) = self.store.insert_credential(&credential).await {
            if let Err(undo) = self.users.delete(&user_id).await {
                tracing::error!(user = %user_id, error = %undo, "a user without credentials is left behind");
            }
            return Err(match err {
                Failure::Duplicate => taken(),
                other => store_error(other),
            });
        }
        let mut entry = Entry::new("register", "Register", "ok");
        entry.subject = Some(user_id);
        entry.tenant = Some(credential.tenant.clone());
        self.record(entry, caller, false).await;
        Ok(credential)
    }

    /// Checks an email and password and hands out tokens. Takes the same
    /// time whether or not the account exists; refuses a caller or account
    /// with too many recent failures.
    pub async fn login(
        &self,
        email: &str,
        password: &str,
        caller: &Caller,
    ) -> Result<Tokens, Error> {
        // Bad shapes cost nothing and say nothing about accounts.
        let email = normalise_email(email).map_err(|_| invalid_credentials())?;
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(invalid_credentials());
        }
        let now = Instant::now();
        let wait = self
            .per_account
            .blocked(&email, now)
            .into_iter()
            .chain(caller.ip.and_then(|ip| self.per_ip.blocked(&ip, now)))
            .max();
        if let Some(wait) = wait {
            self.record(
                Entry::new("login", "Login", "refused: too many attempts"),
                caller,
                true,
            )
            .await;
            return Err(Error::new(
                Code::ResourceExhausted,
                "TOO_MANY_ATTEMPTS",
                "too many failed logins; wait before trying again",
            )
            .with_retry_after(wait.max(Duration::from_secs(1))));
        }
        let credential = self
            .store
            .credential_by_email(&email)
            .await
            .map_err(store_error)?;
        let ok = self
            .passwords
            .verify(
                password,
                credential.as_ref().map(|c| c.password_hash.as_str()),
            )
            .await?;
        let credential = match (ok, credential) {
            (true, Some(c)) => c,
            (_, known) => {
                let now = Instant::now();
                self.per_account.fail(&email, now);
                if let Some(ip) = caller.ip {
                    self.per_ip.fail(&ip, now);
                }
                let mut entry = Entry::new("login", "Login", "failed");
                entry.subject = known.map(|c| c.user_id);
                self.record(entry, caller, true).await;
                return Err(invalid_credentials());
            }
        };
        self.per_account.clear(&email);
        let family = uuid::Uuid::now_v7().to_string();
        let refresh = self.new_refresh(&credential.user_id, &family)?;
        self.store
            .insert_refresh(&refresh.1)
            .await
            .map_err(store_error)?;
        let tokens = self.tokens_for(&credential, refresh.0)?;
        let mut entry = Entry::new("login", "Login", "ok");
        entry.subject = Some(credential.user_id.clone());
        entry.tenant = Some(credential.tenant.clone());
        self.record(entry, caller, false).await;
        Ok(tokens)
    }

    fn new_refresh(&self, user_id: &str, family: &str) -> Result<(String, RefreshRow), Error> {
        let token = format!(
            "{REFRESH_PREFIX}{}",
            keys::random_token(32).map_err(|e| Error::internal(e.to_string()))?
        );
        let now = now_ms();
        let row = RefreshRow {
            token_hash: keys::digest(&token),
            family_id: family.to_owned(),
            user_id: user_id.to_owned(),
            create_time_ms: now,
            expire_time_ms: now.saturating_add(duration_ms(self.tokens.refresh_ttl)),
            rotate_time_ms: None,
            revoke_time_ms: None,
        };
        Ok((token, row))
    }

    /// Signs an access token for `credential` with the current key.
    pub fn access_token(&self, credential: &Credential) -> Result<String, Error> {
        let now = now_ms();
        let key = self.ring.signing(now).ok_or_else(|| {
            tracing::error!("no signing key is active");
            Error::unavailable("no signing key is active yet")
        })?;
        let iat = ms_to_secs(now);
        let claims = Issued {
            iss: &self.tokens.issuer,
            sub: &credential.user_id,
            aud: &self.tokens.audience,
            exp: iat + self.tokens.access_ttl.as_secs(),
            nbf: iat,
            iat,
            jti: uuid::Uuid::now_v7().to_string(),
            roles: &credential.roles,
            tenant: &credential.tenant,
        };
        key.key
            .sign(&claims)
            .map_err(|e| Error::internal(format!("signing failed: {e}")))
    }

    fn tokens_for(&self, credential: &Credential, refresh: String) -> Result<Tokens, Error> {
        Ok(Tokens {
            access_token: self.access_token(credential)?,
            expires_in: self.tokens.access_ttl.as_secs(),
            refresh_token: refresh,
            refresh_expires_in: self.tokens.refresh_ttl.as_secs(),
        })
    }

    async fn live_refresh(&self, token: &str) -> Result<Option<RefreshRow>, Error> {
        if token.len() > MAX_REFRESH_TOKEN_BYTES || !token.starts_with(REFRESH_PREFIX) {
            return Ok(None);
        }
        self.store
            .refresh_token(&keys::digest(token))
            .await
            .map_err(store_error)
    }

    /// Exchanges a refresh token for new tokens. A token used before (past
    /// the grace window) revokes its whole family.
    pub async fn refresh(&self, token: &str, caller: &Caller) -> Result<Tokens, Error> {
        let now = now_ms();
        let refuse = |outcome: &'static str, row: Option<&RefreshRow>| {
            let mut entry = Entry::new("refresh", "Refresh", outcome);
            entry.subject = row.map(|r| r.user_id.clone());
            entry
        };
        let Some(row) = self.live_refresh(token).await? else {
            self.record(refuse("refused: unknown token", None), caller, true)
                .await;
            return Err(invalid_grant());
        };
        if row.revoke_time_ms.is_some() {
            self.record(refuse("refused: revoked", Some(&row)), caller, true)
                .await;
            return Err(invalid_grant());
        }
        if row.expire_time_ms <= now {
            self.record(refuse("refused: expired", Some(&row)), caller, true)
                .await;
            return Err(invalid_grant());
        }
        let grace_since = now.saturating_sub(duration_ms(self.tokens.reuse_grace));
        let (new_token, new_row) = self.new_refresh(&row.user_id, &row.family_id)?;
        // First as an unused token; if it was used already — before we
        // read it or since — as a retry inside the grace window; past the
        // window it is a reuse.
        let mut current = row.clone();
        let mut retried;
        loop {
            let used_since = match current.rotate_time_ms {
                None => None,
                Some(used) if used >= grace_since => Some(grace_since),
                Some(_) => return Err(self.reuse_detected(&current, now, caller).await),
            };
            let rotation = self
                .store
                .rotate(&row.token_hash, &new_row, now, used_since)
                .await
                .map_err(store_error)?;
            retried = used_since.is_some();
            if rotation == Rotation::Rotated {
                break;
            }
            match self
                .store
                .refresh_token(&row.token_hash)
                .await
                .map_err(store_error)?
            {
                // Used by a concurrent request: decide again on what it is now.
                Some(r) if r.revoke_time_ms.is_none() && r.rotate_time_ms.is_some() && !retried => {
                    current = r;
                }
                _ => {
                    self.record(refuse("refused: revoked", Some(&row)), caller, true)
                        .await;
                    return Err(invalid_grant());
                }
            }
        }
        let credential = self
            .store
            .credential_by_user(&row.user_id)
            .await
            .map_err(store_error)?
            .ok_or_else(invalid_grant)?;
        let tokens = self.tokens_for(&credential, new_token)?;
        let mut entry = Entry::new(
            "refresh",
            "Refresh",
            if retried {
                "ok: retried inside the grace window"
            } else {
                "ok"
            },
        );
        entry.subject = Some(credential.user_id);
        entry.tenant = Some(credential.tenant);
        self.record(entry, caller, false).await;
        Ok(tokens)
    }

    async fn reuse_detected(&self, row: &RefreshRow, now: i64, caller: &Caller) -> Error {
        let revoked = match self.store.revoke_family(&row.family_id, now).await {
            Ok(n) => n,
            Err(e) => return store_error(e),
        };
        tracing::warn!(
            user = %row.user_id,
            family = %row.family_id,
            revoked,
            "a used refresh token was presented again: its family is revoked"
        );
        let mut entry = Entry::new("refresh", "Refresh", "refused: reuse detected");
        entry.subject = Some(row.user_id.clone());
        entry.resource = Some(row.family_id.clone());
        self.record(entry, caller, false).await;
        invalid_grant()
    }

    /// Revokes the refresh token's family. An unknown token is not an
    /// error (RFC 7009 §2.2): the answer is the same either way.
    pub async fn logout(&self, token: &str, caller: &Caller) -> Result<(), Error> {
        let Some(row) = self.live_refresh(token).await? else {
            return Ok(());
        };
        let revoked = self
            .store
            .revoke_family(&row.family_id, now_ms())
            .await
            .map_err(store_error)?;
        let mut entry = Entry::new("logout", "Logout", "ok");
        entry.subject = Some(row.user_id);
        entry.resource = Some(format!("{} tokens revoked", revoked));
        self.record(entry, caller, false).await;
        Ok(())
    }

    /// What a token is, if it is active: an access token verified against
    /// the published keys, or a live refresh token.
    pub async fn introspect(&self, token: &str) -> Result<Introspection, Error> {
        if token.starts_with(REFRESH_PREFIX) {
            let now = now_ms();
            let Some(row) = self.live_refresh(token).await? else {
                return Ok(Introspection::default());
            };
            if row.revoke_time_ms.is_some()
                || row.rotate_time_ms.is_some()
                || row.expire_time_ms <= now
            {
                return Ok(Introspection::default());
            }
            return Ok(Introspection {
                active: true,
                token_type: "refresh_token".into(),
                claims: Some(Claims {
                    iss: self.tokens.issuer.clone(),
                    sub: row.user_id,
                    aud: self.tokens.audience.clone(),
                    exp: ms_to_secs(row.expire_time_ms),
                    nbf: None,
                    iat: Some(ms_to_secs(row.create_time_ms)),
                    jti: None,
                    roles: Vec::new(),
                    permissions: Vec::new(),
                    scope: None,
                    tenant: None,
                }),
            });
        }
        match self.verifier.verify(token).await {
            Ok(claims) => Ok(Introspection {
                active: true,
                token_type: "access_token".into(),
                claims: Some(Claims::clone(&claims)),
            }),
            Err(_) => Ok(Introspection::default()),
        }
    }

    /// The keys verifiers should know now.
    pub fn jwks(&self) -> Vec<crate::api::v1::JsonWebKey> {
        self.ring
            .published(now_ms())
            .iter()
            .map(|k| keys::to_api(&k.key))
            .collect()
    }

    /// The token settings.
    pub fn settings(&self) -> &TokenSettings {
        &self.tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(
            normalise_email("  Ann@Example.COM ").unwrap(),
            "ann@example.com"
        );
        for bad in ["", "ann", "@example.com", "ann@example", "a n@example.com"] {
            assert!(normalise_email(bad).is_err(), "{bad:?}");
        }
        assert!(normalise_email(&format!("{}@example.com", "a".repeat(250))).is_err());
    }
}
