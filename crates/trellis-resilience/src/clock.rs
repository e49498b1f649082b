//! The clocks decisions read. Coarse: `CLOCK_MONOTONIC_COARSE`, a few
//! nanoseconds, millisecond-ish resolution, for windows and intervals.
//! Precise: the CPU's time-stamp counter through
//! `quanta`, about 10 ns a read where `std::time::Instant::now()` costs
//! about 24 ns (measured on the reference VM). On machines without a usable
//! TSC, quanta falls back to the OS clock.

use std::{sync::OnceLock, time::Duration};

fn clock() -> &'static (quanta::Clock, u64) {
    static CLOCK: OnceLock<(quanta::Clock, u64)> = OnceLock::new();
    CLOCK.get_or_init(|| {
        let clock = quanta::Clock::new();
        let base = clock.raw();
        (clock, base)
    })
}

/// Nanoseconds since the first call in this process.
pub(crate) fn now_ns() -> u64 {
    let (clock, base) = clock();
    clock.delta_as_nanos(*base, clock.raw())
}

/// A start time for measuring one request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stamp(u64);

impl Stamp {
    pub(crate) fn now() -> Stamp {
        Stamp(clock().0.raw())
    }

    pub(crate) fn elapsed(self) -> Duration {
        let clock = &clock().0;
        Duration::from_nanos(clock.delta_as_nanos(self.0, clock.raw()))
    }
}

/// Milliseconds on the coarse monotonic clock.
pub(crate) fn coarse_now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    if rc != 0 {
        return std::time::UNIX_EPOCH
            .elapsed()
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}
