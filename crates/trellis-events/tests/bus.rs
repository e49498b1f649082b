//! One behaviour suite, run against the embedded log and against NATS
//! JetStream (a real nats-server from the testkit).

use std::time::Duration;

use bytes::Bytes;
use trellis_events::{
    Bus, ConsumerSettings, Delivery, Event, EventsError, EventsSettings, StartAt, Subscription,
};
use trellis_testkit::Nats;

/// Keeps the engine (or the temp dir) alive for the test.
#[allow(dead_code)]
enum Guard {
    Dir(tempfile::TempDir),
    Nats(Nats),
}

async fn embedded() -> (Bus, Guard) {
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = EventsSettings {
        poll: Duration::from_millis(20),
        ..EventsSettings::default()
    };
    let bus = Bus::connect(&settings, dir.path())
        .await
        .expect("embedded bus");
    (bus, Guard::Dir(dir))
}

async fn jetstream() -> (Bus, Guard) {
    let nats = Nats::start().expect("nats-server");
    let settings = EventsSettings {
        url: Some(trellis_core::Secret::new(nats.url())),
        ..EventsSettings::default()
    };
    let bus = Bus::connect(&settings, "/nonexistent".as_ref())
        .await
        .expect("JetStream bus");
    (bus, Guard::Nats(nats))
}

const WITHIN: Duration = Duration::from_secs(15);

async fn next(sub: &mut Subscription) -> Delivery {
    tokio::time::timeout(WITHIN, sub.next())
        .await
        .unwrap_or_else(|_| panic!("no delivery within {WITHIN:?}"))
        .expect("delivery")
}

fn event(n: usize) -> Event {
    Event::json("/test", "test.happened.v1", &serde_json::json!({ "n": n }))
        .expect("event")
        .with_subject(format!("thing/{}", n % 3))
        .with_extension("tenant", "acme")
}

fn consumer(name: &str, filter: &str) -> ConsumerSettings {
    ConsumerSettings {
        backoff: vec![Duration::from_millis(50)],
        ..ConsumerSettings::new(name, filter)
    }
}

async fn publishes_and_delivers_in_order(bus: Bus) {
    let mut seqs = Vec::new();
    let sent: Vec<Event> = (0..50).map(event).collect();
    for e in &sent {
        let published = bus.publish("events.test.made", e).await.expect("publish");
        assert!(!published.duplicate);
        seqs.push(published.seq);
    }
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "sequences grow: {seqs:?}"
    );
    assert_eq!(
        bus.last_seq().await.expect("last seq"),
        *seqs.last().expect("some")
    );
    let binary = Event::new(
        "/test",
        "test.binary.v1",
        Bytes::from_static(&[0, 159, 146, 150]),
    )
    .with_content_type("application/protobuf")
    .with_schema("proto:test.v1.Thing");
    bus.publish("events.test.made", &binary)
        .await
        .expect("publish binary");

    let mut sub = bus
        .subscribe(&consumer("reader", "events.test.>"))
        .await
        .expect("subscribe");
    for (i, e) in sent.iter().enumerate() {
        let d = next(&mut sub).await;
        assert_eq!(
            (d.seq, &d.event, d.delivered),
            (seqs[i], e, 1),
            "delivery {i}"
        );
        assert_eq!(d.subject, "events.test.made");
        assert!(d.published_ms > 0);
        d.ack().await.expect("ack");
    }
    let d = next(&mut sub).await;
    assert_eq!(d.event, binary, "binary data and attributes arrive as sent");
    d.ack().await.expect("ack");
}

async fn drops_duplicate_ids(bus: Bus) {
    let e = event(1);
    let first = bus.publish("events.test.dup", &e).await.expect("publish");
    let again = bus
        .publish("events.test.dup", &e)
        .await
        .expect("publish again");
    assert_eq!((again.seq, again.duplicate), (first.seq, true));
    let other = event(2);
    let next_seq = bus
        .publish("events.test.dup", &other)
        .await
        .expect("publish")
        .seq;
    assert_eq!(next_seq, first.seq + 1, "the duplicate took no sequence");
    let mut sub = bus
        .subscribe(&consumer("dups", "events.test.dup"))
        .await
        .expect("subscribe");
    assert_eq!(next(&mut sub).await.event.id, e.id);
    assert_eq!(
        next(&mut sub).await.event.id,
        other.id,
        "the duplicate is not delivered"
    );
}

