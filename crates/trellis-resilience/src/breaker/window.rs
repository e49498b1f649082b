//! The windows a breaker counts outcomes in: buckets over a monotonic
//! clock (the last N seconds), or a ring of the last N calls.

use std::{
    sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed, Ordering::SeqCst},
    time::Duration,
};

use tokio::time::Instant;

use crate::clock::Clock;

/// One slice of the window: counts for the slice that started at `epoch`.
#[derive(Default)]
pub(crate) struct Bucket {
    epoch: AtomicU64,
    pub(crate) calls: AtomicU32,
    pub(crate) failures: AtomicU32,
    pub(crate) slow: AtomicU32,
}

/// A window of buckets over a monotonic clock.
pub(crate) struct Window {
    clock: Clock,
    start: Instant,
    bucket_ms: u64,
    buckets: Box<[Bucket]>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) calls: u32,
    pub(crate) failures: u32,
    pub(crate) slow: u32,
}

impl Window {
    pub(crate) fn new(window: Duration, buckets: u32, clock: Clock) -> Self {
        let n = buckets.max(1);
        let bucket_ms = (window.as_millis() as u64 / u64::from(n)).max(1);
        Window {
            clock,
            start: Instant::now(),
            bucket_ms,
            buckets: (0..n).map(|_| Bucket::default()).collect(),
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.clock.now_ms(self.start)
    }

    pub(crate) fn epoch(&self) -> u64 {
        // Epoch 0 is "never used": real epochs start at 1.
        self.now_ms() / self.bucket_ms + 1
    }

    /// The bucket for now, reset first if it still holds an older slice.
    pub(crate) fn current(&self) -> &Bucket {
        self.bucket_at(self.epoch())
    }

    /// The bucket for `epoch` (from [`Window::epoch`]), reset if stale.
    pub(crate) fn bucket_at(&self, epoch: u64) -> &Bucket {
        let bucket = &self.buckets[(epoch % self.buckets.len() as u64) as usize];
        let seen = bucket.epoch.load(Relaxed);
        if seen != epoch
            && bucket
                .epoch
                .compare_exchange(seen, epoch, SeqCst, Relaxed)
                .is_ok()
        {
            // A count racing with this reset may be lost; a window is an estimate.
            bucket.calls.store(0, Relaxed);
            bucket.failures.store(0, Relaxed);
            bucket.slow.store(0, Relaxed);
        }
        bucket
    }

    pub(crate) fn totals(&self) -> Totals {
        let now = self.epoch();
        let oldest = now.saturating_sub(self.buckets.len() as u64 - 1);
        let mut t = Totals::default();
        for b in self.buckets.iter() {
            let e = b.epoch.load(Relaxed);
            if e >= oldest && e <= now && e != 0 {
                t.calls += b.calls.load(Relaxed);
                t.failures += b.failures.load(Relaxed);
                t.slow += b.slow.load(Relaxed);
            }
        }
        t
    }

    pub(crate) fn clear(&self) {
        for b in self.buckets.iter() {
            b.epoch.store(0, Relaxed);
        }
    }
}

/// The last N outcomes in a ring, with running totals.
pub(crate) struct CountWindow {
    slots: Box<[AtomicU8]>,
    next: AtomicU64,
    calls: AtomicU32,
    failures: AtomicU32,
    slow: AtomicU32,
}

const EMPTY: u8 = 0;
const FAILED: u8 = 1;
const SLOW: u8 = 2;
const FILLED: u8 = 4;

impl CountWindow {
    pub(crate) fn new(n: u32) -> Self {
        CountWindow {
            slots: (0..n.max(1)).map(|_| AtomicU8::new(EMPTY)).collect(),
            next: AtomicU64::new(0),
            calls: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            slow: AtomicU32::new(0),
        }
    }

    pub(crate) fn push(&self, failed: bool, slow: bool) {
        let i = (self.next.fetch_add(1, Relaxed) % self.slots.len() as u64) as usize;
        let new = FILLED | if failed { FAILED } else { 0 } | if slow { SLOW } else { 0 };
        let old = self.slots[i].swap(new, Relaxed);
        // Replace the outcome that falls out of the window with the new one.
        if old & FILLED == 0 {
            self.calls.fetch_add(1, Relaxed);
        }
        match (old & FAILED != 0, failed) {
            (false, true) => {
                self.failures.fetch_add(1, Relaxed);
            }
            (true, false) => {
                self.failures.fetch_sub(1, Relaxed);
            }
            _ => {}
        }
        match (old & SLOW != 0, slow) {
            (false, true) => {
                self.slow.fetch_add(1, Relaxed);
            }
            (true, false) => {
                self.slow.fetch_sub(1, Relaxed);
            }
            _ => {}
        }
    }

    pub(crate) fn totals(&self) -> Totals {
        Totals {
            calls: self.calls.load(Relaxed),
            failures: self.failures.load(Relaxed),
            slow: self.slow.load(Relaxed),
        }
    }

    pub(crate) fn clear(&self) {
        for slot in self.slots.iter() {
            let old = slot.swap(EMPTY, Relaxed);
            if old & FILLED != 0 {
                self.calls.fetch_sub(1, Relaxed);
                if old & FAILED != 0 {
                    self.failures.fetch_sub(1, Relaxed);
                }
                if old & SLOW != 0 {
                    self.slow.fetch_sub(1, Relaxed);
                }
            }
        }
    }
}
