//! Just enough DER (X.690) to walk a certificate or a key: one
//! tag-length-value at a time, every length checked against what is there,
//! so malformed input from a peer gives `None`, never a panic or an
//! allocation sized by an attacker.
//!
//! ```
//! // SEQUENCE { INTEGER 5 }
//! let der = [0x30, 0x03, 0x02, 0x01, 0x05];
//! let (seq, rest) = trellis_core::der::expect(&der, 0x30).unwrap();
//! assert!(rest.is_empty());
//! assert_eq!(trellis_core::der::expect(seq, 0x02), Some((&[5u8][..], &[][..])));
//! ```

/// SEQUENCE.
pub const SEQUENCE: u8 = 0x30;
/// INTEGER.
pub const INTEGER: u8 = 0x02;
/// OCTET STRING.
pub const OCTET_STRING: u8 = 0x04;
/// OBJECT IDENTIFIER.
pub const OID: u8 = 0x06;
/// BOOLEAN.
pub const BOOLEAN: u8 = 0x01;

/// One tag-length-value: `(tag, value, rest)`; `None` if `input` does not
/// start with a whole one (single-byte tags, definite lengths up to 4 bytes).
pub fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// [`tlv`], if its tag is `tag`: `(value, rest)`.
pub fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, value, rest) = tlv(input)?;
    (t == tag).then_some((value, rest))
}

/// An INTEGER's value without the leading zero DER adds to keep a positive
/// number positive: the big-endian magnitude.
pub fn unsigned(value: &[u8]) -> &[u8] {
    match value {
        [0, rest @ ..] if !rest.is_empty() => rest,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_past_the_input_are_refused() {
        assert_eq!(tlv(&[]), None);
        assert_eq!(tlv(&[0x30]), None);
        assert_eq!(tlv(&[0x30, 0x02, 0x01]), None);
        assert_eq!(tlv(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(tlv(&[0x30, 0x80]), None, "indefinite lengths are not DER");
        assert_eq!(
            tlv(&[0x04, 0x81, 0x01, 0xaa, 0xbb]),
            Some((0x04, &[0xaa][..], &[0xbb][..]))
        );
        assert_eq!(unsigned(&[0, 0x80]), &[0x80]);
        assert_eq!(unsigned(&[0]), &[0]);
    }
}