async fn retries_with_backoff_then_dead_letters(bus: Bus) {
    let e = event(7);
    bus.publish("events.test.fail", &e).await.expect("publish");
    let settings = ConsumerSettings {
        max_deliver: 3,
        ..consumer("failing", "events.test.fail")
    };
    let mut sub = bus.subscribe(&settings).await.expect("subscribe");
    for attempt in 1..=3 {
        let d = next(&mut sub).await;
        assert_eq!(
            (d.delivered, &d.event.id),
            (attempt, &e.id),
            "attempt {attempt}"
        );
        d.retry("the mail server said no").await.expect("retry");
    }
    let mut dlq = bus
        .subscribe(&consumer("dlq-reader", "events.dlq.failing"))
        .await
        .expect("subscribe to the dead letters");
    let dead = next(&mut dlq).await;
    assert_eq!(dead.event.data, e.data);
    assert_eq!(dead.event.id, e.id);
    let ext = |k: &str| dead.event.extensions.get(k).cloned().unwrap_or_default();
    assert_eq!(ext("dlqsubject"), "events.test.fail");
    assert_eq!(ext("dlqconsumer"), "failing");
    assert_eq!(ext("dlqreason"), "the mail server said no");
    // Nothing more for the failing consumer: a fresh event comes next.
    let later = event(8);
    bus.publish("events.test.fail", &later)
        .await
        .expect("publish");
    let d = next(&mut sub).await;
    assert_eq!(
        d.event.id, later.id,
        "the dead-lettered event is not delivered again"
    );
}

async fn redelivers_what_was_not_acknowledged(bus: Bus) {
    let e = event(3);
    bus.publish("events.test.slow", &e).await.expect("publish");
    let settings = ConsumerSettings {
        ack_wait: Duration::from_millis(300),
        max_deliver: 2,
        ..consumer("slow", "events.test.slow")
    };
    let mut sub = bus.subscribe(&settings).await.expect("subscribe");
    let first = next(&mut sub).await;
    assert_eq!(first.delivered, 1);
    drop(first); // the handler died without settling it
    let second = next(&mut sub).await;
    assert_eq!((second.delivered, &second.event.id), (2, &e.id));
    drop(second); // and again, on its last attempt: to the dead letters,
    // when the consumer's loop next asks for work.
    let driver = tokio::spawn(async move { sub.next().await.map(|d| d.seq) });
    let mut dlq = bus
        .subscribe(&consumer("slow-dlq", "events.dlq.slow"))
        .await
        .expect("subscribe");
    let dead = next(&mut dlq).await;
    assert_eq!(dead.event.id, e.id);
    assert!(dead.event.extensions["dlqreason"].contains("not acknowledged"));
    assert!(
        !driver.is_finished(),
        "the expired event was not handed to the handler"
    );
    driver.abort();
}

async fn shares_work_and_resumes(bus: Bus) {
    for n in 0..20 {
        bus.publish("events.test.work", &event(n))
            .await
            .expect("publish");
    }
    // One event per fetch, so neither subscriber holds the others' work;
    // what a dropped subscriber had fetched comes back after `ack_wait`.
    let settings = ConsumerSettings {
        batch: 1,
        ack_wait: Duration::from_secs(1),
        ..consumer("workers", "events.test.work")
    };
    let mut a = bus.subscribe(&settings).await.expect("a");
    let mut b = bus.subscribe(&settings).await.expect("b");
    let mut seen = Vec::new();
    for _ in 0..5 {
        for sub in [&mut a, &mut b] {
            let d = next(sub).await;
            seen.push(d.event.id.clone());
            d.ack().await.expect("ack");
        }
    }
    drop((a, b));
    let mut again = bus.subscribe(&settings).await.expect("resubscribe");
    for _ in 0..10 {
        let d = next(&mut again).await;
        seen.push(d.event.id.clone());
        d.ack().await.expect("ack");
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        20,
        "every event once across subscribers and restarts: {seen:?}"
    );
}

