//! The etcd layer: every key under a prefix is one setting.
//!
//! `{prefix}server/request_timeout` (or `{prefix}server.request_timeout`)
//! with value `"5s"` sets `server.request_timeout`. Values are JSON when
//! they parse as such, otherwise strings. The prefix is mirrored with
//! [`trellis_etcd::mirror_prefix`], so the layer follows puts and deletes,
//! resumes after outages and survives compaction.

use std::sync::Arc;

use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::{
    ConfigError,
    source::{BoxFuture, Source},
    value::{Layer, scalar, set_path},
};

type Entries = Arc<[(String, String, i64)]>;

pub(crate) struct RemoteSource {
    prefix: String,
    rx: watch::Receiver<Entries>,
}

impl RemoteSource {
    pub(crate) async fn connect(
        endpoints: &[String],
        prefix: &str,
        tls: &trellis_etcd::EtcdTls,
    ) -> Result<Self, ConfigError> {
        let unavailable = |e: etcd_client::Error| ConfigError::Unavailable {
            source_name: format!("etcd {prefix}"),
            reason: e.to_string(),
        };
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(3))
            .with_timeout(std::time::Duration::from_secs(3));
        let options = tls
            .apply(options)
            .map_err(|reason| ConfigError::Unavailable {
                source_name: format!("etcd {prefix}"),
                reason,
            })?;
        let client = etcd_client::Client::connect(endpoints, Some(options))
            .await
            .map_err(unavailable)?;
        let strip = prefix.to_owned();
        let rx = trellis_etcd::mirror_prefix(client, prefix, move |kv| {
            let key = kv.key_str().ok()?.strip_prefix(&strip)?.to_owned();
            let value = kv.value_str().ok()?.to_owned();
            Some((key, value, kv.mod_revision()))
        })
        .await
        .map_err(unavailable)?;
        Ok(RemoteSource {
            prefix: prefix.to_owned(),
            rx,
        })
    }
}

impl Source for RemoteSource {
    /// The prefix as one layer (an error if it breaks the limits).
    fn load(&mut self) -> BoxFuture<'_, Result<Vec<Layer>, ConfigError>> {
        let entries = self.rx.borrow_and_update().clone();
        let layer = to_layer(&self.prefix, &entries).map(|l| vec![l]);
        Box::pin(std::future::ready(layer))
    }

    /// The prefix changed; `false` if the mirror ended.
    fn changed(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async move { self.rx.changed().await.is_ok() })
    }
}

/// How deep a setting may nest: key segments plus the levels of a JSON
/// value. Anyone who can write under the prefix reaches every service
/// watching it, so a key of ten thousand segments must be refused before
/// it is built into a document (dropping one that deep overflows the stack).
pub const MAX_DEPTH: usize = 32;
/// The most bytes of keys and values under one prefix.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// A key for an error message: a bounded prefix of it.
fn shown(key: &str) -> String {
    match key.char_indices().nth(120) {
        Some((cut, _)) => format!("{}… ({} bytes)", &key[..cut], key.len()),
        None => key.to_owned(),
    }
}

