//! The payment rules: what a charge may be.

use trellis::Error;

/// Bytes of a user or order id.
pub const MAX_ID_BYTES: usize = 64;
/// The largest single charge, in cents.
pub const MAX_AMOUNT_CENTS: i64 = 1_000_000_000;

/// Checks an id field (`user_id`, `order_id`): 1 to 64 of `[A-Za-z0-9_-]`.
pub fn id(field: &str, value: &str) -> Result<(), Error> {
    let ok = !value.is_empty()
        && value.len() <= MAX_ID_BYTES
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_argument(
            field,
            format!("1 to {MAX_ID_BYTES} of [A-Za-z0-9_-]"),
        ))
    }
}

/// Checks an amount: 1 cent to [`MAX_AMOUNT_CENTS`].
pub fn amount(cents: i64) -> Result<(), Error> {
    if (1..=MAX_AMOUNT_CENTS).contains(&cents) {
        Ok(())
    } else {
        Err(Error::invalid_argument(
            "amount_cents",
            format!("1 to {MAX_AMOUNT_CENTS}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_amounts_are_checked() {
        assert!(id("user_id", "0192f7c1-aaaa").is_ok());
        assert_eq!(
            id("user_id", "").unwrap_err().metadata()["field"],
            "user_id"
        );
        assert!(id("order_id", &"x".repeat(65)).is_err());
        assert!(amount(1).is_ok());
        assert!(amount(0).is_err());
        assert!(amount(-5).is_err());
        assert!(amount(MAX_AMOUNT_CENTS + 1).is_err());
    }
}
