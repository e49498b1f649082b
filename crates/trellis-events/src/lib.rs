//! Events for Trellis services: a durable bus carrying CloudEvents, a
//! transactional outbox that publishes what a transaction committed, and
//! an inbox that makes a consumer's effect happen once.
//!
//! - **One API, two engines.** [`Bus`] publishes to subjects
//!   (`events.order.created`) and serves durable consumers with explicit
//!   acknowledgement, negative acknowledgement with a delay, redelivery
//!   with backoff after `ack_wait`, a dead-letter subject after
//!   `max_deliver` attempts, replay from a sequence or a time, and
//!   back-pressure (`max_ack_pending`); [`Subscription::keyed`] keeps each
//!   key's events (their `subject`) in order across redeliveries. The
//!   embedded engine is a log in a SQLite file (every service of `trellis
//!   up` in one process, or processes on one machine, share it); NATS
//!   JetStream is chosen by a `nats://` URL, with the stream and durable pull consumers created
//!   from config, `Nats-Msg-Id` from the event id (duplicates dropped
//!   within the stream's window), double acknowledgement, and
//!   `Nats-Expected-Last-Subject-Sequence` for per-subject optimistic
//!   concurrency ([`Bus::publish_expecting`]).
//! - **CloudEvents 1.0** ([`Event`]): binary mode on the wire (`ce-*`
//!   headers, the data as the body), structured JSON where one document is
//!   wanted; every attribute read from a peer is bounded.
//! - **Outbox** ([`outbox`]): [`outbox::append`] writes the event in the
//!   caller's transaction (SQLite or PostgreSQL); a [`outbox::Relay`]
//!   publishes committed rows in order per aggregate, at least once, with
//!   the event id as the message id. It keeps no high-water mark, so a
//!   transaction that reserved an id early and committed late is not
//!   skipped.
//! - **Inbox** ([`inbox`]): [`inbox::first`] records a handled event id in
//!   the consumer's own transaction; a redelivery finds it and has no
//!   second effect.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use trellis_events::{Bus, ConsumerSettings, Event, EventsSettings};
//!
//! let bus = Bus::connect(&EventsSettings::default(), "./.trellis".as_ref()).await?;
//! let event = Event::json("/shop/order", "shop.order.created.v1", &serde_json::json!({"id": 42}))?
//!     .with_subject("order/42");
//! bus.publish("events.order.created", &event).await?;
//!
//! let mut orders = bus.subscribe(&ConsumerSettings::new("mailer", "events.order.>")).await?;
//! let delivery = orders.next().await?;
//! println!("{} {}", delivery.event.ty, delivery.event.id);
//! delivery.ack().await?;
//! # Ok(()) }
//! ```
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `sqlite` | yes | the embedded bus; the outbox and inbox on SQLite |
//! | `postgres` | no | the outbox and inbox on PostgreSQL |
//! | `nats` | no | the bus on NATS JetStream (`nats://`, `tls://`) |

#![warn(missing_docs)]

#[cfg(not(feature = "sqlite"))]
compile_error!("trellis-events needs its `sqlite` feature (the embedded bus)");

mod embedded;
pub mod es;
mod event;
pub mod inbox;
#[cfg(feature = "nats")]
mod jetstream;
mod keyed;
pub mod outbox;
pub mod projection;
mod subject;

