//! What a registry stores about one running instance, and the limits a
//! record must keep: records come from peers (anyone who can write to the
//! registry), so every client checks them before it allocates on them.

use std::{collections::BTreeMap, ops::RangeInclusive};

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
    /// Relative weight for weighted balancers, in [`WEIGHTS`]. Default: 100.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Free-form labels for filtering.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

fn default_weight() -> u32 {
    100
}

/// The weights an instance may publish. A record outside is ignored: the
/// consistent-hash ring gives an endpoint `replicas × weight / 100` points,
/// so one record with weight 4 294 967 295 would make every client build
/// billions of them.
pub const WEIGHTS: RangeInclusive<u32> = 1..=10_000;

/// The most bytes one stored record may have (checked before parsing).
pub const MAX_RECORD_BYTES: usize = 16 * 1024;
/// The longest `id`, `service`, `version` or `zone`, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// The most entries in `endpoints`, and in `metadata`.
pub const MAX_ENTRIES: usize = 32;
/// The longest key or value in `endpoints` or `metadata`, in bytes.
pub const MAX_ENTRY_BYTES: usize = 1024;

/// Why an instance record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidInstance {
    /// The field at fault (`weight`, `metadata`, `record` for the whole).
    pub field: &'static str,
    /// What is wrong, with the limit.
    pub reason: String,
}

impl InvalidInstance {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        InvalidInstance {
            field,
            reason: reason.into(),
        }
    }
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

    /// Reads a stored record: refuses one over [`MAX_RECORD_BYTES`] before
    /// parsing it, then parses and [`check`](Self::check)s it.
    pub fn from_record(bytes: &[u8]) -> Result<Instance, InvalidInstance> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(InvalidInstance::new(
                "record",
                format!(
                    "{} bytes, over the {MAX_RECORD_BYTES}-byte limit",
                    bytes.len()
                ),
            ));
        }
        let instance: Instance = serde_json::from_slice(bytes)
            .map_err(|e| InvalidInstance::new("record", format!("not an instance: {e}")))?;
        instance.check()?;
        Ok(instance)
    }

    /// Checks the limits a record must keep ([`WEIGHTS`], [`MAX_NAME_BYTES`],
    /// [`MAX_ENTRIES`], [`MAX_ENTRY_BYTES`]); registries refuse to publish
    /// an instance that fails, and clients ignore a stored one.
    pub fn check(&self) -> Result<(), InvalidInstance> {
        for (field, value) in [
            ("id", &self.id),
            ("service", &self.service),
            ("version", &self.version),
            ("zone", &self.zone),
        ] {
            if value.len() > MAX_NAME_BYTES {
                return Err(InvalidInstance::new(
                    field,
                    format!(
                        "{} bytes, over the {MAX_NAME_BYTES}-byte limit",
                        value.len()
                    ),
                ));
            }
        }
        if self.id.is_empty() || self.service.is_empty() {
            return Err(InvalidInstance::new(
                if self.id.is_empty() { "id" } else { "service" },
                "must not be empty",
            ));
        }
        if !WEIGHTS.contains(&self.weight) {
            return Err(InvalidInstance::new(
                "weight",
                format!(
                    "{} is outside {}..={}",
                    self.weight,
                    WEIGHTS.start(),
                    WEIGHTS.end()
                ),
            ));
        }
        for (field, map) in [("endpoints", &self.endpoints), ("metadata", &self.metadata)] {
            if map.len() > MAX_ENTRIES {
                return Err(InvalidInstance::new(
                    field,
                    format!("{} entries, over the limit of {MAX_ENTRIES}", map.len()),
                ));
            }
            if map
                .iter()
                .any(|(k, v)| k.len() > MAX_ENTRY_BYTES || v.len() > MAX_ENTRY_BYTES)
            {
                return Err(InvalidInstance::new(
                    field,
                    format!("a key or value is over the {MAX_ENTRY_BYTES}-byte limit"),
                ));
            }
        }
        Ok(())
    }

    /// The address for `protocol`, if the instance has one.
    pub fn endpoint(&self, protocol: &str) -> Option<&str> {
        self.endpoints.get(protocol).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_within_the_limits_pass_and_others_name_the_field() {
        let ok = Instance::new("user", "u1").with_endpoint("grpc", "127.0.0.1:1");
        assert_eq!(ok.check(), Ok(()));
        let json = serde_json::to_vec(&ok).unwrap();
        assert_eq!(Instance::from_record(&json), Ok(ok.clone()));

        let field = |i: Instance| i.check().unwrap_err().field;
        assert_eq!(field(ok.clone().with_weight(0)), "weight");
        assert_eq!(field(ok.clone().with_weight(u32::MAX)), "weight");
        assert_eq!(ok.clone().with_weight(10_000).check(), Ok(()));
        assert_eq!(field(ok.clone().with_zone("z".repeat(257))), "zone");
        assert_eq!(field(Instance::new("user", "")), "id");
        let mut many = ok.clone();
        for i in 0..=MAX_ENTRIES {
            many = many.with_metadata(format!("k{i}"), "v");
        }
        assert_eq!(field(many), "metadata");
        assert_eq!(
            field(ok.clone().with_endpoint("http", "x".repeat(1025))),
            "endpoints"
        );

        let huge = vec![b' '; MAX_RECORD_BYTES + 1];
        let err = Instance::from_record(&huge).unwrap_err();
        assert_eq!(err.field, "record");
        assert!(err.reason.contains("16384-byte limit"), "{err}");
        assert_eq!(Instance::from_record(b"{oops").unwrap_err().field, "record");
    }
}
