//! Shedding by standing queueing delay (CoDel applied to requests, as
//! Facebook's Thrift servers do).
//!
//! The minimum latency over an interval (100 ms) minus the no-load latency
//! is the *standing* queueing delay: a burst, or a bounded set of callers
//! keeping a service busy, leaves it small; arrivals beyond capacity make
//! it grow. While it exceeds the target (5 ms), the shedder admits only the
//! in-flight that Little's law gives for the target at the current
//! throughput — `throughput × (no-load latency + target)` — and sheds the
//! rest with 503 / UNAVAILABLE. It does nothing to a service that is merely
//! busy, which is why it can be on by default where the CPU and Vegas
//! shedders cannot.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use trellis_core::stripe::{Handle, Handles, Striped};

use crate::clock::now_ns;

/// A queueing-delay shedder.
pub struct DelayShedder {
    state: Arc<DelayState>,
    /// What tickets hold: a handle per thread (see [`Handles`]).
    handles: Handles<DelayState>,
}

impl std::ops::Deref for DelayShedder {
    type Target = DelayState;

    fn deref(&self) -> &DelayState {
        &self.state
    }
}

/// The state of a queueing-delay shedder.
pub struct DelayState {
    target_us: u64,
    interval_ms: u64,
    /// Per thread: a request may end on another thread than it began, so a
    /// stripe may wrap below zero; the sum is right. Read only while
    /// shedding, so a calm service never sums it.
    in_flight: Striped<AtomicUsize>,
    closed_intervals: AtomicU64,
    /// The lowest latency seen (re-learnt every 100 intervals).
    noload_us: AtomicU64,
    /// The interval being measured: its number, lowest latency, completions.
    epoch: AtomicU64,
    interval_min_us: AtomicU64,
    interval_done: Striped<AtomicU64>,
    /// Set at each interval's end from the one that just finished.
    overloaded: AtomicBool,
    allowed_in_flight: AtomicUsize,
    shed: AtomicU64,
}

impl DelayShedder {
    /// Sheds while the standing queueing delay exceeds `target`.
    pub fn new(target: Duration) -> Arc<Self> {
        let state = Arc::new(DelayState {
            target_us: target.as_micros().max(1) as u64,
            interval_ms: 100,
            in_flight: Striped::default(),
            closed_intervals: AtomicU64::new(0),
            noload_us: AtomicU64::new(u64::MAX),
            epoch: AtomicU64::new(0),
            interval_min_us: AtomicU64::new(u64::MAX),
            interval_done: Striped::default(),
            overloaded: AtomicBool::new(false),
            allowed_in_flight: AtomicUsize::new(usize::MAX),
            shed: AtomicU64::new(0),
        });
        Arc::new(DelayShedder {
            handles: Handles::new(state.clone()),
            state,
        })
    }

    /// Admits a request unless the shedder is holding a standing queue down.
    pub fn try_acquire(self: &Arc<Self>) -> Option<DelayAdmitted> {
        // Intervals roll on completions; admission only reads the verdict,
        // and counts what is in flight only while shedding.
        let state = &self.state;
        let allowed = state.allowed_in_flight.load(Relaxed);
        if allowed != usize::MAX && state.in_flight() >= allowed {
            state.shed.fetch_add(1, Relaxed);
            return None;
        }
        state.in_flight.local().fetch_add(1, Relaxed);
        Some(DelayAdmitted {
            shedder: self.handles.local(),
            started_ns: now_ns(),
        })
    }
}

impl DelayState {
    /// Whether the last complete interval showed a standing queue.
    pub fn is_overloaded(&self) -> bool {
        self.overloaded.load(Relaxed)
    }

    /// Requests shed since start.
    pub fn shed_total(&self) -> u64 {
        self.shed.load(Relaxed)
    }

    /// Closes the interval before `now_ms` (milliseconds on [`now_ns`]'s
    /// clock) if it is over.
    fn roll(&self, now_ms: u64) {
        let epoch = now_ms / self.interval_ms;
        let seen = self.epoch.load(Relaxed);
        if seen == epoch
            || self
                .epoch
                .compare_exchange(seen, epoch, Relaxed, Relaxed)
                .is_err()
        {
            return;
        }
        // This thread closes interval `seen`.
        self.close_interval(seen, epoch);
    }

    /// Closes interval `seen` on reaching `epoch`: re-learns the baseline
    /// when due and decides whether a standing queue is being held down.
    fn close_interval(&self, seen: u64, epoch: u64) {
        let min = self.interval_min_us.swap(u64::MAX, Relaxed);
        let done: u64 = self.interval_done.iter().map(|d| d.swap(0, Relaxed)).sum();
        let closed = self.closed_intervals.fetch_add(1, Relaxed) + 1;
        if closed.is_multiple_of(100) && min != u64::MAX {
            // Every 10 s, re-learn the no-load latency. From a calm interval,
            // take what it saw; during overload, only move a quarter of the
            // way: re-learning from an overloaded interval would declare the
            // queue normal and switch shedding off exactly when it matters,
            // while never moving would shed forever a service that simply
            // became slower.
            let noload = self.noload_us.load(Relaxed);
            let next = if !self.overloaded.load(Relaxed) || noload == u64::MAX {
                min
            } else {
                noload + min.saturating_sub(noload) / 4
            };
            self.noload_us.store(next, Relaxed);
        }
        let noload = self.noload_us.load(Relaxed);
        if min == u64::MAX || noload == u64::MAX || epoch != seen + 1 {
            // No traffic, or a gap: no standing queue to speak of.
            self.overloaded.store(false, Relaxed);
            self.allowed_in_flight.store(usize::MAX, Relaxed);
            return;
        }
        let standing = min.saturating_sub(noload);
        let overloaded = standing > self.target_us;
        let throughput_per_s = done as f64 * 1000.0 / self.interval_ms as f64;
        let allowed = (throughput_per_s * (noload + self.target_us) as f64 / 1e6)
            .ceil()
            .max(1.0) as usize;
        self.allowed_in_flight
            .store(if overloaded { allowed } else { usize::MAX }, Relaxed);
        self.overloaded.store(overloaded, Relaxed);
    }

