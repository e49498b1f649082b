//! The participant's barrier: one call around a branch handler makes it
//! safe against everything a coordinator's retries and a network's
//! reordering can do to it.
//!
//! In the participant's own database transaction, before its business
//! rows, the barrier inserts `(gid, branch, op)` into `saga_barrier`
//! (unique): the first delivery of a branch operation inserts and runs, a
//! repeated one finds the row and is skipped (**idempotence**). A
//! compensation also inserts the row of the forward operation it undoes,
//! marked as written by the compensation: if that insert succeeds the
//! forward step never ran, so there is nothing to undo (**null
//! compensation**), and the forward step, should it arrive late, finds its
//! row taken and does nothing (**no hanging**). Everything commits or rolls
//! back with the business rows, so a handler that fails leaves no mark and
//! its retry runs again. This is dtm's barrier, in Rust.
//!
//! ```no_run
//! # async fn handle(pool: &trellis_store::Pool, headers: &http::HeaderMap) -> Result<(), Box<dyn std::error::Error>> {
//! use trellis_saga::barrier::{Branch, Outcome, run};
//! use trellis_store::with_tx;
//!
//! let branch = Branch::from_headers(headers)?;
//! let outcome = run(pool, &branch, |tx| Box::pin(async move {
//!     with_tx!(tx, c => sqlx::query("UPDATE accounts SET balance = balance - 5 WHERE id = 'ann'")
//!         .execute(&mut **c).await.map(drop))
//! })).await?;
//! if let Outcome::Skipped(why) = outcome {
//!     println!("nothing to do: {why:?}");
//! }
//! # Ok(()) }
//! ```

use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue};
use trellis_store::{Pool, Tx, with_tx};

/// The header (or gRPC metadata key) carrying the global transaction id.
pub const GID: HeaderName = HeaderName::from_static("trellis-saga-gid");
/// The header carrying the branch id within the transaction.
pub const BRANCH: HeaderName = HeaderName::from_static("trellis-saga-branch");
/// The header carrying the operation (`action`, `compensate`, `try`,
/// `confirm`, `cancel`).
pub const OP: HeaderName = HeaderName::from_static("trellis-saga-op");

/// The header a coordinator adds to compensations: why the transaction
/// turned round (visible ASCII, at most [`MAX_REASON_BYTES`]).
pub const REASON: HeaderName = HeaderName::from_static("trellis-saga-reason");
/// The longest reason sent.
pub const MAX_REASON_BYTES: usize = 512;

/// Why the transaction is being undone, as a compensation request carries
/// it (`trellis-saga-reason`); `None` when absent or malformed.
pub fn reason(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(&REASON)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= MAX_REASON_BYTES)
}

/// `text` as a header value: visible ASCII (anything else becomes `?`),
/// cut to [`MAX_REASON_BYTES`].
pub fn reason_value(text: &str) -> HeaderValue {
    let cleaned: String = text
        .chars()
        .take(MAX_REASON_BYTES)
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    HeaderValue::from_str(&cleaned).unwrap_or(HeaderValue::from_static("?"))
}

/// The longest global transaction id accepted.
pub const MAX_GID_BYTES: usize = 128;
/// The longest branch id accepted.
pub const MAX_BRANCH_BYTES: usize = 64;

/// The barrier's table, for the participant's migrations (SQLite and
/// PostgreSQL alike): `(version, description, sql)`.
pub const MIGRATION: (i64, &str, &str) = (
    1_000_000,
    "saga barrier",
    "CREATE TABLE IF NOT EXISTS saga_barrier (
        gid            TEXT NOT NULL,
        branch_id      TEXT NOT NULL,
        op             TEXT NOT NULL,
        reason         TEXT NOT NULL,
        create_time_ms BIGINT NOT NULL,
        PRIMARY KEY (gid, branch_id, op)
    )",
);

/// A branch operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// A saga's forward step.
    Action,
    /// A saga's compensation of [`Op::Action`].
    Compensate,
    /// TCC's reservation.
    Try,
    /// TCC's confirmation of [`Op::Try`].
    Confirm,
    /// TCC's cancellation of [`Op::Try`].
    Cancel,
}

