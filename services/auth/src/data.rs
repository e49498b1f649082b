//! The auth store over `trellis_store`: credentials, refresh tokens and
//! sealed signing keys in SQLite (embedded default) or PostgreSQL.

use sqlx::Row;
use trellis_store::{Failure, Pool, StoreError, with_pool};

/// The schema, in version order.
fn migrator() -> sqlx::migrate::Migrator {
    trellis_store::migrator(
        "_auth_migrations",
        &[(1, "auth", include_str!("../migrations/0001_auth.sql"))],
    )
}

/// An account's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// The user's id in the user service; the tokens' `sub`.
    pub user_id: String,
    /// Lower-cased, unique.
    pub email: String,
    /// The Argon2id PHC string.
    pub password_hash: String,
    /// Roles granted, in the tokens' `roles`.
    pub roles: Vec<String>,
    /// The tenant, in the tokens' `tenant`.
    pub tenant: String,
    /// When it was created (ms since the epoch).
    pub create_time_ms: i64,
}

/// A stored refresh token (by its hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshRow {
    /// SHA-256 (hex) of the token.
    pub token_hash: String,
    /// The login it was rotated from.
    pub family_id: String,
    /// Whose it is.
    pub user_id: String,
    /// When it was issued.
    pub create_time_ms: i64,
    /// When it stops working.
    pub expire_time_ms: i64,
    /// When it was used (and replaced), if it was.
    pub rotate_time_ms: Option<i64>,
    /// When its family was revoked, if it was.
    pub revoke_time_ms: Option<i64>,
}

/// A signing key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    /// Its id, the tokens' `kid`.
    pub kid: String,
    /// `EdDSA` or `ES256`.
    pub alg: String,
    /// The PKCS#8 document, sealed (see [`crate::keys::Sealer`]).
    pub sealed: String,
    /// When it was made.
    pub create_time_ms: i64,
    /// From when it signs.
    pub activate_time_ms: i64,
}

/// The auth service's tables.
#[derive(Debug, Clone)]
pub struct AuthStore(Pool);

fn roles_text(roles: &[String]) -> String {
    roles.join(" ")
}

fn credential<R: Row>(row: &R) -> Result<Credential, sqlx::Error>
where
    for<'r> &'r str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let roles: String = row.try_get("roles")?;
    Ok(Credential {
        user_id: row.try_get("user_id")?,
        email: row.try_get("email")?,
        password_hash: row.try_get("password_hash")?,
        roles: roles.split_whitespace().map(str::to_owned).collect(),
        tenant: row.try_get("tenant")?,
        create_time_ms: row.try_get("create_time_ms")?,
    })
}

fn refresh<R: Row>(row: &R) -> Result<RefreshRow, sqlx::Error>
where
    for<'r> &'r str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(RefreshRow {
        token_hash: row.try_get("token_hash")?,
        family_id: row.try_get("family_id")?,
        user_id: row.try_get("user_id")?,
        create_time_ms: row.try_get("create_time_ms")?,
        expire_time_ms: row.try_get("expire_time_ms")?,
        rotate_time_ms: row.try_get("rotate_time_ms")?,
        revoke_time_ms: row.try_get("revoke_time_ms")?,
    })
}

const CREDENTIAL_BY_EMAIL: &str = "SELECT user_id, email, password_hash, roles, tenant, create_time_ms FROM credentials WHERE email = $1";
const CREDENTIAL_BY_USER: &str = "SELECT user_id, email, password_hash, roles, tenant, create_time_ms FROM credentials WHERE user_id = $1";
const SELECT_REFRESH: &str = "SELECT token_hash, family_id, user_id, create_time_ms, expire_time_ms, rotate_time_ms, revoke_time_ms FROM refresh_tokens WHERE token_hash = $1";
const INSERT_REFRESH: &str = "INSERT INTO refresh_tokens (token_hash, family_id, user_id, create_time_ms, expire_time_ms) VALUES ($1, $2, $3, $4, $5)";

/// How a rotation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// The old token was marked used and the new one stored.
    Rotated,
    /// Someone else used the old token first (or it was revoked meanwhile).
    Lost,
}

impl AuthStore {
    /// Opens the store `settings` name (SQLite at `default_file` when they
    /// name none) and applies migrations.
    pub async fn open(
        settings: &trellis_store::DatabaseSettings,
        default_file: &std::path::Path,
    ) -> Result<AuthStore, StoreError> {
        Ok(AuthStore(
            Pool::open_settings(settings, default_file, &migrator()).await?,
        ))
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.0.close().await
    }

    /// Stores new credentials; [`Failure::Duplicate`] if the email or user
    /// already has some.
    pub async fn insert_credential(&self, c: &Credential) -> Result<(), Failure> {
        with_pool!(&self.0, pool => {
            sqlx::query("INSERT INTO credentials (user_id, email, password_hash, roles, tenant, create_time_ms) VALUES ($1, $2, $3, $4, $5, $6)")
                .bind(&c.user_id)
                .bind(&c.email)
                .bind(&c.password_hash)
                .bind(roles_text(&c.roles))
                .bind(&c.tenant)
                .bind(c.create_time_ms)
                .execute(pool)
                .await
                .map(drop)
                .map_err(Failure::from)
        })
    }

    /// The credentials of `email` (lower-cased), if any.
    pub async fn credential_by_email(&self, email: &str) -> Result<Option<Credential>, Failure> {
        with_pool!(&self.0, pool => {
            let row = sqlx::query(CREDENTIAL_BY_EMAIL).bind(email).fetch_optional(pool).await?;
            Ok(row.map(|r| credential(&r)).transpose()?)
        })
    }

