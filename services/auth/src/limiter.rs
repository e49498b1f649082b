//! Failed-login limits per account and per client address: after `max`
//! failures inside a window the key is refused until the window ends. Keys
//! are counted whether or not the account exists, so a refusal says
//! nothing about which emails are registered.
//!
//! The table is bounded: when full, expired entries go first, then the
//! entries closest to expiring — an attacker spraying addresses cannot grow
//! it. Counts are per instance (several instances each allow `max`).

use std::{
    collections::HashMap,
    hash::Hash,
    sync::Mutex,
    time::{Duration, Instant},
};

struct Window {
    start: Instant,
    failures: u32,
}

/// Failures per key inside a window.
pub struct FailureLimiter<K> {
    max: u32,
    window: Duration,
    capacity: usize,
    entries: Mutex<HashMap<K, Window>>,
}

impl<K: Hash + Eq + Clone> FailureLimiter<K> {
    /// At most `max` failures per `window` per key; at most `capacity` keys
    /// remembered.
    pub fn new(max: u32, window: Duration, capacity: usize) -> Self {
        FailureLimiter {
            max,
            window,
            capacity: capacity.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<K, Window>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `Some(wait)` if `key` is refused at `now` (for `wait` more).
    pub fn blocked(&self, key: &K, now: Instant) -> Option<Duration> {
        let entries = self.entries();
        let w = entries.get(key)?;
        let end = w.start + self.window;
        (w.failures >= self.max && end > now).then(|| end - now)
    }

    /// Counts a failure for `key`.
    pub fn fail(&self, key: &K, now: Instant) {
        let mut entries = self.entries();
        if let Some(w) = entries.get_mut(key) {
            if w.start + self.window <= now {
                *w = Window {
                    start: now,
                    failures: 0,
                };
            }
            w.failures = w.failures.saturating_add(1);
            return;
        }
        if entries.len() >= self.capacity {
            let window = self.window;
            entries.retain(|_, w| w.start + window > now);
            if entries.len() >= self.capacity {
                // The oldest window (closest to its end) gives way.
                if let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, w)| w.start)
                    .map(|(k, _)| k.clone())
                {
                    entries.remove(&oldest);
                }
            }
        }
        entries.insert(
            key.clone(),
            Window {
                start: now,
                failures: 1,
            },
        );
    }

    /// Forgets `key`'s failures (a successful login).
    pub fn clear(&self, key: &K) {
        self.entries().remove(key);
    }

    /// How many keys are remembered.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_after_max_failures_until_the_window_ends() {
        let l = FailureLimiter::new(3, Duration::from_secs(60), 100);
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(l.blocked(&"a", t0), None, "before failure {i}");
            l.fail(&"a", t0);
        }
        assert_eq!(l.blocked(&"a", t0), Some(Duration::from_secs(60)));
        assert_eq!(l.blocked(&"b", t0), None, "other keys unaffected");
        let later = t0 + Duration::from_secs(60);
        assert_eq!(l.blocked(&"a", later), None, "the window ended");
        l.fail(&"a", later);
        assert_eq!(l.blocked(&"a", later), None, "a new window counts from one");
        l.clear(&"a");
        assert!(l.blocked(&"a", later).is_none());
    }

    #[test]
    fn the_table_never_grows_past_its_capacity() {
        let l = FailureLimiter::new(1, Duration::from_secs(60), 10);
        let t0 = Instant::now();
        for i in 0..1000u32 {
            l.fail(&i, t0 + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(l.len(), 10);
        // The newest keys are the ones kept.
        assert!(l.blocked(&999, t0 + Duration::from_secs(1)).is_some());
        assert!(l.blocked(&0, t0 + Duration::from_secs(1)).is_none());
    }
}
