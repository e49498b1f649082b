//! Notifications: the user service tells users what became of their
//! orders. It consumes the order service's events on a durable consumer
//! (`user-notifications`, subjects `events.order.*`, in order per order:
//! [`trellis_events::Subscription::keyed`]) and records each
//! confirmed or failed order as a notification through the inbox
//! ([`trellis_events::inbox::handle`]): the inbox row and the notification
//! commit together, so an event delivered again — after a lost
//! acknowledgement, a relay that republished past the bus's duplicate
//! window, a restart — is acknowledged without a second notification.
//!
//! The events' data is decoded by the fields read here only (a tolerant
//! reader: the order service may add fields without breaking it); the
//! field numbers are those of `shop.order.v1.OrderConfirmed` and
//! `OrderFailed`, checked against the order service's own messages by
//! this crate's tests.

use std::time::Duration;

use prost::Message;
use trellis_events::{
    Bus, ConsumerSettings, Event,
    inbox::{self, HandleError},
};
use trellis_store::{Pool, Tx, with_pool, with_tx};

/// The durable consumer's name (and the inbox's).
pub const CONSUMER: &str = "user-notifications";

/// What the consumer reads.
pub const SUBJECTS: &str = "events.order.*";

/// The fields of `shop.order.v1.OrderConfirmed` read here.
#[derive(Clone, PartialEq, Message)]
pub struct OrderConfirmed {
    /// The order.
    #[prost(string, tag = "1")]
    pub order_id: String,
    /// Whose order.
    #[prost(string, tag = "2")]
    pub user_id: String,
}

/// The fields of `shop.order.v1.OrderFailed` read here.
#[derive(Clone, PartialEq, Message)]
pub struct OrderFailed {
    /// The order.
    #[prost(string, tag = "1")]
    pub order_id: String,
    /// Why it failed.
    #[prost(string, tag = "2")]
    pub reason: String,
    /// Whose order.
    #[prost(string, tag = "3")]
    pub user_id: String,
}

/// One notification, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The event's id.
    pub id: String,
    /// `order_confirmed` or `order_failed`.
    pub kind: String,
    /// The order.
    pub order_id: String,
    /// What the user is told.
    pub text: String,
    /// When the event happened, ms since the Unix epoch.
    pub create_time_ms: i64,
}

/// The notification `event` makes for its user, if it makes one: `None`
/// for events of other types; an error for data that cannot be read
/// (which can never succeed: dead-lettered).
pub fn notification(event: &Event) -> Result<Option<(String, Notification)>, String> {
    let bad = |e: prost::DecodeError| format!("{}: {e}", event.ty);
    let create_time_ms = event
        .time_micros()
        .map_or_else(trellis_store::now_ms, |us| us.div_euclid(1000));
    let (user_id, kind, order_id, text) = match event.ty.as_str() {
        "shop.order.confirmed.v1" => {
            let e = OrderConfirmed::decode(event.data.as_ref()).map_err(bad)?;
            let text = format!("Your order {} is confirmed.", e.order_id);
            (e.user_id, "order_confirmed", e.order_id, text)
        }
        "shop.order.failed.v1" => {
            let e = OrderFailed::decode(event.data.as_ref()).map_err(bad)?;
            let text = format!(
                "Your order {} could not be completed: {}",
                e.order_id, e.reason
            );
            (e.user_id, "order_failed", e.order_id, text)
        }
        _ => return Ok(None),
    };
    if user_id.is_empty() || order_id.is_empty() {
        return Err(format!("{}: no user or order id", event.ty));
    }
    Ok(Some((
        user_id,
        Notification {
            id: event.id.clone(),
            kind: kind.into(),
            order_id,
            text,
            create_time_ms,
        },
    )))
}

async fn record(tx: &mut Tx, user_id: &str, n: &Notification) -> Result<(), sqlx::Error> {
    with_tx!(tx, c => {
        sqlx::query(
            "INSERT INTO notifications (user_id, id, kind, order_id, text, create_time_ms) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(user_id)
        .bind(&n.id)
        .bind(&n.kind)
        .bind(&n.order_id)
        .bind(&n.text)
        .bind(n.create_time_ms)
        .execute(&mut **c)
        .await?;
    });
    Ok(())
}

/// Consumes the order events into notifications until the task is
/// dropped; the bus or the store failing is logged and retried.
pub async fn run(pool: Pool, bus: Bus) {
    let settings = ConsumerSettings::new(CONSUMER, SUBJECTS);
    loop {
        if let Err(e) = consume(&pool, &bus, &settings).await {
            tracing::warn!(consumer = CONSUMER, error = %e, "notifications: retrying in 1s");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

async fn consume(
    pool: &Pool,
    bus: &Bus,
    settings: &ConsumerSettings,
) -> Result<(), trellis_events::EventsError> {
    // An order's notifications in the order its events happened, even
    // when one of them is retried.
    let mut subscription = bus.subscribe(settings).await?.keyed();
    loop {
        let delivery = subscription.next().await?;
        match notification(&delivery.event) {
            // Placed orders and the like: nothing to tell.
            Ok(None) => delivery.ack().await?,
            Ok(Some((user_id, n))) => {
                inbox::handle(pool, CONSUMER, delivery, |mut tx, _| async move {
                    match record(&mut tx, &user_id, &n).await {
                        Ok(()) => Ok(tx),
                        Err(e) => Err(HandleError::Retry(e.to_string())),
                    }
                })
                .await?;
            }
            Err(why) => delivery.dead_letter(&why).await?,
        }
    }
}

/// `user_id`'s latest `limit` notifications, newest first.
pub async fn list(
    pool: &Pool,
    user_id: &str,
    limit: u32,
) -> Result<Vec<Notification>, trellis::Error> {
    let rows: Vec<(String, String, String, String, i64)> = with_pool!(pool, p => sqlx::query_as(
        "SELECT id, kind, order_id, text, create_time_ms FROM notifications \
         WHERE user_id = $1 ORDER BY create_time_ms DESC, id DESC LIMIT $2",
    )
    .bind(user_id)
    .bind(i64::from(limit))
    .fetch_all(p)
    .await
    .map_err(|e| trellis::Error::unavailable(format!("user store: {e}")))?);
    Ok(rows
        .into_iter()
        .map(|(id, kind, order_id, text, create_time_ms)| Notification {
            id,
            kind,
            order_id,
            text,
            create_time_ms,
        })
        .collect())
}
