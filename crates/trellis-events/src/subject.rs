//! Bus subjects (`events.order.created`) and filters (`events.order.*`,
//! `events.>`), as NATS spells them.

/// The longest subject or filter accepted.
pub const MAX_SUBJECT_BYTES: usize = 256;

fn check(text: &str, wildcards: bool) -> Result<(), String> {
    if text.is_empty() || text.len() > MAX_SUBJECT_BYTES {
        return Err(format!(
            "subject {text:?} must be 1-{MAX_SUBJECT_BYTES} bytes"
        ));
    }
    let tokens: Vec<&str> = text.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        let ok = !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'.' && b != b'*' && b != b'>')
            || (wildcards && *token == "*")
            || (wildcards && *token == ">" && i == tokens.len() - 1);
        if !ok {
            return Err(format!(
                "subject {text:?}: token {:?} is not valid (printable, no spaces{})",
                token,
                if wildcards {
                    "; `*` for one token, `>` last for the rest"
                } else {
                    ", no wildcards"
                }
            ));
        }
    }
    Ok(())
}

/// Checks a subject to publish on: dot-separated printable tokens, no
/// wildcards.
pub fn check_subject(subject: &str) -> Result<(), String> {
    check(subject, false)
}

/// Checks a filter: a subject whose tokens may be `*` (any one) or, last,
/// `>` (one or more).
pub fn check_filter(filter: &str) -> Result<(), String> {
    check(filter, true)
}

/// Whether `subject` matches `filter`.
pub fn matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(matches("events.>", "events.order.created"));
        assert!(matches("events.*.created", "events.order.created"));
        assert!(!matches("events.*", "events.order.created"));
        assert!(!matches("events.>", "events"));
        assert!(matches("events.order", "events.order"));
        assert!(!matches("events.order", "events.orders"));
        assert!(check_subject("events.order.created").is_ok());
        assert!(check_subject("events.*").is_err());
        assert!(check_subject("events..x").is_err());
        assert!(check_subject("events. x").is_err());
        assert!(check_filter("events.>.x").is_err());
        assert!(check_filter("events.*.x.>").is_ok());
        assert!(check_subject(&"a".repeat(MAX_SUBJECT_BYTES + 1)).is_err());
    }
}
