//! Event sourcing on SQLite and PostgreSQL: optimistic concurrency,
//! snapshots that change nothing, upcasting of old events.

use std::time::Duration;

use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use trellis_events::es::{Aggregate, EsError, EventStore, Publish};
use trellis_store::{Pool, migrator, with_tx};
use trellis_testkit::Postgres;

/// An account: deposits and withdrawals, never below zero.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Account {
    balance: i64,
    moves: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Moved {
    Deposited { amount: i64 },
    Withdrew { amount: i64 },
}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Command = i64;
    type Event = Moved;
    fn decide(&self, amount: &i64) -> Result<Vec<Moved>, String> {
        match *amount {
            0 => Ok(Vec::new()),
            a if a > 0 => Ok(vec![Moved::Deposited { amount: a }]),
            a if self.balance + a < 0 => {
                Err(format!("balance {} is short of {}", self.balance, -a))
            }
            a => Ok(vec![Moved::Withdrew { amount: -a }]),
        }
    }
    fn evolve(mut self, event: &Moved) -> Self {
        match event {
            Moved::Deposited { amount } => self.balance += amount,
            Moved::Withdrew { amount } => self.balance -= amount,
        }
        self.moves += 1;
        self
    }
}

async fn open(url: &str) -> Pool {
    let pool = Pool::open(
        url,
        16,
        Duration::from_secs(10),
        &migrator("_test_migrations", &[]),
    )
    .await
    .expect("store");
    trellis_events::migrate(&pool).await.expect("tables");
    pool
}

async fn sqlite(dir: &std::path::Path) -> Pool {
    open(&format!("sqlite://{}", dir.join("es.db").display())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_lost_the_race_is_retried_or_aborted_on_postgres() {
    let pg = Postgres::start().expect("postgres");
    let pool = open(&pg.url()).await;
    let store = EventStore::new(pool.clone()).attempts(1);
    // Another writer holds version 1 in a transaction not yet committed.
    let mut other = pool.begin().await.expect("begin");
    with_tx!(&mut other, c => {
        sqlx::query("INSERT INTO trellis_es_events (aggregate_type, aggregate_id, version, schema_version, data, time_us) VALUES ('account', 'a-1', 1, 1, $1, 0)")
            .bind(serde_json::to_string(&Moved::Deposited { amount: 10 }).expect("json"))
            .execute(&mut **c)
            .await
            .expect("insert");
    });
    let racing = tokio::spawn({
        let store = store.clone();
        async move { store.execute::<Account>("a-1", &5, None).await }
    });
    // The command has loaded version 0 and waits on the same key.
    trellis_testkit::eventually(Duration::from_secs(10), "the command waiting on the row", || {
        let pool = pool.clone();
        async move {
            let waiting: i64 = trellis_store::with_pool!(&pool, p => sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO trellis_es_events%'"
            ).fetch_one(p).await.map_err(|e| e.to_string())?);
            if waiting > 0 { Ok(()) } else { Err("not waiting yet".to_owned()) }
        }
    })
    .await;
    other.commit().await.expect("commit");
    let lost = racing.await.expect("task");
    assert!(
        matches!(lost, Err(EsError::Conflict { attempts: 1, .. })),
        "{lost:?}"
    );
    let status = trellis_core::Error::from(lost.unwrap_err());
    assert_eq!(status.code(), trellis_core::Code::Aborted);
    // With retries the same command reloads and succeeds on top.
    let retried = EventStore::new(pool.clone())
        .execute::<Account>("a-1", &5, None)
        .await
        .expect("retried");
    assert_eq!(retried.len(), 1);
    let (account, version) = EventStore::new(pool)
        .load::<Account>("a-1")
        .await
        .expect("load");
    assert_eq!((account.balance, version), (15, 2));
}

async fn concurrent_commands_keep_the_rules(pool: Pool) {
    let store = EventStore::new(pool).snapshot_every(7).attempts(100);
    store
        .execute::<Account>("shared", &100, None)
        .await
        .expect("deposit");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            for _ in 0..20 {
                match store.execute::<Account>("shared", &-1, None).await {
                    Ok(_) => done += 1,
                    Err(EsError::Refused(_)) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            done
        }));
    }
    let mut withdrawn = 0;
    for t in tasks {
        withdrawn += t.await.expect("task");
    }
    assert_eq!(
        withdrawn, 100,
        "exactly the balance was withdrawn, never more"
    );
    let (account, version) = store.load::<Account>("shared").await.expect("load");
    assert_eq!((account.balance, account.moves, version), (0, 101, 101));
    assert_eq!(
        store.replay::<Account>("shared").await.expect("replay"),
        (account, version)
    );
    let versions: Vec<u64> = store
        .history::<Account>("shared", 0, 1000)
        .await
        .expect("history")
        .iter()
        .map(|h| h.version)
        .collect();
    assert_eq!(
        versions,
        (1..=101).collect::<Vec<_>>(),
        "no gaps, no duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commands_keep_the_rules_on_postgres() {
    let pg = Postgres::start().expect("postgres");
    concurrent_commands_keep_the_rules(open(&pg.url()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commands_keep_the_rules_on_sqlite() {
    let dir = tempfile::tempdir().expect("dir");
    concurrent_commands_keep_the_rules(sqlite(dir.path()).await).await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    /// Loading from snapshots gives what replaying every event gives.
    #[test]
    fn snapshots_change_nothing(commands in proptest::collection::vec(-20i64..30, 1..60), every in 1u64..9) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let dir = tempfile::tempdir().expect("dir");
            let store = EventStore::new(sqlite(dir.path()).await).snapshot_every(every);
            let mut expected = Account::default();
            for command in &commands {
                if let Ok(events) = store.execute::<Account>("p", command, None).await {
                    for e in &events {
                        expected = expected.clone().evolve(e);
                    }
                }
                let loaded = store.load::<Account>("p").await.expect("load");
                let replayed = store.replay::<Account>("p").await.expect("replay");
                assert_eq!(loaded, replayed);
                assert_eq!(loaded.0, expected);
            }
        });
    }
}

