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

use crate::machine::{Kind, Saga, Status};

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
    /// Its compensation (TCC: Cancel); unused by messages.
    pub compensate: Endpoint,
    /// TCC: its Confirm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm: Option<Endpoint>,
    /// Concurrent transactions: the earlier steps (indices) it waits for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<usize>,
    /// The request body both are sent (protobuf or JSON bytes, base64 in
    /// the log).
    #[serde(with = "base64_bytes")]
    pub payload: Vec<u8>,
}

/// A saga as submitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Definition {
    /// Saga, TCC or message.
    #[serde(default)]
    pub kind: Kind,
    /// A message's check-back endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<Endpoint>,
    /// Steps run concurrently, each after its `after` steps.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub concurrent: bool,
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
        Status::Prepared => "prepared",
        Status::Running => "running",
        Status::Confirming => "confirming",
        Status::Compensating => "compensating",
        Status::Succeeded => "succeeded",
        Status::Compensated => "compensated",
        Status::Aborted => "aborted",
    }
}

/// The coordinator's log.
#[derive(Debug, Clone)]
pub struct SagaLog {
    pool: Pool,
    /// With group commit: where writes queue for the committing task.
    batch: Option<tokio::sync::mpsc::Sender<Queued>>,
}

/// One write of a saga's row. Neither kind can fail on a conflict (an
/// insert of a used gid changes nothing, a fenced update matches no row),
/// so many of them share a transaction without one spoiling the others.
#[derive(Debug)]
enum Write {
    Insert {
        gid: String,
        status: &'static str,
        definition: String,
        state: String,
        now: i64,
        due: i64,
        owner: Option<String>,
        until: i64,
    },
    Update {
        gid: String,
        status: &'static str,
        state: String,
        now: i64,
        next_attempt_ms: i64,
        /// The renewed lease; `None` gives the saga back.
        until: Option<i64>,
        owner: String,
        fence: i64,
    },
}

#[derive(Debug)]
struct Queued {
    write: Write,
    done: tokio::sync::oneshot::Sender<Result<u64, String>>,
}

const INSERT: &str = "INSERT INTO saga_transactions (gid, status, definition, state, create_time_ms, update_time_ms, next_attempt_ms, lease_owner, lease_until_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (gid) DO NOTHING";
const UPDATE: &str = "UPDATE saga_transactions SET status = $1, state = $2, update_time_ms = $3, next_attempt_ms = $4, lease_owner = $5, lease_until_ms = $6 WHERE gid = $7 AND lease_owner = $8 AND lease_until_ms = $9";

/// Runs one write in `tx`; the rows it changed.
async fn execute(tx: &mut trellis_store::Tx, write: &Write) -> Result<u64, sqlx::Error> {
    match write {
        Write::Insert {
            gid,
            status,
            definition,
            state,
            now,
            due,
            owner,
            until,
        } => Ok(with_tx!(tx, c => sqlx::query(INSERT)
            .bind(gid)
            .bind(*status)
            .bind(definition)
            .bind(state)
            .bind(now)
            .bind(now)
            .bind(due)
            .bind(owner)
            .bind(until)
            .execute(&mut **c)
            .await?
            .rows_affected())),
        Write::Update {
            gid,
            status,
            state,
            now,
            next_attempt_ms,
            until,
            owner,
            fence,
        } => Ok(with_tx!(tx, c => sqlx::query(UPDATE)
            .bind(*status)
            .bind(state)
            .bind(now)
            .bind(next_attempt_ms)
            .bind(until.map(|_| owner.as_str()))
            .bind(until.unwrap_or(0))
            .bind(gid)
            .bind(owner)
            .bind(fence)
            .execute(&mut **c)
            .await?
            .rows_affected())),
    }
}

/// Rows per multi-row statement (SQLite allows 32766 parameters; an
/// update row takes 9).
const ROWS_PER_STATEMENT: usize = 512;

/// `($1, …, $k), ($k+1, …), …` for `rows` rows of `columns` values.
fn placeholders(rows: usize, columns: usize) -> String {
    let mut out = String::with_capacity(rows * columns * 5);
    for r in 0..rows {
        out.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..columns {
            if c > 0 {
                out.push_str(", ");
            }
            out.push_str(&format!("${}", r * columns + c + 1));
        }
        out.push(')');
    }
    out
}

