//! The config store: evaluates layers into a typed snapshot and keeps it
//! current as sources change, never publishing a value that failed.

use std::{
    marker::PhantomData,
    path::PathBuf,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{
            AtomicU64,
            Ordering::{Acquire, Release},
        },
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Serialize, de::DeserializeOwned};

use tokio::sync::{mpsc, watch};
use tracing::{error, info};

use crate::{
    ConfigError, Validate,
    files::FileSources,
    source::{EnvLookup, Files, Fixed, Source},
    value::{Layer, env_layer, merge},
};

/// One applied configuration.
#[derive(Debug)]
pub struct Snapshot<T> {
    /// The typed value.
    pub config: T,
    /// A hash of the merged document: equal versions, equal configs.
    pub version: String,
    /// When this snapshot was applied.
    pub applied_at: SystemTime,
    /// Each layer that contributed, with its own version where it has one
    /// (etcd's revision).
    pub sources: Vec<(String, Option<String>)>,
}

#[derive(Default)]
struct Stats {
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// The failure count, published after each rejection.
    rejected: watch::Sender<u64>,
}

/// A typed configuration that stays current. Cheap to clone.
pub struct Config<T> {
    rx: watch::Receiver<Arc<Snapshot<T>>>,
    stats: Arc<Stats>,
}

impl<T> Clone for Config<T> {
    fn clone(&self) -> Self {
        Config {
            rx: self.rx.clone(),
            stats: self.stats.clone(),
        }
    }
}

/// Builds a [`Config`]: add sources, then [`build`](Self::build).
///
/// Precedence, lowest first: the type's defaults, [`file`](Self::file)s in
/// the order given, the [`env`](Self::env)ironment, then
/// [`set`](Self::set) settings, [`etcd`](Self::etcd) and your own
/// [`source`](Self::source)s in the order they were added.
pub struct ConfigBuilder<T> {
    files: FileSources,
    env_prefix: Option<String>,
    env: Option<Vec<(String, String)>>,
    upper: Vec<Upper>,
    watch: bool,
    debounce: Duration,
    _type: PhantomData<fn() -> T>,
}

/// A source above the environment, opened at build time.
enum Upper {
    Ready(Box<dyn Source>),
    #[cfg(feature = "etcd")]
    Etcd(Vec<String>, String, trellis_etcd::EtcdTls),
}

impl<T> Config<T>
where
    T: DeserializeOwned + Validate + Send + Sync + 'static,
{
    /// Starts a builder with no sources (defaults only), watching on.
    pub fn builder() -> ConfigBuilder<T> {
        ConfigBuilder {
            files: FileSources::default(),
            env_prefix: None,
            env: None,
            upper: Vec::new(),
            watch: true,
            debounce: Duration::from_millis(150),
            _type: PhantomData,
        }
    }
}

