//! The user repository over sqlx: SQLite (embedded default) or PostgreSQL,
//! chosen by the database URL.
//!
//! The SQL is written once (see `trellis_store`): `with_pool!` expands each
//! method body once per engine.

use sqlx::Row;
pub use trellis_store::StoreError;
use trellis_store::{Failure, Pool, with_pool};

use crate::biz::{RepoError, UpdateOutcome, User, UserRepo};

/// The schema, in version order.
fn migrator() -> sqlx::migrate::Migrator {
    // sqlx's default table, as before there were other services.
    trellis_store::migrator(
        "_sqlx_migrations",
        &[
            (1, "users", include_str!("../migrations/0001_users.sql")),
            (
                2,
                "notifications",
                "CREATE TABLE notifications (
                    user_id        TEXT NOT NULL,
                    id             TEXT NOT NULL,
                    kind           TEXT NOT NULL,
                    order_id       TEXT NOT NULL,
                    text           TEXT NOT NULL,
                    create_time_ms BIGINT NOT NULL,
                    PRIMARY KEY (user_id, id)
                );
                CREATE INDEX notifications_by_time ON notifications (user_id, create_time_ms);",
            ),
        ],
    )
}

/// Users in SQLite or PostgreSQL.
#[derive(Debug, Clone)]
pub struct SqlUserRepo(Pool);

impl SqlUserRepo {
    /// Opens the store `settings` name (SQLite at `default_file` when they
    /// name none) and applies migrations (with the inbox's tables, for
    /// [`crate::notify`]).
    pub async fn open(
        settings: &trellis_store::DatabaseSettings,
        default_file: &std::path::Path,
    ) -> Result<SqlUserRepo, StoreError> {
        Ok(SqlUserRepo(
            trellis_events::outbox::open_store(settings, default_file, &migrator()).await?,
        ))
    }

    /// The pool (notifications are kept beside the users).
    pub fn pool(&self) -> &Pool {
        &self.0
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.0.close().await
    }
}

fn repo_error(err: sqlx::Error) -> RepoError {
    match Failure::from(err) {
        Failure::Duplicate => RepoError::Duplicate,
        Failure::Unavailable(detail) => RepoError::Unavailable(detail),
        Failure::Other(detail) => RepoError::Other(detail),
    }
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
        with_pool!(&self.0, pool => {
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
        with_pool!(&self.0, pool => {
            let row = sqlx::query(SELECT_BY_ID).bind(id).fetch_optional(pool).await.map_err(repo_error)?;
            row.map(|r| user_from_row(&r)).transpose().map_err(repo_error)
        })
    }

    async fn list(&self, after: &str, limit: u32) -> Result<Vec<User>, RepoError> {
        with_pool!(&self.0, pool => {
            let rows = sqlx::query(SELECT_PAGE).bind(after).bind(i64::from(limit)).fetch_all(pool).await.map_err(repo_error)?;
            rows.iter().map(user_from_row).collect::<Result<_, _>>().map_err(repo_error)
        })
    }

    async fn update(&self, user: &User, expected: i64) -> Result<UpdateOutcome, RepoError> {
        with_pool!(&self.0, pool => {
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
        with_pool!(&self.0, pool => {
            let done = sqlx::query("DELETE FROM users WHERE id = $1").bind(id).execute(pool).await.map_err(repo_error)?;
            Ok(done.rows_affected() > 0)
        })
    }
}
