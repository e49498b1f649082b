//! Where configuration comes from: the [`Source`] trait, and the built-in
//! sources — files, the environment, fixed settings and (feature `etcd`)
//! an etcd prefix — that implement it.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use notify::RecommendedWatcher;
use tokio::sync::mpsc;

use crate::{ConfigError, files::FileSources, value::Layer};

/// A boxed future, so sources can be trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A place configuration comes from: files, the environment, etcd, or one
/// of your own (Consul KV, a secrets manager) added with
/// [`ConfigBuilder::source`](crate::ConfigBuilder::source).
///
/// The store loads every source once when the config is built (an error
/// fails the build: a service must not start on a config it cannot read),
/// then, for each source, waits on [`changed`](Source::changed) and loads it
/// again; the merged result is published only if it parses and validates,
/// otherwise the last good config stays and the error is counted.
///
/// ```
/// use serde_json::json;
/// use trellis_config::{BoxFuture, ConfigError, Layer, Source};
///
/// /// Settings fixed at start, e.g. from command-line flags.
/// struct Flags(Vec<(String, String)>);
///
/// impl Source for Flags {
///     fn load(&mut self) -> BoxFuture<'_, Result<Vec<Layer>, ConfigError>> {
///         let layer = Layer::from_settings("flags", self.0.clone());
///         Box::pin(async move { Ok(vec![layer]) })
///     }
///     fn changed(&mut self) -> BoxFuture<'_, bool> {
///         Box::pin(async { false }) // never changes
///     }
/// }
/// ```
pub trait Source: Send + 'static {
    /// The source's layers as they are now, lowest first (a directory of
    /// files gives one per file).
    fn load(&mut self) -> BoxFuture<'_, Result<Vec<Layer>, ConfigError>>;

    /// Resolves `true` when the source may have changed and should be
    /// loaded again, `false` when it never will change again.
    fn changed(&mut self) -> BoxFuture<'_, bool>;
}

pub(crate) type EnvLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Files and directories, with `${ENV}` placeholders, watched for edits.
pub(crate) struct Files {
    files: FileSources,
    lookup: EnvLookup,
    debounce: Duration,
    events: Option<(RecommendedWatcher, mpsc::Receiver<()>)>,
}

impl Files {
    /// Watching the files' directories when `watch`.
    pub(crate) fn new(
        files: FileSources,
        lookup: EnvLookup,
        watch: bool,
        debounce: Duration,
    ) -> Result<Files, ConfigError> {
        let events = if watch && !files.is_empty() {
            let (tx, rx) = mpsc::channel(1);
            Some((files.watch(tx)?, rx))
        } else {
            None
        };
        Ok(Files {
            files,
            lookup,
            debounce,
            events,
        })
    }
}

impl Source for Files {
    fn load(&mut self) -> BoxFuture<'_, Result<Vec<Layer>, ConfigError>> {
        let loaded = self.files.load(&*self.lookup);
        Box::pin(std::future::ready(loaded))
    }

    fn changed(&mut self) -> BoxFuture<'_, bool> {
        let debounce = self.debounce;
        Box::pin(async move {
            let Some((_watcher, events)) = self.events.as_mut() else {
                return false;
            };
            if events.recv().await.is_none() {
                return false;
            }
            // Wait for the burst of events of one save to end.
            while let Ok(Some(())) = tokio::time::timeout(debounce, events.recv()).await {}
            true
        })
    }
}

/// Layers that never change: the environment, fixed settings.
pub(crate) struct Fixed(pub(crate) Vec<Layer>);

impl Source for Fixed {
    fn load(&mut self) -> BoxFuture<'_, Result<Vec<Layer>, ConfigError>> {
        Box::pin(std::future::ready(Ok(self.0.clone())))
    }

    fn changed(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(std::future::ready(false))
    }
}
