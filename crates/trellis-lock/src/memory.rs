//! Locks in this process: the holders with their leases, and one counter
//! for the tokens (increasing across all resources, so per resource too,
//! and nothing is kept for a resource nobody holds).

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use crate::{Backend, Grant, Held, LockError, MAX_LISTED};

/// Locks among one process's tasks (the embedded default).
#[derive(Debug, Default)]
pub struct MemoryLocks {
    /// Resource → holder and lease end.
    held: Mutex<HashMap<String, (String, Instant)>>,
    tokens: AtomicU64,
}

impl MemoryLocks {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, (String, Instant)>) -> T) -> T {
        // A panic while the map was held leaves it consistent (each change
        // is one insert or remove): go on with it.
        let mut map = self.held.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut map)
    }
}

impl Backend for MemoryLocks {
    fn list(&self) -> BoxFuture<'_, Result<Vec<Held>, LockError>> {
        let now = Instant::now();
        let held = self.with(|map| {
            map.iter()
                .filter(|(_, (_, until))| *until > now)
                .take(MAX_LISTED)
                .map(|(resource, (holder, until))| Held {
                    resource: resource.clone(),
                    holder: holder.clone(),
                    expires_in: Some(*until - now),
                })
                .collect()
        });
        Box::pin(std::future::ready(Ok(held)))
    }

    fn try_acquire<'a>(
        &'a self,
        resource: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Grant>, LockError>> {
        let now = Instant::now();
        let granted = self.with(|map| {
            if map.get(resource).is_some_and(|(_, until)| *until > now) {
                return None;
            }
            // Taken under the map's lock: grants of one resource get
            // tokens in the order they are granted.
            let token = self.tokens.fetch_add(1, Ordering::SeqCst) + 1;
            map.insert(resource.to_owned(), (holder.to_owned(), now + ttl));
            Some(Grant { token })
        });
        Box::pin(std::future::ready(Ok(granted)))
    }

    fn extend<'a>(
        &'a self,
        resource: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, LockError>> {
        let now = Instant::now();
        let extended = self.with(|map| match map.get_mut(resource) {
            Some((h, until)) if h == holder && *until > now => {
                *until = now + ttl;
                true
            }
            _ => false,
        });
        Box::pin(std::future::ready(Ok(extended)))
    }

    fn release<'a>(
        &'a self,
        resource: &'a str,
        holder: &'a str,
    ) -> BoxFuture<'a, Result<bool, LockError>> {
        let now = Instant::now();
        let released = self.with(|map| match map.get(resource) {
            Some((h, until)) if h == holder => {
                let live = *until > now;
                map.remove(resource);
                live
            }
            // Expired leases of others go when someone looks.
            Some((_, until)) if *until <= now => {
                map.remove(resource);
                false
            }
            _ => false,
        });
        Box::pin(std::future::ready(Ok(released)))
    }
}
