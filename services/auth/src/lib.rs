//! The shop's auth service: registration, login, rotating refresh tokens
//! and the keys that sign access tokens, over gRPC and REST from one proto
//! (`proto/shop/auth/v1/auth.proto`).
//!
//! - **Passwords**: Argon2id at OWASP's cost (19 MiB, 2 passes, 1 lane) or
//!   stronger, hashed off the async threads with a bound on how many run
//!   at once; a login for an unknown account does the same work against a
//!   decoy hash, so timing does not tell which emails exist. Failed logins
//!   are limited per account and per client address.
//! - **Access tokens**: JWTs signed with Ed25519 (ES256 by config) carrying
//!   `iss`, `aud`, `sub`, `exp`, `iat`, `nbf`, `jti`, `kid`, `roles` and
//!   `tenant`; verified anywhere against `/.well-known/jwks.json` by
//!   `trellis_auth` (the gateway's `[jwt]`, a service's `server.auth`).
//! - **Refresh tokens**: opaque, stored as SHA-256, rotated on every use; a
//!   used token presented again revokes its whole family (RFC 9700
//!   §4.14.2), after a short grace window for a lost response.
//! - **Keys**: stored sealed (AES-256-GCM under `keys.encryption_key`),
//!   published before they sign and until their tokens have expired
//!   ([`keys`]); `trellis auth keys rotate` makes the next one.
//! - **Accounts are users**: registering creates the user in the user
//!   service; its id is the tokens' subject.
//!
//! Laid out like `shop-user`: [`api`] generated, [`service`] the gRPC face,
//! [`biz`] the rules, [`data`] the store.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use shop_auth::{AuthService, AuthSettings};
//! use trellis::{App, config::Config, service::bind, transport::ServerConfig};
//!
//! let config = Config::<AuthSettings>::builder()
//!     .file("auth.toml")
//!     .set("--users", [("users.endpoint", "http://127.0.0.1:8082")])
//!     .build()
//!     .await?;
//! let service = bind::<AuthService>(config, "./.trellis".as_ref(), ServerConfig::default()).await?;
//! service.into_app(App::builder("auth")).run().await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod api;
pub mod biz;
pub mod data;
pub mod keys;
pub mod limiter;
pub mod passwords;
pub mod service;
pub mod users;

use std::{net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use trellis::{
    auth::audit::{AuditSettings, Recorder},
    config::{Invalid, Secret, Validate},
    core::BoxError,
    service::{Context, Service},
    settings::{LogSettings, OtlpSettings, ServerSettings},
    transport::GrpcHttpServerBuilder,
};
use trellis_store::DatabaseSettings;

/// The auth service's configuration (`auth.toml`, `TRELLIS_*`, etcd
/// `{prefix}auth/`).
///
/// ```toml
/// public_url = "https://shop.example.com"   # links in the discovery document
///
/// [tokens]
/// issuer = "https://shop.example.com"
/// audience = ["shop"]
/// access_ttl = "15m"
/// refresh_ttl = "30d"
/// reuse_grace = "10s"
///
/// [keys]
/// algorithm = "EdDSA"                       # or ES256, RS256
/// encryption_key = "${AUTH_KEY_ENCRYPTION_KEY}"   # 32 bytes, base64
///
/// [login]
/// max_failures_per_account = 5
/// max_failures_per_ip = 50
/// failure_window = "15m"
///
/// [users]
/// endpoint = "http://user:8082"             # unset: discovered as `user`
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuthSettings {
    /// Server limits and timeouts.
    pub server: ServerSettings,
    /// Logging.
    pub log: LogSettings,
    /// OTLP export of traces, metrics and logs; trace sampling.
    pub otlp: OtlpSettings,
    /// Where credentials, refresh tokens and keys are stored.
    pub database: DatabaseSettings,
    /// Where clients reach the service (through the gateway): the base of
    /// the discovery document's links. Default `http://127.0.0.1:8080`.
    pub public_url: String,
    /// What tokens say and how long they live.
    pub tokens: TokenSettings,
    /// Signing keys.
    pub keys: KeySettings,
    /// Password cost and failed-login limits.
    pub login: LoginSettings,
    /// Where the user service is.
    pub users: UsersSettings,
    /// The audit trail of every decision; default `auth-audit.jsonl` in
    /// the data dir.
    pub audit: Option<AuditSettings>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        let mut server = ServerSettings::default();
        // A login is tens of milliseconds of hashing by design; callers
        // queue for the hashing permits. Shed only a queue that stands far
        // longer than one hash, not the ordinary wait for a permit.
        server.shedding.queue_delay = Some(Duration::from_millis(250));
        AuthSettings {
            server,
            log: LogSettings::default(),
            otlp: OtlpSettings::default(),
            database: DatabaseSettings::default(),
            public_url: "http://127.0.0.1:8080".into(),
            tokens: TokenSettings::default(),
            keys: KeySettings::default(),
            login: LoginSettings::default(),
            users: UsersSettings::default(),
            audit: None,
        }
    }
}

