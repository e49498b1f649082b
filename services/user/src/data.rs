//! The user repository over sqlx: SQLite (embedded default) or PostgreSQL,
//! chosen by the database URL.
//!
//! The SQL is written once: both engines accept `$N` parameters (SQLite
//! numbers them by first appearance, so each query uses them in order) and
//! the schema uses only types both understand. [`with_pool!`] expands each
//! method body once per engine, so there is one copy of each query.

use std::{borrow::Cow, time::Duration};

use sqlx::{
    Row, SqlSafeStr,
    migrate::{Migration, MigrationType, Migrator},
};

use crate::biz::{RepoError, UpdateOutcome, User, UserRepo};

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `database_url` names an engine this build does not support.
    #[error(
        "database_url {url:?} is not supported: use sqlite://PATH or postgres://USER@HOST:PORT/DB (with the matching cargo feature)"
    )]
    UnsupportedUrl {
        /// The URL as configured.
        url: String,
    },
    /// Connecting failed.
    #[error("cannot open database {url}: {source}")]
    Connect {
        /// The URL, without credentials.
        url: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Applying migrations failed.
    #[error("cannot migrate database {url}: {source}")]
    Migrate {
        /// The URL, without credentials.
        url: String,
        /// The migrator's error.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
}

fn migrator() -> Migrator {
    Migrator::with_migrations(vec![Migration::new(
        1,
        Cow::Borrowed("users"),
        MigrationType::Simple,
        include_str!("../migrations/0001_users.sql").into_sql_str(),
        false,
    )])
}

/// Users in SQLite or PostgreSQL.
#[derive(Debug, Clone)]
pub enum SqlUserRepo {
    /// The embedded store.
    #[cfg(feature = "sqlite")]
    Sqlite(sqlx::SqlitePool),
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool),
}

/// Runs `$body` with `$pool` bound to whichever engine's pool `$repo` holds.
macro_rules! with_pool {
    ($repo:expr, $pool:ident => $body:expr) => {
        match $repo {
            #[cfg(feature = "sqlite")]
            SqlUserRepo::Sqlite($pool) => $body,
            #[cfg(feature = "postgres")]
            SqlUserRepo::Postgres($pool) => $body,
        }
    };
}

impl SqlUserRepo {
    /// Opens the store named by `url` and applies migrations. A call waits
    /// at most `acquire_timeout` for a connection (while the database is
    /// down, the pool keeps reconnecting) before it fails UNAVAILABLE.
    pub async fn open(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<SqlUserRepo, StoreError> {
        let shown = trellis::core::redact_url(url);
        let connect = |source| StoreError::Connect {
            url: shown.clone(),
            source,
        };
        #[cfg(feature = "sqlite")]
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
            if let Some(dir) = std::path::Path::new(path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir).map_err(|e| connect(sqlx::Error::Io(e)))?;
            }
            let options = SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5));
            return Ok(SqlUserRepo::Sqlite(
                open_pool(options, max_connections, acquire_timeout, &shown).await?,
            ));
        }
        #[cfg(feature = "postgres")]
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            use sqlx::postgres::PgConnectOptions;
            let options: PgConnectOptions = url.parse().map_err(connect)?;
            return Ok(SqlUserRepo::Postgres(
                open_pool(options, max_connections, acquire_timeout, &shown).await?,
            ));
        }
        #[cfg(not(any(feature = "sqlite", feature = "postgres")))]
        let _ = connect;
        Err(StoreError::UnsupportedUrl { url: shown })
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        with_pool!(self, pool => pool.close().await)
    }
}

/// Opens a pool of at most `max_connections` and applies the migrations.
async fn open_pool<DB>(
    options: <DB::Connection as sqlx::Connection>::Options,
    max_connections: u32,
    acquire_timeout: Duration,
    shown: &str,
) -> Result<sqlx::Pool<DB>, StoreError>
where
    DB: sqlx::Database,
    DB::Connection: sqlx::migrate::Migrate,
{
    let pool = sqlx::pool::PoolOptions::<DB>::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(acquire_timeout)
        .connect_with(options)
        .await
        .map_err(|source| StoreError::Connect {
            url: shown.to_owned(),
            source,
        })?;
    migrator()
        .run(&pool)
        .await
        .map_err(|source| StoreError::Migrate {
            url: shown.to_owned(),
            source,
        })?;
    Ok(pool)
}

