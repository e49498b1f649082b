//! Orders in SQLite or PostgreSQL, with the saga barrier's table beside
//! them.

use prost::Message;
use sqlx::Row;
use trellis::Error;
use trellis_events::outbox;
use trellis_store::{Pool, StoreError, Tx, with_pool, with_tx};

use crate::api::v1::{OrderConfirmed, OrderFailed, OrderLine, OrderPlaced};

/// The order service's events (docs/events.md#in-the-shop).
pub const EVENTS: outbox::Emitter = outbox::Emitter {
    source: "/shop/order",
    subjects: "events.order",
    types: "shop.order",
    package: "shop.order.v1",
    aggregate: "order/",
};

use crate::biz::{Line, Order, Status};

fn migrator() -> sqlx::migrate::Migrator {
    trellis_store::migrator(
        "_order_migrations",
        &[
            (
                1,
                "orders",
                "CREATE TABLE orders (
                    id               TEXT PRIMARY KEY,
                    user_id          TEXT NOT NULL,
                    status           TEXT NOT NULL,
                    lines            TEXT NOT NULL,
                    total_cents      BIGINT NOT NULL,
                    failure_reason   TEXT NOT NULL,
                    saga_submitted   BIGINT NOT NULL,
                    create_time_ms   BIGINT NOT NULL,
                    update_time_ms   BIGINT NOT NULL
                );
                CREATE INDEX orders_by_user ON orders (user_id, create_time_ms);
                CREATE INDEX orders_unsubmitted ON orders (saga_submitted, create_time_ms);",
            ),
            (
                2,
                "order history",
                "CREATE TABLE order_history (
                    order_id  TEXT NOT NULL,
                    seq       BIGINT NOT NULL,
                    type      TEXT NOT NULL,
                    source    TEXT NOT NULL,
                    time_us   BIGINT NOT NULL,
                    PRIMARY KEY (order_id, seq)
                );",
            ),
            trellis_saga::barrier::MIGRATION,
            trellis_lock::fence::MIGRATION,
        ],
    )
}

fn unavailable(e: sqlx::Error) -> Error {
    Error::unavailable(format!("order store: {e}"))
}

const COLUMNS: &str =
    "id, user_id, status, lines, total_cents, failure_reason, create_time_ms, update_time_ms";

fn order_from_row<R: Row>(row: &R) -> Result<Order, Error>
where
    for<'r> &'r str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let get_s = |c: &str| row.try_get::<String, _>(c).map_err(unavailable);
    let get_i = |c: &str| row.try_get::<i64, _>(c).map_err(unavailable);
    let id = get_s("id")?;
    let lines: Vec<Line> = serde_json::from_str(&get_s("lines")?)
        .map_err(|e| Error::internal(format!("order {id}: unreadable lines: {e}")))?;
    let status = get_s("status")?;
    Ok(Order {
        status: Status::parse(&status)
            .ok_or_else(|| Error::internal(format!("order {id}: unknown status {status:?}")))?,
        user_id: get_s("user_id")?,
        lines,
        total_cents: get_i("total_cents")?,
        failure_reason: get_s("failure_reason")?,
        create_time_ms: get_i("create_time_ms")?,
        update_time_ms: get_i("update_time_ms")?,
        id,
    })
}

/// The order store.
#[derive(Debug, Clone)]
pub struct Orders {
    pool: Pool,
}

impl Orders {
    /// Opens (and migrates) the store.
    pub async fn open(
        settings: &trellis_store::DatabaseSettings,
        default_file: &std::path::Path,
    ) -> Result<Orders, StoreError> {
        Ok(Orders {
            pool: outbox::open_store(settings, default_file, &migrator()).await?,
        })
    }

    /// The pool (branch handlers run their barrier on it).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Records a new order, its saga not yet submitted, and its
    /// `events.order.placed` event in the same transaction.
    pub async fn insert(&self, order: &Order) -> Result<(), Error> {
        let lines = serde_json::to_string(&order.lines)
            .map_err(|e| Error::internal(format!("order lines: {e}")))?;
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        with_tx!(&mut tx, c => sqlx::query("INSERT INTO orders (id, user_id, status, lines, total_cents, failure_reason, saga_submitted, create_time_ms, update_time_ms) VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8)")
            .bind(&order.id)
            .bind(&order.user_id)
            .bind(order.status.as_str())
            .bind(&lines)
            .bind(order.total_cents)
            .bind(&order.failure_reason)
            .bind(order.create_time_ms)
            .bind(order.update_time_ms)
            .execute(&mut **c)
            .await
            .map(drop)
            .map_err(unavailable))?;
        let placed = OrderPlaced {
            order_id: order.id.clone(),
            user_id: order.user_id.clone(),
            lines: order
                .lines
                .iter()
                .map(|l| OrderLine {
                    sku: l.sku.clone(),
                    quantity: i32::try_from(l.quantity).unwrap_or(i32::MAX),
                    price_cents: l.price_cents,
                })
                .collect(),
            total_cents: order.total_cents,
        };
        EVENTS
            .emit(
                &mut tx,
                "placed",
                "OrderPlaced",
                &order.id,
                placed.encode_to_vec(),
            )
            .await?;
        tx.commit().await.map_err(unavailable)
    }

