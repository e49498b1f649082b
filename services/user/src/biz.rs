//! The rules of user accounts: what a valid user is, how pages work, and how
//! concurrent updates are kept from overwriting each other.

use std::future::Future;

use trellis::{Code, Error};

/// A stored user.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct User {
    /// UUIDv7, so ids sort by creation time.
    pub id: String,
    /// Lower-cased, unique.
    pub email: String,
    /// 1 to 100 characters.
    pub display_name: String,
    /// Creation time, ms since the Unix epoch.
    pub create_time_ms: i64,
    /// Last change, ms since the Unix epoch; also the optimistic-lock version.
    pub update_time_ms: i64,
}

/// What a repository can fail with; [`Users`] turns these into API errors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RepoError {
    /// A unique constraint (the email) was violated.
    #[error("duplicate key")]
    Duplicate,
    /// The store could not be reached in time; the caller may retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Anything else.
    #[error("store error: {0}")]
    Other(String),
}

/// How an update ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// The row was written.
    Updated,
    /// The row changed since it was read.
    Stale,
}

/// Persistence of users. Implemented over sqlx in [`crate::data`].
pub trait UserRepo: Send + Sync + 'static {
    /// Inserts a new user; [`RepoError::Duplicate`] if the email is taken.
    fn insert(&self, user: &User) -> impl Future<Output = Result<(), RepoError>> + Send;
    /// One user by id.
    fn get(&self, id: &str) -> impl Future<Output = Result<Option<User>, RepoError>> + Send;
    /// Up to `limit` users with ids greater than `after`, in id order.
    fn list(
        &self,
        after: &str,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<User>, RepoError>> + Send;
    /// Writes `user` if its stored `update_time_ms` is still `expected`.
    fn update(
        &self,
        user: &User,
        expected: i64,
    ) -> impl Future<Output = Result<UpdateOutcome, RepoError>> + Send;
    /// Deletes a user; whether it existed.
    fn delete(&self, id: &str) -> impl Future<Output = Result<bool, RepoError>> + Send;
}

/// The fields a client may change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserChanges {
    /// A new email, if it is to change.
    pub email: Option<String>,
    /// A new display name, if it is to change.
    pub display_name: Option<String>,
}

/// A page of users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The users, in creation order.
    pub users: Vec<User>,
    /// The token for the next page; empty on the last page.
    pub next_page_token: String,
}

/// Default and largest page sizes (AIP-158: larger requests are coerced).
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// The largest page a client gets, whatever it asks for.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// The user use cases over a repository.
#[derive(Debug, Clone)]
pub struct Users<R> {
    repo: R,
}

impl<R: UserRepo> Users<R> {
    /// Use cases over `repo`.
    pub fn new(repo: R) -> Self {
        Users { repo }
    }

    /// Creates a user after validating and normalising its fields.
    pub async fn create(&self, email: &str, display_name: &str) -> Result<User, Error> {
        let now = trellis_store::now_ms();
        let user = User {
            id: uuid::Uuid::now_v7().to_string(),
            email: validate_email(email)?,
            display_name: validate_display_name(display_name)?,
            create_time_ms: now,
            update_time_ms: now,
        };
        self.repo
            .insert(&user)
            .await
            .map_err(|e| store_error(e, &user.email))?;
        Ok(user)
    }

    /// One user by id.
    pub async fn get(&self, id: &str) -> Result<User, Error> {
        let id = validate_id(id)?;
        self.repo
            .get(&id)
            .await
            .map_err(|e| store_error(e, ""))?
            .ok_or_else(|| not_found(&id))
    }

