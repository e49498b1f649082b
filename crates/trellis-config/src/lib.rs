//! Typed, layered configuration with validated hot reload.
//!
//! A service's configuration is a `serde` struct. Layers, lowest first:
//!
//! 1. the struct's defaults (`#[serde(default)]`);
//! 2. files: TOML, YAML or JSON, a file or a directory of them (in name
//!    order), with `${ENV}` and `${ENV:default}` placeholders in strings;
//! 3. the environment: `TRELLIS_SERVER__REQUEST_TIMEOUT=5s` sets
//!    `server.request_timeout` (`__` nests, names are lower-cased, values
//!    that parse as JSON numbers/booleans are typed);
//! 4. fixed settings ([`ConfigBuilder::set`], for command-line flags), a
//!    remote etcd prefix (feature `etcd`): `{prefix}server/request_timeout`
//!    or `{prefix}server.request_timeout` sets `server.request_timeout`, and
//!    sources of your own ([`Source`]), in the order added.
//!
//! Every change — a file saved, an etcd put — is parsed, merged, checked
//! against the type and [`Validate`]d, and only then published as a new
//! [`Snapshot`] through a `watch` channel. A bad change is rejected with an
//! error naming the key and the source that set it; the last good config
//! stays in force and [`Config::reload_failures`] rises. Unknown keys from
//! files or etcd are errors (typos never pass silently); from the
//! environment they are ignored, since the environment holds much else.
//!
//! ```no_run
//! # async fn run() -> Result<(), trellis_config::ConfigError> {
//! use std::time::Duration;
//! use serde::{Deserialize, Serialize};
//! use trellis_config::{Config, Invalid, Validate};
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
//! #[serde(default)]
//! struct Settings {
//!     #[serde(with = "trellis_config::duration")]
//!     timeout: Duration,
//!     workers: u32,
//! }
//! impl Default for Settings {
//!     fn default() -> Self { Settings { timeout: Duration::from_secs(5), workers: 4 } }
//! }
//! impl Validate for Settings {
//!     fn validate(&self) -> Result<(), Invalid> {
//!         if self.workers == 0 { return Err(Invalid::new("workers", "must be at least 1")); }
//!         Ok(())
//!     }
//! }
//!
//! let config = Config::<Settings>::builder().file("config.toml").env("TRELLIS").build().await?;
//! let mut timeout = config.section(|s| s.timeout);
//! println!("timeout {:?}, version {}", *timeout.borrow_and_update(), config.current().version);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod duration;
#[cfg(feature = "etcd")]
mod etcd;
mod files;
mod source;
mod store;
mod value;

#[cfg(feature = "etcd")]
pub use etcd::{
    MAX_DEPTH, MAX_DOCUMENT_BYTES, parse_url as parse_etcd_url, parse_url_tls as parse_etcd_url_tls,
};
pub use source::{BoxFuture, Source};
pub use store::{Config, ConfigBuilder, Snapshot, check_setting, is_secret};
pub use trellis_core::{Secret, redact_url};
/// The etcd prefix mirror the remote layer uses, for tools that follow
/// settings (`trellis config watch`).
#[cfg(feature = "etcd")]
pub use trellis_etcd::mirror_prefix as etcd_mirror;
pub use value::Layer;

/// A type that checks its own values after they parse.
pub trait Validate {
    /// Rejects values that parse but make no sense (a zero pool, a timeout
    /// shorter than a deadline). The default accepts everything.
    fn validate(&self) -> Result<(), Invalid> {
        Ok(())
    }
}

/// A value that failed [`Validate`], and which key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The dotted path, e.g. `server.request_timeout`.
    pub key: String,
    /// Why it is rejected.
    pub message: String,
}

impl Invalid {
    /// An invalid value at `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Invalid {
            key: key.into(),
            message: message.into(),
        }
    }

    /// Checks that `value` at `key` lies in `min..=max` (durations, counts).
    pub fn check_range<T: PartialOrd + std::fmt::Debug>(
        key: &str,
        value: T,
        min: T,
        max: T,
    ) -> Result<(), Invalid> {
        if min <= value && value <= max {
            Ok(())
        } else {
            Err(Invalid::new(
                key,
                format!("must be between {min:?} and {max:?}, not {value:?}"),
            ))
        }
    }
}

/// Why a configuration could not be loaded or an update was rejected.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read.
    #[error("cannot read {source_name}: {reason}")]
    Read {
        /// Which source.
        source_name: String,
        /// Why.
        reason: String,
    },
    /// A source is not valid TOML/YAML/JSON.
    #[error("cannot parse {source_name}: {reason}")]
    Parse {
        /// Which source.
        source_name: String,
        /// The parser's message (with line and column where it gives them).
        reason: String,
    },
    /// A `${VAR}` placeholder names an unset variable and has no default.
    #[error(
        "{key} in {source_name}: environment variable {variable} is not set and has no default"
    )]
    Placeholder {
        /// The key holding the placeholder.
        key: String,
        /// Which file.
        source_name: String,
        /// The variable.
        variable: String,
    },
    /// A key has a value of the wrong type or is unknown.
    #[error("{key} (from {source_name}): {reason}")]
    Type {
        /// The dotted path.
        key: String,
        /// The source that set it (`defaults` when none did).
        source_name: String,
        /// The deserializer's message.
        reason: String,
    },
    /// A value failed [`Validate`].
    #[error("{key} (from {source_name}) is invalid: {reason}")]
    Invalid {
        /// The dotted path.
        key: String,
        /// The source that set it (`defaults` when none did).
        source_name: String,
        /// Why.
        reason: String,
    },
    /// A source breaks a size or depth limit (a remote source is written
    /// by peers; nothing past the limit is built).
    #[error("{key} (from {source_name}): {reason}")]
    Limit {
        /// The key at fault (a bounded prefix of it).
        key: String,
        /// Which source.
        source_name: String,
        /// The limit and by how much it was passed.
        reason: String,
    },
    /// The remote source could not be reached.
    #[error("config source {source_name} unavailable: {reason}")]
    Unavailable {
        /// Which source.
        source_name: String,
        /// Why.
        reason: String,
    },
}
