//! CPU-based load shedding, after the BBR-inspired shedders of Kratos and
//! go-zero: when the CPU is hot, admit only as many concurrent requests as
//! the service has shown it can complete, `max throughput × min latency`
//! over a recent window, times a headroom factor, and keep doing so for a
//! second after the last drop so the CPU can cool down.
//!
//! The headroom (default 2) is Trellis' addition, and not the whole
//! answer: on one core the proven capacity of a fast handler is about 2 in
//! flight, so a saturated service that is keeping up (32 callers, p99
//! 4.5 ms) still sheds a third of its requests. Both this shedder and the
//! Vegas limit are right for open-loop overload, where queues grow without
//! bound, and wrong for a stable, bounded queue; telling the two apart needs
//! a queueing-delay criterion (CoDel-style). Until then the default server
//! stack leaves shedding off and documents why.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

/// Where the shedder reads CPU usage, in per mille of the machine (0–1000).
pub trait CpuSource: Send + Sync + 'static {
    /// The current reading.
    fn usage_per_mille(&self) -> u32;
}

/// This process's CPU usage from `/proc/self/stat`, as a share of the CPUs
/// it may use (affinity and cgroup quota, via `available_parallelism`),
/// sampled every 250 ms on a background thread and smoothed (EWMA, decay 0.8).
pub struct ProcessCpu {
    usage: AtomicU32,
}

impl ProcessCpu {
    /// The process-wide sampler (started on first use).
    pub fn global() -> Arc<ProcessCpu> {
        static GLOBAL: OnceLock<Arc<ProcessCpu>> = OnceLock::new();
        GLOBAL
            .get_or_init(|| {
                let cpu = Arc::new(ProcessCpu { usage: AtomicU32::new(0) });
                let sampler = cpu.clone();
                let spawned = std::thread::Builder::new().name("trellis-cpu".into()).spawn(move || sampler.run());
                if let Err(err) = spawned {
                    tracing::warn!(error = %err, "cannot start the CPU sampler; CPU-based shedding stays off");
                }
                cpu
            })
            .clone()
    }

    fn run(&self) {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1) as f64;
        let ticks = {
            // SAFETY: sysconf has no preconditions.
            let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
            if t > 0 { t as f64 } else { 100.0 }
        };
        let mut last = (Instant::now(), cpu_ticks());
        let mut smoothed = 0.0;
        loop {
            std::thread::sleep(Duration::from_millis(250));
            let now = (Instant::now(), cpu_ticks());
            if let (Some(before), Some(after)) = (last.1, now.1) {
                let busy = (after.saturating_sub(before)) as f64 / ticks;
                let wall = now.0.duration_since(last.0).as_secs_f64().max(1e-3);
                let usage = (busy / wall / cores * 1000.0).clamp(0.0, 1000.0);
                smoothed = smoothed * 0.8 + usage * 0.2;
                self.usage.store(smoothed as u32, Relaxed);
            }
            last = now;
        }
    }
}

/// utime + stime of this process, in clock ticks.
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

impl CpuSource for ProcessCpu {
    fn usage_per_mille(&self) -> u32 {
        self.usage.load(Relaxed)
    }
}

const BUCKETS: usize = 50;
const BUCKET_MS: u64 = 100;

#[derive(Default)]
struct Bucket {
    epoch: AtomicU64,
    passed: AtomicU64,
    rt_sum_us: AtomicU64,
}

/// The CPU shedder's state.
pub struct CpuShedder {
    cpu: Arc<dyn CpuSource>,
    threshold: u32,
    headroom: f64,
    start: Instant,
    in_flight: AtomicUsize,
    last_drop_ms: AtomicU64,
    buckets: Box<[Bucket]>,
}

impl CpuShedder {
    /// Sheds when CPU usage is at or above `threshold` per mille (Kratos'
    /// default: 800) and in-flight requests exceed what the window shows
    /// the service completes.
    pub fn new(cpu: Arc<dyn CpuSource>, threshold: u32) -> Arc<Self> {
        Self::with_headroom(cpu, threshold, 2.0)
    }

