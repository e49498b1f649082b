//! Keys in SQLite or PostgreSQL: one row per key; taking a free or
//! expired key is one `INSERT … ON CONFLICT DO UPDATE … WHERE expired`,
//! so exactly one caller gets the row back.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use futures_util::future::BoxFuture;
use trellis_store::{Pool, migrator, sqlx, with_pool};

use super::{Begin, Record, Store, StoreError, decode, encode};

/// The table that records the store's schema version.
pub const MIGRATIONS_TABLE: &str = "_trellis_idempotency_migrations";

const SCHEMA: &str = "CREATE TABLE trellis_idempotency (
    idem_key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    owner TEXT NOT NULL,
    record TEXT,
    expires_at BIGINT NOT NULL
)";

/// Keys in a SQL database (`sqlite://PATH`, `postgres://…`), shared by
/// every instance that opens it. Expired rows are swept as keys are taken.
pub struct SqlStore {
    pool: Pool,
    begins: AtomicU64,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn failed(e: sqlx::Error) -> StoreError {
    StoreError(e.to_string())
}

impl SqlStore {
    /// Opens the store at `url` and creates its table.
    pub async fn open(url: &str) -> Result<SqlStore, StoreError> {
        let migrations = migrator(MIGRATIONS_TABLE, &[(1, "idempotency keys", SCHEMA)]);
        let pool = Pool::open(url, 8, Duration::from_secs(5), &migrations)
            .await
            .map_err(|e| StoreError(e.to_string()))?;
        Ok(SqlStore::over(pool))
    }

    /// The store over an open pool whose migrations include this store's
    /// table (see [`SqlStore::open`]).
    pub fn over(pool: Pool) -> SqlStore {
        SqlStore {
            pool,
            begins: AtomicU64::new(0),
        }
    }

    async fn sweep(&self, now: i64) -> Result<(), StoreError> {
        with_pool!(&self.pool, p => sqlx::query("DELETE FROM trellis_idempotency WHERE expires_at < $1")
            .bind(now)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))
        .map_err(failed)?;
        Ok(())
    }
}

impl Store for SqlStore {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        fingerprint: &'a str,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Begin, StoreError>> {
        Box::pin(async move {
            let now = now_ms();
            if self.begins.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
                self.sweep(now).await?;
            }
            // The row, or nothing if it was deleted between the two
            // statements: then take it again.
            for _ in 0..3 {
                let taken: Option<String> = with_pool!(&self.pool, p => sqlx::query_scalar(
                    "INSERT INTO trellis_idempotency (idem_key, fingerprint, owner, record, expires_at)
                     VALUES ($1, $2, $3, NULL, $4)
                     ON CONFLICT (idem_key) DO UPDATE SET fingerprint = excluded.fingerprint,
                         owner = excluded.owner, record = NULL, expires_at = excluded.expires_at
                     WHERE trellis_idempotency.expires_at < $5
                     RETURNING owner",
                )
                .bind(key)
                .bind(fingerprint)
                .bind(owner)
                .bind(now.saturating_add(ms(lease)))
                .bind(now)
                .fetch_optional(p)
                .await)
                .map_err(failed)?;
                if taken.is_some() {
                    return Ok(Begin::Started);
                }
                let row: Option<(String, Option<String>)> =
                    with_pool!(&self.pool, p => sqlx::query_as(
                    "SELECT fingerprint, record FROM trellis_idempotency WHERE idem_key = $1",
                )
                .bind(key)
                .fetch_optional(p)
                .await)
                    .map_err(failed)?;
                match row {
                    None => continue,
                    Some((fingerprint, None)) => return Ok(Begin::InProgress { fingerprint }),
                    Some((fingerprint, Some(text))) => {
                        let record = base64::engine::general_purpose::STANDARD
                            .decode(text)
                            .ok()
                            .as_deref()
                            .and_then(decode)
                            .ok_or_else(|| StoreError(format!("key {key}: a damaged record")))?;
                        return Ok(Begin::Done {
                            fingerprint,
                            record,
                        });
                    }
                }
            }
            Err(StoreError(format!("key {key}: taken and freed repeatedly")))
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        record: &'a Record,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let text = base64::engine::general_purpose::STANDARD.encode(encode(record));
            let done = with_pool!(&self.pool, p => sqlx::query(
                "UPDATE trellis_idempotency SET record = $1, expires_at = $2
                 WHERE idem_key = $3 AND owner = $4 AND record IS NULL",
            )
            .bind(text)
            .bind(now_ms().saturating_add(ms(ttl)))
            .bind(key)
            .bind(owner)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))
            .map_err(failed)?;
            Ok(done == 1)
        })
    }

    fn abandon<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            with_pool!(&self.pool, p => sqlx::query(
                "DELETE FROM trellis_idempotency WHERE idem_key = $1 AND owner = $2 AND record IS NULL",
            )
            .bind(key)
            .bind(owner)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))
            .map_err(failed)?;
            Ok(())
        })
    }
}