use std::{path::Path, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use trellis_config::Invalid;
use trellis_core::Secret;

pub use event::{
    Event, EventError, MAX_DATA_BYTES, PROTOBUF_CONTENT_TYPE, STRUCTURED_CONTENT_TYPE,
    parse_rfc3339,
};
pub use keyed::KeyedSubscription;
pub use outbox::migrate;
pub use subject::{check_filter, check_subject, matches};

/// `events.*` in a service's settings.
///
/// ```toml
/// [events]
/// url = "nats://nats:4222"   # default: the embedded log, events.db in the data dir
/// stream = "EVENTS"
/// subjects = ["events.>"]
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EventsSettings {
    /// `sqlite://PATH` (the embedded log), `nats://host:port` or
    /// `tls://host:port` (JetStream). Default: `events.db` in the data dir.
    pub url: Option<Secret<String>>,
    /// The stream's name. Default: `EVENTS`.
    pub stream: String,
    /// The subjects the stream holds; publishing elsewhere is refused.
    /// Default: `["events.>"]`.
    pub subjects: Vec<String>,
    /// How long events are kept (zero: forever). Default: 7 days.
    #[serde(with = "trellis_config::duration")]
    pub max_age: Duration,
    /// How long a message id is remembered to drop duplicates. Default: 2m
    /// (the embedded log remembers ids as long as it keeps the event).
    #[serde(with = "trellis_config::duration")]
    pub duplicate_window: Duration,
    /// How often the embedded log is checked for events written by other
    /// processes (those of this one wake subscribers at once). Default: 50ms.
    #[serde(with = "trellis_config::duration")]
    pub poll: Duration,
    /// A PEM file of CA certificates to trust for `tls://` (besides the
    /// system's).
    pub ca_file: Option<String>,
    /// How long connecting and each request to the engine may take.
    /// Default: 5s.
    #[serde(with = "trellis_config::duration")]
    pub timeout: Duration,
}

impl Default for EventsSettings {
    fn default() -> Self {
        EventsSettings {
            url: None,
            stream: "EVENTS".to_owned(),
            subjects: vec!["events.>".to_owned()],
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            poll: Duration::from_millis(50),
            ca_file: None,
            timeout: Duration::from_secs(5),
        }
    }
}

impl EventsSettings {
    /// Checks the settings, naming keys under `prefix` (`events`).
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        if let Some(url) = &self.url {
            let url = url.expose();
            let known = ["sqlite:", "nats://", "tls://"];
            if !known.iter().any(|p| url.starts_with(p)) {
                return Err(Invalid::new(
                    format!("{prefix}.url"),
                    "expected sqlite://PATH, nats://HOST:PORT or tls://HOST:PORT",
                ));
            }
        }
        if self.stream.is_empty()
            || self.stream.len() > 64
            || !self
                .stream
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(Invalid::new(
                format!("{prefix}.stream"),
                "1-64 letters, digits, `_` or `-`",
            ));
        }
        if self.subjects.is_empty() || self.subjects.len() > 64 {
            return Err(Invalid::new(
                format!("{prefix}.subjects"),
                "one to 64 subject filters",
            ));
        }
        for (i, filter) in self.subjects.iter().enumerate() {
            check_filter(filter).map_err(|e| Invalid::new(format!("{prefix}.subjects[{i}]"), e))?;
        }
        Invalid::check_range(
            &format!("{prefix}.duplicate_window"),
            self.duplicate_window,
            Duration::from_secs(1),
            Duration::from_secs(7 * 24 * 3600),
        )?;
        Invalid::check_range(
            &format!("{prefix}.poll"),
            self.poll,
            Duration::from_millis(1),
            Duration::from_secs(60),
        )?;
        Invalid::check_range(
            &format!("{prefix}.timeout"),
            self.timeout,
            Duration::from_millis(10),
            Duration::from_secs(300),
        )?;
        Ok(())
    }

    /// The URL, the embedded log in `data_dir` when none is set.
    pub fn url_or(&self, data_dir: &Path) -> String {
        match &self.url {
            Some(url) => url.expose().clone(),
            None => format!("sqlite://{}", data_dir.join("events.db").display()),
        }
    }
}

/// Why the bus refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// The event is not a valid CloudEvent, or too large.
    #[error(transparent)]
    Event(#[from] EventError),
    /// A subject, filter or setting is malformed.
    #[error("{0}")]
    Invalid(String),
    /// No stream holds the subject.
    #[error("no stream holds subject {subject:?} (the stream's subjects: {subjects})")]
    NoStream {
        /// The subject.
        subject: String,
        /// The stream's subjects.
        subjects: String,
    },
    /// [`Bus::publish_expecting`]: another event was appended to the
    /// subject first.
    #[error("subject {subject:?} has moved past sequence {expected}")]
    Conflict {
        /// The subject.
        subject: String,
        /// The sequence the publisher expected to be the subject's last.
        expected: u64,
    },
    /// The engine cannot be reached or failed; retry later.
    #[error("event bus unavailable: {0}")]
    Unavailable(String),
    /// The subscription ended (its consumer was deleted).
    #[error("subscription {0} ended")]
    Closed(String),
}

