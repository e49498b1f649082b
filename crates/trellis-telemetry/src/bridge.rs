//! The process-wide `metrics` recorder: Prometheus always, and the same
//! measurements into OpenTelemetry instruments, exported over OTLP, while
//! metrics export is on.
//!
//! Everything in Trellis counts through the `metrics` facade, so one
//! recorder that fans out is the whole bridge: nothing is measured twice by
//! the code that measures. With export off the fan-out is one uncontended
//! read lock per registration.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError, RwLock},
};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata,
    SharedString, Unit,
};
use metrics_exporter_prometheus::PrometheusRecorder;
use opentelemetry::{
    KeyValue,
    metrics::{Meter, MeterProvider as _},
};
use opentelemetry_sdk::metrics::SdkMeterProvider;

use crate::DURATION_BUCKETS;

/// Where facade metrics go besides Prometheus, if anywhere.
pub(crate) static OTLP_METRICS: Bridge = Bridge {
    active: RwLock::new(None),
};

pub(crate) struct Bridge {
    active: RwLock<Option<Arc<Active>>>,
}

struct Active {
    provider: SdkMeterProvider,
    meter: Meter,
    counters: Mutex<HashMap<String, opentelemetry::metrics::Counter<u64>>>,
    gauges: Mutex<HashMap<String, opentelemetry::metrics::UpDownCounter<f64>>>,
    histograms: Mutex<HashMap<String, opentelemetry::metrics::Histogram<f64>>>,
}

impl Bridge {
    /// Starts exporting through `provider` (or stops, with `None`);
    /// returns the provider replaced, for the caller to shut down.
    pub(crate) fn replace(&self, provider: Option<SdkMeterProvider>) -> Option<SdkMeterProvider> {
        let active = provider.map(|provider| {
            Arc::new(Active {
                meter: provider.meter("trellis"),
                provider,
                counters: Mutex::default(),
                gauges: Mutex::default(),
                histograms: Mutex::default(),
            })
        });
        let old = std::mem::replace(
            &mut *self.active.write().unwrap_or_else(PoisonError::into_inner),
            active,
        );
        old.map(|a| a.provider.clone())
    }

    fn active(&self) -> Option<Arc<Active>> {
        self.active
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Exports what has been measured so far.
    pub(crate) fn flush(&self) {
        if let Some(active) = self.active() {
            let _ = active.provider.force_flush();
        }
    }
}

/// The OpenTelemetry name of a metric we name the Prometheus way.
fn otel_name(name: &str) -> (&str, Option<&'static str>) {
    match name {
        "rpc_server_duration_seconds" => ("rpc.server.duration", Some("s")),
        "rpc_client_duration_seconds" => ("rpc.client.duration", Some("s")),
        "http_server_request_duration_seconds" => ("http.server.request.duration", Some("s")),
        "http_client_request_duration_seconds" => ("http.client.request.duration", Some("s")),
        "rpc_server_active_requests" => ("rpc.server.active_requests", None),
        "http_server_active_requests" => ("http.server.active_requests", None),
        other => (other, None),
    }
}

/// The OpenTelemetry attribute key of a label.
fn otel_key(label: &str) -> &str {
    match label {
        "rpc_system" => "rpc.system",
        "rpc_service" => "rpc.service",
        "rpc_method" => "rpc.method",
        "rpc_grpc_status_code" => "rpc.grpc.status_code",
        "http_request_method" => "http.request.method",
        "http_route" => "http.route",
        "http_response_status_code" => "http.response.status_code",
        "server_address" => "server.address",
        other => other,
    }
}

fn attributes(key: &Key) -> Vec<KeyValue> {
    key.labels()
        .map(|l| KeyValue::new(otel_key(l.key()).to_owned(), l.value().to_owned()))
        .collect()
}

struct OtelCounter(opentelemetry::metrics::Counter<u64>, Vec<KeyValue>);

impl CounterFn for OtelCounter {
    fn increment(&self, value: u64) {
        self.0.add(value, &self.1);
    }

