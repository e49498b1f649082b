//! Values that must not appear in `/debug/config`, logs, error messages or
//! `trellis config get`, and URLs whose credentials must not either.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error as _};

/// What a secret shows instead of its value.
pub const REDACTED: &str = "[redacted]";

/// A secret setting: reads like its inner value, but serializes and prints
/// as `[redacted]`. Use [`Secret::expose`] where the value is needed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The value itself.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> Serialize for Secret<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Secret<T> {
    /// A value that does not parse is refused without quoting it (serde's
    /// own messages quote what they found: `invalid type: string "hunter2"`).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d)
            .map(Secret)
            .map_err(|_| D::Error::custom("invalid value (not shown: it is a secret)"))
    }
}

/// Query parameters whose values are credentials (compared without case).
const SECRET_PARAMS: [&str; 10] = [
    "password",
    "passwd",
    "pwd",
    "sslpassword",
    "secret",
    "token",
    "access_token",
    "api_key",
    "apikey",
    "auth",
];

/// `url` with its credentials replaced by `***`: the password in the
/// userinfo (`postgres://app:***@db/shop`) and the values of query
/// parameters that carry one (`?password=***`, `sslpassword`, `token`,
/// `api_key` …, in any case). For messages, logs and debug views; text that
/// is not a URL comes back as it is.
pub fn redact_url(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (url, None),
    };
    let mut out = String::with_capacity(url.len());
    match head.find("://") {
        Some(scheme_end) => {
            let authority_start = scheme_end + 3;
            let authority_end = head[authority_start..]
                .find('/')
                .map_or(head.len(), |i| authority_start + i);
            let authority = &head[authority_start..authority_end];
            out.push_str(&head[..authority_start]);
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    match userinfo.split_once(':') {
                        Some((user, _)) => {
                            out.push_str(user);
                            out.push_str(":***");
                        }
                        None => out.push_str(userinfo),
                    }
                    out.push('@');
                    out.push_str(host);
                }
                None => out.push_str(authority),
            }
            out.push_str(&head[authority_end..]);
        }
        None => out.push_str(head),
    }
    if let Some(query) = query {
        out.push('?');
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((key, _)) if SECRET_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(key)) => {
                    out.push_str(key);
                    out.push_str("=***");
                }
                _ => out.push_str(pair),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials_in_every_spelling() {
        for (url, shown) in [
            (
                "postgres://app:hunter2@db:5432/shop",
                "postgres://app:***@db:5432/shop",
            ),
            (
                "postgresql://app:p%40ss@db/shop",
                "postgresql://app:***@db/shop",
            ),
            ("postgres://app:a@b@db/shop", "postgres://app:***@db/shop"),
            (
                "postgres://app@db/shop?password=hunter2",
                "postgres://app@db/shop?password=***",
            ),
            (
                "postgres://db/shop?user=app&PASSWORD=hunter2&sslmode=require",
                "postgres://db/shop?user=app&PASSWORD=***&sslmode=require",
            ),
            (
                "postgres://db/shop?sslpassword=k",
                "postgres://db/shop?sslpassword=***",
            ),
            ("http://u:t@collector:4317", "http://u:***@collector:4317"),
            (
                "https://collector/v1?api_key=abc",
                "https://collector/v1?api_key=***",
            ),
            ("sqlite://./.trellis/user.db", "sqlite://./.trellis/user.db"),
            ("sqlite::memory:", "sqlite::memory:"),
            ("http://collector:4317/a@b", "http://collector:4317/a@b"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
            assert!(!redact_url(url).contains("hunter2"));
        }
    }

    #[test]
    fn secrets_never_show_their_value() {
        let s = Secret::new("hunter2".to_owned());
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"[redacted]\"");
        let err = serde_json::from_str::<Secret<u32>>("\"hunter2\"").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