/// `Ok` when one of the stream's `subjects` filters holds `subject`.
pub(crate) fn held(subjects: &[String], subject: &str) -> Result<(), EventsError> {
    if subjects.iter().any(|f| matches(f, subject)) {
        Ok(())
    } else {
        Err(EventsError::NoStream {
            subject: subject.to_owned(),
            subjects: subjects.join(", "),
        })
    }
}

impl From<EventsError> for trellis_core::Error {
    fn from(e: EventsError) -> Self {
        use trellis_core::Code;
        let (code, reason) = match &e {
            EventsError::Event(_) | EventsError::Invalid(_) => {
                (Code::InvalidArgument, "INVALID_EVENT")
            }
            EventsError::NoStream { .. } => (Code::FailedPrecondition, "NO_STREAM"),
            EventsError::Conflict { .. } => (Code::Aborted, "EVENT_CONFLICT"),
            EventsError::Unavailable(_) | EventsError::Closed(_) => {
                (Code::Unavailable, "BUS_UNAVAILABLE")
            }
        };
        trellis_core::Error::new(code, reason, e.to_string())
    }
}

/// Where a stream accepted an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The stream sequence.
    pub seq: u64,
    /// True when the message id was already in the stream: nothing was
    /// appended and `seq` is the first copy's.
    pub duplicate: bool,
}

/// Where a new consumer (or reader) starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    /// From the oldest event kept.
    #[default]
    All,
    /// With events published after it was created.
    New,
    /// From this stream sequence.
    Seq(u64),
    /// From the first event published at or after this time (ms since the
    /// Unix epoch).
    TimeMs(i64),
}

/// A durable consumer: its name, what it reads and how it retries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConsumerSettings {
    /// The durable name; subscribers with one name share its work.
    pub durable: String,
    /// The subjects it reads (`*` one token, `>` the rest).
    pub filter: String,
    /// Where it starts when first created (later subscriptions resume).
    pub start: StartAt,
    /// How long a delivery may stay unacknowledged before it is delivered
    /// again. Default: 30s.
    #[serde(with = "trellis_config::duration")]
    pub ack_wait: Duration,
    /// Attempts before an event goes to the dead-letter subject. Default: 5.
    pub max_deliver: u32,
    /// The delay before attempt n+1 after [`Delivery::retry`] (the last
    /// repeats). Default: 1s, 5s, 30s.
    #[serde(with = "durations")]
    pub backoff: Vec<Duration>,
    /// Where events go after `max_deliver` attempts; none: they are
    /// dropped with a warning. Default: `events.dlq.{durable}`.
    pub dead_letter: Option<String>,
    /// Unacknowledged deliveries at most (back-pressure). Default: 256.
    pub max_ack_pending: u32,
    /// Events fetched per round trip. Default: 64.
    pub batch: u32,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        ConsumerSettings {
            durable: String::new(),
            filter: ">".to_owned(),
            start: StartAt::All,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            backoff: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
            dead_letter: None,
            max_ack_pending: 256,
            batch: 64,
        }
    }
}

impl ConsumerSettings {
    /// A consumer named `durable` reading `filter`, dead letters to
    /// `events.dlq.{durable}`.
    pub fn new(durable: impl Into<String>, filter: impl Into<String>) -> ConsumerSettings {
        let durable = durable.into();
        ConsumerSettings {
            dead_letter: Some(format!("events.dlq.{durable}")),
            durable,
            filter: filter.into(),
            ..ConsumerSettings::default()
        }
    }

