//! The order history read model: a projection of every service's events
//! about an order (`subject: order/<id>`) into `order_history`, fed by the
//! bus in stream order with its checkpoint in the same transaction
//! ([`trellis_events::projection`]). `trellis events replay order-history`
//! rebuilds it from zero.
//!
//! Each service relays its own outbox, so the stream interleaves their
//! events by relay, not by cause; the history is shown in the order the
//! events happened (their CloudEvents `time`, set in the transaction that
//! emitted them — each checkout step starts after the previous one
//! committed).

use trellis_events::{Stored, projection::Projection};
use trellis_store::{Tx, with_tx};

/// The projection's name (its checkpoint's key).
pub const NAME: &str = "order-history";

/// The order history projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderHistory;

impl Projection for OrderHistory {
    fn name(&self) -> &str {
        NAME
    }

    fn filter(&self) -> &str {
        "events.>"
    }

    async fn apply(&self, tx: &mut Tx, stored: &Stored) -> Result<(), sqlx::Error> {
        // Dead letters are copies of events already recorded.
        if stored.subject.starts_with("events.dlq.") {
            return Ok(());
        }
        let Some(order_id) = stored
            .event
            .subject
            .as_deref()
            .and_then(|s| s.strip_prefix("order/"))
        else {
            return Ok(());
        };
        with_tx!(tx, c => {
            sqlx::query(
                "INSERT INTO order_history (order_id, seq, type, source, time_us) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (order_id, seq) DO NOTHING",
            )
            .bind(order_id)
            .bind(stored.seq as i64)
            .bind(&stored.event.ty)
            .bind(&stored.event.source)
            // When it happened (set in the emitting transaction); the
            // stream's own time when the event has none.
            .bind(stored.event.time_micros().unwrap_or(stored.published_ms.saturating_mul(1000)))
            .execute(&mut **c)
            .await?;
        });
        Ok(())
    }

    async fn reset(&self, tx: &mut Tx) -> Result<(), sqlx::Error> {
        with_tx!(tx, c => {
            sqlx::query("DELETE FROM order_history").execute(&mut **c).await?;
        });
        Ok(())
    }
}