fn repo_error(err: sqlx::Error) -> RepoError {
    match err {
        sqlx::Error::Database(db) if db.is_unique_violation() => RepoError::Duplicate,
        sqlx::Error::Database(ref db) if is_transient(db.as_ref()) => {
            RepoError::Unavailable(err.to_string())
        }
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => RepoError::Unavailable(err.to_string()),
        other => RepoError::Other(other.to_string()),
    }
}

/// Whether a database error means "the store is not there right now", not
/// "this request is wrong": the caller may retry.
fn is_transient(db: &dyn sqlx::error::DatabaseError) -> bool {
    let Some(code) = db.code() else {
        return false;
    };
    #[cfg(feature = "postgres")]
    if db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some()
    {
        return postgres_transient(&code);
    }
    #[cfg(feature = "sqlite")]
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        return sqlite_transient(&code);
    }
    false
}

/// PostgreSQL SQLSTATEs of an outage: classes 08 (connection exception) and
/// 53 (insufficient resources), 57P01-57P03 (admin or crash shutdown,
/// cannot connect now).
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
fn postgres_transient(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("53") || matches!(code, "57P01" | "57P02" | "57P03")
}

/// SQLite result codes of contention: BUSY (5) and LOCKED (6), primary and
/// extended (the low byte is the primary code).
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
fn sqlite_transient(code: &str) -> bool {
    code.parse::<u32>().is_ok_and(|n| matches!(n & 0xff, 5 | 6))
}

const SELECT_BY_ID: &str =
    "SELECT id, email, display_name, create_time_ms, update_time_ms FROM users WHERE id = $1";
const SELECT_PAGE: &str = "SELECT id, email, display_name, create_time_ms, update_time_ms FROM users WHERE id > $1 ORDER BY id LIMIT $2";

fn user_from_row<R: Row>(row: &R) -> Result<User, sqlx::Error>
where
    for<'r> &'r str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(User {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        display_name: row.try_get("display_name")?,
        create_time_ms: row.try_get("create_time_ms")?,
        update_time_ms: row.try_get("update_time_ms")?,
    })
}

impl UserRepo for SqlUserRepo {
    async fn insert(&self, user: &User) -> Result<(), RepoError> {
        with_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO users (id, email, display_name, create_time_ms, update_time_ms) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&user.id)
            .bind(&user.email)
            .bind(&user.display_name)
            .bind(user.create_time_ms)
            .bind(user.update_time_ms)
            .execute(pool)
            .await
            .map(drop)
            .map_err(repo_error)
        })
    }

    async fn get(&self, id: &str) -> Result<Option<User>, RepoError> {
        with_pool!(self, pool => {
            let row = sqlx::query(SELECT_BY_ID).bind(id).fetch_optional(pool).await.map_err(repo_error)?;
            row.map(|r| user_from_row(&r)).transpose().map_err(repo_error)
        })
    }

    async fn list(&self, after: &str, limit: u32) -> Result<Vec<User>, RepoError> {
        with_pool!(self, pool => {
            let rows = sqlx::query(SELECT_PAGE).bind(after).bind(i64::from(limit)).fetch_all(pool).await.map_err(repo_error)?;
            rows.iter().map(user_from_row).collect::<Result<_, _>>().map_err(repo_error)
        })
    }

    async fn update(&self, user: &User, expected: i64) -> Result<UpdateOutcome, RepoError> {
        with_pool!(self, pool => {
            let done = sqlx::query(
                "UPDATE users SET email = $1, display_name = $2, update_time_ms = $3 WHERE id = $4 AND update_time_ms = $5",
            )
            .bind(&user.email)
            .bind(&user.display_name)
            .bind(user.update_time_ms)
            .bind(&user.id)
            .bind(expected)
            .execute(pool)
            .await
            .map_err(repo_error)?;
            Ok(if done.rows_affected() == 1 { UpdateOutcome::Updated } else { UpdateOutcome::Stale })
        })
    }

    async fn delete(&self, id: &str) -> Result<bool, RepoError> {
        with_pool!(self, pool => {
            let done = sqlx::query("DELETE FROM users WHERE id = $1").bind(id).execute(pool).await.map_err(repo_error)?;
            Ok(done.rows_affected() > 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_transient_and_mistakes_are_not() {
        for code in ["08006", "08001", "57P01", "57P03", "53300"] {
            assert!(postgres_transient(code), "{code}");
        }
        for code in ["23505", "42P01", "22001", "40001", "57014"] {
            assert!(!postgres_transient(code), "{code}");
        }
        for code in ["5", "517", "6", "262"] {
            assert!(sqlite_transient(code), "{code}");
        }
        for code in ["19", "2067", "1", "SQLITE_BUSY"] {
            assert!(!sqlite_transient(code), "{code}");
        }
    }
}