/// What tokens say and how long they live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenSettings {
    /// `iss`. Default `trellis`.
    pub issuer: String,
    /// `aud`. Default `["shop"]`.
    pub audience: Vec<String>,
    /// Access-token lifetime. Default 15m.
    #[serde(with = "trellis::config::duration")]
    pub access_ttl: Duration,
    /// Refresh-token lifetime (from its issue; each rotation starts a new
    /// one). Default 30d.
    #[serde(with = "trellis::config::duration")]
    pub refresh_ttl: Duration,
    /// How long after its use a refresh token may be presented again
    /// without revoking its family (a response lost on the way). Default
    /// 10s; 0 turns it off.
    #[serde(with = "trellis::config::duration")]
    pub reuse_grace: Duration,
    /// Roles of a new account. Default `["customer"]`.
    pub default_roles: Vec<String>,
    /// The tenant of new accounts. Default `default`.
    pub tenant: String,
}

impl Default for TokenSettings {
    fn default() -> Self {
        TokenSettings {
            issuer: "trellis".into(),
            audience: vec!["shop".into()],
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            reuse_grace: Duration::from_secs(10),
            default_roles: vec!["customer".into()],
            tenant: "default".into(),
        }
    }
}

/// Signing keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KeySettings {
    /// The algorithm of keys made: `EdDSA` (Ed25519, default), `ES256`
    /// (P-256) or `RS256` (RSA-2048, for verifiers that take nothing newer).
    pub algorithm: String,
    /// The key that seals private keys at rest: 32 bytes, base64. Unset:
    /// a file (`encryption_key_file`) created on first start.
    pub encryption_key: Option<Secret<String>>,
    /// Where the generated key encryption key lives when
    /// `encryption_key` is unset. Default `auth-keys.secret` in the data dir.
    pub encryption_key_file: Option<PathBuf>,
    /// How often the key table is read again (keys rotated elsewhere).
    /// Default 10s.
    #[serde(with = "trellis::config::duration")]
    pub reload_interval: Duration,
}

impl Default for KeySettings {
    fn default() -> Self {
        KeySettings {
            algorithm: "EdDSA".into(),
            encryption_key: None,
            encryption_key_file: None,
            reload_interval: Duration::from_secs(10),
        }
    }
}