/// Levels of nesting in a parsed JSON value (serde_json parses at most
/// 128, so this recursion is bounded).
fn value_depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(value_depth).max().unwrap_or(0),
        Value::Array(items) => 1 + items.iter().map(value_depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn to_layer(prefix: &str, entries: &[(String, String, i64)]) -> Result<Layer, ConfigError> {
    let source = format!("etcd {prefix}");
    let too_much = |key: &str, reason: String| ConfigError::Limit {
        key: shown(key),
        source_name: source.clone(),
        reason,
    };
    let total: usize = entries.iter().map(|(k, v, _)| k.len() + v.len()).sum();
    if total > MAX_DOCUMENT_BYTES {
        return Err(too_much(
            "(all keys)",
            format!("{total} bytes of settings, over the {MAX_DOCUMENT_BYTES}-byte limit"),
        ));
    }
    let mut doc = Value::Object(Map::new());
    let mut revision = 0;
    for (key, value, rev) in entries {
        let segments = key.split(['/', '.']).filter(|s| !s.is_empty()).count();
        if segments > MAX_DEPTH {
            return Err(too_much(
                key,
                format!("{segments} levels deep, over the limit of {MAX_DEPTH}"),
            ));
        }
        if segments == 0 {
            continue;
        }
        let value = scalar(value);
        let depth = segments + value_depth(&value);
        if depth > MAX_DEPTH {
            return Err(too_much(
                key,
                format!("nests {depth} levels with its value, over the limit of {MAX_DEPTH}"),
            ));
        }
        let segments: Vec<String> = key
            .split(['/', '.'])
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        set_path(&mut doc, &segments, value);
        revision = revision.max(*rev);
    }
    Ok(Layer {
        source,
        doc,
        version: Some(format!("revision {revision}")),
    })
}

/// Splits `etcd://host:port[,host:port]/prefix` into endpoints and a prefix
/// ending in `/`.
pub fn parse_url(url: &str) -> Result<(Vec<String>, String), String> {
    parse_url_tls(url).map(|(endpoints, prefix, _)| (endpoints, prefix))
}

/// [`parse_url`], with the TLS parameters of its query
/// (`?ca_file=…&cert_file=…&key_file=…`; endpoints then `https://`).
pub fn parse_url_tls(url: &str) -> Result<(Vec<String>, String, trellis_etcd::EtcdTls), String> {
    let rest = url
        .strip_prefix("etcd://")
        .ok_or_else(|| format!("{url:?} is not an etcd:// URL"))?;
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut tls = trellis_etcd::EtcdTls::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let taken = pair.split_once('=').is_some_and(|(k, v)| tls.take(k, v));
        if !taken {
            return Err(format!(
                "{url:?}: unknown option {pair:?}; known: ca_file, cert_file, key_file"
            ));
        }
    }
    let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
    let scheme = tls.scheme();
    let endpoints: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("{scheme}://{h}"))
        .collect();
    if endpoints.is_empty() {
        return Err(format!("{url:?} names no etcd endpoint"));
    }
    let prefix = format!("/{}", path.trim_matches('/'));
    let prefix = if prefix == "/" {
        "/trellis/config/".to_owned()
    } else {
        format!("{prefix}/")
    };
    Ok((endpoints, prefix, tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            parse_url("etcd://a:1,b:2/trellis/config").unwrap(),
            (
                vec!["http://a:1".to_owned(), "http://b:2".to_owned()],
                "/trellis/config/".to_owned()
            )
        );
        assert_eq!(parse_url("etcd://a:1").unwrap().1, "/trellis/config/");
        assert!(parse_url("http://a:1").is_err());
        assert!(parse_url("etcd:///x").is_err());
        let (endpoints, prefix, tls) = parse_url_tls(
            "etcd://a:1,b:2/cfg?ca_file=/c/ca.pem&cert_file=/c/s.pem&key_file=/c/k.pem",
        )
        .unwrap();
        assert_eq!(endpoints, ["https://a:1", "https://b:2"]);
        assert_eq!(prefix, "/cfg/");
        assert_eq!(
            tls.ca_file.as_deref(),
            Some(std::path::Path::new("/c/ca.pem"))
        );
        assert!(parse_url_tls("etcd://a:1?bogus=1").is_err());
    }

    #[test]
    fn deep_or_large_settings_are_refused_naming_key_and_limit() {
        let deep = vec!["a"; 10_000].join("/");
        let err = to_layer("/p/", &[(deep, "1".into(), 1)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("10000 levels deep, over the limit of 32"),
            "{err}"
        );
        assert!(
            err.contains("(from etcd /p/)") && err.contains("a/a/a"),
            "{err}"
        );
        assert!(
            err.len() < 400,
            "the key is shown bounded: {} bytes",
            err.len()
        );

        let nested = format!("{}1{}", "[".repeat(30), "]".repeat(30));
        let err = to_layer("/p/", &[("a/b/c".into(), nested, 1)]).unwrap_err();
        assert!(err.to_string().contains("nests 33 levels"), "{err}");

        let at_limit = vec!["a"; 32].join("/");
        assert!(to_layer("/p/", &[(at_limit, "1".into(), 1)]).is_ok());

        let big = "x".repeat(600 * 1024);
        let err = to_layer("/p/", &[("a".into(), big.clone(), 1), ("b".into(), big, 2)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("over the 1048576-byte limit"), "{err}");
    }

    #[test]
    fn keys_become_paths() {
        let layer = to_layer(
            "/p/",
            &[
                ("server/request_timeout".into(), "5s".into(), 7),
                ("db.max_connections".into(), "16".into(), 9),
                ("flags".into(), r#"{"a":true}"#.into(), 3),
            ],
        )
        .unwrap();
        assert_eq!(
            layer.doc,
            serde_json::json!({"server": {"request_timeout": "5s"}, "db": {"max_connections": 16}, "flags": {"a": true}})
        );
        assert_eq!(layer.version.as_deref(), Some("revision 9"));
    }
}
