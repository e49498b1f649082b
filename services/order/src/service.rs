//! The gRPC face of orders: placing and showing them, and the checkout
//! saga's branches on the order itself.

use std::{collections::HashMap, time::Duration};

use prost_types::Timestamp;
use tonic::{Request, Response, Status};
use trellis::{Code, Error, ResilientChannel};
use trellis_saga::api::v1::{GetSagaRequest, saga_service_client::SagaServiceClient};

use crate::{
    api::v1::{
        CreateOrderRequest, GetOrderHistoryRequest, GetOrderRequest, ListOrdersRequest,
        ListOrdersResponse, Order, OrderEvent, OrderHistory, OrderLine, OrderRef, OrderStatus,
        order_branches_server::OrderBranches, order_service_server::OrderService,
    },
    biz,
    data::{self, Orders},
};

pub use trellis::service::USER_HEADER;

/// Implements `OrderService` and `OrderBranches`.
#[derive(Clone)]
pub struct OrderHandler {
    orders: Orders,
    inventory:
        shop_inventory::api::v1::inventory_service_client::InventoryServiceClient<ResilientChannel>,
    saga: SagaServiceClient<ResilientChannel>,
    timeout_to_fail: Duration,
}

impl OrderHandler {
    /// Order `id`, when the caller (`x-user-id`, set by the gateway) may
    /// see it: NOT_FOUND (ORDER_NOT_FOUND) for another user's order, as
    /// for a missing one. Calls inside the mesh carry no caller.
    async fn owned(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        id: &str,
    ) -> Result<biz::Order, Error> {
        let not_found = || Error::not_found("ORDER_NOT_FOUND", format!("no order {id}"));
        let order = self.orders.get(id).await?.ok_or_else(not_found)?;
        if trellis::service::caller(metadata).is_some_and(|c| c != order.user_id) {
            return Err(not_found());
        }
        Ok(order)
    }

    /// A handler over `orders`, pricing through `inventory` and checking
    /// out through the coordinator `saga`.
    pub fn new(
        orders: Orders,
        inventory: ResilientChannel,
        saga: ResilientChannel,
        timeout_to_fail: Duration,
    ) -> Self {
        OrderHandler {
            orders,
            inventory:
                shop_inventory::api::v1::inventory_service_client::InventoryServiceClient::new(
                    inventory,
                ),
            saga: SagaServiceClient::new(saga),
            timeout_to_fail,
        }
    }

    /// Submits `order`'s checkout saga and notes it; the coordinator's
    /// error when it could not (the order stays for [`resubmit`]).
    pub async fn submit(&self, order: &biz::Order) -> Result<(), Status> {
        biz::checkout(order, self.timeout_to_fail)
            .submit(&mut self.saga.clone())
            .await?;
        self.orders.submitted(&order.id).await?;
        Ok(())
    }

    /// Submits the sagas of orders placed more than `age` ago whose submit
    /// failed; how many were submitted now. Submitting is idempotent, so an
    /// order whose first submit landed but whose answer was lost is
    /// harmless here.
    ///
    /// One instance sweeps at a time: the caller holds `guard`, and each
    /// order is noted under its fencing token — a sweeper whose lease ran
    /// out mid-sweep (paused, partitioned) stops at its next write.
    pub async fn resubmit(
        &self,
        age: Duration,
        guard: &trellis_lock::Guard,
    ) -> Result<usize, Status> {
        let before = trellis_store::now_ms() - i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        let mut n = 0;
        for order in self.orders.unsubmitted(before, 100).await? {
            if guard.is_lost() {
                break;
            }
            biz::checkout(&order, self.timeout_to_fail)
                .submit(&mut self.saga.clone())
                .await?;
            self.orders
                .submitted_fenced(&order.id, guard.resource(), guard.token())
                .await?;
            n += 1;
        }
        Ok(n)
    }
}

