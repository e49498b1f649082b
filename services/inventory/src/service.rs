//! The gRPC face of the inventory: the catalogue, and the checkout
//! saga's stock branches behind the barrier.

use tonic::{Request, Response, Status};
use trellis::Error;

use crate::{
    api::v1::{
        GetProductRequest, ListProductsRequest, ListProductsResponse, Product, StockRequest,
        inventory_service_server::InventoryService, stock_branches_server::StockBranches,
    },
    biz,
    data::{self, Inventory},
};

/// Implements `InventoryService` and `StockBranches`.
#[derive(Debug, Clone)]
pub struct InventoryHandler {
    store: Inventory,
}

impl InventoryHandler {
    /// A handler over `store`.
    pub fn new(store: Inventory) -> Self {
        InventoryHandler { store }
    }
}

fn to_proto(p: biz::Product) -> Product {
    Product {
        sku: p.sku,
        name: p.name,
        price_cents: p.price_cents,
        stock: p.stock,
    }
}

/// The checked order id and lines of a stock request.
fn stock_request(request: &StockRequest) -> Result<(String, Vec<biz::Line>), Error> {
    biz::order_id(&request.order_id)?;
    let lines = biz::lines(request.lines.iter().map(|l| (l.sku.clone(), l.quantity)))?;
    Ok((request.order_id.clone(), lines))
}

/// SKUs a list request may name.
const MAX_LIST_SKUS: usize = 100;

#[tonic::async_trait]
impl InventoryService for InventoryHandler {
    async fn list_products(
        &self,
        request: Request<ListProductsRequest>,
    ) -> Result<Response<ListProductsResponse>, Status> {
        let skus = &request.get_ref().skus;
        if skus.len() > MAX_LIST_SKUS {
            return Err(Error::invalid_argument("skus", format!("at most {MAX_LIST_SKUS}")).into());
        }
        if let Some(bad) = skus.iter().position(|s| !biz::valid_sku(s)) {
            return Err(
                Error::invalid_argument(format!("skus[{bad}]"), "1 to 64 of [a-z0-9_-]").into(),
            );
        }
        let products = self.store.list(skus).await?;
        Ok(Response::new(ListProductsResponse {
            products: products.into_iter().map(to_proto).collect(),
        }))
    }

    async fn get_product(
        &self,
        request: Request<GetProductRequest>,
    ) -> Result<Response<Product>, Status> {
        let sku = &request.get_ref().sku;
        if !biz::valid_sku(sku) {
            return Err(Error::invalid_argument("sku", "1 to 64 of [a-z0-9_-]").into());
        }
        match self.store.get(sku).await? {
            Some(p) => Ok(Response::new(to_proto(p))),
            None => Err(Error::not_found("PRODUCT_NOT_FOUND", format!("no product {sku}")).into()),
        }
    }
}

#[tonic::async_trait]
impl StockBranches for InventoryHandler {
    async fn reserve(&self, request: Request<StockRequest>) -> Result<Response<()>, Status> {
        let (order, lines) = stock_request(request.get_ref())?;
        trellis_saga::barrier::grpc(self.store.pool(), request.metadata(), |tx| {
            Box::pin(async move { data::reserve(tx, &order, &lines).await })
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn release(&self, request: Request<StockRequest>) -> Result<Response<()>, Status> {
        let (order, _) = stock_request(request.get_ref())?;
        trellis_saga::barrier::grpc(self.store.pool(), request.metadata(), |tx| {
            Box::pin(async move { data::release(tx, &order).await })
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn commit(&self, request: Request<StockRequest>) -> Result<Response<()>, Status> {
        let (order, _) = stock_request(request.get_ref())?;
        trellis_saga::barrier::grpc(self.store.pool(), request.metadata(), |tx| {
            Box::pin(async move { data::commit(tx, &order).await })
        })
        .await?;
        Ok(Response::new(()))
    }
}