    // An absolute value has no delta to send; counters here only increment.
    fn absolute(&self, _value: u64) {}
}

struct OtelGauge(opentelemetry::metrics::UpDownCounter<f64>, Vec<KeyValue>);

impl GaugeFn for OtelGauge {
    fn increment(&self, value: f64) {
        self.0.add(value, &self.1);
    }

    fn decrement(&self, value: f64) {
        self.0.add(-value, &self.1);
    }

    // Gauges here move by increments; a set value is Prometheus-only.
    fn set(&self, _value: f64) {}
}

struct OtelHistogram(opentelemetry::metrics::Histogram<f64>, Vec<KeyValue>);

impl HistogramFn for OtelHistogram {
    fn record(&self, value: f64) {
        self.0.record(value, &self.1);
    }
}

impl Active {
    fn counter(&self, key: &Key) -> Counter {
        let (name, unit) = otel_name(key.name());
        let mut counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let instrument = counters
            .entry(name.to_owned())
            .or_insert_with(|| {
                let b = self.meter.u64_counter(name.to_owned());
                match unit {
                    Some(u) => b.with_unit(u).build(),
                    None => b.build(),
                }
            })
            .clone();
        Counter::from_arc(Arc::new(OtelCounter(instrument, attributes(key))))
    }

    fn gauge(&self, key: &Key) -> Gauge {
        let (name, _) = otel_name(key.name());
        let mut gauges = self.gauges.lock().unwrap_or_else(PoisonError::into_inner);
        let instrument = gauges
            .entry(name.to_owned())
            .or_insert_with(|| self.meter.f64_up_down_counter(name.to_owned()).build())
            .clone();
        Gauge::from_arc(Arc::new(OtelGauge(instrument, attributes(key))))
    }

    fn histogram(&self, key: &Key) -> Histogram {
        let (name, unit) = otel_name(key.name());
        let mut histograms = self
            .histograms
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let instrument = histograms
            .entry(name.to_owned())
            .or_insert_with(|| {
                let b = self.meter.f64_histogram(name.to_owned());
                let b = if key.name().ends_with("_seconds") {
                    b.with_boundaries(DURATION_BUCKETS.to_vec())
                } else {
                    b
                };
                match unit {
                    Some(u) => b.with_unit(u).build(),
                    None => b.build(),
                }
            })
            .clone();
        Histogram::from_arc(Arc::new(OtelHistogram(instrument, attributes(key))))
    }
}

/// One measurement, two destinations.
struct Both<T>(T, T);

impl CounterFn for Both<Counter> {
    fn increment(&self, value: u64) {
        self.0.increment(value);
        self.1.increment(value);
    }

    fn absolute(&self, value: u64) {
        self.0.absolute(value);
        self.1.absolute(value);
    }
}

impl GaugeFn for Both<Gauge> {
    fn increment(&self, value: f64) {
        self.0.increment(value);
        self.1.increment(value);
    }

    fn decrement(&self, value: f64) {
        self.0.decrement(value);
        self.1.decrement(value);
    }

    fn set(&self, value: f64) {
        self.0.set(value);
        self.1.set(value);
    }
}

impl HistogramFn for Both<Histogram> {
    fn record(&self, value: f64) {
        self.0.record(value);
        self.1.record(value);
    }
}

/// Prometheus, plus OTLP while it is on.
pub(crate) struct Recorder {
    pub(crate) prometheus: PrometheusRecorder,
}

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.prometheus.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.prometheus.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.prometheus.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        let prometheus = self.prometheus.register_counter(key, metadata);
        match OTLP_METRICS.active() {
            Some(otlp) => Counter::from_arc(Arc::new(Both(prometheus, otlp.counter(key)))),
            None => prometheus,
        }
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        let prometheus = self.prometheus.register_gauge(key, metadata);
        match OTLP_METRICS.active() {
            Some(otlp) => Gauge::from_arc(Arc::new(Both(prometheus, otlp.gauge(key)))),
            None => prometheus,
        }
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        let prometheus = self.prometheus.register_histogram(key, metadata);
        match OTLP_METRICS.active() {
            Some(otlp) => Histogram::from_arc(Arc::new(Both(prometheus, otlp.histogram(key)))),
            None => prometheus,
        }
    }
}
