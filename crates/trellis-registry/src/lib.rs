//! Service registration and discovery.
//!
//! An instance publishes itself through a [`Registry`] and stays published
//! (lease renewals, re-registration after the lease is lost) until its
//! [`Registration`] is deregistered. Clients follow a service through
//! [`Discovery::watch`]: a `watch` channel that always holds the last known
//! instance set, so a client keeps calling known endpoints while the
//! registry itself is unreachable.
//!
//! Backends are chosen by URL ([`connect`]):
//!
//! | URL | backend | feature |
//! |---|---|---|
//! | `memory://` | [`MemoryRegistry`], shared by everything in the process (what `trellis up` uses) | always |
//! | `etcd://host:port[,host:port]` | [`EtcdRegistry`]: key `/trellis/services/{service}/{id}`, JSON value, lease TTL 5 s | `etcd` |
//! | anything else | a backend of your own, added with [`register_backend`] (it implements [`Registry`], [`Discovery`] and a [`Session`] per registration) | — |
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), trellis_registry::RegistryError> {
//! use trellis_registry::{Discovery, Instance, Registry};
//!
//! let registry = trellis_registry::connect("memory://").await?;
//! let mut users = registry.watch("user").await?;
//! let registration = registry
//!     .register(Instance::new("user", "user-1").with_endpoint("grpc", "127.0.0.1:8082"))
//!     .await?;
//! users.wait_for(|set| set.len() == 1).await.ok();
//! assert_eq!(users.borrow()[0].endpoint("grpc"), Some("127.0.0.1:8082"));
//! registration.deregister().await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

#[cfg(feature = "etcd")]
mod etcd;
mod instance;
mod memory;

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock, PoisonError, RwLock},
    time::Duration,
};

use tokio::sync::watch;

#[cfg(feature = "etcd")]
pub use etcd::{EtcdOptions, EtcdRegistry};
pub use instance::{
    Instance, InvalidInstance, MAX_ENTRIES, MAX_ENTRY_BYTES, MAX_NAME_BYTES, MAX_RECORD_BYTES,
    WEIGHTS,
};
pub use memory::MemoryRegistry;

/// A boxed future, so the traits can be used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The instances of one service as last known; replaced whole on each change.
pub type InstanceSet = Arc<[Instance]>;

/// What can go wrong talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry URL is malformed or names an unknown backend.
    #[error("invalid registry URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The registry could not be reached or answered with an error.
    #[error("registry {endpoint} unavailable: {reason}")]
    Unavailable {
        /// Which registry.
        endpoint: String,
        /// The underlying error.
        reason: String,
    },
    /// An instance breaks the record limits and cannot be published.
    #[error("instance {service}/{id} cannot be published: {invalid}")]
    Invalid {
        /// Its service.
        service: String,
        /// Its id.
        id: String,
        /// The field and the limit it breaks.
        invalid: InvalidInstance,
    },
    /// A stored instance could not be decoded.
    #[error("instance at {key} is not valid JSON: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// The decoder's complaint.
        reason: String,
    },
}

/// Publishes instances.
pub trait Registry: Send + Sync + 'static {
    /// Publishes `instance` and keeps it published until the returned
    /// [`Registration`] is deregistered (or dropped, which deregisters in the
    /// background).
    fn register(&self, instance: Instance) -> BoxFuture<'_, Result<Registration, RegistryError>>;
}

/// Finds instances.
pub trait Discovery: Send + Sync + 'static {
    /// Follows `service`: the receiver holds the current instance set and is
    /// updated on every change; while the registry is unreachable it keeps
    /// the last known set.
    fn watch(
        &self,
        service: &str,
    ) -> BoxFuture<'_, Result<watch::Receiver<InstanceSet>, RegistryError>>;

    /// A one-off listing of `service`, or of every service when `None`,
    /// with the time left on each instance's lease where the backend has one.
    fn list(&self, service: Option<&str>) -> BoxFuture<'_, Result<Vec<Listed>, RegistryError>>;
}

/// One instance in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The instance.
    pub instance: Instance,
    /// Time left on its lease (`None` for backends without leases).
    pub ttl_left: Option<Duration>,
}

/// Refuses to publish an instance that clients would ignore.
pub(crate) fn check_publishable(instance: &Instance) -> Result<(), RegistryError> {
    instance.check().map_err(|invalid| RegistryError::Invalid {
        service: instance.service.chars().take(64).collect(),
        id: instance.id.chars().take(64).collect(),
        invalid,
    })
}

