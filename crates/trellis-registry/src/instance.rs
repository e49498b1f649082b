//! What a registry stores about one running instance.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One running instance of a service, as stored in a registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Unique per running instance.
    pub id: String,
    /// The service it belongs to, e.g. `user`.
    pub service: String,
    /// The service version it runs.
    #[serde(default)]
    pub version: String,
    /// Where to reach it, per protocol (`grpc`, `http`): `host:port`.
    #[serde(default)]
    pub endpoints: BTreeMap<String, String>,
    /// Its zone, for zone-aware balancing; empty when unknown.
    #[serde(default)]
    pub zone: String,
    /// Relative weight for weighted balancers. Default: 100.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Free-form labels for filtering.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

fn default_weight() -> u32 {
    100
}

impl Instance {
    /// An instance with no endpoints yet, weight 100.
    pub fn new(service: impl Into<String>, id: impl Into<String>) -> Self {
        Instance {
            id: id.into(),
            service: service.into(),
            version: String::new(),
            endpoints: BTreeMap::new(),
            zone: String::new(),
            weight: default_weight(),
            metadata: BTreeMap::new(),
        }
    }

    /// Adds an endpoint for `protocol` (builder style).
    pub fn with_endpoint(
        mut self,
        protocol: impl Into<String>,
        address: impl Into<String>,
    ) -> Self {
        self.endpoints.insert(protocol.into(), address.into());
        self
    }

    /// Sets the version (builder style).
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Sets the zone (builder style).
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = zone.into();
        self
    }

    /// Sets the weight (builder style).
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Adds a metadata entry (builder style).
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// The address for `protocol`, if the instance has one.
    pub fn endpoint(&self, protocol: &str) -> Option<&str> {
        self.endpoints.get(protocol).map(String::as_str)
    }
}
