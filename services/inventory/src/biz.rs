//! The inventory's rules: what a stock request may hold, and what a
//! product is.

use trellis::Error;

/// A product on sale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    /// Its stock-keeping unit: 1 to 64 of `[a-z0-9_-]`.
    pub sku: String,
    /// Its name.
    pub name: String,
    /// Price per unit, in cents.
    pub price_cents: i64,
    /// Units available.
    pub stock: i64,
}

/// One line of a stock request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Which product.
    pub sku: String,
    /// How many: 1 to [`MAX_QUANTITY`].
    pub quantity: i64,
}

/// Lines per order.
pub const MAX_LINES: usize = 50;
/// Units per line.
pub const MAX_QUANTITY: i32 = 1000;
/// Bytes of a SKU.
pub const MAX_SKU_BYTES: usize = 64;
/// Bytes of an order id.
pub const MAX_ORDER_ID_BYTES: usize = 64;

/// Whether `sku` is a well-formed SKU.
pub fn valid_sku(sku: &str) -> bool {
    !sku.is_empty()
        && sku.len() <= MAX_SKU_BYTES
        && sku
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Checks an order id.
pub fn order_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ORDER_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_argument(
            "order_id",
            format!("1 to {MAX_ORDER_ID_BYTES} of [A-Za-z0-9_-]"),
        ))
    }
}

/// Checks an order's lines: 1 to [`MAX_LINES`], each SKU once, each
/// quantity 1 to [`MAX_QUANTITY`].
pub fn lines(lines: impl IntoIterator<Item = (String, i32)>) -> Result<Vec<Line>, Error> {
    let mut out: Vec<Line> = Vec::new();
    for (i, (sku, quantity)) in lines.into_iter().enumerate() {
        if out.len() == MAX_LINES {
            return Err(Error::invalid_argument(
                "lines",
                format!("at most {MAX_LINES} lines"),
            ));
        }
        if !valid_sku(&sku) {
            return Err(Error::invalid_argument(
                format!("lines[{i}].sku"),
                format!("1 to {MAX_SKU_BYTES} of [a-z0-9_-]"),
            ));
        }
        if !(1..=MAX_QUANTITY).contains(&quantity) {
            return Err(Error::invalid_argument(
                format!("lines[{i}].quantity"),
                format!("1 to {MAX_QUANTITY}"),
            ));
        }
        if out.iter().any(|l| l.sku == sku) {
            return Err(Error::invalid_argument(
                format!("lines[{i}].sku"),
                format!("{sku} appears twice; one line per SKU"),
            ));
        }
        out.push(Line {
            sku,
            quantity: i64::from(quantity),
        });
    }
    if out.is_empty() {
        return Err(Error::invalid_argument("lines", "at least one line"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_checked() {
        let ok = lines([("tea".to_owned(), 2), ("cups".to_owned(), 1)]).unwrap();
        assert_eq!(ok.len(), 2);
        let field = |l: Vec<(String, i32)>| lines(l).unwrap_err().metadata()["field"].clone();
        assert_eq!(field(vec![]), "lines");
        assert_eq!(field(vec![("Tea!".into(), 1)]), "lines[0].sku");
        assert_eq!(field(vec![("tea".into(), 0)]), "lines[0].quantity");
        assert_eq!(field(vec![("tea".into(), 1001)]), "lines[0].quantity");
        assert_eq!(
            field(vec![("tea".into(), 1), ("tea".into(), 1)]),
            "lines[1].sku"
        );
        assert_eq!(field(vec![("tea".into(), 1); 51]), "lines[1].sku");
        let many: Vec<_> = (0..51).map(|i| (format!("p{i}"), 1)).collect();
        assert_eq!(field(many), "lines");
        assert!(order_id("order-1").is_ok());
        assert!(order_id("a b").is_err());
    }
}