impl Op {
    /// Its name on the wire and in the table.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Action => "action",
            Op::Compensate => "compensate",
            Op::Try => "try",
            Op::Confirm => "confirm",
            Op::Cancel => "cancel",
        }
    }

    /// The forward operation a compensation undoes.
    pub fn undoes(self) -> Option<Op> {
        match self {
            Op::Compensate => Some(Op::Action),
            Op::Cancel => Some(Op::Try),
            _ => None,
        }
    }

    fn parse(text: &str) -> Option<Op> {
        Some(match text {
            "action" => Op::Action,
            "compensate" => Op::Compensate,
            "try" => Op::Try,
            "confirm" => Op::Confirm,
            "cancel" => Op::Cancel,
            _ => return None,
        })
    }
}

/// Which branch operation a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Branch {
    /// The global transaction.
    pub gid: String,
    /// The branch within it.
    pub branch_id: String,
    /// The operation.
    pub op: Op,
}

/// What is wrong with a request's branch headers: a bad request (400 /
/// INVALID_ARGUMENT), named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{header}: {reason}")]
pub struct BadBranch {
    /// The header.
    pub header: &'static str,
    /// What is wrong.
    pub reason: String,
}

impl From<BadBranch> for trellis_core::Error {
    fn from(bad: BadBranch) -> Self {
        trellis_core::Error::invalid_argument(bad.header, bad.to_string())
    }
}

impl Branch {
    /// A branch operation.
    pub fn new(gid: impl Into<String>, branch_id: impl Into<String>, op: Op) -> Branch {
        Branch {
            gid: gid.into(),
            branch_id: branch_id.into(),
            op,
        }
    }

    /// From a request's headers (gRPC metadata is headers too), bounded.
    pub fn from_headers(headers: &HeaderMap) -> Result<Branch, BadBranch> {
        let get = |name: &HeaderName, max: usize| -> Result<String, BadBranch> {
            let header = name.as_str();
            let bad = |reason: String| BadBranch {
                header: match header {
                    "trellis-saga-gid" => "trellis-saga-gid",
                    "trellis-saga-branch" => "trellis-saga-branch",
                    _ => "trellis-saga-op",
                },
                reason,
            };
            let value = headers
                .get(name)
                .ok_or_else(|| bad("missing".into()))?
                .to_str()
                .map_err(|_| bad("not visible ASCII".into()))?;
            if value.is_empty() || value.len() > max {
                return Err(bad(format!("must be 1 to {max} bytes")));
            }
            Ok(value.to_owned())
        };
        let op = get(&OP, 16)?;
        Ok(Branch {
            gid: get(&GID, MAX_GID_BYTES)?,
            branch_id: get(&BRANCH, MAX_BRANCH_BYTES)?,
            op: Op::parse(&op).ok_or_else(|| BadBranch {
                header: "trellis-saga-op",
                reason: format!("{op:?}: expected action, compensate, try, confirm or cancel"),
            })?,
        })
    }

    /// The headers a coordinator sends for this branch operation.
    pub fn headers(&self) -> Result<[(HeaderName, HeaderValue); 3], BadBranch> {
        let value = |header: &'static str, v: &str| {
            HeaderValue::from_str(v).map_err(|_| BadBranch {
                header,
                reason: "not visible ASCII".into(),
            })
        };
        Ok([
            (GID, value("trellis-saga-gid", &self.gid)?),
            (BRANCH, value("trellis-saga-branch", &self.branch_id)?),
            (OP, HeaderValue::from_static(self.op.as_str())),
        ])
    }
}

/// Why a branch operation did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// It ran before (a retry, a duplicate delivery).
    Duplicate,
    /// A compensation whose forward step never ran.
    NullCompensation,
    /// A forward step arriving after its compensation.
    Hanging,
}

/// How a branch operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// It ran and committed; the handler's result.
    Done(T),
    /// It did not run, and must not: answer success to the coordinator.
    Skipped(Skip),
}

