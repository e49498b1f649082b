//! The coordinator's durable log, on SQLite or PostgreSQL: a saga is
//! written before its submission is acknowledged, its state after every
//! answer, and work is claimed with a lease so several coordinators can
//! share one PostgreSQL without driving a saga twice at once (`FOR UPDATE
//! SKIP LOCKED`; SQLite has one writer, so one coordinator).
//!
//! Every write of a saga's state names the lease it holds: a coordinator
//! whose lease expired (paused, partitioned) and was taken over cannot
//! overwrite its successor's progress — its write matches no row.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::Row;
use trellis_store::{Failure, Pool, with_pool, with_tx};

use crate::machine::{Saga, Status};

/// The log's schema, for the coordinator's migrator.
pub fn migrator() -> sqlx::migrate::Migrator {
    trellis_store::migrator(
        "_saga_migrations",
        &[(
            1,
            "saga log",
            "CREATE TABLE saga_transactions (
                gid              TEXT PRIMARY KEY,
                status           TEXT NOT NULL,
                definition       TEXT NOT NULL,
                state            TEXT NOT NULL,
                create_time_ms   BIGINT NOT NULL,
                update_time_ms   BIGINT NOT NULL,
                next_attempt_ms  BIGINT NOT NULL,
                lease_owner      TEXT,
                lease_until_ms   BIGINT NOT NULL
            );
            CREATE INDEX saga_transactions_due ON saga_transactions (status, next_attempt_ms);",
        )],
    )
}

/// Where a branch operation is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Endpoint {
    /// A unary gRPC method of a discovered service, e.g. service
    /// `inventory`, path `/shop.inventory.v1.InventoryService/Reserve`.
    Grpc {
        /// The service's name in the registry.
        service: String,
        /// The method's path.
        path: String,
    },
    /// An HTTP endpoint (POST).
    Http {
        /// Its URL.
        url: String,
    },
}

/// One step as submitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepDefinition {
    /// Its name, in `trellis saga show` and as the branch id.
    pub name: String,
    /// The forward operation.
    pub action: Endpoint,
    /// Its compensation.
    pub compensate: Endpoint,
    /// The request body both are sent (protobuf or JSON bytes, base64 in
    /// the log).
    #[serde(with = "base64_bytes")]
    pub payload: Vec<u8>,
}

/// A saga as submitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Definition {
    /// Its steps, in order.
    pub steps: Vec<StepDefinition>,
    /// How long a forward step may keep failing retryably before it counts
    /// as a definite failure, in milliseconds.
    pub timeout_to_fail_ms: u64,
    /// The submitter's W3C `traceparent`: the coordinator's spans, and the
    /// branch calls under them, join the submitter's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

mod base64_bytes {
    use base64::{Engine as _, engine::general_purpose::STANDARD};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// A saga as the log holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its global id.
    pub gid: String,
    /// What was submitted.
    pub definition: Definition,
    /// Where it is.
    pub state: Saga,
    /// When it was submitted (ms since the epoch).
    pub create_time_ms: i64,
    /// When it last changed.
    pub update_time_ms: i64,
    /// When it is next due.
    pub next_attempt_ms: i64,
    /// Until when a coordinator holds it (0: nobody); in a [`Claimed`],
    /// the lease this claim holds, which every write names.
    pub lease_until_ms: i64,
}

/// A saga claimed for driving: its record, with the lease to write with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The saga.
    pub record: Record,
}

/// Why the log refused.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A saga with this gid was submitted before.
    #[error("saga {0} already exists")]
    Duplicate(String),
    /// The lease was lost: another coordinator owns the saga now.
    #[error("saga {0}: lease lost")]
    LeaseLost(String),
    /// A stored row could not be read.
    #[error("saga {gid}: unreadable {what}: {reason}")]
    Corrupt {
        /// The saga.
        gid: String,
        /// Which column.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] Failure),
}

impl From<sqlx::Error> for LogError {
    fn from(e: sqlx::Error) -> Self {
        LogError::Store(Failure::from(e))
    }
}

/// A duration in whole milliseconds, saturating.
pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The status's name in the log (`running`, `compensating`, `succeeded`,
/// `compensated`).
pub fn status_text(status: Status) -> &'static str {
    match status {
        Status::Running => "running",
        Status::Compensating => "compensating",
        Status::Succeeded => "succeeded",
        Status::Compensated => "compensated",
    }
}

/// The coordinator's log.
#[derive(Debug, Clone)]
pub struct SagaLog {
    pool: Pool,
}

