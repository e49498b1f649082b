//! Products, stock and reservations in SQLite or PostgreSQL (see
//! `trellis_store`), with the saga barrier's table beside them.
//!
//! Stock moves only inside a branch's barrier transaction: `reserve` takes
//! units out of `products.stock` and records them per order; `release`
//! puts an order's units back; `commit` makes them final. So at any moment
//! the initial stock of a product equals its stock plus the quantities of
//! its reservations that are `reserved` or `committed`.

use prost::Message;
use sqlx::Row;
use trellis::{Code, Error};
use trellis_events::outbox;
use trellis_store::{Pool, StoreError, Tx, with_pool, with_tx};

use crate::api::v1::{StockCommitted, StockReleased, StockReserved};

/// The inventory service's events (docs/events.md#in-the-shop).
pub const EVENTS: outbox::Emitter = outbox::Emitter {
    source: "/shop/inventory",
    subjects: "events.inventory",
    types: "shop.inventory",
    package: "shop.inventory.v1",
    aggregate: "order/",
};

use crate::biz::{Line, Product};

fn migrator() -> sqlx::migrate::Migrator {
    trellis_store::migrator(
        "_inventory_migrations",
        &[
            (
                1,
                "products and reservations",
                "CREATE TABLE products (
                    sku          TEXT PRIMARY KEY,
                    name         TEXT NOT NULL,
                    price_cents  BIGINT NOT NULL CHECK (price_cents >= 0),
                    stock        BIGINT NOT NULL CHECK (stock >= 0)
                );
                CREATE TABLE reservations (
                    order_id  TEXT NOT NULL,
                    sku       TEXT NOT NULL,
                    quantity  BIGINT NOT NULL,
                    state     TEXT NOT NULL,
                    PRIMARY KEY (order_id, sku)
                );",
            ),
            trellis_saga::barrier::MIGRATION,
        ],
    )
}

/// The inventory's store.
#[derive(Debug, Clone)]
pub struct Inventory {
    pool: Pool,
}

fn unavailable(e: sqlx::Error) -> Error {
    Error::unavailable(format!("inventory store: {e}"))
}

fn product_from_row<R: Row>(row: &R) -> Result<Product, sqlx::Error>
where
    for<'r> &'r str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Product {
        sku: row.try_get("sku")?,
        name: row.try_get("name")?,
        price_cents: row.try_get("price_cents")?,
        stock: row.try_get("stock")?,
    })
}

impl Inventory {
    /// Opens (and migrates) the store.
    pub async fn open(
        settings: &trellis_store::DatabaseSettings,
        default_file: &std::path::Path,
    ) -> Result<Inventory, StoreError> {
        Ok(Inventory {
            pool: outbox::open_store(settings, default_file, &migrator()).await?,
        })
    }

    /// The pool (branch handlers run their barrier on it).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Adds `products` when there are none yet (a new shop's catalogue).
    pub async fn seed(&self, products: &[Product]) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let count: i64 = with_tx!(&mut tx, c => sqlx::query_scalar("SELECT COUNT(*) FROM products")
            .fetch_one(&mut **c)
            .await?);
        if count == 0 {
            for p in products {
                with_tx!(&mut tx, c => sqlx::query("INSERT INTO products (sku, name, price_cents, stock) VALUES ($1, $2, $3, $4)")
                    .bind(&p.sku)
                    .bind(&p.name)
                    .bind(p.price_cents)
                    .bind(p.stock)
                    .execute(&mut **c)
                    .await
                    .map(drop)?);
            }
        }
        tx.commit().await
    }

    /// Products by SKU: those in `skus`, or all (at most 1000).
    pub async fn list(&self, skus: &[String]) -> Result<Vec<Product>, Error> {
        let mut out = Vec::new();
        if skus.is_empty() {
            let rows = with_pool!(&self.pool, p => sqlx::query("SELECT sku, name, price_cents, stock FROM products ORDER BY sku LIMIT 1000")
                .fetch_all(p)
                .await
                .map_err(unavailable)?
                .iter()
                .map(product_from_row)
                .collect::<Result<Vec<_>, _>>());
            return rows.map_err(unavailable);
        }
        for sku in skus {
            if let Some(p) = self.get(sku).await? {
                out.push(p);
            }
        }
        out.sort_by(|a, b| a.sku.cmp(&b.sku));
        Ok(out)
    }

    /// One product.
    pub async fn get(&self, sku: &str) -> Result<Option<Product>, Error> {
        let row = with_pool!(&self.pool, p => sqlx::query("SELECT sku, name, price_cents, stock FROM products WHERE sku = $1")
            .bind(sku)
            .fetch_optional(p)
            .await
            .map_err(unavailable)?
            .map(|r| product_from_row(&r))
            .transpose());
        row.map_err(unavailable)
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await
    }
}

