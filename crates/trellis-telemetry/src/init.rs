//! One `init` for logs and traces.

use std::{
    collections::BTreeMap,
    io::IsTerminal,
    str::FromStr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{
    Resource,
    logs::{BatchLogProcessor, SdkLoggerProvider},
    metrics::{PeriodicReader, SdkMeterProvider},
    resource::{EnvResourceDetector, TelemetryResourceDetector},
    trace::{BatchSpanProcessor, SdkTracerProvider},
};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_subscriber::{
    EnvFilter, Layer, Registry,
    filter::{LevelFilter, Targets},
    fmt::{MakeWriter, writer::BoxMakeWriter},
    layer::SubscriberExt,
    reload,
    util::SubscriberInitExt,
};
use trellis_core::{Secret, redact_url};

use crate::{
    TelemetryError,
    bridge::OTLP_METRICS,
    logs::JsonLayer,
    pipeline::{DynamicSampler, ExportSlot, LogSlot, SAMPLER},
    settings::{Effective, OtlpSettings},
};

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, pretty otherwise.
    #[default]
    Auto,
    /// One JSON object per line, with trace ids and baggage.
    Json,
    /// Human-readable, for a terminal.
    Pretty,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(LogFormat::Auto),
            "json" => Ok(LogFormat::Json),
            "pretty" => Ok(LogFormat::Pretty),
            other => Err(format!(
                "unknown log format {other:?}: expected auto, json or pretty"
            )),
        }
    }
}

/// Sets up logs and traces for a process: see [`Telemetry::builder`].
pub struct TelemetryBuilder {
    service: String,
    version: Option<String>,
    instance: Option<String>,
    format: LogFormat,
    level: Option<String>,
    otlp: OtlpSettings,
    writer: Option<BoxMakeWriter>,
}

impl TelemetryBuilder {
    /// `service.version`.
    pub fn version(mut self, version: &str) -> Self {
        self.version = Some(version.into());
        self
    }

    /// `service.instance.id` (a fresh UUID when not given).
    pub fn instance(mut self, instance: &str) -> Self {
        self.instance = Some(instance.into());
        self
    }

    /// The log format (default: [`LogFormat::Auto`]).
    pub fn log_format(mut self, format: LogFormat) -> Self {
        self.format = format;
        self
    }

    /// The initial log filter (`RUST_LOG` syntax) when `RUST_LOG` is unset;
    /// default `info`.
    pub fn log_level(mut self, level: &str) -> Self {
        self.level = Some(level.into());
        self
    }

    /// The initial OTLP settings (the environment still wins).
    pub fn otlp(mut self, otlp: OtlpSettings) -> Self {
        self.otlp = otlp;
        self
    }

    /// Where log lines go (default: stderr).
    pub fn writer<W>(mut self, writer: W) -> Self
    where
        W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
    {
        self.writer = Some(BoxMakeWriter::new(writer));
        self
    }

    /// Installs the process-wide subscriber. With an endpoint configured,
    /// call it inside a Tokio runtime (the OTLP exporter is a tonic client).
    pub fn init(self) -> Result<Telemetry, TelemetryError> {
        let instance = self
            .instance
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        // The `metrics` recorder carries OTLP metrics export too.
        let recorder = crate::prometheus();
        let effective = self.otlp.effective()?;

        let slot = ExportSlot::default();
        let mut attributes = vec![KeyValue::new("service.name", self.service.clone())];
        attributes.push(KeyValue::new("service.instance.id", instance.clone()));
        if let Some(version) = &self.version {
            attributes.push(KeyValue::new("service.version", version.clone()));
        }
        if let Some(env) = &effective.environment {
            attributes.push(KeyValue::new("deployment.environment.name", env.clone()));
        }
        let mut resource = Resource::builder_empty()
            .with_detector(Box::new(TelemetryResourceDetector))
            .with_attributes(attributes)
            .with_detector(Box::new(EnvResourceDetector::new()));
        if let Some(name) = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|n| !n.is_empty())
        {
            resource = resource.with_service_name(name);
        }
        let resource = resource.build();
        let provider = SdkTracerProvider::builder()
            .with_sampler(DynamicSampler(&SAMPLER))
            .with_span_processor(slot.clone())
            .with_resource(resource.clone())
            .build();
        let tracer = provider.tracer("trellis");
        let log_slot = LogSlot::default();
        let logger_provider = SdkLoggerProvider::builder()
            .with_log_processor(log_slot.clone())
            .with_resource(resource.clone())
            .build();

