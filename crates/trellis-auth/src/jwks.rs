//! Key sets (JWKS, RFC 7517): where they come from, and the cache the
//! verifier reads.
//!
//! The cache holds the last good set. A token naming a `kid` the set does
//! not have makes it fetch again — at most once per cooldown, one fetch at a
//! time — so a key published by the issuer is found at once, while a flood
//! of made-up `kid`s costs one fetch per cooldown. A set older than the
//! refresh interval is fetched again in the background. A fetch that fails
//! keeps the last good set (stale keys are served while the JWKS endpoint
//! is down); only a cache that never loaded refuses (503).
//!
//! A `kid` is only ever a map key: never a path, a URL or a query. Keys
//! whose `use` is not `sig`, symmetric (`oct`) keys and keys of unsupported
//! types are skipped; a set is at most [`MAX_JWKS_BYTES`] and
//! [`MAX_KEYS`] keys.

use std::{
    collections::HashMap,
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm, PublicKeyUse},
};
use tracing::warn;

/// The largest key set document read.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// The most keys a set may hold; the rest are ignored.
pub const MAX_KEYS: usize = 64;
/// The longest `kid` looked up.
pub const MAX_KID_BYTES: usize = 256;

/// The future a [`KeySource`] returns.
pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<JwkSet, String>> + Send + 'a>>;

/// Where a key set comes from: a URL, a file, or the process itself (an
/// issuer in the same process).
pub trait KeySource: Send + Sync + 'static {
    /// The current key set.
    fn fetch(&self) -> FetchFuture<'_>;
    /// For logs and errors: the URL or path.
    fn describe(&self) -> String;
}

/// A key set at an `http://` or `https://` URL (`/.well-known/jwks.json`).
pub struct UrlSource {
    uri: http::Uri,
    tls: Option<tokio_rustls::TlsConnector>,
    timeout: Duration,
}

impl UrlSource {
    /// The set at `url`; HTTPS trusts `ca_file`, or the system's roots
    /// without one. Fetches give up after 5 s.
    pub fn new(url: &str, ca_file: Option<&std::path::Path>) -> Result<UrlSource, String> {
        UrlSource::with_identity(url, ca_file, None)
    }

    /// [`new`](Self::new), presenting a client certificate and key (PEM
    /// files) to a key set served over mutual TLS.
    pub fn with_identity(
        url: &str,
        ca_file: Option<&std::path::Path>,
        identity: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<UrlSource, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => Some(crate::fetch::tls_connector(ca_file, identity)?),
            Some("http") => None,
            _ => return Err(format!("{url:?}: expected an http:// or https:// URL")),
        };
        if uri.host().is_none() {
            return Err(format!("{url:?}: no host"));
        }
        Ok(UrlSource {
            uri,
            tls,
            timeout: Duration::from_secs(5),
        })
    }
}

impl KeySource for UrlSource {
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            let body =
                crate::fetch::get(&self.uri, self.tls.as_ref(), self.timeout, MAX_JWKS_BYTES)
                    .await?;
            parse(&body)
        })
    }

    fn describe(&self) -> String {
        self.uri.to_string()
    }
}

/// A key set in a file, read again on every fetch.
pub struct FileSource(pub PathBuf);

impl KeySource for FileSource {
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(async move {
            let len = tokio::fs::metadata(&self.0)
                .await
                .map_err(|e| format!("{}: {e}", self.0.display()))?
                .len();
            if len > MAX_JWKS_BYTES as u64 {
                return Err(format!(
                    "{}: {len} bytes, over {MAX_JWKS_BYTES}",
                    self.0.display()
                ));
            }
            let body = tokio::fs::read(&self.0)
                .await
                .map_err(|e| format!("{}: {e}", self.0.display()))?;
            parse(&body).map_err(|e| format!("{}: {e}", self.0.display()))
        })
    }

    fn describe(&self) -> String {
        self.0.display().to_string()
    }
}

/// A key set held in the process — an issuer next to its verifier — that
/// the issuer can replace (a key rotation) with [`StaticSource::set`].
#[derive(Clone, Default)]
pub struct StaticSource(Arc<ArcSwap<JwkSet>>);

impl StaticSource {
    /// Starts with `keys`.
    pub fn new(keys: JwkSet) -> StaticSource {
        StaticSource(Arc::new(ArcSwap::from_pointee(keys)))
    }