/// Runs a batch's writes in few statements — one multi-row INSERT, one
/// UPDATE … FROM (VALUES …) per chunk — instead of a round trip each; the
/// rows each write changed, in order. A batch holds at most one write per
/// saga but for submits of the same gid, which the first of them takes.
async fn execute_many(
    tx: &mut trellis_store::Tx,
    batch: &[Queued],
) -> Result<Vec<u64>, sqlx::Error> {
    use std::collections::{HashMap, HashSet};
    let mut changed: HashMap<usize, u64> = HashMap::new();
    let inserts: Vec<(usize, &Write)> = {
        let mut seen = HashSet::new();
        batch
            .iter()
            .enumerate()
            .filter(|(_, q)| matches!(q.write, Write::Insert { .. }))
            .filter(|(i, q)| {
                let Write::Insert { gid, .. } = &q.write else {
                    return false;
                };
                let first = seen.insert(gid.as_str());
                if !first {
                    changed.insert(*i, 0);
                }
                first
            })
            .map(|(i, q)| (i, &q.write))
            .collect()
    };
    let updates: Vec<(usize, &Write)> = batch
        .iter()
        .enumerate()
        .filter(|(_, q)| matches!(q.write, Write::Update { .. }))
        .map(|(i, q)| (i, &q.write))
        .collect();
    for chunk in inserts.chunks(ROWS_PER_STATEMENT) {
        let mut sql = String::from(
            "INSERT INTO saga_transactions (gid, status, definition, state, create_time_ms, update_time_ms, next_attempt_ms, lease_owner, lease_until_ms) VALUES ",
        );
        sql.push_str(&placeholders(chunk.len(), 9));
        sql.push_str(" ON CONFLICT (gid) DO NOTHING RETURNING gid");
        let inserted: Vec<String> = with_tx!(tx, c => {
            let mut q = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.as_str()));
            for (_, w) in chunk {
                if let Write::Insert { gid, status, definition, state, now, due, owner, until } = w {
                    q = q.bind(gid).bind(*status).bind(definition).bind(state).bind(now).bind(now).bind(due).bind(owner).bind(until);
                }
            }
            q.fetch_all(&mut **c).await?
        });
        let inserted: HashSet<String> = inserted.into_iter().collect();
        for (i, w) in chunk {
            if let Write::Insert { gid, .. } = w {
                changed.insert(*i, u64::from(inserted.contains(gid)));
            }
        }
    }
    for chunk in updates.chunks(ROWS_PER_STATEMENT) {
        // VALUES columns are column1.. on both engines.
        let mut sql = String::from(
            "UPDATE saga_transactions SET status = v.column2, state = v.column3, update_time_ms = v.column4, next_attempt_ms = v.column5, lease_owner = v.column6, lease_until_ms = v.column7 FROM (VALUES ",
        );
        sql.push_str(&placeholders(chunk.len(), 9));
        sql.push_str(") AS v WHERE saga_transactions.gid = v.column1 AND saga_transactions.lease_owner = v.column8 AND saga_transactions.lease_until_ms = v.column9 RETURNING gid");
        let updated: Vec<String> = with_tx!(tx, c => {
            let mut q = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.as_str()));
            for (_, w) in chunk {
                if let Write::Update { gid, status, state, now, next_attempt_ms, until, owner, fence } = w {
                    q = q
                        .bind(gid)
                        .bind(*status)
                        .bind(state)
                        .bind(now)
                        .bind(next_attempt_ms)
                        .bind(until.map(|_| owner.as_str()))
                        .bind(until.unwrap_or(0))
                        .bind(owner)
                        .bind(fence);
                }
            }
            q.fetch_all(&mut **c).await?
        });
        let updated: HashSet<String> = updated.into_iter().collect();
        for (i, w) in chunk {
            if let Write::Update { gid, .. } = w {
                changed.insert(*i, u64::from(updated.contains(gid)));
            }
        }
    }
    Ok((0..batch.len())
        .map(|i| changed.get(&i).copied().unwrap_or(0))
        .collect())
}

