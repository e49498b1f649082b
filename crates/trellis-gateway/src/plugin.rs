//! Plugins: code of your own on a route's requests and answers, switched
//! on per route by name from the document (`plugins = ["tenant"]`), in the
//! order listed. They run after the gateway's own checks (address rules,
//! CORS, limits, rate limit) and before the request is rewritten and sent;
//! on the way back, after the route's response header rules.
//!
//! ```no_run
//! use std::sync::Arc;
//! use trellis_gateway::{Plugin, Plugins};
//!
//! /// Requests must name their tenant.
//! struct Tenant;
//!
//! impl Plugin for Tenant {
//!     fn on_request(&self, request: &mut http::request::Parts) -> Result<(), trellis_core::Error> {
//!         if request.headers.contains_key("x-tenant") {
//!             Ok(())
//!         } else {
//!             Err(trellis_core::Error::invalid_argument("x-tenant", "name the tenant"))
//!         }
//!     }
//! }
//!
//! let plugins = Plugins::new().with("tenant", Arc::new(Tenant));
//! // Gateway::with_plugins(config, registry, plugins)
//! ```

use std::{collections::HashMap, sync::Arc};

use trellis_core::Error;

/// A plugin (see the module docs). Both hooks default to doing nothing.
pub trait Plugin: Send + Sync + 'static {
    /// Before the request goes upstream: change it, or refuse it — the
    /// error is the answer, in the error model (JSON, or a gRPC status).
    fn on_request(&self, request: &mut http::request::Parts) -> Result<(), Error> {
        let _ = request;
        Ok(())
    }

    /// Before the answer goes back to the client.
    fn on_response(&self, response: &mut http::response::Parts) {
        let _ = response;
    }
}

/// The plugins a gateway knows, by the names routes use.
#[derive(Clone, Default)]
pub struct Plugins {
    by_name: HashMap<String, Arc<dyn Plugin>>,
}

impl Plugins {
    /// No plugins.
    pub fn new() -> Plugins {
        Plugins::default()
    }

    /// Adds `plugin` under `name` (replacing one of that name).
    pub fn with(mut self, name: impl Into<String>, plugin: Arc<dyn Plugin>) -> Plugins {
        self.by_name.insert(name.into(), plugin);
        self
    }

    /// The plugins `names` lists, in that order; an unknown name is an
    /// error naming it.
    pub(crate) fn resolve(&self, names: &[String]) -> Result<Vec<Arc<dyn Plugin>>, String> {
        names
            .iter()
            .map(|n| {
                self.by_name.get(n).cloned().ok_or_else(|| {
                    let mut known: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
                    known.sort_unstable();
                    format!("no plugin named {n:?} (known: {})", known.join(", "))
                })
            })
            .collect()
    }
}
