//! The deadline of the request being handled, visible to everything the
//! handler calls.
//!
//! The server sets it (the smaller of its own request timeout and the
//! caller's `grpc-timeout` / `x-request-timeout-ms`) for the life of the
//! handler's future; client layers read it, send what is left downstream
//! and fail fast once nothing is left. A handler that spawns a task must
//! carry the deadline over with [`scope`] itself.

use std::{future::Future, time::Duration};

use tokio::time::Instant;

tokio::task_local! {
    static DEADLINE: Instant;
}

/// Runs `fut` with `deadline` as the current deadline.
pub fn scope<F: Future>(deadline: Instant, fut: F) -> Scoped<F> {
    // A nested scope can only shorten the deadline, never extend it.
    let deadline = current().map_or(deadline, |outer| outer.min(deadline));
    DEADLINE.scope(deadline, fut)
}

/// A future running with a deadline set ([`scope`]).
pub type Scoped<F> = tokio::task::futures::TaskLocalFuture<Instant, F>;

/// The current deadline, if the code runs inside a request that has one.
pub fn current() -> Option<Instant> {
    DEADLINE.try_with(|d| *d).ok()
}

/// The time left before the current deadline (zero once it has passed).
pub fn remaining() -> Option<Duration> {
    current().map(|d| d.saturating_duration_since(Instant::now()))
}

/// Formats a timeout as a `grpc-timeout` header value (at most 8 digits).
pub fn grpc_timeout_value(timeout: Duration) -> String {
    let (buf, len) = grpc_timeout_ascii(timeout);
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

/// [`grpc_timeout_value`] as a header value, formatted without allocating
/// a string first (it is set on every call that has a deadline).
pub fn grpc_timeout_header(timeout: Duration) -> http::HeaderValue {
    let (buf, len) = grpc_timeout_ascii(timeout);
    // Digits and a unit letter: always a valid header value.
    http::HeaderValue::from_bytes(&buf[..len]).unwrap_or(http::HeaderValue::from_static("0n"))
}

/// Up to 8 digits and the unit, in a buffer.
fn grpc_timeout_ascii(timeout: Duration) -> ([u8; 9], usize) {
    let micros = timeout.as_micros();
    let (n, unit) = if micros < 100_000_000 {
        (micros as u64, b'u')
    } else if timeout.as_millis() < 100_000_000 {
        (timeout.as_millis() as u64, b'm')
    } else {
        (timeout.as_secs().min(99_999_999), b'S')
    };
    let mut digits = [0u8; 9];
    let mut len = 0;
    let mut v = n;
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    digits[..len].reverse();
    digits[len] = unit;
    (digits, len + 1)
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H M S m u n).
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The HTTP header carrying the caller's remaining time in milliseconds.
pub const HTTP_TIMEOUT_HEADER: &str = "x-request-timeout-ms";

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn nested_scopes_only_shorten() {
        assert_eq!(current(), None);
        let now = Instant::now();
        scope(now + Duration::from_secs(5), async {
            assert_eq!(remaining(), Some(Duration::from_secs(5)));
            scope(now + Duration::from_secs(10), async {
                assert_eq!(
                    remaining(),
                    Some(Duration::from_secs(5)),
                    "an inner scope cannot extend"
                );
            })
            .await;
            scope(now + Duration::from_secs(1), async {
                assert_eq!(remaining(), Some(Duration::from_secs(1)));
                tokio::time::sleep(Duration::from_secs(2)).await;
                assert_eq!(remaining(), Some(Duration::ZERO));
            })
            .await;
        })
        .await;
    }

    #[test]
    fn parses_grpc_timeouts() {
        assert_eq!(
            parse_grpc_timeout(b"100m"),
            Some(Duration::from_millis(100))
        );
        assert_eq!(parse_grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout(b"99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        assert_eq!(
            parse_grpc_timeout(b"123456789S"),
            None,
            "more than 8 digits"
        );
        assert_eq!(parse_grpc_timeout(b"S"), None);
        assert_eq!(parse_grpc_timeout(b"10x"), None);
        assert_eq!(parse_grpc_timeout(b""), None);
        for d in [
            Duration::from_micros(1),
            Duration::from_millis(250),
            Duration::from_secs(200),
            Duration::from_secs(200_000),
        ] {
            let parsed = parse_grpc_timeout(grpc_timeout_value(d).as_bytes()).unwrap();
            assert!(
                parsed <= d && d - parsed < Duration::from_secs(1),
                "{d:?} -> {parsed:?}"
            );
        }
    }

    #[test]
    fn formats_grpc_timeouts_within_8_digits() {
        assert_eq!(grpc_timeout_value(Duration::from_millis(250)), "250000u");
        assert_eq!(grpc_timeout_value(Duration::ZERO), "0u");
        assert_eq!(
            grpc_timeout_header(Duration::from_micros(99_999_999)),
            "99999999u"
        );
        assert_eq!(grpc_timeout_value(Duration::from_secs(200)), "200000m");
        assert_eq!(grpc_timeout_value(Duration::from_secs(200_000)), "200000S");
    }
}
