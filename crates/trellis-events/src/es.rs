//! Event sourcing: an aggregate's state is the fold of its events, kept in
//! an event store on SQLite or PostgreSQL.
//!
//! - [`Aggregate`]: `decide` (state + command → events, or a refusal) and
//!   `evolve` (state + event → state), both pure; `upcast` reads events
//!   written by older versions of the code.
//! - [`EventStore::execute`] loads the aggregate (its latest snapshot, then
//!   the events after it), decides, and appends the new events only if
//!   nobody appended since it loaded (the next version numbers are the
//!   table's key) — else [`EsError::Conflict`], ABORTED, after retrying
//!   the whole command a few times. A snapshot is written every
//!   `snapshot_every` events. Pass an outbox subject and the events are
//!   also published, from the same transaction, for projections.
//!
//! ```no_run
//! # use serde::{Deserialize, Serialize};
//! # use trellis_events::es::{Aggregate, EventStore};
//! #[derive(Debug, Clone, Default, Serialize, Deserialize)]
//! struct Counter { value: i64 }
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! enum Changed { Added(i64) }
//!
//! impl Aggregate for Counter {
//!     const TYPE: &'static str = "counter";
//!     type Command = i64;
//!     type Event = Changed;
//!     fn decide(&self, add: &i64) -> Result<Vec<Changed>, String> {
//!         if self.value + add < 0 { return Err("below zero".into()) }
//!         Ok(vec![Changed::Added(*add)])
//!     }
//!     fn evolve(mut self, event: &Changed) -> Self {
//!         let Changed::Added(n) = event;
//!         self.value += n;
//!         self
//!     }
//! }
//! # async fn run(pool: trellis_store::Pool) -> Result<(), Box<dyn std::error::Error>> {
//! trellis_events::migrate(&pool).await?;
//! let store = EventStore::new(pool);
//! store.execute::<Counter>("c-1", &5, None).await?;
//! let (counter, version) = store.load::<Counter>("c-1").await?;
//! assert_eq!((counter.value, version), (5, 1));
//! # Ok(()) }
//! ```

use serde::{Serialize, de::DeserializeOwned};
use trellis_store::{Pool, Tx, with_pool, with_tx};

use crate::{Event, event::now_micros, outbox};

/// A consistency boundary whose state is derived from its events.
pub trait Aggregate: Default + Clone + Serialize + DeserializeOwned + Send + Sync {
    /// Its type name (`account`), part of every event's key.
    const TYPE: &'static str;
    /// The schema version this code writes; rows of older versions go
    /// through [`upcast`](Self::upcast) on load.
    const VERSION: u32 = 1;
    /// What callers ask of it.
    type Command: Sync;
    /// What happened to it.
    type Event: Clone + Serialize + DeserializeOwned + Send + Sync;

    /// The events `command` produces from this state, or why it is refused
    /// (a business rule: nothing is written).
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, String>;

    /// This state after `event`.
    fn evolve(self, event: &Self::Event) -> Self;

    /// Brings an event written at `version` up to [`VERSION`](Self::VERSION)
    /// (JSON in, JSON out). The default accepts the current version only.
    fn upcast(version: u32, event: serde_json::Value) -> Result<serde_json::Value, String> {
        if version == Self::VERSION {
            Ok(event)
        } else {
            Err(format!(
                "{} event of version {version} and no upcaster (current: {})",
                Self::TYPE,
                Self::VERSION
            ))
        }
    }
}

/// Why a command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum EsError {
    /// The aggregate refused it.
    #[error("refused: {0}")]
    Refused(String),
    /// Others kept appending to the aggregate (it was retried).
    #[error("{aggregate} changed while the command ran (retried {attempts} times)")]
    Conflict {
        /// `type/id`.
        aggregate: String,
        /// How many times it was tried.
        attempts: u32,
    },
    /// An event or snapshot could not be read or written.
    #[error("event store: {0}")]
    Codec(String),
    /// The database failed.
    #[error("event store: {0}")]
    Store(#[from] sqlx::Error),
    /// The outbox refused the published copy.
    #[error(transparent)]
    Outbox(#[from] outbox::OutboxError),
}

impl From<EsError> for trellis_core::Error {
    fn from(e: EsError) -> Self {
        use trellis_core::Code;
        match &e {
            EsError::Refused(_) => {
                trellis_core::Error::new(Code::FailedPrecondition, "REFUSED", e.to_string())
            }
            EsError::Conflict { .. } => {
                trellis_core::Error::new(Code::Aborted, "CONCURRENT_UPDATE", e.to_string())
            }
            EsError::Codec(_) => trellis_core::Error::internal(e.to_string()),
            EsError::Store(_) | EsError::Outbox(_) => {
                trellis_core::Error::unavailable(e.to_string())
            }
        }
    }
}

/// Where an aggregate's events are published as they are appended.
#[derive(Debug, Clone, Copy)]
pub struct Publish<'a> {
    /// The bus subject (`events.account.changed`).
    pub subject: &'a str,
    /// The CloudEvents `source`.
    pub source: &'a str,
}

