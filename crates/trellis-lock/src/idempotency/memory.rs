//! Keys in this process: one map under a lock, bounded.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::{Begin, Record, Store, StoreError};

struct Entry {
    fingerprint: String,
    owner: String,
    record: Option<Arc<Record>>,
    expires: Instant,
}

/// Keys in this process (the default; `trellis up` runs every service in
/// one). At most `capacity` keys: past it expired ones are swept, and if
/// none has expired a new key is refused (UNAVAILABLE) rather than an
/// answer forgotten early.
pub struct MemoryStore {
    entries: Mutex<HashMap<String, Entry>>,
    capacity: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::with_capacity(100_000)
    }
}

impl MemoryStore {
    /// A store of at most `capacity` keys.
    pub fn with_capacity(capacity: usize) -> Self {
        MemoryStore {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while the lock was held left the map whole: every
        // change is one insert or remove.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store for MemoryStore {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        fingerprint: &'a str,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Begin, StoreError>> {
        let now = Instant::now();
        let mut entries = self.entries();
        let found = match entries.get(key) {
            Some(e) if e.expires > now => Some(match &e.record {
                Some(record) => Begin::Done {
                    fingerprint: e.fingerprint.clone(),
                    record: Record::clone(record),
                },
                None => Begin::InProgress {
                    fingerprint: e.fingerprint.clone(),
                },
            }),
            _ => None,
        };
        let result = match found {
            Some(found) => Ok(found),
            None => {
                if entries.len() >= self.capacity && !entries.contains_key(key) {
                    entries.retain(|_, e| e.expires > now);
                }
                if entries.len() >= self.capacity && !entries.contains_key(key) {
                    Err(StoreError(format!(
                        "{} keys held, none expired: raise the capacity or lower the ttl",
                        self.capacity
                    )))
                } else {
                    entries.insert(
                        key.to_owned(),
                        Entry {
                            fingerprint: fingerprint.to_owned(),
                            owner: owner.to_owned(),
                            record: None,
                            expires: now + lease,
                        },
                    );
                    Ok(Begin::Started)
                }
            }
        };
        Box::pin(std::future::ready(result))
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        record: &'a Record,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let mut entries = self.entries();
        let done = match entries.get_mut(key) {
            Some(e) if e.owner == owner && e.record.is_none() => {
                e.record = Some(Arc::new(record.clone()));
                e.expires = Instant::now() + ttl;
                true
            }
            _ => false,
        };
        Box::pin(std::future::ready(Ok(done)))
    }

    fn abandon<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut entries = self.entries();
        if entries
            .get(key)
            .is_some_and(|e| e.owner == owner && e.record.is_none())
        {
            entries.remove(key);
        }
        Box::pin(std::future::ready(Ok(())))
    }
}
