//! An OTLP/gRPC receiver: the official
//! `opentelemetry.proto.collector.{trace,metrics,logs}.v1` services, in
//! process, on a free loopback port, keeping every span, metric data point
//! and log record it is sent for the test to read.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::{
        logs::v1::{
            ExportLogsServiceRequest, ExportLogsServiceResponse,
            logs_service_server::{LogsService, LogsServiceServer},
        },
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    metrics::v1::metric::Data,
    trace::v1::{Span, span::SpanKind, status::StatusCode},
};
use tokio::sync::{Notify, oneshot};

use crate::TestkitError;

/// A span as received, with its resource's attributes.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The resource's attributes (`service.name`, ...), as strings.
    pub resource: HashMap<String, String>,
    /// The span, as the exporter sent it.
    pub span: Span,
    /// The export request's gRPC metadata (ASCII entries), e.g. the
    /// headers an exporter was configured to send.
    pub metadata: HashMap<String, String>,
}

impl ReceivedSpan {
    /// The trace id, lowercase hex.
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    /// The span id, lowercase hex.
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// The parent span id, lowercase hex; empty for a root.
    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// The span's name.
    pub fn name(&self) -> &str {
        &self.span.name
    }

    /// The span kind.
    pub fn kind(&self) -> SpanKind {
        SpanKind::try_from(self.span.kind).unwrap_or(SpanKind::Unspecified)
    }

    /// The status code (Unset when none was set).
    pub fn status(&self) -> StatusCode {
        self.span
            .status
            .as_ref()
            .and_then(|s| StatusCode::try_from(s.code).ok())
            .unwrap_or(StatusCode::Unset)
    }

    /// An attribute's value, as a string.
    pub fn attribute(&self, key: &str) -> Option<String> {
        attribute(&self.span.attributes, key)
    }
}

/// One data point of a metric, as received.
#[derive(Debug, Clone)]
pub struct ReceivedPoint {
    /// The metric's name.
    pub name: String,
    /// The point's attributes, as strings.
    pub attributes: HashMap<String, String>,
    /// A sum's or gauge's value, or a histogram's count.
    pub value: f64,
}

/// A log record, as received.
#[derive(Debug, Clone)]
pub struct ReceivedLog {
    /// The body, as a string.
    pub body: String,
    /// `INFO`, `WARN`, ...
    pub severity: String,
    /// The trace id, lowercase hex; empty outside a trace.
    pub trace_id: String,
    /// The span id, lowercase hex.
    pub span_id: String,
    /// The record's attributes (the event's fields), as strings.
    pub attributes: HashMap<String, String>,
    /// The resource's attributes.
    pub resource: HashMap<String, String>,
}

/// A running receiver; stops on drop.
pub struct OtlpReceiver {
    points: Arc<Mutex<Vec<ReceivedPoint>>>,
    logs: Arc<Mutex<Vec<ReceivedLog>>>,
    addr: SocketAddr,
    secure: bool,
    count: Arc<std::sync::atomic::AtomicU64>,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    arrived: Arc<Notify>,
    _stop: oneshot::Sender<()>,
}

struct Receiver {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    arrived: Arc<Notify>,
    /// Count spans instead of keeping them (load tests).
    counting: bool,
    count: Arc<std::sync::atomic::AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        let metadata: HashMap<String, String> = request
            .metadata()
            .iter()
            .filter_map(|entry| match entry {
                tonic::metadata::KeyAndValueRef::Ascii(key, value) => {
                    Some((key.to_string(), value.to_str().ok()?.to_owned()))
                }
                tonic::metadata::KeyAndValueRef::Binary(..) => None,
            })
            .collect();
        if self.counting {
            let n: usize = request
                .get_ref()
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            self.count
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            return Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }));
        }
        for resource_spans in request.into_inner().resource_spans {
            let resource: HashMap<String, String> = resource_spans
                .resource
                .map(|r| {
                    r.attributes
                        .iter()
                        .filter_map(|kv| Some((kv.key.clone(), value(kv.value.as_ref()?))))
                        .collect()
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    received.push(ReceivedSpan {
                        resource: resource.clone(),
                        span,
                        metadata: metadata.clone(),
                    });
                }
            }
        }
        self.spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(received);
        self.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[derive(Clone)]