        let from_env = EnvFilter::try_from_default_env().ok();
        let pinned = from_env.is_some();
        let initial = match from_env {
            Some(filter) => filter,
            None => {
                let level = self.level.as_deref().unwrap_or("info");
                EnvFilter::try_new(level)
                    .map_err(|e| TelemetryError::LogLevel(level.to_owned(), e.to_string()))?
            }
        };
        let (filter, handle) = reload::Layer::new(initial.clone());
        let (export_filter, export_handle) = reload::Layer::new(initial);
        let json = match self.format {
            LogFormat::Json => true,
            LogFormat::Pretty => false,
            LogFormat::Auto => !std::io::stderr().is_terminal(),
        };
        let writer = self
            .writer
            .unwrap_or_else(|| BoxMakeWriter::new(std::io::stderr));
        let logs: Box<dyn Layer<Registry> + Send + Sync> = if json {
            Box::new(JsonLayer::new(&self.service, &instance, writer))
        } else {
            Box::new(tracing_subscriber::fmt::layer().with_writer(writer))
        };
        // Spans are traced whatever the log level: `info` and above from
        // every crate, our own server and client spans always.
        let traced = Targets::new()
            .with_default(LevelFilter::INFO)
            .with_target("trellis::server", LevelFilter::TRACE)
            .with_target("trellis::client", LevelFilter::TRACE);
        let otel = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(traced);
        // Log records for OTLP, under the same (live) filter as the lines;
        // with export off the bridge is told no record is wanted and
        // builds none.
        let exported_logs =
            OpenTelemetryTracingBridge::new(&logger_provider).with_filter(export_filter);
        tracing_subscriber::registry()
            .with(logs.with_filter(filter))
            .with(otel)
            .with(exported_logs)
            .try_init()
            .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;

        let telemetry = Telemetry {
            instance: instance.into(),
            log: LogControl {
                reload: Arc::new(move |lines, exported| {
                    handle.reload(lines).is_ok() && export_handle.reload(exported).is_ok()
                }),
                pinned,
            },
            provider,
            logger_provider,
            resource,
            slot,
            log_slot,
            applied: Arc::new(Mutex::new(Applied::default())),
        };
        if let Err(err) = recorder {
            tracing::warn!(error = %err, "metrics are neither served nor exported");
        }
        telemetry.apply_effective(effective)?;
        Ok(telemetry)
    }
}

/// The installed logs and traces: changes them while the process runs,
/// flushes them on the way out.
#[derive(Clone)]
pub struct Telemetry {
    instance: Arc<str>,
    log: LogControl,
    provider: SdkTracerProvider,
    logger_provider: SdkLoggerProvider,
    resource: Resource,
    slot: ExportSlot,
    log_slot: LogSlot,
    applied: Arc<Mutex<Applied>>,
}

/// The exporters in place, by endpoint (and the headers they send).
#[derive(Default)]
struct Applied {
    traces: Option<String>,
    metrics: Option<(String, Duration)>,
    logs: Option<String>,
    headers: Secret<BTreeMap<String, String>>,
    tls: crate::settings::OtlpTls,
}

/// The exporter's TLS for `endpoint`, as the settings and `OTEL_*`
/// variables name it.
fn tls_config(
    effective: &Effective,
    endpoint: &str,
) -> Result<Option<tonic::transport::ClientTlsConfig>, TelemetryError> {
    effective
        .tls
        .config()
        .map_err(|e| TelemetryError::Exporter(redact_url(endpoint), e))
}

