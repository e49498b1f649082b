//! The gateway end to end over real sockets: upstreams are real HTTP and
//! gRPC servers on loopback ports, the gateway serves on its own port with
//! its document in a temp file, clients are plain HTTP/1.1 connections and
//! a tonic client.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::Request,
    response::{IntoResponse, Response},
    routing::any,
};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;
use trellis_config::Config;
use trellis_core::Drain;
use trellis_gateway::{Gateway, GatewayConfig};

const DEADLINE: Duration = Duration::from_secs(10);

/// An upstream that answers every request with what it saw, as JSON.
async fn echo_upstream(name: &'static str) -> SocketAddr {
    let app = Router::new().fallback(any(
        move |peer: axum::extract::ConnectInfo<SocketAddr>, req: Request| async move {
            let headers: BTreeMap<String, String> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("?").to_owned()))
                .collect();
            let body = json!({
                "upstream": name,
                "method": req.method().as_str(),
                "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or(""),
                "headers": headers,
                "peer": peer.0.to_string(),
            });
            (
                [("x-upstream", name), ("connection", "keep-alive")],
                axum::Json(body),
            )
                .into_response()
        },
    ));
    serve_axum(app).await
}

async fn serve_axum(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream address");
    tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    addr
}

/// A gateway on its own port following `file`.
struct Running {
    addr: SocketAddr,
    gateway: Gateway,
    config: Config<GatewayConfig>,
    _stop: tokio_util::sync::DropGuard,
}

async fn gateway(file: &Path) -> Running {
    gateway_with(file, trellis_transport::Limits::default()).await
}

async fn gateway_with(file: &Path, limits: trellis_transport::Limits) -> Running {
    let config = Config::<GatewayConfig>::builder()
        .file(file)
        .debounce(Duration::from_millis(20))
        .build()
        .await
        .expect("the gateway document loads");
    let gateway = Gateway::new(config.clone(), None)
        .await
        .expect("gateway starts");
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind gateway");
    let addr = listener.local_addr().expect("gateway address");
    let stop = CancellationToken::new();
    let serving = gateway.clone();
    let drain = Drain::new(stop.clone(), Duration::from_secs(1));
    tokio::spawn(async move { serving.serve(listener, &limits, drain).await });
    Running {
        addr,
        gateway,
        config,
        _stop: stop.drop_guard(),
    }
}

fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("gateway.toml");
    // Written whole and renamed in, as editors and deploy tools do.
    let tmp = dir.path().join(".gateway.toml.tmp");
    std::fs::write(&tmp, text).expect("write document");
    std::fs::rename(&tmp, &path).expect("rename document");
    path
}

/// One HTTP/1.1 connection, kept alive across requests.
struct Conn {
    reader: BufReader<TcpStream>,
}

struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connect to the gateway");
        Conn {
            reader: BufReader::new(stream),
        }
    }

    async fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.request_with_body(method, path, headers, None).await
    }

    async fn request_with_body(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Answer {
        self.try_request(method, path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// One request; an error when the connection ends before a whole
    /// answer.
    async fn try_request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Answer, String> {
        let mut head = format!("{method} {path} HTTP/1.1\r\n");
        if let Some(body) = body {
            head.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            head.push_str("host: gateway.test\r\n");
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        self.reader
            .get_mut()
            .write_all(head.as_bytes())
            .await
            .map_err(|e| format!("send request: {e}"))?;
        if let Some(body) = body {
            self.reader
                .get_mut()
                .write_all(body)
                .await
                .map_err(|e| format!("send the body: {e}"))?;
        }
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .await
            .map_err(|e| format!("status line: {e}"))?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status line: {line:?}"))?;
        let mut headers = BTreeMap::new();
        loop {
            let mut line = String::new();
            self.reader
                .read_line(&mut line)
                .await
                .map_err(|e| format!("header line: {e}"))?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let mut body = Vec::new();
        if method == "HEAD" || status == 204 || status == 304 {
            // No body, whatever the headers say.
        } else if let Some(len) = headers
            .get("content-length")
            .and_then(|l| l.parse::<usize>().ok())
        {
            body.resize(len, 0);
            self.reader
                .read_exact(&mut body)
                .await
                .map_err(|e| format!("body: {e}"))?;
        } else if headers
            .get("transfer-encoding")
            .is_some_and(|t| t == "chunked")
        {
            loop {
                let mut size = String::new();
                self.reader
                    .read_line(&mut size)
                    .await
                    .map_err(|e| format!("chunk size: {e}"))?;
                let n = usize::from_str_radix(size.trim(), 16)
                    .map_err(|e| format!("chunk size {size:?}: {e}"))?;
                let mut chunk = vec![0; n + 2];
                self.reader
                    .read_exact(&mut chunk)
                    .await
                    .map_err(|e| format!("chunk: {e}"))?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        }
        Ok(Answer {
            status,
            headers,
            body,
        })
    }
}

async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    Conn::open(addr).await.request("GET", path, headers).await
}

#[tokio::test]
async fn routes_by_host_path_method_headers_and_query() {
    let (a, b, c) = (
        echo_upstream("a").await,
        echo_upstream("b").await,
        echo_upstream("c").await,
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.a]
targets = [{{ url = "http://{a}" }}]
[upstreams.b]
targets = [{{ url = "http://{b}" }}]
[upstreams.c]
targets = [{{ url = "http://{c}" }}]

[routes.everything]
prefix = "/"
upstream = "a"

[routes.users]
template = "/v1/users/{{id}}"
methods = ["GET"]
upstream = "b"

[routes.canary]
prefix = "/v1/users"
headers = {{ "x-canary" = "yes" }}
priority = 10
upstream = "c"

[routes.debug]
path = "/v1/users/me"
query = {{ debug = "1" }}
upstream = "c"

[routes.cookie_canary]
prefix = "/v1/users"
cookies = {{ canary = "on" }}
priority = 5
upstream = "a"

[routes.api_host]
hosts = ["api.example.com"]
prefix = "/"
upstream = "c"

[routes.wild]
hosts = ["*.internal.test"]
prefix = "/v1"
upstream = "b"
"#
        ),
    );
    let gw = gateway(&file).await;
    let upstream = |answer: &Answer| answer.json()["upstream"].as_str().unwrap_or("?").to_owned();
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 11] = [
        // A cookie canary, among other cookies.
        (
            "GET",
            "/v1/users/7",
            &[("cookie", "session=x; canary=on")],
            "a",
        ),
        ("GET", "/v1/users/7", &[("cookie", "canary=off")], "b"),
        ("GET", "/anything", &[], "a"),
        ("GET", "/v1/users/7", &[], "b"),
        // The template is for GET only: a POST falls through to the prefix route.
        ("POST", "/v1/users/7", &[], "a"),
        // A header and a higher priority win over the more specific template.
        ("GET", "/v1/users/7", &[("x-canary", "yes")], "c"),
        ("GET", "/v1/users/7", &[("x-canary", "no")], "b"),
        ("GET", "/v1/users/me?debug=1", &[], "c"),
        ("GET", "/v1/users/me?debug=0", &[], "b"),
        (
            "GET",
            "/v1/users/7",
            &[("host", "API.example.com:8080")],
            "c",
        ),
        ("GET", "/v1/x", &[("host", "svc.internal.test")], "b"),
    ];
    for (method, path, headers, expected) in cases {
        let answer = Conn::open(gw.addr)
            .await
            .request(method, path, headers)
            .await;
        assert_eq!(answer.status, 200, "{method} {path} {headers:?}");
        assert_eq!(upstream(&answer), expected, "{method} {path} {headers:?}");
    }
    // Only the exact subdomain suffix matches a wildcard.
    let answer = get(gw.addr, "/v1/x", &[("host", "internal.test")]).await;
    assert_eq!(upstream(&answer), "a");
}

#[tokio::test]
async fn no_route_is_a_404_in_the_error_model() {
    let a = echo_upstream("a").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.a]
targets = [{{ url = "http://{a}" }}]
[routes.only]
path = "/here"
upstream = "a"
"#
        ),
    );
    let gw = gateway(&file).await;
    let here = get(gw.addr, "/here", &[]).await;
    assert_eq!(here.status, 200, "{}", String::from_utf8_lossy(&here.body));
    let answer = get(gw.addr, "/elsewhere", &[]).await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.json()["reason"], "ROUTE_NOT_FOUND");
    assert_eq!(
        answer.headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
}

#[tokio::test]
async fn paths_and_headers_are_rewritten_on_the_way() {
    let a = echo_upstream("a").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.a]
targets = [{{ url = "http://{a}" }}]

[routes.old]
prefix = "/old"
strip_prefix = "/old"
add_prefix = "/api/v2"
upstream = "a"
request_headers = {{ remove = ["cookie"], rename = {{ "x-legacy-user" = "x-user" }}, set = {{ "x-env" = "test" }}, add = {{ "x-tag" = "gw" }} }}
response_headers = {{ remove = ["x-upstream"], rename = {{ "content-type" = "x-original-type" }}, set = {{ "cache-control" = "no-store" }} }}

[routes.kept]
prefix = "/kept"
preserve_host = true
upstream = "a"
"#
        ),
    );
    let gw = gateway(&file).await;
    let answer = get(
        gw.addr,
        "/old/items/7?x=1",
        &[
            ("cookie", "secret=1"),
            ("x-tag", "client"),
            ("x-env", "prod"),
            ("x-legacy-user", "ada"),
            ("x-user", "spoofed"),
        ],
    )
    .await;
    assert_eq!(answer.status, 200);
    // Renamed on the way back: the upstream's content type under its new name.
    assert_eq!(
        answer.headers.get("x-original-type").map(String::as_str),
        Some("application/json")
    );
    assert!(!answer.headers.contains_key("content-type"));
    let seen: Value = serde_json::from_slice(&answer.body).expect("JSON");
    assert_eq!(seen["path"], "/api/v2/items/7?x=1");
    let headers = &seen["headers"];
    assert!(headers.get("cookie").is_none(), "cookie removed: {headers}");
    assert_eq!(headers["x-user"], "ada", "renamed, the old value replaced");
    assert!(headers.get("x-legacy-user").is_none(), "{headers}");
    assert_eq!(headers["x-env"], "test");
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-host"], "gateway.test");
    assert_eq!(headers["x-forwarded-proto"], "http");
    // The upstream's own authority, not the client's host.
    assert_eq!(headers["host"], a.to_string());
    assert!(!answer.headers.contains_key("x-upstream"));
    assert_eq!(
        answer.headers.get("cache-control").map(String::as_str),
        Some("no-store")
    );
    // The bare prefix maps to the added prefix.
    assert_eq!(get(gw.addr, "/old", &[]).await.json()["path"], "/api/v2");

    // Hop-by-hop headers stay on their hop; `TE: trailers` goes on.
    let hop = get(
        gw.addr,
        "/old/x",
        &[
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("te", "trailers"),
            ("keep-alive", "timeout=5"),
        ],
    )
    .await
    .json();
    let headers = &hop["headers"];
    assert!(headers.get("x-hop").is_none(), "{headers}");
    // The trace goes on upstream.
    let traced = get(
        gw.addr,
        "/old/t",
        &[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )],
    )
    .await
    .json();
    let upstream_parent = traced["headers"]["traceparent"].as_str().unwrap_or("");
    assert!(
        upstream_parent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{upstream_parent}"
    );
    assert!(headers.get("keep-alive").is_none(), "{headers}");
    assert_eq!(headers["te"], "trailers");

    let kept = get(gw.addr, "/kept", &[("host", "shop.example.com")])
        .await
        .json();
    assert_eq!(kept["headers"]["host"], "shop.example.com");
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let a = echo_upstream("a").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.a]
targets = [{{ url = "http://{a}" }}]
[routes.all]
prefix = "/"
upstream = "a"
"#
        ),
    );
    let gw = gateway(&file).await;
    // Sequential requests, from new client connections each time: the
    // gateway's side of the upstream connection stays the same.
    let mut peers = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let seen = get(gw.addr, "/", &[]).await.json();
        peers.insert(seen["peer"].as_str().unwrap_or("?").to_owned());
    }
    assert_eq!(
        peers.len(),
        1,
        "one upstream connection for 20 sequential requests: {peers:?}"
    );
}