    /// Replaces the set: verifiers see it on their next fetch (an unknown
    /// `kid` or the refresh interval).
    pub fn set(&self, keys: JwkSet) {
        self.0.store(Arc::new(keys));
    }
}

impl KeySource for StaticSource {
    fn fetch(&self) -> FetchFuture<'_> {
        let keys = JwkSet::clone(&self.0.load());
        Box::pin(async move { Ok(keys) })
    }

    fn describe(&self) -> String {
        "in process".to_owned()
    }
}

fn parse(body: &[u8]) -> Result<JwkSet, String> {
    // Parsed loosely first so one unsupported key does not make the whole
    // set unreadable.
    #[derive(serde::Deserialize)]
    struct Loose {
        keys: Vec<serde_json::Value>,
    }
    let loose: Loose = serde_json::from_slice(body).map_err(|e| format!("not a JWK set: {e}"))?;
    Ok(JwkSet {
        keys: loose
            .keys
            .into_iter()
            .take(MAX_KEYS)
            .filter_map(|k| serde_json::from_value(k).ok())
            .collect(),
    })
}

/// A key the verifier can use.
#[derive(Clone)]
pub(crate) struct Key {
    pub(crate) decoding: DecodingKey,
    /// The algorithm the set pins the key to, if it does.
    pub(crate) alg: Option<Algorithm>,
}

#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Key>,
    /// Keys without a `kid`.
    anonymous: Vec<Key>,
    fetched: Option<Instant>,
}

impl KeySet {
    fn from_jwks(set: &JwkSet) -> KeySet {
        let mut keys = KeySet {
            fetched: Some(Instant::now()),
            ..KeySet::default()
        };
        for jwk in set.keys.iter().take(MAX_KEYS) {
            if jwk
                .common
                .public_key_use
                .as_ref()
                .is_some_and(|u| *u != PublicKeyUse::Signature)
                || matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_))
            {
                continue;
            }
            let alg = match jwk.common.key_algorithm {
                None => None,
                Some(a) => match signing_algorithm(a) {
                    Some(a) => Some(a),
                    None => continue,
                },
            };
            let Ok(decoding) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            let key = Key { decoding, alg };
            match &jwk.common.key_id {
                Some(kid) if kid.len() <= MAX_KID_BYTES => {
                    keys.by_kid.insert(kid.clone(), key);
                }
                Some(_) => {}
                None => keys.anonymous.push(key),
            }
        }
        keys
    }

    fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<Key> {
        let fits = |k: &&Key| k.alg.is_none_or(|a| a == alg) && k.decoding.family() == alg.family();
        match kid {
            Some(kid) => self.by_kid.get(kid).filter(fits).cloned(),
            // Without a kid, only when exactly one key fits.
            None => {
                let mut fitting = self.by_kid.values().chain(&self.anonymous).filter(fits);
                match (fitting.next(), fitting.next()) {
                    (Some(one), None) => Some(one.clone()),
                    _ => None,
                }
            }
        }
    }
}

fn signing_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        _ => return None,
    })
}

/// How often a key set is fetched.
#[derive(Debug, Clone, Copy)]
pub struct JwksTiming {
    /// A set older than this is fetched again in the background (5 min).
    pub refresh: Duration,
    /// At most one fetch for unknown `kid`s per this long (10 s).
    pub cooldown: Duration,
}

impl Default for JwksTiming {
    fn default() -> Self {
        JwksTiming {
            refresh: Duration::from_secs(300),
            cooldown: Duration::from_secs(10),
        }
    }
}

/// Why a key could not be found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyMiss {
    /// The set has no key with that `kid` (and algorithm).
    Unknown,
    /// No set has ever been fetched.
    Unavailable,
}

/// How often a set that never loaded is tried again, at most.
const UNLOADED_RETRY: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Fetching {
    /// The last fetch of any kind.
    last_attempt: Option<Instant>,
    /// The last fetch an unknown kid caused.
    last_miss: Option<Instant>,
}

/// The cached key set of one source (see the module docs).
pub struct Jwks {
    source: Box<dyn KeySource>,
    timing: JwksTiming,
    keys: ArcSwap<KeySet>,
    /// One fetch at a time, and when the last ones started.
    fetching: tokio::sync::Mutex<Fetching>,
    /// Moves on every set fetched, so verified-token caches drop their
    /// entries when keys change (a key withdrawn stops verifying at once).
    generation: AtomicU64,
}

