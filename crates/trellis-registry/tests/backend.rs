//! A registry backend that lives outside the crate: it implements the
//! public traits, hands out its own sessions, and is reached through
//! `connect(url)` once registered under its scheme.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use tokio::sync::watch;
use trellis_registry::{
    BoxFuture, Discovery, Instance, InstanceSet, Listed, MemoryRegistry, Registration, Registry,
    RegistryError, ServiceRegistry, Session,
};

/// Keeps instances in a private in-process registry and counts the
/// sessions it ended, standing in for Consul or Kubernetes.
#[derive(Clone)]
struct Counting {
    inner: MemoryRegistry,
    ended: Arc<AtomicUsize>,
}

struct CountingSession {
    inner: Registration,
    ended: Arc<AtomicUsize>,
}

impl Session for CountingSession {
    fn deregister(self: Box<Self>) -> BoxFuture<'static, Result<(), RegistryError>> {
        Box::pin(async move {
            self.inner.deregister().await?;
            self.ended.fetch_add(1, SeqCst);
            Ok(())
        })
    }
}

impl Registry for Counting {
    fn register(&self, instance: Instance) -> BoxFuture<'_, Result<Registration, RegistryError>> {
        Box::pin(async move {
            let inner = self.inner.register(instance).await?;
            Ok(Registration::new(CountingSession {
                inner,
                ended: self.ended.clone(),
            }))
        })
    }
}

impl Discovery for Counting {
    fn watch(
        &self,
        service: &str,
    ) -> BoxFuture<'_, Result<watch::Receiver<InstanceSet>, RegistryError>> {
        self.inner.watch(service)
    }

    fn list(&self, service: Option<&str>) -> BoxFuture<'_, Result<Vec<Listed>, RegistryError>> {
        self.inner.list(service)
    }
}

#[tokio::test]
async fn a_backend_registered_by_scheme_is_reached_through_connect() {
    // Before registration the scheme is unknown, and the error says which are known.
    let err = trellis_registry::connect("counting://here")
        .await
        .err()
        .unwrap();
    let message = err.to_string();
    assert!(
        message.contains("unknown registry \"counting\""),
        "{message}"
    );
    assert!(message.contains("memory://"), "{message}");

    let backend = Counting {
        inner: MemoryRegistry::new(),
        ended: Arc::default(),
    };
    let seen_urls = Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let (backend, seen_urls) = (backend.clone(), seen_urls.clone());
        trellis_registry::register_backend("counting", move |url| {
            seen_urls.lock().unwrap().push(url.to_owned());
            let backend = backend.clone();
            Box::pin(async move { Ok(Arc::new(backend) as Arc<dyn ServiceRegistry>) })
        });
    }
    let registry = trellis_registry::connect("counting://here?x=1")
        .await
        .unwrap();
    assert_eq!(*seen_urls.lock().unwrap(), ["counting://here?x=1"]);

    let mut users = registry.watch("user").await.unwrap();
    let registration = registry
        .register(Instance::new("user", "u1").with_endpoint("grpc", "127.0.0.1:1"))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), users.wait_for(|s| s.len() == 1))
        .await
        .expect("the instance to show")
        .unwrap();
    assert_eq!(backend.ended.load(SeqCst), 0);
    registration.deregister().await.unwrap();
    assert_eq!(backend.ended.load(SeqCst), 1, "our session ended it");
    assert!(backend.inner.list(Some("user")).await.unwrap().is_empty());
}