    fn validate(&self) -> Result<(), EventsError> {
        let name_ok = !self.durable.is_empty()
            && self.durable.len() <= 64
            && self
                .durable
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(EventsError::Invalid(format!(
                "consumer name {:?}: 1-64 letters, digits, `_` or `-`",
                self.durable
            )));
        }
        check_filter(&self.filter).map_err(EventsError::Invalid)?;
        if let Some(dlq) = &self.dead_letter {
            check_subject(dlq).map_err(EventsError::Invalid)?;
        }
        let bad = |what: &str| {
            Err(EventsError::Invalid(format!(
                "consumer {}: {what}",
                self.durable
            )))
        };
        if !(1..=1000).contains(&self.max_deliver) {
            return bad("max_deliver must be 1..=1000");
        }
        if !(1..=100_000).contains(&self.max_ack_pending) {
            return bad("max_ack_pending must be 1..=100000");
        }
        if !(1..=10_000).contains(&self.batch) {
            return bad("batch must be 1..=10000");
        }
        if self.ack_wait < Duration::from_millis(10) {
            return bad("ack_wait must be at least 10ms");
        }
        if self.backoff.len() > 100 {
            return bad("at most 100 backoff steps");
        }
        Ok(())
    }

    /// The delay before the attempt after attempt `delivered`.
    pub fn delay_after(&self, delivered: u32) -> Duration {
        let i = usize::try_from(delivered.saturating_sub(1)).unwrap_or(usize::MAX);
        self.backoff
            .get(i)
            .or(self.backoff.last())
            .copied()
            .unwrap_or(Duration::ZERO)
    }
}

/// An event as a stream holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The stream sequence.
    pub seq: u64,
    /// The bus subject.
    pub subject: String,
    /// When the stream accepted it (ms since the Unix epoch).
    pub published_ms: i64,
    /// The event.
    pub event: Event,
}

/// The event bus: the embedded log or JetStream, as settings say. Cheap
/// to clone.
#[derive(Clone)]
pub struct Bus {
    engine: Arc<Engine>,
}

enum Engine {
    Embedded(embedded::Log),
    #[cfg(feature = "nats")]
    JetStream(Box<jetstream::Js>),
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("engine", &self.engine_name())
            .finish()
    }
}

