//! OTLP export settings from a service's config, overridden by the standard
//! OpenTelemetry environment variables.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize, Serializer};
use trellis_core::{Secret, excerpt, redact_url};

/// The `otlp` section of a service's config: where traces, metrics and
/// logs go over OTLP/gRPC, and how traces are sampled.
///
/// ```toml
/// [otlp]
/// endpoint = "http://otel-collector:4317"   # live; unset: nothing exported
/// headers = { authorization = "Bearer ${OTLP_TOKEN}" }   # live; a secret
/// sample_ratio = 0.1                        # live
/// traces = true                             # live
/// metrics = false                           # live (Prometheus at /metrics either way)
/// logs = false                              # live (JSON lines on stderr either way)
/// metrics_interval = "10s"                  # live
/// environment = "production"                # restart
/// ```
///
/// The standard variables win over the file, as in every OpenTelemetry SDK:
/// `OTEL_EXPORTER_OTLP_ENDPOINT` for all signals, or
/// `OTEL_EXPORTER_OTLP_{TRACES,METRICS,LOGS}_ENDPOINT` for one (which also
/// turns that signal on); `OTEL_{TRACES,METRICS,LOGS}_EXPORTER` = `otlp` or
/// `none`; `OTEL_SDK_DISABLED=true` for none at all; `OTEL_TRACES_SAMPLER`
/// (`always_on`, `always_off`, `traceidratio`, `parentbased_always_on`,
/// `parentbased_always_off`, `parentbased_traceidratio`) with
/// `OTEL_TRACES_SAMPLER_ARG`; `OTEL_METRIC_EXPORT_INTERVAL` (ms);
/// `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` for the resource;
/// `OTEL_BSP_*` and `OTEL_BLRP_*` for batching; `OTEL_EXPORTER_OTLP_HEADERS`
/// (and per signal) beside `headers`.
///
/// `headers` is a [`Secret`], and credentials in `endpoint` (userinfo,
/// `?api_key=`) are redacted wherever the settings are shown (`Debug` and
/// serialization alike).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OtlpSettings {
    /// The OTLP/gRPC endpoint of a collector, e.g. `http://127.0.0.1:4317`.
    /// Unset: nothing is exported; spans are not recorded, and trace ids
    /// still flow through logs and calls. Live. Default: unset.
    #[serde(serialize_with = "redacted_endpoint")]
    pub endpoint: Option<String>,
    /// gRPC metadata sent with every export (an API key, a tenant): a
    /// secret, never shown. Live. Default: none.
    pub headers: Secret<BTreeMap<String, String>>,
    /// The share of new traces to record, 0.0 to 1.0; a caller's decision
    /// (the `traceparent` sampled flag) is always followed. Live. Default: 1.0.
    pub sample_ratio: f64,
    /// Export traces. Live. Default: true.
    pub traces: bool,
    /// Export metrics (everything `/metrics` shows from the `metrics`
    /// facade, under OpenTelemetry names). Live. Default: false.
    pub metrics: bool,
    /// Export log records, with their trace context. Live. Default: false.
    pub logs: bool,
    /// How often metrics are exported. Live. Default: 10s.
    #[serde(with = "duration_serde")]
    pub metrics_interval: Duration,
    /// `deployment.environment.name` on everything exported. Restart.
    /// Default: unset.
    pub environment: Option<String>,
    /// PEM: the authorities trusted for an `https://` collector
    /// (`OTEL_EXPORTER_OTLP_CERTIFICATE` wins). Live. Default: unset (the
    /// exporter's defaults).
    pub certificate: Option<std::path::PathBuf>,
    /// PEM: a client certificate for a collector that asks for one
    /// (`OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` wins), with `client_key`.
    /// Live. Default: unset.
    pub client_certificate: Option<std::path::PathBuf>,
    /// PEM: its key (`OTEL_EXPORTER_OTLP_CLIENT_KEY` wins).
    pub client_key: Option<std::path::PathBuf>,
}

impl Default for OtlpSettings {
    fn default() -> Self {
        OtlpSettings {
            endpoint: None,
            headers: Secret::default(),
            sample_ratio: 1.0,
            traces: true,
            metrics: false,
            logs: false,
            metrics_interval: Duration::from_secs(10),
            environment: None,
            certificate: None,
            client_certificate: None,
            client_key: None,
        }
    }
}

