//! Trace settings from a service's config, overridden by the standard
//! OpenTelemetry environment variables.

use serde::{Deserialize, Serialize};

/// The `trace` section of a service's config.
///
/// ```toml
/// [trace]
/// endpoint = "http://otel-collector:4317"   # live; unset: nothing exported
/// sample_ratio = 0.1                        # live
/// environment = "production"                # restart
/// ```
///
/// The standard variables win over the file, as every OpenTelemetry SDK
/// does it: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_ENDPOINT`; `OTEL_TRACES_SAMPLER` (`always_on`,
/// `always_off`, `traceidratio`, `parentbased_always_on`,
/// `parentbased_always_off`, `parentbased_traceidratio`) with
/// `OTEL_TRACES_SAMPLER_ARG`; `OTEL_TRACES_EXPORTER=none` or
/// `OTEL_SDK_DISABLED=true` to export nothing; `OTEL_SERVICE_NAME` and
/// `OTEL_RESOURCE_ATTRIBUTES` for the resource; `OTEL_BSP_*` for batching.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TraceSettings {
    /// The OTLP/gRPC endpoint of a collector, e.g. `http://127.0.0.1:4317`.
    /// Unset: nothing is exported, spans are not recorded, and trace ids
    /// still flow through logs and calls. Live. Default: unset.
    pub endpoint: Option<String>,
    /// The share of new traces to record, 0.0 to 1.0; a caller's decision
    /// (the `traceparent` sampled flag) is always followed. Live. Default: 1.0.
    pub sample_ratio: f64,
    /// `deployment.environment.name` on every span. Restart. Default: unset.
    pub environment: Option<String>,
}

impl Default for TraceSettings {
    fn default() -> Self {
        TraceSettings {
            endpoint: None,
            sample_ratio: 1.0,
            environment: None,
        }
    }
}

impl TraceSettings {
    /// Checks the values; the error names the field (under this section).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err((
                "sample_ratio",
                format!("must be between 0.0 and 1.0, not {}", self.sample_ratio),
            ));
        }
        if let Some(endpoint) = &self.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err((
                "endpoint",
                format!("must start with http:// or https://, not {endpoint:?}"),
            ));
        }
        Ok(())
    }

    /// What applies once the environment has had its say.
    pub fn effective(&self) -> Result<Effective, EnvError> {
        self.effective_with(|name| std::env::var(name).ok())
    }

    /// [`effective`](Self::effective) with the environment read through `env`.
    pub fn effective_with(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Effective, EnvError> {
        let disabled = env("OTEL_SDK_DISABLED")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
            || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
        let endpoint = if disabled {
            None
        } else {
            env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
                .filter(|v| !v.trim().is_empty())
                .or_else(|| self.endpoint.clone())
        };
        let (parent_based, ratio) = match env("OTEL_TRACES_SAMPLER") {
            None => (true, self.sample_ratio),
            Some(name) => {
                let arg = || -> Result<f64, EnvError> {
                    let raw = env("OTEL_TRACES_SAMPLER_ARG").unwrap_or_else(|| "1.0".into());
                    raw.trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|r| (0.0..=1.0).contains(r))
                        .ok_or_else(|| EnvError {
                            variable: "OTEL_TRACES_SAMPLER_ARG",
                            value: raw.clone(),
                            expected: "a number from 0.0 to 1.0",
                        })
                };
                match name.trim() {
                    "always_on" => (false, 1.0),
                    "always_off" => (false, 0.0),
                    "traceidratio" => (false, arg()?),
                    "parentbased_always_on" => (true, 1.0),
                    "parentbased_always_off" => (true, 0.0),
                    "parentbased_traceidratio" => (true, arg()?),
                    _ => {
                        return Err(EnvError {
                            variable: "OTEL_TRACES_SAMPLER",
                            value: name,
                            expected: "always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio",
                        });
                    }
                }
            }
        };
        Ok(Effective {
            endpoint,
            parent_based,
            ratio,
            environment: self.environment.clone(),
        })
    }
}

/// Trace settings after the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    /// Where spans go, if anywhere.
    pub endpoint: Option<String>,
    /// Follow a caller's sampling decision.
    pub parent_based: bool,
    /// The share of new traces recorded.
    pub ratio: f64,
    /// `deployment.environment.name`.
    pub environment: Option<String>,
}

/// An `OTEL_*` variable with a value we cannot use.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{variable}={value:?} is not valid: expected {expected}")]
pub struct EnvError {
    /// The variable.
    pub variable: &'static str,
    /// Its value.
    pub value: String,
    /// What would have been accepted.
    pub expected: &'static str,
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn with(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    #[test]
    fn the_environment_wins_over_the_file() {
        let file = TraceSettings {
            endpoint: Some("http://file:4317".into()),
            sample_ratio: 0.5,
            environment: None,
        };
        let e = file.effective_with(with(&[])).unwrap();
        assert_eq!(
            (e.endpoint.as_deref(), e.parent_based, e.ratio),
            (Some("http://file:4317"), true, 0.5)
        );

        let e = file
            .effective_with(with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317")]))
            .unwrap();
        assert_eq!(e.endpoint.as_deref(), Some("http://env:4317"));
        let e = file
            .effective_with(with(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
            ]))
            .unwrap();
        assert_eq!(e.endpoint.as_deref(), Some("http://traces:4317"));
        assert_eq!(
            file.effective_with(with(&[("OTEL_TRACES_EXPORTER", "none")]))
                .unwrap()
                .endpoint,
            None
        );
        assert_eq!(
            file.effective_with(with(&[("OTEL_SDK_DISABLED", "true")]))
                .unwrap()
                .endpoint,
            None
        );
    }

    #[test]
    fn samplers_by_their_standard_names() {
        let s = TraceSettings::default();
        let pick = |vars: &[(&str, &str)]| {
            s.effective_with(with(vars))
                .map(|e| (e.parent_based, e.ratio))
        };
        assert_eq!(pick(&[]), Ok((true, 1.0)));
        assert_eq!(
            pick(&[("OTEL_TRACES_SAMPLER", "always_off")]),
            Ok((false, 0.0))
        );
        assert_eq!(
            pick(&[("OTEL_TRACES_SAMPLER", "parentbased_always_off")]),
            Ok((true, 0.0))
        );
        assert_eq!(
            pick(&[
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.1")
            ]),
            Ok((true, 0.1))
        );
        assert_eq!(
            pick(&[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.3")
            ]),
            Ok((false, 0.3))
        );
        let err = pick(&[("OTEL_TRACES_SAMPLER", "sometimes")]).unwrap_err();
        assert_eq!(err.variable, "OTEL_TRACES_SAMPLER");
        let err = pick(&[
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "2"),
        ])
        .unwrap_err();
        assert_eq!(err.variable, "OTEL_TRACES_SAMPLER_ARG");
    }

    #[test]
    fn bad_values_name_the_field() {
        let s = TraceSettings {
            sample_ratio: 1.5,
            ..Default::default()
        };
        assert_eq!(s.check().unwrap_err().0, "sample_ratio");
        let s = TraceSettings {
            endpoint: Some("collector:4317".into()),
            ..Default::default()
        };
        assert_eq!(s.check().unwrap_err().0, "endpoint");
    }
}