impl Bus {
    /// Opens the bus `settings` name: the embedded log (by default
    /// `events.db` in `data_dir`) or JetStream, creating the stream.
    pub async fn connect(settings: &EventsSettings, data_dir: &Path) -> Result<Bus, EventsError> {
        settings
            .validate("events")
            .map_err(|e| EventsError::Invalid(format!("{}: {}", e.key, e.message)))?;
        let url = settings.url_or(data_dir);
        let engine = if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            Engine::Embedded(embedded::Log::open(Path::new(path), settings).await?)
        } else if url.starts_with("nats://") || url.starts_with("tls://") {
            #[cfg(feature = "nats")]
            {
                Engine::JetStream(Box::new(jetstream::Js::connect(&url, settings).await?))
            }
            #[cfg(not(feature = "nats"))]
            return Err(EventsError::Invalid(format!(
                "events.url {}: this build has no NATS support (cargo feature `nats`)",
                trellis_core::redact_url(&url)
            )));
        } else {
            return Err(EventsError::Invalid(format!(
                "events.url {}: expected sqlite://PATH or nats://HOST:PORT",
                trellis_core::redact_url(&url)
            )));
        };
        Ok(Bus {
            engine: Arc::new(engine),
        })
    }

    /// `embedded` or `jetstream`.
    pub fn engine_name(&self) -> &'static str {
        match &*self.engine {
            Engine::Embedded(_) => "embedded",
            #[cfg(feature = "nats")]
            Engine::JetStream(_) => "jetstream",
        }
    }

    /// Appends `event` to `subject` once the stream has stored it; its id
    /// is the message id, so publishing it again is a no-op
    /// ([`Published::duplicate`]).
    pub async fn publish(&self, subject: &str, event: &Event) -> Result<Published, EventsError> {
        self.publish_with(subject, &event.id, event, None).await
    }

    /// [`publish`](Self::publish) only if `expected` is the stream
    /// sequence of the subject's last event (0: it has none); else
    /// [`EventsError::Conflict`]. One subject per aggregate
    /// (`events.order.42`) makes this optimistic concurrency per aggregate.
    pub async fn publish_expecting(
        &self,
        subject: &str,
        event: &Event,
        expected: u64,
    ) -> Result<Published, EventsError> {
        self.publish_with(subject, &event.id, event, Some(expected))
            .await
    }

    /// Publishes `events` in order, pipelined (one round trip's latency
    /// for the batch on JetStream, one transaction on the embedded log).
    /// Stops at the first failure: the result holds the ones before it.
    pub async fn publish_batch(
        &self,
        events: &[(String, Event)],
    ) -> (Vec<Published>, Option<EventsError>) {
        for (subject, event) in events {
            if let Err(e) = self.check(subject, event) {
                return (Vec::new(), Some(e));
            }
        }
        let (done, error) = match &*self.engine {
            Engine::Embedded(log) => log.publish_batch(events).await,
            #[cfg(feature = "nats")]
            Engine::JetStream(js) => js.publish_batch(events).await,
        };
        metrics::counter!("events_published_total", "engine" => self.engine_name())
            .increment(done.len() as u64);
        (done, error)
    }

    fn check(&self, subject: &str, event: &Event) -> Result<(), EventsError> {
        check_subject(subject).map_err(EventsError::Invalid)?;
        event.validate()?;
        Ok(())
    }

    pub(crate) async fn publish_with(
        &self,
        subject: &str,
        msg_id: &str,
        event: &Event,
        expected: Option<u64>,
    ) -> Result<Published, EventsError> {
        self.check(subject, event)?;
        let published = match &*self.engine {
            Engine::Embedded(log) => log.publish(subject, msg_id, event, expected).await,
            #[cfg(feature = "nats")]
            Engine::JetStream(js) => js.publish(subject, msg_id, event, expected).await,
        }?;
        metrics::counter!("events_published_total", "engine" => self.engine_name()).increment(1);
        Ok(published)
    }

    /// The stream's last sequence (0 when empty).
    pub async fn last_seq(&self) -> Result<u64, EventsError> {
        match &*self.engine {
            Engine::Embedded(log) => log.last_seq().await,
            #[cfg(feature = "nats")]
            Engine::JetStream(js) => js.last_seq().await,
        }
    }

    /// Subscribes to the durable consumer `settings` describe, creating it
    /// if it does not exist. Subscribers sharing a name share the work.
    pub async fn subscribe(
        &self,
        settings: &ConsumerSettings,
    ) -> Result<Subscription, EventsError> {
        settings.validate()?;
        let source = match &*self.engine {
            Engine::Embedded(log) => Source::Embedded(log.subscribe(settings).await?),
            #[cfg(feature = "nats")]
            Engine::JetStream(js) => Source::JetStream(Box::new(js.subscribe(settings).await?)),
        };
        Ok(Subscription {
            bus: self.clone(),
            settings: Arc::new(settings.clone()),
            source,
            dead_lettered: None,
        })
    }

    /// Reads the stream in order from `start`, without a durable consumer
    /// or acknowledgements: for tailing, and for rebuilding projections.
    pub async fn read(&self, filter: &str, start: StartAt) -> Result<Reader, EventsError> {
        check_filter(filter).map_err(EventsError::Invalid)?;
        Ok(Reader(match &*self.engine {
            Engine::Embedded(log) => ReadFrom::Embedded(log.read(filter, start)),
            #[cfg(feature = "nats")]
            Engine::JetStream(js) => ReadFrom::JetStream(Box::new(js.read(filter, start).await?)),
        }))
    }
}

/// An ordered read of the stream ([`Bus::read`]).
pub struct Reader(ReadFrom);

enum ReadFrom {
    Embedded(embedded::Reader),
    #[cfg(feature = "nats")]
    JetStream(Box<jetstream::Reader>),
}

impl Reader {
    /// The next event, waiting for one to be published.
    pub async fn next(&mut self) -> Result<Stored, EventsError> {
        match &mut self.0 {
            ReadFrom::Embedded(r) => r.next().await,
            #[cfg(feature = "nats")]
            ReadFrom::JetStream(r) => r.next().await,
        }
    }

    /// The next event at or before stream sequence `last`, without
    /// waiting for new ones: none once the stream has no more (for
    /// catching up to a known point, as rebuilds do).
    pub async fn next_until(&mut self, last: u64) -> Result<Option<Stored>, EventsError> {
        match &mut self.0 {
            ReadFrom::Embedded(r) => r.next_until(last).await,
            #[cfg(feature = "nats")]
            ReadFrom::JetStream(r) => r.next_until(last).await,
        }
    }
}

enum Source {
    Embedded(embedded::Sub),
    #[cfg(feature = "nats")]
    JetStream(Box<jetstream::Sub>),
}

