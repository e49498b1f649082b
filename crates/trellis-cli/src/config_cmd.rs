//! `trellis config get|set|watch`: settings in the etcd config centre.
//!
//! A key is `SERVICE/PATH`, e.g. `user/server.request_timeout`, stored at
//! `{prefix}/{service}/{path}`. `set` checks the value against the
//! service's config type before writing, so a typo never reaches a running
//! service (which would reject it anyway and keep its last good config).
//! Settings that are secrets in the service's type are printed as
//! `[redacted]` by all three.

use clap::Subcommand;
use etcd_client::{Client, GetOptions};

use crate::services;

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Print a setting's value.
    Get {
        /// SERVICE/PATH, e.g. user/server.request_timeout.
        key: String,
        #[command(flatten)]
        source: Source,
    },
    /// Change a setting (checked against the service's config first).
    Set {
        /// SERVICE/PATH, e.g. user/server.request_timeout.
        key: String,
        /// The value: JSON (5, true, "text", {...}) or plain text (5s).
        value: String,
        #[command(flatten)]
        source: Source,
    },
    /// Print a service's settings (or those under a key) as they change.
    Watch {
        /// SERVICE or SERVICE/PATH.
        key: String,
        #[command(flatten)]
        source: Source,
    },
}

#[derive(clap::Args)]
pub struct Source {
    /// The config centre: etcd://host:port[,host:port]/prefix.
    #[arg(long = "config-source", env = "TRELLIS_CONFIG_SOURCE")]
    config_source: String,
}

impl Source {
    async fn connect(&self) -> Result<(Client, String), String> {
        let (endpoints, prefix, tls) = trellis::config::parse_etcd_url_tls(&self.config_source)
            .map_err(|e| format!("--config-source: {e}"))?;
        let options = tls
            .apply(etcd_client::ConnectOptions::new())
            .map_err(|e| format!("--config-source: {e}"))?;
        let client = Client::connect(&endpoints, Some(options))
            .await
            .map_err(|e| format!("cannot reach {}: {e}", self.config_source))?;
        Ok((client, prefix))
    }
}

/// `SERVICE/PATH` → (service, path).
fn split_key(key: &str) -> Result<(&str, &str), String> {
    match key.split_once('/') {
        Some((service, path)) if !service.is_empty() && !path.is_empty() => Ok((service, path)),
        _ => Err(format!(
            "key {key:?} must be SERVICE/PATH, e.g. user/server.request_timeout"
        )),
    }
}

pub async fn run(command: ConfigCommand) -> Result<(), String> {
    match command {
        ConfigCommand::Get { key, source } => {
            let (service, path) = split_key(&key)?;
            let (mut client, prefix) = source.connect().await?;
            let full = format!("{prefix}{service}/{path}");
            let resp = client
                .get(full.as_str(), None)
                .await
                .map_err(|e| e.to_string())?;
            match resp.kvs().first() {
                Some(kv) => {
                    println!(
                        "{}",
                        shown(service, path, &String::from_utf8_lossy(kv.value()))
                    );
                    Ok(())
                }
                None => Err(format!(
                    "{key} is not set in {} (the service uses its default or a lower layer)",
                    source.config_source
                )),
            }
        }
        ConfigCommand::Set { key, value, source } => {
            let (service, path) = split_key(&key)?;
            match services::find(service) {
                Some(known) => known
                    .check_setting(path, &value)
                    .map_err(|e| format!("refusing to set {key}: {e}"))?,
                None => eprintln!(
                    "warning: unknown service {service:?}: writing {key} without checking it"
                ),
            }
            let (mut client, prefix) = source.connect().await?;
            let full = format!("{prefix}{service}/{path}");
            let resp = client
                .put(full.as_str(), value.as_str(), None)
                .await
                .map_err(|e| e.to_string())?;
            let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
            println!(
                "{key} = {} (revision {revision})",
                shown(service, path, &value)
            );
            Ok(())
        }
        ConfigCommand::Watch { key, source } => {
            let (mut client, prefix) = source.connect().await?;
            let full = format!("{prefix}{}", key.trim_end_matches('/'));
            let initial = client
                .get(full.as_str(), Some(GetOptions::new().with_prefix()))
                .await
                .map_err(|e| e.to_string())?;
            for kv in initial.kvs() {
                let key = String::from_utf8_lossy(kv.key());
                let key = key.strip_prefix(&prefix).unwrap_or(&key);
                println!(
                    "{key} = {}",
                    shown_key(key, &String::from_utf8_lossy(kv.value()))
                );
            }
            let strip = prefix.clone();
            let mut rx = trellis_etcd_mirror(client, full, strip).await?;
            let mut last = rx.borrow_and_update().clone();
            while rx.changed().await.is_ok() {
                let now = rx.borrow_and_update().clone();
                for (k, v) in now.iter() {
                    if !last.iter().any(|(lk, lv)| lk == k && lv == v) {
                        println!("{k} = {}", shown_key(k, v));
                    }
                }
                for (k, _) in last.iter() {
                    if !now.iter().any(|(nk, _)| nk == k) {
                        println!("{k} removed");
                    }
                }
                last = now;
            }
            Ok(())
        }
    }
}

async fn trellis_etcd_mirror(
    client: Client,
    prefix: String,
    strip: String,
) -> Result<tokio::sync::watch::Receiver<std::sync::Arc<[(String, String)]>>, String> {
    trellis::config::etcd_mirror(client, prefix, move |kv| {
        let key = kv.key_str().ok()?.strip_prefix(&strip)?.to_owned();
        Some((key, kv.value_str().ok()?.to_owned()))
    })
    .await
    .map_err(|e| e.to_string())
}

/// `value` as printed for `service`'s setting `path`: redacted when the
/// service's settings type holds a secret there. An unknown service's
/// values are printed as they are (nothing says what is secret in them).
fn shown(service: &str, path: &str, value: &str) -> String {
    match services::find(service) {
        Some(known) if known.is_secret(path) => trellis::core::REDACTED.to_owned(),
        _ => value.to_owned(),
    }
}

/// [`shown`] for a `SERVICE/PATH` key.
fn shown_key(key: &str, value: &str) -> String {
    match split_key(key) {
        Ok((service, path)) => shown(service, path, value),
        Err(_) => value.to_owned(),
    }
}