/// The same account as written by the first version of the code: amounts
/// were in whole units under another name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct AccountV2 {
    cents: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum MovedV2 {
    Deposited { cents: i64 },
    Withdrew { cents: i64 },
}

impl Aggregate for AccountV2 {
    const TYPE: &'static str = "account";
    const VERSION: u32 = 2;
    type Command = i64;
    type Event = MovedV2;
    fn decide(&self, cents: &i64) -> Result<Vec<MovedV2>, String> {
        Ok(vec![MovedV2::Deposited { cents: *cents }])
    }
    fn evolve(mut self, event: &MovedV2) -> Self {
        match event {
            MovedV2::Deposited { cents } => self.cents += cents,
            MovedV2::Withdrew { cents } => self.cents -= cents,
        }
        self
    }
    fn upcast(version: u32, mut event: serde_json::Value) -> Result<serde_json::Value, String> {
        match version {
            2 => Ok(event),
            1 => {
                // {"Deposited":{"amount":3}} → {"Deposited":{"cents":300}}
                for (_, body) in event.as_object_mut().ok_or("not an enum")?.iter_mut() {
                    let amount = body["amount"].as_i64().ok_or("no amount")?;
                    *body = serde_json::json!({ "cents": amount * 100 });
                }
                Ok(event)
            }
            other => Err(format!("unknown version {other}")),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_events_are_upcast_on_load_and_snapshots_of_old_versions_ignored() {
    let dir = tempfile::tempdir().expect("dir");
    let pool = sqlite(dir.path()).await;
    let v1 = EventStore::new(pool.clone()).snapshot_every(2);
    for amount in [3, 4, -2] {
        v1.execute::<Account>("old", &amount, None)
            .await
            .expect("v1 write");
    }
    let v2 = EventStore::new(pool.clone()).snapshot_every(2);
    let (account, version) = v2.load::<AccountV2>("old").await.expect("load");
    assert_eq!(
        (account.cents, version),
        (500, 3),
        "v1 events upcast, the v1 snapshot ignored"
    );
    v2.execute::<AccountV2>("old", &25, None)
        .await
        .expect("v2 write");
    assert_eq!(
        v2.load::<AccountV2>("old").await.expect("load").0.cents,
        525
    );
    let schemas: Vec<u32> = v2
        .history::<AccountV2>("old", 0, 100)
        .await
        .expect("history")
        .iter()
        .map(|h| h.schema_version)
        .collect();
    assert_eq!(schemas, vec![1, 1, 1, 2], "old rows stay as written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appended_events_are_published_through_the_outbox() {
    let dir = tempfile::tempdir().expect("dir");
    let pool = sqlite(dir.path()).await;
    let bus = trellis_events::Bus::connect(&trellis_events::EventsSettings::default(), dir.path())
        .await
        .expect("bus");
    let store = EventStore::new(pool.clone());
    let publish = Some(Publish {
        subject: "events.account.moved",
        source: "/test",
    });
    store
        .execute::<Account>("pub", &10, publish)
        .await
        .expect("deposit");
    store
        .execute::<Account>("pub", &-4, publish)
        .await
        .expect("withdraw");
    assert!(
        store
            .execute::<Account>("pub", &-100, publish)
            .await
            .is_err(),
        "refused: nothing written"
    );
    let relay = trellis_events::outbox::Relay::new(pool, bus.clone(), Default::default());
    assert_eq!(relay.run_once().await.expect("relay"), 2);
    let mut reader = bus
        .read("events.account.>", trellis_events::StartAt::All)
        .await
        .expect("read");
    let first = reader.next().await.expect("first");
    assert_eq!(first.event.subject.as_deref(), Some("account/pub"));
    assert_eq!(first.event.extensions["aggregateversion"], "1");
    assert_eq!(
        first.event.json_data::<Moved>().expect("data"),
        Moved::Deposited { amount: 10 }
    );
    let second = reader.next().await.expect("second");
    assert_eq!(
        second.event.json_data::<Moved>().expect("data"),
        Moved::Withdrew { amount: 4 }
    );
}
