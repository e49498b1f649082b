//! The resubmit sweep's fenced write, the shop's lock-guarded path: a
//! sweeper whose lease ran out while it was paused cannot mark orders
//! after its successor has written — on SQLite and PostgreSQL.

use std::time::Duration;

use shop_order::{
    RESUBMIT_LOCK,
    biz::{Line, Order, Status},
    data::Orders,
};
use trellis_lock::{LockConfig, Locks, MemoryLocks};

fn order(id: &str) -> Order {
    Order {
        id: id.to_owned(),
        user_id: "u-1".into(),
        lines: vec![Line {
            sku: "tea".into(),
            quantity: 1,
            price_cents: 450,
        }],
        total_cents: 450,
        status: Status::Pending,
        failure_reason: String::new(),
        create_time_ms: 1,
        update_time_ms: 1,
    }
}

async fn fenced_sweep(url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let settings = trellis_store::DatabaseSettings {
        url: Some(trellis::core::Secret::new(url.to_owned())),
        ..Default::default()
    };
    let orders = Orders::open(&settings, &dir.path().join("order.db"))
        .await
        .unwrap();
    for id in ["o-1", "o-2", "o-3"] {
        orders.insert(&order(id)).await.unwrap();
    }
    let backend = std::sync::Arc::new(MemoryLocks::default());
    // The first sweeper: a short lease it does not extend (as if paused).
    let paused = Locks::with_config(
        backend.clone(),
        LockConfig {
            ttl: Duration::from_millis(200),
            extend_every: None,
            retry: Duration::from_millis(5),
        },
    );
    let stale = paused.try_lock(RESUBMIT_LOCK).await.unwrap().unwrap();
    orders
        .submitted_fenced("o-1", stale.resource(), stale.token())
        .await
        .unwrap();
    stale.lost().await;
    // Its successor sweeps.
    let next = Locks::new(backend)
        .try_lock(RESUBMIT_LOCK)
        .await
        .unwrap()
        .expect("the lease ran out: the lock is free");
    assert!(next.token() > stale.token());
    orders
        .submitted_fenced("o-2", next.resource(), next.token())
        .await
        .unwrap();
    // The paused sweeper wakes and writes with its old token: refused.
    let refused = orders
        .submitted_fenced("o-3", stale.resource(), stale.token())
        .await
        .unwrap_err();
    assert_eq!(refused.reason(), "LOCK_LOST", "{refused:?}");
    let left: Vec<String> = orders
        .unsubmitted(i64::MAX, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.id)
        .collect();
    assert_eq!(left, ["o-3"], "the stale write did not land");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_sweeper_is_fenced_off_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    fenced_sweep(&format!("sqlite://{}", dir.path().join("o.db").display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_sweeper_is_fenced_off_on_postgres() {
    let pg = trellis_testkit::Postgres::start().unwrap();
    fenced_sweep(&pg.url()).await;
}