/// The export headers as gRPC metadata (checked by `OtlpSettings::check`;
/// anything that still does not fit is left out).
fn metadata(headers: &Secret<BTreeMap<String, String>>) -> MetadataMap {
    let mut map = MetadataMap::new();
    for (name, value) in headers.expose() {
        if let (Ok(name), Ok(value)) = (
            MetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            map.insert(name, value);
        }
    }
    map
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Starts setting up telemetry for `service` (`service.name`, unless
    /// `OTEL_SERVICE_NAME` says otherwise).
    pub fn builder(service: &str) -> TelemetryBuilder {
        TelemetryBuilder {
            service: service.into(),
            version: None,
            instance: None,
            format: LogFormat::Auto,
            level: None,
            otlp: OtlpSettings::default(),
            writer: None,
        }
    }

    /// `service.instance.id`: what log lines show as `instance`.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The log filter control.
    pub fn log(&self) -> &LogControl {
        &self.log
    }

    /// Applies new OTLP settings: the sampler at once; a new or moved
    /// endpoint gets a new exporter, and the old one is flushed and shut
    /// down on a thread of its own.
    pub fn apply(&self, otlp: &OtlpSettings) -> Result<(), TelemetryError> {
        self.apply_effective(otlp.effective()?)
    }

    fn apply_effective(&self, effective: Effective) -> Result<(), TelemetryError> {
        let mut applied = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
        if applied.headers != effective.headers || applied.tls != effective.tls {
            // New credentials or certificates: every exporter is built again.
            *applied = Applied {
                headers: effective.headers.clone(),
                tls: effective.tls.clone(),
                ..Applied::default()
            };
        }
        if applied.traces != effective.traces {
            let processor = match &effective.traces {
                Some(endpoint) => {
                    let mut builder = opentelemetry_otlp::SpanExporter::builder()
                        .with_tonic()
                        .with_endpoint(endpoint.clone())
                        .with_metadata(metadata(&effective.headers));
                    if let Some(tls) = tls_config(&effective, endpoint)? {
                        builder = builder.with_tls_config(tls);
                    }
                    let exporter = builder.build().map_err(|e| {
                        TelemetryError::Exporter(redact_url(endpoint), e.to_string())
                    })?;
                    Some(BatchSpanProcessor::builder(exporter).build())
                }
                None => None,
            };
            if let Some(old) = self.slot.replace(processor) {
                in_background(move || {
                    use opentelemetry_sdk::trace::SpanProcessor;
                    let _ = old.shutdown();
                });
            }
            announce("traces", &effective.traces, applied.traces.is_some());
            applied.traces = effective.traces.clone();
        }
        let metrics = effective
            .metrics
            .clone()
            .map(|e| (e, effective.metrics_interval));
        if applied.metrics != metrics {
            let provider = match &metrics {
                Some((endpoint, interval)) => {
                    let mut builder = opentelemetry_otlp::MetricExporter::builder()
                        .with_tonic()
                        .with_endpoint(endpoint.clone())
                        .with_metadata(metadata(&effective.headers));
                    if let Some(tls) = tls_config(&effective, endpoint)? {
                        builder = builder.with_tls_config(tls);
                    }
                    let exporter = builder.build().map_err(|e| {
                        TelemetryError::Exporter(redact_url(endpoint), e.to_string())
                    })?;
                    let reader = PeriodicReader::builder(exporter)
                        .with_interval(*interval)
                        .build();
                    Some(
                        SdkMeterProvider::builder()
                            .with_reader(reader)
                            .with_resource(self.resource.clone())
                            .build(),
                    )
                }
                None => None,
            };
            if let Some(old) = OTLP_METRICS.replace(provider) {
                in_background(move || {
                    let _ = old.shutdown();
                });
            }
            announce("metrics", &effective.metrics, applied.metrics.is_some());
            applied.metrics = metrics;
        }
        if applied.logs != effective.logs {
            let processor = match &effective.logs {
                Some(endpoint) => {
                    let mut builder = opentelemetry_otlp::LogExporter::builder()
                        .with_tonic()
                        .with_endpoint(endpoint.clone())
                        .with_metadata(metadata(&effective.headers));
                    if let Some(tls) = tls_config(&effective, endpoint)? {
                        builder = builder.with_tls_config(tls);
                    }
                    let exporter = builder.build().map_err(|e| {
                        TelemetryError::Exporter(redact_url(endpoint), e.to_string())
                    })?;
                    Some(BatchLogProcessor::builder(exporter).build())
                }
                None => None,
            };
            if let Some(old) = self.log_slot.replace(processor) {
                in_background(move || {
                    use opentelemetry_sdk::logs::LogProcessor;
                    let _ = old.shutdown();
                });
            }
            announce("logs", &effective.logs, applied.logs.is_some());
            applied.logs = effective.logs.clone();
        }
        SAMPLER.set(
            effective.parent_based,
            effective.ratio,
            effective.traces.is_some(),
        );
        Ok(())
    }

    /// Follows a service's `otlp` section; a value the environment
    /// rejects is logged and the previous one kept.
    pub fn follow(&self, mut otlp: tokio::sync::watch::Receiver<OtlpSettings>) {
        let telemetry = self.clone();
        tokio::spawn(async move {
            loop {
                let current = otlp.borrow_and_update().clone();
                if let Err(err) = telemetry.apply(&current) {
                    tracing::warn!(error = %err, "keeping the previous OTLP settings");
                }
                if otlp.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Exports every finished span, log record and metric now.
    pub async fn flush(&self) {
        let (provider, logs) = (self.provider.clone(), self.logger_provider.clone());
        let _ = tokio::task::spawn_blocking(move || {
            let _ = provider.force_flush();
            let _ = logs.force_flush();
            OTLP_METRICS.flush();
        })
        .await;
    }

    /// Flushes and stops the exporters; call before the runtime ends.
    pub async fn shutdown(&self) {
        let (provider, logs) = (self.provider.clone(), self.logger_provider.clone());
        let _ = tokio::task::spawn_blocking(move || {
            let _ = provider.shutdown();
            let _ = logs.shutdown();
            if let Some(metrics) = OTLP_METRICS.replace(None) {
                let _ = metrics.shutdown();
            }
        })
        .await;
    }
}

/// Shuts an exporter down off the runtime: flushing waits on the network.
fn in_background(f: impl FnOnce() + Send + 'static) {
    let _ = std::thread::Builder::new()
        .name("trellis-otlp-shutdown".into())
        .spawn(f);
}

fn announce(signal: &str, endpoint: &Option<String>, was_on: bool) {
    match endpoint {
        Some(endpoint) => {
            tracing::info!(
                signal,
                endpoint = redact_url(endpoint),
                "exporting over OTLP"
            )
        }
        None if was_on => tracing::info!(signal, "OTLP export stopped"),
        None => {}
    }
}

/// Changes the process-wide log filter.
#[derive(Clone)]
pub struct LogControl {
    /// Replaces the filter of the log lines and the one of exported log records.
    reload: Arc<dyn Fn(EnvFilter, EnvFilter) -> bool + Send + Sync>,
    /// `RUST_LOG` was set: it wins over `log.level` from config.
    pinned: bool,
}

/// The longest log filter accepted, in bytes.
const MAX_FILTER_BYTES: usize = 4096;

/// Checks a log filter (`log.level`, `RUST_LOG` syntax) before it is
/// applied: every directive must name a level — `info`, `warn,shop_user=debug`
/// — because a bare word (`verbose`) is a valid filter that silences every
/// line but those of a target by that name. The one check `trellis config
/// set` and a running service both use.
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    if filter.len() > MAX_FILTER_BYTES {
        return Err(format!(
            "is {} bytes, over the {MAX_FILTER_BYTES}-byte limit",
            filter.len()
        ));
    }
    let directives: Vec<&str> = filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err("is empty; write a level such as info".into());
    }
    for directive in directives {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if level.trim().parse::<LevelFilter>().is_err() {
            return Err(format!(
                "directive {} names no level (off, error, warn, info, debug, trace); write info or {}=info",
                trellis_core::excerpt(directive),
                trellis_core::excerpt(directive).trim_matches('"'),
            ));
        }
    }
    EnvFilter::builder()
        .parse(filter)
        .map(drop)
        .map_err(|e| format!("is not a log filter: {e}"))
}

impl LogControl {
    /// Applies a `log.level` from config, unless `RUST_LOG` pins the filter.
    /// A filter [`check_log_filter`] refuses is not applied.
    pub fn apply(&self, level: &str) {
        if self.pinned {
            return;
        }
        if let Err(why) = check_log_filter(level) {
            tracing::warn!(error = %why, "ignoring an invalid log level");
            return;
        }
        match EnvFilter::try_new(level) {
            Ok(filter) => {
                let exported = EnvFilter::try_new(level).unwrap_or_else(|_| filter.clone());
                if (self.reload)(filter, exported) {
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

#[cfg(test)]
mod filter_tests {
    use super::check_log_filter;

    #[test]
    fn every_directive_names_a_level() {
        for ok in [
            "info",
            "INFO",
            "warn,shop_user=debug",
            "trellis::access=debug",
            "off",
            "a[s{f=1}]=trace",
        ] {
            assert_eq!(check_log_filter(ok), Ok(()), "{ok}");
        }
        for bad in [
            "not-a-level",
            "word",
            "info,chatty",
            "",
            " , ",
            "a[s{f=1}]",
            "x=loud",
        ] {
            assert!(check_log_filter(bad).is_err(), "{bad:?} was accepted");
        }
        let why = check_log_filter("not-a-level").unwrap_err();
        assert!(why.contains("\"not-a-level\" names no level"), "{why}");
        assert!(check_log_filter(&"a=info,".repeat(1000)).is_err());
    }
}