#[tokio::test]
async fn a_weighted_split_sends_each_side_its_share() {
    let (a, b) = (echo_upstream("a").await, echo_upstream("b").await);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.a]
targets = [{{ url = "http://{a}" }}]
[upstreams.b]
targets = [{{ url = "http://{b}" }}]
[routes.split]
prefix = "/"
split = [{{ upstream = "a", weight = 80 }}, {{ upstream = "b", weight = 20 }}]
"#
        ),
    );
    let gw = gateway(&file).await;
    let mut conn = Conn::open(gw.addr).await;
    let mut to_b = 0;
    let n = 1000;
    for _ in 0..n {
        let answer = conn.request("GET", "/", &[]).await;
        if answer.headers.get("x-upstream").map(String::as_str) == Some("b") {
            to_b += 1;
        }
    }
    // Expected 200, standard deviation ~12.6: ±5σ.
    assert!(
        (137..=263).contains(&to_b),
        "{to_b} of {n} went to b (expected about 200)"
    );
}

#[tokio::test]
async fn a_reload_swaps_routes_without_closing_connections_and_a_bad_one_is_refused() {
    let (a, b) = (echo_upstream("a").await, echo_upstream("b").await);
    let dir = tempfile::tempdir().expect("temp dir");
    let doc = |upstream: &str| {
        format!(
            r#"
[upstreams.a]
targets = [{{ url = "http://{a}" }}]
[upstreams.b]
targets = [{{ url = "http://{b}" }}]
[routes.main]
prefix = "/"
upstream = "{upstream}"
"#
        )
    };
    let file = write(&dir, &doc("a"));
    let gw = gateway(&file).await;
    let mut conn = Conn::open(gw.addr).await;
    let answer = conn.request("GET", "/x", &[]).await;
    assert_eq!(
        answer.headers.get("x-upstream").map(String::as_str),
        Some("a")
    );

    // A new document: applied, and the same connection sees it.
    let mut applied = gw.gateway.applied();
    let before = applied.borrow_and_update().clone();
    write(&dir, &doc("b"));
    tokio::time::timeout(DEADLINE, applied.wait_for(|v| *v != before))
        .await
        .expect("the new document is applied within the deadline")
        .expect("the gateway is running");
    let answer = conn.request("GET", "/x", &[]).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.headers.get("x-upstream").map(String::as_str),
        Some("b")
    );

    // A document naming an upstream that does not exist: refused by the
    // store, naming the route and field; the running routes stay.
    let mut rejections = gw.config.rejections();
    let failures = *rejections.borrow_and_update();
    write(&dir, &doc("nowhere"));
    tokio::time::timeout(DEADLINE, rejections.wait_for(|n| *n > failures))
        .await
        .expect("the bad document is refused within the deadline")
        .expect("the config store is running");
    let error = gw.config.last_error().unwrap_or_default();
    assert!(error.contains("routes.main.upstream"), "{error}");
    let answer = conn.request("GET", "/x", &[]).await;
    assert_eq!(
        answer.headers.get("x-upstream").map(String::as_str),
        Some("b")
    );
}

#[tokio::test]
async fn upstream_failures_are_502_and_504() {
    // A port nothing listens on.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("address")
    };
    // An upstream that takes the request and never answers.
    let slow = serve_axum(Router::new().fallback(any(|| async {
        std::future::pending::<()>().await;
        "never"
    })))
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.closed]
targets = [{{ url = "http://{closed}" }}]
[upstreams.slow]
targets = [{{ url = "http://{slow}" }}]
[routes.closed]
prefix = "/closed"
upstream = "closed"
[routes.slow]
prefix = "/slow"
upstream = "slow"
timeout = "200ms"
"#
        ),
    );
    let gw = gateway(&file).await;
    let answer = get(gw.addr, "/closed", &[]).await;
    assert_eq!(
        answer.status,
        502,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["reason"], "UPSTREAM_FAILED");
    let answer = get(gw.addr, "/slow", &[]).await;
    assert_eq!(answer.status, 504);
    assert_eq!(answer.json()["reason"], "UPSTREAM_TIMEOUT");
}

#[tokio::test]
async fn a_streamed_response_is_passed_on_as_it_comes() {
    // The upstream sends a first chunk, then waits until the test has seen
    // that chunk through the gateway before it sends the rest: a gateway
    // that buffered would never deliver the first chunk.
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let release = Arc::new(Mutex::new(Some(release_rx)));
    let app = Router::new().fallback(any(move || {
        let release = release.clone();
        async move {
            let rx = release.lock().ok().and_then(|mut r| r.take());
            let stream = async_stream(rx);
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream))
                .unwrap_or_default()
        }
    }));
    let upstream = serve_axum(app).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.s]
targets = [{{ url = "http://{upstream}" }}]
[routes.s]
prefix = "/"
upstream = "s"
"#
        ),
    );
    let gw = gateway(&file).await;
    let mut stream = TcpStream::connect(gw.addr).await.expect("connect");
    stream
        .write_all(b"GET /events HTTP/1.1\r\nhost: gateway.test\r\n\r\n")
        .await
        .expect("send");
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(DEADLINE, async {
        while !String::from_utf8_lossy(&seen).contains("data: first") {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "closed before the first event: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the first event arrives while the upstream is still holding the rest");
    assert!(!String::from_utf8_lossy(&seen).contains("data: second"));
    let _ = release_tx.send(());
    tokio::time::timeout(DEADLINE, async {
        while !String::from_utf8_lossy(&seen).contains("data: second") {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before the second event");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the second event arrives once released");
}

/// `data: first`, then (once `release` fires) `data: second`.
fn async_stream(
    release: Option<tokio::sync::oneshot::Receiver<()>>,
) -> impl futures_util_stream::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util_stream::unfold((0, release), |(step, release)| async move {
        match step {
            0 => Some((Ok(Bytes::from_static(b"data: first\n\n")), (1, release))),
            1 => {
                if let Some(rx) = release {
                    let _ = rx.await;
                }
                Some((Ok(Bytes::from_static(b"data: second\n\n")), (2, None)))
            }
            _ => None,
        }
    })
}

mod futures_util_stream {
    pub use futures_util::stream::{Stream, unfold};
}

#[tokio::test]
async fn grpc_is_proxied_with_its_status_and_trailers() {
    // A real gRPC server (the standard health service) behind the gateway.
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("shop.Up", tonic_health::ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream_listener(listener))
            .await;
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.grpc]
targets = [{{ url = "http://{upstream}" }}]
h2c = true
[routes.health]
prefix = "/grpc.health.v1.Health"
upstream = "grpc"
"#
        ),
    );
    let gw = gateway(&file).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", gw.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the gateway");
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let ok = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: "shop.Up".into(),
        })
        .await
        .expect("Check through the gateway");
    assert_eq!(ok.into_inner().status, 1, "SERVING");
    // A status in the trailers comes back as the status.
    let err = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: "shop.Unknown".into(),
        })
        .await
        .expect_err("an unknown service is NOT_FOUND");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
}

fn tokio_stream_listener(
    listener: TcpListener,
) -> impl futures_util_stream::Stream<Item = Result<TcpStream, std::io::Error>> {
    futures_util_stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(s, _)| s);
        Some((accepted, listener))
    })
}

#[tokio::test]
async fn a_document_that_does_not_compile_names_the_route_and_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (doc, expected) in [
        (
            "[upstreams.a]\ntargets = [{ url = \"http://127.0.0.1:1\" }]\n[routes.r]\nprefix = \"/\"\nsplit = [{ upstream = \"a\", weight = 1 }, { upstream = \"b\", weight = 1 }]\n",
            "routes.r.split.1.upstream",
        ),
        (
            "[upstreams.a]\ntargets = [{ url = \"http://127.0.0.1:1\" }]\n[routes.r]\npath = \"/x\"\nprefix = \"/y\"\nupstream = \"a\"\n",
            "routes.r.prefix",
        ),
        (
            "[upstreams.a]\ntargets = [{ url = \"http://127.0.0.1\" }]\n",
            "upstreams.a.targets.0.url",
        ),
        (
            "[upstreams.a]\ntargets = [{ url = \"http://127.0.0.1:1\" }]\n[routes.r]\ntemplate = \"/v1/{id\"\nupstream = \"a\"\n",
            "routes.r.template",
        ),
        (
            "[upstreams.a]\ntargets = [{ url = \"http://127.0.0.1:1\" }]\n[routes.r]\nprefix = \"/\"\nupstream = \"a\"\nhosts = [\"bad host\"]\n",
            "routes.r.hosts",
        ),
    ] {
        let file = write(&dir, doc);
        let error = Config::<GatewayConfig>::builder()
            .file(&file)
            .watch(false)
            .build()
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains(expected), "{expected}: {error}");
    }
}

#[tokio::test]
async fn a_websocket_upgrade_is_tunnelled_both_ways_until_idle() {
    // The upstream switches protocols and then echoes every byte.
    let app = Router::new().fallback(any(|mut req: Request| async move {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = on.await else { return };
            let mut io = hyper_util::rt::TokioIo::new(upgraded);
            let mut buf = [0u8; 1024];
            loop {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if io.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            .body(Body::empty())
            .unwrap_or_default()
    }));
    let upstream = serve_axum(app).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.ws]
targets = [{{ url = "http://{upstream}" }}]
[routes.ws]
prefix = "/ws"
upstream = "ws"
idle_timeout = "300ms"
"#
        ),
    );
    let gw = gateway(&file).await;
    let mut stream = TcpStream::connect(gw.addr).await.expect("connect");
    stream
        .write_all(
            b"GET /ws/chat HTTP/1.1\r\nhost: gateway.test\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
              sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
        )
        .await
        .expect("send the upgrade");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(DEADLINE, async {
        while !head.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut byte).await.expect("read the head");
            assert!(
                n > 0,
                "closed during the head: {}",
                String::from_utf8_lossy(&head)
            );
            head.push(byte[0]);
        }
    })
    .await
    .expect("the 101 arrives");
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("sec-websocket-accept"), "{head}");

    // Bytes both ways, as often as the client likes while it keeps talking.
    for message in [&b"hello"[..], b"second frame", b"third"] {
        stream.write_all(message).await.expect("write");
        let mut echo = vec![0u8; message.len()];
        tokio::time::timeout(DEADLINE, stream.read_exact(&mut echo))
            .await
            .expect("the echo arrives")
            .expect("read the echo");
        assert_eq!(echo, message);
    }
    // Then silence: the gateway closes the tunnel after its idle timeout.
    let mut rest = [0u8; 16];
    let closed = tokio::time::timeout(DEADLINE, stream.read(&mut rest))
        .await
        .expect("the idle tunnel is closed within the deadline");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
}

