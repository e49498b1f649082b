//! One call across three in-process services over real sockets — `edge`
//! (gRPC) → `bff` (REST) → `user` (gRPC, the real service) — exported to
//! the testkit's OTLP receiver: one trace, the right parents, kinds and
//! statuses, the caller's `traceparent` honoured, baggage at the third hop,
//! and the JSON log lines of all three carrying the trace id.
//!
//! One test function: the subscriber is process-wide.

use std::{
    io::Write,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path, State},
    routing::get,
};
use http_body_util::BodyExt;
use shop_user::{
    UserService, UserSettings,
    api::v1::{
        CreateUserRequest, DeleteUserRequest, GetUserRequest, ListNotificationsRequest,
        ListNotificationsResponse, ListUsersRequest, ListUsersResponse, UpdateUserRequest, User,
        user_service_client::UserServiceClient,
        user_service_server::{UserService as UserApi, UserServiceServer},
    },
};
use tonic::{Request, Response, Status, metadata::MetadataValue};
use tower::ServiceExt;
use trellis::{
    App, State as Lifecycle, TracedChannel,
    config::Config,
    registry::MemoryRegistry,
    telemetry::{LogFormat, OtlpSettings, ServerTraceLayer, Telemetry},
    transport::{GrpcHttpServer, ServerConfig},
};
use trellis_testkit::{
    OtlpReceiver, ReceivedSpan,
    opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode},
};

/// Log lines, captured.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<serde_json::Value> {
        let bytes = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }
}

/// `edge`: a gRPC front that answers GetUser by asking `bff` over REST.
struct Edge {
    bff: SocketAddr,
    http: trellis::HttpClient,
}

#[tonic::async_trait]
impl UserApi for Edge {
    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        let id = request.into_inner().id;
        tracing::info!(%id, "edge asks bff");
        let uri = format!("http://{}/users/{id}", self.bff);
        let req = http::Request::get(uri)
            .body(axum::body::Body::empty())
            .map_err(|e| Status::internal(e.to_string()))?;
        let resp = self
            .http
            .clone()
            .oneshot(req)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            return Err(trellis::Error::from_http(status, &body).into());
        }
        let json: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(User {
            id: json["id"].as_str().unwrap_or_default().into(),
            email: json["email"].as_str().unwrap_or_default().into(),
            ..Default::default()
        }))
    }

    async fn create_user(&self, _: Request<CreateUserRequest>) -> Result<Response<User>, Status> {
        Err(Status::unimplemented("edge only reads"))
    }

    async fn list_users(
        &self,
        _: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        Err(Status::unimplemented("edge only reads"))
    }

    async fn update_user(&self, _: Request<UpdateUserRequest>) -> Result<Response<User>, Status> {
        Err(Status::unimplemented("edge only reads"))
    }

    async fn delete_user(&self, _: Request<DeleteUserRequest>) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("edge only reads"))
    }

    async fn list_notifications(
        &self,
        _: Request<ListNotificationsRequest>,
    ) -> Result<Response<ListNotificationsResponse>, Status> {
        Err(Status::unimplemented("edge only reads"))
    }
}

/// `bff`: REST in front of the user service's gRPC.
async fn bff_get_user(
    State(users): State<UserServiceClient<TracedChannel>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, trellis::Error> {
    tracing::info!(%id, "bff asks user");
    let user = users
        .clone()
        .get_user(GetUserRequest { id })
        .await
        .map_err(trellis::Error::from)?
        .into_inner();
    Ok(Json(
        serde_json::json!({ "id": user.id, "email": user.email }),
    ))
}

/// Runs an app until the test ends.
async fn run(app: App) {
    let mut lifecycle = app.lifecycle();
    tokio::spawn(app.run_until(std::future::pending::<()>()));
    tokio::time::timeout(
        Duration::from_secs(10),
        lifecycle.wait_for(|s| *s == Lifecycle::Ready),
    )
    .await
    .expect("ready in time")
    .expect("lifecycle open");
}

fn spans_of(spans: &[ReceivedSpan], trace_id: &str) -> Vec<ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.trace_id() == trace_id)
        .cloned()
        .collect()
}