/// Password cost and failed-login limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoginSettings {
    /// Failed logins per account per window before it is refused. Default 5.
    pub max_failures_per_account: u32,
    /// Failed logins per client address per window. Default 50.
    pub max_failures_per_ip: u32,
    /// The window. Default 15m.
    #[serde(with = "trellis::config::duration")]
    pub failure_window: Duration,
    /// Peers whose `X-Forwarded-For` is believed (the gateway). Default
    /// the loopback addresses.
    pub trusted_proxies: Vec<IpAddr>,
    /// Argon2id memory in KiB (at least 19456). Default 19456.
    pub argon2_memory_kib: u32,
    /// Argon2id passes (at least 2). Default 2.
    pub argon2_iterations: u32,
    /// Argon2id lanes. Default 1.
    pub argon2_parallelism: u32,
    /// Hashes computed at once (each holds `argon2_memory_kib`); more wait.
    /// Default: twice the CPUs.
    pub max_concurrent_hashes: Option<usize>,
}

impl Default for LoginSettings {
    fn default() -> Self {
        LoginSettings {
            max_failures_per_account: 5,
            max_failures_per_ip: 50,
            failure_window: Duration::from_secs(15 * 60),
            trusted_proxies: vec![
                IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
                IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            ],
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
            argon2_parallelism: 1,
            max_concurrent_hashes: None,
        }
    }
}

/// Where the user service is and how it is called.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UsersSettings {
    /// A fixed address (`http://host:port`); unset, the service `user` is
    /// discovered through the registry.
    pub endpoint: Option<String>,
    /// The client: timeout, retries, breaker, balancer, and `tls` (the
    /// shop's CA and this service's certificate, for mutual TLS).
    pub client: trellis::settings::ClientSettings,
}

fn between(key: &str, value: Duration, min: Duration, max: Duration) -> Result<(), Invalid> {
    Invalid::check_range(key, value, min, max)
}

impl Validate for AuthSettings {
    fn validate(&self) -> Result<(), Invalid> {
        trellis::service::check_common(&self.server, &self.otlp)?;
        self.database.validate("database")?;
        let t = &self.tokens;
        if t.issuer.is_empty() {
            return Err(Invalid::new("tokens.issuer", "must not be empty"));
        }
        if t.audience.is_empty() || t.audience.iter().any(String::is_empty) {
            return Err(Invalid::new(
                "tokens.audience",
                "name at least one, none empty",
            ));
        }
        between(
            "tokens.access_ttl",
            t.access_ttl,
            Duration::from_secs(10),
            Duration::from_secs(24 * 3600),
        )?;
        between(
            "tokens.refresh_ttl",
            t.refresh_ttl,
            t.access_ttl,
            Duration::from_secs(365 * 24 * 3600),
        )?;
        between(
            "tokens.reuse_grace",
            t.reuse_grace,
            Duration::ZERO,
            Duration::from_secs(120),
        )?;
        keys::algorithm(&self.keys.algorithm)
            .map_err(|e| Invalid::new("keys.algorithm", e.to_string()))?;
        if let Some(key) = &self.keys.encryption_key {
            keys::Sealer::from_base64(key.expose(), "keys.encryption_key")
                .map_err(|e| Invalid::new("keys.encryption_key", e.to_string()))?;
        }
        between(
            "keys.reload_interval",
            self.keys.reload_interval,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?;
        let l = &self.login;
        if l.max_failures_per_account == 0 || l.max_failures_per_ip == 0 {
            return Err(Invalid::new(
                "login.max_failures_per_account",
                "failure limits must be at least 1",
            ));
        }
        between(
            "login.failure_window",
            l.failure_window,
            Duration::from_secs(1),
            Duration::from_secs(24 * 3600),
        )?;
        if l.argon2_memory_kib < 19 * 1024 {
            return Err(Invalid::new(
                "login.argon2_memory_kib",
                "must be at least 19456 (OWASP's minimum for Argon2id)",
            ));
        }
        if l.argon2_iterations < 2 {
            return Err(Invalid::new(
                "login.argon2_iterations",
                "must be at least 2",
            ));
        }
        if !(1..=16).contains(&l.argon2_parallelism) {
            return Err(Invalid::new(
                "login.argon2_parallelism",
                "must be between 1 and 16",
            ));
        }
        if l.max_concurrent_hashes == Some(0) {
            return Err(Invalid::new(
                "login.max_concurrent_hashes",
                "must be at least 1",
            ));
        }
        self.users.client.validate("users.client")?;
        if let Some(endpoint) = &self.users.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(Invalid::new(
                "users.endpoint",
                "must be an http:// or https:// URL",
            ));
        }
        Ok(())
    }
}

