//! The inbox: a consumer records each event id it handled in the same
//! transaction as the handler's effect, so a redelivered event (the bus
//! delivers at least once) finds its id and has no second effect.
//!
//! [`handle`] does the whole round: begin, record, run the handler in the
//! transaction, commit, acknowledge — or roll back and retry, or
//! dead-letter what can never succeed. The tables come with
//! [`migrate`](crate::migrate).
//!
//! ```no_run
//! # async fn run(pool: trellis_store::Pool, mut sub: trellis_events::Subscription) -> Result<(), Box<dyn std::error::Error>> {
//! use trellis_events::inbox::{self, HandleError};
//! use trellis_store::with_tx;
//!
//! loop {
//!     let delivery = sub.next().await?;
//!     inbox::handle(&pool, "mailer", delivery, |mut tx, event| async move {
//!         with_tx!(&mut tx, c => {
//!             sqlx::query("INSERT INTO mails (event_id) VALUES ($1)")
//!                 .bind(&event.id)
//!                 .execute(&mut **c)
//!                 .await
//!                 .map_err(|e| HandleError::Retry(e.to_string()))?;
//!         });
//!         Ok(tx)
//!     })
//!     .await?;
//! }
//! # }
//! ```

use std::{future::Future, time::Duration};

use trellis_store::{Pool, Tx, with_pool, with_tx};

use crate::{Delivery, Event, EventsError, event::now_ms};

/// Records that `consumer` handled `event_id`, in `tx`. False when it
/// already had: the caller skips its effect.
pub async fn first(tx: &mut Tx, consumer: &str, event_id: &str) -> Result<bool, sqlx::Error> {
    let inserted = with_tx!(tx, c => sqlx::query(
        "INSERT INTO trellis_inbox (consumer, event_id, handled_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (consumer, event_id) DO NOTHING",
    )
    .bind(consumer)
    .bind(event_id)
    .bind(now_ms())
    .execute(&mut **c)
    .await?
    .rows_affected());
    Ok(inserted == 1)
}

/// Forgets ids handled more than `older_than` ago (keep it longer than
/// the bus can redeliver: its `max_age`). How many were dropped.
pub async fn purge(pool: &Pool, older_than: Duration) -> Result<u64, sqlx::Error> {
    let cutoff = now_ms().saturating_sub(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX));
    let n = with_pool!(pool, p => sqlx::query("DELETE FROM trellis_inbox WHERE handled_ms < $1")
        .bind(cutoff)
        .execute(p)
        .await?
        .rows_affected());
    Ok(n)
}

/// Why a handler did not commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandleError {
    /// Try again later (the consumer's backoff; dead-lettered after its
    /// last attempt).
    Retry(String),
    /// It can never succeed: dead-letter it now.
    Reject(String),
}

/// What [`handle`] did with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// The handler ran and committed; acknowledged.
    Done,
    /// The inbox had it: acknowledged without running the handler.
    Duplicate,
    /// Rolled back; it will be delivered again.
    Retrying,
    /// Rolled back and sent to the dead-letter subject.
    DeadLettered,
}

/// Runs `handler` for `delivery` exactly once in effect: in one
/// transaction on `pool`, the inbox row for (`consumer`, event id) and the
/// handler's writes; then the acknowledgement. A duplicate is acknowledged
/// without running the handler. Errors are the store's or the bus's (the
/// delivery is then redelivered after `ack_wait`).
pub async fn handle<F, Fut>(
    pool: &Pool,
    consumer: &str,
    delivery: Delivery,
    handler: F,
) -> Result<Handled, EventsError>
where
    F: FnOnce(Tx, Event) -> Fut,
    Fut: Future<Output = Result<Tx, HandleError>>,
{
    let store = |e: sqlx::Error| EventsError::Unavailable(format!("inbox: {e}"));
    let mut tx = pool.begin().await.map_err(store)?;
    if !first(&mut tx, consumer, &delivery.event.id)
        .await
        .map_err(store)?
    {
        tx.rollback().await.map_err(store)?;
        delivery.ack().await?;
        metrics::counter!("inbox_duplicates_total", "consumer" => consumer.to_owned()).increment(1);
        return Ok(Handled::Duplicate);
    }
    match handler(tx, delivery.event.clone()).await {
        Ok(tx) => {
            tx.commit().await.map_err(store)?;
            delivery.ack().await?;
            Ok(Handled::Done)
        }
        Err(HandleError::Retry(reason)) => {
            tracing::debug!(consumer, seq = delivery.seq, reason, "handler will retry");
            let last = delivery.delivered >= delivery.max_deliver();
            delivery.retry(&reason).await?;
            Ok(if last {
                Handled::DeadLettered
            } else {
                Handled::Retrying
            })
        }
        Err(HandleError::Reject(reason)) => {
            delivery.dead_letter(&reason).await?;
            Ok(Handled::DeadLettered)
        }
    }
}