struct Sink {
    points: Arc<Mutex<Vec<ReceivedPoint>>>,
    logs: Arc<Mutex<Vec<ReceivedLog>>>,
    arrived: Arc<Notify>,
}

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for rm in request.into_inner().resource_metrics {
            for sm in rm.scope_metrics {
                for metric in sm.metrics {
                    let points: Vec<(HashMap<String, String>, f64)> = match &metric.data {
                        Some(Data::Sum(s)) => s
                            .data_points
                            .iter()
                            .map(|p| (strings(&p.attributes), number(p)))
                            .collect(),
                        Some(Data::Gauge(g)) => g
                            .data_points
                            .iter()
                            .map(|p| (strings(&p.attributes), number(p)))
                            .collect(),
                        Some(Data::Histogram(h)) => h
                            .data_points
                            .iter()
                            .map(|p| (strings(&p.attributes), p.count as f64))
                            .collect(),
                        _ => Vec::new(),
                    };
                    for (attributes, value) in points {
                        received.push(ReceivedPoint {
                            name: metric.name.clone(),
                            attributes,
                            value,
                        });
                    }
                }
            }
        }
        self.points
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(received);
        self.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl LogsService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for rl in request.into_inner().resource_logs {
            let resource = rl
                .resource
                .map(|r| strings(&r.attributes))
                .unwrap_or_default();
            for sl in rl.scope_logs {
                for record in sl.log_records {
                    received.push(ReceivedLog {
                        body: record.body.as_ref().map(value).unwrap_or_default(),
                        severity: record.severity_text.clone(),
                        trace_id: hex(&record.trace_id),
                        span_id: hex(&record.span_id),
                        attributes: strings(&record.attributes),
                        resource: resource.clone(),
                    });
                }
            }
        }
        self.logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(received);
        self.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportLogsServiceResponse {
            partial_success: None,
        }))
    }
}

fn strings(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes
        .iter()
        .filter_map(|kv| Some((kv.key.clone(), value(kv.value.as_ref()?))))
        .collect()
}

fn number(p: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint) -> f64 {
    use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as V;
    match p.value {
        Some(V::AsDouble(d)) => d,
        Some(V::AsInt(i)) => i as f64,
        None => 0.0,
    }
}

impl OtlpReceiver {
    /// Every metric data point received so far (each export repeats the
    /// cumulative values).
    pub fn points(&self) -> Vec<ReceivedPoint> {
        self.points
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every log record received so far.
    pub fn logs(&self) -> Vec<ReceivedLog> {
        self.logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until `done` holds for what the receiver holds, or `timeout`
    /// passes; returns whether it held.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&OtlpReceiver) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.arrived.notified();
            if done(self) {
                return true;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return done(self);
            }
        }
    }

    /// Starts a receiver on a free loopback port.
    pub async fn start() -> Result<OtlpReceiver, TestkitError> {
        Self::start_with(false).await
    }

    /// A receiver that only counts what it is sent ([`count`](Self::count)),
    /// for load tests that would otherwise hold millions of spans.
    pub async fn start_counting() -> Result<OtlpReceiver, TestkitError> {
        Self::start_with(true).await
    }

    /// A receiver on TLS with this certificate and key, requiring clients
    /// to show a certificate from `ca` (PEM text): its
    /// [`endpoint`](Self::endpoint) is `https://`.
    pub async fn start_tls(cert: &str, key: &str, ca: &str) -> Result<OtlpReceiver, TestkitError> {
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key))
            .client_ca_root(tonic::transport::Certificate::from_pem(ca));
        Self::start_on(false, Some(tls)).await
    }

    /// Spans received by a counting receiver.
    pub fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn start_with(counting: bool) -> Result<OtlpReceiver, TestkitError> {
        Self::start_on(counting, None).await
    }

    async fn start_on(
        counting: bool,
        tls: Option<tonic::transport::ServerTlsConfig>,
    ) -> Result<OtlpReceiver, TestkitError> {
        let io = |source| TestkitError::Io {
            context: "binding the OTLP receiver".into(),
            source,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(io)?;
        let addr = listener.local_addr().map_err(io)?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(Notify::new());
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let service = TraceServiceServer::new(Receiver {
            spans: spans.clone(),
            arrived: arrived.clone(),
            counting,
            count: count.clone(),
        });
        let sink = Sink {
            points: Arc::default(),
            logs: Arc::default(),
            arrived: arrived.clone(),
        };
        let (metrics, logs) = (
            MetricsServiceServer::new(sink.clone()),
            LogsServiceServer::new(sink.clone()),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let secure = tls.is_some();
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            server = server.tls_config(tls).map_err(|e| TestkitError::Start {
                engine: "otlp receiver",
                reason: e.to_string(),
                log: String::new(),
            })?;
        }
        tokio::spawn(async move {
            let _ = server
                .add_service(service)
                .add_service(metrics)
                .add_service(logs)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(OtlpReceiver {
            points: sink.points.clone(),
            logs: sink.logs.clone(),
            addr,
            secure,
            count,
            spans,
            arrived,
            _stop: stop,
        })
    }

    /// `http://127.0.0.1:PORT` (`https://` with [`start_tls`](Self::start_tls)),
    /// for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        let scheme = if self.secure { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until the spans received satisfy `done`, or `timeout` passes;
    /// returns them either way, with whether `done` was met.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> (bool, Vec<ReceivedSpan>) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.arrived.notified();
            let spans = self.spans();
            if done(&spans) {
                return (true, spans);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                let spans = self.spans();
                return (done(&spans), spans);
            }
        }
    }
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .map(value)
}

fn value(v: &AnyValue) -> String {
    match &v.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
