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
    value::{Layer, scalar, set_path},
};

type Entries = Arc<[(String, String, i64)]>;

pub(crate) struct RemoteSource {
    prefix: String,
    rx: watch::Receiver<Entries>,
}

impl RemoteSource {
    pub(crate) async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, ConfigError> {
        let unavailable = |e: etcd_client::Error| ConfigError::Unavailable {
            source_name: format!("etcd {prefix}"),
            reason: e.to_string(),
        };
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(3))
            .with_timeout(std::time::Duration::from_secs(3));
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

    pub(crate) fn layer(&self) -> Layer {
        to_layer(&self.prefix, &self.rx.borrow())
    }

    /// The next layer, once the prefix changes; `None` if the mirror ended.
    pub(crate) async fn changed(&mut self) -> Option<Layer> {
        self.rx.changed().await.ok()?;
        let entries = self.rx.borrow_and_update().clone();
        Some(to_layer(&self.prefix, &entries))
    }
}

fn to_layer(prefix: &str, entries: &[(String, String, i64)]) -> Layer {
    let mut doc = Value::Object(Map::new());
    let mut revision = 0;
    for (key, value, rev) in entries {
        let segments: Vec<String> = key
            .split(['/', '.'])
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if !segments.is_empty() {
            set_path(&mut doc, &segments, scalar(value));
        }
        revision = revision.max(*rev);
    }
    Layer {
        source: format!("etcd {prefix}"),
        doc,
        version: Some(format!("revision {revision}")),
    }
}

/// Splits `etcd://host:port[,host:port]/prefix` into endpoints and a prefix
/// ending in `/`.
pub fn parse_url(url: &str) -> Result<(Vec<String>, String), String> {
    let rest = url
        .strip_prefix("etcd://")
        .ok_or_else(|| format!("{url:?} is not an etcd:// URL"))?;
    let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
    let endpoints: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("http://{h}"))
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
    Ok((endpoints, prefix))
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
        );
        assert_eq!(
            layer.doc,
            serde_json::json!({"server": {"request_timeout": "5s"}, "db": {"max_connections": 16}, "flags": {"a": true}})
        );
        assert_eq!(layer.version.as_deref(), Some("revision 9"));
    }
}
