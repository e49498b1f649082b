//! The lock suite in process.

mod suite;

use trellis_lock::{LockConfig, Locks, MemoryLocks};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_locks_exclude() {
    suite::mutual_exclusion(Locks::new(MemoryLocks::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_try_lock_and_timeouts() {
    suite::try_lock_and_timeouts(Locks::new(MemoryLocks::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_lost_leases_are_fenced() {
    // One backend, as one process's users of it share it.
    let backend = std::sync::Arc::new(MemoryLocks::default());
    suite::a_lost_lease_is_known_and_fenced(|config: LockConfig| {
        Locks::with_config(backend.clone(), config)
    })
    .await;
}
