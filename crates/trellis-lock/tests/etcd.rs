//! The lock suite against a real etcd.

mod suite;

use trellis_lock::{EtcdLocks, LockConfig, Locks};
use trellis_testkit::Etcd;

async fn locks(etcd: &Etcd, config: LockConfig) -> Locks {
    let backend = EtcdLocks::connect(&[etcd.endpoint()], "test/", &Default::default())
        .await
        .unwrap();
    Locks::with_config(backend, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_locks_exclude_and_fence() {
    let etcd = Etcd::start().unwrap();
    suite::mutual_exclusion(locks(&etcd, LockConfig::default()).await).await;
    suite::try_lock_and_timeouts(locks(&etcd, LockConfig::default()).await).await;
    // Leases are whole seconds in etcd: the suite's 300 ms lease lasts 1 s.
    let backend = std::sync::Arc::new(
        EtcdLocks::connect(&[etcd.endpoint()], "test/", &Default::default())
            .await
            .unwrap(),
    );
    suite::a_lost_lease_is_known_and_fenced(|config| Locks::with_config(backend.clone(), config))
        .await;
}
