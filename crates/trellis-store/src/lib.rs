//! SQL stores for services: one [`Pool`] over SQLite (the embedded default,
//! a file in the data dir) or PostgreSQL, chosen by the URL, with the
//! service's migrations applied on open, [`DatabaseSettings`] for its
//! config and errors sorted into what a caller can do about them
//! ([`Failure`]).
//!
//! A service writes its SQL once: both engines accept `$N` parameters
//! (SQLite numbers them by first appearance, so each query uses them in
//! order) and its schema uses only types both understand. [`with_pool!`]
//! expands a body once per engine this build supports, so there is one copy
//! of each query.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use trellis_store::{DatabaseSettings, Pool, migrator, with_pool};
//!
//! let migrations = migrator("_notes_migrations", &[(1, "notes", "CREATE TABLE notes (id TEXT PRIMARY KEY)")]);
//! let settings = DatabaseSettings::default();
//! let pool = Pool::open_settings(&settings, "./.trellis/notes.db".as_ref(), &migrations).await?;
//! let n: i64 = with_pool!(&pool, p => sqlx::query_scalar("SELECT COUNT(*) FROM notes").fetch_one(p).await?);
//! assert_eq!(n, 0);
//! # Ok(()) }
//! ```
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `sqlite` | yes | the embedded store (`sqlite://PATH`) |
//! | `postgres` | yes | PostgreSQL (`postgres://...`) |

#![warn(missing_docs)]

#[cfg(not(any(feature = "sqlite", feature = "postgres")))]
compile_error!("trellis-store needs an engine: enable its `sqlite` or `postgres` feature");

use std::{borrow::Cow, path::Path, time::Duration};

use serde::{Deserialize, Serialize};
pub use sqlx;
use sqlx::{
    SqlSafeStr,
    migrate::{Migration, MigrationType, Migrator},
};
use trellis_config::{Invalid, Secret};

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names an engine this build does not support.
    #[error(
        "database url {url:?} is not supported: use sqlite://PATH or postgres://USER@HOST:PORT/DB (with the matching cargo feature)"
    )]
    UnsupportedUrl {
        /// The URL, without credentials.
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

/// A service's store settings (applied on restart).
///
/// ```toml
/// [database]
/// url = "postgres://app:${DB_PASSWORD}@db:5432/shop"
/// max_connections = 16
/// acquire_timeout = "5s"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DatabaseSettings {
    /// `sqlite://PATH` or `postgres://...`; unset means SQLite in the data dir.
    pub url: Option<Secret<String>>,
    /// The most connections to hold. Default: 8.
    pub max_connections: u32,
    /// How long a call waits for a connection before it fails UNAVAILABLE.
    /// Default: 5s.
    #[serde(with = "trellis_config::duration")]
    pub acquire_timeout: Duration,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: None,
            max_connections: 8,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

impl DatabaseSettings {
    /// Checks the settings, naming keys under `prefix` (`database`).
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        if !(1..=1000).contains(&self.max_connections) {
            return Err(Invalid::new(
                format!("{prefix}.max_connections"),
                "must be between 1 and 1000",
            ));
        }
        if !(Duration::from_millis(10)..=Duration::from_secs(600)).contains(&self.acquire_timeout) {
            return Err(Invalid::new(
                format!("{prefix}.acquire_timeout"),
                "must be between 10ms and 10m",
            ));
        }
        if let Some(url) = &self.url {
            let url = url.expose();
            if !["sqlite:", "postgres://", "postgresql://"]
                .iter()
                .any(|p| url.starts_with(p))
            {
                return Err(Invalid::new(
                    format!("{prefix}.url"),
                    "must start with sqlite:, postgres:// or postgresql://",
                ));
            }
        }
        Ok(())
    }

    /// The URL to open: `url`, or SQLite at `default_file`.
    pub fn url_or(&self, default_file: &Path) -> String {
        match &self.url {
            Some(url) => url.expose().clone(),
            None => format!("sqlite://{}", default_file.display()),
        }
    }
}

/// Now, in milliseconds since the Unix epoch: how rows here carry time
/// (`*_time_ms` columns, `BIGINT` on both engines).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Migrations from `(version, description, sql)`, in version order,
/// tracked in the table `table` — one per service, so services can share a
/// database without their version numbers colliding.
pub fn migrator(table: &'static str, migrations: &[(i64, &'static str, &'static str)]) -> Migrator {
    let mut migrator = Migrator::with_migrations(
        migrations
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    Cow::Borrowed(description),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    );
    migrator.dangerous_set_table_name(table);
    migrator
}