impl Jwks {
    /// A cache over `source`; nothing is fetched until [`load`](Self::load)
    /// or the first token.
    pub fn new(source: impl KeySource, timing: JwksTiming) -> Arc<Jwks> {
        Arc::new(Jwks {
            source: Box::new(source),
            timing,
            keys: ArcSwap::from_pointee(KeySet::default()),
            fetching: tokio::sync::Mutex::new(Fetching::default()),
            generation: AtomicU64::new(0),
        })
    }

    /// Fetches the set now, whatever the cooldown; the error says why the
    /// fetch failed (the last good set stays).
    pub async fn load(&self) -> Result<usize, String> {
        let mut fetching = self.fetching.lock().await;
        fetching.last_attempt = Some(Instant::now());
        self.fetch_locked().await
    }

    /// Fetches the set unless one has been fetched already (a start-up
    /// warm-up that never doubles a fetch a first token made).
    pub async fn warm(&self) -> Result<usize, String> {
        let mut fetching = self.fetching.lock().await;
        let keys = self.keys.load();
        if keys.fetched.is_some() {
            return Ok(keys.by_kid.len() + keys.anonymous.len());
        }
        fetching.last_attempt = Some(Instant::now());
        self.fetch_locked().await
    }

    async fn fetch_locked(&self) -> Result<usize, String> {
        match self.source.fetch().await {
            Ok(set) => {
                let keys = KeySet::from_jwks(&set);
                let count = keys.by_kid.len() + keys.anonymous.len();
                self.keys.store(Arc::new(keys));
                self.generation.fetch_add(1, Ordering::Release);
                metrics::counter!("auth_jwks_fetches_total", "result" => "ok").increment(1);
                Ok(count)
            }
            Err(e) => {
                metrics::counter!("auth_jwks_fetches_total", "result" => "error").increment(1);
                warn!(source = %self.source.describe(), error = %e, "key set fetch failed; the last good keys stay");
                Err(e)
            }
        }
    }

    /// The generation of the keys in force (see the field).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The key for a token's `kid` and `alg`: from the cache, or after one
    /// fetch if the cooldown allows.
    pub(crate) async fn key(
        self: &Arc<Self>,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Key, KeyMiss> {
        let keys = self.keys.load();
        if let Some(key) = keys.find(kid, alg) {
            if keys
                .fetched
                .is_some_and(|at| at.elapsed() > self.timing.refresh)
            {
                self.refresh_in_background();
            }
            return Ok(key);
        }
        let seen = self.generation();
        let never_loaded = keys.fetched.is_none();
        drop(keys);
        {
            let mut fetching = self.fetching.lock().await;
            // Another request fetched while this one waited: look again.
            if self.generation() == seen {
                let now = Instant::now();
                // An unknown kid in a loaded set: one fetch per cooldown. A
                // set that never loaded: one attempt per second at most.
                let (since, wait) = if never_loaded {
                    (
                        fetching.last_attempt,
                        self.timing.cooldown.min(UNLOADED_RETRY),
                    )
                } else {
                    (fetching.last_miss, self.timing.cooldown)
                };
                if since.is_none_or(|at| now.duration_since(at) >= wait) {
                    fetching.last_attempt = Some(now);
                    if !never_loaded {
                        fetching.last_miss = Some(now);
                    }
                    let _ = self.fetch_locked().await;
                }
            }
        }
        let keys = self.keys.load();
        match keys.find(kid, alg) {
            Some(key) => Ok(key),
            None if never_loaded && keys.fetched.is_none() => Err(KeyMiss::Unavailable),
            None => Err(KeyMiss::Unknown),
        }
    }

    fn refresh_in_background(self: &Arc<Self>) {
        let jwks = self.clone();
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        handle.spawn(async move {
            // A fetch already running is this refresh.
            let Ok(mut fetching) = jwks.fetching.try_lock() else {
                return;
            };
            if fetching
                .last_attempt
                .is_some_and(|at| at.elapsed() < jwks.timing.cooldown)
            {
                return;
            }
            fetching.last_attempt = Some(Instant::now());
            let _ = jwks.fetch_locked().await;
        });
    }

    /// The source, for logs.
    pub fn describe(&self) -> String {
        self.source.describe()
    }
}
