//! The REST mapping, rule by rule, against a gRPC service that answers every
//! call with its request (`tests/proto/conformance/v1/mirror.proto`): in
//! process, and across a real HTTP/2 connection as a remote upstream; and a
//! property test that random messages survive proto → JSON → proto.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    task::{Context, Poll},
};

use axum::body::Body;
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Frame;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, Value};
use serde_json::{Value as Json, json};
use tower::{Service, ServiceExt};
use trellis_transcode::{Transcoder, openapi};

fn descriptor_set() -> &'static [u8] {
    static SET: OnceLock<Vec<u8>> = OnceLock::new();
    SET.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut compiler =
            protox::Compiler::new([root.join("tests/proto"), root.join("../../proto")]).unwrap();
        compiler
            .include_source_info(true)
            .include_imports(true)
            .open_files(["conformance/v1/mirror.proto"])
            .unwrap();
        compiler.encode_file_descriptor_set()
    })
}

fn transcoder() -> Transcoder {
    Transcoder::new(&[descriptor_set()], &["conformance.v1.Mirror"]).unwrap()
}

fn thing_type(pool: &DescriptorPool) -> MessageDescriptor {
    pool.get_message_by_name("conformance.v1.Thing").unwrap()
}

/// The gRPC side: answers with the request, as real gRPC responses.
#[derive(Clone)]
struct Mirror {
    pool: DescriptorPool,
    seen: Arc<Mutex<Option<HeaderMap>>>,
}

impl Mirror {
    fn new() -> Mirror {
        Mirror {
            pool: DescriptorPool::decode(descriptor_set()).unwrap(),
            seen: Arc::default(),
        }
    }

    fn last_headers(&self) -> HeaderMap {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_default()
    }
}

fn frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + 5);
    b.put_u8(0);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

fn status_trailers(code: i32, message: &str) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert(
        "grpc-status",
        HeaderValue::from_str(&code.to_string()).unwrap(),
    );
    if !message.is_empty() {
        t.insert("grpc-message", HeaderValue::from_str(message).unwrap());
    }
    t
}

fn grpc_response(frames: Vec<Frame<Bytes>>) -> Response<Body> {
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(
        frames.into_iter().map(Ok::<_, Infallible>),
    ));
    Response::builder()
        .header("content-type", "application/grpc")
        .body(Body::new(body))
        .unwrap()
}

impl<B> Service<Request<B>> for Mirror
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            *this.seen.lock().unwrap_or_else(PoisonError::into_inner) = Some(parts.headers.clone());
            let method = parts.uri.path().rsplit('/').next().unwrap_or("").to_owned();
            let bytes = http_body_util::BodyExt::collect(body)
                .await
                .unwrap()
                .to_bytes();
            let payload = bytes.slice(5..);
            // Only Thing-taking methods read `code`; others echo bytes.
            let code = if method == "Fail" || method == "Watch" {
                let thing =
                    DynamicMessage::decode(thing_type(&this.pool), payload.clone()).unwrap();
                thing
                    .get_field_by_name("code")
                    .and_then(|v| v.as_i32())
                    .unwrap_or(0)
            } else {
                0
            };
            Ok(match method.as_str() {
                "Fail" if code != 0 => {
                    let mut r = grpc_response(Vec::new());
                    r.headers_mut()
                        .extend(status_trailers(code, "failing as asked"));
                    r
                }
                "Fail" => grpc_response(vec![
                    Frame::data(frame(&[])),
                    Frame::trailers(status_trailers(0, "")),
                ]),
                "Watch" => grpc_response(vec![
                    Frame::data(frame(&payload)),
                    Frame::data(frame(&payload)),
                    Frame::data(frame(&payload)),
                    Frame::trailers(status_trailers(
                        code,
                        if code == 0 { "" } else { "the watch broke" },
                    )),
                ]),
                _ => grpc_response(vec![
                    Frame::data(frame(&payload)),
                    Frame::trailers(status_trailers(0, "")),
                ]),
            })
        })
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Json {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
}

