//! The order's rules: who places it, what it holds, what it costs, and the
//! checkout saga that carries it out.

use trellis::{Code, Error};
use trellis_saga::{client::Saga, log::Endpoint};

/// Where an order is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Its checkout is running.
    Pending,
    /// Stock taken and paid for.
    Confirmed,
    /// The checkout failed and was undone.
    Failed,
}

impl Status {
    /// Its name in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Confirmed => "confirmed",
            Status::Failed => "failed",
        }
    }

    /// From its name in the store.
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "pending" => Status::Pending,
            "confirmed" => Status::Confirmed,
            "failed" => Status::Failed,
            _ => return None,
        })
    }
}

/// One priced line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Line {
    /// Which product.
    pub sku: String,
    /// How many.
    pub quantity: i64,
    /// Unit price when ordered, in cents.
    pub price_cents: i64,
}

/// An order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// Its id (a UUIDv7); its saga's gid is `order-{id}`.
    pub id: String,
    /// Whose.
    pub user_id: String,
    /// What.
    pub lines: Vec<Line>,
    /// The sum of the lines.
    pub total_cents: i64,
    /// Where it is.
    pub status: Status,
    /// Why it failed.
    pub failure_reason: String,
    /// When it was placed (ms since the epoch).
    pub create_time_ms: i64,
    /// When it last changed.
    pub update_time_ms: i64,
}

/// Checks a user id (the token's subject): 1 to 64 of `[A-Za-z0-9_-]`.
pub fn user_id(value: &str) -> Result<(), Error> {
    shop_payment::biz::id("user_id", value)
}

/// The lines priced from the catalogue's `prices` (SKU → cents); a SKU
/// the catalogue lacks is the request's error. The total, checked for
/// overflow.
pub fn price(
    lines: &[shop_inventory::biz::Line],
    prices: &std::collections::HashMap<String, i64>,
) -> Result<(Vec<Line>, i64), Error> {
    let mut priced = Vec::with_capacity(lines.len());
    let mut total: i64 = 0;
    for (i, line) in lines.iter().enumerate() {
        let Some(&price) = prices.get(&line.sku) else {
            return Err(Error::new(
                Code::FailedPrecondition,
                "PRODUCT_NOT_FOUND",
                format!("no product {}", line.sku),
            )
            .with_metadata("field", format!("lines[{i}].sku")));
        };
        let amount = price.checked_mul(line.quantity);
        total = match amount.and_then(|a| total.checked_add(a)) {
            Some(t) if t <= shop_payment::biz::MAX_AMOUNT_CENTS => t,
            _ => {
                return Err(Error::invalid_argument(
                    "lines",
                    "the order's total is larger than a payment may be",
                ));
            }
        };
        priced.push(Line {
            sku: line.sku.clone(),
            quantity: line.quantity,
            price_cents: price,
        });
    }
    Ok((priced, total))
}

/// The saga's global id for an order.
pub fn gid(order_id: &str) -> String {
    format!("order-{order_id}")
}

const ORDER_BRANCHES: &str = "/shop.order.v1.OrderBranches";
const STOCK_BRANCHES: &str = "/shop.inventory.v1.StockBranches";
const PAYMENT_BRANCHES: &str = "/shop.payment.v1.PaymentBranches";

/// The checkout saga of `order`: accept (undone by failing the order) →
/// reserve stock → charge → commit stock → confirm. Built from the stored
/// order alone, so submitting it again gives the same saga.
pub fn checkout(order: &Order, timeout_to_fail: std::time::Duration) -> Saga {
    use prost::Message as _;
    let order_ref = crate::api::v1::OrderRef {
        order_id: order.id.clone(),
    }
    .encode_to_vec();
    let stock = shop_inventory::api::v1::StockRequest {
        order_id: order.id.clone(),
        lines: order
            .lines
            .iter()
            .map(|l| shop_inventory::api::v1::Line {
                sku: l.sku.clone(),
                quantity: i32::try_from(l.quantity).unwrap_or(i32::MAX),
            })
            .collect(),
    }
    .encode_to_vec();
    let charge = shop_payment::api::v1::ChargeRequest {
        order_id: order.id.clone(),
        user_id: order.user_id.clone(),
        amount_cents: order.total_cents,
    }
    .encode_to_vec();
    let ep = |service: &str, base: &str, method: &str| {
        Endpoint::grpc(service, format!("{base}/{method}"))
    };
    let (o, i, p) = (
        crate::SERVICE,
        shop_inventory::SERVICE,
        shop_payment::SERVICE,
    );
    Saga::new(gid(&order.id))
        .add(
            "order",
            ep(o, ORDER_BRANCHES, "Accept"),
            ep(o, ORDER_BRANCHES, "Fail"),
            order_ref.clone(),
        )
        .add(
            "reserve",
            ep(i, STOCK_BRANCHES, "Reserve"),
            ep(i, STOCK_BRANCHES, "Release"),
            stock.clone(),
        )
        .add(
            "charge",
            ep(p, PAYMENT_BRANCHES, "Charge"),
            ep(p, PAYMENT_BRANCHES, "Refund"),
            charge,
        )
        .add(
            "commit",
            ep(i, STOCK_BRANCHES, "Commit"),
            ep(i, STOCK_BRANCHES, "Release"),
            stock,
        )
        .add(
            "confirm",
            ep(o, ORDER_BRANCHES, "Confirm"),
            ep(o, ORDER_BRANCHES, "Fail"),
            order_ref,
        )
        .timeout_to_fail(timeout_to_fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_priced_and_totals_bounded() {
        let prices = [("tea".to_owned(), 450), ("pot".to_owned(), 8900)]
            .into_iter()
            .collect();
        let lines =
            shop_inventory::biz::lines([("tea".to_owned(), 2), ("pot".to_owned(), 1)]).unwrap();
        let (priced, total) = price(&lines, &prices).unwrap();
        assert_eq!(total, 2 * 450 + 8900);
        assert_eq!(priced[1].price_cents, 8900);
        let unknown = shop_inventory::biz::lines([("cake".to_owned(), 1)]).unwrap();
        let e = price(&unknown, &prices).unwrap_err();
        assert_eq!(e.reason(), "PRODUCT_NOT_FOUND");
        let dear = [("gold".to_owned(), i64::MAX / 2)].into_iter().collect();
        let many = shop_inventory::biz::lines([("gold".to_owned(), 1000)]).unwrap();
        assert_eq!(
            price(&many, &dear).unwrap_err().metadata()["field"],
            "lines"
        );
    }

    #[test]
    fn the_checkout_saga_is_the_same_every_time() {
        let order = Order {
            id: "o1".into(),
            user_id: "u1".into(),
            lines: vec![Line {
                sku: "tea".into(),
                quantity: 2,
                price_cents: 450,
            }],
            total_cents: 900,
            status: Status::Pending,
            failure_reason: String::new(),
            create_time_ms: 1,
            update_time_ms: 1,
        };
        let timeout = std::time::Duration::from_secs(60);
        let a = checkout(&order, timeout).into_request();
        assert_eq!(a, checkout(&order, timeout).into_request());
        assert_eq!(a.gid, "order-o1");
        let names: Vec<_> = a.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["order", "reserve", "charge", "commit", "confirm"]);
    }
}
