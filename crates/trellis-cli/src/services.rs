//! The reference services the CLI knows how to run, and their default ports.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use clap::ValueEnum;
use trellis::{App, AppBuilder, transport::ServerConfig};

/// A service of the reference shop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Service {
    /// User accounts.
    User,
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

    /// Opens the service's store and binds its listener.
    pub async fn start(
        self,
        data_dir: &Path,
        listen: SocketAddr,
        admin_listen: Option<SocketAddr>,
        database_url: Option<String>,
    ) -> Result<Started, StartError> {
        let server = ServerConfig { listen, admin_listen, ..ServerConfig::default() };
        match self {
            Service::User => {
                let mut config = shop_user::UserConfig::embedded(data_dir);
                if let Some(url) = database_url {
                    config.database_url = url;
                }
                let service = shop_user::UserService::bind(&config, server).await.map_err(|e| match e {
                    shop_user::BuildError::Transport(t) if t.is_addr_in_use() => StartError::PortInUse(listen),
                    other => StartError::Other(other.to_string(), data_dir.to_owned()),
                })?;
                Ok(Started { addr: service.local_addr(), inner: StartedInner::User(service) })
            }
        }
    }
}

/// A bound service, ready to be turned into an [`App`].
pub struct Started {
    /// Where it serves gRPC and HTTP.
    pub addr: SocketAddr,
    inner: StartedInner,
}

enum StartedInner {
    User(shop_user::UserService),
}

impl Started {
    /// The app that runs this service.
    pub fn into_app(self, app: AppBuilder) -> App {
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
            StartError::Other(message, data_dir) => {
                format!("{}: {message} (data dir {})", service.name(), data_dir.display())
            }
        }
    }
}
