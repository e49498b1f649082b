//! The outbox, the relay and the inbox against SQLite, PostgreSQL and NATS
//! JetStream (real engines from the testkit).

use std::{collections::BTreeMap, time::Duration};

use trellis_events::{
    Bus, ConsumerSettings, Event, EventsSettings, StartAt,
    inbox::{self, HandleError, Handled},
    outbox::{self, Relay, RelaySettings},
};
use trellis_store::{Pool, migrator, with_pool, with_tx};
use trellis_testkit::{Nats, Postgres, eventually};

const WITHIN: Duration = Duration::from_secs(60);

async fn store(url: &str) -> Pool {
    let business = migrator(
        "_test_migrations",
        &[(
            1,
            "business",
            "CREATE TABLE things (id TEXT PRIMARY KEY, n BIGINT NOT NULL)",
        )],
    );
    let pool = Pool::open(url, 16, Duration::from_secs(10), &business)
        .await
        .expect("store");
    trellis_events::migrate(&pool).await.expect("outbox tables");
    pool
}

async fn embedded_bus(dir: &std::path::Path) -> Bus {
    let settings = EventsSettings {
        poll: Duration::from_millis(20),
        ..EventsSettings::default()
    };
    Bus::connect(&settings, dir).await.expect("bus")
}

async fn jetstream_bus(nats: &Nats) -> Bus {
    let settings = EventsSettings {
        url: Some(trellis_core::Secret::new(nats.url())),
        ..EventsSettings::default()
    };
    Bus::connect(&settings, "/nonexistent".as_ref())
        .await
        .expect("bus")
}

/// One business row and its event, in one transaction.
async fn write(pool: &Pool, aggregate: &str, n: i64) -> Event {
    let event = Event::json(
        "/test",
        "test.thing.changed.v1",
        &serde_json::json!({ "n": n }),
    )
    .expect("event")
    .with_subject(aggregate);
    let mut tx = pool.begin().await.expect("begin");
    with_tx!(&mut tx, c => {
        sqlx::query("INSERT INTO things (id, n) VALUES ($1, $2)")
            .bind(&event.id)
            .bind(n)
            .execute(&mut **c)
            .await
            .expect("business row");
    });
    outbox::append(&mut tx, "events.test.thing", &event)
        .await
        .expect("append");
    tx.commit().await.expect("commit");
    event
}

/// Everything the stream holds on `filter`, in order (up to its last sequence).
async fn stream(bus: &Bus, filter: &str) -> Vec<trellis_events::Stored> {
    let last = bus.last_seq().await.expect("last seq");
    let mut reader = bus.read(filter, StartAt::All).await.expect("read");
    let mut out = Vec::new();
    loop {
        let stored = tokio::time::timeout(WITHIN, reader.next())
            .await
            .expect("stream read in time")
            .expect("read");
        let seq = stored.seq;
        out.push(stored);
        if seq >= last {
            return out;
        }
    }
}

/// A transaction that took its outbox id first and commits last is still
/// published: the relay keeps no high-water mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_is_not_skipped() {
    let pg = Postgres::start().expect("postgres");
    let pool = store(&pg.url()).await;
    let dir = tempfile::tempdir().expect("dir");
    let bus = embedded_bus(dir.path()).await;
    let relay = Relay::new(pool.clone(), bus.clone(), RelaySettings::default());

    let early = Event::new("/test", "test.early.v1", "early").with_subject("a/1");
    let mut slow = pool.begin().await.expect("begin");
    outbox::append(&mut slow, "events.test.late", &early)
        .await
        .expect("append");
    let late = write(&pool, "a/2", 2).await; // a greater id, committed first
    assert_eq!(relay.run_once().await.expect("relay"), 1);
    slow.commit().await.expect("the early id commits late");
    assert_eq!(
        relay.run_once().await.expect("relay"),
        1,
        "the late commit is found"
    );
    assert_eq!(relay.backlog().await.expect("backlog"), 0);
    let ids: Vec<String> = stream(&bus, "events.>")
        .await
        .into_iter()
        .map(|s| s.event.id)
        .collect();
    assert_eq!(ids, vec![late.id, early.id]);
}

