//! The gRPC face of payments: accounts, and the checkout saga's payment
//! branches behind the barrier.

use std::future::Future;

use tonic::{Request, Response, Status};
use trellis::Error;

use crate::{
    api::v1::{
        Account, ChargeRequest, GetAccountRequest, Ledger, LedgerEntry, ListLedgerRequest,
        payment_branches_server::PaymentBranches, payment_service_server::PaymentService,
    },
    biz,
    data::{self, Payments},
    ledger::Entry,
};

/// How many times a charge or refund that lost a race for its account runs
/// before the caller is told to retry (UNAVAILABLE). Each loss means
/// another charge or refund of the account committed, so this many
/// concurrent checkouts of one user all go through.
const ATTEMPTS: u32 = 16;

/// Implements `PaymentService` and `PaymentBranches`.
#[derive(Debug, Clone)]
pub struct PaymentHandler {
    store: Payments,
}

impl PaymentHandler {
    /// A handler over `store`.
    pub fn new(store: Payments) -> Self {
        PaymentHandler { store }
    }
}

/// Checks `user_id` and that the caller (`x-user-id`, set by the gateway)
/// is its owner; calls inside the mesh carry no caller.
fn own_account<T>(request: &Request<T>, user_id: &str) -> Result<(), Error> {
    biz::id("user_id", user_id)?;
    trellis::service::owner_only(
        request.metadata(),
        user_id,
        "NOT_YOUR_ACCOUNT",
        "an account is visible to its owner only",
    )
}

/// Runs a charge or refund, each time in a new transaction, until it did
/// not lose a race for its account (two checkouts of one user at once);
/// then UNAVAILABLE (CONCURRENT_UPDATE), which a saga retries later — not
/// ABORTED, which would fail the checkout.
async fn on_fresh_tx<F, Fut>(mut run: F) -> Result<(), Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), Status>>,
{
    for _ in 1..ATTEMPTS {
        match run().await {
            Err(status) if data::is_conflict(&Error::from(status.clone())) => {
                metrics::counter!("payment_conflict_retries_total").increment(1);
            }
            other => return other,
        }
    }
    run().await.map_err(|status| {
        let e = Error::from(status);
        if data::is_conflict(&e) {
            Error::new(trellis::Code::Unavailable, "CONCURRENT_UPDATE", e.message()).into()
        } else {
            e.into()
        }
    })
}

fn store_down(e: sqlx::Error) -> Status {
    Error::unavailable(format!("payment store: {e}")).into()
}

#[tonic::async_trait]
impl PaymentService for PaymentHandler {
    async fn get_account(
        &self,
        request: Request<GetAccountRequest>,
    ) -> Result<Response<Account>, Status> {
        let user_id = &request.get_ref().user_id;
        own_account(&request, user_id)?;
        let balance_cents = self.store.balance(user_id).await?;
        Ok(Response::new(Account {
            user_id: user_id.clone(),
            balance_cents,
        }))
    }

    async fn list_ledger(
        &self,
        request: Request<ListLedgerRequest>,
    ) -> Result<Response<Ledger>, Status> {
        let r = request.get_ref();
        own_account(&request, &r.user_id)?;
        let size = match r.page_size {
            0 => 50,
            n @ 1..=100 => n as u32,
            _ => return Err(Error::invalid_argument("page_size", "0 to 100").into()),
        };
        let after = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse::<u64>()
                .map_err(|_| Error::invalid_argument("page_token", "a next_page_token"))?
        };
        // One more than the page, to know whether another follows.
        let mut recorded = self.store.ledger(&r.user_id, after, size + 1).await?;
        let more = recorded.len() > size as usize;
        recorded.truncate(size as usize);
        let next_page_token = match recorded.last() {
            Some(last) if more => last.version.to_string(),
            _ => String::new(),
        };
        let entries = recorded
            .into_iter()
            .map(|r| {
                let (order_id, amount_cents) = match &r.event {
                    Entry::Opened { balance_cents } => (String::new(), *balance_cents),
                    Entry::Charged {
                        order_id,
                        amount_cents,
                    }
                    | Entry::Refunded {
                        order_id,
                        amount_cents,
                    } => (order_id.clone(), *amount_cents),
                };
                LedgerEntry {
                    version: r.version as i64,
                    kind: r.event.kind().into(),
                    order_id,
                    amount_cents,
                    time: (r.time_us > 0).then(|| prost_types::Timestamp {
                        seconds: r.time_us.div_euclid(1_000_000),
                        nanos: (r.time_us.rem_euclid(1_000_000) * 1000) as i32,
                    }),
                }
            })
            .collect();
        Ok(Response::new(Ledger {
            entries,
            next_page_token,
        }))
    }
}

#[tonic::async_trait]
impl PaymentBranches for PaymentHandler {
    async fn charge(&self, request: Request<ChargeRequest>) -> Result<Response<()>, Status> {
        let r = request.get_ref();
        biz::id("order_id", &r.order_id)?;
        biz::id("user_id", &r.user_id)?;
        biz::amount(r.amount_cents)?;
        let (order, user, amount) = (&r.order_id, &r.user_id, r.amount_cents);
        if request.metadata().get("trellis-saga-gid").is_none() {
            // A direct charge, outside a saga: once per order (a repeat
            // is ALREADY_EXISTS, or with an Idempotency-Key the first
            // answer, replayed by the server's idempotency layer).
            on_fresh_tx(|| async {
                let mut tx = self.store.pool().begin().await.map_err(store_down)?;
                self.store.charge(&mut tx, order, user, amount).await?;
                tx.commit().await.map_err(store_down)
            })
            .await?;
            return Ok(Response::new(()));
        }
        on_fresh_tx(|| {
            let store = self.store.clone();
            let (order, user) = (order.clone(), user.clone());
            trellis_saga::barrier::grpc(self.store.pool(), request.metadata(), move |tx| {
                Box::pin(async move { store.charge(tx, &order, &user, amount).await })
            })
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn refund(&self, request: Request<ChargeRequest>) -> Result<Response<()>, Status> {
        let order = &request.get_ref().order_id;
        biz::id("order_id", order)?;
        on_fresh_tx(|| {
            let store = self.store.clone();
            let order = order.clone();
            trellis_saga::barrier::grpc(self.store.pool(), request.metadata(), move |tx| {
                Box::pin(async move { store.refund(tx, &order).await })
            })
        })
        .await?;
        Ok(Response::new(()))
    }
}
