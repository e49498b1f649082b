//! The services the CLI runs: one list of definitions that `up`, `serve`,
//! `openapi` and `config set` all read. Adding a service to the shop is
//! implementing `trellis::service::Service` and one line in [`ALL`].

use std::path::Path;

use trellis::service::{ConfigSources, Definition, StartError};

/// Every service of the shop, in start order.
pub const ALL: &[&dyn Definition] = &[
    <dyn Definition>::of::<shop_user::UserService>(),
    <dyn Definition>::of::<shop_auth::AuthService>(),
    <dyn Definition>::of::<trellis_saga::service::Coordinator>(),
    <dyn Definition>::of::<shop_inventory::InventoryService>(),
    <dyn Definition>::of::<shop_payment::PaymentService>(),
    <dyn Definition>::of::<shop_order::OrderService>(),
];

/// The services whose routes `up`'s gateway serves without a token: the
/// one that hands tokens out, and the catalogue (read-only; its stock
/// branches are not routed).
pub const PUBLIC: &[&str] = &[shop_auth::SERVICE, shop_inventory::SERVICE];

/// The services `up`'s gateway does not route at all: the saga
/// coordinator's API is for services and operators (`trellis saga`), not
/// for the shop's customers.
pub const INTERNAL: &[&str] = &[trellis_saga::service::SERVICE];

/// The service called `name`.
pub fn find(name: &str) -> Option<&'static dyn Definition> {
    ALL.iter().copied().find(|d| d.name() == name)
}

/// The services' names, for the command line's choices.
pub fn names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(ALL.iter().map(|d| d.name()))
}

/// The service's port relative to a base (the gateway will take base + 0);
/// 0 stays 0 (a free port).
pub fn port(service: &dyn Definition, base: u16) -> u16 {
    if base == 0 {
        0
    } else {
        base.saturating_add(service.port_offset())
    }
}

/// For `serve`: `--config` is the service's file or directory.
pub fn sources_for_serve(path: Option<std::path::PathBuf>, etcd: Option<String>) -> ConfigSources {
    ConfigSources {
        files: path.into_iter().collect(),
        etcd,
        set: Vec::new(),
    }
}

/// For `up`: `--config` is a directory holding `{service}.toml|yaml|yml|json`
/// and/or a `{service}/` directory per service.
pub fn sources_for_up(
    service: &dyn Definition,
    dir: Option<&Path>,
    etcd: Option<String>,
) -> Result<ConfigSources, String> {
    let mut files = Vec::new();
    if let Some(dir) = dir {
        if !dir.is_dir() {
            return Err(format!(
                "--config {} is not a directory; for `trellis up` it holds one file per service, e.g. {}.toml",
                dir.display(),
                service.name()
            ));
        }
        for ext in ["toml", "yaml", "yml", "json"] {
            let f = dir.join(format!("{}.{ext}", service.name()));
            if f.is_file() {
                files.push(f);
            }
        }
        let sub = dir.join(service.name());
        if sub.is_dir() {
            files.push(sub);
        }
    }
    Ok(ConfigSources {
        files,
        etcd,
        set: Vec::new(),
    })
}

/// A message for the operator, naming the flag that fixes a taken port.
pub fn explain(error: &StartError, service: &str, flag: &str, data_dir: &Path) -> String {
    match (error.port_in_use(), error) {
        (Some(addr), _) => format!(
            "{service}: port {} is already in use on {}; choose another with {flag}",
            addr.port(),
            addr.ip()
        ),
        (None, StartError::Config(e)) => format!("{service}: config: {e}"),
        (None, other) => format!("{service}: {other} (data dir {})", data_dir.display()),
    }
}

/// The trust domain of the development certificates.
pub const TRUST_DOMAIN: &str = "trellis";

/// For `up --tls`: the shop's development CA and certificates under
/// `{data_dir}/certs`, made on first use (every service and the gateway).
pub fn dev_certs(data_dir: &Path) -> Result<std::path::PathBuf, String> {
    let dir = data_dir.join("certs");
    if !dir.join("ca.pem").exists() {
        let mut names: Vec<&str> = ALL.iter().map(|d| d.name()).collect();
        names.push("gateway");
        trellis::transport::certs::init(&dir, TRUST_DOMAIN, &names).map_err(|e| e.to_string())?;
    }
    Ok(dir)
}

/// The services on the event bus (and so with `events` settings): the
/// outboxes' publishers and the user service's notifications consumer.
pub const EVENTFUL: &[&str] = &[
    shop_user::SERVICE,
    shop_order::SERVICE,
    shop_inventory::SERVICE,
    shop_payment::SERVICE,
];