/// One event of an aggregate's history.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded<E> {
    /// Its version: 1 for the aggregate's first event, gapless.
    pub version: u64,
    /// The schema version it was written at (before upcasting).
    pub schema_version: u32,
    /// When it was appended, in microseconds since the Unix epoch.
    pub time_us: i64,
    /// The event, upcast to the current version.
    pub event: E,
}

/// The event store over a service's pool (tables from
/// [`migrate`](crate::migrate)).
#[derive(Debug, Clone)]
pub struct EventStore {
    pool: Pool,
    snapshot_every: u64,
    attempts: u32,
}

fn codec(e: impl std::fmt::Display) -> EsError {
    EsError::Codec(e.to_string())
}

/// A lost race, counted and said as [`EsError::Conflict`] after `attempts`
/// tries; other errors as they are.
fn conflict<A: Aggregate>(e: EsError, id: &str, attempts: u32) -> EsError {
    if !is_conflict(&e) {
        return e;
    }
    metrics::counter!("es_conflicts_total", "aggregate" => A::TYPE).increment(1);
    EsError::Conflict {
        aggregate: format!("{}/{id}", A::TYPE),
        attempts,
    }
}

/// Another writer took the version this one meant to append (the events
/// table's key).
fn is_conflict(e: &EsError) -> bool {
    matches!(e, EsError::Store(sqlx::Error::Database(db)) if db.is_unique_violation())
}

impl EventStore {
    /// A store on `pool`: a snapshot every 100 events, a conflicting
    /// command tried up to 5 times.
    pub fn new(pool: Pool) -> EventStore {
        EventStore {
            pool,
            snapshot_every: 100,
            attempts: 5,
        }
    }

    /// A snapshot every `n` events (0: never).
    pub fn snapshot_every(mut self, n: u64) -> EventStore {
        self.snapshot_every = n;
        self
    }

    /// Tries a conflicting command up to `n` times (at least once).
    pub fn attempts(mut self, n: u32) -> EventStore {
        self.attempts = n.max(1);
        self
    }

    /// The aggregate's state and version (0: it has no events).
    pub async fn load<A: Aggregate>(&self, id: &str) -> Result<(A, u64), EsError> {
        let mut tx = self.pool.begin().await?;
        let loaded = Self::load_in::<A>(&mut tx, id, true).await?;
        tx.rollback().await?;
        Ok(loaded)
    }

    /// The state from every event, ignoring snapshots (to check them).
    pub async fn replay<A: Aggregate>(&self, id: &str) -> Result<(A, u64), EsError> {
        let mut tx = self.pool.begin().await?;
        let loaded = Self::load_in::<A>(&mut tx, id, false).await?;
        tx.rollback().await?;
        Ok(loaded)
    }

    async fn load_in<A: Aggregate>(
        tx: &mut Tx,
        id: &str,
        use_snapshot: bool,
    ) -> Result<(A, u64), EsError> {
        let mut state = A::default();
        let mut version = 0u64;
        if use_snapshot {
            let snapshot: Option<(i64, i64, String)> = with_tx!(tx, c => sqlx::query_as(
                "SELECT version, schema_version, state FROM trellis_es_snapshots WHERE aggregate_type = $1 AND aggregate_id = $2"
            )
            .bind(A::TYPE)
            .bind(id)
            .fetch_optional(&mut **c)
            .await?);
            // A snapshot of another schema version is ignored: the events
            // rebuild the state.
            if let Some((at, schema, json)) = snapshot
                && schema == i64::from(A::VERSION)
                && let Ok(snapshot) = serde_json::from_str::<A>(&json)
            {
                state = snapshot;
                version = at as u64;
            }
        }
        let rows: Vec<(i64, i64, String)> = with_tx!(tx, c => sqlx::query_as(
            "SELECT version, schema_version, data FROM trellis_es_events \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND version > $3 ORDER BY version"
        )
        .bind(A::TYPE)
        .bind(id)
        .bind(version as i64)
        .fetch_all(&mut **c)
        .await?);
        for (at, schema, data) in rows {
            let value: serde_json::Value = serde_json::from_str(&data).map_err(codec)?;
            let value =
                A::upcast(u32::try_from(schema).unwrap_or(0), value).map_err(EsError::Codec)?;
            let event: A::Event = serde_json::from_value(value).map_err(codec)?;
            state = state.evolve(&event);
            version = at as u64;
        }
        Ok((state, version))
    }

