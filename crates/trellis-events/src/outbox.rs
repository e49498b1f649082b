//! The transactional outbox: an event written in the same transaction as
//! the rows it describes, so it is published if and only if they commit.
//!
//! [`append`] writes it (SQLite or PostgreSQL, the caller's [`Tx`]); a
//! [`Relay`] publishes committed rows at least once, oldest first, with
//! the event id as the message id — so a relay that crashed after
//! publishing and before deleting the row publishes a duplicate the bus
//! drops (and the consumers' inbox would absorb).
//!
//! Two guarantees, and how they hold:
//!
//! - **No event is skipped.** The relay keeps no high-water mark: it reads
//!   whatever rows are present, publishes them, and deletes each one it
//!   published. A transaction that took id 5, and commits after the one
//!   that took id 6 was published, is found by the next pass — the bug of
//!   relays that advance a cursor past ids reserved by uncommitted
//!   transactions cannot happen.
//! - **Order per aggregate.** An event's CloudEvents `subject` names its
//!   aggregate (`order/42`). [`append`] takes the aggregate's next number
//!   from a counter row it updates in the transaction, which makes a
//!   second writer of the same aggregate wait until the first commits;
//!   the waiter's outbox id is therefore taken after the first one's, and
//!   the relay, publishing in id order and stopping at the first failure,
//!   publishes them in that order. The number travels as the CloudEvents
//!   `sequence` extension, so a consumer can check it. (Events of
//!   different aggregates are not ordered with each other.)
//!
//! ```no_run
//! # async fn run(pool: trellis_store::Pool, bus: trellis_events::Bus) -> Result<(), Box<dyn std::error::Error>> {
//! use trellis_events::{Event, outbox};
//!
//! trellis_events::migrate(&pool).await?;
//! let relay = outbox::Relay::new(pool.clone(), bus, outbox::RelaySettings::default());
//! tokio::spawn({ let relay = relay.clone(); async move { relay.run(std::future::pending()).await } });
//!
//! let mut tx = pool.begin().await?;
//! // … the order's rows, in `tx` …
//! let event = Event::json("/shop/order", "shop.order.created.v1", &serde_json::json!({"id": 42}))?
//!     .with_subject("order/42");
//! outbox::append(&mut tx, "events.order.created", &event).await?;
//! tx.commit().await?;
//! relay.wake();
//! # Ok(()) }
//! ```

use std::{future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use sqlx::Row;
use tokio::sync::Notify;
use trellis_store::{Pool, Tx, with_pool, with_tx};

use crate::{Bus, Event, EventsError, check_subject, event::now_ms};

/// The event store's tables (the same on both engines).
const EVENT_STORE: (i64, &str, &str) = (
    2,
    "event store",
    "CREATE TABLE trellis_es_events (
        aggregate_type TEXT NOT NULL,
        aggregate_id TEXT NOT NULL,
        version BIGINT NOT NULL,
        schema_version BIGINT NOT NULL,
        data TEXT NOT NULL,
        time_us BIGINT NOT NULL,
        PRIMARY KEY (aggregate_type, aggregate_id, version)
    );
    CREATE TABLE trellis_es_snapshots (
        aggregate_type TEXT NOT NULL,
        aggregate_id TEXT NOT NULL,
        version BIGINT NOT NULL,
        schema_version BIGINT NOT NULL,
        state TEXT NOT NULL,
        PRIMARY KEY (aggregate_type, aggregate_id)
    );",
);

/// The outbox, inbox and projection tables, with the engine's spelling of
/// an auto-incremented key and of bytes.
macro_rules! outbox_tables {
    ($serial:literal, $bytes:literal) => {
        concat!(
            "CREATE TABLE trellis_outbox (
                id ", $serial, ",
                subject TEXT NOT NULL,
                attributes TEXT NOT NULL,
                data ", $bytes, " NOT NULL,
                created_ms BIGINT NOT NULL
            );
            CREATE TABLE trellis_outbox_sequences (aggregate TEXT PRIMARY KEY, seq BIGINT NOT NULL);
            CREATE TABLE trellis_inbox (
                consumer TEXT NOT NULL,
                event_id TEXT NOT NULL,
                handled_ms BIGINT NOT NULL,
                PRIMARY KEY (consumer, event_id)
            );
            CREATE INDEX trellis_inbox_handled ON trellis_inbox (handled_ms);
            CREATE TABLE trellis_projections (name TEXT PRIMARY KEY, checkpoint BIGINT NOT NULL);"
        )
    };
}

const SQLITE: &[(i64, &str, &str)] = &[
    (
        1,
        "outbox and inbox",
        outbox_tables!("INTEGER PRIMARY KEY AUTOINCREMENT", "BLOB"),
    ),
    EVENT_STORE,
];

const POSTGRES: &[(i64, &str, &str)] = &[
    (
        1,
        "outbox and inbox",
        outbox_tables!("BIGSERIAL PRIMARY KEY", "BYTEA"),
    ),
    EVENT_STORE,
];