/// A pool of connections to SQLite or PostgreSQL. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Pool {
    /// The embedded store.
    #[cfg(feature = "sqlite")]
    Sqlite(sqlx::SqlitePool),
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool),
}

/// Runs `$body` with `$pool` bound to whichever engine's pool `$store` (a
/// `&Pool`) holds; the body is compiled once per engine.
#[cfg(all(feature = "sqlite", feature = "postgres"))]
#[macro_export]
macro_rules! with_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            $crate::Pool::Sqlite($pool) => $body,
            $crate::Pool::Postgres($pool) => $body,
        }
    };
}

/// Runs `$body` with `$pool` bound to the SQLite pool `$store` holds.
#[cfg(all(feature = "sqlite", not(feature = "postgres")))]
#[macro_export]
macro_rules! with_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            $crate::Pool::Sqlite($pool) => $body,
        }
    };
}

/// Runs `$body` with `$pool` bound to the PostgreSQL pool `$store` holds.
#[cfg(all(feature = "postgres", not(feature = "sqlite")))]
#[macro_export]
macro_rules! with_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            $crate::Pool::Postgres($pool) => $body,
        }
    };
}

/// A transaction on whichever engine the [`Pool`] holds: what a handler
/// writes its rows in, together with the platform's own (the saga barrier,
/// the outbox). Dropped without [`commit`](Tx::commit), it rolls back.
#[derive(Debug)]
pub enum Tx {
    /// On SQLite.
    #[cfg(feature = "sqlite")]
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
    /// On PostgreSQL.
    #[cfg(feature = "postgres")]
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

/// Runs `$body` with `$conn` bound to the connection of `$tx` (a
/// `&mut Tx`), once per engine: `with_tx!(tx, c => sqlx::query(..).execute(&mut **c).await)`.
#[cfg(all(feature = "sqlite", feature = "postgres"))]
#[macro_export]
macro_rules! with_tx {
    ($tx:expr, $conn:ident => $body:expr) => {
        match $tx {
            $crate::Tx::Sqlite($conn) => $body,
            $crate::Tx::Postgres($conn) => $body,
        }
    };
}

/// Runs `$body` with `$conn` bound to the SQLite transaction `$tx` holds.
#[cfg(all(feature = "sqlite", not(feature = "postgres")))]
#[macro_export]
macro_rules! with_tx {
    ($tx:expr, $conn:ident => $body:expr) => {
        match $tx {
            $crate::Tx::Sqlite($conn) => $body,
        }
    };
}

/// Runs `$body` with `$conn` bound to the PostgreSQL transaction `$tx` holds.
#[cfg(all(feature = "postgres", not(feature = "sqlite")))]
#[macro_export]
macro_rules! with_tx {
    ($tx:expr, $conn:ident => $body:expr) => {
        match $tx {
            $crate::Tx::Postgres($conn) => $body,
        }
    };
}

impl Tx {
    /// Makes the transaction's writes durable.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        with_tx!(self, tx => tx.commit().await)
    }

    /// Undoes them (dropping the transaction does too).
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        with_tx!(self, tx => tx.rollback().await)
    }
}

