//! Accounts and charges in SQLite or PostgreSQL, with the saga barrier's
//! table beside them. Balances move only inside a branch's barrier
//! transaction, so an account's opening balance always equals its balance
//! plus its charges that were not refunded; a balance never goes below
//! zero (checked by the update and by the table).

use prost::Message;
use trellis::{Code, Error};
use trellis_events::outbox;
use trellis_store::{Pool, StoreError, Tx, with_pool, with_tx};

use crate::api::v1::{PaymentCharged, PaymentRefunded};

/// The payment service's events (docs/events.md#in-the-shop).
pub const EVENTS: outbox::Emitter = outbox::Emitter {
    source: "/shop/payment",
    subjects: "events.payment",
    types: "shop.payment",
    package: "shop.payment.v1",
    aggregate: "order/",
};

fn migrator() -> sqlx::migrate::Migrator {
    trellis_store::migrator(
        "_payment_migrations",
        &[
            (
                1,
                "accounts and charges",
                "CREATE TABLE accounts (
                    user_id        TEXT PRIMARY KEY,
                    balance_cents  BIGINT NOT NULL CHECK (balance_cents >= 0)
                );
                CREATE TABLE charges (
                    order_id      TEXT PRIMARY KEY,
                    user_id       TEXT NOT NULL,
                    amount_cents  BIGINT NOT NULL,
                    state         TEXT NOT NULL
                );",
            ),
            trellis_saga::barrier::MIGRATION,
        ],
    )
}

fn unavailable(e: sqlx::Error) -> Error {
    Error::unavailable(format!("payment store: {e}"))
}

/// The payment store.
#[derive(Debug, Clone)]
pub struct Payments {
    pool: Pool,
    opening_balance_cents: i64,
}

impl Payments {
    /// Opens (and migrates) the store; accounts open with
    /// `opening_balance_cents`.
    pub async fn open(
        settings: &trellis_store::DatabaseSettings,
        default_file: &std::path::Path,
        opening_balance_cents: i64,
    ) -> Result<Payments, StoreError> {
        Ok(Payments {
            pool: outbox::open_store(settings, default_file, &migrator()).await?,
            opening_balance_cents,
        })
    }

    /// The pool (branch handlers run their barrier on it).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// What new accounts start with.
    pub fn opening_balance_cents(&self) -> i64 {
        self.opening_balance_cents
    }

    /// A user's balance, opening the account if it is new.
    pub async fn balance(&self, user_id: &str) -> Result<i64, Error> {
        with_pool!(&self.pool, p => {
            sqlx::query("INSERT INTO accounts (user_id, balance_cents) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(user_id)
                .bind(self.opening_balance_cents)
                .execute(p)
                .await
                .map(drop)
                .map_err(unavailable)?;
            sqlx::query_scalar("SELECT balance_cents FROM accounts WHERE user_id = $1")
                .bind(user_id)
                .fetch_one(p)
                .await
                .map_err(unavailable)
        })
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await
    }
}

/// Takes `amount` from `user_id`'s balance for `order_id`, in the branch's
/// transaction; FAILED_PRECONDITION (INSUFFICIENT_FUNDS) when the balance
/// is short.
pub async fn charge(
    tx: &mut Tx,
    opening_balance_cents: i64,
    order_id: &str,
    user_id: &str,
    amount: i64,
) -> Result<(), Error> {
    with_tx!(tx, c => sqlx::query("INSERT INTO accounts (user_id, balance_cents) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(user_id)
        .bind(opening_balance_cents)
        .execute(&mut **c)
        .await
        .map(drop)
        .map_err(unavailable)?);
    let taken = with_tx!(tx, c => sqlx::query("UPDATE accounts SET balance_cents = balance_cents - $1 WHERE user_id = $2 AND balance_cents >= $3")
        .bind(amount)
        .bind(user_id)
        .bind(amount)
        .execute(&mut **c)
        .await
        .map_err(unavailable)?
        .rows_affected());
    if taken != 1 {
        let balance: i64 = with_tx!(tx, c => sqlx::query_scalar("SELECT balance_cents FROM accounts WHERE user_id = $1")
            .bind(user_id)
            .fetch_one(&mut **c)
            .await
            .map_err(unavailable)?);
        return Err(Error::new(
            Code::FailedPrecondition,
            "INSUFFICIENT_FUNDS",
            format!("insufficient funds: {amount} cents wanted, {balance} available"),
        ));
    }
    with_tx!(tx, c => sqlx::query("INSERT INTO charges (order_id, user_id, amount_cents, state) VALUES ($1, $2, $3, 'charged')")
        .bind(order_id)
        .bind(user_id)
        .bind(amount)
        .execute(&mut **c)
        .await
        .map(drop)
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => Error::already_exists(
                "ALREADY_CHARGED",
                format!("order {order_id} is already charged"),
            ),
            _ => unavailable(e),
        })?);
    let charged = PaymentCharged {
        order_id: order_id.to_owned(),
        user_id: user_id.to_owned(),
        amount_cents: amount,
    };
    EVENTS
        .emit(
            tx,
            "charged",
            "PaymentCharged",
            order_id,
            charged.encode_to_vec(),
        )
        .await?;
    Ok(())
}

/// Gives back what `order_id` was charged, if it was and is not refunded.
pub async fn refund(tx: &mut Tx, order_id: &str) -> Result<(), Error> {
    let charged: Option<(String, i64)> = with_tx!(tx, c => sqlx::query_as("SELECT user_id, amount_cents FROM charges WHERE order_id = $1 AND state = 'charged'")
        .bind(order_id)
        .fetch_optional(&mut **c)
        .await
        .map_err(unavailable)?);
    let Some((user_id, amount)) = charged else {
        return Ok(());
    };
    with_tx!(tx, c => sqlx::query("UPDATE accounts SET balance_cents = balance_cents + $1 WHERE user_id = $2")
        .bind(amount)
        .bind(&user_id)
        .execute(&mut **c)
        .await
        .map(drop)
        .map_err(unavailable)?);
    with_tx!(tx, c => sqlx::query("UPDATE charges SET state = 'refunded' WHERE order_id = $1")
        .bind(order_id)
        .execute(&mut **c)
        .await
        .map(drop)
        .map_err(unavailable)?);
    let refunded = PaymentRefunded {
        order_id: order_id.to_owned(),
        user_id,
        amount_cents: amount,
    };
    EVENTS
        .emit(
            tx,
            "refunded",
            "PaymentRefunded",
            order_id,
            refunded.encode_to_vec(),
        )
        .await?;
    Ok(())
}