/// Counts a stored record a client ignored (`registry_records_rejected_total{field}`).
#[cfg(feature = "etcd")]
pub(crate) fn count_rejected(invalid: &InvalidInstance) {
    metrics::counter!("registry_records_rejected_total", "field" => invalid.field).increment(1);
}

/// Both halves, as backends implement them.
pub trait ServiceRegistry: Registry + Discovery {}
impl<T: Registry + Discovery> ServiceRegistry for T {}

/// A backend's handle on one published instance: what keeps it published
/// (a lease renewal task, a heartbeat) and how to take it down. A backend
/// outside this crate implements it and hands it to [`Registration::new`].
pub trait Session: Send + 'static {
    /// Removes the instance and stops keeping it published.
    fn deregister(self: Box<Self>) -> BoxFuture<'static, Result<(), RegistryError>>;
}

/// A published instance. [`deregister`](Registration::deregister) removes it
/// at once; dropping it removes it in the background.
pub struct Registration {
    session: Option<Box<dyn Session>>,
}

impl Registration {
    /// A registration a backend's [`Registry::register`] returns.
    pub fn new(session: impl Session) -> Self {
        Registration {
            session: Some(Box::new(session)),
        }
    }

    /// Removes the instance from the registry and stops renewing it.
    pub async fn deregister(mut self) -> Result<(), RegistryError> {
        match self.session.take() {
            Some(session) => session.deregister().await,
            None => Ok(()),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(session) = self.session.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(async move {
                let _ = session.deregister().await;
            });
        }
    }
}

/// Opens a backend from its whole URL (`scheme://...`).
pub type Opener = Arc<
    dyn Fn(&str) -> BoxFuture<'static, Result<Arc<dyn ServiceRegistry>, RegistryError>>
        + Send
        + Sync,
>;

/// The backends [`connect`] knows, by scheme.
fn backends() -> &'static RwLock<BTreeMap<String, Opener>> {
    static BACKENDS: OnceLock<RwLock<BTreeMap<String, Opener>>> = OnceLock::new();
    BACKENDS.get_or_init(|| {
        let mut table: BTreeMap<String, Opener> = BTreeMap::new();
        table.insert(
            "memory".into(),
            Arc::new(|_url: &str| {
                Box::pin(async {
                    Ok(Arc::new(MemoryRegistry::global()) as Arc<dyn ServiceRegistry>)
                })
            }),
        );
        #[cfg(feature = "etcd")]
        table.insert(
            "etcd".into(),
            Arc::new(|url: &str| {
                let rest = url.split_once("://").map_or("", |(_, rest)| rest);
                let options =
                    EtcdOptions::from_url_rest(rest).map_err(|reason| RegistryError::InvalidUrl {
                        url: url.to_owned(),
                        reason,
                    });
                Box::pin(async move {
                    let registry = EtcdRegistry::connect(options?).await?;
                    Ok(Arc::new(registry) as Arc<dyn ServiceRegistry>)
                })
            }),
        );
        RwLock::new(table)
    })
}

/// Makes `scheme://...` URLs open a backend of your own (Consul,
/// Kubernetes endpoints, a test double): after this, [`connect`] — and so
/// every `registry.url` setting and `trellis` flag — reaches it. A later
/// call for the same scheme replaces the earlier one. The opener gets the
/// whole URL.
pub fn register_backend(
    scheme: &str,
    open: impl Fn(&str) -> BoxFuture<'static, Result<Arc<dyn ServiceRegistry>, RegistryError>>
    + Send
    + Sync
    + 'static,
) {
    backends()
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(scheme.to_owned(), Arc::new(open));
}

/// Opens the registry named by `url` (see the table above, and
/// [`register_backend`] for backends of your own).
pub async fn connect(url: &str) -> Result<Arc<dyn ServiceRegistry>, RegistryError> {
    let invalid = |reason: &str| RegistryError::InvalidUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let (scheme, _) = url
        .split_once("://")
        .ok_or_else(|| invalid("expected scheme://..., e.g. memory:// or etcd://127.0.0.1:2379"))?;
    let open = {
        let table = backends().read().unwrap_or_else(PoisonError::into_inner);
        match table.get(scheme) {
            Some(open) => open.clone(),
            None => {
                let known: Vec<String> = table.keys().map(|k| format!("{k}://")).collect();
                let hint = if scheme == "etcd" {
                    " (this build has no etcd support: cargo feature `etcd`)"
                } else {
                    ""
                };
                return Err(invalid(&format!(
                    "unknown registry {scheme:?}{hint}; known: {}",
                    known.join(", ")
                )));
            }
        }
    };
    open(url).await
}
