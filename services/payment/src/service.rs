//! The gRPC face of payments: accounts, and the checkout saga's payment
//! branches behind the barrier.

use tonic::{Request, Response, Status};

use crate::{
    api::v1::{
        Account, ChargeRequest, GetAccountRequest, payment_branches_server::PaymentBranches,
        payment_service_server::PaymentService,
    },
    biz,
    data::{self, Payments},
};

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

#[tonic::async_trait]
impl PaymentService for PaymentHandler {
    async fn get_account(
        &self,
        request: Request<GetAccountRequest>,
    ) -> Result<Response<Account>, Status> {
        let user_id = &request.get_ref().user_id;
        biz::id("user_id", user_id)?;
        let balance_cents = self.store.balance(user_id).await?;
        Ok(Response::new(Account {
            user_id: user_id.clone(),
            balance_cents,
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
        let (order, user, amount) = (r.order_id.clone(), r.user_id.clone(), r.amount_cents);
        let opening = self.store.opening_balance_cents();
        if request.metadata().get("trellis-saga-gid").is_none() {
            // A direct charge, outside a saga: once per order (a repeat
            // is ALREADY_EXISTS, or with an Idempotency-Key the first
            // answer, replayed by the server's idempotency layer).
            let mut tx = self.store.pool().begin().await.map_err(|e| {
                Status::from(trellis::Error::unavailable(format!("payment store: {e}")))
            })?;
            data::charge(&mut tx, opening, &order, &user, amount).await?;
            tx.commit().await.map_err(|e| {
                Status::from(trellis::Error::unavailable(format!("payment store: {e}")))
            })?;
            return Ok(Response::new(()));
        }
        trellis_saga::barrier::grpc(self.store.pool(), request.metadata(), |tx| {
            Box::pin(async move { data::charge(tx, opening, &order, &user, amount).await })
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn refund(&self, request: Request<ChargeRequest>) -> Result<Response<()>, Status> {
        let order = request.get_ref().order_id.clone();
        biz::id("order_id", &order)?;
        trellis_saga::barrier::grpc(self.store.pool(), request.metadata(), |tx| {
            Box::pin(async move { data::refund(tx, &order).await })
        })
        .await?;
        Ok(Response::new(()))
    }
}