const COLUMNS: &str =
    "gid, definition, state, create_time_ms, update_time_ms, next_attempt_ms, lease_until_ms";

fn record_from_row<R: Row>(row: &R) -> Result<Record, LogError>
where
    for<'r> &'r str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let gid: String = row.try_get("gid")?;
    let corrupt = |what, e: serde_json::Error| LogError::Corrupt {
        gid: gid.clone(),
        what,
        reason: e.to_string(),
    };
    let definition: String = row.try_get("definition")?;
    let state: String = row.try_get("state")?;
    let record = Record {
        definition: serde_json::from_str(&definition).map_err(|e| corrupt("definition", e))?,
        state: serde_json::from_str(&state).map_err(|e| corrupt("state", e))?,
        create_time_ms: row.try_get("create_time_ms")?,
        update_time_ms: row.try_get("update_time_ms")?,
        next_attempt_ms: row.try_get("next_attempt_ms")?,
        lease_until_ms: row.try_get("lease_until_ms")?,
        gid: gid.clone(),
    };
    Ok(record)
}

impl SagaLog {
    /// A log in `pool` (migrated with [`migrator`]).
    pub fn new(pool: Pool) -> SagaLog {
        SagaLog { pool }
    }

    /// Records a new saga, durably, due at once. [`LogError::Duplicate`] if
    /// the gid was used.
    pub async fn submit(&self, gid: &str, definition: &Definition) -> Result<(), LogError> {
        self.insert(gid, definition, None).await.map(drop)
    }

    /// [`submit`](Self::submit), with the saga claimed by `owner` for
    /// `lease` in the same write: the submitting coordinator drives it at
    /// once, without a claim round trip.
    pub async fn submit_claimed(
        &self,
        gid: &str,
        definition: &Definition,
        owner: &str,
        lease: Duration,
    ) -> Result<Claimed, LogError> {
        self.insert(gid, definition, Some((owner, lease))).await
    }