async fn replays_from_a_sequence_or_a_time(bus: Bus) {
    let mut seqs = Vec::new();
    for n in 0..10 {
        seqs.push(
            bus.publish("events.test.replay", &event(n))
                .await
                .expect("publish")
                .seq,
        );
    }
    let mut from = bus
        .read("events.test.replay", StartAt::Seq(seqs[6]))
        .await
        .expect("read");
    for seq in &seqs[6..] {
        let s = tokio::time::timeout(WITHIN, from.next())
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(s.seq, *seq);
    }
    let mid = tokio::time::timeout(
        WITHIN,
        bus.read("events.test.replay", StartAt::All)
            .await
            .expect("read")
            .next(),
    )
    .await
    .expect("in time")
    .expect("read");
    assert_eq!(mid.seq, seqs[0]);
    // From a time: after the first ten, before the next two.
    let cut = mid.published_ms.max(0) + 1;
    let boundary = wait_past(cut).await;
    let late = bus
        .publish("events.test.replay", &event(10))
        .await
        .expect("publish")
        .seq;
    let mut timed = bus
        .read("events.test.replay", StartAt::TimeMs(boundary))
        .await
        .expect("read");
    let s = tokio::time::timeout(WITHIN, timed.next())
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(
        s.seq, late,
        "replay from a time starts at the first event published after it"
    );
    // A new consumer starting at `New` sees only what comes after it.
    let mut fresh = bus
        .subscribe(&ConsumerSettings {
            start: StartAt::New,
            ..consumer("fresh", "events.test.replay")
        })
        .await
        .expect("subscribe");
    let newest = bus
        .publish("events.test.replay", &event(11))
        .await
        .expect("publish")
        .seq;
    assert_eq!(next(&mut fresh).await.seq, newest);
}

/// A time strictly after `t` and after now (ms), once the clock has passed it.
async fn wait_past(t: i64) -> i64 {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    };
    let target = t.max(now()) + 2;
    while now() <= target {
        tokio::task::yield_now().await;
    }
    target
}

async fn holds_back_past_max_ack_pending(bus: Bus) {
    for n in 0..8 {
        bus.publish("events.test.press", &event(n))
            .await
            .expect("publish");
    }
    let settings = ConsumerSettings {
        max_ack_pending: 3,
        batch: 2,
        ..consumer("pressed", "events.test.press")
    };
    let mut sub = bus.subscribe(&settings).await.expect("subscribe");
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next(&mut sub).await);
    }
    let more = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
    assert!(
        more.is_err(),
        "a fourth delivery while three are unacknowledged: {more:?}"
    );
    let first = held.remove(0);
    first.ack().await.expect("ack");
    let fourth = next(&mut sub).await;
    assert_eq!(
        fourth.delivered, 1,
        "acknowledging one lets the next through"
    );
}

async fn publishes_only_after_the_expected_sequence(bus: Bus) {
    let subject = "events.test.agg.42";
    let first = bus
        .publish_expecting(subject, &event(1), 0)
        .await
        .expect("first on an empty subject");
    let stale = bus.publish_expecting(subject, &event(2), 0).await;
    assert!(
        matches!(stale, Err(EventsError::Conflict { expected: 0, .. })),
        "{stale:?}"
    );
    bus.publish("events.test.agg.43", &event(3))
        .await
        .expect("another subject");
    let second = bus
        .publish_expecting(subject, &event(4), first.seq)
        .await
        .expect("at the subject's last sequence");
    assert!(second.seq > first.seq);
    let stale = bus.publish_expecting(subject, &event(5), first.seq).await;
    assert!(
        matches!(stale, Err(EventsError::Conflict { .. })),
        "{stale:?}"
    );
}

async fn refuses_bad_subjects_and_events(bus: Bus) {
    let outside = bus.publish("other.thing", &event(1)).await;
    assert!(
        matches!(outside, Err(EventsError::NoStream { .. })),
        "{outside:?}"
    );
    let wildcard = bus.publish("events.*", &event(1)).await;
    assert!(
        matches!(wildcard, Err(EventsError::Invalid(_))),
        "{wildcard:?}"
    );
    let bad = event(1).with_extension("Not-Valid", "x");
    assert!(matches!(
        bus.publish("events.test.x", &bad).await,
        Err(EventsError::Event(_))
    ));
    let huge = Event::new("/t", "t", vec![0u8; trellis_events::MAX_DATA_BYTES + 1]);
    assert!(matches!(
        bus.publish("events.test.x", &huge).await,
        Err(EventsError::Event(_))
    ));
    let bad_name = bus
        .subscribe(&ConsumerSettings::new("has space", "events.>"))
        .await;
    assert!(matches!(bad_name, Err(EventsError::Invalid(_))));
    // A filter reads only its subjects.
    bus.publish("events.b.x", &event(1)).await.expect("publish");
    let wanted = event(2);
    bus.publish("events.a.x", &wanted).await.expect("publish");
    let mut sub = bus
        .subscribe(&consumer("only-a", "events.a.*"))
        .await
        .expect("subscribe");
    assert_eq!(next(&mut sub).await.event.id, wanted.id);
}

