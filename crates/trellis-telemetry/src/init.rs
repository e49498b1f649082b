//! One `init` for logs and traces.

use std::{
    io::IsTerminal,
    str::FromStr,
    sync::{Arc, Mutex, PoisonError},
};

use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    resource::{EnvResourceDetector, TelemetryResourceDetector},
    trace::{BatchSpanProcessor, SdkTracerProvider},
};
use tracing_subscriber::{
    EnvFilter, Layer, Registry,
    filter::{LevelFilter, Targets},
    fmt::{MakeWriter, writer::BoxMakeWriter},
    layer::SubscriberExt,
    reload,
    util::SubscriberInitExt,
};

use crate::{
    TelemetryError,
    logs::JsonLayer,
    pipeline::{DynamicSampler, ExportSlot, SAMPLER},
    settings::{Effective, TraceSettings},
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
    trace: TraceSettings,
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

    /// The initial trace settings (the environment still wins).
    pub fn trace(mut self, trace: TraceSettings) -> Self {
        self.trace = trace;
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
        let effective = self.trace.effective()?;

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
        let provider = SdkTracerProvider::builder()
            .with_sampler(DynamicSampler(&SAMPLER))
            .with_span_processor(slot.clone())
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer("trellis");

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
        let (filter, handle) = reload::Layer::new(initial);
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
        tracing_subscriber::registry()
            .with(logs.with_filter(filter))
            .with(otel)
            .try_init()
            .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;

        let telemetry = Telemetry {
            instance: instance.into(),
            log: LogControl { handle, pinned },
            provider,
            slot,
            applied: Arc::new(Mutex::new(None)),
        };
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
    slot: ExportSlot,
    applied: Arc<Mutex<Option<String>>>,
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
            trace: TraceSettings::default(),
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

    /// Applies new trace settings: the sampler at once; a new or moved
    /// endpoint gets a new exporter, and the old one is flushed and shut
    /// down in the background.
    pub fn apply(&self, trace: &TraceSettings) -> Result<(), TelemetryError> {
        self.apply_effective(trace.effective()?)
    }

    fn apply_effective(&self, effective: Effective) -> Result<(), TelemetryError> {
        let mut applied = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
        if *applied != effective.endpoint {
            let processor = match &effective.endpoint {
                Some(endpoint) => {
                    let exporter = opentelemetry_otlp::SpanExporter::builder()
                        .with_tonic()
                        .with_endpoint(endpoint.clone())
                        .build()
                        .map_err(|e| TelemetryError::Exporter(endpoint.clone(), e.to_string()))?;
                    Some(BatchSpanProcessor::builder(exporter).build())
                }
                None => None,
            };
            if let Some(old) = self.slot.replace(processor) {
                // Flushing waits on the network: never on a runtime thread.
                let _ = std::thread::Builder::new()
                    .name("trellis-otlp-shutdown".into())
                    .spawn(move || {
                        use opentelemetry_sdk::trace::SpanProcessor;
                        let _ = old.shutdown();
                    });
            }
            match &effective.endpoint {
                Some(endpoint) => tracing::info!(endpoint, "exporting traces over OTLP"),
                None if applied.is_some() => tracing::info!("trace export stopped"),
                None => {}
            }
            *applied = effective.endpoint.clone();
        }
        SAMPLER.set(
            effective.parent_based,
            effective.ratio,
            effective.endpoint.is_some(),
        );
        Ok(())
    }

    /// Follows a service's `trace` section; a value the environment
    /// rejects is logged and the previous one kept.
    pub fn follow(&self, mut trace: tokio::sync::watch::Receiver<TraceSettings>) {
        let telemetry = self.clone();
        tokio::spawn(async move {
            loop {
                let current = trace.borrow_and_update().clone();
                if let Err(err) = telemetry.apply(&current) {
                    tracing::warn!(error = %err, "keeping the previous trace settings");
                }
                if trace.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Exports every finished span now.
    pub async fn flush(&self) {
        let provider = self.provider.clone();
        let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
    }

    /// Flushes and stops the exporter; call before the runtime ends.
    pub async fn shutdown(&self) {
        let provider = self.provider.clone();
        let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    }
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
