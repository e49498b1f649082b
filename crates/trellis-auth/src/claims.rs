//! What a verified token says: who (subject, tenant), for whom (issuer,
//! audience), until when, and what it grants (roles, permissions, scope).

use serde::{Deserialize, Deserializer, Serialize};

/// The claims of a verified access token. Registered claims (RFC 7519
/// §4.1) plus the platform's: `roles`, `permissions`, OAuth's `scope` (a
/// space-separated list) and `tenant`. Other claims are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who issued the token.
    pub iss: String,
    /// Whom the token is about: the user or service.
    pub sub: String,
    /// For whom the token is meant: one audience or several.
    #[serde(deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Not valid before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// The token's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Roles granted to the subject.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Permissions granted to the subject.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<String>,
    /// OAuth 2.0 scopes, space-separated (RFC 8693 §4.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The tenant the subject acts in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl Claims {
    /// Whether the token grants `permission`: as a role, a permission or a
    /// scope.
    pub fn grants(&self, permission: &str) -> bool {
        self.roles.iter().any(|r| r == permission)
            || self.permissions.iter().any(|p| p == permission)
            || self
                .scope
                .as_deref()
                .is_some_and(|s| s.split(' ').any(|s| s == permission))
    }

    /// The first of `required` the token does not grant, if any.
    pub fn missing<'a>(&self, required: &'a [String]) -> Option<&'a str> {
        required
            .iter()
            .find(|p| !self.grants(p))
            .map(String::as_str)
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audience_is_one_or_many_and_grants_read_every_list() {
        let one: Claims = serde_json::from_value(serde_json::json!({
            "iss": "i", "sub": "s", "aud": "shop", "exp": 1,
            "roles": ["admin"], "permissions": ["orders:read"], "scope": "a b",
        }))
        .unwrap();
        assert_eq!(one.aud, ["shop"]);
        assert!(one.grants("admin") && one.grants("orders:read") && one.grants("b"));
        assert!(!one.grants("orders:write") && !one.grants("a b") && !one.grants(""));
        let required = ["admin".to_owned(), "orders:write".to_owned()];
        assert_eq!(one.missing(&required), Some("orders:write"));
        let many: Claims = serde_json::from_value(serde_json::json!({
            "iss": "i", "sub": "s", "aud": ["a", "b"], "exp": 1,
        }))
        .unwrap();
        assert_eq!(many.aud, ["a", "b"]);
        assert_eq!(many.missing(&[]), None);
    }
}
