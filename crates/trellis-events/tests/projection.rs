//! Projections on the embedded log and on JetStream: a live projection
//! equals one rebuilt from zero, and resumes from its checkpoint.

use std::time::Duration;

use trellis_events::{
    Bus, Event, EventsSettings, Stored,
    projection::{self, Projection},
};
use trellis_store::{Pool, Tx, migrator, with_pool, with_tx};
use trellis_testkit::{Nats, eventually};

struct Tally;

impl Projection for Tally {
    fn name(&self) -> &str {
        "tally"
    }
    fn filter(&self) -> &str {
        "events.tally.>"
    }
    async fn apply(&self, tx: &mut Tx, event: &Stored) -> Result<(), sqlx::Error> {
        let aggregate = event.event.subject.clone().unwrap_or_default();
        with_tx!(tx, c => {
            sqlx::query(
                "INSERT INTO tally (aggregate, n, last_seq) VALUES ($1, 1, $2) \
                 ON CONFLICT (aggregate) DO UPDATE SET n = tally.n + 1, last_seq = excluded.last_seq",
            )
            .bind(aggregate)
            .bind(event.seq as i64)
            .execute(&mut **c)
            .await?;
        });
        Ok(())
    }
    async fn reset(&self, tx: &mut Tx) -> Result<(), sqlx::Error> {
        with_tx!(tx, c => {
            sqlx::query("DELETE FROM tally").execute(&mut **c).await?;
        });
        Ok(())
    }
}

async fn pool(dir: &std::path::Path) -> Pool {
    let m = migrator(
        "_test_migrations",
        &[(
            1,
            "tally",
            "CREATE TABLE tally (aggregate TEXT PRIMARY KEY, n BIGINT NOT NULL, last_seq BIGINT NOT NULL)",
        )],
    );
    let pool = Pool::open(
        &format!("sqlite://{}", dir.join("read.db").display()),
        4,
        Duration::from_secs(5),
        &m,
    )
    .await
    .expect("store");
    trellis_events::migrate(&pool).await.expect("tables");
    pool
}

async fn rows(pool: &Pool) -> Vec<(String, i64, i64)> {
    with_pool!(pool, p => sqlx::query_as("SELECT aggregate, n, last_seq FROM tally ORDER BY aggregate")
        .fetch_all(p)
        .await
        .expect("rows"))
}

async fn publish(bus: &Bus, from: usize, to: usize) {
    for n in from..to {
        let e = Event::new("/test", "test.tallied.v1", "").with_subject(format!("agg/{}", n % 5));
        bus.publish("events.tally.x", &e).await.expect("publish");
        // Events the projection does not read, in between.
        bus.publish("events.other.x", &Event::new("/test", "test.other.v1", ""))
            .await
            .expect("publish");
    }
}

async fn live_equals_rebuilt(bus: Bus, dir: &std::path::Path) {
    let pool = pool(dir).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let live = tokio::spawn({
        let (pool, bus) = (pool.clone(), bus.clone());
        async move {
            projection::run(&pool, &bus, &Tally, async {
                let _ = stopped.await;
            })
            .await
        }
    });
    publish(&bus, 0, 100).await;
    let last_tallied = bus.last_seq().await.expect("last") - 1;
    eventually(
        Duration::from_secs(30),
        "the live projection caught up",
        || async {
            match projection::checkpoint(&pool, "tally").await {
                Ok(c) if c >= last_tallied => Ok(()),
                other => Err(format!("checkpoint {other:?}, want {last_tallied}")),
            }
        },
    )
    .await;
    let _ = stop.send(());
    live.await.expect("stopped");
    let live_rows = rows(&pool).await;
    assert_eq!(live_rows.iter().map(|r| r.1).sum::<i64>(), 100);

    // Stopped, more events come; catching up applies only those.
    publish(&bus, 100, 120).await;
    let applied = projection::catch_up(&pool, &bus, &Tally, 7)
        .await
        .expect("catch up");
    assert_eq!(applied, 20, "resumed from the checkpoint");
    assert_eq!(
        projection::catch_up(&pool, &bus, &Tally, 7)
            .await
            .expect("again"),
        0
    );
    let caught_up = rows(&pool).await;

    let replayed = projection::rebuild(&pool, &bus, &Tally)
        .await
        .expect("rebuild");
    assert_eq!(replayed, 120);
    assert_eq!(
        rows(&pool).await,
        caught_up,
        "a rebuild from zero equals the live projection"
    );
    assert_eq!(
        projection::checkpoint(&pool, "tally")
            .await
            .expect("checkpoint"),
        bus.last_seq().await.expect("last")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_live_projection_equals_a_rebuild() {
    let dir = tempfile::tempdir().expect("dir");
    let settings = EventsSettings {
        poll: Duration::from_millis(20),
        ..EventsSettings::default()
    };
    let bus = Bus::connect(&settings, dir.path()).await.expect("bus");
    live_equals_rebuilt(bus, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_live_projection_equals_a_rebuild() {
    let nats = Nats::start().expect("nats");
    let dir = tempfile::tempdir().expect("dir");
    let settings = EventsSettings {
        url: Some(trellis_core::Secret::new(nats.url())),
        ..EventsSettings::default()
    };
    let bus = Bus::connect(&settings, dir.path()).await.expect("bus");
    live_equals_rebuilt(bus, dir.path()).await;
}
