//! The in-process registry: what `trellis up` uses, and what tests use when
//! the registry itself is not under test.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, OnceLock, PoisonError},
};

use tokio::sync::watch;

use crate::{
    BoxFuture, Discovery, Instance, InstanceSet, Listed, Registration, Registry, RegistryError,
    Session,
};

#[derive(Default)]
struct State {
    // service -> instance id -> instance
    services: HashMap<String, BTreeMap<String, Instance>>,
    watchers: HashMap<String, watch::Sender<InstanceSet>>,
}

impl State {
    fn publish(&mut self, service: &str) {
        let set: InstanceSet = self
            .services
            .get(service)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        if let Some(tx) = self.watchers.get(service) {
            tx.send_replace(set);
        }
    }
}

/// An in-process registry. Clones share state; [`MemoryRegistry::global`]
/// is the one `memory://` names.
#[derive(Clone, Default)]
pub struct MemoryRegistry {
    state: Arc<Mutex<State>>,
}

impl MemoryRegistry {
    /// A new, empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process-wide registry `memory://` refers to.
    pub fn global() -> Self {
        static GLOBAL: OnceLock<MemoryRegistry> = OnceLock::new();
        GLOBAL.get_or_init(MemoryRegistry::new).clone()
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // A panic while holding the lock leaves the maps consistent (every
        // update is a single insert/remove), so poisoning is not fatal.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut state)
    }
}

struct MemorySession {
    registry: MemoryRegistry,
    service: String,
    id: String,
}

impl Session for MemorySession {
    fn deregister(self: Box<Self>) -> BoxFuture<'static, Result<(), RegistryError>> {
        Box::pin(async move {
            self.registry.with(|s| {
                if let Some(m) = s.services.get_mut(&self.service) {
                    m.remove(&self.id);
                }
                s.publish(&self.service);
            });
            metrics::counter!("registry_events_total", "event" => "deregistered").increment(1);
            Ok(())
        })
    }
}

impl Registry for MemoryRegistry {
    fn register(&self, instance: Instance) -> BoxFuture<'_, Result<Registration, RegistryError>> {
        Box::pin(async move {
            crate::check_publishable(&instance)?;
            let (service, id) = (instance.service.clone(), instance.id.clone());
            self.with(|s| {
                s.services
                    .entry(service.clone())
                    .or_default()
                    .insert(id.clone(), instance);
                s.publish(&service);
            });
            metrics::counter!("registry_events_total", "event" => "registered").increment(1);
            Ok(Registration::new(MemorySession {
                registry: self.clone(),
                service,
                id,
            }))
        })
    }
}

impl Discovery for MemoryRegistry {
    fn watch(
        &self,
        service: &str,
    ) -> BoxFuture<'_, Result<watch::Receiver<InstanceSet>, RegistryError>> {
        let service = service.to_owned();
        Box::pin(async move {
            Ok(self.with(|s| {
                let current: InstanceSet = s
                    .services
                    .get(&service)
                    .map(|m| m.values().cloned().collect())
                    .unwrap_or_default();
                s.watchers
                    .entry(service)
                    .or_insert_with(|| watch::channel(current).0)
                    .subscribe()
            }))
        })
    }

    fn list(&self, service: Option<&str>) -> BoxFuture<'_, Result<Vec<Listed>, RegistryError>> {
        let service = service.map(str::to_owned);
        Box::pin(async move {
            Ok(self.with(|s| {
                let mut out: Vec<Listed> = s
                    .services
                    .iter()
                    .filter(|(name, _)| service.as_ref().is_none_or(|want| want == *name))
                    .flat_map(|(_, m)| m.values().cloned())
                    .map(|instance| Listed {
                        instance,
                        ttl_left: None,
                    })
                    .collect();
                out.sort_by(|a, b| {
                    (&a.instance.service, &a.instance.id)
                        .cmp(&(&b.instance.service, &b.instance.id))
                });
                out
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watchers_see_registrations_and_deregistrations() {
        let registry = MemoryRegistry::new();
        let mut rx = registry.watch("user").await.unwrap();
        assert!(rx.borrow().is_empty());
        let a = registry.register(Instance::new("user", "a")).await.unwrap();
        let _b = registry.register(Instance::new("user", "b")).await.unwrap();
        let _other = registry
            .register(Instance::new("order", "c"))
            .await
            .unwrap();
        rx.changed().await.unwrap();
        assert_eq!(
            rx.borrow_and_update()
                .iter()
                .map(|i| i.id.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        a.deregister().await.unwrap();
        rx.changed().await.unwrap();
        assert_eq!(
            rx.borrow()
                .iter()
                .map(|i| i.id.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
        assert_eq!(registry.list(None).await.unwrap().len(), 2);
        assert_eq!(
            registry.list(Some("order")).await.unwrap()[0].instance.id,
            "c"
        );
    }

    #[tokio::test]
    async fn dropping_a_registration_deregisters() {
        let registry = MemoryRegistry::new();
        let mut rx = registry.watch("user").await.unwrap();
        drop(registry.register(Instance::new("user", "a")).await.unwrap());
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            rx.wait_for(|s| s.is_empty()),
        )
        .await
        .unwrap()
        .unwrap();
    }
}