    /// An order's history (the projection's rows: stream sequence, type,
    /// source, time in µs), in the order the events happened.
    pub async fn history(&self, id: &str) -> Result<Vec<(u64, String, String, i64)>, Error> {
        let rows: Vec<(i64, String, String, i64)> = with_pool!(&self.pool, p => sqlx::query_as(
            "SELECT seq, type, source, time_us FROM order_history WHERE order_id = $1 ORDER BY time_us, seq LIMIT 1000"
        )
        .bind(id)
        .fetch_all(p)
        .await
        .map_err(unavailable)?);
        Ok(rows
            .into_iter()
            .map(|(seq, ty, source, time)| (seq as u64, ty, source, time))
            .collect())
    }

    /// Notes that the order's saga is in the coordinator's log.
    pub async fn submitted(&self, id: &str) -> Result<(), Error> {
        with_pool!(&self.pool, p => sqlx::query("UPDATE orders SET saga_submitted = 1 WHERE id = $1")
            .bind(id)
            .execute(p)
            .await
            .map(drop)
            .map_err(unavailable))
    }

    /// [`submitted`](Self::submitted) by the holder of the lock `resource`
    /// with fencing `token`: refused (ABORTED, reason LOCK_LOST) when a
    /// later holder has written, so a sweeper that was paused past its
    /// lease cannot act on what it read before.
    pub async fn submitted_fenced(
        &self,
        id: &str,
        resource: &str,
        token: u64,
    ) -> Result<(), Error> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        trellis_lock::fence::check(&mut tx, resource, token)
            .await
            .map_err(|e| match e {
                trellis_lock::fence::FenceError::Stale { .. } => {
                    Error::new(trellis::Code::Aborted, "LOCK_LOST", e.to_string())
                }
                other => Error::unavailable(format!("order store: {other}")),
            })?;
        with_tx!(&mut tx, c => sqlx::query("UPDATE orders SET saga_submitted = 1 WHERE id = $1")
            .bind(id)
            .execute(&mut **c)
            .await
            .map(drop)
            .map_err(unavailable))?;
        tx.commit().await.map_err(unavailable)
    }

    /// Orders placed before `before_ms` whose saga was not yet submitted
    /// (the coordinator was unreachable), at most `limit`.
    pub async fn unsubmitted(&self, before_ms: i64, limit: i64) -> Result<Vec<Order>, Error> {
        let select = format!(
            "SELECT {COLUMNS} FROM orders WHERE saga_submitted = 0 AND create_time_ms < $1 ORDER BY create_time_ms LIMIT $2"
        );
        with_pool!(&self.pool, p => sqlx::query(sqlx::AssertSqlSafe(select.as_str()))
            .bind(before_ms)
            .bind(limit)
            .fetch_all(p)
            .await
            .map_err(unavailable)?
            .iter()
            .map(order_from_row)
            .collect())
    }

    /// One order.
    pub async fn get(&self, id: &str) -> Result<Option<Order>, Error> {
        let select = format!("SELECT {COLUMNS} FROM orders WHERE id = $1");
        with_pool!(&self.pool, p => sqlx::query(sqlx::AssertSqlSafe(select.as_str()))
            .bind(id)
            .fetch_optional(p)
            .await
            .map_err(unavailable)?
            .map(|r| order_from_row(&r))
            .transpose())
    }

    /// A user's orders, newest first.
    pub async fn list(&self, user_id: &str, limit: i64) -> Result<Vec<Order>, Error> {
        let select = format!(
            "SELECT {COLUMNS} FROM orders WHERE user_id = $1 ORDER BY create_time_ms DESC, id DESC LIMIT $2"
        );
        with_pool!(&self.pool, p => sqlx::query(sqlx::AssertSqlSafe(select.as_str()))
            .bind(user_id)
            .bind(limit)
            .fetch_all(p)
            .await
            .map_err(unavailable)?
            .iter()
            .map(order_from_row)
            .collect())
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await
    }
}

/// PENDING → CONFIRMED, in the branch's transaction (with its event).
pub async fn confirm(tx: &mut Tx, id: &str) -> Result<(), Error> {
    let changed: Option<String> = with_tx!(tx, c => sqlx::query_scalar("UPDATE orders SET status = 'confirmed', update_time_ms = $1 WHERE id = $2 AND status = 'pending' RETURNING user_id")
        .bind(trellis_store::now_ms())
        .bind(id)
        .fetch_optional(&mut **c)
        .await
        .map_err(unavailable)?);
    let Some(user_id) = changed else {
        return Ok(());
    };
    let event = OrderConfirmed {
        order_id: id.to_owned(),
        user_id,
    };
    EVENTS
        .emit(tx, "confirmed", "OrderConfirmed", id, event.encode_to_vec())
        .await?;
    Ok(())
}

/// → FAILED with `reason`, in the branch's transaction (the first reason
/// stays; with its event).
pub async fn fail(tx: &mut Tx, id: &str, reason: &str) -> Result<(), Error> {
    let changed: Option<String> = with_tx!(tx, c => sqlx::query_scalar("UPDATE orders SET status = 'failed', failure_reason = $1, update_time_ms = $2 WHERE id = $3 AND status <> 'failed' RETURNING user_id")
        .bind(reason)
        .bind(trellis_store::now_ms())
        .bind(id)
        .fetch_optional(&mut **c)
        .await
        .map_err(unavailable)?);
    let Some(user_id) = changed else {
        return Ok(());
    };
    let event = OrderFailed {
        order_id: id.to_owned(),
        reason: reason.to_owned(),
        user_id,
    };
    EVENTS
        .emit(tx, "failed", "OrderFailed", id, event.encode_to_vec())
        .await?;
    Ok(())
}