#[tokio::test]
async fn limits_rate_limits_and_request_ids() {
    let a = echo_upstream("a").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[defaults]
max_body_bytes = 1000
max_uri_bytes = 100

[upstreams.a]
targets = [{{ url = "http://{a}" }}]

[routes.open]
prefix = "/open"
upstream = "a"

[routes.scarce]
prefix = "/scarce"
upstream = "a"
rate_limit = {{ rate = 1, period = "1h", burst = 2 }}

[routes.keyed]
prefix = "/keyed"
upstream = "a"
rate_limit = {{ rate = 1, period = "1h", burst = 1, by = "header:x-api-key" }}
"#
        ),
    );
    let gw = gateway(&file).await;

    // A request id is made when the client sent none, and kept when it did.
    let answer = get(gw.addr, "/open", &[]).await;
    let made = answer
        .headers
        .get("x-request-id")
        .cloned()
        .unwrap_or_default();
    assert_eq!(made.len(), 36, "a UUID: {made:?}");
    assert_eq!(answer.json()["headers"]["x-request-id"], made.as_str());
    let kept = get(gw.addr, "/open", &[("x-request-id", "abc-123")]).await;
    assert_eq!(
        kept.headers.get("x-request-id").map(String::as_str),
        Some("abc-123")
    );

    // Too long a URI, too large a declared body: refused before the upstream.
    let long = format!("/open/{}", "x".repeat(200));
    assert_eq!(get(gw.addr, &long, &[]).await.status, 414);
    let big = Conn::open(gw.addr)
        .await
        .request("POST", "/open", &[("content-length", "5000")])
        .await;
    assert_eq!(big.status, 413);
    assert_eq!(big.json()["reason"], "BODY_TOO_LARGE");

    // A route's budget: its burst, then 429 with Retry-After.
    let mut conn = Conn::open(gw.addr).await;
    let statuses: Vec<u16> = {
        let mut out = Vec::new();
        for _ in 0..3 {
            out.push(conn.request("GET", "/scarce", &[]).await.status);
        }
        out
    };
    assert_eq!(statuses, [200, 200, 429]);
    let refused = conn.request("GET", "/scarce", &[]).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["reason"], "RATE_LIMITED");
    assert!(
        refused.headers.contains_key("retry-after"),
        "{:?}",
        refused.headers
    );
    // Other routes are not affected.
    assert_eq!(conn.request("GET", "/open", &[]).await.status, 200);

    // Keyed by header: each key has its own budget.
    assert_eq!(
        conn.request("GET", "/keyed", &[("x-api-key", "k1")])
            .await
            .status,
        200
    );
    assert_eq!(
        conn.request("GET", "/keyed", &[("x-api-key", "k1")])
            .await
            .status,
        429
    );
    assert_eq!(
        conn.request("GET", "/keyed", &[("x-api-key", "k2")])
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn grpc_web_binary_and_text_become_grpc_and_back() {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("shop.Up", tonic_health::ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream_listener(listener))
            .await;
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.grpc]
targets = [{{ url = "http://{upstream}" }}]
h2c = true
[routes.health]
prefix = "/grpc.health.v1.Health"
upstream = "grpc"
"#
        ),
    );
    let gw = gateway(&file).await;
    // HealthCheckRequest { service: "shop.Up" }, framed.
    let message = [&[0x0a, 7][..], b"shop.Up"].concat();
    let framed = [&[0u8][..], &(message.len() as u32).to_be_bytes(), &message].concat();

    // Binary, over HTTP/1.1 (as a browser's fetch sends it).
    let answer = Conn::open(gw.addr)
        .await
        .request_with_body(
            "POST",
            "/grpc.health.v1.Health/Check",
            &[
                ("content-type", "application/grpc-web+proto"),
                ("x-grpc-web", "1"),
            ],
            Some(&framed),
        )
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.headers.get("content-type").map(String::as_str),
        Some("application/grpc-web+proto")
    );
    check_web_answer(&answer.body);

    // Text: the request base64-encoded, the answer too.
    use base64::Engine as _;
    let text = base64::prelude::BASE64_STANDARD.encode(&framed);
    let answer = Conn::open(gw.addr)
        .await
        .request_with_body(
            "POST",
            "/grpc.health.v1.Health/Check",
            &[
                ("content-type", "application/grpc-web-text"),
                ("accept", "application/grpc-web-text"),
            ],
            Some(text.as_bytes()),
        )
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.headers.get("content-type").map(String::as_str),
        Some("application/grpc-web-text+proto")
    );
    // Each frame is its own padded base64 segment: decode group by group.
    let mut decoded = Vec::new();
    for group in answer.body.chunks(4) {
        let mut out = [0u8; 3];
        let n = base64::prelude::BASE64_STANDARD
            .decode_slice(group, &mut out)
            .expect("base64");
        decoded.extend_from_slice(&out[..n]);
    }
    check_web_answer(&decoded);
}

/// A gRPC-Web answer to Health/Check for a serving service: one message
/// frame (`status: SERVING`), then the trailer frame with `grpc-status: 0`.
fn check_web_answer(body: &[u8]) {
    assert!(body.len() > 10, "{body:?}");
    assert_eq!(body[0], 0, "a message frame first: {body:?}");
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    assert_eq!(&body[5..5 + len], &[0x08, 0x01], "status SERVING");
    let trailer = &body[5 + len..];
    assert_eq!(trailer[0], 0x80, "then the trailer frame: {trailer:?}");
    let text = String::from_utf8_lossy(&trailer[5..]);
    assert!(text.contains("grpc-status: 0\r\n"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_fail_no_request_even_at_ten_thousand_routes() {
    let (a, b) = (echo_upstream("a").await, echo_upstream("b").await);
    let dir = tempfile::tempdir().expect("temp dir");
    // `extra` more routes, each on a path of its own.
    let doc = |upstream: &str, extra: usize| {
        let mut text = format!(
            "[upstreams.a]\ntargets = [{{ url = \"http://{a}\" }}]\n\
             [upstreams.b]\ntargets = [{{ url = \"http://{b}\" }}]\n\
             [routes.main]\nprefix = \"/\"\nupstream = \"{upstream}\"\n"
        );
        for i in 0..extra {
            text.push_str(&format!(
                "[routes.r{i}]\ntemplate = \"/v{}/res{i}/{{id}}\"\nmethods = [\"GET\"]\nupstream = \"a\"\n",
                i % 3
            ));
        }
        text
    };
    let file = write(&dir, &doc("a", 0));
    let gw = gateway(&file).await;

    // Eight clients on kept-alive connections, requesting without pause.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let stop = stop.clone();
        let addr = gw.addr;
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let answer = conn.request("GET", "/v2/res5/7", &[]).await;
                if answer.status == 200 {
                    ok += 1;
                } else {
                    failed.push(answer.status);
                }
            }
            (ok, failed)
        }));
    }
    let mut applied = gw.gateway.applied();
    for (round, (upstream, extra)) in [
        ("b", 0),
        ("a", 10_000),
        ("b", 10_000),
        ("a", 0),
        ("b", 10_000),
    ]
    .into_iter()
    .enumerate()
    {
        let before = applied.borrow_and_update().clone();
        let started = std::time::Instant::now();
        write(&dir, &doc(upstream, extra));
        tokio::time::timeout(Duration::from_secs(30), applied.wait_for(|v| *v != before))
            .await
            .unwrap_or_else(|_| panic!("reload {round} applied within the deadline"))
            .expect("the gateway is running");
        eprintln!(
            "reload {round}: {} routes applied {:?} after the write",
            gw.gateway.routes(),
            started.elapsed()
        );
        assert_eq!(gw.gateway.routes(), extra + 1);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for client in clients {
        let (ok, failed) = client.await.expect("client");
        assert!(
            failed.is_empty(),
            "failed requests during reloads: {failed:?}"
        );
        total += ok;
    }
    assert!(total > 0, "the clients made requests");
    // The last document's route for this path is the template to `a`.
    let answer = get(gw.addr, "/v2/res5/7", &[]).await;
    assert_eq!(
        answer.headers.get("x-upstream").map(String::as_str),
        Some("a")
    );
}