/// Why the barrier failed.
#[derive(Debug, thiserror::Error)]
pub enum BarrierError<E> {
    /// The handler failed: its rows and the barrier's were rolled back, so
    /// a retry runs again.
    #[error(transparent)]
    Handler(E),
    /// The database failed.
    #[error("saga barrier: {0}")]
    Store(#[from] sqlx::Error),
}

const INSERT: &str = "INSERT INTO saga_barrier (gid, branch_id, op, reason, create_time_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING";

/// Inserts a barrier row; whether it was new.
async fn insert(tx: &mut Tx, branch: &Branch, op: Op, reason: Op) -> Result<bool, sqlx::Error> {
    let now = trellis_store::now_ms();
    let done = with_tx!(tx, c => sqlx::query(INSERT)
        .bind(&branch.gid)
        .bind(&branch.branch_id)
        .bind(op.as_str())
        .bind(reason.as_str())
        .bind(now)
        .execute(&mut **c)
        .await?
        .rows_affected());
    Ok(done == 1)
}

/// Runs `handler` for `branch` in one transaction with the barrier's rows,
/// or skips it (see the module docs). The handler writes its rows through
/// the [`Tx`] it is given; `run` commits.
pub async fn run<T, E, F>(
    pool: &Pool,
    branch: &Branch,
    handler: F,
) -> Result<Outcome<T>, BarrierError<E>>
where
    F: for<'t> FnOnce(&'t mut Tx) -> BoxFuture<'t, Result<T, E>>,
{
    let mut tx = pool.begin().await?;
    // A compensation first claims its forward step's row: if that is new,
    // the forward step never ran (and now never will).
    let forward_absent = match branch.op.undoes() {
        Some(forward) => insert(&mut tx, branch, forward, branch.op).await?,
        None => false,
    };
    let first = insert(&mut tx, branch, branch.op, branch.op).await?;
    let skip = if forward_absent {
        Some(Skip::NullCompensation)
    } else if !first {
        Some(match branch.op.undoes() {
            None if reason_of(&mut tx, branch).await?.as_deref() != Some(branch.op.as_str()) => {
                Skip::Hanging
            }
            _ => Skip::Duplicate,
        })
    } else {
        None
    };
    if let Some(skip) = skip {
        tx.commit().await?;
        return Ok(Outcome::Skipped(skip));
    }
    match handler(&mut tx).await {
        Ok(value) => {
            tx.commit().await?;
            Ok(Outcome::Done(value))
        }
        Err(e) => {
            tx.rollback().await?;
            Err(BarrierError::Handler(e))
        }
    }
}

/// [`run`] for a gRPC branch handler: the branch from the request's
/// metadata, the handler's work in the barrier's transaction, and the
/// answer the coordinator understands — OK when done or skipped (a
/// duplicate, a null compensation, a hanging step), the handler's own
/// error (ABORTED / FAILED_PRECONDITION for a definite failure), UNAVAILABLE
/// when the database failed (the coordinator retries), INVALID_ARGUMENT
/// for missing or malformed branch headers.
///
/// ```no_run
/// # async fn reserve(pool: &trellis_store::Pool, request: tonic::Request<()>) -> Result<tonic::Response<()>, tonic::Status> {
/// trellis_saga::barrier::grpc(pool, request.metadata(), |tx| Box::pin(async move {
///     trellis_store::with_tx!(tx, c => sqlx::query("UPDATE stock SET n = n - 1 WHERE n > 0")
///         .execute(&mut **c).await.map(drop))
///         .map_err(|e| trellis_core::Error::unavailable(e.to_string()))
/// })).await?;
/// Ok(tonic::Response::new(()))
/// # }
/// ```
pub async fn grpc<F>(
    pool: &Pool,
    metadata: &tonic::metadata::MetadataMap,
    handler: F,
) -> Result<(), tonic::Status>
where
    F: for<'t> FnOnce(&'t mut Tx) -> BoxFuture<'t, Result<(), trellis_core::Error>>,
{
    let headers = metadata.clone().into_headers();
    let branch = Branch::from_headers(&headers).map_err(trellis_core::Error::from)?;
    match run(pool, &branch, handler).await {
        Ok(Outcome::Done(())) => Ok(()),
        Ok(Outcome::Skipped(skip)) => {
            let reason = match skip {
                Skip::Duplicate => "duplicate",
                Skip::NullCompensation => "null_compensation",
                Skip::Hanging => "hanging",
            };
            metrics::counter!("saga_barrier_skips_total", "reason" => reason).increment(1);
            tracing::debug!(gid = %branch.gid, branch = %branch.branch_id, op = branch.op.as_str(), reason, "branch skipped");
            Ok(())
        }
        Err(BarrierError::Handler(e)) => Err(e.into()),
        Err(BarrierError::Store(e)) => {
            Err(trellis_core::Error::unavailable(format!("saga barrier: {e}")).into())
        }
    }
}