async fn ordered_per_aggregate(pool: Pool, bus: Bus) {
    let relay = Relay::new(
        pool.clone(),
        bus.clone(),
        RelaySettings {
            batch: 16,
            ..RelaySettings::default()
        },
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn({
        let relay = relay.clone();
        async move {
            relay
                .run(async {
                    let _ = stopped.await;
                })
                .await
        }
    });
    let mut writers = Vec::new();
    for w in 0..8i64 {
        let (pool, relay) = (pool.clone(), relay.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..40 {
                write(&pool, &format!("agg/{}", (w + i) % 4), w * 1000 + i).await;
                relay.wake();
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    eventually(WITHIN, "the outbox drained", || async {
        match relay.backlog().await {
            Ok(0) => Ok(()),
            Ok(n) => Err(format!("{n} rows left")),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    let _ = stop.send(());
    running.await.expect("relay stopped");
    let events = stream(&bus, "events.test.thing").await;
    assert_eq!(events.len(), 320, "every event once");
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for e in &events {
        let aggregate = e.event.subject.clone().expect("aggregate");
        let sequence: u64 = e.event.extensions["sequence"].parse().expect("sequence");
        let previous = last.insert(aggregate.clone(), sequence).unwrap_or(0);
        assert_eq!(
            sequence,
            previous + 1,
            "{aggregate} out of order at stream seq {}",
            e.seq
        );
    }
    let rows: i64 = with_pool!(&pool, p => sqlx::query_scalar("SELECT COUNT(*) FROM things").fetch_one(p).await.expect("count"));
    assert_eq!(rows, 320);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_publish_in_order_per_aggregate_on_postgres() {
    let pg = Postgres::start().expect("postgres");
    let nats = Nats::start().expect("nats");
    let pool = store(&pg.url()).await;
    ordered_per_aggregate(pool, jetstream_bus(&nats).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_publish_in_order_per_aggregate_on_sqlite() {
    let dir = tempfile::tempdir().expect("dir");
    let pool = store(&format!(
        "sqlite://{}",
        dir.path().join("shop.db").display()
    ))
    .await;
    ordered_per_aggregate(pool, embedded_bus(dir.path()).await).await;
}

/// A relay that published and crashed before deleting its rows publishes
/// them again: JetStream drops the copies by `Nats-Msg-Id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_crash_after_publishing_leaves_no_duplicates() {
    let nats = Nats::start().expect("nats");
    let bus = jetstream_bus(&nats).await;
    let dir = tempfile::tempdir().expect("dir");
    let pool = store(&format!(
        "sqlite://{}",
        dir.path().join("shop.db").display()
    ))
    .await;
    let mut written = Vec::new();
    for n in 0..20 {
        written.push(write(&pool, &format!("agg/{}", n % 3), n).await);
    }
    // What the crashed relay did: published every row, deleted none.
    let rows: Vec<(String, String, Vec<u8>)> = with_pool!(&pool, p => sqlx::query_as(
        "SELECT subject, attributes, data FROM trellis_outbox ORDER BY id"
    ).fetch_all(p).await.expect("rows"));
    for (subject, attributes, data) in rows {
        let event = Event::from_attributes_json(&attributes, data.into()).expect("event");
        assert!(
            !bus.publish(&subject, &event)
                .await
                .expect("publish")
                .duplicate
        );
    }
    let relay = Relay::new(pool.clone(), bus.clone(), RelaySettings::default());
    assert_eq!(relay.run_once().await.expect("relay"), 20);
    assert_eq!(relay.backlog().await.expect("backlog"), 0);
    let ids: Vec<String> = stream(&bus, "events.>")
        .await
        .into_iter()
        .map(|s| s.event.id)
        .collect();
    let expected: Vec<String> = written.into_iter().map(|e| e.id).collect();
    assert_eq!(ids, expected, "each event once, in order");
}

/// A consumer's effect and its inbox row commit together: a redelivery
/// (its acknowledgement was lost) has no second effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_absorbs_a_redelivery() {
    let dir = tempfile::tempdir().expect("dir");
    let bus = embedded_bus(dir.path()).await;
    let pool = store(&format!(
        "sqlite://{}",
        dir.path().join("consumer.db").display()
    ))
    .await;
    let event = Event::new("/test", "test.once.v1", "x");
    bus.publish("events.test.once", &event)
        .await
        .expect("publish");
    let settings = ConsumerSettings {
        ack_wait: Duration::from_millis(200),
        ..ConsumerSettings::new("once", "events.test.once")
    };
    let mut sub = bus.subscribe(&settings).await.expect("subscribe");
    // The first delivery: effect and inbox row committed, then the process
    // dies before acknowledging.
    let first = sub.next().await.expect("delivery");
    let mut tx = pool.begin().await.expect("begin");
    assert!(
        inbox::first(&mut tx, "once", &first.event.id)
            .await
            .expect("inbox")
    );
    apply(&mut tx, &first.event).await;
    tx.commit().await.expect("commit");
    drop(first);
    let again = tokio::time::timeout(WITHIN, sub.next())
        .await
        .expect("redelivered")
        .expect("delivery");
    assert_eq!((again.delivered, &again.event.id), (2, &event.id));
    let handled = inbox::handle(&pool, "once", again, |mut tx, event| async move {
        apply(&mut tx, &event).await;
        Ok(tx)
    })
    .await
    .expect("handle");
    assert_eq!(handled, Handled::Duplicate);
    assert_eq!(effects(&pool).await, 1);
    // A handler that fails rolls its writes back with the inbox row.
    let other = Event::new("/test", "test.once.v1", "y");
    bus.publish("events.test.once", &other)
        .await
        .expect("publish");
    let d = sub.next().await.expect("delivery");
    let handled = inbox::handle(&pool, "once", d, |mut tx, event| async move {
        apply(&mut tx, &event).await;
        Err::<trellis_store::Tx, _>(HandleError::Retry("downstream busy".into()))
    })
    .await
    .expect("handle");
    assert_eq!((handled, effects(&pool).await), (Handled::Retrying, 1));
    let d = tokio::time::timeout(WITHIN, sub.next())
        .await
        .expect("retried")
        .expect("delivery");
    let handled = inbox::handle(&pool, "once", d, |mut tx, event| async move {
        apply(&mut tx, &event).await;
        Ok(tx)
    })
    .await
    .expect("handle");
    assert_eq!((handled, effects(&pool).await), (Handled::Done, 2));
}

async fn apply(tx: &mut trellis_store::Tx, event: &Event) {
    with_tx!(tx, c => {
        sqlx::query("INSERT INTO things (id, n) VALUES ($1, 1)")
            .bind(&event.id)
            .execute(&mut **c)
            .await
            .expect("effect");
    });
}

async fn effects(pool: &Pool) -> i64 {
    with_pool!(pool, p => sqlx::query_scalar("SELECT COUNT(*) FROM things").fetch_one(p).await.expect("count"))
}

/// NATS killed and restarted while producers write and a consumer
/// handles: every business row's event is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_under_load_loses_and_repeats_nothing() {
    const WRITERS: i64 = 4;
    const EACH: i64 = 150;
    let mut nats = Nats::start().expect("nats");
    let bus = jetstream_bus(&nats).await;
    let dir = tempfile::tempdir().expect("dir");
    let producer = store(&format!(
        "sqlite://{}",
        dir.path().join("producer.db").display()
    ))
    .await;
    let consumer_db = store(&format!(
        "sqlite://{}",
        dir.path().join("consumer.db").display()
    ))
    .await;
    with_pool!(&consumer_db, p => {
        sqlx::query("CREATE TABLE applied (event_id TEXT NOT NULL)")
            .execute(p)
            .await
            .expect("effects table");
    });
    let relay = Relay::new(
        producer.clone(),
        bus.clone(),
        RelaySettings {
            batch: 32,
            max_backoff: Duration::from_millis(500),
            ..RelaySettings::default()
        },
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let relay_task = tokio::spawn({
        let (relay, mut stopped) = (relay.clone(), stopped.clone());
        async move {
            relay
                .run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        }
    });
    let settings = ConsumerSettings {
        ack_wait: Duration::from_secs(2),
        max_deliver: 1000,
        backoff: vec![Duration::from_millis(100)],
        ..ConsumerSettings::new("applier", "events.test.>")
    };
    let mut sub = bus.subscribe(&settings).await.expect("subscribe");
    let consumer_task = tokio::spawn({
        let (pool, mut stopped) = (consumer_db.clone(), stopped.clone());
        async move {
            loop {
                let delivery = tokio::select! {
                    d = sub.next() => d,
                    _ = stopped.wait_for(|s| *s) => return,
                };
                let Ok(delivery) = delivery else { continue };
                // Errors (NATS down while acknowledging) leave the event to
                // be delivered again; the inbox absorbs it.
                let _ = inbox::handle(&pool, "applier", delivery, |mut tx, event| async move {
                    with_tx!(&mut tx, c => {
                        sqlx::query("INSERT INTO applied (event_id) VALUES ($1)")
                            .bind(&event.id)
                            .execute(&mut **c)
                            .await
                            .map_err(|e| HandleError::Retry(e.to_string()))?;
                    });
                    Ok(tx)
                })
                .await;
            }
        }
    });
    // Half the writes with NATS up; once a third of all is applied, NATS
    // dies mid-stream and the other half is written while it is down.
    let write_half = |half: i64| -> Vec<tokio::task::JoinHandle<()>> {
        (0..WRITERS)
            .map(|w| {
                let (pool, relay) = (producer.clone(), relay.clone());
                tokio::spawn(async move {
                    for i in half * EACH / 2..(half + 1) * EACH / 2 {
                        write(&pool, &format!("agg/{w}"), w * 1000 + i).await;
                        relay.wake();
                    }
                })
            })
            .collect()
    };
    let first_half = write_half(0);
    eventually(WITHIN, "a third applied", || async {
        let n = applied(&consumer_db).await;
        if n >= WRITERS * EACH / 3 {
            Ok(())
        } else {
            Err(format!("{n} applied"))
        }
    })
    .await;
    nats.stop();
    let during = applied(&consumer_db).await;
    for w in first_half.into_iter().chain(write_half(1)) {
        w.await.expect("writer");
    }
    let backlog = relay.backlog().await.expect("backlog");
    assert!(backlog > 0, "the producers wrote while NATS was down");
    nats.restart().expect("nats back");
    eventually(WITHIN, "every event applied", || async {
        let n = applied(&consumer_db).await;
        if n >= WRITERS * EACH {
            Ok(())
        } else {
            let backlog = relay.backlog().await.map_err(|e| e.to_string())?;
            let published = bus.last_seq().await.map_err(|e| e.to_string())?;
            Err(format!(
                "{n} of {} applied; outbox backlog {backlog}, stream last seq {published}",
                WRITERS * EACH
            ))
        }
    })
    .await;
    let _ = stop.send(true);
    relay_task.await.expect("relay");
    consumer_task.await.expect("consumer");
    assert!(
        during < WRITERS * EACH,
        "NATS went down mid-stream ({during} applied before)"
    );
    let (rows, distinct): (i64, i64) = with_pool!(&consumer_db, p => sqlx::query_as(
        "SELECT COUNT(*), COUNT(DISTINCT event_id) FROM applied"
    ).fetch_one(p).await.expect("count"));
    assert_eq!(
        (rows, distinct),
        (WRITERS * EACH, WRITERS * EACH),
        "0 lost, 0 applied twice"
    );
    let business: Vec<String> = with_pool!(&producer, p => sqlx::query_scalar("SELECT id FROM things ORDER BY id").fetch_all(p).await.expect("ids"));
    let mut effects: Vec<String> = with_pool!(&consumer_db, p => sqlx::query_scalar("SELECT event_id FROM applied").fetch_all(p).await.expect("ids"));
    effects.sort();
    assert_eq!(business, effects, "one effect per business row");
    assert_eq!(relay.backlog().await.expect("backlog"), 0);
}

async fn applied(pool: &Pool) -> i64 {
    with_pool!(pool, p => sqlx::query_scalar("SELECT COUNT(*) FROM applied").fetch_one(p).await.unwrap_or(0))
}
