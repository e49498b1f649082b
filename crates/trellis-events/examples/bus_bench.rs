//! Publish and consume rates through Trellis against raw async-nats on the
//! same JetStream server, the embedded log's rates, the outbox relay's
//! throughput and publish-to-consume latency (scripts/bench/events.sh).
//!
//!   NATS_URL=nats://127.0.0.1:4222 cargo run --release -p trellis-events --all-features --example bus_bench
//!
//! Without NATS_URL a nats-server is started here (the testkit's).

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, context::PublishErrorKind, stream};
use futures_util::StreamExt;
use trellis_events::{
    Bus, ConsumerSettings, Event, EventsSettings, StartAt,
    es::{Aggregate, EventStore},
    outbox::{self, Relay, RelaySettings},
};
use trellis_store::Pool;

const N: usize = 20_000;
const WINDOW: usize = 256;

fn event(i: usize) -> Event {
    // ~100 bytes of data, like a small domain event.
    Event::new(
        "/bench",
        "bench.happened.v1",
        format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(80)),
    )
    .with_content_type("application/json")
    .with_subject(format!("thing/{}", i % 100))
}

fn rate(n: usize, took: Duration) -> String {
    format!("{:.0}/s", n as f64 / took.as_secs_f64())
}

async fn raw(url: &str) -> (Duration, Duration, Duration) {
    let client = async_nats::connect(url).await.unwrap();
    let js = jetstream::new(client);
    let _ = js.delete_stream("RAW").await;
    js.create_stream(stream::Config {
        name: "RAW".into(),
        subjects: vec!["raw.>".into()],
        // As Trellis configures its stream.
        storage: stream::StorageType::File,
        max_age: EventsSettings::default().max_age,
        duplicate_window: EventsSettings::default().duplicate_window,
        ..Default::default()
    })
    .await
    .unwrap();
    let events: Vec<Event> = (0..N).map(event).collect();
    let message = |e: &Event| {
        let mut headers = async_nats::HeaderMap::new();
        for (k, v) in e.to_headers() {
            headers.insert(k.as_str(), v.as_str());
        }
        jetstream::message::PublishMessage::build()
            .headers(headers)
            .message_id(&e.id)
            .payload(e.data.clone())
    };
    // One at a time, each ack awaited (other events: the same ids would be
    // dropped as duplicates by the pipelined run).
    let singles: Vec<Event> = (0..N / 4).map(event).collect();
    let started = Instant::now();
    for e in &singles {
        js.send_publish("raw.sync", message(e))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let sync = started.elapsed() * 4;
    // Pipelined: windows of acks awaited together.
    let started = Instant::now();
    for chunk in events.chunks(WINDOW) {
        let mut acks = Vec::with_capacity(chunk.len());
        for e in chunk {
            acks.push(js.send_publish("raw.async", message(e)).await.unwrap());
        }
        for ack in acks {
            if let Err(e) = ack.await
                && e.kind() != PublishErrorKind::Other
            {
                panic!("{e}");
            }
        }
    }
    let pipelined = started.elapsed();
    // Consume with a durable pull consumer, each message double-acked.
    let stream = js.get_stream("RAW").await.unwrap();
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("raw".into()),
            filter_subject: "raw.async".into(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 256,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(64)
        .messages()
        .await
        .unwrap();
    let started = Instant::now();
    for i in 0..N {
        let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .unwrap_or_else(|_| panic!("raw consumer: no message {i} within 10 s"))
            .unwrap()
            .unwrap();
        m.double_ack().await.unwrap();
    }
    (sync, pipelined, started.elapsed())
}

async fn trellis(bus: &Bus, prefix: &str) -> (Duration, Duration, Duration) {
    let events: Vec<Event> = (0..N).map(event).collect();
    let singles: Vec<Event> = (0..N / 4).map(event).collect();
    let started = Instant::now();
    for e in &singles {
        bus.publish(&format!("{prefix}.sync"), e).await.unwrap();
    }
    let sync = started.elapsed() * 4;
    let started = Instant::now();
    for chunk in events.chunks(WINDOW) {
        let batch: Vec<(String, Event)> = chunk
            .iter()
            .map(|e| (format!("{prefix}.async"), e.clone()))
            .collect();
        let (_, error) = bus.publish_batch(&batch).await;
        assert!(error.is_none(), "{error:?}");
    }
    let pipelined = started.elapsed();
    let settings = ConsumerSettings {
        max_ack_pending: 256,
        ..ConsumerSettings::new(
            format!("{}-reader", prefix.replace('.', "-")),
            format!("{prefix}.async"),
        )
    };
    let mut sub = bus.subscribe(&settings).await.unwrap();
    let started = Instant::now();
    for _ in 0..N {
        sub.next().await.unwrap().ack().await.unwrap();
    }
    (sync, pipelined, started.elapsed())
}

/// Outbox rows written, then relayed; and one event at a time, from the
/// outbox commit to the consumer.
async fn relay(bus: &Bus, dir: &std::path::Path, label: &str) {
    let pool = Pool::open(
        &format!(
            "sqlite://{}",
            dir.join(format!("outbox-{label}.db")).display()
        ),
        4,
        Duration::from_secs(5),
        &trellis_store::migrator("_bench", &[]),
    )
    .await
    .unwrap();
    trellis_events::migrate(&pool).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    for i in 0..N {
        outbox::append(&mut tx, "events.bench.relay", &event(i))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let relay = Relay::new(pool.clone(), bus.clone(), RelaySettings::default());
    let started = Instant::now();
    while relay.run_once().await.unwrap() > 0 {}
    let relayed = started.elapsed();

    // Latency: commit → relay → bus → consumer, one event in flight.
    let relay_task = tokio::spawn({
        let relay = relay.clone();
        async move { relay.run(std::future::pending()).await }
    });
    let mut sub = bus
        .subscribe(&ConsumerSettings {
            start: StartAt::New,
            ..ConsumerSettings::new(format!("latency-{label}"), "events.bench.latency")
        })
        .await
        .unwrap();
    let mut latencies = Vec::new();
    for i in 0..1000 {
        let started = Instant::now();
        let mut tx = pool.begin().await.unwrap();
        outbox::append(&mut tx, "events.bench.latency", &event(i))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        relay.wake();
        sub.next().await.unwrap().ack().await.unwrap();
        latencies.push(started.elapsed());
    }
    relay_task.abort();
    latencies.sort();
    println!(
        "| outbox → {label} | relay {} | commit-to-consume p50 {:?} p99 {:?} |",
        rate(N, relayed),
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 99 / 100]
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let started_here;
    let url = match std::env::var("NATS_URL") {
        Ok(url) => url,
        Err(_) => {
            started_here = trellis_testkit::Nats::start().unwrap();
            started_here.url()
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let js = Bus::connect(
        &EventsSettings {
            url: Some(trellis_core::Secret::new(url.clone())),
            ..EventsSettings::default()
        },
        dir.path(),
    )
    .await
    .unwrap();
    let embedded = Bus::connect(&EventsSettings::default(), dir.path())
        .await
        .unwrap();

    // Three rounds, alternating which goes first; the median of each.
    let (mut raws, mut ours) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let prefix = format!("events.bench{round}");
        if round % 2 == 0 {
            raws.push(raw(&url).await);
            ours.push(trellis(&js, &prefix).await);
        } else {
            ours.push(trellis(&js, &prefix).await);
            raws.push(raw(&url).await);
        }
    }
    let (raw_sync, raw_pipe, raw_consume) = median(raws);
    let (t_sync, t_pipe, t_consume) = median(ours);
    let (e_sync, e_pipe, e_consume) = trellis(&embedded, "events.bench").await;
    println!(
        "| {N} events, ~100 B | publish, ack awaited each | publish, pipelined ({WINDOW}) | consume + double ack |"
    );
    println!("|---|---|---|---|");
    println!(
        "| raw async-nats | {} | {} | {} |",
        rate(N, raw_sync),
        rate(N, raw_pipe),
        rate(N, raw_consume)
    );
    println!(
        "| Trellis on JetStream | {} | {} | {} |",
        rate(N, t_sync),
        rate(N, t_pipe),
        rate(N, t_consume)
    );
    let ratio = |raw: Duration, ours: Duration| raw.as_secs_f64() / ours.as_secs_f64();
    println!(
        "| Trellis / raw | {:.2}× | {:.2}× | {:.2}× |",
        ratio(raw_sync, t_sync),
        ratio(raw_pipe, t_pipe),
        ratio(raw_consume, t_consume)
    );
    println!(
        "| Trellis, embedded log | {} | {} | {} |",
        rate(N, e_sync),
        rate(N, e_pipe),
        rate(N, e_consume)
    );
    println!();
    relay(&js, dir.path(), "JetStream").await;
    relay(&embedded, dir.path(), "embedded").await;
    println!();
    event_store(dir.path()).await;
}

type Times = (Duration, Duration, Duration);

fn median(mut runs: Vec<Times>) -> Times {
    let mid = runs.len() / 2;
    let mut pick = |f: fn(&Times) -> Duration| {
        runs.sort_by_key(f);
        f(&runs[mid])
    };
    (pick(|t| t.0), pick(|t| t.1), pick(|t| t.2))
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Counter {
    value: i64,
}

impl Aggregate for Counter {
    const TYPE: &'static str = "counter";
    type Command = i64;
    type Event = i64;
    fn decide(&self, add: &i64) -> Result<Vec<i64>, String> {
        Ok(vec![*add])
    }
    fn evolve(mut self, add: &i64) -> Self {
        self.value += add;
        self
    }
}

/// Commands appended one at a time (load, decide, append, commit), on
/// 100 aggregates; then loads of an aggregate of 1 000 events, with a
/// snapshot every 100 and without.
async fn event_store(dir: &std::path::Path) {
    let pool = Pool::open(
        &format!("sqlite://{}", dir.join("es.db").display()),
        4,
        Duration::from_secs(5),
        &trellis_store::migrator("_bench", &[]),
    )
    .await
    .unwrap();
    trellis_events::migrate(&pool).await.unwrap();
    let store = EventStore::new(pool.clone()).snapshot_every(100);
    let n = 5_000;
    let started = Instant::now();
    for i in 0..n {
        store
            .execute::<Counter>(&format!("c-{}", i % 100), &1, None)
            .await
            .unwrap();
    }
    let appended = started.elapsed();
    for _ in 0..1_000 {
        store.execute::<Counter>("long", &1, None).await.unwrap();
    }
    let loads = 500;
    let started = Instant::now();
    for _ in 0..loads {
        store.load::<Counter>("long").await.unwrap();
    }
    let snapshot = started.elapsed();
    let started = Instant::now();
    for _ in 0..loads {
        store.replay::<Counter>("long").await.unwrap();
    }
    let replay = started.elapsed();
    println!("| event store (SQLite) | rate |");
    println!("|---|---|");
    println!(
        "| execute (load + decide + append + commit) | {} |",
        rate(n, appended)
    );
    println!(
        "| load 1 000 events, snapshot every 100 | {} |",
        rate(loads, snapshot)
    );
    println!(
        "| load 1 000 events, full replay | {} |",
        rate(loads, replay)
    );
}
