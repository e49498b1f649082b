//! The barrier against real databases (SQLite, and PostgreSQL from the
//! testkit): each branch operation has its effect once; a compensation of
//! a step that never ran does nothing, and the step arriving after it does
//! nothing either; a failing handler leaves no mark; concurrent duplicates
//! run once.

use std::sync::Arc;

use trellis_saga::barrier::{self, BarrierError, Branch, Op, Outcome, Skip};
use trellis_store::{Pool, migrator, with_pool, with_tx};

async fn pool(url: &str) -> Pool {
    let migrations = migrator(
        "_test_migrations",
        &[
            (
                1,
                "accounts",
                "CREATE TABLE accounts (id TEXT PRIMARY KEY, balance BIGINT NOT NULL)",
            ),
            barrier::MIGRATION,
        ],
    );
    let pool = Pool::open(url, 8, std::time::Duration::from_secs(10), &migrations)
        .await
        .unwrap();
    with_pool!(&pool, p => sqlx::query("INSERT INTO accounts (id, balance) VALUES ('ann', 100)")
        .execute(p).await.map(drop).unwrap());
    pool
}

async fn balance(pool: &Pool) -> i64 {
    with_pool!(pool, p => sqlx::query_scalar("SELECT balance FROM accounts WHERE id = 'ann'")
        .fetch_one(p).await.unwrap())
}

/// Moves `delta` on ann's account under the barrier.
async fn apply(pool: &Pool, branch: &Branch, delta: i64) -> Outcome<()> {
    barrier::run(pool, branch, |tx| {
        Box::pin(async move {
            with_tx!(tx, c => sqlx::query("UPDATE accounts SET balance = balance + $1 WHERE id = 'ann'")
                .bind(delta)
                .execute(&mut **c)
                .await
                .map(drop))
        })
    })
    .await
    .unwrap()
}

async fn the_barrier_on(url: &str) {
    let pool = pool(url).await;
    // Idempotence: an action delivered twice charges once.
    let charge = Branch::new("g1", "pay", Op::Action);
    assert_eq!(apply(&pool, &charge, -30).await, Outcome::Done(()));
    assert_eq!(
        apply(&pool, &charge, -30).await,
        Outcome::Skipped(Skip::Duplicate)
    );
    assert_eq!(balance(&pool).await, 70);
    // Its compensation runs once too.
    let refund = Branch::new("g1", "pay", Op::Compensate);
    assert_eq!(apply(&pool, &refund, 30).await, Outcome::Done(()));
    assert_eq!(
        apply(&pool, &refund, 30).await,
        Outcome::Skipped(Skip::Duplicate)
    );
    assert_eq!(balance(&pool).await, 100);

    // Null compensation: the action never ran, so nothing is refunded...
    let refund = Branch::new("g2", "pay", Op::Compensate);
    assert_eq!(
        apply(&pool, &refund, 30).await,
        Outcome::Skipped(Skip::NullCompensation)
    );
    // ...and the action arriving late does not hang a charge on a
    // transaction already rolled back.
    let late = Branch::new("g2", "pay", Op::Action);
    assert_eq!(
        apply(&pool, &late, -30).await,
        Outcome::Skipped(Skip::Hanging)
    );
    assert_eq!(balance(&pool).await, 100);

    // A failing handler leaves no barrier row: its retry runs.
    let branch = Branch::new("g3", "pay", Op::Action);
    let failed: Result<Outcome<()>, BarrierError<&str>> = barrier::run(&pool, &branch, |tx| {
        Box::pin(async move {
            with_tx!(tx, c => sqlx::query("UPDATE accounts SET balance = balance - 1 WHERE id = 'ann'")
                .execute(&mut **c)
                .await
                .map(drop))
            .map_err(|_| "store")?;
            Err("insufficient funds")
        })
    })
    .await;
    assert!(matches!(
        failed,
        Err(BarrierError::Handler("insufficient funds"))
    ));
    assert_eq!(
        balance(&pool).await,
        100,
        "the handler's own write rolled back"
    );
    assert_eq!(apply(&pool, &branch, -10).await, Outcome::Done(()));
    assert_eq!(balance(&pool).await, 90);

    // Twenty concurrent deliveries of one action: one runs.
    let pool = Arc::new(pool);
    let branch = Branch::new("g4", "pay", Op::Action);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (pool, branch) = (pool.clone(), branch.clone());
            tokio::spawn(async move { apply(&pool, &branch, -5).await })
        })
        .collect();
    let mut done = 0;
    for t in tasks {
        if t.await.unwrap() == Outcome::Done(()) {
            done += 1;
        }
    }
    assert_eq!(done, 1);
    assert_eq!(balance(&pool).await, 85);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_barrier_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    the_barrier_on(&format!("sqlite://{}", dir.path().join("p.db").display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_barrier_on_postgres() {
    let pg = trellis_testkit::Postgres::start().unwrap();
    the_barrier_on(&pg.url()).await;
}
