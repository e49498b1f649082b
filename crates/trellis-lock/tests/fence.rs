//! The storage-side fencing check on SQLite and PostgreSQL, with the lock
//! whose lease is lost mid-work: the paused holder's late write is refused,
//! its successor's stands.

use std::time::Duration;

use trellis_lock::{LockConfig, Locks, MemoryLocks, fence};
use trellis_store::{Pool, with_pool, with_tx};

async fn pool(url: &str) -> Pool {
    let migrations = trellis_store::migrator(
        "_ledger_migrations",
        &[
            (
                1,
                "ledger",
                "CREATE TABLE ledger (id TEXT PRIMARY KEY, amount BIGINT NOT NULL, token BIGINT NOT NULL)",
            ),
            fence::MIGRATION,
        ],
    );
    Pool::open(url, 4, Duration::from_secs(10), &migrations)
        .await
        .unwrap()
}

/// The guarded write: the fencing check, then the row, in one transaction.
async fn write(
    pool: &Pool,
    resource: &str,
    token: u64,
    amount: i64,
) -> Result<(), fence::FenceError> {
    let mut tx = pool.begin().await?;
    fence::check(&mut tx, resource, token).await?;
    with_tx!(&mut tx, c => sqlx::query("INSERT INTO ledger (id, amount, token) VALUES ('balance', $1, $2) ON CONFLICT (id) DO UPDATE SET amount = excluded.amount, token = excluded.token")
        .bind(amount)
        .bind(i64::try_from(token).unwrap())
        .execute(&mut **c)
        .await
        .map(drop))?;
    tx.commit().await?;
    Ok(())
}

async fn fenced_on(url: &str) {
    let pool = pool(url).await;
    let backend = std::sync::Arc::new(MemoryLocks::default());
    // The first holder pauses past its lease (no keep-alive, 200 ms).
    let paused = Locks::with_config(
        backend.clone(),
        LockConfig {
            ttl: Duration::from_millis(200),
            extend_every: None,
            retry: Duration::from_millis(5),
        },
    );
    let stale = paused
        .lock("balance", Duration::from_secs(5))
        .await
        .unwrap();
    write(&pool, "balance", stale.token(), 100).await.unwrap();
    write(&pool, "balance", stale.token(), 110).await.unwrap(); // the same holder, again
    stale.lost().await;
    // Its successor takes the lock and writes.
    let next = Locks::new(backend.clone())
        .lock("balance", Duration::from_secs(5))
        .await
        .unwrap();
    write(&pool, "balance", next.token(), 200).await.unwrap();
    // The paused holder wakes and writes with its old token: refused, and
    // nothing of it lands.
    let refused = write(&pool, "balance", stale.token(), 999)
        .await
        .unwrap_err();
    assert!(
        matches!(refused, fence::FenceError::Stale { token, .. } if token == stale.token()),
        "{refused:?}"
    );
    let (amount, token): (i64, i64) = with_pool!(&pool, p => sqlx::query_as("SELECT amount, token FROM ledger WHERE id = 'balance'")
        .fetch_one(p)
        .await
        .unwrap());
    assert_eq!((amount, token), (200, i64::try_from(next.token()).unwrap()));
    // Other resources are fenced apart.
    write(&pool, "other", 1, 5).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_holders_are_refused_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    fenced_on(&format!(
        "sqlite://{}",
        dir.path().join("ledger.db").display()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_holders_are_refused_on_postgres() {
    let pg = trellis_testkit::Postgres::start().unwrap();
    fenced_on(&pg.url()).await;
}