/// A subscriber of a durable consumer ([`Bus::subscribe`]).
pub struct Subscription {
    bus: Bus,
    settings: Arc<ConsumerSettings>,
    source: Source,
    /// Told of events dead-lettered here for too many deliveries (the
    /// keyed layer waits for them otherwise).
    dead_lettered: Option<tokio::sync::mpsc::UnboundedSender<(String, u64, bool)>>,
}

/// What an engine delivered.
pub(crate) struct Raw {
    pub(crate) seq: u64,
    pub(crate) subject: String,
    pub(crate) published_ms: i64,
    pub(crate) delivered: u32,
    pub(crate) event: Result<Event, EventError>,
    pub(crate) acker: Acker,
}

pub(crate) enum Acker {
    Embedded(embedded::Acker),
    #[cfg(feature = "nats")]
    JetStream(async_nats::jetstream::message::Acker),
}

impl Subscription {
    /// The consumer's settings.
    pub fn settings(&self) -> &ConsumerSettings {
        &self.settings
    }

    /// The next delivery, waiting for one. An event delivered more than
    /// `max_deliver` times (its handler kept timing out) goes to the
    /// dead-letter subject instead of being returned; a message that is
    /// not a CloudEvent is dropped with a warning.
    pub async fn next(&mut self) -> Result<Delivery, EventsError> {
        loop {
            let raw = match &mut self.source {
                Source::Embedded(s) => s.next().await?,
                #[cfg(feature = "nats")]
                Source::JetStream(s) => s.next().await?,
            };
            let consumer = self.settings.durable.clone();
            let event = match raw.event {
                Ok(event) => event,
                Err(e) => {
                    tracing::warn!(consumer, seq = raw.seq, subject = raw.subject, error = %e, "dropping a message that is not a CloudEvent");
                    ack(&raw.acker, AckKind::Term).await?;
                    count(&consumer, "rejected");
                    continue;
                }
            };
            let delivery = Delivery {
                seq: raw.seq,
                subject: raw.subject,
                published_ms: raw.published_ms,
                delivered: raw.delivered,
                event,
                acker: raw.acker,
                settings: self.settings.clone(),
                bus: self.bus.clone(),
                settle: None,
            };
            if delivery.delivered > self.settings.max_deliver {
                let (seq, key) = (delivery.seq, delivery.event.subject.clone());
                delivery
                    .dead_letter(&format!(
                        "not acknowledged after {} deliveries",
                        self.settings.max_deliver
                    ))
                    .await?;
                if let (Some(to), Some(key)) = (&self.dead_lettered, key) {
                    let _ = to.send((key, seq, true));
                }
                continue;
            }
            metrics::counter!("events_delivered_total", "consumer" => consumer).increment(1);
            return Ok(delivery);
        }
    }
}