trellis::service_settings!(AuthSettings);

/// The service's name: in the registry, on its spans and log lines.
pub const SERVICE: &str = "auth";

pub use trellis_store::now_ms;

/// The key encryption key the settings name: `keys.encryption_key`, or
/// the file (created on first use).
pub fn sealer(
    settings: &AuthSettings,
    data_dir: &std::path::Path,
) -> Result<keys::Sealer, keys::KeyError> {
    match &settings.keys.encryption_key {
        Some(key) => keys::Sealer::from_base64(key.expose(), "keys.encryption_key"),
        None => keys::Sealer::from_file(
            &settings
                .keys
                .encryption_key_file
                .clone()
                .unwrap_or_else(|| data_dir.join("auth-keys.secret")),
        ),
    }
}

/// The store the settings name (SQLite `auth.db` in the data dir by default).
pub async fn open_store(
    settings: &AuthSettings,
    data_dir: &std::path::Path,
) -> Result<data::AuthStore, trellis_store::StoreError> {
    data::AuthStore::open(&settings.database, &data_dir.join("auth.db")).await
}

/// The auth service: its store and the task that follows the key table.
pub struct AuthService {
    store: data::AuthStore,
    reload: tokio::task::JoinHandle<()>,
}

impl Service for AuthService {
    type Settings = AuthSettings;
    const NAME: &'static str = SERVICE;
    const PORT_OFFSET: u16 = 1;
    const DESCRIPTORS: &'static [u8] = api::FILE_DESCRIPTOR_SET;
    const GRPC_SERVICES: &'static [&'static str] = &["shop.auth.v1.AuthService"];

    /// Opens the store, loads (or makes the first) signing key, and adds
    /// the gRPC service.
    async fn build(
        ctx: Context<'_, AuthSettings>,
        server: GrpcHttpServerBuilder,
    ) -> Result<(AuthService, GrpcHttpServerBuilder), BoxError> {
        let settings = ctx.settings;
        let store = open_store(settings, ctx.data_dir).await?;
        let sealer = sealer(settings, ctx.data_dir)?;
        let ring = Arc::new(keys::KeyRing::new(
            sealer,
            // A retired key stays published while its tokens may be valid,
            // with a minute for verifiers' leeway.
            settings.tokens.access_ttl + Duration::from_secs(60),
        ));
        if store.keys().await.map_err(|e| e.to_string())?.is_empty() {
            let alg = keys::algorithm(&settings.keys.algorithm)?;
            let key = keys::create(&store, ring.sealer(), alg, Duration::ZERO).await?;
            tracing::info!(kid = %key.kid, alg = %key.alg, "made the first signing key");
        }
        let users = match &settings.users.endpoint {
            Some(url) => {
                let mut client = trellis::transport::ClientConfig::default();
                if let Some(tls) = &settings.users.client.tls {
                    client.tls = Some(tls.follow()?);
                }
                users::UserDirectory::Direct(
                    shop_user::api::v1::user_service_client::UserServiceClient::new(
                        trellis::transport::connect_lazy(url, &client)?,
                    ),
                )
            }
            None => {
                let registry = ctx.discovery.ok_or(
                    "users.endpoint is unset and there is no registry to discover the user service in",
                )?;
                let discovery: &dyn trellis::registry::Discovery = registry.as_ref();
                users::UserDirectory::Discovered(
                    shop_user::api::v1::user_service_client::UserServiceClient::new(
                        trellis::resilient_client_with(
                            discovery,
                            shop_user::SERVICE,
                            &settings.users.client,
                        )
                        .await?,
                    ),
                )
            }
        };
        let l = &settings.login;
        let passwords = passwords::Passwords::new(
            passwords::Cost {
                memory_kib: l.argon2_memory_kib,
                iterations: l.argon2_iterations,
                parallelism: l.argon2_parallelism,
            },
            l.max_concurrent_hashes
                .unwrap_or_else(|| 2 * std::thread::available_parallelism().map_or(1, |n| n.get())),
        )?;
        let audit = settings.audit.clone().unwrap_or_else(|| AuditSettings {
            file: ctx.data_dir.join("auth-audit.jsonl"),
            max_refusals_per_second: 100,
        });
        let accounts = Arc::new(biz::Accounts::new(
            store.clone(),
            ring,
            passwords,
            biz::LoginLimits {
                per_account: l.max_failures_per_account,
                per_ip: l.max_failures_per_ip,
                window: l.failure_window,
            },
            users,
            settings.tokens.clone(),
            Arc::new(Recorder::open(&audit)?),
        )?);
        accounts.reload_keys().await?;
        let reload = {
            let accounts = accounts.clone();
            let every = settings.keys.reload_interval;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    if let Err(e) = accounts.reload_keys().await {
                        tracing::warn!(error = %e, "signing keys not reloaded");
                    }
                }
            })
        };
        let handler = service::AuthServiceHandler::new(
            accounts,
            &settings.login.trusted_proxies,
            &settings.public_url,
        );
        let server = server.grpc_service(api::v1::auth_service_server::AuthServiceServer::new(
            handler,
        ));
        Ok((AuthService { store, reload }, server))
    }

    /// Stops following the keys and closes the store.
    async fn stop(self) {
        self.reload.abort();
        self.store.close().await;
    }
}