/// Commits queued writes together: takes what is waiting (up to `max`),
/// runs it in one transaction, commits once, answers each. Under load a
/// batch forms while the previous commit is on the disk; alone, a write is
/// committed at once.
async fn commit_batches(pool: Pool, mut queue: tokio::sync::mpsc::Receiver<Queued>, max: usize) {
    let mut batch = Vec::with_capacity(max);
    while let Some(first) = queue.recv().await {
        batch.push(first);
        while batch.len() < max {
            match queue.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        metrics::histogram!("saga_log_batch_writes").record(batch.len() as f64);
        let outcome: Result<Vec<u64>, sqlx::Error> = async {
            let mut tx = pool.begin().await?;
            let rows = if batch.len() == 1 {
                vec![execute(&mut tx, &batch[0].write).await?]
            } else {
                execute_many(&mut tx, &batch).await?
            };
            tx.commit().await?;
            Ok(rows)
        }
        .await;
        match outcome {
            Ok(rows) => {
                for (queued, n) in batch.drain(..).zip(rows) {
                    let _ = queued.done.send(Ok(n));
                }
            }
            Err(e) => {
                let e = e.to_string();
                for queued in batch.drain(..) {
                    let _ = queued.done.send(Err(e.clone()));
                }
            }
        }
    }
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
    /// A log in `pool` (migrated with [`migrator`]), each write its own
    /// transaction.
    pub fn new(pool: Pool) -> SagaLog {
        SagaLog { pool, batch: None }
    }

    /// A log in `pool` with group commit: sagas' writes that arrive while
    /// a commit is under way share the next one (up to `max_batch`), so
    /// the disk's flushes, not the sagas, bound the rate. Needs a Tokio
    /// runtime (it spawns the committing task, which ends with the last
    /// clone of the log).
    pub fn batched(pool: Pool, max_batch: usize) -> SagaLog {
        let max = max_batch.max(1);
        let (tx, rx) = tokio::sync::mpsc::channel(max.saturating_mul(4));
        tokio::spawn(commit_batches(pool.clone(), rx, max));
        SagaLog {
            pool,
            batch: Some(tx),
        }
    }

    /// Runs `write`, through the batch when there is one; the rows it
    /// changed.
    async fn write(&self, write: Write) -> Result<u64, LogError> {
        match &self.batch {
            None => {
                let mut tx = self.pool.begin().await?;
                let rows = execute(&mut tx, &write).await?;
                tx.commit().await?;
                Ok(rows)
            }
            Some(queue) => {
                let (done, answer) = tokio::sync::oneshot::channel();
                let closed =
                    || LogError::Store(Failure::Unavailable("the log's committer stopped".into()));
                queue
                    .send(Queued { write, done })
                    .await
                    .map_err(|_| closed())?;
                answer
                    .await
                    .map_err(|_| closed())?
                    .map_err(|e| LogError::Store(Failure::Unavailable(e)))
            }
        }
    }

    /// Records a new saga, durably, due at once. [`LogError::Duplicate`] if
    /// the gid was used.
    pub async fn submit(&self, gid: &str, definition: &Definition) -> Result<(), LogError> {
        self.insert(gid, definition, None, false).await.map(drop)
    }

    /// Records a two-phase message as prepared: due for a check-back
    /// after its `timeout_to_fail` unless [`promote`](Self::promote)d
    /// first. [`LogError::Duplicate`] if the gid was used.
    pub async fn prepare(&self, gid: &str, definition: &Definition) -> Result<(), LogError> {
        self.insert(gid, definition, None, true).await.map(drop)
    }

    /// A prepared message was submitted (its local transaction
    /// committed): it runs at once. Whether it was prepared and not held
    /// by a coordinator (one checking it back finds it committed anyway).
    pub async fn promote(&self, gid: &str) -> Result<bool, LogError> {
        let Some(record) = self.get(gid).await? else {
            return Ok(false);
        };
        if record.state.status != Status::Prepared {
            return Ok(false);
        }
        let mut state = record.state;
        state.submitted();
        let text = serde_json::to_string(&state).map_err(|e| LogError::Corrupt {
            gid: gid.to_owned(),
            what: "state",
            reason: e.to_string(),
        })?;
        let now = trellis_store::now_ms();
        let rows = with_pool!(&self.pool, p => sqlx::query("UPDATE saga_transactions SET status = $1, state = $2, update_time_ms = $3, next_attempt_ms = $4 WHERE gid = $5 AND status = 'prepared' AND lease_until_ms < $6")
            .bind(status_text(state.status))
            .bind(&text)
            .bind(now)
            .bind(now)
            .bind(gid)
            .bind(now)
            .execute(p)
            .await?
            .rows_affected());
        Ok(rows == 1)
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
        self.insert(gid, definition, Some((owner, lease)), false)
            .await
    }

    async fn insert(
        &self,
        gid: &str,
        definition: &Definition,
        claim: Option<(&str, Duration)>,
        prepared: bool,
    ) -> Result<Claimed, LogError> {
        let now = trellis_store::now_ms();
        let state = if prepared {
            Saga::prepared(definition.steps.len())
        } else if definition.concurrent {
            Saga::concurrent(
                definition.kind,
                definition.steps.iter().map(|s| s.after.clone()).collect(),
            )
        } else {
            Saga::of(definition.kind, definition.steps.len())
        };
        // A prepared message is first due when it should have been
        // submitted by.
        let due = if prepared {
            now.saturating_add(i64::try_from(definition.timeout_to_fail_ms).unwrap_or(i64::MAX))
        } else {
            now
        };
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
            Some((owner, lease)) => (Some(owner.to_owned()), now.saturating_add(ms(lease))),
            None => (None, 0),
        };
        let rows = self
            .write(Write::Insert {
                gid: gid.to_owned(),
                status: status_text(state.status),
                definition: definition_text,
                state: state_text,
                now,
                due,
                owner,
                until,
            })
            .await?;
        if rows == 0 {
            return Err(LogError::Duplicate(gid.to_owned()));
        }
        Ok(Claimed {
            record: Record {
                gid: gid.to_owned(),
                definition: definition.clone(),
                state,
                create_time_ms: now,
                update_time_ms: now,
                next_attempt_ms: due,
                lease_until_ms: until,
            },
        })
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
            "SELECT {COLUMNS} FROM saga_transactions WHERE status IN ('prepared', 'running', 'confirming', 'compensating') AND next_attempt_ms <= $1 AND lease_until_ms < $2 ORDER BY next_attempt_ms LIMIT $3{lock}"
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
        self.update(claimed, owner, state, next_attempt_ms, Some(lease))
            .await
    }

    /// Writes `state` for a saga this coordinator holds, due again at
    /// `next_attempt_ms`, and gives it back in the same write (a saga that
    /// ended, or waits for a retry) — unless the lease was lost.
    pub async fn save_released(
        &self,
        claimed: &mut Claimed,
        owner: &str,
        state: &Saga,
        next_attempt_ms: i64,
    ) -> Result<(), LogError> {
        self.update(claimed, owner, state, next_attempt_ms, None)
            .await
    }

    /// The fenced write behind [`save`](Self::save) (`lease`: renewed for
    /// that long) and [`save_released`](Self::save_released) (`None`).
    async fn update(
        &self,
        claimed: &mut Claimed,
        owner: &str,
        state: &Saga,
        next_attempt_ms: i64,
        lease: Option<Duration>,
    ) -> Result<(), LogError> {
        let gid = claimed.record.gid.clone();
        let text = serde_json::to_string(state).map_err(|e| LogError::Corrupt {
            gid: gid.clone(),
            what: "state",
            reason: e.to_string(),
        })?;
        let now = trellis_store::now_ms();
        // A renewed lease is always a new one, so a write fenced by the
        // old one cannot land after it.
        let until = lease.map(|lease| {
            now.saturating_add(ms(lease))
                .max(claimed.record.lease_until_ms.saturating_add(1))
        });
        let rows = self
            .write(Write::Update {
                gid: gid.clone(),
                status: status_text(state.status),
                state: text,
                now,
                next_attempt_ms,
                until,
                owner: owner.to_owned(),
                fence: claimed.record.lease_until_ms,
            })
            .await?;
        if rows == 1 {
            claimed.record.lease_until_ms = until.unwrap_or(0);
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

#[cfg(test)]
mod tests {
    #[test]
    fn placeholders_number_every_value() {
        assert_eq!(super::placeholders(1, 2), "($1, $2)");
        assert_eq!(super::placeholders(2, 3), "($1, $2, $3), ($4, $5, $6)");
    }
}
