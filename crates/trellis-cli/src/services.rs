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

/// For `--redis URL`: the settings that move `service`'s shared state to
/// that Redis.
pub fn engine_settings(
    service: &dyn Definition,
    redis: &Option<String>,
) -> Vec<(String, String, String)> {
    let Some(url) = redis else {
        return Vec::new();
    };
    let _ = service;
    vec![(
        "--redis".to_owned(),
        "server.idempotency.store".to_owned(),
        url.clone(),
    )]
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
