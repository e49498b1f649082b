//! The ledger and the charges in SQLite or PostgreSQL, with the saga
//! barrier's table beside them. An account is event-sourced
//! ([`crate::ledger`], in the event store's tables); `charges` indexes each
//! order's charge (who paid, how much, whether it was refunded) and makes a
//! second charge of one order fail. Money moves only inside a branch's
//! barrier transaction, which writes the ledger entry, the charge row and
//! the published event together.

use prost::Message;
use trellis::{Code, Error};
use trellis_events::{
    es::{EsError, EventStore, Recorded},
    outbox,
};
use trellis_store::{Pool, StoreError, Tx, with_tx};

use crate::{
    api::v1::{PaymentCharged, PaymentRefunded},
    ledger::{Account, Command, Entry},
};

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
            (
                3,
                "accounts move to the ledger",
                // Each account's balance becomes the opening entry of its
                // ledger (the event store's tables exist before these
                // migrations run: `outbox::open_store`).
                "INSERT INTO trellis_es_events (aggregate_type, aggregate_id, version, schema_version, data, time_us)
                    SELECT 'account', user_id, 1, 1, '{\"Opened\":{\"balance_cents\":' || balance_cents || '}}', 0
                    FROM accounts;
                DROP TABLE accounts;",
            ),
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
    ledger: EventStore,
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
        let pool = outbox::open_store(settings, default_file, &migrator()).await?;
        Ok(Payments {
            ledger: EventStore::new(pool.clone()),
            pool,
            opening_balance_cents,
        })
    }

    /// The pool (branch handlers run their barrier on it).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// A user's balance: the fold of their ledger (its last snapshot and
    /// the entries after it), or the opening balance before the first
    /// charge.
    pub async fn balance(&self, user_id: &str) -> Result<i64, Error> {
        let (account, _) = self.ledger.load::<Account>(user_id).await?;
        Ok(if account.opened {
            account.balance_cents
        } else {
            self.opening_balance_cents
        })
    }

    /// Up to `limit` entries of `user_id`'s ledger after version `after`.
    pub async fn ledger(
        &self,
        user_id: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Recorded<Entry>>, Error> {
        Ok(self
            .ledger
            .history::<Account>(user_id, after, limit)
            .await?)
    }

    /// Takes `amount` from `user_id`'s account for `order_id`, in `tx` (a
    /// branch's barrier transaction, or a direct charge's):
    /// FAILED_PRECONDITION (INSUFFICIENT_FUNDS) when the balance is short,
    /// ALREADY_EXISTS (ALREADY_CHARGED) for an order charged before,
    /// ABORTED (CONCURRENT_UPDATE) when another charge or refund of the
    /// account committed meanwhile — `tx` is then spent, and the caller
    /// runs the whole charge again ([`is_conflict`]).
    pub async fn charge(
        &self,
        tx: &mut Tx,
        order_id: &str,
        user_id: &str,
        amount: i64,
    ) -> Result<(), Error> {
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
        let command = Command::Charge {
            order_id: order_id.to_owned(),
            amount_cents: amount,
            opening_balance_cents: self.opening_balance_cents,
        };
        self.ledger
            .execute_in::<Account>(tx, user_id, &command, None)
            .await
            .map_err(|e| match e {
                // The one rule a charge can break.
                EsError::Refused(why) => {
                    Error::new(Code::FailedPrecondition, "INSUFFICIENT_FUNDS", why)
                }
                e => e.into(),
            })?;
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

    /// Gives back what `order_id` was charged, if it was and is not
    /// refunded; a conflict as for [`charge`](Self::charge).
    pub async fn refund(&self, tx: &mut Tx, order_id: &str) -> Result<(), Error> {
        let charged: Option<(String, i64)> = with_tx!(tx, c => sqlx::query_as("SELECT user_id, amount_cents FROM charges WHERE order_id = $1 AND state = 'charged'")
            .bind(order_id)
            .fetch_optional(&mut **c)
            .await
            .map_err(unavailable)?);
        let Some((user_id, amount)) = charged else {
            return Ok(());
        };
        let command = Command::Refund {
            order_id: order_id.to_owned(),
            amount_cents: amount,
        };
        self.ledger
            .execute_in::<Account>(tx, &user_id, &command, None)
            .await?;
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

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await
    }
}

/// Whether `e` is a lost race for an account ([`Payments::charge`]): run
/// the charge or refund again, in a new transaction.
pub fn is_conflict(e: &Error) -> bool {
    e.code() == Code::Aborted && e.reason() == "CONCURRENT_UPDATE"
}
