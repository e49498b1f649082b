//! The user repository behind the two-level cache: reads by id go through
//! `trellis_cache` (local, then Redis, then the database — one load per id
//! however many ask), and every write drops the id everywhere once it has
//! committed.
//!
//! A stale entry cannot lose an update: updates are conditional on the
//! version read (`update_time_ms`), so one made from a stale read is
//! refused (ABORTED) and drops the entry, and the retry reads afresh.

use trellis_cache::Cache;

use crate::biz::{RepoError, UpdateOutcome, User, UserRepo};

/// `R` with its reads by id cached (no cache: `R` alone).
#[derive(Clone)]
pub struct CachedRepo<R> {
    inner: R,
    cache: Option<Cache<User>>,
}

impl<R> std::fmt::Debug for CachedRepo<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedRepo")
            .field("cached", &self.cache.is_some())
            .finish()
    }
}

impl<R: UserRepo> CachedRepo<R> {
    /// `inner`, its reads through `cache` when there is one.
    pub fn new(inner: R, cache: Option<Cache<User>>) -> Self {
        CachedRepo { inner, cache }
    }

    async fn forget(&self, id: &str) {
        if let Some(cache) = &self.cache {
            cache.invalidate(id).await;
        }
    }
}

impl<R: UserRepo> UserRepo for CachedRepo<R> {
    async fn insert(&self, user: &User) -> Result<(), RepoError> {
        self.inner.insert(user).await?;
        // The id may be remembered as missing.
        self.forget(&user.id).await;
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<User>, RepoError> {
        match &self.cache {
            Some(cache) => Ok(cache
                .get_or_load(id, || self.inner.get(id))
                .await?
                .map(|user| User::clone(&user))),
            None => self.inner.get(id).await,
        }
    }

    async fn list(&self, after: &str, limit: u32) -> Result<Vec<User>, RepoError> {
        self.inner.list(after, limit).await
    }

    async fn update(&self, user: &User, expected: i64) -> Result<UpdateOutcome, RepoError> {
        let outcome = self.inner.update(user, expected).await?;
        // Updated, or refused because what was read is stale: either way
        // the cached copy is not the row.
        self.forget(&user.id).await;
        Ok(outcome)
    }

    async fn delete(&self, id: &str) -> Result<bool, RepoError> {
        let existed = self.inner.delete(id).await?;
        self.forget(id).await;
        Ok(existed)
    }
}
