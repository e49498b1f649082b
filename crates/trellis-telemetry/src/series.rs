//! Metric handles cached by their labels, so a request records into series
//! it has seen before without building labels or asking the recorder.
//!
//! Registering a series with the `metrics` recorder on every request (what
//! `histogram!(name, labels…)` does) allocates the label strings and the
//! key and looks the key up in the recorder's registry: about 0.7 µs for
//! the three series a request touches. The labels of RED series come from
//! bounded sets (route templates, standard methods, status codes), so the
//! handles can be kept: a read of an immutable map, swapped whole when a
//! new series appears (rarely, and never past [`MAX_SERIES`]).

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    sync::{Arc, Mutex, PoisonError},
};

use arc_swap::ArcSwap;

/// The most series one cache keeps; past it, series are registered per
/// request as before (labels are bounded, so this is a guard, not a limit
/// reached in practice).
pub(crate) const MAX_SERIES: usize = 4096;

/// What a series is, for the cache: which metric, and its labels as the
/// request has them (a route template, a method label, a status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SeriesKey<'a> {
    pub(crate) metric: u8,
    pub(crate) route: &'a str,
    pub(crate) method: &'static str,
    pub(crate) code: u16,
}

impl SeriesKey<'_> {
    fn hash(&self) -> u64 {
        let mut h = FxHasher::default();
        h.write_u8(self.metric);
        h.write(self.route.as_bytes());
        h.write_u8(0xff);
        h.write(self.method.as_bytes());
        h.write_u16(self.code);
        h.finish()
    }
}

/// A cached series: its key (to tell a hash collision) and its handle.
struct Entry<H> {
    metric: u8,
    route: Box<str>,
    method: &'static str,
    code: u16,
    handle: H,
}

impl<H> Entry<H> {
    fn is(&self, key: &SeriesKey<'_>) -> bool {
        self.metric == key.metric
            && self.code == key.code
            && same(self.method.as_bytes(), key.method.as_bytes())
            && same(self.route.as_bytes(), key.route.as_bytes())
    }
}

/// Byte equality, a word at a time. Route templates and method labels are
/// short; a call to the C library's `memcmp` (what `==` on slices becomes)
/// cost more than the comparison itself — on the reference VM its AVX-512
/// variant took ~100 ns a call, a quarter of the whole layer.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut a_words = a.chunks_exact(8);
    let mut b_words = b.chunks_exact(8);
    for (x, y) in (&mut a_words).zip(&mut b_words) {
        let word = |w: &[u8]| u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
        if word(x) != word(y) {
            return false;
        }
    }
    let (x, y) = (a_words.remainder(), b_words.remainder());
    let mut differ = 0u8;
    for i in 0..x.len() {
        differ |= x[i] ^ y[i];
    }
    differ == 0
}

type Map<H> = HashMap<u64, Entry<H>, BuildHasherDefault<IdentityHasher>>;

/// Handles of type `H` (a `metrics::Histogram` or `Gauge`) by series.
pub(crate) struct SeriesCache<H> {
    map: ArcSwap<Map<H>>,
    insert: Mutex<()>,
}

impl<H> Default for SeriesCache<H> {
    fn default() -> Self {
        SeriesCache {
            map: ArcSwap::from_pointee(Map::default()),
            insert: Mutex::new(()),
        }
    }
}

impl<H: Clone> SeriesCache<H> {
    /// Runs `use_it` on the handle of `key`, registering it with `register`
    /// the first time.
    pub(crate) fn with(
        &self,
        key: SeriesKey<'_>,
        register: impl FnOnce() -> H,
        use_it: impl FnOnce(&H),
    ) {
        let hash = key.hash();
        {
            let map = self.map.load();
            match map.get(&hash) {
                Some(entry) if entry.is(&key) => return use_it(&entry.handle),
                // Another series with the same hash: not cached.
                Some(_) => return use_it(&register()),
                None => {}
            }
        }
        let handle = register();
        use_it(&handle);
        let _guard = self.insert.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.map.load_full();
        if current.len() >= MAX_SERIES || current.contains_key(&hash) {
            return;
        }
        let mut next: Map<H> = Map::with_capacity_and_hasher(current.len() + 1, Default::default());
        for (h, e) in current.iter() {
            next.insert(
                *h,
                Entry {
                    metric: e.metric,
                    route: e.route.clone(),
                    method: e.method,
                    code: e.code,
                    handle: e.handle.clone(),
                },
            );
        }
        next.insert(
            hash,
            Entry {
                metric: key.metric,
                route: key.route.into(),
                method: key.method,
                code: key.code,
                handle,
            },
        );
        self.map.store(Arc::new(next));
    }

    /// Series cached (for tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.load().len()
    }
}

/// The keys are already hashes.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// rustc's FxHash: fast, and fine for keys no client chooses (route
/// templates, method labels and status codes are bounded sets).
#[derive(Default)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0xf135_7aea_2e62_a9c5;
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(26) ^ u64::from_le_bytes(word)).wrapping_mul(K);
        }
        for b in chunks.remainder() {
            self.0 = (self.0.rotate_left(26) ^ u64::from(*b)).wrapping_mul(K);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_is_registered_once_and_the_cache_is_bounded() {
        let cache: SeriesCache<u32> = SeriesCache::default();
        let mut registered = 0;
        for _ in 0..3 {
            let key = SeriesKey {
                metric: 1,
                route: "/v1/users/{id}",
                method: "GET",
                code: 200,
            };
            cache.with(
                key,
                || {
                    registered += 1;
                    7
                },
                |h| assert_eq!(*h, 7),
            );
        }
        assert_eq!(registered, 1);
        for code in 0..(MAX_SERIES as u16 + 10) {
            let key = SeriesKey {
                metric: 2,
                route: "/r",
                method: "GET",
                code,
            };
            cache.with(key, || 1, |_| {});
        }
        assert_eq!(cache.len(), MAX_SERIES);
    }
}