/// The branch id of a two-phase message's local transaction.
pub const MSG_BRANCH: &str = "msg";

/// The branch a two-phase message's local transaction runs as: wrap the
/// local transaction in [`run`] with it, between the message's prepare and
/// its submit. If the coordinator checked back first and found nothing
/// committed, [`run`] skips the late transaction ([`Skip::Hanging`]) —
/// the caller must then not submit, and report failure.
pub fn msg_branch(gid: impl Into<String>) -> Branch {
    Branch::new(gid, MSG_BRANCH, Op::Action)
}

/// Answers a coordinator checking back on a prepared message: whether its
/// local transaction ([`msg_branch`]) committed. When it did not (yet), a
/// row is written in its place, so a local transaction committing later is
/// skipped instead of running unannounced.
pub async fn query_prepared(pool: &Pool, gid: &str) -> Result<bool, sqlx::Error> {
    let branch = msg_branch(gid);
    let mut tx = pool.begin().await?;
    let now = trellis_store::now_ms();
    with_tx!(&mut tx, c => sqlx::query(INSERT)
        .bind(&branch.gid)
        .bind(&branch.branch_id)
        .bind(Op::Action.as_str())
        .bind("rollback")
        .bind(now)
        .execute(&mut **c)
        .await
        .map(drop))?;
    let reason = reason_of(&mut tx, &branch).await?;
    tx.commit().await?;
    Ok(reason.as_deref() == Some(Op::Action.as_str()))
}

/// [`query_prepared`] as a gRPC method's answer: OK when the local
/// transaction committed, ABORTED (reason MSG_ROLLED_BACK) when it did not,
/// UNAVAILABLE when the database failed, INVALID_ARGUMENT without the
/// `trellis-saga-gid` header.
pub async fn grpc_query(
    pool: &Pool,
    metadata: &tonic::metadata::MetadataMap,
) -> Result<(), tonic::Status> {
    let headers = metadata.clone().into_headers();
    let branch = Branch::from_headers(&headers).map_err(trellis_core::Error::from)?;
    match query_prepared(pool, &branch.gid).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(trellis_core::Error::new(
            trellis_core::Code::Aborted,
            "MSG_ROLLED_BACK",
            format!(
                "message {}: the local transaction did not commit",
                branch.gid
            ),
        )
        .into()),
        Err(e) => Err(trellis_core::Error::unavailable(format!("saga barrier: {e}")).into()),
    }
}

/// Who wrote this operation's row: itself, or the compensation that
/// claimed it first.
async fn reason_of(tx: &mut Tx, branch: &Branch) -> Result<Option<String>, sqlx::Error> {
    with_tx!(tx, c => sqlx::query_scalar("SELECT reason FROM saga_barrier WHERE gid = $1 AND branch_id = $2 AND op = $3")
        .bind(&branch.gid)
        .bind(&branch.branch_id)
        .bind(branch.op.as_str())
        .fetch_optional(&mut **c)
        .await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_headers_round_trip_and_are_bounded() {
        let branch = Branch::new("g1", "01", Op::Compensate);
        let mut headers = HeaderMap::new();
        for (k, v) in branch.headers().unwrap() {
            headers.insert(k, v);
        }
        assert_eq!(Branch::from_headers(&headers).unwrap(), branch);
        headers.insert(GID, HeaderValue::from_str(&"g".repeat(129)).unwrap());
        assert_eq!(
            Branch::from_headers(&headers).unwrap_err().header,
            "trellis-saga-gid"
        );
        headers.insert(GID, HeaderValue::from_static("g1"));
        headers.insert(OP, HeaderValue::from_static("undo"));
        let err = Branch::from_headers(&headers).unwrap_err();
        assert_eq!(err.header, "trellis-saga-op");
        headers.remove(BRANCH);
        assert_eq!(
            Branch::from_headers(&headers).unwrap_err().header,
            "trellis-saga-branch"
        );
    }
}
