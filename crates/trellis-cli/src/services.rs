//! The reference services the CLI runs: their default ports, how their
//! config is found, and how each is started.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::ValueEnum;
use tokio::sync::watch;
use trellis::{
    App, AppBuilder,
    config::{Config, ConfigError},
    transport::ServerConfig,
};

/// A service of the reference shop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Service {
    /// User accounts.
    User,
}

/// Where a service's config comes from.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    /// Files: the `--config` path (for `up`, the service's files inside it).
    pub files: Vec<PathBuf>,
    /// `etcd://host:port/prefix`; the service reads `{prefix}/{service}/`.
    pub etcd: Option<String>,
}

impl ConfigSources {
    /// For `serve`: `--config` is the service's file or directory.
    pub fn for_serve(path: Option<PathBuf>, etcd: Option<String>) -> Self {
        ConfigSources {
            files: path.into_iter().collect(),
            etcd,
        }
    }

    /// For `up`: `--config` is a directory holding `{service}.toml|yaml|yml|json`
    /// and/or a `{service}/` directory per service.
    pub fn for_up(
        service: Service,
        dir: Option<&Path>,
        etcd: Option<String>,
    ) -> Result<Self, String> {
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
        Ok(ConfigSources { files, etcd })
    }
}

/// The settings the CLI itself reads from a service's config.
pub struct Common {
    pub shutdown_timeout: Duration,
    pub pre_stop_delay: Option<Duration>,
    pub log_level: watch::Receiver<String>,
    pub otlp: watch::Receiver<trellis::settings::OtlpSettings>,
}

impl Service {
    /// Every service, in start order.
    pub const ALL: [Service; 1] = [Service::User];

    /// The service's name.
    pub fn name(self) -> &'static str {
        match self {
            Service::User => "user",
        }
    }

    /// The service's port relative to a base (the gateway will take base + 0).
    pub fn port(self, base: u16) -> u16 {
        let offset = match self {
            Service::User => 2,
        };
        base.saturating_add(offset)
    }

    /// The service's encoded descriptor set and its gRPC service's full name.
    pub fn descriptors(self) -> (&'static [u8], &'static str) {
        match self {
            Service::User => (
                shop_user::api::FILE_DESCRIPTOR_SET,
                "shop.user.v1.UserService",
            ),
        }
    }

    /// Checks `key = value` against the service's config type.
    pub fn check_setting(self, key: &str, value: &str) -> Result<(), ConfigError> {
        match self {
            Service::User => trellis::config::check_setting::<shop_user::UserSettings>(key, value),
        }
    }

    /// Whether `key` is a secret in the service's settings (shown redacted).
    pub fn is_secret(self, key: &str) -> bool {
        match self {
            Service::User => trellis::config::is_secret::<shop_user::UserSettings>(key),
        }
    }

    /// Loads the service's config, opens its store and binds its listener.
    pub async fn start(
        self,
        sources: &ConfigSources,
        data_dir: &Path,
        server: ServerConfig,
        database_url: Option<String>,
    ) -> Result<Started, StartError> {
        match self {
            Service::User => {
                let config = load::<shop_user::UserSettings>(self, sources)
                    .await
                    .map_err(StartError::Config)?;
                let current = config.current();
                let common = Common {
                    shutdown_timeout: current.config.server.shutdown_timeout,
                    pre_stop_delay: current.config.server.pre_stop_delay,
                    log_level: config.section(|s| s.log.level.clone()),
                    otlp: config.section(|s| s.otlp.clone()),
                };
                let service = shop_user::UserService::bind_with_config(
                    config,
                    data_dir,
                    database_url,
                    server,
                )
                .await
                .map_err(|e| match e {
                    shop_user::BuildError::Transport(
                        t @ trellis::transport::TransportError::Bind { addr, .. },
                    ) if t.is_addr_in_use() => StartError::PortInUse(addr),
                    other => StartError::Other(other.to_string(), data_dir.to_owned()),
                })?;
                Ok(Started {
                    addr: service.local_addr(),
                    admin: service.admin_addr(),
                    common,
                    inner: StartedInner::User(service),
                })
            }
        }
    }
}

async fn load<T>(service: Service, sources: &ConfigSources) -> Result<Config<T>, String>
where
    T: serde::de::DeserializeOwned + trellis::config::Validate + Send + Sync + 'static,
{
    let mut builder = Config::<T>::builder().env("TRELLIS");
    for f in &sources.files {
        builder = builder.file(f);
    }
    if let Some(url) = &sources.etcd {
        let (endpoints, prefix) =
            trellis::config::parse_etcd_url(url).map_err(|e| format!("--config-source: {e}"))?;
        builder = builder.etcd(endpoints, format!("{prefix}{}/", service.name()));
    }
    builder.build().await.map_err(|e| e.to_string())
}

/// A bound service, ready to be turned into an [`App`].
pub struct Started {
    /// Where it serves gRPC and HTTP.
    pub addr: SocketAddr,
    /// Its admin address, if any.
    pub admin: Option<SocketAddr>,
    /// Settings the CLI applies.
    pub common: Common,
    inner: StartedInner,
}

enum StartedInner {
    User(shop_user::UserService),
}

impl Started {
    /// The app that runs this service; `shutdown` flags override config.
    pub fn into_app(
        self,
        app: AppBuilder,
        shutdown_timeout: Option<Duration>,
        pre_stop_delay: Option<Duration>,
    ) -> App {
        let mut app =
            app.shutdown_timeout(shutdown_timeout.unwrap_or(self.common.shutdown_timeout));
        if let Some(delay) = pre_stop_delay.or(self.common.pre_stop_delay) {
            app = app.pre_stop_delay(delay);
        }
        match self.inner {
            StartedInner::User(s) => s.into_app(app),
        }
    }
}

/// Why a service could not start.
#[derive(Debug)]
pub enum StartError {
    /// Its port is taken.
    PortInUse(SocketAddr),
    /// Its config could not be loaded.
    Config(String),
    /// Anything else, with the data dir for context.
    Other(String, PathBuf),
}

impl StartError {
    /// A message for the operator, naming the flag that fixes a taken port.
    pub fn explain(&self, service: Service, flag: &str) -> String {
        match self {
            StartError::PortInUse(addr) => format!(
                "{}: port {} is already in use on {}; choose another with {flag}",
                service.name(),
                addr.port(),
                addr.ip()
            ),
            StartError::Config(message) => format!("{}: config: {message}", service.name()),
            StartError::Other(message, data_dir) => {
                format!(
                    "{}: {message} (data dir {})",
                    service.name(),
                    data_dir.display()
                )
            }
        }
    }
}
