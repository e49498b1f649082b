//! Log setup: JSON or pretty, with a filter that the config centre can
//! change while the process runs.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt};

/// Output format.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, pretty otherwise.
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Pretty,
}

/// Changes the process-wide log filter.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` was set: it wins over `log.level` from config.
    pinned: bool,
}

impl LogControl {
    /// Applies a `log.level` from config, unless `RUST_LOG` pins the filter.
    pub fn apply(&self, level: &str) {
        if self.pinned {
            return;
        }
        match EnvFilter::try_new(level) {
            Ok(filter) => {
                if self.handle.reload(filter).is_ok() {
                    tracing::info!(level, "log level changed");
                }
            }
            // Validation should have caught it; never take logging down.
            Err(err) => tracing::warn!(level, error = %err, "ignoring an invalid log level"),
        }
    }

    /// Follows a service's `log.level` section.
    pub fn follow(&self, mut level: tokio::sync::watch::Receiver<String>) {
        let control = self.clone();
        tokio::spawn(async move {
            loop {
                let current = level.borrow_and_update().clone();
                control.apply(&current);
                if level.changed().await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Installs the subscriber; `RUST_LOG` sets the initial filter (default `info`).
pub fn init(format: LogFormat) -> LogControl {
    let from_env = EnvFilter::try_from_default_env().ok();
    let pinned = from_env.is_some();
    let (filter, handle) = reload::Layer::new(from_env.unwrap_or_else(|| EnvFilter::new("info")));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry.with(tracing_subscriber::fmt::layer().json().flatten_event(true).with_writer(std::io::stderr)).init();
    } else {
        registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).init();
    }
    LogControl { handle, pinned }
}
