//! Waiting for state that lives in another process (an order's status, a
//! saga's end): asking is the only way to observe it, so [`eventually`]
//! asks every 20 ms until it holds or the deadline passes — and then fails
//! the test naming what it waited for and the last thing it saw. Within
//! one process, wait on the event itself instead.

use std::{fmt::Display, future::Future, time::Duration};

/// How often [`eventually`] and [`crate::http::poll_until`] ask.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Runs `probe` until it returns `Ok`, for up to `within`; its value.
/// Panics with `what` and the last `Err` when the deadline passes first.
pub async fn eventually<T, E, F, Fut>(within: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Display,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let last = match probe().await {
            Ok(value) => return value,
            Err(e) => e,
        };
        let now = tokio::time::Instant::now();
        assert!(
            now < deadline,
            "{what}: not within {within:?}; last seen: {last}"
        );
        tokio::time::sleep_until((now + POLL_INTERVAL).min(deadline)).await;
    }
}
