//! The storage side of fencing: a write guarded by a lock carries the
//! grant's token, and the store refuses it when it has already seen a
//! greater one for the resource — so a holder whose lease ran out while it
//! was paused cannot overwrite what its successor wrote.
//!
//! Call [`check`] first in the transaction that writes the guarded rows
//! (SQLite or PostgreSQL; add [`MIGRATION`] to the service's migrations):
//!
//! ```no_run
//! # async fn write(pool: &trellis_store::Pool, guard: &trellis_lock::Guard) -> Result<(), Box<dyn std::error::Error>> {
//! let mut tx = pool.begin().await?;
//! trellis_lock::fence::check(&mut tx, guard.resource(), guard.token()).await?;
//! // … the guarded writes, in `tx` …
//! tx.commit().await?;
//! # Ok(()) }
//! ```

use trellis_store::{Tx, with_tx};

/// The table of the highest token seen per resource.
pub const MIGRATION: (i64, &str, &str) = (
    1_000_001,
    "fencing tokens",
    "CREATE TABLE fencing_tokens (resource TEXT PRIMARY KEY, token BIGINT NOT NULL)",
);

/// Why a fenced write was refused.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// A greater token was seen: this holder's lease is gone.
    #[error("{resource}: token {token} is stale (a later holder wrote)")]
    Stale {
        /// The resource.
        resource: String,
        /// The refused token.
        token: u64,
    },
    /// The database failed.
    #[error("fencing: {0}")]
    Store(#[from] sqlx::Error),
}

/// Records `token` for `resource` in `tx` unless a greater or equal one
/// was recorded — then [`FenceError::Stale`], and the caller rolls back.
/// Equal tokens pass: one holder writes many times.
pub async fn check(tx: &mut Tx, resource: &str, token: u64) -> Result<(), FenceError> {
    let value = i64::try_from(token).unwrap_or(i64::MAX);
    let newer = with_tx!(tx, c => sqlx::query(
        "INSERT INTO fencing_tokens (resource, token) VALUES ($1, $2) \
         ON CONFLICT (resource) DO UPDATE SET token = excluded.token \
         WHERE fencing_tokens.token <= excluded.token",
    )
    .bind(resource)
    .bind(value)
    .execute(&mut **c)
    .await?
    .rows_affected());
    if newer == 1 {
        Ok(())
    } else {
        Err(FenceError::Stale {
            resource: resource.to_owned(),
            token,
        })
    }
}