    /// Runs `command` on aggregate `id`: load, decide, append if nobody
    /// appended meanwhile (retrying the whole command otherwise), snapshot
    /// when due, publish through the outbox when `publish` says where.
    /// The events appended (none when the decision was to do nothing).
    pub async fn execute<A: Aggregate>(
        &self,
        id: &str,
        command: &A::Command,
        publish: Option<Publish<'_>>,
    ) -> Result<Vec<A::Event>, EsError> {
        for attempt in 1..=self.attempts {
            let mut tx = self.pool.begin().await?;
            match self.append::<A>(&mut tx, id, command, publish).await {
                Ok(events) => {
                    tx.commit().await?;
                    return Ok(events);
                }
                Err(e) => {
                    // Rolled back on drop too; said here so that the
                    // connection is clean before the next attempt.
                    let _ = tx.rollback().await;
                    if !is_conflict(&e) || attempt == self.attempts {
                        return Err(conflict::<A>(e, id, attempt));
                    }
                    metrics::counter!("es_conflicts_total", "aggregate" => A::TYPE).increment(1);
                }
            }
        }
        Err(EsError::Conflict {
            aggregate: format!("{}/{id}", A::TYPE),
            attempts: self.attempts,
        })
    }

    /// [`execute`](Self::execute) inside the caller's transaction, for a
    /// command whose events must commit with other rows (a saga branch's
    /// barrier, an order index): one attempt. On [`EsError::Conflict`] the
    /// transaction is spent (PostgreSQL aborts it) — roll it back and run
    /// the whole unit of work again.
    pub async fn execute_in<A: Aggregate>(
        &self,
        tx: &mut Tx,
        id: &str,
        command: &A::Command,
        publish: Option<Publish<'_>>,
    ) -> Result<Vec<A::Event>, EsError> {
        self.append::<A>(tx, id, command, publish)
            .await
            .map_err(|e| conflict::<A>(e, id, 1))
    }

    /// Load, decide, append and snapshot in `tx`.
    async fn append<A: Aggregate>(
        &self,
        tx: &mut Tx,
        id: &str,
        command: &A::Command,
        publish: Option<Publish<'_>>,
    ) -> Result<Vec<A::Event>, EsError> {
        let (mut state, loaded) = Self::load_in::<A>(tx, id, true).await?;
        let events = state.decide(command).map_err(EsError::Refused)?;
        let mut version = loaded;
        for event in &events {
            version += 1;
            let data = serde_json::to_string(event).map_err(codec)?;
            with_tx!(tx, c => {
                sqlx::query(
                    "INSERT INTO trellis_es_events (aggregate_type, aggregate_id, version, schema_version, data, time_us) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(A::TYPE)
                .bind(id)
                .bind(version as i64)
                .bind(i64::from(A::VERSION))
                .bind(&data)
                .bind(now_micros())
                .execute(&mut **c)
                .await?;
            });
            if let Some(publish) = publish {
                let published =
                    Event::new(publish.source, format!("{}.v{}", A::TYPE, A::VERSION), data)
                        .with_content_type("application/json")
                        .with_subject(format!("{}/{id}", A::TYPE))
                        .with_extension("aggregateversion", version.to_string());
                outbox::append(tx, publish.subject, &published).await?;
            }
            state = state.evolve(event);
        }
        let due = self.snapshot_every > 0
            && !events.is_empty()
            && loaded / self.snapshot_every != version / self.snapshot_every;
        if due {
            let json = serde_json::to_string(&state).map_err(codec)?;
            with_tx!(tx, c => {
                sqlx::query(
                    "INSERT INTO trellis_es_snapshots (aggregate_type, aggregate_id, version, schema_version, state) \
                     VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET version = excluded.version, \
                     schema_version = excluded.schema_version, state = excluded.state",
                )
                .bind(A::TYPE)
                .bind(id)
                .bind(version as i64)
                .bind(i64::from(A::VERSION))
                .bind(&json)
                .execute(&mut **c)
                .await?;
            });
        }
        Ok(events)
    }

    /// Up to `limit` of aggregate `id`'s events after version `after`
    /// (0: from the first), oldest first, upcast to the current version,
    /// with when each was appended: its history, a page at a time.
    pub async fn history<A: Aggregate>(
        &self,
        id: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Recorded<A::Event>>, EsError> {
        let rows: Vec<(i64, i64, String, i64)> = with_pool!(&self.pool, p => sqlx::query_as(
            "SELECT version, schema_version, data, time_us FROM trellis_es_events \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND version > $3 ORDER BY version LIMIT $4"
        )
        .bind(A::TYPE)
        .bind(id)
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(p)
        .await?);
        rows.into_iter()
            .map(|(version, schema, data, time_us)| {
                let schema_version = u32::try_from(schema).unwrap_or(0);
                let value: serde_json::Value = serde_json::from_str(&data).map_err(codec)?;
                let value = A::upcast(schema_version, value).map_err(EsError::Codec)?;
                Ok(Recorded {
                    version: version as u64,
                    schema_version,
                    time_us,
                    event: serde_json::from_value(value).map_err(codec)?,
                })
            })
            .collect()
    }
}
