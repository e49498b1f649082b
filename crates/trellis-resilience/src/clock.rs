//! The clocks decisions read. Coarse: `CLOCK_MONOTONIC_COARSE`, a few
//! nanoseconds, millisecond-ish resolution, for windows and intervals.
//! Precise: the CPU's time-stamp counter through
//! `quanta`, about 10 ns a read where `std::time::Instant::now()` costs
//! about 24 ns (measured on the reference VM). On machines without a usable
//! TSC, quanta falls back to the OS clock.

use std::{sync::OnceLock, time::Duration};

use tokio::time::Instant;

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

/// Where breakers and budgets read the time.
///
/// The default is the kernel's coarse monotonic clock: a few nanoseconds
/// to read, millisecond-ish resolution, plenty for windows of seconds. Tests
/// use tokio's clock so they can pause and advance it.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// `CLOCK_MONOTONIC_COARSE` (the default).
    Coarse,
    /// `tokio::time::Instant`, which `tokio::time::pause()` controls.
    Tokio,
}

impl Clock {
    pub(crate) fn now_ms(self, start: Instant) -> u64 {
        match self {
            Clock::Tokio => start.elapsed().as_millis() as u64,
            Clock::Coarse => coarse_now_ms(),
        }
    }
}