fn count(consumer: &str, outcome: &'static str) {
    metrics::counter!("events_acks_total", "consumer" => consumer.to_owned(), "outcome" => outcome)
        .increment(1);
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum AckKind {
    Ack,
    Nak(Duration),
    Progress,
    Term,
}

async fn ack(acker: &Acker, kind: AckKind) -> Result<(), EventsError> {
    match acker {
        Acker::Embedded(a) => a.ack(kind).await,
        #[cfg(feature = "nats")]
        Acker::JetStream(a) => jetstream::ack(a, kind).await,
    }
}

/// One delivery of an event to a consumer; settle it with exactly one of
/// [`ack`](Self::ack), [`retry`](Self::retry), [`nak`](Self::nak),
/// [`term`](Self::term) or [`dead_letter`](Self::dead_letter). Dropped
/// unsettled, it is delivered again after `ack_wait`.
pub struct Delivery {
    /// The stream sequence.
    pub seq: u64,
    /// The bus subject.
    pub subject: String,
    /// When the stream accepted it (ms since the Unix epoch).
    pub published_ms: i64,
    /// This is attempt number `delivered` (1 the first time).
    pub delivered: u32,
    /// The event.
    pub event: Event,
    acker: Acker,
    settings: Arc<ConsumerSettings>,
    bus: Bus,
    /// Set when handed out by a [`KeyedSubscription`].
    settle: Option<keyed::Settle>,
}

impl Drop for Delivery {
    /// Unsettled, it comes back after `ack_wait`: its key waits for it.
    fn drop(&mut self) {
        self.settled(false);
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("seq", &self.seq)
            .field("subject", &self.subject)
            .field("delivered", &self.delivered)
            .field("event", &self.event.id)
            .finish()
    }
}

impl Delivery {
    /// The consumer's `max_deliver`: this delivery's last attempt is
    /// `delivered == max_deliver()`.
    pub fn max_deliver(&self) -> u32 {
        self.settings.max_deliver
    }

    /// Done: the event is not delivered to this consumer again. Returns
    /// once the engine confirmed it (JetStream's double acknowledgement),
    /// so an acknowledged event is not redelivered after a crash.
    pub async fn ack(mut self) -> Result<(), EventsError> {
        let done = ack(&self.acker, AckKind::Ack).await;
        self.settled(done.is_ok());
        done?;
        count(&self.settings.durable, "ack");
        Ok(())
    }

    /// Tells a [`KeyedSubscription`] how this one ended.
    fn settled(&mut self, finished: bool) {
        if let Some(settle) = self.settle.take() {
            settle.send(self.seq, finished);
        }
    }

    /// Failed, try again after the consumer's backoff for this attempt —
    /// or, on the last attempt, send it to the dead-letter subject.
    pub async fn retry(self, reason: &str) -> Result<(), EventsError> {
        if self.delivered >= self.settings.max_deliver {
            return self.dead_letter(reason).await;
        }
        let delay = self.settings.delay_after(self.delivered);
        self.nak(delay).await
    }

    /// Deliver it again after `delay` (no dead-letter check: see
    /// [`retry`](Self::retry)).
    pub async fn nak(mut self, delay: Duration) -> Result<(), EventsError> {
        self.settled(false);
        ack(&self.acker, AckKind::Nak(delay)).await?;
        count(&self.settings.durable, "nak");
        Ok(())
    }

    /// Still working: the `ack_wait` clock starts again.
    pub async fn in_progress(&self) -> Result<(), EventsError> {
        ack(&self.acker, AckKind::Progress).await
    }

    /// Never deliver it again to this consumer, without handling it.
    pub async fn term(mut self) -> Result<(), EventsError> {
        let done = ack(&self.acker, AckKind::Term).await;
        self.settled(done.is_ok());
        done?;
        count(&self.settings.durable, "term");
        Ok(())
    }

    /// Publishes the event to the consumer's dead-letter subject (with
    /// `dlqsubject`, `dlqseq`, `dlqconsumer` and `dlqreason` extensions)
    /// and terminates it here. Without a dead-letter subject it is dropped
    /// with a warning.
    pub async fn dead_letter(mut self, reason: &str) -> Result<(), EventsError> {
        let consumer = &self.settings.durable;
        match &self.settings.dead_letter {
            Some(dlq) => {
                let reason: String = reason.chars().take(500).collect();
                let mut event = self.event.clone();
                event
                    .extensions
                    .insert("dlqsubject".into(), self.subject.clone());
                event
                    .extensions
                    .insert("dlqseq".into(), self.seq.to_string());
                event
                    .extensions
                    .insert("dlqconsumer".into(), consumer.clone());
                event.extensions.insert("dlqreason".into(), reason);
                event
                    .extensions
                    .retain(|_, v| !v.chars().any(char::is_control));
                let msg_id = format!("{}:dlq:{consumer}", self.event.id);
                self.bus.publish_with(dlq, &msg_id, &event, None).await?;
                tracing::warn!(consumer, seq = self.seq, dlq, "event dead-lettered");
            }
            None => {
                tracing::warn!(
                    consumer,
                    seq = self.seq,
                    reason,
                    "event dropped after its last attempt"
                );
            }
        }
        let done = ack(&self.acker, AckKind::Term).await;
        self.settled(done.is_ok());
        done?;
        count(&self.settings.durable, "dead_letter");
        Ok(())
    }
}

/// `backoff = ["1s", "5s"]`: a list of durations as text.
mod durations {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};

    pub fn serialize<S: Serializer>(list: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(list.len()))?;
        for d in list {
            seq.serialize_element(&trellis_config::duration::format(*d))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|t| trellis_config::duration::parse(t).map_err(serde::de::Error::custom))
            .collect()
    }
}
