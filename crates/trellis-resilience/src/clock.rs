//! The precise clock decisions read: the CPU's time-stamp counter through
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