async fn call<S, RB>(
    svc: &S,
    method: &str,
    uri: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Answer
where
    S: Service<Request<Body>, Response = Response<RB>, Error = Infallible> + Clone,
    RB: http_body::Body<Data = Bytes>,
    RB::Error: std::fmt::Debug,
{
    let mut req = Request::builder().method(method).uri(uri);
    // Bodies are JSON unless a test says otherwise.
    if body.is_some()
        && !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        req = req.header("content-type", "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(
            body.map(|b| Body::from(b.to_owned()))
                .unwrap_or_else(Body::empty),
        )
        .unwrap();
    let resp = svc.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = http_body_util::BodyExt::collect(body)
        .await
        .unwrap()
        .to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// Every key of `expected` is in `actual` with that value.
fn assert_subset(case: &str, actual: &Json, expected: &Json) {
    match expected {
        Json::Object(fields) => {
            for (k, v) in fields {
                let got = actual
                    .get(k)
                    .unwrap_or_else(|| panic!("{case}: no {k} in {actual}"));
                assert_subset(&format!("{case}.{k}"), got, v);
            }
        }
        other => assert_eq!(actual, other, "{case}"),
    }
}

/// (name, method, uri, body, status, expected JSON subset)
type Case = (
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
    u16,
    Json,
);

fn cases() -> Vec<Case> {
    vec![
        // Path templates.
        (
            "path variable",
            "GET",
            "/v1/things/abc",
            None,
            200,
            json!({"id": "abc"}),
        ),
        (
            "percent-decoded variable",
            "GET",
            "/v1/things/a%20b",
            None,
            200,
            json!({"id": "a b"}),
        ),
        (
            "additional binding, variable with a pattern",
            "GET",
            "/v1/shelves/s1/things/t2",
            None,
            200,
            json!({"name": "shelves/s1/things/t2"}),
        ),
        (
            "pattern does not match",
            "GET",
            "/v1/racks/s1/things/t2",
            None,
            404,
            json!({"reason": "ROUTE_NOT_FOUND"}),
        ),
        (
            "nested field from the path",
            "PATCH",
            "/v1/things/k1",
            Some(r#"{"n": 4}"#),
            200,
            json!({"nested": {"key": "k1"}, "payload": {"n": 4}}),
        ),
        (
            "custom verb",
            "POST",
            "/v1/things/7:undelete",
            Some("{}"),
            200,
            json!({"id": "7"}),
        ),
        (
            "method not allowed",
            "DELETE",
            "/v1/things/x",
            None,
            405,
            json!({"reason": "METHOD_NOT_ALLOWED"}),
        ),
        // Query parameters.
        (
            "scalar query parameters",
            "GET",
            "/v1/things/x?name=n&flag=true&ratio=0.5&big=9007199254740993&ubig=18446744073709551615&color=GREEN",
            None,
            200,
            json!({"id": "x", "name": "n", "flag": true, "ratio": 0.5, "big": "9007199254740993", "ubig": "18446744073709551615", "color": "GREEN"}),
        ),
        (
            "enum by number",
            "GET",
            "/v1/things/x?color=1",
            None,
            200,
            json!({"color": "RED"}),
        ),
        (
            "repeated query parameters",
            "GET",
            "/v1/things/x?tags=a&tags=b&numbers=1&numbers=2",
            None,
            200,
            json!({"tags": ["a", "b"], "numbers": [1, 2]}),
        ),
        (
            "nested query parameters",
            "GET",
            "/v1/things/x?nested.key=k&nested.n=3",
            None,
            200,
            json!({"nested": {"key": "k", "n": 3}}),
        ),
        (
            "json_name in the query",
            "GET",
            "/v1/things/x?alias=z",
            None,
            200,
            json!({"alias": "z"}),
        ),
        (
            "proto name in the query",
            "GET",
            "/v1/things/x?renamed=z&maybe_big=5",
            None,
            200,
            json!({"alias": "z", "maybeBig": "5"}),
        ),
        (
            "a message is no query parameter",
            "GET",
            "/v1/things/x?any_value=1",
            None,
            400,
            json!({"metadata": {"field": "any_value"}}),
        ),
        (
            "well-known types in the query",
            "GET",
            "/v1/things/x?when=2024-01-02T03:04:05Z&ttl=1.5s&mask=name,tags&maybe=hi",
            None,
            200,
            json!({"when": "2024-01-02T03:04:05Z", "ttl": "1.500s", "mask": "name,tags", "maybe": "hi"}),
        ),
        (
            "unknown query parameter",
            "GET",
            "/v1/things/x?bogus=1",
            None,
            400,
            json!({"reason": "INVALID_FIELD", "metadata": {"field": "bogus"}}),
        ),
        (
            "bad bool in the query",
            "GET",
            "/v1/things/x?flag=yes",
            None,
            400,
            json!({"metadata": {"field": "flag"}}),
        ),
        (
            "bad number in the query",
            "GET",
            "/v1/things/x?big=lots",
            None,
            400,
            json!({"metadata": {"field": "big"}}),
        ),
        (
            "an enum name the enum does not have, in the query",
            "GET",
            "/v1/things/x?color=PURPLE",
            None,
            400,
            json!({"code": "INVALID_ARGUMENT", "metadata": {"field": "color"}}),
        ),
        (
            "an enum name the enum does not have, in the body",
            "POST",
            "/conformance.v1.Mirror/Plain",
            Some(r#"{"color":"PURPLE"}"#),
            400,
            json!({"code": "INVALID_ARGUMENT", "metadata": {"field": "color"}}),
        ),
        (
            "int64 past its range",
            "POST",
            "/conformance.v1.Mirror/Plain",
            Some(r#"{"big":"9223372036854775808"}"#),
            400,
            json!({"metadata": {"field": "big"}}),
        ),
        (
            "int32 past its range",
            "POST",
            "/conformance.v1.Mirror/Plain",
            Some(r#"{"numbers":[2147483648]}"#),
            400,
            json!({"metadata": {"field": "numbers[0]"}}),
        ),
        (
            "int32 past its range, in the query",
            "GET",
            "/v1/things/x?numbers=4294967296",
            None,
            400,
            json!({"metadata": {"field": "numbers"}}),
        ),
        (
            "a path segment that is not UTF-8",
            "GET",
            "/v1/things/%FF",
            None,
            400,
            json!({"reason": "BAD_PATH"}),
        ),
        (
            "a query value that is not UTF-8",
            "GET",
            "/v1/things/x?name=%C3",
            None,
            400,
            json!({"reason": "BAD_QUERY"}),
        ),
        (
            "path field again in the query",
            "GET",
            "/v1/things/x?id=y",
            None,
            400,
            json!({"metadata": {"field": "id"}}),
        ),
        (
            "a body where none is taken",
            "GET",
            "/v1/things/x",
            Some(r#"{"name":"n"}"#),
            400,
            json!({"reason": "UNEXPECTED_BODY"}),
        ),
        // Bodies.
        (
            "body * with the path winning",
            "POST",
            "/v1/shelves/s9/things",
            Some(
                r#"{"shelf":"other","name":"n","big":"12","meta":{"a":[1,"x",null,true]},"anyValue":{"k":1},"blob":"aGk=","counts":{"a":1},"maybe":null}"#,
            ),
            200,
            json!({"shelf": "s9", "name": "n", "big": "12", "meta": {"a": [1.0, "x", null, true]}, "anyValue": {"k": 1.0}, "blob": "aGk=", "counts": {"a": 1}}),
        ),
        (
            "int64 as a JSON number",
            "POST",
            "/v1/shelves/s/things",
            Some(r#"{"big": 12}"#),
            200,
            json!({"big": "12"}),
        ),
        (
            "body * takes no query",
            "POST",
            "/v1/shelves/s/things?name=n",
            Some("{}"),
            400,
            json!({"metadata": {"field": "name"}}),
        ),
        (
            "body field plus query",
            "PATCH",
            "/v1/things/k?name=q",
            Some(r#"{"key":"in-body"}"#),
            200,
            json!({"name": "q", "payload": {"key": "in-body"}, "nested": {"key": "k"}}),
        ),
        (
            "unknown JSON field",
            "POST",
            "/v1/shelves/s/things",
            Some(r#"{"nope": 1}"#),
            400,
            json!({"reason": "INVALID_FIELD", "metadata": {"field": "nope"}}),
        ),
        (
            "unknown nested JSON field",
            "POST",
            "/v1/shelves/s/things",
            Some(r#"{"nested": {"nope": 1}}"#),
            400,
            json!({"metadata": {"field": "nested.nope"}}),
        ),
        (
            "wrong JSON type, with its path",
            "POST",
            "/v1/shelves/s/things",
            Some(r#"{"nested": {"n": "many"}}"#),
            400,
            json!({"metadata": {"field": "nested.n"}}),
        ),
        (
            "bad timestamp",
            "POST",
            "/v1/shelves/s/things",
            Some(r#"{"when": "yesterday"}"#),
            400,
            json!({"metadata": {"field": "when"}}),
        ),
        (
            "not JSON at all",
            "POST",
            "/v1/shelves/s/things",
            Some("{"),
            400,
            json!({"metadata": {"field": "(body)"}}),
        ),
        // Responses.
        (
            "response_body",
            "GET",
            "/v1/search?tags=a&tags=b",
            None,
            200,
            json!(["a", "b"]),
        ),
        (
            "defaults are written",
            "GET",
            "/v1/things/d",
            None,
            200,
            json!({"name": "", "big": "0", "tags": [], "flag": false, "color": "COLOR_UNSPECIFIED"}),
        ),
        (
            "Empty answers {}",
            "POST",
            "/v1/fail",
            Some("{}"),
            200,
            json!({}),
        ),
        // Every method by its gRPC name, annotated or not.
        (
            "unannotated method",
            "POST",
            "/conformance.v1.Mirror/Plain",
            Some(r#"{"name":"p"}"#),
            200,
            json!({"name": "p"}),
        ),
        (
            "annotated method by name",
            "POST",
            "/conformance.v1.Mirror/Get",
            Some(r#"{"id":"g"}"#),
            200,
            json!({"id": "g"}),
        ),
        (
            "no such method",
            "POST",
            "/conformance.v1.Mirror/Nope",
            Some("{}"),
            404,
            json!({"reason": "ROUTE_NOT_FOUND"}),
        ),
        // Errors through the error model.
        (
            "NOT_FOUND is 404",
            "POST",
            "/v1/fail",
            Some(r#"{"code": 5}"#),
            404,
            json!({"code": "NOT_FOUND", "message": "failing as asked"}),
        ),
        (
            "INVALID_ARGUMENT is 400",
            "POST",
            "/v1/fail",
            Some(r#"{"code": 3}"#),
            400,
            json!({"code": "INVALID_ARGUMENT"}),
        ),
        (
            "UNAUTHENTICATED is 401",
            "POST",
            "/v1/fail",
            Some(r#"{"code": 16}"#),
            401,
            json!({"code": "UNAUTHENTICATED"}),
        ),
        (
            "PERMISSION_DENIED is 403",
            "POST",
            "/v1/fail",
            Some(r#"{"code": 7}"#),
            403,
            json!({"code": "PERMISSION_DENIED"}),
        ),
        (
            "RESOURCE_EXHAUSTED is 429",
            "POST",
            "/v1/fail",
            Some(r#"{"code": 8}"#),
            429,
            json!({"code": "RESOURCE_EXHAUSTED"}),
        ),
        (
            "UNAVAILABLE is 503",
            "POST",
            "/v1/fail",
            Some(r#"{"code": 14}"#),
            503,
            json!({"code": "UNAVAILABLE"}),
        ),
        (
            "a stream of requests",
            "POST",
            "/v1/uploads",
            Some("{}"),
            501,
            json!({"reason": "STREAMING_NOT_SUPPORTED"}),
        ),
    ]
}

async fn run_table<S, RB>(svc: &S)
where
    S: Service<Request<Body>, Response = Response<RB>, Error = Infallible> + Clone,
    RB: http_body::Body<Data = Bytes>,
    RB::Error: std::fmt::Debug,
{
    for (name, method, uri, body, status, expected) in cases() {
        let answer = call(svc, method, uri, body, &[]).await;
        assert_eq!(answer.status.as_u16(), status, "{name}: {}", answer.text);
        assert_subset(name, &answer.json(), &expected);
    }
}

#[tokio::test]
async fn the_mapping_rule_by_rule() {
    let mirror = Mirror::new();
    let rest = transcoder().service(mirror.clone());
    run_table(&rest).await;
}

#[tokio::test]
async fn headers_become_metadata_and_the_route_is_named() {
    let mirror = Mirror::new();
    let rest = transcoder().service(mirror.clone());
    let answer = call(
        &rest,
        "GET",
        "/v1/things/h",
        None,
        &[
            ("authorization", "Bearer t"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ],
    )
    .await;
    assert_eq!(answer.status, 200);
    let seen = mirror.last_headers();
    assert_eq!(seen["content-type"], "application/grpc");
    assert_eq!(seen["te"], "trailers");
    assert_eq!(seen["authorization"], "Bearer t");
    assert!(seen.contains_key("traceparent"));
    assert_eq!(answer.headers["content-type"], "application/json");

    // A path that exists under other methods is 405, with Allow.
    let other = call(&rest, "PUT", "/v1/things/x", None, &[]).await;
    assert_eq!(other.status, 405);
    assert_eq!(other.headers["allow"], "GET, PATCH");
    let by_name = call(&rest, "GET", "/conformance.v1.Mirror/Plain", None, &[]).await;
    assert_eq!(
        (by_name.status.as_u16(), &by_name.headers["allow"]),
        (405, &HeaderValue::from_static("POST"))
    );

    // The response names the template it matched, for metrics and traces.
    let req = Request::get("/v1/shelves/a/things/b")
        .body(Body::empty())
        .unwrap();
    let resp = rest.clone().oneshot(req).await.unwrap();
    let template = resp
        .extensions()
        .get::<trellis_core::RouteTemplate>()
        .map(|t| t.0.to_string());
    assert_eq!(template.as_deref(), Some("/v1/{name=shelves/*/things/*}"));
}

#[tokio::test]
async fn a_server_stream_arrives_as_server_sent_events_or_ndjson() {
    let rest = transcoder().service(Mirror::new());
    let sse = call(
        &rest,
        "GET",
        "/v1/things/s:watch?name=n",
        None,
        &[("accept", "text/event-stream")],
    )
    .await;
    assert_eq!(sse.status, 200);
    assert_eq!(sse.headers["content-type"], "text/event-stream");
    let events: Vec<&str> = sse.text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 3, "{}", sse.text);
    for e in &events {
        let data: Json = serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(
            (data["id"].as_str(), data["name"].as_str()),
            (Some("s"), Some("n"))
        );
    }

    // A stream that fails after its messages ends with an error event.
    let failed = call(&rest, "GET", "/v1/things/s:watch?code=9", None, &[]).await;
    let events: Vec<&str> = failed
        .text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .collect();
    assert_eq!(events.len(), 4, "{}", failed.text);
    let last = events[3]
        .strip_prefix("event: error\ndata: ")
        .unwrap_or_else(|| panic!("{}", events[3]));
    let error: Json = serde_json::from_str(last).unwrap();
    assert_eq!(error["code"], "FAILED_PRECONDITION");

    let nd = call(
        &rest,
        "GET",
        "/v1/things/s:watch",
        None,
        &[("accept", "application/x-ndjson")],
    )
    .await;
    assert_eq!(nd.headers["content-type"], "application/x-ndjson");
    let lines: Vec<Json> = nd
        .text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["id"], "s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_upstream_over_http2_maps_the_same() {
    // The mirror behind a real HTTP/2 listener, reached through a tonic channel.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let mirror = Mirror::new();
    let served = mirror.clone();
    tokio::spawn(async move {
        loop {
            let Ok((io, _)) = listener.accept().await else {
                return;
            };
            let svc = hyper_util::service::TowerToHyperService::new(served.clone());
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .http2_only()
                .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                .await;
            });
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let upstream = channel
        .map_request(|r: Request<trellis_transcode::UpstreamBody>| r.map(tonic::body::Body::new));
    let rest = transcoder().service(upstream);
    // The REST service's error type is Infallible whatever the upstream's.
    run_table(&rest).await;
}

#[tokio::test]
async fn the_grpc_face_is_checked_by_the_same_rules() {
    let pool = DescriptorPool::decode(descriptor_set()).unwrap();
    let validator = trellis_transcode::validate::Validator::new(&pool).unwrap();
    let mirror = Mirror::new();
    let checked = tower::Layer::layer(
        &trellis_transcode::validate::ValidateLayer::new(&pool, validator, 1 << 20),
        mirror.clone(),
    );
    let order = pool.get_message_by_name("conformance.v1.Order").unwrap();
    let grpc = |json: &str| {
        let mut de = serde_json::Deserializer::from_str(json);
        let message = DynamicMessage::deserialize(order.clone(), &mut de).unwrap();
        Request::post("/conformance.v1.Mirror/Place")
            .header("content-type", "application/grpc")
            .body(Body::from(frame(&prost::Message::encode_to_vec(&message))))
            .unwrap()
    };

    let rejected = checked
        .clone()
        .oneshot(grpc(r#"{"sku":"x"}"#))
        .await
        .unwrap();
    assert_eq!(rejected.headers()["grpc-status"], "3");
    let status = tonic::Status::from_header_map(rejected.headers()).unwrap();
    let error = trellis_core::Error::from(status);
    assert_eq!(
        error.metadata().get("fields").map(String::as_str),
        Some("sku,quantity,ship_to"),
        "{error}"
    );
    assert!(
        mirror.last_headers().is_empty(),
        "a rejected call never reaches the service"
    );

    let passed = checked
        .clone()
        .oneshot(grpc(r#"{"sku":"ABC","quantity":1,"shipTo":{}}"#))
        .await
        .unwrap();
    assert!(
        passed.headers().get("grpc-status").is_none(),
        "{:?}",
        passed.headers()
    );
    assert!(!mirror.last_headers().is_empty());

    // A message with only REQUIRED fields is checked on the wire: a field
    // sent with its default value is missing, an empty message is present.
    let reference = pool.get_message_by_name("conformance.v1.Ref").unwrap();
    let lookup = |json: &str| {
        let mut de = serde_json::Deserializer::from_str(json);
        let message = DynamicMessage::deserialize(reference.clone(), &mut de).unwrap();
        Request::post("/conformance.v1.Mirror/Lookup")
            .header("content-type", "application/grpc")
            .body(Body::from(frame(&prost::Message::encode_to_vec(&message))))
            .unwrap()
    };
    let missing = checked
        .clone()
        .oneshot(lookup(r#"{"version":"3"}"#))
        .await
        .unwrap();
    let error =
        trellis_core::Error::from(tonic::Status::from_header_map(missing.headers()).unwrap());
    assert_eq!(
        error.metadata().get("fields").map(String::as_str),
        Some("id,parent,tags"),
        "{error}"
    );
    let present = checked
        .clone()
        .oneshot(lookup(r#"{"id":"x","parent":{},"tags":["a"]}"#))
        .await
        .unwrap();
    assert!(
        present.headers().get("grpc-status").is_none(),
        "{:?}",
        present.headers()
    );
    let one = checked
        .clone()
        .oneshot(lookup(r#"{"parent":{},"tags":["a"]}"#))
        .await
        .unwrap();
    let error = trellis_core::Error::from(tonic::Status::from_header_map(one.headers()).unwrap());
    assert_eq!(
        (
            error.reason(),
            error.metadata().get("field").map(String::as_str)
        ),
        ("INVALID_FIELD", Some("id"))
    );
    // The same rules, decoded, agree.
    let mut de = serde_json::Deserializer::from_str(r#"{"parent":{},"tags":["a"]}"#);
    let decoded = DynamicMessage::deserialize(reference.clone(), &mut de).unwrap();
    let full = trellis_transcode::validate::Validator::new(&pool)
        .unwrap()
        .check(&decoded)
        .unwrap_err();
    assert_eq!(full.metadata().get("field"), error.metadata().get("field"));

    // Methods without rules are not buffered or decoded at all.
    let plain = Request::post("/conformance.v1.Mirror/Plain")
        .header("content-type", "application/grpc")
        .body(Body::from(frame(b"\x0a\x01x")))
        .unwrap();
    assert_eq!(checked.clone().oneshot(plain).await.unwrap().status(), 200);
}

#[test]
fn the_openapi_document_has_every_route_with_its_comments() {
    let doc = openapi(&transcoder());
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/v1/things/{id}", "get"),
        ("/v1/{name}", "get"),
        ("/v1/shelves/{shelf}/things", "post"),
        ("/v1/things/{nested_key}", "patch"),
        ("/v1/things/{id}:undelete", "post"),
        ("/v1/things/{id}:watch", "get"),
        ("/conformance.v1.Mirror/Plain", "post"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} in {:?}",
            paths.keys().collect::<Vec<_>>()
        );
    }
    let get = &paths["/v1/things/{id}"]["get"];
    assert_eq!(get["summary"], "One thing, by id or by resource name.");
    let params: Vec<&str> = get["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(
        params.contains(&"id") && params.contains(&"nested.key") && params.contains(&"tags"),
        "{params:?}"
    );
    assert!(
        !params.contains(&"payload"),
        "messages are not query parameters: {params:?}"
    );
    let thing = &doc["components"]["schemas"]["conformance.v1.Thing"];
    assert_eq!(
        thing["description"],
        "Every kind of field the JSON mapping treats specially."
    );
    assert_eq!(
        thing["properties"]["big"]["type"], "string",
        "int64 is a string in JSON"
    );
    assert_eq!(thing["properties"]["when"]["format"], "date-time");
    assert!(
        thing["properties"].get("alias").is_some(),
        "json_name is the property name"
    );
    assert_eq!(
        doc["components"]["schemas"]["conformance.v1.Color"]["enum"],
        json!(["COLOR_UNSPECIFIED", "RED", "GREEN"])
    );
    // Validation rules become JSON Schema keywords.
    let order = &doc["components"]["schemas"]["conformance.v1.Order"];
    assert_eq!(order["required"], json!(["sku", "shipTo"]));
    assert_eq!(
        (
            &order["properties"]["sku"]["minLength"],
            &order["properties"]["sku"]["maxLength"],
            &order["properties"]["sku"]["pattern"]
        ),
        (&json!(3), &json!(8), &json!("^[A-Z0-9-]+$"))
    );
    assert_eq!(
        (
            &order["properties"]["quantity"]["exclusiveMinimum"],
            &order["properties"]["quantity"]["maximum"]
        ),
        (&json!(0), &json!(100))
    );
    assert_eq!(order["properties"]["notes"]["maxItems"], 2);
    let watch = &paths["/v1/things/{id}:watch"]["get"]["responses"]["200"]["content"];
    assert!(watch.get("text/event-stream").is_some());
}

mod round_trip {
    use proptest::prelude::*;
    use prost::Message;
    use prost_reflect::ReflectMessage;

    use super::*;

    #[allow(clippy::type_complexity)]
    fn thing(
        (id, big, ubig, color, tags): (String, i64, u64, i32, Vec<String>),
        (flag, ratio, blob, numbers): (bool, f64, Vec<u8>, Vec<i32>),
        (when, ttl, maybe, nested): (
            (i64, i32),
            (i64, i32),
            Option<String>,
            Option<(String, i32)>,
        ),
    ) -> DynamicMessage {
        let pool = DescriptorPool::decode(descriptor_set()).unwrap();
        let desc = thing_type(&pool);
        let mut m = DynamicMessage::new(desc.clone());
        m.set_field_by_name("id", Value::String(id));
        m.set_field_by_name("big", Value::I64(big));
        m.set_field_by_name("ubig", Value::U64(ubig));
        m.set_field_by_name("color", Value::EnumNumber(color));
        m.set_field_by_name(
            "tags",
            Value::List(tags.into_iter().map(Value::String).collect()),
        );
        m.set_field_by_name("flag", Value::Bool(flag));
        m.set_field_by_name("ratio", Value::F64(ratio));
        m.set_field_by_name("blob", Value::Bytes(blob.into()));
        m.set_field_by_name(
            "numbers",
            Value::List(numbers.into_iter().map(Value::I32).collect()),
        );
        let mut ts = DynamicMessage::new(
            pool.get_message_by_name("google.protobuf.Timestamp")
                .unwrap(),
        );
        ts.set_field_by_name("seconds", Value::I64(when.0));
        ts.set_field_by_name("nanos", Value::I32(when.1));
        m.set_field_by_name("when", Value::Message(ts));
        let mut d = DynamicMessage::new(
            pool.get_message_by_name("google.protobuf.Duration")
                .unwrap(),
        );
        d.set_field_by_name("seconds", Value::I64(ttl.0));
        d.set_field_by_name("nanos", Value::I32(if ttl.0 < 0 { -ttl.1 } else { ttl.1 }));
        m.set_field_by_name("ttl", Value::Message(d));
        if let Some(s) = maybe {
            let mut w = DynamicMessage::new(
                pool.get_message_by_name("google.protobuf.StringValue")
                    .unwrap(),
            );
            w.set_field_by_name("value", Value::String(s));
            m.set_field_by_name("maybe", Value::Message(w));
        }
        if let Some((key, n)) = nested {
            let mut inner =
                DynamicMessage::new(pool.get_message_by_name("conformance.v1.Nested").unwrap());
            inner.set_field_by_name("key", Value::String(key));
            inner.set_field_by_name("n", Value::I32(n));
            m.set_field_by_name("nested", Value::Message(inner));
        }
        m
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn random_messages_survive_proto_json_proto(
            a in (any::<String>(), any::<i64>(), any::<u64>(), 0..3i32, prop::collection::vec(any::<String>(), 0..4)),
            b in (any::<bool>(), -1e300..1e300f64, prop::collection::vec(any::<u8>(), 0..16), prop::collection::vec(any::<i32>(), 0..4)),
            c in (
                (0i64..253_402_300_799, 0i32..1_000_000_000),
                (-315_576_000_000i64..315_576_000_000, 0i32..1_000_000_000),
                prop::option::of(any::<String>()),
                prop::option::of((any::<String>(), any::<i32>())),
            ),
        ) {
            let original = thing(a, b, c);
            let json = serde_json::to_string(&original).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let answer = rt.block_on(async {
                let rest = transcoder().service(Mirror::new());
                call(&rest, "POST", "/conformance.v1.Mirror/Plain", Some(&json), &[]).await
            });
            prop_assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
            let mut de = serde_json::Deserializer::from_str(&answer.text);
            let back = DynamicMessage::deserialize(original.descriptor(), &mut de).unwrap();
            // Equal as protobuf: the same bytes (proto3 drops defaults, so an
            // explicit "" and an absent field are the same message).
            prop_assert_eq!(back.encode_to_vec(), original.encode_to_vec(), "{}", json);
        }
    }
}