async fn keeps_order_per_key_across_redeliveries(bus: Bus) {
    let mut labels = std::collections::HashMap::new();
    for (label, key) in [
        ("a1", "k1"),
        ("a2", "k1"),
        ("b1", "k2"),
        ("a3", "k1"),
        ("c1", "k3"),
        ("c2", "k3"),
    ] {
        let e = Event::json("/test", "test.happened.v1", &serde_json::json!({}))
            .expect("event")
            .with_subject(key);
        labels.insert(e.id.clone(), label);
        bus.publish("events.test.keyed", &e).await.expect("publish");
    }
    let label = |d: &Delivery| labels[&d.event.id];
    // Without keys the second event of k1 goes out while the first is
    // being handled.
    let mut plain = bus
        .subscribe(&consumer("unkeyed", "events.test.keyed"))
        .await
        .expect("subscribe");
    let (first, second) = (next(&mut plain).await, next(&mut plain).await);
    assert_eq!((label(&first), label(&second)), ("a1", "a2"));

    let settings = ConsumerSettings {
        ack_wait: Duration::from_millis(300),
        max_deliver: 3,
        ..consumer("keyed", "events.test.keyed")
    };
    let mut sub = bus.subscribe(&settings).await.expect("subscribe").keyed();
    let mut next = async || {
        tokio::time::timeout(WITHIN, sub.next())
            .await
            .unwrap_or_else(|_| panic!("no delivery within {WITHIN:?}"))
            .expect("delivery")
    };
    let a1 = next().await;
    assert_eq!(label(&a1), "a1");
    let b1 = next().await;
    assert_eq!(label(&b1), "b1", "a2 waits for a1; k2 goes on");
    b1.ack().await.expect("ack");
    // a1 fails and comes back after more than twice ack_wait: a2, held
    // meanwhile, is kept alive (not redelivered, not counted).
    a1.nak(Duration::from_millis(700)).await.expect("nak");
    let c1 = next().await;
    assert_eq!(label(&c1), "c1", "k3 goes on while k1 waits");
    let again = next().await;
    assert_eq!((label(&again), again.delivered), ("a1", 2));
    again.ack().await.expect("ack");
    let a2 = next().await;
    assert_eq!(
        (label(&a2), a2.delivered),
        ("a2", 1),
        "a2 after a1 finished, delivered once"
    );
    a2.ack().await.expect("ack");
    let a3 = next().await;
    assert_eq!(label(&a3), "a3");
    a3.ack().await.expect("ack");
    // c1's handler dies on every attempt: after max_deliver it is
    // dead-lettered, and c2 is let through.
    drop(c1);
    for attempt in 2..=3 {
        let c1 = next().await;
        assert_eq!((label(&c1), c1.delivered), ("c1", attempt));
        drop(c1);
    }
    let c2 = next().await;
    assert_eq!(label(&c2), "c2");
    c2.ack().await.expect("ack");
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (bus, _guard) = super::embedded().await;
                    super::$name(bus).await;
                }
            )*
        }
        mod jetstream {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (bus, _guard) = super::jetstream().await;
                    super::$name(bus).await;
                }
            )*
        }
    };
}

suite!(
    publishes_and_delivers_in_order,
    drops_duplicate_ids,
    retries_with_backoff_then_dead_letters,
    redelivers_what_was_not_acknowledged,
    shares_work_and_resumes,
    replays_from_a_sequence_or_a_time,
    holds_back_past_max_ack_pending,
    publishes_only_after_the_expected_sequence,
    refuses_bad_subjects_and_events,
    keeps_order_per_key_across_redeliveries,
);

/// A producer that is not Trellis, publishing structured mode with plain
/// async-nats, is read too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_reads_structured_mode_from_other_publishers() {
    let (bus, guard) = jetstream().await;
    let Guard::Nats(nats) = &guard else {
        unreachable!()
    };
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let e = event(9);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("content-type", trellis_events::STRUCTURED_CONTENT_TYPE);
    js.publish_with_headers("events.test.foreign", headers, e.to_structured().into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    js.publish("events.test.foreign", "not an event".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let after = event(10);
    bus.publish("events.test.foreign", &after)
        .await
        .expect("publish");
    let mut sub = bus
        .subscribe(&consumer("foreign", "events.test.foreign"))
        .await
        .expect("subscribe");
    let d = next(&mut sub).await;
    assert_eq!(d.event, e);
    d.ack().await.expect("ack");
    let d = next(&mut sub).await;
    assert_eq!(
        d.event.id, after.id,
        "a message that is not a CloudEvent is dropped"
    );
}