#[tokio::test]
async fn a_request_that_could_not_be_taken_is_sent_again_when_safe() {
    let live = echo_upstream("live").await;
    // An endpoint that refuses connections: a port nothing listens on.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("address")
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
# Three upstreams with the same two endpoints: each has its own outlier
# state, so each route meets the dead endpoint before it is ejected.
[upstreams.pair]
targets = [{{ url = "http://{live}" }}, {{ url = "http://{dead}" }}]
balance = "round_robin"
[upstreams.pair_once]
targets = [{{ url = "http://{live}" }}, {{ url = "http://{dead}" }}]
balance = "round_robin"
[upstreams.pair_post]
targets = [{{ url = "http://{live}" }}, {{ url = "http://{dead}" }}]
balance = "round_robin"

[routes.safe]
prefix = "/safe"
upstream = "pair"
retries = {{ attempts = 2, budget = 1.0 }}

[routes.once]
prefix = "/once"
upstream = "pair_once"
retries = {{ attempts = 1 }}

[routes.post]
prefix = "/post"
upstream = "pair_post"
"#
        ),
    );
    let gw = gateway(&file).await;
    let mut conn = Conn::open(gw.addr).await;
    // Round robin sends every other request to the dead endpoint; each of
    // those goes again, to the live one.
    for i in 0..40 {
        let answer = conn.request("GET", "/safe/x", &[]).await;
        assert_eq!(
            answer.status,
            200,
            "GET {i}: {}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    // Without retries the dead endpoint's share fails: the same setup could
    // have failed above.
    let mut failed = 0;
    for _ in 0..40 {
        if conn.request("GET", "/once/x", &[]).await.status == 502 {
            failed += 1;
        }
    }
    assert!(
        failed > 0,
        "without retries some requests reach the dead endpoint and fail"
    );
    // A request with a body is never sent twice.
    let mut failed_posts = 0;
    for _ in 0..40 {
        let answer = Conn::open(gw.addr)
            .await
            .request_with_body("POST", "/post/x", &[], Some(b"{}"))
            .await;
        if answer.status == 502 {
            failed_posts += 1;
        }
    }
    assert!(
        failed_posts > 0,
        "POSTs that met the dead endpoint fail rather than repeat"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_alpn_for_http1_and_http2_checked_by_curl() {
    let a = echo_upstream("a").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("a self-signed certificate");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("write cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
    let file = write(
        &dir,
        &format!(
            r#"
[tls]
cert_file = "{}"
key_file = "{}"
[upstreams.a]
targets = [{{ url = "http://{a}" }}]
[routes.all]
prefix = "/"
upstream = "a"
"#,
            cert.display(),
            key.display()
        ),
    );
    let gw = gateway(&file).await;
    assert!(gw.gateway.is_tls());
    let port = gw.addr.port();
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let out = tokio::process::Command::new("curl")
            .args([
                "-sS",
                flag,
                "--cacert",
                cert.to_str().expect("utf-8 path"),
                "--resolve",
                &format!("localhost:{port}:127.0.0.1"),
                "-w",
                "\n%{http_version} %{http_code}",
                &format!("https://localhost:{port}/secure/path"),
            ])
            .output()
            .await
            .expect("curl runs (apt-get install curl)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{flag}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (body, last) = text.rsplit_once('\n').unwrap_or(("", ""));
        assert_eq!(last, format!("{version} 200"), "{flag}: {text}");
        let seen: Value = serde_json::from_str(body).expect("the upstream's JSON");
        assert_eq!(seen["path"], "/secure/path");
        assert_eq!(seen["upstream"], "a");
        assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    }
    // Plain HTTP on a TLS port is refused (no handshake, no answer).
    let mut plain = TcpStream::connect(gw.addr).await.expect("connect");
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("send");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(DEADLINE, plain.read(&mut buf))
        .await
        .expect("closed within the deadline")
        .unwrap_or(0);
    assert!(
        !String::from_utf8_lossy(&buf[..n]).contains("200"),
        "plain HTTP answered on the TLS port"
    );
}

#[tokio::test]
async fn rest_calls_are_transcoded_to_a_remote_grpc_upstream() {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("shop.Up", tonic_health::ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream_listener(listener))
            .await;
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let fds = dir.path().join("health.pb");
    std::fs::write(&fds, tonic_health::pb::FILE_DESCRIPTOR_SET).expect("write descriptors");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.grpc]
targets = [{{ url = "http://{upstream}" }}]
h2c = true
[routes.health]
prefix = "/grpc.health.v1.Health"
upstream = "grpc"
transcode = {{ descriptor_set = "{}", services = ["grpc.health.v1.Health"] }}
"#,
            fds.display()
        ),
    );
    let gw = gateway(&file).await;
    let call = |service: &'static str| async move {
        let body = format!(r#"{{"service":"{service}"}}"#);
        Conn::open(gw.addr)
            .await
            .request_with_body(
                "POST",
                "/grpc.health.v1.Health/Check",
                &[("content-type", "application/json")],
                Some(body.as_bytes()),
            )
            .await
    };
    let ok = call("shop.Up").await;
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    assert_eq!(ok.json()["status"], "SERVING");
    // The upstream's gRPC status comes back in the error model.
    let missing = call("shop.Nope").await;
    assert_eq!(
        missing.status,
        404,
        "{}",
        String::from_utf8_lossy(&missing.body)
    );
    assert_eq!(missing.json()["code"], "NOT_FOUND");
    // gRPC on the same route passes as it is.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", gw.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "shop.Up".into(),
        })
        .await
        .expect("gRPC through the transcoding route")
        .into_inner()
        .status;
    assert_eq!(status, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_holding_every_slot_are_cut_and_others_served() {
    let a = echo_upstream("a").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.a]
targets = [{{ url = "http://{a}" }}]
[routes.all]
prefix = "/"
upstream = "a"
"#
        ),
    );
    let limits = trellis_transport::Limits {
        max_connections: 8,
        header_read_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let gw = gateway_with(&file, limits).await;
    // Slowloris: every connection slot taken by a head that never ends.
    let mut slow = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nhost: gateway.test\r\nx-slow: ")
            .await
            .expect("a partial head");
        slow.push(s);
    }
    // A well-behaved client still gets its answer: the slow heads are cut
    // at the header-read timeout, which frees their slots.
    let answer = tokio::time::timeout(DEADLINE, get(gw.addr, "/ok", &[]))
        .await
        .expect("a normal request is answered while slow clients hold every slot");
    assert_eq!(answer.status, 200);
    // And the slow ones were closed (with a 408, or without a word).
    for mut s in slow {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf))
            .await
            .expect("the slow connection is closed within the deadline");
        let text = String::from_utf8_lossy(&buf);
        assert!(
            read.is_err() || buf.is_empty() || text.contains("408"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn cors_preflights_answered_and_address_rules_applied() {
    let a = echo_upstream("a").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.a]
targets = [{{ url = "http://{a}" }}]

[routes.api]
prefix = "/api"
methods = ["POST"]
upstream = "a"
cors = {{ allow_origins = ["https://app.example.com"], allow_credentials = true, max_age = "5m" }}

[routes.internal]
prefix = "/internal"
upstream = "a"
allow_ips = ["10.0.0.0/8", "127.0.0.1"]
deny_ips = ["127.0.0.1/32"]

[routes.local]
prefix = "/local"
upstream = "a"
allow_ips = ["127.0.0.0/8", "::1"]
"#
        ),
    );
    let gw = gateway(&file).await;
    // The preflight of a POST (a method the route takes) is answered here.
    let pre = Conn::open(gw.addr)
        .await
        .request(
            "OPTIONS",
            "/api/orders",
            &[
                ("origin", "https://app.example.com"),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", "content-type, x-tenant"),
            ],
        )
        .await;
    assert_eq!(pre.status, 204, "{:?}", pre.headers);
    let h = &pre.headers;
    assert_eq!(
        h.get("access-control-allow-origin").map(String::as_str),
        Some("https://app.example.com")
    );
    assert_eq!(
        h.get("access-control-allow-credentials")
            .map(String::as_str),
        Some("true")
    );
    assert_eq!(
        h.get("access-control-allow-headers").map(String::as_str),
        Some("content-type, x-tenant")
    );
    assert_eq!(
        h.get("access-control-max-age").map(String::as_str),
        Some("300")
    );
    assert!(
        h.get("access-control-allow-methods")
            .is_some_and(|m| m.contains("POST"))
    );
    // Another origin's preflight is refused.
    let refused = Conn::open(gw.addr)
        .await
        .request(
            "OPTIONS",
            "/api/orders",
            &[
                ("origin", "https://evil.example"),
                ("access-control-request-method", "POST"),
            ],
        )
        .await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.json()["reason"], "CORS_ORIGIN_REFUSED");
    // The call itself goes upstream and comes back with the CORS headers.
    let call = Conn::open(gw.addr)
        .await
        .request_with_body(
            "POST",
            "/api/orders",
            &[
                ("origin", "https://app.example.com"),
                ("content-type", "application/json"),
            ],
            Some(b"{}"),
        )
        .await;
    assert_eq!(call.status, 200);
    assert_eq!(
        call.headers
            .get("access-control-allow-origin")
            .map(String::as_str),
        Some("https://app.example.com")
    );
    assert!(
        call.headers
            .get("access-control-expose-headers")
            .is_some_and(|e| e.contains("grpc-status"))
    );

    // Address rules: 127.0.0.1 is in an allowed block but denied by name.
    let denied = get(gw.addr, "/internal/x", &[]).await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.json()["reason"], "ADDRESS_REFUSED");
    assert_eq!(get(gw.addr, "/local/x", &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_take_failing_endpoints_out_and_back() {
    let good = echo_upstream("good").await;
    // An upstream that serves traffic but fails its health path while `sick`.
    let sick = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = sick.clone();
    let app = Router::new()
        .route(
            "/healthz",
            any(move || {
                let sick = flag.load(std::sync::atomic::Ordering::SeqCst);
                async move {
                    if sick {
                        (http::StatusCode::SERVICE_UNAVAILABLE, "sick")
                    } else {
                        (http::StatusCode::OK, "ok")
                    }
                }
            }),
        )
        .fallback(any(|| async { ([("x-upstream", "flaky")], "hello") }));
    let flaky = serve_axum(app).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.pair]
targets = [{{ url = "http://{good}" }}, {{ url = "http://{flaky}" }}]
balance = "round_robin"
health_check = {{ path = "/healthz", interval = "50ms", timeout = "1s", unhealthy_after = 1, healthy_after = 1 }}
[routes.all]
prefix = "/"
upstream = "pair"
"#
        ),
    );
    let gw = gateway(&file).await;
    let endpoints = |view: &Value| {
        view["upstreams"]["pair"]["endpoints"]
            .as_array()
            .map(|e| {
                e.iter()
                    .map(|e| e["address"].as_str().unwrap_or("").to_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    // `good` answers /healthz with its echo (200); `flaky` with 503: only
    // `good` stays.
    let mut updates = gw
        .gateway
        .upstream_updates("pair")
        .expect("the upstream runs");
    let only_good = tokio::time::timeout(DEADLINE, async {
        loop {
            let now = endpoints(&gw.gateway.admin_view());
            if now == [good.to_string()] {
                return now;
            }
            updates.changed().await.expect("the upstream runs");
        }
    })
    .await
    .expect("the failing endpoint is taken out within the deadline");
    assert_eq!(only_good.len(), 1);
    let mut conn = Conn::open(gw.addr).await;
    for _ in 0..20 {
        let answer = conn.request("GET", "/x", &[]).await;
        assert_eq!(
            answer.headers.get("x-upstream").map(String::as_str),
            Some("good")
        );
    }
    // Healthy again: back in the set, and in the rotation.
    sick.store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::timeout(DEADLINE, async {
        while endpoints(&gw.gateway.admin_view()).len() != 2 {
            updates.changed().await.expect("the upstream runs");
        }
    })
    .await
    .expect("the recovered endpoint comes back within the deadline");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let answer = conn.request("GET", "/x", &[]).await;
        seen.insert(
            answer
                .headers
                .get("x-upstream")
                .cloned()
                .unwrap_or_default(),
        );
    }
    assert!(seen.contains("flaky") && seen.contains("good"), "{seen:?}");
}

#[tokio::test]
async fn a_failing_upstream_opens_the_routes_breaker() {
    // Every call fails (500); the upstream counts the calls it gets.
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let seen = calls.clone();
    let app = Router::new().fallback(any(move || {
        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { (http::StatusCode::INTERNAL_SERVER_ERROR, "broken") }
    }));
    let upstream = serve_axum(app).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.broken]
targets = [{{ url = "http://{upstream}" }}]
[routes.all]
prefix = "/"
upstream = "broken"
circuit_breaker = {{ consecutive_failures = 3, open_duration = "1h" }}
"#
        ),
    );
    let gw = gateway(&file).await;
    let mut conn = Conn::open(gw.addr).await;
    for _ in 0..3 {
        assert_eq!(conn.request("GET", "/x", &[]).await.status, 500);
    }
    // Open: failed here, the upstream not called.
    let open = conn.request("GET", "/x", &[]).await;
    assert_eq!(open.status, 503);
    assert_eq!(open.json()["reason"], "CIRCUIT_OPEN");
    assert!(open.headers.contains_key("retry-after"));
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_is_reached_over_tls_and_verified() {
    // The upstream serves HTTPS with the platform's own serving core.
    let dir = tempfile::tempdir().expect("temp dir");
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("a self-signed certificate");
    let (cert, key) = (
        dir.path().join("up-cert.pem"),
        dir.path().join("up-key.pem"),
    );
    std::fs::write(&cert, certified.cert.pem()).expect("write cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
    let config = trellis_transport::tls::load(&cert, &key).expect("the upstream's TLS config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let app = Router::new().fallback(any(|req: Request| async move {
        axum::Json(json!({ "secure": true, "path": req.uri().path() }))
    }));
    let stop = CancellationToken::new();
    let drain = Drain::new(stop.clone(), Duration::from_secs(1));
    let _stop_upstream = stop.drop_guard();
    tokio::spawn(async move {
        trellis_transport::serve::serve_tls(
            listener,
            move |_| app.clone(),
            &Default::default(),
            drain,
            Arc::new(arc_swap::ArcSwap::new(config)),
        )
        .await
    });
    // A second certificate the gateway does not trust.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let untrusted = dir.path().join("other.pem");
    std::fs::write(&untrusted, other.cert.pem()).expect("write");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.secure]