/// Takes `lines` out of stock for `order_id`, in the branch's transaction;
/// FAILED_PRECONDITION (the saga's definite failure) when a product is
/// unknown or short — the transaction then rolls back whole.
pub async fn reserve(tx: &mut Tx, order_id: &str, lines: &[Line]) -> Result<(), Error> {
    for line in lines {
        let taken = with_tx!(tx, c => sqlx::query("UPDATE products SET stock = stock - $1 WHERE sku = $2 AND stock >= $3")
            .bind(line.quantity)
            .bind(&line.sku)
            .bind(line.quantity)
            .execute(&mut **c)
            .await
            .map_err(unavailable)?
            .rows_affected());
        if taken != 1 {
            let exists: Option<i64> = with_tx!(tx, c => sqlx::query_scalar("SELECT stock FROM products WHERE sku = $1")
                .bind(&line.sku)
                .fetch_optional(&mut **c)
                .await
                .map_err(unavailable)?);
            return Err(match exists {
                None => Error::new(
                    Code::FailedPrecondition,
                    "PRODUCT_NOT_FOUND",
                    format!("no product {}", line.sku),
                ),
                Some(stock) => Error::new(
                    Code::FailedPrecondition,
                    "INSUFFICIENT_STOCK",
                    format!(
                        "insufficient stock for {}: {} wanted, {stock} available",
                        line.sku, line.quantity
                    ),
                ),
            }
            .with_metadata("sku", line.sku.clone()));
        }
        with_tx!(tx, c => sqlx::query("INSERT INTO reservations (order_id, sku, quantity, state) VALUES ($1, $2, $3, 'reserved')")
            .bind(order_id)
            .bind(&line.sku)
            .bind(line.quantity)
            .execute(&mut **c)
            .await
            .map(drop)
            .map_err(unavailable)?);
    }
    let reserved = StockReserved {
        order_id: order_id.to_owned(),
        lines: lines.iter().map(proto_line).collect(),
    };
    EVENTS
        .emit(
            tx,
            "reserved",
            "StockReserved",
            order_id,
            reserved.encode_to_vec(),
        )
        .await?;
    Ok(())
}

fn proto_line(line: &Line) -> crate::api::v1::Line {
    crate::api::v1::Line {
        sku: line.sku.clone(),
        quantity: i32::try_from(line.quantity).unwrap_or(i32::MAX),
    }
}

/// Puts `order_id`'s reserved or committed units back.
pub async fn release(tx: &mut Tx, order_id: &str) -> Result<(), Error> {
    let held: Vec<(String, i64)> = with_tx!(tx, c => sqlx::query_as("SELECT sku, quantity FROM reservations WHERE order_id = $1 AND state IN ('reserved', 'committed')")
        .bind(order_id)
        .fetch_all(&mut **c)
        .await
        .map_err(unavailable)?);
    for (sku, quantity) in &held {
        with_tx!(tx, c => sqlx::query("UPDATE products SET stock = stock + $1 WHERE sku = $2")
            .bind(quantity)
            .bind(sku)
            .execute(&mut **c)
            .await
            .map(drop)
            .map_err(unavailable)?);
    }
    with_tx!(tx, c => sqlx::query("UPDATE reservations SET state = 'released' WHERE order_id = $1")
        .bind(order_id)
        .execute(&mut **c)
        .await
        .map(drop)
        .map_err(unavailable)?);
    if held.is_empty() {
        return Ok(());
    }
    let released = StockReleased {
        order_id: order_id.to_owned(),
        lines: held
            .into_iter()
            .map(|(sku, quantity)| proto_line(&Line { sku, quantity }))
            .collect(),
    };
    EVENTS
        .emit(
            tx,
            "released",
            "StockReleased",
            order_id,
            released.encode_to_vec(),
        )
        .await?;
    Ok(())
}

/// Makes `order_id`'s reservation final.
pub async fn commit(tx: &mut Tx, order_id: &str) -> Result<(), Error> {
    let committed = with_tx!(tx, c => sqlx::query("UPDATE reservations SET state = 'committed' WHERE order_id = $1 AND state = 'reserved'")
        .bind(order_id)
        .execute(&mut **c)
        .await
        .map_err(unavailable)?
        .rows_affected());
    if committed == 0 {
        return Ok(());
    }
    let event = StockCommitted {
        order_id: order_id.to_owned(),
    };
    EVENTS
        .emit(
            tx,
            "committed",
            "StockCommitted",
            order_id,
            event.encode_to_vec(),
        )
        .await?;
    Ok(())
}
