//! A small per-thread random source for picks: xorshift64*, seeded from the
//! standard library's per-process random keys. Not for cryptography.

use std::{
    cell::Cell,
    hash::{BuildHasher, RandomState},
};

thread_local! {
    static STATE: Cell<u64> = Cell::new({
        let seed = RandomState::new().hash_one(std::thread::current().id());
        seed | 1
    });
}

/// A random u64.
pub(crate) fn next_u64() -> u64 {
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// A random index below `n` (`n > 0`), without modulo bias worth caring
/// about for balancing (Lemire's multiply-shift).
pub(crate) fn below(n: usize) -> usize {
    ((u128::from(next_u64()) * n as u128) >> 64) as usize
}

/// Two distinct random indices below `n` (`n >= 2`).
pub(crate) fn two_below(n: usize) -> (usize, usize) {
    let a = below(n);
    let b = below(n - 1);
    (a, if b >= a { b + 1 } else { b })
}