targets = [{{ url = "https://localhost:{port}" }}]
tls = {{ ca_file = "{}" }}
[upstreams.wrong_ca]
targets = [{{ url = "https://localhost:{port}" }}]
tls = {{ ca_file = "{}" }}
[upstreams.system_roots]
targets = [{{ url = "https://localhost:{port}" }}]
[routes.public]
prefix = "/public"
upstream = "system_roots"
retries = {{ attempts = 1 }}
[routes.secure]
prefix = "/secure"
upstream = "secure"
[routes.wrong]
prefix = "/wrong"
upstream = "wrong_ca"
retries = {{ attempts = 1 }}
"#,
            cert.display(),
            untrusted.display()
        ),
    );
    let gw = gateway(&file).await;
    let answer = get(gw.addr, "/secure/x", &[]).await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["secure"], true);
    // A certificate the gateway cannot verify: refused, never proxied —
    // against the wrong CA, and against the system's roots (what an
    // https:// target without `tls` trusts), which do not hold the test CA.
    for path in ["/wrong/x", "/public/x"] {
        let refused = get(gw.addr, path, &[]).await;
        let text = String::from_utf8_lossy(&refused.body).into_owned();
        assert_eq!(refused.status, 502, "{path}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_rapid_reset_flood_closes_that_connection_only() {
    let a = echo_upstream("a").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.a]
targets = [{{ url = "http://{a}" }}]
[routes.all]
prefix = "/"
upstream = "a"
"#
        ),
    );
    let gw = gateway(&file).await;
    // The control: the same kind of connection, used normally, stays open.
    {
        let tcp = TcpStream::connect(gw.addr).await.expect("connect");
        let (mut client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(connection);
        for i in 0..50 {
            client = client.ready().await.expect("the connection stays usable");
            let request = http::Request::get(format!("http://{}/calm", gw.addr))
                .body(())
                .expect("request");
            let (response, _) = client.send_request(request, true).expect("send");
            let response = response
                .await
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(response.status(), 200);
        }
    }
    // h2c: open streams and reset each at once (CVE-2023-44487's pattern).
    let tcp = TcpStream::connect(gw.addr).await.expect("connect");
    let (mut client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let driven = tokio::spawn(connection);
    let mut refused = false;
    for _ in 0..10_000 {
        let request = http::Request::get(format!("http://{}/flood", gw.addr))
            .body(())
            .expect("request");
        match client.send_request(request, true) {
            // Dropping the response future resets the stream.
            Ok((response, _)) => drop(response),
            Err(_) => {
                refused = true;
                break;
            }
        }
        if driven.is_finished() {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    if !refused {
        // The connection may only be closed once the frames are read.
        let closed = tokio::time::timeout(DEADLINE, driven).await;
        refused = matches!(closed, Ok(Ok(Err(_))) | Ok(Ok(Ok(()))));
    }
    assert!(
        refused,
        "the server should end a connection that floods it with resets"
    );
    // Everyone else is served.
    let answer = get(gw.addr, "/ok", &[]).await;
    assert_eq!(answer.status, 200);
}

/// Requests must name their tenant.
struct Tenant;

impl trellis_gateway::Plugin for Tenant {
    fn on_request(&self, request: &mut http::request::Parts) -> Result<(), trellis_core::Error> {
        if request.headers.contains_key("x-tenant") {
            Ok(())
        } else {
            Err(trellis_core::Error::invalid_argument(
                "x-tenant",
                "name the tenant",
            ))
        }
    }
}

/// Tags the request going up and the answer coming back.
struct Tag;

impl trellis_gateway::Plugin for Tag {
    fn on_request(&self, request: &mut http::request::Parts) -> Result<(), trellis_core::Error> {
        request
            .headers
            .insert("x-tagged", http::HeaderValue::from_static("up"));
        Ok(())
    }

    fn on_response(&self, response: &mut http::response::Parts) {
        response
            .headers
            .insert("x-tagged", http::HeaderValue::from_static("down"));
    }
}

#[tokio::test]
async fn plugins_of_your_own_run_on_the_routes_that_name_them() {
    let a = echo_upstream("a").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let doc = |plugins: &str| {
        format!(
            r#"
[upstreams.a]
targets = [{{ url = "http://{a}" }}]
[routes.tenants]
prefix = "/t"
upstream = "a"
plugins = [{plugins}]
[routes.plain]
prefix = "/p"
upstream = "a"
"#
        )
    };
    let file = write(&dir, &doc(r#""tenant", "tag""#));
    let config = Config::<GatewayConfig>::builder()
        .file(&file)
        .debounce(Duration::from_millis(20))
        .build()
        .await
        .expect("loads");
    let plugins = trellis_gateway::Plugins::new()
        .with("tenant", Arc::new(Tenant))
        .with("tag", Arc::new(Tag));
    let gateway = Gateway::with_plugins(config.clone(), None, plugins.clone())
        .await
        .expect("starts");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let serving = gateway.clone();
    tokio::spawn(async move {
        serving
            .serve(
                listener,
                &Default::default(),
                Drain::new(stop, Duration::from_secs(1)),
            )
            .await
    });

    let refused = get(addr, "/t/x", &[]).await;
    assert_eq!(refused.status, 400);
    assert_eq!(refused.json()["metadata"]["field"], "x-tenant");
    let ok = get(addr, "/t/x", &[("x-tenant", "acme")]).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["headers"]["x-tagged"], "up");
    assert_eq!(ok.headers.get("x-tagged").map(String::as_str), Some("down"));
    // A route that names none is untouched.
    let plain = get(addr, "/p/x", &[]).await;
    assert_eq!(plain.status, 200);
    assert!(plain.json()["headers"].get("x-tagged").is_none());

    // A document naming a plugin the gateway lacks is refused on reload.
    let before = gateway.version();
    write(&dir, &doc(r#""tenant", "missing""#));
    let mut decided = gateway.reloads();
    tokio::time::timeout(DEADLINE, decided.wait_for(|n| *n >= 2))
        .await
        .map(drop)
        .expect("the reload is decided within the deadline");
    assert_eq!(
        gateway.version(),
        before,
        "a document with an unknown plugin must not apply"
    );
    let view = gateway.admin_view();
    let last = view["reloads"]
        .as_array()
        .and_then(|r| r.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(last["result"], "rejected", "{view}");
    assert!(
        last["error"]
            .as_str()
            .unwrap_or("")
            .contains("routes.tenants.plugins"),
        "{last}"
    );
}

/// Two gateways share one route's budget through a real Redis.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_rate_limit_is_shared_by_every_gateway() {
    let redis = trellis_testkit::Redis::start()
        .expect("redis-server starts (apt-get install redis-server)");
    let a = echo_upstream("a").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.a]
targets = [{{ url = "http://{a}" }}]
[routes.shared]
prefix = "/"
upstream = "a"
rate_limit = {{ rate = 1, period = "1h", burst = 4, redis = "redis://{}" }}
"#,
            redis.addr()
        ),
    );
    let (one, two) = (gateway(&file).await, gateway(&file).await);
    let mut admitted = 0;
    for i in 0..12 {
        let gw = if i % 2 == 0 { &one } else { &two };
        match get(gw.addr, "/x", &[]).await.status {
            200 => admitted += 1,
            429 => {}
            other => panic!("unexpected {other}"),
        }
    }
    // One budget of 4 for both, not 4 each.
    assert_eq!(admitted, 4, "the two gateways admitted {admitted}");
}

#[tokio::test]
async fn a_streamed_body_over_the_limit_is_refused_with_413() {
    // The upstream reads the whole body before it answers.
    let app = Router::new().fallback(any(|body: Bytes| async move { format!("{}", body.len()) }));
    let upstream = serve_axum(app).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[defaults]
max_body_bytes = 1000
[upstreams.a]
targets = [{{ url = "http://{upstream}" }}]
[routes.all]
prefix = "/"
upstream = "a"
retries = {{ attempts = 1 }}
"#
        ),
    );
    let gw = gateway(&file).await;
    let send = |size: usize| async move {
        let mut stream = TcpStream::connect(gw.addr).await.expect("connect");
        let chunk = vec![b'x'; size];
        let mut request =
            b"POST /upload HTTP/1.1\r\nhost: gateway.test\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n"
                .to_vec();
        request.extend_from_slice(format!("{size:x}\r\n").as_bytes());
        request.extend_from_slice(&chunk);
        request.extend_from_slice(b"\r\n0\r\n\r\n");
        // The gateway may answer and close before taking all of it.
        let _ = stream.write_all(&request).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    };
    // Under the limit, without a declared length: streamed through.
    let small = send(800).await;
    assert!(small.starts_with("HTTP/1.1 200"), "{small}");
    assert!(
        small.ends_with("800") || small.contains("\r\n\r\n800"),
        "{small}"
    );
    // Over it: counted as it streams, refused.
    let big = send(5000).await;
    assert!(big.starts_with("HTTP/1.1 413"), "{big}");
    assert!(big.contains("BODY_TOO_LARGE"), "{big}");
}

/// A key set served over HTTP, counting its fetches.
async fn jwks_server(
    keys: trellis_auth::JwkSet,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = fetches.clone();
    let app = Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let keys = keys.clone();
            async move { axum::Json(keys) }
        }),
    );
    (serve_axum(app).await, fetches)
}

#[tokio::test]
async fn jwt_routes_refuse_without_a_valid_token_pass_claims_up_and_limit_per_subject() {
    use trellis_auth::SigningKey;
    let key = SigningKey::generate_ed25519("k1").expect("key");
    let (jwks, fetches) = jwks_server(trellis_auth::JwkSet {
        keys: vec![key.jwk().clone()],
    })
    .await;
    let a = echo_upstream("a").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let doc = |extra: &str| {
        format!(
            r#"
[jwt]
jwks_url = "http://{jwks}/.well-known/jwks.json"
issuer = "https://auth.shop"
audience = ["shop"]
claims_to_headers = {{ sub = "x-user-id", tenant = "x-tenant-id", roles = "x-roles" }}

[upstreams.a]
targets = [{{ url = "http://{a}" }}]

[routes.orders]
prefix = "/orders"
upstream = "a"
jwt = {{ require = ["orders:write"] }}
rate_limit = {{ rate = 1, period = "1h", burst = 2, by = "subject" }}

[routes.catalog]
prefix = "/catalog"
upstream = "a"
jwt = {{ optional = true }}
{extra}
"#
        )
    };
    let file = write(&dir, &doc(""));
    let gw = gateway(&file).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let token = |sub: &str, roles: &[&str]| {
        let bearer = key
            .sign(&json!({
                "iss": "https://auth.shop", "aud": "shop", "sub": sub,
                "exp": now + 600, "iat": now, "roles": roles, "tenant": "acme",
            }))
            .expect("sign");
        format!("Bearer {bearer}")
    };
    let alice = token("alice", &["customer", "orders:write"]);
    let bob = token("bob", &["customer", "orders:write"]);
    let browser = token("carol", &["customer"]);

    // No token: 401 with a challenge, in the error model.
    let answer = get(gw.addr, "/orders", &[]).await;
    assert_eq!(answer.status, 401);
    assert_eq!(
        answer.headers["www-authenticate"],
        "Bearer realm=\"gateway\""
    );
    assert_eq!(answer.json()["reason"], "UNAUTHENTICATED");
    // A token that does not verify says why.
    let answer = get(gw.addr, "/orders", &[("authorization", "Bearer a.b.c")]).await;
    assert_eq!(answer.status, 401);
    assert!(answer.headers["www-authenticate"].contains("invalid_token"));
    // A gRPC caller gets UNAUTHENTICATED as a status.
    let answer = get(gw.addr, "/orders", &[("content-type", "application/grpc")]).await;
    assert_eq!(
        answer.headers.get("grpc-status").map(String::as_str),
        Some("16")
    );

    // Verified but without the permission: 403 naming it.
    let answer = get(gw.addr, "/orders", &[("authorization", &browser)]).await;
    assert_eq!(answer.status, 403);
    assert_eq!(answer.json()["metadata"]["permission"], "orders:write");

    // Verified with it: the upstream sees the claims as headers, never the
    // client's own copies.
    let answer = get(
        gw.addr,
        "/orders",
        &[
            ("authorization", &alice),
            ("x-user-id", "admin"),
            ("x-tenant-id", "other"),
        ],
    )
    .await;
    assert_eq!(answer.status, 200);
    let seen = &answer.json()["headers"];
    assert_eq!(seen["x-user-id"], "alice");
    assert_eq!(seen["x-tenant-id"], "acme");
    assert_eq!(seen["x-roles"], "customer,orders:write");

    // Rate limited per subject: alice's burst is spent, bob's is not.
    assert_eq!(
        get(gw.addr, "/orders", &[("authorization", &alice)])
            .await
            .status,
        200
    );
    let refused = get(gw.addr, "/orders", &[("authorization", &alice)]).await;
    assert_eq!(
        (refused.status, refused.json()["reason"].clone()),
        (429, json!("RATE_LIMITED"))
    );
    assert_eq!(
        get(gw.addr, "/orders", &[("authorization", &bob)])
            .await
            .status,
        200
    );

    // An optional route: anonymous callers pass, without forged identity
    // headers; a bad token is still refused.
    let answer = get(gw.addr, "/catalog", &[("x-user-id", "admin")]).await;
    assert_eq!(answer.status, 200);
    assert!(
        answer.json()["headers"].get("x-user-id").is_none(),
        "{}",
        answer.json()
    );
    assert_eq!(
        get(gw.addr, "/catalog", &[("authorization", "Bearer nope")])
            .await
            .status,
        401
    );
    let answer = get(gw.addr, "/catalog", &[("authorization", &browser)]).await;
    assert_eq!(answer.json()["headers"]["x-user-id"], "carol");

    // A reload that leaves [jwt] alone keeps its keys: no new fetch.
    let before = fetches.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(before, 1, "one fetch at start, for every token since");
    let mut applied = gw.gateway.applied();
    write(
        &dir,
        &doc("[routes.more]\nprefix = \"/more\"\nupstream = \"a\"\n"),
    );
    tokio::time::timeout(DEADLINE, applied.changed())
        .await
        .expect("the reload is applied within the deadline")
        .expect("gateway alive");
    let answer = get(gw.addr, "/orders", &[("authorization", &bob)]).await;
    assert_eq!(answer.status, 200);
    let stranger = SigningKey::generate_ed25519("k2").expect("key");
    let forged = stranger
        .sign(&json!({"iss": "https://auth.shop", "aud": "shop", "sub": "x", "exp": now + 60}))
        .expect("sign");
    // An unknown kid may fetch (once per cooldown); a known one never does.
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), before);
    assert_eq!(
        get(
            gw.addr,
            "/catalog",
            &[("authorization", &format!("Bearer {forged}"))]
        )
        .await
        .status,
        401
    );
    assert_eq!(
        fetches.load(std::sync::atomic::Ordering::SeqCst),
        before + 1
    );

    // A route asking for jwt in a document without [jwt] is refused, named.
    let bad = GatewayConfig {
        jwt: None,
        ..toml::from_str::<GatewayConfig>(&doc("")).expect("parses")
    };
    let err = trellis_config::Validate::validate(&bad).expect_err("refused");
    // Routes compile in name order: catalog first.
    assert_eq!(err.key, "routes.catalog.jwt", "{err:?}");
    assert!(err.message.contains("[jwt]"), "{err:?}");
}

