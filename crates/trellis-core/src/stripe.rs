//! Per-thread stripes for hot counters.
//!
//! An atomic that every core updates moves its cache line between cores on
//! every update: ~50–200 ns under contention, against ~5 ns alone. A
//! [`Striped`] value keeps [`STRIPES`] copies, each on its own cache line;
//! a thread updates the copy of its [`thread_stripe`], and readers that need
//! the whole sum add the copies up. Two threads share a stripe only when
//! more than [`STRIPES`] threads update the same value.
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
//! use trellis_core::stripe::Striped;
//!
//! let hits: Striped<AtomicU64> = Striped::default();
//! hits.local().fetch_add(1, Relaxed);
//! assert_eq!(hits.iter().map(|h| h.load(Relaxed)).sum::<u64>(), 1);
//! ```

use std::{
    ops::Deref,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

/// How many copies a [`Striped`] value keeps (a power of two).
pub const STRIPES: usize = 8;

/// A value alone on its cache line (128 bytes: two lines, as adjacent-line
/// prefetchers pull pairs).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct CachePadded<T>(pub T);

impl<T> Deref for CachePadded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// The stripe of the calling thread, in `0..STRIPES`: threads take stripes
/// in turn as they first ask, so the first [`STRIPES`] threads (a runtime's
/// workers) each have their own.
pub fn thread_stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Relaxed) % STRIPES;
    }
    STRIPE.with(|s| *s)
}

/// [`STRIPES`] copies of a value, one per cache line.
#[derive(Debug, Default)]
pub struct Striped<T> {
    stripes: [CachePadded<T>; STRIPES],
}

impl<T> Striped<T> {
    /// Copies made by `init(stripe)`.
    pub fn new(mut init: impl FnMut(usize) -> T) -> Self {
        Striped {
            stripes: std::array::from_fn(|i| CachePadded(init(i))),
        }
    }

    /// The calling thread's copy.
    pub fn local(&self) -> &T {
        &self.stripes[thread_stripe()]
    }

    /// Every copy, for sums and resets.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.stripes.iter().map(|s| &s.0)
    }
}

/// Per-thread handles on one shared value.
///
/// A ticket that must own a reference to its limiter (it is held across
/// an await, in a `'static` future) clones an `Arc`, and every core
/// cloning and dropping the same `Arc` moves its count's cache line
/// between them. [`Handles::local`] clones the calling thread's own
/// handle instead: each handle is a separate allocation on its own cache
/// line with its own count, all pointing at the one value.
pub struct Handles<T> {
    stripes: Striped<Handle<T>>,
}

impl<T> Handles<T> {
    /// Handles on `value`.
    pub fn new(value: Arc<T>) -> Self {
        Handles {
            stripes: Striped::new(|_| Handle(Arc::new(CachePadded(value.clone())))),
        }
    }

    /// A handle for the calling thread.
    pub fn local(&self) -> Handle<T> {
        self.stripes.local().clone()
    }
}

impl<T> std::fmt::Debug for Handles<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handles")
    }
}

/// One of [`Handles`]: derefs to the shared value.
pub struct Handle<T>(Arc<CachePadded<Arc<T>>>);

impl<T> Clone for Handle<T> {
    fn clone(&self) -> Self {
        Handle(self.0.clone())
    }
}

impl<T> Deref for Handle<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0.0
    }
}

impl<T> std::fmt::Debug for Handle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handle")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    #[test]
    fn updates_from_many_threads_all_count_and_stripes_do_not_share_lines() {
        let hits: Arc<Striped<AtomicU64>> = Arc::default();
        let threads: Vec<_> = (0..2 * STRIPES)
            .map(|_| {
                let hits = hits.clone();
                std::thread::spawn(move || {
                    assert_eq!(
                        thread_stripe(),
                        thread_stripe(),
                        "a thread keeps its stripe"
                    );
                    for _ in 0..1000 {
                        hits.local().fetch_add(1, Relaxed);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let sum: u64 = hits.iter().map(|h| h.load(Relaxed)).sum();
        assert_eq!(sum, 2 * STRIPES as u64 * 1000);
        let used = hits.iter().filter(|h| h.load(Relaxed) > 0).count();
        assert!(used > 1, "16 threads all landed on one stripe");
        let base = &hits.stripes[0] as *const _ as usize;
        let next = &hits.stripes[1] as *const _ as usize;
        assert_eq!(next - base, 128);
    }

    #[test]
    fn handles_reach_the_one_value_and_keep_it_alive() {
        let value = Arc::new(AtomicU64::new(0));
        let handles = Handles::new(value.clone());
        let mine = handles.local();
        let theirs = std::thread::spawn({
            let other = Handles::local(&handles);
            move || {
                other.fetch_add(1, Relaxed);
                other
            }
        })
        .join()
        .unwrap();
        mine.fetch_add(1, Relaxed);
        assert_eq!(value.load(Relaxed), 2);
        drop(handles);
        drop(value);
        // The tickets still hold it.
        assert_eq!(theirs.load(Relaxed), 2);
        assert_eq!(mine.load(Relaxed), 2);
    }
}