    /// Requests in flight now.
    fn in_flight(&self) -> usize {
        self.in_flight
            .iter()
            .fold(0usize, |sum, n| sum.wrapping_add(n.load(Relaxed)))
    }

    /// Records a completion at `now_ns` ([`now_ns`]) after `latency_ns`.
    fn finish(&self, now_ns: u64, latency_ns: u64) {
        self.in_flight.local().fetch_sub(1, Relaxed);
        let us = latency_ns / 1000;
        // The completion's own clock reading serves the interval too.
        self.roll(now_ns / 1_000_000);
        // Read before writing: most completions are not a new minimum, and
        // a read leaves the line shared where a fetch_min takes it over.
        if us < self.interval_min_us.load(Relaxed) {
            self.interval_min_us.fetch_min(us, Relaxed);
        }
        // A load and a store: the stripe is this thread's unless more
        // threads than stripes share it, and a lost count then only
        // understates throughput a little.
        let done = self.interval_done.local();
        done.store(done.load(Relaxed) + 1, Relaxed);
        if us < self.noload_us.load(Relaxed) {
            self.noload_us.fetch_min(us, Relaxed);
        }
    }
}

/// An admitted request; dropping it records its latency.
pub struct DelayAdmitted {
    shedder: Handle<DelayState>,
    started_ns: u64,
}

impl Drop for DelayAdmitted {
    fn drop(&mut self) {
        let now = now_ns();
        self.shedder
            .finish(now, now.saturating_sub(self.started_ns));
    }
}

impl crate::Admission for DelayShedder {
    type Ticket = DelayAdmitted;
    const REASON: &'static str = "queue_delay";
    fn admit(self: &Arc<Self>) -> Option<DelayAdmitted> {
        self.try_acquire()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Milliseconds on the clock intervals are counted on.
    fn clock_ms() -> u64 {
        now_ns() / 1_000_000
    }

    /// Sleeps into the next 100 ms interval.
    fn next_interval() {
        let now = clock_ms();
        std::thread::sleep(Duration::from_millis(100 - now % 100 + 10));
    }

    /// Feeds one interval of completions with the given latencies (the
    /// first completion closes the interval before).
    fn interval(s: &Arc<DelayShedder>, latencies_us: &[u64]) {
        next_interval();
        for l in latencies_us {
            s.finish_for_test(*l);
        }
    }

    /// Closes the interval being fed.
    fn close(s: &Arc<DelayShedder>) {
        next_interval();
        s.roll(clock_ms());
    }

    impl DelayState {
        fn finish_for_test(&self, us: u64) {
            self.in_flight.local().fetch_add(1, Relaxed);
            self.finish(now_ns(), us * 1000);
        }
    }

    /// One interval driven by hand (no sleeping): `done` completions whose
    /// lowest latency is `min_us`, then the interval closes.
    fn close_by_hand(s: &DelayShedder, epoch: &mut u64, min_us: u64, done: u64) {
        // What finish() does for each completion.
        s.interval_min_us.fetch_min(min_us, Relaxed);
        s.interval_done.local().fetch_add(done, Relaxed);
        s.noload_us.fetch_min(min_us, Relaxed);
        // What roll() does on reaching the next interval.
        s.close_interval(*epoch, *epoch + 1);
        *epoch += 1;
    }

    #[test]
    fn sustained_overload_keeps_being_shed_past_the_relearning_period() {
        let s = DelayShedder::new(Duration::from_millis(5));
        let mut epoch = 1;
        close_by_hand(&s, &mut epoch, 1_000, 100); // no-load 1 ms
        for _ in 0..250 {
            close_by_hand(&s, &mut epoch, 40_000, 80); // a 40 ms standing queue
        }
        assert!(
            s.is_overloaded(),
            "25 s of overload must still be treated as overload"
        );
        // The baseline drifted towards 40 ms but slowly: 2 re-learnings of a quarter.
        let noload = s.noload_us.load(Relaxed);
        assert!(noload < 25_000, "no-load latency jumped to {noload} us");
    }

    #[test]
    fn a_busy_but_bounded_queue_is_not_overload() {
        let s = DelayShedder::new(Duration::from_millis(5));
        interval(&s, &[100; 10]); // no-load latency 0.1 ms
        // Saturated, a couple of ms of queueing at worst: keep serving.
        interval(&s, &[1500, 2000, 1800, 1600]);
        close(&s);
        assert!(!s.is_overloaded());
        assert!((0..1000).map(|_| s.try_acquire()).all(|a| a.is_some()));
    }

    #[test]
    fn a_standing_queue_sheds_down_to_littles_law() {
        let s = DelayShedder::new(Duration::from_millis(5));
        interval(&s, &[1000; 10]); // no-load latency 1 ms
        // Every request in the interval waited at least 40 ms: a standing queue.
        interval(&s, &[40_000; 80]); // 800/s
        close(&s);
        assert!(s.is_overloaded());
        // 800/s × (1 ms + 5 ms) = 4.8, so 5 in flight.
        let admitted: Vec<_> = std::iter::from_fn(|| s.try_acquire()).take(100).collect();
        assert_eq!(admitted.len(), 5);
        assert!(s.shed_total() >= 1);
    }
}