fn timestamp(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

fn to_proto(order: biz::Order) -> Order {
    Order {
        status: match order.status {
            biz::Status::Pending => OrderStatus::Pending,
            biz::Status::Confirmed => OrderStatus::Confirmed,
            biz::Status::Failed => OrderStatus::Failed,
        } as i32,
        lines: order
            .lines
            .into_iter()
            .map(|l| OrderLine {
                sku: l.sku,
                quantity: i32::try_from(l.quantity).unwrap_or(i32::MAX),
                price_cents: l.price_cents,
            })
            .collect(),
        total_cents: order.total_cents,
        failure_reason: order.failure_reason,
        create_time: Some(timestamp(order.create_time_ms)),
        update_time: Some(timestamp(order.update_time_ms)),
        saga: None,
        id: order.id,
        user_id: order.user_id,
    }
}

/// The caller: the gateway's `x-user-id`, else the request's field.
fn user<T>(request: &Request<T>, field: &str) -> Result<String, Error> {
    let user = match request.metadata().get(USER_HEADER) {
        Some(v) => v
            .to_str()
            .map_err(|_| Error::invalid_argument(USER_HEADER, "not visible ASCII"))?
            .to_owned(),
        None => field.to_owned(),
    };
    biz::user_id(&user)?;
    Ok(user)
}

fn order_ref(request: &OrderRef) -> Result<String, Error> {
    shop_payment::biz::id("order_id", &request.order_id)?;
    Ok(request.order_id.clone())
}

#[tonic::async_trait]
impl OrderService for OrderHandler {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let user_id = user(&request, &request.get_ref().user_id)?;
        let lines = shop_inventory::biz::lines(
            request
                .get_ref()
                .lines
                .iter()
                .map(|l| (l.sku.clone(), l.quantity)),
        )?;
        let catalogue = self
            .inventory
            .clone()
            .list_products(shop_inventory::api::v1::ListProductsRequest {
                skus: lines.iter().map(|l| l.sku.clone()).collect(),
            })
            .await?
            .into_inner();
        let prices: HashMap<String, i64> = catalogue
            .products
            .into_iter()
            .map(|p| (p.sku, p.price_cents))
            .collect();
        let (lines, total_cents) = biz::price(&lines, &prices)?;
        let now = trellis_store::now_ms();
        let order = biz::Order {
            id: uuid::Uuid::now_v7().to_string(),
            user_id,
            lines,
            total_cents,
            status: biz::Status::Pending,
            failure_reason: String::new(),
            create_time_ms: now,
            update_time_ms: now,
        };
        self.orders.insert(&order).await?;
        // The order is recorded: if the coordinator cannot be reached now,
        // the order service submits the saga later (`resubmit`).
        if let Err(status) = self.submit(&order).await {
            tracing::warn!(order = %order.id, error = %status.message(), "checkout saga not submitted yet");
        }
        Ok(Response::new(to_proto(order)))
    }

    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let id = &request.get_ref().id;
        let order = self.owned(request.metadata(), id).await?;
        let gid = biz::gid(&order.id);
        let mut order = to_proto(order);
        // The saga as the coordinator shows it; the order without it when
        // the coordinator does not answer.
        match self.saga.clone().get_saga(GetSagaRequest { gid }).await {
            Ok(saga) => order.saga = Some(saga.into_inner()),
            Err(status) if status.code() == tonic::Code::NotFound => {}
            Err(status) => {
                tracing::debug!(error = %status.message(), "saga state not shown");
            }
        }
        Ok(Response::new(order))
    }

    async fn get_order_history(
        &self,
        request: Request<GetOrderHistoryRequest>,
    ) -> Result<Response<OrderHistory>, Status> {
        let id = &request.get_ref().id;
        self.owned(request.metadata(), id).await?;
        let events = self
            .orders
            .history(id)
            .await?
            .into_iter()
            .map(|(seq, ty, source, micros)| OrderEvent {
                r#type: ty,
                source,
                time: Some(Timestamp {
                    seconds: micros.div_euclid(1_000_000),
                    nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
                }),
                seq,
            })
            .collect();
        Ok(Response::new(OrderHistory { events }))
    }

    async fn list_orders(
        &self,
        request: Request<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        let user_id = user(&request, &request.get_ref().user_id)?;
        let limit = match request.get_ref().page_size {
            0 => 50,
            n @ 1..=1000 => i64::from(n),
            _ => {
                return Err(Error::new(
                    Code::InvalidArgument,
                    "INVALID_FIELD",
                    "page_size must be between 0 and 1000",
                )
                .with_metadata("field", "page_size")
                .into());
            }
        };
        let orders = self.orders.list(&user_id, limit).await?;
        Ok(Response::new(ListOrdersResponse {
            orders: orders.into_iter().map(to_proto).collect(),
        }))
    }
}

#[tonic::async_trait]
impl OrderBranches for OrderHandler {
    async fn accept(&self, request: Request<OrderRef>) -> Result<Response<()>, Status> {
        order_ref(request.get_ref())?;
        trellis_saga::barrier::grpc(self.orders.pool(), request.metadata(), |_| {
            Box::pin(async { Ok(()) })
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn confirm(&self, request: Request<OrderRef>) -> Result<Response<()>, Status> {
        let id = order_ref(request.get_ref())?;
        trellis_saga::barrier::grpc(self.orders.pool(), request.metadata(), |tx| {
            Box::pin(async move { data::confirm(tx, &id).await })
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn fail(&self, request: Request<OrderRef>) -> Result<Response<()>, Status> {
        let id = order_ref(request.get_ref())?;
        let headers = request.metadata().clone().into_headers();
        let reason = trellis_saga::barrier::reason(&headers)
            .unwrap_or("the checkout was undone")
            .to_owned();
        trellis_saga::barrier::grpc(self.orders.pool(), request.metadata(), |tx| {
            Box::pin(async move { data::fail(tx, &id, &reason).await })
        })
        .await?;
        Ok(Response::new(()))
    }
}