    /// A page of users; `page_token` is the previous page's `next_page_token`.
    pub async fn list(&self, page_size: i32, page_token: &str) -> Result<Page, Error> {
        let size = match page_size {
            n if n < 0 => {
                return Err(Error::invalid_argument(
                    "page_size",
                    "page_size must not be negative",
                ));
            }
            0 => DEFAULT_PAGE_SIZE,
            n => (n as u32).min(MAX_PAGE_SIZE),
        };
        let after = if page_token.is_empty() {
            String::new()
        } else {
            uuid::Uuid::parse_str(page_token)
                .map_err(|_| {
                    Error::invalid_argument(
                        "page_token",
                        "page_token is not one this service issued",
                    )
                })?
                .to_string()
        };
        // One extra row tells whether another page exists.
        let mut users = self
            .repo
            .list(&after, size + 1)
            .await
            .map_err(|e| store_error(e, ""))?;
        let next_page_token = if users.len() > size as usize {
            users.truncate(size as usize);
            users.last().map(|u| u.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Page {
            users,
            next_page_token,
        })
    }

    /// Applies `changes` to the user `id`. Fails with ABORTED if another
    /// update landed between our read and our write.
    pub async fn update(&self, id: &str, changes: UserChanges) -> Result<User, Error> {
        let current = self.get(id).await?;
        let mut next = current.clone();
        if let Some(email) = &changes.email {
            next.email = validate_email(email)?;
        }
        if let Some(name) = &changes.display_name {
            next.display_name = validate_display_name(name)?;
        }
        if next == current {
            return Ok(current);
        }
        next.update_time_ms = trellis_store::now_ms().max(current.update_time_ms + 1);
        match self
            .repo
            .update(&next, current.update_time_ms)
            .await
            .map_err(|e| store_error(e, &next.email))?
        {
            UpdateOutcome::Updated => Ok(next),
            UpdateOutcome::Stale => Err(Error::new(
                Code::Aborted,
                "CONCURRENT_UPDATE",
                format!(
                    "user {} changed while this update was applied; read it again and retry",
                    current.id
                ),
            )),
        }
    }

    /// Deletes the user `id`.
    pub async fn delete(&self, id: &str) -> Result<(), Error> {
        let id = validate_id(id)?;
        if self
            .repo
            .delete(&id)
            .await
            .map_err(|e| store_error(e, ""))?
        {
            Ok(())
        } else {
            Err(not_found(&id))
        }
    }
}

fn not_found(id: &str) -> Error {
    Error::not_found("USER_NOT_FOUND", format!("no user with id {id}")).with_metadata("id", id)
}

fn store_error(err: RepoError, email: &str) -> Error {
    match err {
        RepoError::Duplicate => Error::already_exists(
            "EMAIL_TAKEN",
            format!("a user with email {email} already exists"),
        )
        .with_metadata("field", "email"),
        RepoError::Unavailable(detail) => {
            tracing::warn!(error = %detail, "user store unavailable");
            Error::unavailable("the user store is unavailable; retry later")
                .with_retry_after(std::time::Duration::from_secs(1))
        }
        RepoError::Other(detail) => {
            tracing::error!(error = %detail, "user store error");
            Error::internal("the user store failed")
        }
    }
}

/// A user id must be a UUID; returns its canonical form.
pub fn validate_id(id: &str) -> Result<String, Error> {
    if id.is_empty() {
        return Err(Error::invalid_argument("id", "id is required"));
    }
    uuid::Uuid::parse_str(id)
        .map(|u| u.to_string())
        .map_err(|_| {
            Error::invalid_argument(
                "id",
                format!("id {} is not a valid user id", trellis::core::excerpt(id)),
            )
        })
}

/// Trims and lower-cases an email and checks its shape (not deliverability).
pub fn validate_email(email: &str) -> Result<String, Error> {
    let email = email.trim().to_lowercase();
    let bad = |why: &str| Err(Error::invalid_argument("email", format!("email {why}")));
    if email.is_empty() {
        return bad("is required");
    }
    if email.len() > 254 {
        return bad("must be at most 254 characters");
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("must not contain spaces");
    }
    match email.split_once('@') {
        Some((local, domain))
            if !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.') =>
        {
            Ok(email)
        }
        _ => bad("must look like name@example.com"),
    }
}

/// Trims a display name and checks it has 1 to 100 printable characters.
pub fn validate_display_name(name: &str) -> Result<String, Error> {
    let name = name.trim();
    let len = name.chars().count();
    if len == 0 {
        return Err(Error::invalid_argument(
            "display_name",
            "display_name is required",
        ));
    }
    if len > 100 {
        return Err(Error::invalid_argument(
            "display_name",
            "display_name must be at most 100 characters",
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::invalid_argument(
            "display_name",
            "display_name must not contain control characters",
        ));
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn emails() {
        assert_eq!(
            validate_email("  Ada@Example.COM ").unwrap(),
            "ada@example.com"
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a b@example.com",
            "a@b@example.com",
            "ada@.com",
        ] {
            let err = validate_email(bad).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
            assert_eq!(err.metadata()["field"], "email");
        }
    }

    #[test]
    fn display_names() {
        assert_eq!(validate_display_name(" Ada ").unwrap(), "Ada");
        assert!(validate_display_name("   ").is_err());
        assert!(validate_display_name(&"x".repeat(101)).is_err());
        assert!(
            validate_display_name(&"é".repeat(100)).is_ok(),
            "length counts characters, not bytes"
        );
        assert!(validate_display_name("a\u{0}b").is_err());
    }

    proptest! {
        #[test]
        fn valid_emails_are_normalised_idempotently(s in "[A-Za-z0-9._%+-]{1,20}@[A-Za-z0-9-]{1,20}\\.[A-Za-z]{2,6}") {
            let once = validate_email(&s).unwrap();
            prop_assert_eq!(validate_email(&once).unwrap(), once.clone());
            prop_assert_eq!(once, s.to_lowercase());
        }

        #[test]
        fn validation_never_panics(s in any::<String>()) {
            let _ = validate_email(&s);
            let _ = validate_display_name(&s);
            let _ = validate_id(&s);
        }
    }
}