/// The settings that move `service`'s shared state to the engines the
/// flags name: for `--redis URL`, idempotency keys, the user cache and the
/// order sweep's lock in that Redis; for `--events URL`, the outboxes'
/// bus (and the order history's and the notifications' source); for `--registry etcd://…` (and
/// no `--redis`), the order sweep's lock in that etcd.
pub fn engine_settings(
    service: &dyn Definition,
    redis: &Option<String>,
    events: &Option<String>,
    registry: &str,
) -> Vec<(String, String, String)> {
    let mut set = Vec::new();
    if let Some(url) = events
        && EVENTFUL.contains(&service.name())
    {
        set.push(("--events", "events.url", url.clone()));
    }
    if let Some(url) = redis {
        set.push(("--redis", "server.idempotency.store", url.clone()));
        if service.name() == shop_user::SERVICE {
            set.push(("--redis", "cache.redis", url.clone()));
        }
        if service.name() == shop_order::SERVICE {
            set.push(("--redis", "locks", url.clone()));
        }
    } else if registry.starts_with("etcd://") && service.name() == shop_order::SERVICE {
        // The registry's endpoints and TLS options, without its own (ttl).
        let (hosts, query) = registry.split_once('?').unwrap_or((registry, ""));
        let tls: Vec<&str> = query
            .split('&')
            .filter(|p| {
                p.starts_with("ca_file=")
                    || p.starts_with("cert_file=")
                    || p.starts_with("key_file=")
            })
            .collect();
        let url = match tls.is_empty() {
            true => hosts.to_owned(),
            false => format!("{hosts}?{}", tls.join("&")),
        };
        set.push(("--registry", "locks", url));
    }
    set.into_iter()
        .map(|(flag, key, value)| (flag.to_owned(), key.to_owned(), value))
        .collect()
}

/// For `up --tls`: the settings that put `service` on mutual TLS with the
/// certificates in `certs` — its server, and the clients it has.
pub fn tls_settings(service: &dyn Definition, certs: &Path) -> Vec<(String, String, String)> {
    use trellis::transport::certs::DevCerts;
    let (cert, key) = DevCerts::paths(certs, service.name());
    let ca = certs.join("ca.pem");
    let path = |p: &Path| p.display().to_string();
    let set = vec![
        ("server.tls.cert_file", path(&cert)),
        ("server.tls.key_file", path(&key)),
        ("server.tls.client_ca_file", path(&ca)),
    ];
    // The clients a service has, where its settings keep them.
    let client = match service.name() {
        shop_auth::SERVICE => Some("users.client.tls"),
        shop_order::SERVICE => Some("client.tls"),
        trellis_saga::service::SERVICE => Some("participants.tls"),
        _ => None,
    };
    let keys: Vec<(String, String)> = client
        .map(|prefix| {
            vec![
                (format!("{prefix}.ca_file"), path(&ca)),
                (format!("{prefix}.cert_file"), path(&cert)),
                (format!("{prefix}.key_file"), path(&key)),
            ]
        })
        .unwrap_or_default();
    set.into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .chain(keys)
        .map(|(k, v)| ("--tls".to_owned(), k, v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_move_shared_state() {
        let find = |name| ALL.iter().copied().find(|s| s.name() == name).unwrap();
        let keys = |set: Vec<(String, String, String)>| -> Vec<(String, String)> {
            set.into_iter().map(|(_, k, v)| (k, v)).collect()
        };
        let redis = Some("redis://r:6379".to_owned());
        assert_eq!(
            keys(engine_settings(find("user"), &redis, &None, "memory://")),
            [
                ("server.idempotency.store".into(), "redis://r:6379".into()),
                ("cache.redis".into(), "redis://r:6379".into())
            ]
        );
        assert!(
            keys(engine_settings(find("order"), &redis, &None, "memory://"))
                .contains(&("locks".into(), "redis://r:6379".into()))
        );
        // Without Redis the sweep's lock goes to the etcd registry, with
        // its TLS options and without its own.
        assert_eq!(
            keys(engine_settings(
                find("order"),
                &None,
                &None,
                "etcd://e1:2379,e2:2379?ttl=5s&ca_file=/c.pem"
            )),
            [(
                "locks".into(),
                "etcd://e1:2379,e2:2379?ca_file=/c.pem".into()
            )]
        );
        assert!(engine_settings(find("user"), &None, &None, "etcd://e1:2379").is_empty());
        let nats = Some("nats://n:4222".to_owned());
        for service in ["user", "order", "inventory", "payment"] {
            assert_eq!(
                keys(engine_settings(find(service), &None, &nats, "memory://")),
                vec![("events.url".into(), "nats://n:4222".into())],
                "{service}"
            );
        }
        assert!(engine_settings(find("auth"), &None, &nats, "memory://").is_empty());
    }
}
