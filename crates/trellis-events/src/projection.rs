//! Projections: read models fed by the bus in stream order, each keeping
//! a checkpoint (the last stream sequence it applied) in the same
//! transaction as its rows — so it applies every event exactly once
//! without an inbox, resumes where it stopped, and can be rebuilt from
//! zero by replaying the stream.
//!
//! ```no_run
//! # use trellis_events::{Stored, projection::Projection};
//! # use trellis_store::{Tx, with_tx};
//! struct Counts;
//!
//! impl Projection for Counts {
//!     fn name(&self) -> &str { "counts" }
//!     fn filter(&self) -> &str { "events.order.>" }
//!     async fn apply(&self, tx: &mut Tx, event: &Stored) -> Result<(), sqlx::Error> {
//!         with_tx!(tx, c => {
//!             sqlx::query("INSERT INTO counts (type, n) VALUES ($1, 1) ON CONFLICT (type) DO UPDATE SET n = counts.n + 1")
//!                 .bind(&event.event.ty)
//!                 .execute(&mut **c)
//!                 .await?;
//!         });
//!         Ok(())
//!     }
//!     async fn reset(&self, tx: &mut Tx) -> Result<(), sqlx::Error> {
//!         with_tx!(tx, c => { sqlx::query("DELETE FROM counts").execute(&mut **c).await?; });
//!         Ok(())
//!     }
//! }
//! ```

use std::{future::Future, time::Duration};

use trellis_store::{Pool, Tx, with_pool, with_tx};

use crate::{Bus, EventsError, StartAt, Stored};

/// A read model built from the stream.
pub trait Projection: Send + Sync {
    /// Its name (the checkpoint's key).
    fn name(&self) -> &str;
    /// The subjects it reads.
    fn filter(&self) -> &str;
    /// Applies one event to its rows, in `tx`.
    fn apply(
        &self,
        tx: &mut Tx,
        event: &Stored,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
    /// Deletes all its rows, in `tx` (before a rebuild).
    fn reset(&self, tx: &mut Tx) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
}

fn store(e: sqlx::Error) -> EventsError {
    EventsError::Unavailable(format!("projection store: {e}"))
}

/// The last stream sequence `name` applied (0: none).
pub async fn checkpoint(pool: &Pool, name: &str) -> Result<u64, EventsError> {
    let seq: Option<i64> = with_pool!(pool, p => sqlx::query_scalar("SELECT checkpoint FROM trellis_projections WHERE name = $1")
        .bind(name)
        .fetch_optional(p)
        .await
        .map_err(store)?);
    Ok(seq.unwrap_or(0) as u64)
}

async fn save(tx: &mut Tx, name: &str, seq: u64) -> Result<(), sqlx::Error> {
    with_tx!(tx, c => {
        sqlx::query(
            "INSERT INTO trellis_projections (name, checkpoint) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET checkpoint = excluded.checkpoint",
        )
        .bind(name)
        .bind(seq as i64)
        .execute(&mut **c)
        .await?;
    });
    Ok(())
}

/// Applies what the stream holds past the checkpoint, up to its last
/// sequence now, `batch` events per transaction. How many were applied.
pub async fn catch_up<P: Projection>(
    pool: &Pool,
    bus: &Bus,
    projection: &P,
    batch: usize,
) -> Result<u64, EventsError> {
    let name = projection.name();
    let from = checkpoint(pool, name).await?;
    let last = bus.last_seq().await?;
    if last <= from {
        return Ok(0);
    }
    let mut reader = bus
        .read(projection.filter(), StartAt::Seq(from + 1))
        .await?;
    let mut applied = 0;
    let mut tx = pool.begin().await.map_err(store)?;
    let mut in_tx = 0;
    let mut seq = from;
    while let Some(stored) = reader.next_until(last).await? {
        seq = stored.seq;
        projection.apply(&mut tx, &stored).await.map_err(store)?;
        applied += 1;
        in_tx += 1;
        if in_tx >= batch.max(1) {
            save(&mut tx, name, seq).await.map_err(store)?;
            tx.commit().await.map_err(store)?;
            tx = pool.begin().await.map_err(store)?;
            in_tx = 0;
        }
    }
    // Events up to `last` that the filter skipped are passed too.
    seq = seq.max(last);
    save(&mut tx, name, seq.max(from)).await.map_err(store)?;
    tx.commit().await.map_err(store)?;
    Ok(applied)
}

/// Deletes the projection's rows and applies the whole stream again.
/// How many events were applied.
pub async fn rebuild<P: Projection>(
    pool: &Pool,
    bus: &Bus,
    projection: &P,
) -> Result<u64, EventsError> {
    let mut tx = pool.begin().await.map_err(store)?;
    projection.reset(&mut tx).await.map_err(store)?;
    save(&mut tx, projection.name(), 0).await.map_err(store)?;
    tx.commit().await.map_err(store)?;
    catch_up(pool, bus, projection, 500).await
}

/// Keeps the projection current until `shutdown`: each event applied with
/// its checkpoint in one transaction as it is published. Store or bus
/// failures are retried from the checkpoint.
pub async fn run<P: Projection>(
    pool: &Pool,
    bus: &Bus,
    projection: &P,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(100);
    loop {
        let live = async {
            let from = checkpoint(pool, projection.name()).await?;
            let mut reader = bus
                .read(projection.filter(), StartAt::Seq(from + 1))
                .await?;
            loop {
                let stored = reader.next().await?;
                let mut tx = pool.begin().await.map_err(store)?;
                projection.apply(&mut tx, &stored).await.map_err(store)?;
                save(&mut tx, projection.name(), stored.seq)
                    .await
                    .map_err(store)?;
                tx.commit().await.map_err(store)?;
            }
            #[allow(unreachable_code)]
            Ok::<(), EventsError>(())
        };
        tokio::select! {
            _ = &mut shutdown => return,
            result = live => {
                if let Err(e) = result {
                    tracing::warn!(projection = projection.name(), error = %e, "projection stopped; resuming from its checkpoint");
                }
            }
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