impl std::fmt::Debug for Effective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |e: &Option<String>| e.as_deref().map(redact_url);
        f.debug_struct("Effective")
            .field("traces", &shown(&self.traces))
            .field("metrics", &shown(&self.metrics))
            .field("logs", &shown(&self.logs))
            .field("metrics_interval", &self.metrics_interval)
            .field("parent_based", &self.parent_based)
            .field("ratio", &self.ratio)
            .field("environment", &self.environment)
            .field("headers", &self.headers)
            .field("tls", &self.tls)
            .finish()
    }
}

impl std::fmt::Debug for OtlpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpSettings")
            .field("endpoint", &self.endpoint.as_deref().map(redact_url))
            .field("headers", &self.headers)
            .field("sample_ratio", &self.sample_ratio)
            .field("traces", &self.traces)
            .field("metrics", &self.metrics)
            .field("logs", &self.logs)
            .field("metrics_interval", &self.metrics_interval)
            .field("environment", &self.environment)
            .field("certificate", &self.certificate)
            .field("client_certificate", &self.client_certificate)
            .finish()
    }
}

fn redacted_endpoint<S: Serializer>(endpoint: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    endpoint.as_deref().map(redact_url).serialize(s)
}

/// `"10s"`, `"500ms"`, `"2m"` or a number of seconds.
mod duration_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        if d.subsec_millis() == 0 {
            s.serialize_str(&format!("{}s", d.as_secs()))
        } else {
            s.serialize_str(&format!("{}ms", d.as_millis()))
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(Duration::from_secs(s)),
            Raw::Text(t) => parse(&t).ok_or_else(|| {
                D::Error::custom(format!("{t:?} is not a duration like 10s, 500ms or 2m"))
            }),
        }
    }

    pub fn parse(t: &str) -> Option<Duration> {
        let t = t.trim();
        let (number, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
        let n: u64 = number.parse().ok()?;
        match unit {
            "" | "s" => Some(Duration::from_secs(n)),
            "ms" => Some(Duration::from_millis(n)),
            "m" => Some(Duration::from_secs(n * 60)),
            _ => None,
        }
    }
}

impl OtlpSettings {
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
                format!(
                    "must start with http:// or https://, not {:?}",
                    redact_url(endpoint)
                ),
            ));
        }
        if self.metrics_interval < Duration::from_millis(100) {
            return Err(("metrics_interval", "must be at least 100ms".into()));
        }
        for name in self.headers.expose().keys() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() || name.starts_with("grpc-") {
                return Err((
                    "headers",
                    format!("{} is not a header gRPC metadata can carry", excerpt(name)),
                ));
            }
        }
        if self
            .headers
            .expose()
            .values()
            .any(|v| http::HeaderValue::from_str(v).is_err())
        {
            return Err(("headers", "a value is not a valid header value".into()));
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
        let disabled =
            env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let shared = env("OTEL_EXPORTER_OTLP_ENDPOINT")
            .filter(|v| !v.trim().is_empty())
            .or_else(|| self.endpoint.clone());
        let signal = |name: &'static str, on_by_config: bool| -> Result<Option<String>, EnvError> {
            if disabled {
                return Ok(None);
            }
            let own = env(&format!("OTEL_EXPORTER_OTLP_{name}_ENDPOINT"))
                .filter(|v| !v.trim().is_empty());
            let on = match env(&format!("OTEL_{name}_EXPORTER"))
                .as_deref()
                .map(str::trim)
            {
                None => on_by_config || own.is_some(),
                Some("otlp") => true,
                Some("none") => false,
                Some(other) => {
                    return Err(EnvError {
                        variable: match name {
                            "TRACES" => "OTEL_TRACES_EXPORTER",
                            "METRICS" => "OTEL_METRICS_EXPORTER",
                            _ => "OTEL_LOGS_EXPORTER",
                        },
                        value: other.to_owned(),
                        expected: "otlp or none",
                    });
                }
            };
            Ok(if on {
                own.or_else(|| shared.clone())
            } else {
                None
            })
        };
        let traces = signal("TRACES", self.traces)?;
        let metrics = signal("METRICS", self.metrics)?;
        let logs = signal("LOGS", self.logs)?;
        let metrics_interval = match env("OTEL_METRIC_EXPORT_INTERVAL") {
            None => self.metrics_interval,
            Some(ms) => ms
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|ms| *ms >= 100)
                .map(Duration::from_millis)
                .ok_or(EnvError {
                    variable: "OTEL_METRIC_EXPORT_INTERVAL",
                    value: ms,
                    expected: "milliseconds, at least 100",
                })?,
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
        let path = |var: &str, own: &Option<std::path::PathBuf>| {
            env(var)
                .filter(|v| !v.trim().is_empty())
                .map(std::path::PathBuf::from)
                .or_else(|| own.clone())
        };
        let tls = OtlpTls {
            certificate: path("OTEL_EXPORTER_OTLP_CERTIFICATE", &self.certificate),
            client_certificate: path(
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                &self.client_certificate,
            ),
            client_key: path("OTEL_EXPORTER_OTLP_CLIENT_KEY", &self.client_key),
        };
        Ok(Effective {
            traces,
            metrics,
            logs,
            metrics_interval,
            parent_based,
            ratio,
            environment: self.environment.clone(),
            headers: self.headers.clone(),
            tls,
        })
    }
}