impl<T> ConfigBuilder<T>
where
    T: DeserializeOwned + Validate + Send + Sync + 'static,
{
    /// A file (TOML/YAML/JSON by extension) or a directory of them.
    pub fn file(mut self, path: impl Into<PathBuf>) -> Self {
        self.files.push(path.into());
        self
    }

    /// The environment layer: variables `{prefix}_A__B` set `a.b`.
    pub fn env(mut self, prefix: impl Into<String>) -> Self {
        self.env_prefix = Some(prefix.into());
        self
    }

    /// Uses these variables instead of the process environment (for the
    /// environment layer and placeholders); for tests and embedding.
    pub fn env_vars(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        self.env = Some(vars.into_iter().collect());
        self
    }

    /// Fixed settings above the environment (`database.url` →
    /// `postgres://…`), read as [`Layer::from_settings`] reads them; for
    /// command-line flags. `source` names them in errors.
    pub fn set<K: AsRef<str>, V: AsRef<str>>(
        mut self,
        source: impl Into<String>,
        settings: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let layer = Layer::from_settings(source, settings);
        self.upper.push(Upper::Ready(Box::new(Fixed(vec![layer]))));
        self
    }

    /// An etcd key prefix (`{prefix}a/b` or `{prefix}a.b` sets `a.b`),
    /// mirrored and followed.
    #[cfg(feature = "etcd")]
    pub fn etcd(self, endpoints: Vec<String>, prefix: impl Into<String>) -> Self {
        self.etcd_tls(endpoints, prefix, trellis_etcd::EtcdTls::default())
    }

    /// [`etcd`](Self::etcd) over TLS (`https://` endpoints).
    #[cfg(feature = "etcd")]
    pub fn etcd_tls(
        mut self,
        endpoints: Vec<String>,
        prefix: impl Into<String>,
        tls: trellis_etcd::EtcdTls,
    ) -> Self {
        self.upper.push(Upper::Etcd(endpoints, prefix.into(), tls));
        self
    }

    /// A source of your own (see [`Source`]).
    pub fn source(mut self, source: impl Source) -> Self {
        self.upper.push(Upper::Ready(Box::new(source)));
        self
    }

    /// Whether to follow changes (default true).
    pub fn watch(mut self, watch: bool) -> Self {
        self.watch = watch;
        self
    }

    /// How long file changes must be quiet before a reload (default 150 ms).
    pub fn debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// Loads every source once (any error fails the build: a service must
    /// not start on a config it cannot read), then follows changes.
    pub async fn build(self) -> Result<Config<T>, ConfigError> {
        let env_vars: Vec<(String, String)> = self
            .env
            .clone()
            .unwrap_or_else(|| std::env::vars().collect());
        let lookup: EnvLookup = {
            let vars = env_vars.clone();
            Arc::new(move |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
        };
        let mut sources: Vec<Box<dyn Source>> = vec![Box::new(Files::new(
            self.files,
            lookup,
            self.watch,
            self.debounce,
        )?)];
        if let Some(prefix) = self.env_prefix.as_deref() {
            sources.push(Box::new(Fixed(vec![env_layer(prefix, env_vars)])));
        }
        for upper in self.upper {
            sources.push(match upper {
                Upper::Ready(source) => source,
                #[cfg(feature = "etcd")]
                Upper::Etcd(endpoints, prefix, tls) => {
                    Box::new(crate::etcd::RemoteSource::connect(&endpoints, &prefix, &tls).await?)
                }
            });
        }
        let mut layers = Vec::with_capacity(sources.len());
        for source in &mut sources {
            layers.push(source.load().await?);
        }
        let first = evaluate::<T>(&layers.concat())?;
        info!(version = %first.version, "config loaded");
        let (tx, rx) = watch::channel(Arc::new(first));
        let stats = Arc::new(Stats::default());

        if self.watch {
            let (changes_tx, changes) = mpsc::channel(sources.len().max(1));
            for (index, source) in sources.into_iter().enumerate() {
                tokio::spawn(follow(index, source, changes_tx.clone()));
            }
            let pipeline = Pipeline {
                tx,
                stats: stats.clone(),
            };
            tokio::spawn(pipeline.run(layers, changes));
        }
        Ok(Config { rx, stats })
    }
}

/// A source's new layers, by its place in the order.
type Change = (usize, Result<Vec<Layer>, ConfigError>);

/// Loads `source` again on each change until it says it never changes or
/// the config is dropped.
async fn follow(index: usize, mut source: Box<dyn Source>, changes: mpsc::Sender<Change>) {
    loop {
        tokio::select! {
            _ = changes.closed() => return,
            more = source.changed() => if !more { return },
        }
        let loaded = source.load().await;
        if changes.send((index, loaded)).await.is_err() {
            return;
        }
    }
}

struct Pipeline<T> {
    tx: watch::Sender<Arc<Snapshot<T>>>,
    stats: Arc<Stats>,
}

impl<T> Pipeline<T>
where
    T: DeserializeOwned + Validate + Send + Sync + 'static,
{
    /// Applies changes; `accepted` holds each source's last layers that
    /// evaluated cleanly, so a rejected change never poisons a later one.
    async fn run(self, mut accepted: Vec<Vec<Layer>>, mut changes: mpsc::Receiver<Change>) {
        let mut open = true;
        loop {
            tokio::select! {
                _ = self.tx.closed() => return,
                change = changes.recv(), if open => match change {
                    // Every source is static or gone: nothing more will change.
                    None => open = false,
                    Some((index, Ok(layers))) => {
                        let mut candidate = accepted.clone();
                        candidate[index] = layers;
                        if self.apply(&candidate.concat()) {
                            accepted = candidate;
                        }
                    }
                    Some((_, Err(err))) => self.reject(&err),
                },
            }
        }
    }

    /// Evaluates `candidate`; publishes it if it differs. Returns whether it was accepted.
    fn apply(&self, candidate: &[Layer]) -> bool {
        match evaluate::<T>(candidate) {
            Ok(snapshot) => {
                let changed = self.tx.borrow().version != snapshot.version;
                if changed {
                    info!(version = %snapshot.version, "config applied");
                    self.tx.send_replace(Arc::new(snapshot));
                }
                true
            }
            Err(err) => {
                self.reject(&err);
                false
            }
        }
    }

    fn reject(&self, err: &ConfigError) {
        // The text first, then the count: whoever sees the count rise
        // also sees the error that raised it.
        *self
            .stats
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(err.to_string());
        let count = self.stats.failures.fetch_add(1, Release) + 1;
        self.stats.rejected.send_replace(count);
        metrics::counter!("config_reload_failures_total").increment(1);
        error!(error = %err, "config update rejected; keeping the last good config");
    }
}

/// Checks one setting against `T` before it is written anywhere: the
/// defaults plus `key = value` (value read as the environment and etcd
/// layers read it) must parse and validate. Used by `trellis config set`.
pub fn check_setting<T: DeserializeOwned + Validate>(
    key: &str,
    value: &str,
) -> Result<(), ConfigError> {
    let segments: Vec<String> = key
        .split(['/', '.'])
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if segments.is_empty() {
        return Err(ConfigError::Type {
            key: key.to_owned(),
            source_name: "the command line".into(),
            reason: "empty key".into(),
        });
    }
    let mut doc = serde_json::Value::Object(serde_json::Map::new());
    crate::value::set_path(&mut doc, &segments, crate::value::scalar(value));
    evaluate::<T>(&[Layer {
        source: "the command line".into(),
        doc,
        version: None,
    }])
    .map(drop)
}

/// Whether `key` names a [`Secret`](crate::Secret) in `T` (or a part of
/// one): tools that print settings (`trellis config get|set|watch`) show
/// `[redacted]` for it. Found by reading a probe value into `T` at `key` and
/// seeing how `T` writes it back.
pub fn is_secret<T: DeserializeOwned + Serialize>(key: &str) -> bool {
    let segments: Vec<String> = key
        .split(['/', '.'])
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if segments.is_empty() {
        return false;
    }
    [
        serde_json::Value::String("probe".into()),
        serde_json::json!(1),
        serde_json::json!(true),
        serde_json::json!({}),
    ]
    .into_iter()
    .any(|probe| {
        let mut doc = serde_json::Value::Object(serde_json::Map::new());
        crate::value::set_path(&mut doc, &segments, probe);
        let Ok(typed) = serde_json::from_value::<T>(doc) else {
            return false;
        };
        let Ok(back) = serde_json::to_value(&typed) else {
            return false;
        };
        // The probe, or the secret that holds it, reads back as REDACTED.
        let mut at = &back;
        for segment in &segments {
            if at.as_str() == Some(trellis_core::REDACTED) {
                return true;
            }
            match at.get(segment) {
                Some(next) => at = next,
                None => return false,
            }
        }
        at.as_str() == Some(trellis_core::REDACTED)
    })
}

/// Merges, deserializes, checks for unknown keys and validates.
fn evaluate<T: DeserializeOwned + Validate>(layers: &[Layer]) -> Result<Snapshot<T>, ConfigError> {
    let merged = merge(layers);
    let source = |key: &str| merged.source_of(key).unwrap_or("defaults").to_owned();
    let mut unknown: Vec<String> = Vec::new();
    let mut on_unknown = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let de = serde_ignored::Deserializer::new(merged.doc.clone(), &mut on_unknown);
    let config: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        ConfigError::Type {
            source_name: source(&key),
            key,
            reason: e.inner().to_string(),
        }
    })?;
    // The environment carries much besides config; only other sources must be exact.
    if let Some(key) = unknown.into_iter().find(|k| !source(k).starts_with("env ")) {
        return Err(ConfigError::Type {
            source_name: source(&key),
            key,
            reason: "unknown key".into(),
        });
    }
    config.validate().map_err(|invalid| ConfigError::Invalid {
        source_name: source(&invalid.key),
        key: invalid.key,
        reason: invalid.message,
    })?;
    let canonical = serde_json::to_string(&merged.doc).unwrap_or_default();
    Ok(Snapshot {
        config,
        version: format!("{:016x}", fnv1a(canonical.as_bytes())),
        applied_at: SystemTime::now(),
        sources: layers
            .iter()
            .map(|l| (l.source.clone(), l.version.clone()))
            .collect(),
    })
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl<T: Send + Sync + 'static> Config<T> {
    /// The config in force now.
    pub fn current(&self) -> Arc<Snapshot<T>> {
        self.rx.borrow().clone()
    }

    /// A receiver of every applied snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot<T>>> {
        self.rx.clone()
    }

    /// A receiver of one part of the config that changes only when that
    /// part changes (not on every reload).
    pub fn section<S, F>(&self, select: F) -> watch::Receiver<S>
    where
        S: PartialEq + Send + Sync + 'static,
        F: Fn(&T) -> S + Send + 'static,
    {
        let mut rx = self.rx.clone();
        let (tx, out) = watch::channel(select(&rx.borrow_and_update().config));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    changed = rx.changed() => if changed.is_err() { return },
                }
                let next = select(&rx.borrow_and_update().config);
                tx.send_if_modified(|current| {
                    if *current == next {
                        false
                    } else {
                        *current = next;
                        true
                    }
                });
            }
        });
        out
    }

    /// Updates rejected since start (`config_reload_failures_total`).
    pub fn reload_failures(&self) -> u64 {
        self.stats.failures.load(Acquire)
    }

    /// The number of rejected updates as it changes: a new value after
    /// each rejection (its text is already in [`last_error`](Self::last_error)).
    pub fn rejections(&self) -> watch::Receiver<u64> {
        self.stats.rejected.subscribe()
    }

    /// The most recent rejection, if any.
    pub fn last_error(&self) -> Option<String> {
        self.stats
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl<T: Serialize + Send + Sync + 'static> Config<T> {
    /// What `/debug/config` shows: the config (secrets redacted), its
    /// version and time, its sources, and the reload failures.
    pub fn debug_view(&self) -> serde_json::Value {
        let snapshot = self.current();
        let applied_ms = snapshot
            .applied_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        serde_json::json!({
            "version": snapshot.version,
            "applied_at_unix_ms": applied_ms,
            "sources": snapshot.sources.iter().map(|(s, v)| serde_json::json!({"source": s, "version": v})).collect::<Vec<_>>(),
            "config_reload_failures_total": self.reload_failures(),
            "last_error": self.last_error(),
            "config": serde_json::to_value(&snapshot.config).unwrap_or(serde_json::Value::Null),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    #[serde(default)]
    struct Probe {
        a: u32,
        nested: Nested,
    }
    #[derive(Debug, Default, Deserialize)]
    #[serde(default)]
    struct Nested {
        b: u32,
    }
    impl Default for Probe {
        fn default() -> Self {
            Probe {
                a: 1000,
                nested: Nested { b: 2000 },
            }
        }
    }
    impl Validate for Probe {}

    fn layer(source: &str, a: Option<u32>, b: Option<u32>) -> Layer {
        let mut doc = json!({});
        if let Some(a) = a {
            doc["a"] = json!(a);
        }
        if let Some(b) = b {
            doc["nested"] = json!({ "b": b });
        }
        Layer {
            source: source.into(),
            doc,
            version: None,
        }
    }

    proptest! {
        /// For every key, the highest layer that sets it wins: defaults <
        /// file < directory file < env < remote; and the error path names
        /// that same layer.
        #[test]
        fn the_highest_layer_that_sets_a_key_wins(
            values in proptest::collection::vec((proptest::option::of(0u32..100), proptest::option::of(0u32..100)), 4)
        ) {
            let names = ["file a.toml", "file conf.d/b.yaml", "env APP_*", "etcd /p/"];
            let layers: Vec<Layer> = values.iter().zip(names).map(|((a, b), n)| layer(n, *a, *b)).collect();
            let snapshot = evaluate::<Probe>(&layers).unwrap();
            let top_a = values.iter().rev().find_map(|v| v.0);
            let top_b = values.iter().rev().find_map(|v| v.1);
            prop_assert_eq!(snapshot.config.a, top_a.unwrap_or(1000));
            prop_assert_eq!(snapshot.config.nested.b, top_b.unwrap_or(2000));
            let merged = merge(&layers);
            let expected_source = values.iter().zip(names).rev().find(|(v, _)| v.0.is_some()).map(|(_, n)| n);
            prop_assert_eq!(merged.source_of("a"), expected_source);
        }
    }

    #[derive(Debug, Default, Deserialize, Serialize)]
    #[serde(default)]
    struct WithSecrets {
        name: String,
        db: DbSettings,
    }
    #[derive(Debug, Default, Deserialize, Serialize)]
    #[serde(default)]
    struct DbSettings {
        url: Option<crate::Secret<String>>,
        pool: u32,
        token: crate::Secret<u32>,
    }

    #[test]
    fn secrets_are_found_by_key() {
        assert!(is_secret::<WithSecrets>("db.url"));
        assert!(is_secret::<WithSecrets>("db/url"));
        assert!(is_secret::<WithSecrets>("db.token"));
        assert!(!is_secret::<WithSecrets>("db.pool"));
        assert!(!is_secret::<WithSecrets>("name"));
        assert!(!is_secret::<WithSecrets>("nope"));
        assert!(!is_secret::<WithSecrets>(""));
    }

    #[test]
    fn equal_content_has_equal_versions() {
        let one = evaluate::<Probe>(&[layer("x", Some(1), None)]).unwrap();
        let two = evaluate::<Probe>(&[layer("y", Some(1), None)]).unwrap();
        let three = evaluate::<Probe>(&[layer("x", Some(2), None)]).unwrap();
        assert_eq!(one.version, two.version);
        assert_ne!(one.version, three.version);
    }
}