/// What `trellis auth keys ls` shows of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    /// The key as stored (sealed).
    pub key: data::StoredKey,
    /// `pending`, `active`, `retiring` (published, no longer signing),
    /// `retired` (no longer published) or `unreadable` (it does not open
    /// under the key encryption key in force).
    pub state: &'static str,
}

/// Makes the next signing key, signing `activate_in` from now (published
/// at once): `trellis auth keys rotate`. Running instances pick it up
/// within `keys.reload_interval`.
pub async fn rotate_key(
    settings: &AuthSettings,
    data_dir: &std::path::Path,
    activate_in: Duration,
) -> Result<data::StoredKey, BoxError> {
    let store = open_store(settings, data_dir).await?;
    let sealer = sealer(settings, data_dir)?;
    let alg = keys::algorithm(&settings.keys.algorithm)?;
    let made = keys::create(&store, &sealer, alg, activate_in).await;
    store.close().await;
    made
}

/// Every stored key with its state now: `trellis auth keys ls`.
pub async fn key_status(
    settings: &AuthSettings,
    data_dir: &std::path::Path,
) -> Result<Vec<KeyStatus>, BoxError> {
    let store = open_store(settings, data_dir).await?;
    let ring = keys::KeyRing::new(
        sealer(settings, data_dir)?,
        settings.tokens.access_ttl + Duration::from_secs(60),
    );
    ring.reload(&store).await?;
    let stored = store.keys().await?;
    store.close().await;
    let now = now_ms();
    let signing = ring.signing(now).map(|k| k.key.kid().to_owned());
    let published: Vec<String> = ring
        .published(now)
        .iter()
        .map(|k| k.key.kid().to_owned())
        .collect();
    Ok(stored
        .into_iter()
        .map(|key| {
            let state = if !ring.contains(&key.kid) {
                "unreadable"
            } else if key.activate_time_ms > now {
                "pending"
            } else if signing.as_deref() == Some(key.kid.as_str()) {
                "active"
            } else if published.contains(&key.kid) {
                "retiring"
            } else {
                "retired"
            };
            KeyStatus { key, state }
        })
        .collect())
}