    async fn insert(
        &self,
        gid: &str,
        definition: &Definition,
        claim: Option<(&str, Duration)>,
    ) -> Result<Claimed, LogError> {
        let now = trellis_store::now_ms();
        let state = Saga::new(definition.steps.len());
        let definition_text = serde_json::to_string(definition).map_err(|e| LogError::Corrupt {
            gid: gid.to_owned(),
            what: "definition",
            reason: e.to_string(),
        })?;
        let state_text = serde_json::to_string(&state).map_err(|e| LogError::Corrupt {
            gid: gid.to_owned(),
            what: "state",
            reason: e.to_string(),
        })?;
        let (owner, until) = match claim {
            Some((owner, lease)) => (Some(owner), now.saturating_add(ms(lease))),
            None => (None, 0),
        };
        let done = with_pool!(&self.pool, p => sqlx::query("INSERT INTO saga_transactions (gid, status, definition, state, create_time_ms, update_time_ms, next_attempt_ms, lease_owner, lease_until_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
            .bind(gid)
            .bind(status_text(state.status))
            .bind(&definition_text)
            .bind(&state_text)
            .bind(now)
            .bind(now)
            .bind(now)
            .bind(owner)
            .bind(until)
            .execute(p)
            .await
            .map(drop));
        match done.map_err(Failure::from) {
            Ok(()) => Ok(Claimed {
                record: Record {
                    gid: gid.to_owned(),
                    definition: definition.clone(),
                    state,
                    create_time_ms: now,
                    update_time_ms: now,
                    next_attempt_ms: now,
                    lease_until_ms: until,
                },
            }),
            Err(Failure::Duplicate) => Err(LogError::Duplicate(gid.to_owned())),
            Err(other) => Err(other.into()),
        }
    }

    /// Claims up to `limit` sagas that are due and not leased, for `lease`,
    /// as `owner`. On PostgreSQL rows another coordinator is claiming are
    /// skipped (`FOR UPDATE SKIP LOCKED`).
    pub async fn claim(
        &self,
        owner: &str,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<Claimed>, LogError> {
        let now = trellis_store::now_ms();
        let until = now.saturating_add(ms(lease));
        let lock = if self.pool.is_postgres() {
            " FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        let select = format!(
            "SELECT {COLUMNS} FROM saga_transactions WHERE status IN ('running', 'compensating') AND next_attempt_ms <= $1 AND lease_until_ms < $2 ORDER BY next_attempt_ms LIMIT $3{lock}"
        );
        let mut tx = self.pool.begin().await?;
        let rows = with_tx!(&mut tx, c => {
            let rows = sqlx::query(sqlx::AssertSqlSafe(select.as_str()))
                .bind(now)
                .bind(now)
                .bind(i64::from(limit))
                .fetch_all(&mut **c)
                .await?;
            rows.iter().map(record_from_row).collect::<Result<Vec<_>, LogError>>()?
        });
        let mut claimed = Vec::with_capacity(rows.len());
        for mut record in rows {
            // Conditional too, so a claim never takes a live lease even
            // where rows are not locked (SQLite).
            let taken = with_tx!(&mut tx, c => sqlx::query("UPDATE saga_transactions SET lease_owner = $1, lease_until_ms = $2 WHERE gid = $3 AND lease_until_ms < $4")
                .bind(owner)
                .bind(until)
                .bind(&record.gid)
                .bind(now)
                .execute(&mut **c)
                .await?
                .rows_affected());
            if taken != 1 {
                continue;
            }
            record.lease_until_ms = until;
            claimed.push(Claimed { record });
        }
        tx.commit().await?;
        Ok(claimed)
    }

    /// Writes `state` for a saga this coordinator holds (`claim`), due
    /// again at `next_attempt_ms`, and renews the lease for `lease` from
    /// now — unless the lease was lost ([`LogError::LeaseLost`]: another
    /// coordinator owns the saga; this one must stop driving it).
    pub async fn save(
        &self,
        claimed: &mut Claimed,
        owner: &str,
        state: &Saga,
        next_attempt_ms: i64,
        lease: Duration,
    ) -> Result<(), LogError> {
        let gid = claimed.record.gid.clone();
        let text = serde_json::to_string(state).map_err(|e| LogError::Corrupt {
            gid: gid.clone(),
            what: "state",
            reason: e.to_string(),
        })?;
        let now = trellis_store::now_ms();
        let until = now
            .saturating_add(ms(lease))
            .max(claimed.record.lease_until_ms.saturating_add(1));
        let rows = with_pool!(&self.pool, p => sqlx::query("UPDATE saga_transactions SET status = $1, state = $2, update_time_ms = $3, next_attempt_ms = $4, lease_until_ms = $5 WHERE gid = $6 AND lease_owner = $7 AND lease_until_ms = $8")
            .bind(status_text(state.status))
            .bind(&text)
            .bind(now)
            .bind(next_attempt_ms)
            .bind(until)
            .bind(&gid)
            .bind(owner)
            .bind(claimed.record.lease_until_ms)
            .execute(p)
            .await?
            .rows_affected());
        if rows == 1 {
            claimed.record.lease_until_ms = until;
            claimed.record.state = state.clone();
            Ok(())
        } else {
            Err(LogError::LeaseLost(gid))
        }
    }

    /// Gives a claimed saga back (due at `next_attempt_ms`) so any
    /// coordinator may take it.
    pub async fn release(&self, claimed: &Claimed, owner: &str) -> Result<(), LogError> {
        with_pool!(&self.pool, p => sqlx::query("UPDATE saga_transactions SET lease_owner = NULL, lease_until_ms = 0 WHERE gid = $1 AND lease_owner = $2 AND lease_until_ms = $3")
            .bind(&claimed.record.gid)
            .bind(owner)
            .bind(claimed.record.lease_until_ms)
            .execute(p)
            .await
            .map(drop))?;
        Ok(())
    }

    /// One saga.
    pub async fn get(&self, gid: &str) -> Result<Option<Record>, LogError> {
        let select = format!("SELECT {COLUMNS} FROM saga_transactions WHERE gid = $1");
        with_pool!(&self.pool, p => {
            let row = sqlx::query(sqlx::AssertSqlSafe(select.as_str())).bind(gid).fetch_optional(p).await?;
            row.map(|r| record_from_row(&r)).transpose()
        })
    }

    /// Up to `limit` sagas, newest first, in `status` if given.
    pub async fn list(&self, status: Option<Status>, limit: u32) -> Result<Vec<Record>, LogError> {
        let select = format!(
            "SELECT {COLUMNS} FROM saga_transactions WHERE ($1 = '' OR status = $2) ORDER BY create_time_ms DESC, gid LIMIT $3"
        );
        let wanted = status.map(status_text).unwrap_or("");
        with_pool!(&self.pool, p => {
            let rows = sqlx::query(sqlx::AssertSqlSafe(select.as_str()))
                .bind(wanted)
                .bind(wanted)
                .bind(i64::from(limit))
                .fetch_all(p)
                .await?;
            rows.iter().map(record_from_row).collect()
        })
    }
}
