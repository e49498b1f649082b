//! A settings type and helpers shared by the config tests.

#![allow(dead_code)]

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use trellis_config::{Invalid, Secret, Snapshot, Validate};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub name: String,
    #[serde(with = "trellis_config::duration")]
    pub timeout: Duration,
    pub workers: u32,
    pub db: Db,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Db {
    pub url: Secret<String>,
    pub pool: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            name: "default".into(),
            timeout: Duration::from_secs(5),
            workers: 4,
            db: Db::default(),
        }
    }
}

impl Default for Db {
    fn default() -> Self {
        Db {
            url: Secret::new("sqlite://x".into()),
            pool: 8,
        }
    }
}

impl Validate for Settings {
    fn validate(&self) -> Result<(), Invalid> {
        if self.workers == 0 {
            return Err(Invalid::new("workers", "must be at least 1"));
        }
        if !(1..=100).contains(&self.db.pool) {
            return Err(Invalid::new("db.pool", "must be between 1 and 100"));
        }
        Ok(())
    }
}

/// Counts the snapshots published on `rx` from now on.
pub fn count_reloads(
    mut rx: watch::Receiver<Arc<Snapshot<Settings>>>,
) -> Arc<std::sync::atomic::AtomicUsize> {
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = count.clone();
    rx.borrow_and_update();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    count
}

pub fn reloads(count: &Arc<std::sync::atomic::AtomicUsize>) -> usize {
    count.load(std::sync::atomic::Ordering::SeqCst)
}

/// Waits until `f` holds, polling.
pub async fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}