/// Creates the outbox, inbox, projection checkpoint and event store tables in a service's store (their own
/// migrations table, `_trellis_events_migrations`); call once after
/// opening it.
pub async fn migrate(pool: &Pool) -> Result<(), sqlx::migrate::MigrateError> {
    let migrations = if pool.is_postgres() { POSTGRES } else { SQLITE };
    let migrator = trellis_store::migrator("_trellis_events_migrations", migrations);
    with_pool!(pool, p => migrator.run(p).await)
}

/// Opens a service's store as [`Pool::open_settings`] does, with the
/// outbox, inbox, projection and event store tables ([`migrate`]) created
/// before the service's own `migrations` run — so that those may move a
/// service's rows into the event store: for stores whose writes append
/// events.
pub async fn open_store(
    settings: &trellis_store::DatabaseSettings,
    default_file: &std::path::Path,
    migrations: &sqlx::migrate::Migrator,
) -> Result<Pool, trellis_store::StoreError> {
    let url = settings.url_or(default_file);
    let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let ours = trellis_store::migrator(
        "_trellis_events_migrations",
        if postgres { POSTGRES } else { SQLITE },
    );
    let pool = Pool::open_settings(settings, default_file, &ours).await?;
    with_pool!(&pool, p => migrations.run(p).await).map_err(|source| {
        trellis_store::StoreError::Migrate {
            url: trellis_core::redact_url(&url),
            source,
        }
    })?;
    Ok(pool)
}