/// The one server span of `service`.
fn server_of<'a>(spans: &'a [ReceivedSpan], service: &str) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| {
            s.kind() == SpanKind::Server && s.attribute("service").as_deref() == Some(service)
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one server span of {service} in {:#?}",
        names(spans)
    );
    found[0]
}

/// The one span with this kind and name.
fn find<'a>(spans: &'a [ReceivedSpan], kind: SpanKind, name: &str) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.kind() == kind && s.name() == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {kind:?} span named {name:?} in {:#?}",
        names(spans)
    );
    found[0]
}

fn names(spans: &[ReceivedSpan]) -> Vec<String> {
    spans
        .iter()
        .map(|s| format!("{:?} {} parent={}", s.kind(), s.name(), s.parent_span_id()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_across_three_services_is_one_trace_with_baggage_and_correlated_logs() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let logs = Captured::default();
    let sink = logs.clone();
    let telemetry = Telemetry::builder("telemetry-test")
        .log_format(LogFormat::Json)
        .log_level("info,trellis::access=debug")
        .otlp(OtlpSettings {
            endpoint: Some(receiver.endpoint()),
            metrics: true,
            logs: true,
            ..Default::default()
        })
        .writer(move || sink.clone())
        .init()
        .unwrap();

    // user: the real service, with its default stack (which traces).
    let dir = tempfile::tempdir().unwrap();
    let registry = MemoryRegistry::new();
    let config = Config::<UserSettings>::builder()
        .env_vars(Vec::new())
        .build()
        .await
        .unwrap();
    let user = trellis::service::bind::<UserService>(config, dir.path(), ServerConfig::default())
        .await
        .unwrap();
    let user_addr = user.local_addr();
    run(user.into_app(App::builder("user").registry(Arc::new(registry.clone())))).await;

    // bff: REST, calling user through discovery.
    let channel = trellis::client(&registry, "user").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while channel.get_ref().endpoints().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bff never discovered user"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let bff_router = Router::new()
        .route("/users/{id}", get(bff_get_user))
        .with_state(UserServiceClient::new(channel));
    let bff = GrpcHttpServer::builder(ServerConfig::default())
        .http_router(bff_router)
        .layer(ServerTraceLayer::new().service("bff"))
        .bind()
        .await
        .unwrap();
    let bff_addr = bff.local_addr();
    run(App::builder("bff").server(bff).build()).await;

    // edge: gRPC, calling bff over REST.
    let edge = GrpcHttpServer::builder(ServerConfig::default())
        .grpc_service(UserServiceServer::new(Edge {
            bff: bff_addr,
            http: trellis::http_client(),
        }))
        .layer(ServerTraceLayer::new().service("edge"))
        .bind()
        .await
        .unwrap();
    let edge_addr = edge.local_addr();
    run(App::builder("edge").server(edge).build()).await;

    let mut direct = UserServiceClient::new(
        trellis::transport::connect(&user_addr.to_string(), &Default::default())
            .await
            .unwrap(),
    );
    let ada = direct
        .create_user(CreateUserRequest {
            user: Some(User {
                email: "ada@example.com".into(),
                display_name: "Ada".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();

    // The caller: its own trace context and baggage.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut edge_client = UserServiceClient::new(
        trellis::transport::connect(&edge_addr.to_string(), &Default::default())
            .await
            .unwrap(),
    );
    let mut request = Request::new(GetUserRequest { id: ada.id.clone() });
    let md = request.metadata_mut();
    md.insert(
        "traceparent",
        MetadataValue::try_from(format!("00-{trace_id}-{caller_span}-01")).unwrap(),
    );
    md.insert(
        "baggage",
        MetadataValue::from_static("tenant=acme,request_id=r-42"),
    );
    let got = edge_client.get_user(request).await.unwrap().into_inner();
    assert_eq!(
        (got.id.as_str(), got.email.as_str()),
        (ada.id.as_str(), "ada@example.com")
    );

    // A second call with no context of its own: a new trace rooted at edge.
    let missing = edge_client
        .get_user(GetUserRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");

    telemetry.flush().await;
    let (complete, all) = receiver
        .wait_for(Duration::from_secs(10), |spans| {
            spans_of(spans, trace_id).len() >= 5
                && spans
                    .iter()
                    .filter(|s| {
                        s.parent_span_id().is_empty()
                            && s.attribute("service").as_deref() == Some("edge")
                    })
                    .count()
                    >= 1
        })
        .await;
    let trace = spans_of(&all, trace_id);
    assert!(complete, "spans received: {:#?}", names(&all));

    // One trace, linked hop by hop: caller → edge server → edge's REST client
    // → bff server → bff's gRPC client → user server.
    let edge_server = server_of(&trace, "edge");
    assert_eq!(edge_server.name(), "shop.user.v1.UserService/GetUser");
    assert_eq!(
        edge_server.parent_span_id(),
        caller_span,
        "the caller's traceparent is honoured"
    );
    let rest_client = find(&trace, SpanKind::Client, "GET");
    assert_eq!(rest_client.parent_span_id(), edge_server.span_id());
    let bff_server = find(&trace, SpanKind::Server, "GET /users/{id}");
    assert_eq!(bff_server.parent_span_id(), rest_client.span_id());
    assert_eq!(
        bff_server.attribute("http.route").as_deref(),
        Some("/users/{id}")
    );
    assert_eq!(
        bff_server.attribute("http.response.status_code").as_deref(),
        Some("200")
    );
    let grpc_client = find(&trace, SpanKind::Client, "shop.user.v1.UserService/GetUser");
    assert_eq!(grpc_client.parent_span_id(), bff_server.span_id());
    let user_server = server_of(&trace, "user");
    assert_eq!(user_server.parent_span_id(), grpc_client.span_id());
    assert_eq!(user_server.attribute("rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        user_server.attribute("rpc.service").as_deref(),
        Some("shop.user.v1.UserService")
    );
    assert_eq!(
        user_server.attribute("rpc.method").as_deref(),
        Some("GetUser")
    );
    assert_eq!(
        user_server.attribute("rpc.grpc.status_code").as_deref(),
        Some("0")
    );
    for span in &trace {
        assert_ne!(span.status(), StatusCode::Error, "{} failed", span.name());
    }
    // The resource says who we are.
    assert_eq!(
        user_server.resource.get("service.name").map(String::as_str),
        Some("telemetry-test")
    );
    assert!(user_server.resource.contains_key("service.instance.id"));

    // Baggage set by the caller reaches the third hop.
    assert_eq!(user_server.attribute("tenant").as_deref(), Some("acme"));
    assert_eq!(user_server.attribute("request_id").as_deref(), Some("r-42"));

    // The failed call: its own trace, statuses by the conventions.
    let root = all
        .iter()
        .find(|s| {
            s.parent_span_id().is_empty()
                && s.attribute("service").as_deref() == Some("edge")
                && s.trace_id() != trace_id
        })
        .unwrap_or_else(|| panic!("a new root at edge: {:#?}", names(&all)));
    let failed = spans_of(&all, &root.trace_id());
    let user_failed = failed
        .iter()
        .find(|s| s.kind() == SpanKind::Server && s.attribute("service").as_deref() == Some("user"))
        .unwrap_or_else(|| panic!("user's span in the failed trace: {:#?}", names(&failed)));
    assert_eq!(
        user_failed.attribute("rpc.grpc.status_code").as_deref(),
        Some("5")
    );
    assert_ne!(
        user_failed.status(),
        StatusCode::Error,
        "NOT_FOUND is the caller's problem, not the server's"
    );
    let bff_client_failed = failed
        .iter()
        .find(|s| s.kind() == SpanKind::Client && s.name().ends_with("GetUser"))
        .unwrap_or_else(|| panic!("bff's client span: {:#?}", names(&failed)));
    assert_eq!(
        bff_client_failed.status(),
        StatusCode::Error,
        "a client span fails on any non-OK code"
    );
    let bff_failed = failed
        .iter()
        .find(|s| s.kind() == SpanKind::Server && s.name() == "GET /users/{id}")
        .unwrap();
    assert_eq!(
        bff_failed.attribute("http.response.status_code").as_deref(),
        Some("404")
    );

    // Logs: every hop logged inside the trace, under its own service name,
    // and the third hop's line carries the baggage.
    let lines = logs.lines();
    let in_trace: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["trace_id"] == trace_id).collect();
    for service in ["edge", "bff", "user"] {
        assert!(
            in_trace.iter().any(|l| l["service"] == service),
            "a {service} line with trace id {trace_id} in {lines:#?}"
        );
    }
    let user_line = in_trace.iter().find(|l| l["service"] == "user").unwrap();
    assert_eq!(user_line["tenant"], "acme", "{user_line}");
    assert_eq!(user_line["request_id"], "r-42", "{user_line}");
    assert_eq!(user_line["span_id"], user_server.span_id(), "{user_line}");
    assert!(
        user_line["instance"].is_string() && user_line["timestamp"].is_string(),
        "{user_line}"
    );

    // Metrics and log records went out over OTLP too: the RED histograms
    // under their OpenTelemetry names, the log lines with their trace.
    let exported = receiver
        .wait_until(Duration::from_secs(10), |r| {
            let points = r.points();
            let has = |name: &str, key: &str, value: &str| {
                points.iter().any(|p| {
                    p.name == name
                        && p.attributes.get(key).map(String::as_str) == Some(value)
                        && p.value >= 1.0
                })
            };
            has("rpc.server.duration", "rpc.method", "GetUser")
                && has("rpc.client.duration", "rpc.grpc.status_code", "0")
                && has(
                    "http.client.request.duration",
                    "http.response.status_code",
                    "200",
                )
                && r.logs()
                    .iter()
                    .any(|l| l.body == "bff asks user" && l.trace_id == trace_id)
        })
        .await;
    let names: std::collections::BTreeSet<String> =
        receiver.points().into_iter().map(|p| p.name).collect();
    assert!(
        exported,
        "metrics {names:?}, logs {:#?}",
        receiver
            .logs()
            .iter()
            .map(|l| (&l.body, &l.trace_id))
            .collect::<Vec<_>>()
    );
    let record = receiver
        .logs()
        .into_iter()
        .find(|l| l.body == "bff asks user" && l.trace_id == trace_id)
        .unwrap();
    assert_eq!(record.severity, "INFO");
    assert_eq!(record.attributes.get("id"), Some(&ada.id));
    assert_eq!(record.span_id.len(), 16);

    // Export off, live: nothing is recorded, yet the trace still flows —
    // a caller's trace id reaches the third hop's logs, and a request
    // without one gets a fresh id that all three hops log.
    telemetry.apply(&OtlpSettings::default()).unwrap();
    let before = receiver.spans().len();
    let passed_through = "0af7651916cd43dd8448eb211c80319c";
    let mut request = Request::new(GetUserRequest { id: ada.id.clone() });
    request.metadata_mut().insert(
        "traceparent",
        MetadataValue::try_from(format!("00-{passed_through}-b7ad6b7169203331-01")).unwrap(),
    );
    request
        .metadata_mut()
        .insert("baggage", MetadataValue::from_static("tenant=globex"));
    edge_client.get_user(request).await.unwrap();
    let lines = logs.lines();
    for service in ["edge", "bff", "user"] {
        let line = lines
            .iter()
            .find(|l| l["service"] == service && l["trace_id"] == passed_through)
            .unwrap_or_else(|| panic!("a {service} line in trace {passed_through}: {lines:#?}"));
        assert_eq!(line["tenant"], "globex", "{line}");
    }
    let seen = lines.len();
    edge_client
        .get_user(GetUserRequest { id: ada.id.clone() })
        .await
        .unwrap();
    let fresh: Vec<serde_json::Value> = logs.lines().split_off(seen);
    let edge_line = fresh
        .iter()
        .find(|l| l["service"] == "edge")
        .unwrap_or_else(|| panic!("{fresh:#?}"));
    let fresh_id = edge_line["trace_id"]
        .as_str()
        .unwrap_or_else(|| panic!("a trace id without export: {edge_line}"));
    assert_eq!(fresh_id.len(), 32);
    for service in ["bff", "user"] {
        assert!(
            fresh
                .iter()
                .any(|l| l["service"] == service && l["trace_id"] == fresh_id),
            "{service} in {fresh:#?}"
        );
    }
    // A flush waits for the collector's answer to whatever it exports, so
    // anything still being exported would be in the receiver now.
    telemetry.flush().await;
    assert_eq!(
        receiver.spans().len(),
        before,
        "nothing exported once the endpoint is gone"
    );

    telemetry.shutdown().await;
}

/// An audit record is also a JSON log line (target `trellis::audit`) and an
/// OTLP log record with its fields as attributes, inside the trace it was
/// made in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_are_log_lines_and_otlp_log_records() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let logs = Captured::default();
    let sink = logs.clone();
    let _telemetry = Telemetry::builder("audit-test")
        .log_format(LogFormat::Json)
        .log_level("info")
        .otlp(OtlpSettings {
            endpoint: Some(receiver.endpoint()),
            logs: true,
            ..Default::default()
        })
        .writer(move || sink.clone())
        .init()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let trail = trellis::auth::audit::AuditLog::open(&dir.path().join("audit.jsonl")).unwrap();
    let entry = trellis::auth::audit::Entry {
        subject: Some("ada".into()),
        client_ip: Some("203.0.113.9".into()),
        peer: Some("spiffe://trellis/gateway".into()),
        ..trellis::auth::audit::Entry::new("login", "Login", "failed")
    };
    let record = trail.append(entry).await.unwrap();
    let exported = receiver
        .wait_until(Duration::from_secs(10), |r| {
            r.logs().iter().any(|l| {
                l.body == "audit" && l.attributes.get("kind").map(String::as_str) == Some("login")
            })
        })
        .await;
    let found: Vec<_> = receiver
        .logs()
        .into_iter()
        .filter(|l| l.body == "audit")
        .collect();
    assert!(
        exported,
        "no audit log record over OTLP: {:#?}",
        receiver.logs()
    );
    let attrs = &found[0].attributes;
    assert_eq!(attrs.get("outcome").map(String::as_str), Some("failed"));
    assert_eq!(attrs.get("subject").map(String::as_str), Some("ada"));
    assert_eq!(
        attrs.get("client_ip").map(String::as_str),
        Some("203.0.113.9")
    );
    assert_eq!(
        attrs.get("peer").map(String::as_str),
        Some("spiffe://trellis/gateway")
    );
    assert_eq!(
        attrs.get("seq").map(String::as_str),
        Some(record.seq.to_string().as_str())
    );
    let line = logs
        .lines()
        .into_iter()
        .find(|l| l["message"] == "audit")
        .unwrap_or_else(|| panic!("no audit line in {:#?}", logs.lines()));
    assert_eq!(line["target"], "trellis::audit", "{line}");
    assert_eq!(line["kind"], "login", "{line}");
}

/// An OTLP collector on mutual TLS: the exporter trusts the collector's
/// authority and shows its own certificate (the collector requires one),
/// from `[otlp] certificate`, `client_certificate`, `client_key`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_reaches_a_collector_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs =
        trellis::transport::certs::init(dir.path(), "trellis", &["collector", "user"]).unwrap();
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    let (_, cert, key) = &certs.services[0];
    let receiver = OtlpReceiver::start_tls(&read(cert), &read(key), &read(&certs.ca))
        .await
        .unwrap();
    assert!(receiver.endpoint().starts_with("https://"));
    let (_, client_cert, client_key) = &certs.services[1];
    let _telemetry = Telemetry::builder("tls-test")
        .log_format(LogFormat::Json)
        .log_level("info")
        .otlp(OtlpSettings {
            endpoint: Some(receiver.endpoint()),
            logs: true,
            certificate: Some(certs.ca.clone()),
            client_certificate: Some(client_cert.clone()),
            client_key: Some(client_key.clone()),
            ..Default::default()
        })
        .writer(std::io::sink)
        .init()
        .unwrap();
    tracing::info!(answer = 42, "over mutual tls");
    let arrived = receiver
        .wait_until(Duration::from_secs(15), |r| {
            r.logs().iter().any(|l| l.body == "over mutual tls")
        })
        .await;
    assert!(arrived, "nothing arrived over TLS: {:#?}", receiver.logs());
}