    /// Like [`CpuShedder::new`], admitting up to `headroom` × the proven
    /// capacity (1.0 is Kratos' rule).
    pub fn with_headroom(cpu: Arc<dyn CpuSource>, threshold: u32, headroom: f64) -> Arc<Self> {
        Arc::new(CpuShedder {
            cpu,
            threshold,
            headroom: headroom.max(1.0),
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_drop_ms: AtomicU64::new(0),
            buckets: (0..BUCKETS).map(|_| Bucket::default()).collect(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// max(passed per bucket) × min(average latency) over the window, in
    /// concurrent requests; `None` before there is any history.
    pub fn max_in_flight(&self) -> Option<f64> {
        let current = self.now_ms() / BUCKET_MS + 1;
        let (mut max_pass, mut min_rt_ms) = (0u64, f64::MAX);
        for b in self.buckets.iter() {
            let e = b.epoch.load(Relaxed);
            // Complete buckets only, within the window.
            if e == 0 || e >= current || current - e > BUCKETS as u64 {
                continue;
            }
            let passed = b.passed.load(Relaxed);
            if passed == 0 {
                continue;
            }
            max_pass = max_pass.max(passed);
            min_rt_ms = min_rt_ms.min(b.rt_sum_us.load(Relaxed) as f64 / passed as f64 / 1000.0);
        }
        (max_pass > 0)
            .then(|| (max_pass as f64 * min_rt_ms * (1000 / BUCKET_MS) as f64 / 1000.0).ceil())
    }

    /// Whether to drop a request now.
    pub fn should_drop(&self) -> bool {
        let hot = self.cpu.usage_per_mille() >= self.threshold;
        let cooling = self
            .now_ms()
            .saturating_sub(self.last_drop_ms.load(Relaxed))
            < 1000
            && self.last_drop_ms.load(Relaxed) != 0;
        if !hot && !cooling {
            return false;
        }
        let Some(max) = self.max_in_flight() else {
            return false;
        };
        // Admitting one more must not take in-flight past the allowance.
        let over = (self.in_flight.load(Relaxed) + 1) as f64 > (max * self.headroom).max(1.0);
        if over {
            self.last_drop_ms.store(self.now_ms().max(1), Relaxed);
        }
        over
    }

    /// Admits a request unless it should be dropped.
    pub fn try_acquire(self: &Arc<Self>) -> Option<CpuAdmitted> {
        if self.should_drop() {
            return None;
        }
        self.in_flight.fetch_add(1, Relaxed);
        Some(CpuAdmitted {
            shedder: self.clone(),
            started: crate::clock::Stamp::now(),
        })
    }

    fn finish(&self, rtt: Duration) {
        self.in_flight.fetch_sub(1, Relaxed);
        let epoch = self.now_ms() / BUCKET_MS + 1;
        let b = &self.buckets[(epoch % BUCKETS as u64) as usize];
        let seen = b.epoch.load(Relaxed);
        if seen != epoch
            && b.epoch
                .compare_exchange(seen, epoch, Relaxed, Relaxed)
                .is_ok()
        {
            b.passed.store(0, Relaxed);
            b.rt_sum_us.store(0, Relaxed);
        }
        b.passed.fetch_add(1, Relaxed);
        b.rt_sum_us.fetch_add(rtt.as_micros() as u64, Relaxed);
    }
}

/// An admitted request; dropping it records its completion.
pub struct CpuAdmitted {
    shedder: Arc<CpuShedder>,
    started: crate::clock::Stamp,
}

impl Drop for CpuAdmitted {
    fn drop(&mut self) {
        self.shedder.finish(self.started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(AtomicU32);
    impl CpuSource for Fixed {
        fn usage_per_mille(&self) -> u32 {
            self.0.load(Relaxed)
        }
    }

    #[test]
    fn drops_only_when_hot_and_over_the_proven_capacity() {
        let cpu = Arc::new(Fixed(AtomicU32::new(100)));
        let shed = CpuShedder::with_headroom(cpu.clone(), 800, 1.0);
        // History: ~10 requests per 100 ms bucket, 10 ms each => capacity ~1.
        for _ in 0..3 {
            for _ in 0..10 {
                let a = shed.try_acquire().unwrap();
                std::thread::sleep(Duration::from_millis(10));
                drop(a);
            }
        }
        std::thread::sleep(Duration::from_millis(110));
        let max = shed.max_in_flight().unwrap();
        assert!((1.0..=3.0).contains(&max), "max in flight {max}");

        // Cool CPU: many in flight is fine.
        let held: Vec<_> = (0..10).map(|_| shed.try_acquire().unwrap()).collect();
        // Hot CPU: over capacity, so the next request is dropped.
        cpu.0.store(900, Relaxed);
        assert!(shed.try_acquire().is_none());
        // Cooling down: still dropping for a second after CPU falls.
        cpu.0.store(100, Relaxed);
        assert!(shed.try_acquire().is_none());
        drop(held);
        // Within capacity again: admitted even while cooling.
        assert!(shed.try_acquire().is_some());
    }

    #[test]
    fn headroom_admits_more_before_shedding() {
        let cpu = Arc::new(Fixed(AtomicU32::new(900)));
        let shed = CpuShedder::with_headroom(cpu, 800, 3.0);
        for _ in 0..10 {
            let a = shed.try_acquire().unwrap();
            std::thread::sleep(Duration::from_millis(10));
            drop(a);
        }
        std::thread::sleep(Duration::from_millis(110));
        let max = shed.max_in_flight().unwrap();
        let admitted: Vec<_> = std::iter::from_fn(|| shed.try_acquire())
            .take(100)
            .collect();
        assert_eq!(
            admitted.len() as f64,
            (max * 3.0).floor().max(1.0),
            "admits up to 3x the capacity of {max}"
        );
    }

    #[test]
    fn reads_this_process_cpu_ticks() {
        assert!(cpu_ticks().is_some());
    }
}