/// What grpcio (Python's gRPC, an independent client: its own HTTP/2 and
/// gRPC framing) sees through the gateway: unary calls with their status,
/// a server stream's first message, metadata carrying a bearer token.
const PYTHON_GRPC_CLIENT: &str = r#"
import json, sys
import grpc
addr, token = sys.argv[1], sys.argv[2]
channel = grpc.insecure_channel(addr)
check = channel.unary_unary('/grpc.health.v1.Health/Check')
watch = channel.unary_stream('/grpc.health.v1.Health/Watch')
def request(service):
    name = service.encode()
    return bytes([0x0a, len(name)]) + name
def call(fn, *args, **kwargs):
    try:
        return fn(*args, timeout=10, **kwargs).hex()
    except grpc.RpcError as e:
        return e.code().name
auth = [('authorization', token)]
out = {
    'serving': call(check, request('shop.Up'), metadata=auth),
    'unknown': call(check, request('shop.Unknown'), metadata=auth),
    'anonymous': call(check, request('shop.Up')),
}
stream = watch(request('shop.Up'), metadata=auth, timeout=10)
out['watch'] = next(stream).hex()
stream.cancel()
print(json.dumps(out))
"#;

#[tokio::test]
async fn a_python_grpc_client_calls_through_the_gateway_with_a_token() {
    use trellis_auth::SigningKey;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("shop.Up", tonic_health::ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream_listener(listener))
            .await;
    });
    let key = SigningKey::generate_ed25519("k1").expect("key");
    let (jwks, _) = jwks_server(trellis_auth::JwkSet {
        keys: vec![key.jwk().clone()],
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[jwt]
jwks_url = "http://{jwks}/.well-known/jwks.json"
issuer = "https://auth.shop"
audience = ["shop"]

[upstreams.grpc]
targets = [{{ url = "http://{upstream}" }}]
h2c = true

[routes.health]
prefix = "/grpc.health.v1.Health"
upstream = "grpc"
jwt = {{}}
"#
        ),
    );
    let gw = gateway(&file).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let token = key
        .sign(&json!({"iss": "https://auth.shop", "aud": "shop", "sub": "py", "exp": now + 600}))
        .expect("sign");
    let out = tokio::process::Command::new("python3")
        .args([
            "-c",
            PYTHON_GRPC_CLIENT,
            &gw.addr.to_string(),
            &format!("Bearer {token}"),
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("the Python client ends within a minute")
        .expect("python3 runs (apt-get install python3)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'grpc'"),
        "grpcio is missing: python3 -m pip install grpcio (scripts/test installs it)"
    );
    assert!(out.status.success(), "the Python client failed: {stderr}");
    let seen: Value = serde_json::from_slice(&out.stdout).expect("the client prints JSON");
    assert_eq!(
        seen,
        json!({
            // HealthCheckResponse { status: SERVING }
            "serving": "0801",
            "unknown": "NOT_FOUND",
            "anonymous": "UNAUTHENTICATED",
            "watch": "0801",
        }),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_gets_408_and_one_client_cannot_take_every_connection() {
    // An upstream that reads the whole body before answering.
    let reader = serve_axum(Router::new().fallback(any(|body: Bytes| async move {
        format!("{} bytes", body.len())
    })))
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[defaults]
body_timeout = "300ms"

[listener]
max_connections_per_client = 3

[upstreams.reader]
targets = [{{ url = "http://{reader}" }}]
[routes.all]
prefix = "/"
upstream = "reader"
"#
        ),
    );
    let gw = gateway(&file).await;

    // Slow body: 3 of 10 declared bytes, then nothing.
    let mut slow = TcpStream::connect(gw.addr).await.expect("connect");
    slow.write_all(b"POST /upload HTTP/1.1\r\nhost: gw\r\ncontent-length: 10\r\n\r\nabc")
        .await
        .expect("a partial body");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(DEADLINE, slow.read(&mut buf))
        .await
        .expect("the slow body is answered within the deadline")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("BODY_TIMEOUT"), "{text}");
    drop(slow);
    // The same request with its whole body passes.
    let whole = Conn::open(gw.addr)
        .await
        .request_with_body("POST", "/upload", &[], Some(b"abcdefghij"))
        .await;
    assert_eq!(
        (whole.status, whole.body.as_slice()),
        (200, &b"10 bytes"[..])
    );

    // Three idle connections from 127.0.0.1 are its share...
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(gw.addr).await.expect("connect"));
    }
    // ...so a fourth is closed at once, before a byte is read.
    let mut fourth = TcpStream::connect(gw.addr).await.expect("connect");
    let _ = fourth
        .write_all(b"GET / HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(DEADLINE, fourth.read_to_end(&mut rest))
        .await
        .expect("the connection over the share is closed within the deadline");
    assert!(
        read.is_err() || rest.is_empty(),
        "answered over the share: {}",
        String::from_utf8_lossy(&rest)
    );
    // Another client address is served meanwhile.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.2:0".parse().expect("address"))
        .expect("bind 127.0.0.2 (any 127/8 address is loopback)");
    let other = socket
        .connect(gw.addr)
        .await
        .expect("connect from 127.0.0.2");
    let mut other = Conn {
        reader: BufReader::new(other),
    };
    assert_eq!(other.request("GET", "/x", &[]).await.status, 200);
    // One of the held connections closes: its place is free again.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut again = Conn::open(gw.addr).await;
        let mut line = String::new();
        again
            .reader
            .get_mut()
            .write_all(b"GET /y HTTP/1.1\r\nhost: gw\r\n\r\n")
            .await
            .ok();
        let n = again.reader.read_line(&mut line).await.unwrap_or(0);
        if n > 0 {
            assert!(line.starts_with("HTTP/1.1 200"), "{line}");
            break;
        }
        // Closed: the gateway has not yet seen the held connection go.
        assert!(
            tokio::time::Instant::now() < deadline,
            "the freed place was never given back"
        );
        tokio::task::yield_now().await;
    }
}

/// An HTTP/1.1 upstream written by hand, answering by path with every way a
/// response body can be framed; counts the connections it accepts.
async fn framing_upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                loop {
                    let mut first = String::new();
                    if reader.read_line(&mut first).await.unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut words = first.split(' ');
                    let method = words.next().unwrap_or("").to_owned();
                    let path = words.next().unwrap_or("").to_owned();
                    let (answer, then_close): (Vec<u8>, bool) = match path.as_str() {
                        "/cl" => (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello".to_vec(), false),
                        "/chunked" => (
                            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-sum: 1\r\n\r\n".to_vec(),
                            false,
                        ),
                        "/eof" => (b"HTTP/1.1 200 OK\r\n\r\nuntil the end".to_vec(), true),
                        "/close" => (
                            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nbye".to_vec(),
                            true,
                        ),
                        // Keep-alive on the wire, then closed anyway (an
                        // upstream's idle timeout racing the next request).
                        "/drop" => (b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndrop".to_vec(), true),
                        "/head" if method == "HEAD" => {
                            (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".to_vec(), false)
                        }
                        "/empty" => (b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(), false),
                        "/continue" => (
                            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                            false,
                        ),
                        "/garbage" => (b"HTTP/1.1 2x0 OK\r\n\r\n".to_vec(), true),
                        "/short" => (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf".to_vec(), true),
                        _ => (b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec(), false),
                    };
                    if reader.get_mut().write_all(&answer).await.is_err() || then_close {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn upstream_answers_of_every_framing_are_relayed_and_connections_reused_only_when_clean() {
    let (up, accepted) = framing_upstream().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.up]
targets = [{{ url = "http://{up}" }}]
[routes.all]
prefix = "/"
upstream = "up"
retries = {{ attempts = 1 }}
"#
        ),
    );
    let gw = gateway(&file).await;
    let count = || accepted.load(std::sync::atomic::Ordering::SeqCst);
    let mut conn = Conn::open(gw.addr).await;
    // Content-Length, chunked (extensions and trailers dropped), HEAD, 204,
    // an interim 100: one upstream connection carries them all.
    let a = conn.request("GET", "/cl", &[]).await;
    assert_eq!((a.status, a.body.as_slice()), (200, &b"hello"[..]));
    let a = conn.request("GET", "/chunked", &[]).await;
    assert_eq!((a.status, a.body.as_slice()), (200, &b"hello, world"[..]));
    let a = conn.request("HEAD", "/head", &[]).await;
    assert_eq!(a.status, 200);
    let a = conn.request("GET", "/empty", &[]).await;
    assert_eq!((a.status, a.body.len()), (204, 0));
    let a = conn.request("GET", "/continue", &[]).await;
    assert_eq!((a.status, a.body.as_slice()), (200, &b"ok"[..]));
    assert_eq!(count(), 1, "one upstream connection for five clean answers");

    // Read until the upstream closes; `connection: close`: relayed whole,
    // and the connection is not reused.
    let a = conn.request("GET", "/eof", &[]).await;
    assert_eq!((a.status, a.body.as_slice()), (200, &b"until the end"[..]));
    let a = conn.request("GET", "/close", &[]).await;
    assert_eq!((a.status, a.body.as_slice()), (200, &b"bye"[..]));
    let a = conn.request("GET", "/cl", &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(count(), 3, "a new connection after each closing answer");

    // A kept-alive connection the upstream then closed: the next request
    // still succeeds (found closed at checkout, or sent again), never 502.
    for _ in 0..5 {
        assert_eq!(conn.request("GET", "/drop", &[]).await.status, 200);
        let a = conn.request("GET", "/cl", &[]).await;
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    }

    // A malformed head is a 502; so is a body cut short (the client sees
    // its connection end before the declared length).
    let bad = conn.request("GET", "/garbage", &[]).await;
    assert_eq!(bad.status, 502, "{}", String::from_utf8_lossy(&bad.body));
    let mut raw = TcpStream::connect(gw.addr).await.expect("connect");
    raw.write_all(b"GET /short HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, raw.read_to_end(&mut got))
        .await
        .expect("the cut body ends the client's connection within the deadline");
    // Cut off before its declared length: never completed (hyper may drop
    // the head it had buffered when the body fails in the same turn).
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.is_empty() || (text.starts_with("HTTP/1.1 200") && text.ends_with("half")),
        "{text}"
    );
}

#[tokio::test]
async fn the_client_behind_a_trusted_proxy_is_the_forwarded_address_and_only_then() {
    let a = echo_upstream("a").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[listener]
trusted_proxies = ["127.0.0.1", "192.168.0.0/16"]

[upstreams.a]
targets = [{{ url = "http://{a}" }}]

[routes.internal]
prefix = "/internal"
upstream = "a"
allow_ips = ["10.1.2.3"]

[routes.limited]
prefix = "/limited"
upstream = "a"
rate_limit = {{ rate = 1, period = "1h", burst = 1, by = "client_ip" }}
"#
        ),
    );
    let gw = gateway(&file).await;
    let xff = |v: &'static str| [("x-forwarded-for", v)];
    // From the trusted proxy (127.0.0.1): the nearest untrusted hop.
    assert_eq!(
        get(gw.addr, "/internal", &xff("10.1.2.3")).await.status,
        200
    );
    assert_eq!(
        get(gw.addr, "/internal", &xff("10.1.2.3, 192.168.4.4"))
            .await
            .status,
        200
    );
    assert_eq!(
        get(gw.addr, "/internal", &xff("10.1.2.3, 10.9.9.9"))
            .await
            .status,
        403
    );
    assert_eq!(
        get(gw.addr, "/internal", &xff("not-an-address"))
            .await
            .status,
        403
    );
    assert_eq!(get(gw.addr, "/internal", &[]).await.status, 403);
    // Per-client budgets follow the forwarded client.
    assert_eq!(get(gw.addr, "/limited", &xff("10.0.0.1")).await.status, 200);
    assert_eq!(get(gw.addr, "/limited", &xff("10.0.0.1")).await.status, 429);
    assert_eq!(get(gw.addr, "/limited", &xff("10.0.0.2")).await.status, 200);
    // From an address that is not a trusted proxy the header is not believed.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.2:0".parse().expect("address"))
        .expect("bind 127.0.0.2");
    let mut untrusted = Conn {
        reader: BufReader::new(socket.connect(gw.addr).await.expect("connect")),
    };
    assert_eq!(
        untrusted
            .request("GET", "/internal", &xff("10.1.2.3"))
            .await
            .status,
        403
    );
}

#[tokio::test]
async fn header_floods_are_refused_with_431_and_the_connection_is_not_kept() {
    let a = echo_upstream("a").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            "[upstreams.a]\ntargets = [{{ url = \"http://{a}\" }}]\n[routes.all]\nprefix = \"/\"\nupstream = \"a\"\n"
        ),
    );
    let gw = gateway(&file).await;
    // Many headers (hyper's limit is 100), and one header over the head
    // limit (64 KiB): 431 before any upstream is called.
    let many: Vec<(String, String)> = (0..150).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let flood = |headers: Vec<(&str, &str)>| {
        let mut head = String::from("GET /x HTTP/1.1\r\nhost: gw\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        head
    };
    let big = "v".repeat(70 * 1024);
    for head in [flood(many), flood(vec![("x-big", big.as_str())])] {
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        // The server may answer and close before the whole head is written.
        let _ = s.write_all(head.as_bytes()).await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut got))
            .await
            .expect("the flooding connection is answered and closed within the deadline");
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with("HTTP/1.1 431"),
            "{}",
            trellis_core::excerpt(&text)
        );
    }
    // Within the limits, the same shape passes.
    let fine: Vec<(String, String)> = (0..50).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let fine: Vec<(&str, &str)> = fine.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(get(gw.addr, "/x", &fine).await.status, 200);
}