    /// The credentials of `user_id`, if any.
    pub async fn credential_by_user(&self, user_id: &str) -> Result<Option<Credential>, Failure> {
        with_pool!(&self.0, pool => {
            let row = sqlx::query(CREDENTIAL_BY_USER).bind(user_id).fetch_optional(pool).await?;
            Ok(row.map(|r| credential(&r)).transpose()?)
        })
    }

    /// Stores a new refresh token (the first of a family, at login).
    pub async fn insert_refresh(&self, r: &RefreshRow) -> Result<(), Failure> {
        with_pool!(&self.0, pool => {
            sqlx::query(INSERT_REFRESH)
                .bind(&r.token_hash)
                .bind(&r.family_id)
                .bind(&r.user_id)
                .bind(r.create_time_ms)
                .bind(r.expire_time_ms)
                .execute(pool)
                .await
                .map(drop)
                .map_err(Failure::from)
        })
    }

    /// The refresh token whose hash is `token_hash`, if any.
    pub async fn refresh_token(&self, token_hash: &str) -> Result<Option<RefreshRow>, Failure> {
        with_pool!(&self.0, pool => {
            let row = sqlx::query(SELECT_REFRESH).bind(token_hash).fetch_optional(pool).await?;
            Ok(row.map(|r| refresh(&r)).transpose()?)
        })
    }

    /// Marks `old` used at `now` and stores `new` in one transaction — if
    /// `old` is still unused and unrevoked, or (`grace`) was used no
    /// earlier than `used_since`.
    pub async fn rotate(
        &self,
        old: &str,
        new: &RefreshRow,
        now: i64,
        used_since: Option<i64>,
    ) -> Result<Rotation, Failure> {
        with_pool!(&self.0, pool => {
            let mut tx = pool.begin().await?;
            let done = match used_since {
                None => sqlx::query("UPDATE refresh_tokens SET rotate_time_ms = $1 WHERE token_hash = $2 AND rotate_time_ms IS NULL AND revoke_time_ms IS NULL")
                    .bind(now)
                    .bind(old)
                    .execute(&mut *tx)
                    .await?,
                // A retry inside the grace window: the token stays used;
                // the family gets one more live member.
                Some(since) => sqlx::query("UPDATE refresh_tokens SET rotate_time_ms = rotate_time_ms WHERE token_hash = $1 AND rotate_time_ms >= $2 AND revoke_time_ms IS NULL")
                    .bind(old)
                    .bind(since)
                    .execute(&mut *tx)
                    .await?,
            };
            if done.rows_affected() != 1 {
                tx.rollback().await?;
                return Ok(Rotation::Lost);
            }
            sqlx::query(INSERT_REFRESH)
                .bind(&new.token_hash)
                .bind(&new.family_id)
                .bind(&new.user_id)
                .bind(new.create_time_ms)
                .bind(new.expire_time_ms)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Rotation::Rotated)
        })
    }

    /// Revokes every live token of `family_id`; how many it revoked.
    pub async fn revoke_family(&self, family_id: &str, now: i64) -> Result<u64, Failure> {
        with_pool!(&self.0, pool => {
            let done = sqlx::query("UPDATE refresh_tokens SET revoke_time_ms = $1 WHERE family_id = $2 AND revoke_time_ms IS NULL")
                .bind(now)
                .bind(family_id)
                .execute(pool)
                .await?;
            Ok(done.rows_affected())
        })
    }

    /// Deletes refresh tokens that expired before `before`; how many.
    pub async fn purge_refresh(&self, before: i64) -> Result<u64, Failure> {
        with_pool!(&self.0, pool => {
            let done = sqlx::query("DELETE FROM refresh_tokens WHERE expire_time_ms < $1")
                .bind(before)
                .execute(pool)
                .await?;
            Ok(done.rows_affected())
        })
    }

    /// Stores a signing key.
    pub async fn insert_key(&self, k: &StoredKey) -> Result<(), Failure> {
        with_pool!(&self.0, pool => {
            sqlx::query("INSERT INTO signing_keys (kid, alg, sealed, create_time_ms, activate_time_ms) VALUES ($1, $2, $3, $4, $5)")
                .bind(&k.kid)
                .bind(&k.alg)
                .bind(&k.sealed)
                .bind(k.create_time_ms)
                .bind(k.activate_time_ms)
                .execute(pool)
                .await
                .map(drop)
                .map_err(Failure::from)
        })
    }

    /// Every signing key, oldest activation first.
    pub async fn keys(&self) -> Result<Vec<StoredKey>, Failure> {
        with_pool!(&self.0, pool => {
            let rows = sqlx::query("SELECT kid, alg, sealed, create_time_ms, activate_time_ms FROM signing_keys ORDER BY activate_time_ms, kid")
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(StoredKey {
                        kid: r.try_get("kid")?,
                        alg: r.try_get("alg")?,
                        sealed: r.try_get("sealed")?,
                        create_time_ms: r.try_get("create_time_ms")?,
                        activate_time_ms: r.try_get("activate_time_ms")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(Failure::from)
        })
    }

    /// Deletes the signing key `kid` (for operators retiring a
    /// compromised key); whether it existed.
    pub async fn delete_key(&self, kid: &str) -> Result<bool, Failure> {
        with_pool!(&self.0, pool => {
            let done = sqlx::query("DELETE FROM signing_keys WHERE kid = $1").bind(kid).execute(pool).await?;
            Ok(done.rows_affected() > 0)
        })
    }
}