/// Why an event could not be written to, or relayed from, the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The event or subject is invalid.
    #[error(transparent)]
    Events(#[from] EventsError),
    /// The database failed.
    #[error("outbox: {0}")]
    Store(#[from] sqlx::Error),
}

impl From<OutboxError> for trellis_core::Error {
    fn from(e: OutboxError) -> Self {
        match e {
            OutboxError::Events(e) => e.into(),
            OutboxError::Store(e) => trellis_core::Error::unavailable(format!("outbox: {e}")),
        }
    }
}

/// Writes `event` for `subject` into the outbox in `tx`. With a
/// CloudEvents `subject` (the aggregate) it gets the aggregate's next
/// number as its `sequence` extension, returned; without one, 0.
pub async fn append(tx: &mut Tx, subject: &str, event: &Event) -> Result<u64, OutboxError> {
    check_subject(subject).map_err(EventsError::Invalid)?;
    let mut event = event.clone();
    let sequence = match &event.subject {
        Some(aggregate) => {
            let seq: i64 = with_tx!(tx, c => sqlx::query_scalar(
                "INSERT INTO trellis_outbox_sequences (aggregate, seq) VALUES ($1, 1) \
                 ON CONFLICT (aggregate) DO UPDATE SET seq = trellis_outbox_sequences.seq + 1 \
                 RETURNING seq",
            )
            .bind(aggregate)
            .fetch_one(&mut **c)
            .await?);
            event.extensions.insert("sequence".into(), seq.to_string());
            seq as u64
        }
        None => 0,
    };
    event.validate().map_err(EventsError::from)?;
    with_tx!(tx, c => {
        sqlx::query(
            "INSERT INTO trellis_outbox (subject, attributes, data, created_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(subject)
        .bind(event.attributes_json())
        .bind(event.data.as_ref())
        .bind(now_ms())
        .execute(&mut **c)
        .await?;
    });
    Ok(sequence)
}

/// A service's conventions for its events, to append them in one call:
/// bus subject `{subjects}.{what}`, type `{types}.{what}.v1`, data the
/// protobuf message `{package}.{message}`, CloudEvents `subject`
/// `{aggregate}{id}`, `source` the service's.
///
/// ```
/// # use trellis_events::outbox::Emitter;
/// const EVENTS: Emitter = Emitter {
///     source: "/shop/order",
///     subjects: "events.order",
///     types: "shop.order",
///     package: "shop.order.v1",
///     aggregate: "order/",
/// };
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Emitter {
    /// The CloudEvents `source`.
    pub source: &'static str,
    /// The bus subjects' prefix.
    pub subjects: &'static str,
    /// The types' prefix.
    pub types: &'static str,
    /// The protobuf package of the data.
    pub package: &'static str,
    /// What goes before the id in the CloudEvents `subject`.
    pub aggregate: &'static str,
}

impl Emitter {
    /// Appends event `what` about aggregate `id`, with `data` an encoded
    /// `message`, to the outbox in `tx`; its number within the aggregate.
    pub async fn emit(
        &self,
        tx: &mut Tx,
        what: &str,
        message: &str,
        id: &str,
        data: Vec<u8>,
    ) -> Result<u64, OutboxError> {
        let event = Event::proto(
            self.source,
            format!("{}.{what}.v1", self.types),
            &format!("{}.{message}", self.package),
            data,
        )
        .with_subject(format!("{}{id}", self.aggregate));
        append(tx, &format!("{}.{what}", self.subjects), &event).await
    }
}

/// How the relay runs.
#[derive(Debug, Clone, PartialEq)]
pub struct RelaySettings {
    /// Rows published per pass. Default: 256.
    pub batch: u32,
    /// How often the outbox is checked when nobody wakes the relay (rows
    /// written by other processes). Default: 200ms.
    pub poll: Duration,
    /// The longest wait between attempts while the bus or the store
    /// fails. Default: 5s.
    pub max_backoff: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        RelaySettings {
            batch: 256,
            poll: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Publishes the outbox. Cheap to clone; run one per service instance
/// (several are safe: each publishes in order and the bus drops the
/// duplicates).
#[derive(Clone)]
pub struct Relay {
    pool: Pool,
    bus: Bus,
    settings: RelaySettings,
    wake: Arc<Notify>,
}

impl Relay {
    /// A relay from `pool`'s outbox to `bus`.
    pub fn new(pool: Pool, bus: Bus, settings: RelaySettings) -> Relay {
        Relay {
            pool,
            bus,
            settings,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Tells the relay rows were committed (call after the commit; without
    /// it they are found within `poll`).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Publishes one batch of the oldest rows and deletes those the bus
    /// accepted. How many were published; an error after deleting the
    /// ones before the failure.
    pub async fn run_once(&self) -> Result<usize, OutboxError> {
        let limit = i64::from(self.settings.batch.max(1));
        let rows = with_pool!(&self.pool, p => {
            sqlx::query("SELECT id, subject, attributes, data FROM trellis_outbox ORDER BY id LIMIT $1")
                .bind(limit)
                .fetch_all(p)
                .await?
                .iter()
                .map(|row| {
                    Ok((
                        row.try_get::<i64, _>("id")?,
                        row.try_get::<String, _>("subject")?,
                        row.try_get::<String, _>("attributes")?,
                        row.try_get::<Vec<u8>, _>("data")?,
                    ))
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?
        });
        if rows.is_empty() {
            return Ok(0);
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut events = Vec::with_capacity(rows.len());
        for (id, subject, attributes, data) in rows {
            let event =
                Event::from_attributes_json(&attributes, Bytes::from(data)).map_err(|e| {
                    EventsError::Invalid(format!("outbox row {id} cannot be read: {e}"))
                })?;
            ids.push(id);
            events.push((subject, event));
        }
        let (published, failure) = self.bus.publish_batch(&events).await;
        let sent = &ids[..published.len()];
        if !sent.is_empty() {
            let mut tx = self.pool.begin().await?;
            for id in sent {
                with_tx!(&mut tx, c => {
                    sqlx::query("DELETE FROM trellis_outbox WHERE id = $1")
                        .bind(id)
                        .execute(&mut **c)
                        .await?;
                });
            }
            tx.commit().await?;
            metrics::counter!("outbox_relayed_total").increment(sent.len() as u64);
        }
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(sent.len()),
        }
    }

    /// Relays until `shutdown` completes: a pass whenever woken, every
    /// `poll` otherwise, at once again while batches come back full, and
    /// with a growing pause while the bus or the store fails.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = self.settings.poll;
        loop {
            let wait = match self.run_once().await {
                Ok(n) if n >= self.settings.batch as usize => {
                    backoff = self.settings.poll;
                    continue;
                }
                Ok(_) => {
                    backoff = self.settings.poll;
                    self.settings.poll
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay: will retry");
                    metrics::counter!("outbox_relay_errors_total").increment(1);
                    backoff = (backoff * 2).min(self.settings.max_backoff);
                    backoff
                }
            };
            tokio::select! {
                _ = &mut shutdown => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Rows not yet published.
    pub async fn backlog(&self) -> Result<u64, sqlx::Error> {
        let n: i64 = with_pool!(&self.pool, p => sqlx::query_scalar("SELECT COUNT(*) FROM trellis_outbox").fetch_one(p).await?);
        Ok(n as u64)
    }
}

/// A service's outbox while it runs: the bus its settings name, the
/// outbox tables in its store, and the relay between them.
pub struct Outbox {
    bus: Bus,
    relay: Relay,
    task: tokio::task::JoinHandle<()>,
}

impl Outbox {
    /// Connects the bus (`events` settings; the embedded log in
    /// `data_dir` by default) and starts relaying `pool`'s outbox (its
    /// tables made when the store was opened: [`open_store`] or
    /// [`migrate`]).
    pub async fn start(
        pool: &Pool,
        settings: &crate::EventsSettings,
        data_dir: &std::path::Path,
    ) -> Result<Outbox, EventsError> {
        let bus = Bus::connect(settings, data_dir).await?;
        let relay = Relay::new(
            pool.clone(),
            bus.clone(),
            RelaySettings {
                poll: Duration::from_millis(100),
                ..RelaySettings::default()
            },
        );
        let task = tokio::spawn({
            let relay = relay.clone();
            async move { relay.run(std::future::pending()).await }
        });
        Ok(Outbox { bus, relay, task })
    }

    /// The bus.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The relay (to [`wake`](Relay::wake) after a commit).
    pub fn relay(&self) -> &Relay {
        &self.relay
    }

    /// Stops relaying (what is left is published on the next start).
    pub fn stop(self) {
        self.task.abort();
    }
}