/// Two files, one importing the other: `svc.Echo/Get(dep.Dep) → dep.Dep`.
fn importing_descriptors() -> Vec<u8> {
    use prost::Message as _;
    use prost_types::{
        DescriptorProto, FieldDescriptorProto, FileDescriptorProto, FileDescriptorSet,
        MethodDescriptorProto, ServiceDescriptorProto, field_descriptor_proto::Type,
    };
    let dep = FileDescriptorProto {
        name: Some("dep.proto".into()),
        package: Some("dep".into()),
        syntax: Some("proto3".into()),
        message_type: vec![DescriptorProto {
            name: Some("Dep".into()),
            field: vec![FieldDescriptorProto {
                name: Some("value".into()),
                json_name: Some("value".into()),
                number: Some(1),
                r#type: Some(Type::String as i32),
                label: Some(1),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let svc = FileDescriptorProto {
        name: Some("svc.proto".into()),
        package: Some("svc".into()),
        syntax: Some("proto3".into()),
        dependency: vec!["dep.proto".into()],
        service: vec![ServiceDescriptorProto {
            name: Some("Echo".into()),
            method: vec![MethodDescriptorProto {
                name: Some("Get".into()),
                input_type: Some(".dep.Dep".into()),
                output_type: Some(".dep.Dep".into()),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    FileDescriptorSet {
        file: vec![dep, svc],
    }
    .encode_to_vec()
}

#[tokio::test]
async fn a_transcoding_route_can_read_its_descriptors_from_server_reflection() {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("shop.Up", tonic_health::ServingStatus::Serving)
        .await;
    let imports = importing_descriptors();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(Box::leak(imports.into_boxed_slice()))
        .build_v1()
        .expect("reflection service");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection)
            .serve_with_incoming(tokio_stream_listener(listener))
            .await;
    });
    // A second upstream without reflection.
    let (_, bare_health) = tonic_health::server::health_reporter();
    let bare_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let bare = bare_listener.local_addr().expect("address");
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(bare_health)
            .serve_with_incoming(tokio_stream_listener(bare_listener))
            .await;
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let doc = |extra: &str| {
        format!(
            r#"
[upstreams.grpc]
targets = [{{ url = "http://{upstream}" }}]
h2c = true
[upstreams.bare]
targets = [{{ url = "http://{bare}" }}]
h2c = true
[routes.health]
prefix = "/grpc.health.v1.Health"
upstream = "grpc"
transcode = {{ reflection = true, services = ["grpc.health.v1.Health"] }}
[routes.echo]
prefix = "/svc.Echo"
upstream = "grpc"
transcode = {{ reflection = true, services = ["svc.Echo"] }}
{extra}
"#
        )
    };
    let file = write(&dir, &doc(""));
    let gw = gateway(&file).await;
    let ok = Conn::open(gw.addr)
        .await
        .request_with_body(
            "POST",
            "/grpc.health.v1.Health/Check",
            &[("content-type", "application/json")],
            Some(br#"{"service":"shop.Up"}"#),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    assert_eq!(ok.json()["status"], "SERVING");
    // A service whose file imports another: transcoded (the upstream does
    // not implement it, and says so as a gRPC status → 501).
    let echo = Conn::open(gw.addr)
        .await
        .request_with_body(
            "POST",
            "/svc.Echo/Get",
            &[("content-type", "application/json")],
            Some(br#"{"value":"x"}"#),
        )
        .await;
    assert_eq!(echo.status, 501, "{}", String::from_utf8_lossy(&echo.body));
    assert_eq!(echo.json()["code"], "UNIMPLEMENTED");
    // A bad JSON field is refused by the transcoder before any call.
    let bad = Conn::open(gw.addr)
        .await
        .request_with_body(
            "POST",
            "/svc.Echo/Get",
            &[("content-type", "application/json")],
            Some(br#"{"nope":1}"#),
        )
        .await;
    assert_eq!(bad.status, 400, "{}", String::from_utf8_lossy(&bad.body));

    // An upstream without reflection: the document is refused, the route
    // named, the running one kept.
    let mut decided = gw.gateway.reloads();
    let before = *decided.borrow_and_update();
    write(
        &dir,
        &doc(
            "[routes.bare]\nprefix = \"/b\"\nupstream = \"bare\"\ntranscode = { reflection = true, services = [\"grpc.health.v1.Health\"] }\n",
        ),
    );
    tokio::time::timeout(DEADLINE, decided.wait_for(|n| *n > before))
        .await
        .expect("the reload is decided within the deadline")
        .expect("gateway alive");
    let view = gw.gateway.admin_view();
    let last = view["reloads"]
        .as_array()
        .and_then(|r| r.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(last["result"], "rejected", "{view}");
    assert!(
        last["error"]
            .as_str()
            .unwrap_or("")
            .contains("routes.bare.transcode.reflection"),
        "{last}"
    );
    assert_eq!(gw.gateway.routes(), 2);
}

async fn next_answer(seen: &mut tokio::sync::mpsc::UnboundedReceiver<(u16, bool)>) -> (u16, bool) {
    tokio::time::timeout(DEADLINE, seen.recv())
        .await
        .expect("the clients keep getting answers")
        .expect("clients running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_killed_under_load_costs_no_idempotent_request() {
    let live = echo_upstream("live").await;
    // The other endpoint: a separate process (Python's HTTP server), so it
    // can die the way processes do.
    let root = tempfile::tempdir().expect("temp dir");
    std::fs::write(root.path().join("x"), "from python").expect("write");
    let port = trellis_testkit::free_port().expect("a free port");
    let mut python = tokio::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .current_dir(root.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs (apt-get install python3)");
    let doomed: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    trellis_testkit::http::poll_until(doomed, "/x", DEADLINE, |r| r.status == 200)
        .await
        .expect("the Python upstream answers");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.pair]
targets = [{{ url = "http://{live}" }}, {{ url = "http://{doomed}" }}]
balance = "round_robin"
[routes.all]
prefix = "/"
upstream = "pair"
retries = {{ attempts = 2, budget = 1.0 }}
"#
        ),
    );
    let gw = gateway(&file).await;
    // Four clients in a loop; each answer says which endpoint gave it.
    let stop = CancellationToken::new();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<(u16, bool)>();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        let seen_tx = seen_tx.clone();
        let addr = gw.addr;
        clients.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            while !stop.is_cancelled() {
                let seen = match conn.try_request("GET", "/x", &[], None).await {
                    Ok(answer) => (answer.status, answer.body == b"from python"),
                    Err(_) => {
                        // A response cut mid-body (its head was relayed
                        // before the upstream died): no proxy can send it
                        // again. The client reconnects.
                        conn = Conn::open(addr).await;
                        (0, true)
                    }
                };
                if seen_tx.send(seen).is_err() {
                    return;
                }
            }
        }));
    }
    drop(seen_tx);
    // Both endpoints serve before the kill.
    let mut from_python = 0;
    while from_python < 20 {
        let (status, python) = next_answer(&mut seen).await;
        assert_eq!(status, 200);
        from_python += usize::from(python);
    }
    python.start_kill().expect("SIGKILL the upstream");
    python.wait().await.expect("the upstream is gone");
    // After the kill: every request still succeeds (the ones that met the
    // dead endpoint went again, to the live one), and only the live one
    // answers once the in-flight ones are through.
    let mut after = 0;
    let mut cut = 0;
    let mut live_in_a_row = 0;
    while live_in_a_row < 200 {
        let (status, python) = next_answer(&mut seen).await;
        after += 1;
        if status == 0 {
            cut += 1;
        } else {
            assert_eq!(status, 200, "request {after} after the kill failed");
        }
        live_in_a_row = if python { 0 } else { live_in_a_row + 1 };
    }
    // At most the responses in flight at the kill (one per client) can
    // have been cut after their heads were relayed.
    assert!(cut <= 4, "{cut} responses cut");
    stop.cancel();
    for client in clients {
        client.await.expect("client task");
    }
}

#[tokio::test]
async fn a_total_timeout_cuts_a_long_response_and_other_routes_keep_theirs() {
    // Each request streams `data: first`, then holds until its release.
    let (cut_release, cut_rx) = tokio::sync::oneshot::channel::<()>();
    let (held_release, held_rx) = tokio::sync::oneshot::channel::<()>();
    let releases = Arc::new(Mutex::new(vec![held_rx, cut_rx]));
    let app = Router::new().fallback(any(move || {
        let releases = releases.clone();
        async move {
            let rx = releases.lock().ok().and_then(|mut r| r.pop());
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(async_stream(rx)))
                .unwrap_or_default()
        }
    }));
    let upstream = serve_axum(app).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            r#"
[upstreams.s]
targets = [{{ url = "http://{upstream}" }}]
[routes.cut]
prefix = "/cut"
upstream = "s"
total_timeout = "300ms"
[routes.held]
prefix = "/held"
upstream = "s"
"#
        ),
    );
    let gw = gateway(&file).await;
    let open = |path: &'static str| async move {
        let mut stream = TcpStream::connect(gw.addr).await.expect("connect");
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: gw\r\n\r\n").as_bytes())
            .await
            .expect("send");
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&seen).contains("data: first") {
            let n = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
                .await
                .expect("the first event within the deadline")
                .expect("read");
            assert!(n > 0, "closed before the first event");
            seen.extend_from_slice(&buf[..n]);
        }
        stream
    };
    let mut cut = open("/cut").await;
    let mut held = open("/held").await;
    // The route with a total timeout: cut while its upstream still holds.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(DEADLINE, cut.read_to_end(&mut rest))
        .await
        .expect("the response is cut within the deadline");
    assert!(
        !String::from_utf8_lossy(&rest).contains("data: second"),
        "{ended:?}"
    );
    drop(cut_release);
    // The other route's response, open all that time, goes on.
    let _ = held_release.send(());
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("data: second") {
        let n = tokio::time::timeout(DEADLINE, held.read(&mut buf))
            .await
            .expect("the second event within the deadline")
            .expect("read");
        assert!(n > 0, "the held response was closed");
        seen.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn the_access_log_names_route_upstream_status_bytes_and_trace() {
    let log = tempfile::NamedTempFile::new().expect("log file");
    let writer = Arc::new(log.reopen().expect("log file"));
    let _telemetry = trellis_telemetry::Telemetry::builder("gateway")
        .log_format(trellis_telemetry::LogFormat::Json)
        .log_level("warn,trellis::gateway::access=debug")
        .writer(writer)
        .init()
        .expect("telemetry");
    let a = echo_upstream("a").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = write(
        &dir,
        &format!(
            "[upstreams.a]\ntargets = [{{ url = \"http://{a}\" }}]\n[routes.all]\nprefix = \"/\"\nupstream = \"a\"\n"
        ),
    );
    let gw = gateway(&file).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let answer = get(
        gw.addr,
        "/logged",
        &[("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01"))],
    )
    .await;
    assert_eq!(answer.status, 200);
    // The line is written when the gateway lets go of the body, which may
    // be just after the client has the last byte: read until it is there.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let line: Value = loop {
        let text = std::fs::read_to_string(log.path()).expect("read the log");
        if let Some(line) = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| l["target"] == "trellis::gateway::access")
        {
            break line;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no access line in {text:?}"
        );
        tokio::task::yield_now().await;
    };
    assert_eq!(line["route"], "all", "{line}");
    assert_eq!(line["upstream"], "a", "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["attempts"], 1, "{line}");
    assert_eq!(line["bytes"], answer.body.len(), "{line}");
    assert_eq!(line["end"], "complete", "{line}");
    assert_eq!(line["trace_id"], trace, "{line}");
    assert!(
        line["total_us"].as_u64() >= line["head_us"].as_u64(),
        "{line}"
    );
}

#[tokio::test]
async fn refused_tokens_and_mutating_calls_go_to_the_audit_trail() {
    use trellis_auth::SigningKey;
    let key = SigningKey::generate_ed25519("k1").expect("key");
    let (jwks, _) = jwks_server(trellis_auth::JwkSet {
        keys: vec![key.jwk().clone()],
    })
    .await;
    let a = echo_upstream("a").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let trail = dir.path().join("audit.jsonl");
    let file = write(
        &dir,
        &format!(
            r#"
[jwt]
jwks_url = "http://{jwks}/.well-known/jwks.json"
issuer = "https://auth.shop"
audience = ["shop"]

[audit]
file = "{}"
max_refusals_per_second = 2

[upstreams.a]
targets = [{{ url = "http://{a}" }}]

[routes.orders]
prefix = "/orders"
upstream = "a"
jwt = {{ require = ["orders:write"] }}

[routes.limited]
prefix = "/limited"
upstream = "a"
jwt = {{}}
rate_limit = {{ rate = 1, period = "1h", burst = 1 }}
"#,
            trail.display()
        ),
    );
    let gw = gateway(&file).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let token = |roles: &[&str]| {
        let signed = key
            .sign(&json!({
                "iss": "https://auth.shop", "aud": "shop", "sub": "ada",
                "exp": now + 600, "roles": roles, "tenant": "acme",
            }))
            .expect("sign");
        format!("Bearer {signed}")
    };
    let writer = token(&["orders:write"]);
    let reader = token(&[]);
    let mut conn = Conn::open(gw.addr).await;
    // Audited: a created order, a deletion; not audited: a read.
    let created = conn
        .request_with_body(
            "POST",
            "/orders",
            &[("authorization", &writer)],
            Some(b"{}"),
        )
        .await;
    assert_eq!(created.status, 200);
    assert_eq!(
        conn.request("GET", "/orders/7", &[("authorization", &writer)])
            .await
            .status,
        200
    );
    assert_eq!(
        conn.request("DELETE", "/orders/7", &[("authorization", &writer)])
            .await
            .status,
        200
    );
    // A call the gateway refuses itself (over the rate limit) never reached
    // the upstream: not recorded as a call.
    assert_eq!(
        Conn::open(gw.addr)
            .await
            .request_with_body(
                "POST",
                "/limited",
                &[("authorization", &writer)],
                Some(b"{}")
            )
            .await
            .status,
        200
    );
    assert_eq!(
        Conn::open(gw.addr)
            .await
            .request_with_body(
                "POST",
                "/limited",
                &[("authorization", &writer)],
                Some(b"{}")
            )
            .await
            .status,
        429
    );
    // A token without the permission, then a flood of missing tokens: at
    // most two refusals a second are recorded.
    assert_eq!(
        conn.request("DELETE", "/orders/8", &[("authorization", &reader)])
            .await
            .status,
        403
    );
    for _ in 0..10 {
        assert_eq!(conn.request("POST", "/orders", &[]).await.status, 401);
    }
    let records = trellis_auth::audit::read_all(&trail).expect("the trail reads");
    let calls: Vec<_> = records.iter().filter(|r| r.entry.kind == "call").collect();
    assert_eq!(calls.len(), 3, "{records:#?}");
    assert!(
        calls.iter().all(|c| c.entry.outcome == "200"),
        "{records:#?}"
    );
    assert_eq!(calls[2].entry.action, "POST limited");
    assert_eq!(calls[0].entry.action, "POST orders");
    assert_eq!(calls[0].entry.outcome, "200");
    assert_eq!(calls[0].entry.subject.as_deref(), Some("ada"));
    assert_eq!(calls[0].entry.tenant.as_deref(), Some("acme"));
    assert_eq!(calls[0].entry.client_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(calls[1].entry.action, "DELETE orders");
    assert_eq!(calls[1].entry.resource.as_deref(), Some("/orders/7"));
    let forbidden: Vec<_> = records
        .iter()
        .filter(|r| r.entry.kind == "forbidden")
        .collect();
    assert_eq!(forbidden.len(), 1, "{records:#?}");
    assert_eq!(forbidden[0].entry.outcome, "refused: orders:write");
    let refused = records
        .iter()
        .filter(|r| r.entry.kind == "token_refused")
        .count();
    // The ten missing tokens: a burst within a second or two.
    assert!(
        (1..=4).contains(&refused),
        "{refused} refusals recorded of 10"
    );
    assert!(
        records
            .iter()
            .filter(|r| r.entry.kind == "token_refused")
            .all(|r| r.entry.outcome == "refused: missing")
    );
    // The chain is intact.
    let report = trellis_auth::audit::verify(&trail).expect("verify");
    assert_eq!(
        (report.records as usize, report.broken),
        (records.len(), None)
    );
}

/// The attack suite: tokens forged by PyJWT and `cryptography` (outside
/// the code under test, `tests/forge_tokens.py`) — `alg: none`, HS256 keyed
/// with each public key, unknown and hostile `kid`s, `jku`/`x5u`/`jwk`
/// headers, expired, early, wrong `iss`/`aud`, missing claims, tampered,
/// stripped, `crit`, oversize, garbage. Every one is refused with 401 and
/// audited with its reason; the valid token of each key type is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tokens_from_an_independent_library_are_refused_and_audited() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/forge_tokens.py");
    let out = std::process::Command::new("python3")
        .args([script, "https://auth.shop", "shop"])
        .output()
        .expect("python3 runs (scripts/test installs it)");
    assert!(
        out.status.success(),
        "forge_tokens.py failed (pip install pyjwt cryptography): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let dir = tempfile::tempdir().expect("temp dir");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, made["jwks"].to_string()).expect("write jwks");
    let trail = dir.path().join("audit.jsonl");
    let a = echo_upstream("a").await;
    let file = write(
        &dir,
        &format!(
            r#"
[jwt]
jwks_file = "{}"
issuer = "https://auth.shop"
audience = ["shop"]

[audit]
file = "{}"

[upstreams.a]
targets = [{{ url = "http://{a}" }}]

[routes.orders]
prefix = "/orders"
upstream = "a"
jwt = {{}}
"#,
            jwks.display(),
            trail.display()
        ),
    );
    let gw = gateway(&file).await;
    let mut conn = Conn::open(gw.addr).await;
    // Valid tokens of every key type are served: the refusals below are
    // the tokens' doing, not the setup's.
    for (name, token) in made["valid"].as_object().expect("valid") {
        let bearer = format!("Bearer {}", token.as_str().expect("token"));
        let r = conn
            .request("GET", "/orders", &[("authorization", &bearer)])
            .await;
        assert_eq!(r.status, 200, "valid {name} refused: {:?}", r.body);
    }
    let forged = made["forged"].as_object().expect("forged");
    for (name, token) in forged {
        let bearer = format!("Bearer {}", token.as_str().expect("token"));
        let mut conn = Conn::open(gw.addr).await;
        let r = conn
            .request("GET", "/orders", &[("authorization", &bearer)])
            .await;
        assert_eq!(
            r.status, 401,
            "forged {name} got {}: {:?}",
            r.status, r.body
        );
        assert!(
            r.headers
                .get("www-authenticate")
                .is_some_and(|c| c.contains("invalid_token")),
            "forged {name}: {:?}",
            r.headers
        );
    }
    let records = trellis_auth::audit::read_all(&trail).expect("the trail reads");
    let refused: Vec<&str> = records
        .iter()
        .filter(|r| r.entry.kind == "token_refused")
        .map(|r| r.entry.outcome.as_str())
        .collect();
    assert_eq!(refused.len(), forged.len(), "{refused:?}");
    assert!(
        refused
            .iter()
            .all(|o| o.starts_with("refused: ") && *o != "refused: missing"),
        "{refused:?}"
    );
    // The reasons are the attacks': a sample, in the order sent.
    let reason = |name: &str| {
        let i = forged.keys().position(|k| k == name).expect("sent");
        refused[i]
    };
    for (name, expected) in [
        // `none` is not an algorithm the parser knows at all.
        ("alg_none", "refused: malformed"),
        ("missing_audience", "refused: claim"),
        ("alg_swapped_to_es256", "refused: unknown_key"),
        ("hs256_with_rsa_public_pem", "refused: algorithm"),
        ("unknown_kid", "refused: unknown_key"),
        ("jku_elsewhere", "refused: unknown_key"),
        ("wrong_key_known_kid", "refused: signature"),
        ("embedded_jwk", "refused: signature"),
        ("tampered_payload", "refused: signature"),
        ("expired", "refused: expired"),
        ("not_yet_valid", "refused: not_yet_valid"),
        ("wrong_issuer", "refused: issuer"),
        ("wrong_audience", "refused: audience"),
        ("crit_header", "refused: critical"),
        ("wrong_typ", "refused: type"),
        ("oversize", "refused: malformed"),
        ("garbage", "refused: malformed"),
    ] {
        assert_eq!(
            reason(name),
            expected,
            "{name}: {:?}",
            forged.keys().zip(&refused).collect::<Vec<_>>()
        );
    }
    trellis_auth::audit::verify(&trail).expect("the chain holds");
}