impl Pool {
    /// Starts a transaction. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`): a transaction that reads and then writes would
    /// otherwise find the lock taken at its first write and fail or back
    /// off, where waiting at the start is fair and cheap.
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            #[cfg(feature = "sqlite")]
            Pool::Sqlite(pool) => Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
            #[cfg(feature = "postgres")]
            Pool::Postgres(pool) => Tx::Postgres(pool.begin().await?),
        })
    }

    /// Opens the store named by `url` and applies `migrations`. A call
    /// waits at most `acquire_timeout` for a connection (while the database
    /// is down, the pool keeps reconnecting) before it fails.
    pub async fn open(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
        migrations: &Migrator,
    ) -> Result<Pool, StoreError> {
        let shown = trellis_core::redact_url(url);
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
            if let Some(dir) = Path::new(path)
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
            return Ok(Pool::Sqlite(
                open_pool(
                    options,
                    max_connections,
                    acquire_timeout,
                    &shown,
                    migrations,
                )
                .await?,
            ));
        }
        #[cfg(feature = "postgres")]
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            use sqlx::postgres::PgConnectOptions;
            let options: PgConnectOptions = url.parse().map_err(connect)?;
            return Ok(Pool::Postgres(
                open_pool(
                    options,
                    max_connections,
                    acquire_timeout,
                    &shown,
                    migrations,
                )
                .await?,
            ));
        }
        #[cfg(not(any(feature = "sqlite", feature = "postgres")))]
        let _ = (connect, max_connections, acquire_timeout, migrations);
        Err(StoreError::UnsupportedUrl { url: shown })
    }

    /// [`open`](Self::open) as `settings` say, SQLite at `default_file`
    /// when they name no URL.
    pub async fn open_settings(
        settings: &DatabaseSettings,
        default_file: &Path,
        migrations: &Migrator,
    ) -> Result<Pool, StoreError> {
        Pool::open(
            &settings.url_or(default_file),
            settings.max_connections,
            settings.acquire_timeout,
            migrations,
        )
        .await
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        with_pool!(self, pool => pool.close().await)
    }

    /// Whether this is the PostgreSQL engine (for the odd statement the two
    /// spell differently).
    pub fn is_postgres(&self) -> bool {
        #[cfg(feature = "postgres")]
        #[allow(irrefutable_let_patterns)]
        if let Pool::Postgres(_) = self {
            return true;
        }
        false
    }
}

/// Opens a pool of at most `max_connections` and applies the migrations.
#[allow(dead_code)]
async fn open_pool<DB>(
    options: <DB::Connection as sqlx::Connection>::Options,
    max_connections: u32,
    acquire_timeout: Duration,
    shown: &str,
    migrations: &Migrator,
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
    migrations
        .run(&pool)
        .await
        .map_err(|source| StoreError::Migrate {
            url: shown.to_owned(),
            source,
        })?;
    Ok(pool)
}

/// What a failed statement means to its caller.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// A unique constraint was violated.
    #[error("duplicate key")]
    Duplicate,
    /// The store could not be reached in time; the caller may retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Anything else.
    #[error("store error: {0}")]
    Other(String),
}

impl From<sqlx::Error> for Failure {
    fn from(err: sqlx::Error) -> Failure {
        match err {
            sqlx::Error::Database(db) if db.is_unique_violation() => Failure::Duplicate,
            sqlx::Error::Database(ref db) if is_transient(db.as_ref()) => {
                Failure::Unavailable(err.to_string())
            }
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => Failure::Unavailable(err.to_string()),
            other => Failure::Other(other.to_string()),
        }
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

    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn sqlite_opens_migrates_and_reports_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let migrations = migrator(
            "_t_migrations",
            &[(1, "t", "CREATE TABLE t (k TEXT PRIMARY KEY)")],
        );
        let pool = Pool::open_settings(
            &DatabaseSettings::default(),
            &dir.path().join("sub/t.db"),
            &migrations,
        )
        .await
        .unwrap();
        assert!(!pool.is_postgres());
        let insert = || async {
            with_pool!(&pool, p => sqlx::query("INSERT INTO t (k) VALUES ($1)").bind("a").execute(p).await.map(drop))
        };
        insert().await.unwrap();
        let again = Failure::from(insert().await.unwrap_err());
        assert!(matches!(again, Failure::Duplicate), "{again:?}");
        // A transaction: rolled back, nothing; committed, the row.
        for (commit, key) in [(false, "b"), (true, "c")] {
            let mut tx = pool.begin().await.unwrap();
            with_tx!(&mut tx, c => sqlx::query("INSERT INTO t (k) VALUES ($1)").bind(key).execute(&mut **c).await.map(drop)).unwrap();
            if commit {
                tx.commit().await.unwrap();
            } else {
                tx.rollback().await.unwrap();
            }
        }
        let keys: Vec<String> = with_pool!(&pool, p => sqlx::query_scalar("SELECT k FROM t ORDER BY k").fetch_all(p).await.unwrap());
        assert_eq!(keys, ["a", "c"]);
        pool.close().await;
    }

    #[test]
    fn settings_name_the_bad_key() {
        let settings = DatabaseSettings {
            url: Some(Secret::new("mysql://x".to_owned())),
            ..DatabaseSettings::default()
        };
        assert_eq!(
            settings.validate("database").unwrap_err().key,
            "database.url"
        );
    }
}