/// OTLP settings after the environment. `Debug` redacts credentials.
#[derive(Clone, PartialEq)]
pub struct Effective {
    /// Where spans go, if anywhere.
    pub traces: Option<String>,
    /// Where metrics go, if anywhere.
    pub metrics: Option<String>,
    /// Where log records go, if anywhere.
    pub logs: Option<String>,
    /// How often metrics are exported.
    pub metrics_interval: Duration,
    /// Follow a caller's sampling decision.
    pub parent_based: bool,
    /// The share of new traces recorded.
    pub ratio: f64,
    /// `deployment.environment.name`.
    pub environment: Option<String>,
    /// Metadata sent with every export (the `OTEL_EXPORTER_OTLP_*HEADERS`
    /// variables are added by the exporter itself).
    pub headers: Secret<BTreeMap<String, String>>,
    /// TLS to the collector.
    pub tls: OtlpTls,
}

/// TLS to an OTLP collector: the standard variables' files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtlpTls {
    /// PEM: trusted authorities.
    pub certificate: Option<std::path::PathBuf>,
    /// PEM: the client certificate.
    pub client_certificate: Option<std::path::PathBuf>,
    /// PEM: its key.
    pub client_key: Option<std::path::PathBuf>,
}

impl OtlpTls {
    /// The exporter's TLS configuration, if any file is named; the error
    /// names the file that could not be read.
    pub fn config(&self) -> Result<Option<tonic::transport::ClientTlsConfig>, String> {
        if self.certificate.is_none() && self.client_certificate.is_none() {
            return Ok(None);
        }
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &self.certificate {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        match (&self.client_certificate, &self.client_key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    read(cert)?,
                    read(key)?,
                ));
            }
            (None, None) => {}
            _ => return Err("client_certificate and client_key come together".into()),
        }
        Ok(Some(tls))
    }
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
    #[test]
    fn the_standard_certificate_variables_win_over_config() {
        let settings = OtlpSettings {
            certificate: Some("/config/ca.pem".into()),
            client_certificate: Some("/config/me.pem".into()),
            client_key: Some("/config/me-key.pem".into()),
            ..OtlpSettings::default()
        };
        let env = |name: &str| match name {
            "OTEL_EXPORTER_OTLP_CERTIFICATE" => Some("/env/ca.pem".to_owned()),
            _ => None,
        };
        let tls = settings.effective_with(env).unwrap().tls;
        assert_eq!(
            tls.certificate.as_deref(),
            Some(std::path::Path::new("/env/ca.pem"))
        );
        assert_eq!(
            tls.client_certificate.as_deref(),
            Some(std::path::Path::new("/config/me.pem"))
        );
        let err = OtlpTls {
            certificate: Some("/nowhere/ca.pem".into()),
            ..OtlpTls::default()
        }
        .config()
        .unwrap_err();
        assert!(err.contains("/nowhere/ca.pem"), "{err}");
    }

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
        let file = OtlpSettings {
            endpoint: Some("http://file:4317".into()),
            sample_ratio: 0.5,
            ..Default::default()
        };
        let e = file.effective_with(with(&[])).unwrap();
        assert_eq!(
            (
                e.traces.as_deref(),
                e.metrics.as_deref(),
                e.parent_based,
                e.ratio
            ),
            (Some("http://file:4317"), None, true, 0.5)
        );

        let e = file
            .effective_with(with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317")]))
            .unwrap();
        assert_eq!(e.traces.as_deref(), Some("http://env:4317"));
        let e = file
            .effective_with(with(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
                ("OTEL_METRICS_EXPORTER", "otlp"),
                ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "http://logs:4317"),
            ]))
            .unwrap();
        assert_eq!(e.traces.as_deref(), Some("http://traces:4317"));
        assert_eq!(e.metrics.as_deref(), Some("http://env:4317"));
        assert_eq!(
            e.logs.as_deref(),
            Some("http://logs:4317"),
            "a signal's own endpoint turns it on"
        );
        assert_eq!(
            file.effective_with(with(&[("OTEL_TRACES_EXPORTER", "none")]))
                .unwrap()
                .traces,
            None
        );
        let all = OtlpSettings {
            metrics: true,
            logs: true,
            ..file.clone()
        };
        let off = all
            .effective_with(with(&[("OTEL_SDK_DISABLED", "true")]))
            .unwrap();
        assert_eq!((off.traces, off.metrics, off.logs), (None, None, None));
        let e = all
            .effective_with(with(&[("OTEL_METRIC_EXPORT_INTERVAL", "2500")]))
            .unwrap();
        assert_eq!(e.metrics_interval, Duration::from_millis(2500));
    }

    #[test]
    fn samplers_by_their_standard_names() {
        let s = OtlpSettings::default();
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
        let err = s
            .effective_with(with(&[("OTEL_LOGS_EXPORTER", "console")]))
            .unwrap_err();
        assert_eq!(err.variable, "OTEL_LOGS_EXPORTER");
    }

    #[test]
    fn bad_values_name_the_field() {
        let s = OtlpSettings {
            sample_ratio: 1.5,
            ..Default::default()
        };
        assert_eq!(s.check().unwrap_err().0, "sample_ratio");
        let s = OtlpSettings {
            endpoint: Some("collector:4317".into()),
            ..Default::default()
        };
        assert_eq!(s.check().unwrap_err().0, "endpoint");
        let s = OtlpSettings {
            metrics_interval: Duration::from_millis(5),
            ..Default::default()
        };
        assert_eq!(s.check().unwrap_err().0, "metrics_interval");
    }

    #[test]
    fn credentials_never_show_in_the_settings() {
        let mut headers = BTreeMap::new();
        headers.insert("authorization".to_owned(), "Bearer hunter2".to_owned());
        let s = OtlpSettings {
            endpoint: Some("https://app:hunter2@collector:4317/?api_key=hunter2".into()),
            headers: Secret::new(headers),
            ..Default::default()
        };
        let shown = serde_json::to_string(&s).unwrap();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("https://app:***@collector:4317/?api_key=***"),
            "{shown}"
        );
        assert!(!format!("{s:?}").contains("hunter2"), "{s:?}");
        let effective = s.effective_with(|_| None).unwrap();
        assert!(
            !format!("{effective:?}").contains("hunter2"),
            "{effective:?}"
        );
        assert_eq!(s.check(), Ok(()));
        let mut bad = BTreeMap::new();
        bad.insert("grpc-timeout".to_owned(), "1S".to_owned());
        let s = OtlpSettings {
            headers: Secret::new(bad),
            ..Default::default()
        };
        assert_eq!(s.check().unwrap_err().0, "headers");
    }

    #[test]
    fn intervals_parse_in_the_usual_units() {
        assert_eq!(duration_serde::parse("10s"), Some(Duration::from_secs(10)));
        assert_eq!(
            duration_serde::parse("250ms"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(duration_serde::parse("2m"), Some(Duration::from_secs(120)));
        assert_eq!(duration_serde::parse("soon"), None);
    }
}
