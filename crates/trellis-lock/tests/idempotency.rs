//! The idempotency layer on every store (memory, SQLite, PostgreSQL,
//! Redis), two instances sharing the store where it can be shared: one
//! effect for 50 concurrent duplicates, byte-for-byte replays, 422 for a
//! reused key, retryable answers not stored, 409 when asked, fingerprints,
//! expiry, and a store that is down refusing rather than running.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::watch;
use tower::{Layer, Service, ServiceExt};
use trellis_lock::idempotency::{
    Begin, IdempotencyLayer, IdempotencySettings, InFlight, Record, Store, StoreError, connect,
};

/// A store that counts `begin` calls, so a handler can wait until every
/// duplicate has met the in-progress key.
struct Counting {
    inner: Arc<dyn Store>,
    begins: watch::Sender<usize>,
}

impl Store for Counting {
    fn begin<'a>(
        &'a self,
        key: &'a str,
        fingerprint: &'a str,
        owner: &'a str,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Begin, StoreError>> {
        Box::pin(async move {
            let found = self.inner.begin(key, fingerprint, owner, lease).await;
            self.begins.send_modify(|n| *n += 1);
            found
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        record: &'a Record,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.complete(key, owner, record, ttl)
    }

    fn abandon<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.abandon(key, owner)
    }
}

/// The handler: counts effects; `x-hold: N` makes it wait until the store
/// has seen N begins; `x-answer: 503` answers that; `x-grpc` answers as
/// gRPC does, the status in trailers.
#[derive(Clone)]
struct Handler {
    effects: Arc<AtomicUsize>,
    begins: watch::Receiver<usize>,
}

impl Service<Request<Full<Bytes>>> for Handler {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let (head, body) = request.into_parts();
            let header = |name: &str| {
                head.headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            if let Some(n) = header("x-hold").and_then(|n| n.parse::<usize>().ok()) {
                let mut begins = this.begins.clone();
                tokio::time::timeout(Duration::from_secs(30), begins.wait_for(|b| *b >= n))
                    .await
                    .expect("every duplicate reached the store within 30 s")
                    .expect("the store is alive");
            }
            let effect = this.effects.fetch_add(1, Ordering::SeqCst) + 1;
            let body = body.collect().await.unwrap().to_bytes();
            let status = header("x-answer")
                .and_then(|s| s.parse::<u16>().ok())
                .unwrap_or(201);
            let mut response = Response::new(Full::new(Bytes::from(format!(
                "{{\"effect\":{effect},\"echo\":{}}}",
                String::from_utf8_lossy(&body)
            ))));
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            response
                .headers_mut()
                .insert("x-effect", HeaderValue::from(effect));
            if header("x-grpc").is_some() {
                response
                    .headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/grpc"));
            }
            Ok(response)
        })
    }
}

struct Instance {
    service: trellis_lock::idempotency::Idempotent<Handler>,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Instance {
    async fn send(&self, key: Option<&str>, body: &str, extra: &[(&str, &str)]) -> Answer {
        let mut request = Request::post("/v1/orders")
            .header("content-type", "application/json")
            .header("x-user-id", "alice");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let mut request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        for (k, v) in extra {
            request.headers_mut().insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let response = self.service.clone().oneshot(request).await.unwrap();
        let (head, body) = response.into_parts();
        Answer {
            status: head.status,
            headers: head.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }
}

struct Setup {
    instances: Vec<Instance>,
    effects: Arc<AtomicUsize>,
    begins: watch::Receiver<usize>,
}

/// `instances` layers over the store at `url` (each its own connection),
/// one handler's effects counted.
async fn setup(url: &str, instances: usize, settings: IdempotencySettings) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (begins, seen) = watch::channel(0);
    let effects = Arc::new(AtomicUsize::new(0));
    let shared_memory = connect("memory://", dir.path()).await.unwrap();
    let mut list = Vec::new();
    for _ in 0..instances {
        let store = if url == "memory://" {
            shared_memory.clone()
        } else {
            connect(url, dir.path()).await.unwrap()
        };
        let store = Arc::new(Counting {
            inner: store,
            begins: begins.clone(),
        });
        let layer = IdempotencyLayer::new("orders", store, &settings);
        list.push(Instance {
            service: layer.layer(Handler {
                effects: effects.clone(),
                begins: seen.clone(),
            }),
        });
    }
    std::mem::forget(dir);
    Setup {
        instances: list,
        effects,
        begins: seen,
    }
}

fn settings() -> IdempotencySettings {
    IdempotencySettings {
        routes: vec!["/v1/orders".into()],
        ..Default::default()
    }
}

fn reason(answer: &Answer) -> String {
    let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
    json["error"]["reason"]
        .as_str()
        .or(json["reason"].as_str())
        .unwrap_or_default()
        .to_owned()
}

async fn suite(url: &str, instances: usize) {
    let setup = setup(url, instances, settings()).await;
    let key = uuid::Uuid::new_v4().to_string();
    // 50 identical requests at once, spread over the instances; the first
    // to run waits until all 50 have met the key in progress.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let instance = &setup.instances[i % instances];
        let service = instance.service.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            Instance { service }
                .send(Some(&key), r#"{"sku":"tea","qty":2}"#, &[("x-hold", "50")])
                .await
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    assert_eq!(setup.effects.load(Ordering::SeqCst), 1, "{url}: one effect");
    let first = &answers[0];
    assert_eq!(first.status, StatusCode::CREATED, "{url}");
    let replayed = answers
        .iter()
        .filter(|a| a.headers.get("idempotent-replayed").is_some())
        .count();
    assert_eq!(replayed, 49, "{url}: 49 replays");
    for a in &answers {
        assert_eq!(a.status, first.status, "{url}");
        assert_eq!(a.body, first.body, "{url}: identical bodies");
        assert_eq!(a.headers.get("x-effect"), first.headers.get("x-effect"));
    }
    // The same key with another body: refused, nothing run.
    let other = setup.instances[0]
        .send(Some(&key), r#"{"sku":"tea","qty":3}"#, &[])
        .await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY, "{url}");
    assert_eq!(reason(&other), "IDEMPOTENCY_KEY_REUSED", "{url}");
    // The same body in another key order is the same request.
    let reordered = setup.instances[instances - 1]
        .send(Some(&key), r#"{ "qty": 2, "sku": "tea" }"#, &[])
        .await;
    assert_eq!(reordered.body, first.body, "{url}");
    assert_eq!(setup.effects.load(Ordering::SeqCst), 1, "{url}");

    // Another principal's request under the same key is its own.
    let bob = setup.instances[0]
        .send(
            Some(&key),
            r#"{"sku":"tea","qty":2}"#,
            &[("x-user-id", "bob")],
        )
        .await;
    assert_eq!(bob.status, StatusCode::CREATED);
    assert!(bob.headers.get("idempotent-replayed").is_none());
    assert_eq!(setup.effects.load(Ordering::SeqCst), 2, "{url}");

    // A retryable answer is not stored: the retry runs again.
    let key = uuid::Uuid::new_v4().to_string();
    let failed = setup.instances[0]
        .send(Some(&key), "{}", &[("x-answer", "503")])
        .await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    let retried = setup.instances[instances - 1]
        .send(Some(&key), "{}", &[])
        .await;
    assert_eq!(retried.status, StatusCode::CREATED, "{url}");
    assert!(retried.headers.get("idempotent-replayed").is_none());
    assert_eq!(setup.effects.load(Ordering::SeqCst), 4, "{url}");
    // A final refusal (4xx) is stored like a success.
    let key = uuid::Uuid::new_v4().to_string();
    let refused = setup.instances[0]
        .send(Some(&key), "{}", &[("x-answer", "409")])
        .await;
    let again = setup.instances[instances - 1]
        .send(Some(&key), "{}", &[("x-answer", "409")])
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(again.body, refused.body);
    assert!(again.headers.get("idempotent-replayed").is_some(), "{url}");
    assert_eq!(setup.effects.load(Ordering::SeqCst), 5, "{url}");

    // Without a key the route runs every time.
    setup.instances[0].send(None, "{}", &[]).await;
    setup.instances[0].send(None, "{}", &[]).await;
    assert_eq!(setup.effects.load(Ordering::SeqCst), 7, "{url}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory() {
    suite("memory://", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_shared_by_two_instances() {
    suite("sqlite://idempotency.db", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_shared_by_two_instances() {
    let pg = trellis_testkit::Postgres::start().unwrap();
    suite(&pg.url(), 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_shared_by_two_instances() {
    let redis = trellis_testkit::Redis::start().unwrap();
    suite(&redis.url(), 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_answers_replay_with_their_trailers() {
    let redis = trellis_testkit::Redis::start().unwrap();
    // A handler answering in gRPC's shape: data, then trailers.
    #[derive(Clone)]
    struct Grpc(Arc<AtomicUsize>);
    impl Service<Request<Full<Bytes>>> for Grpc {
        type Response = Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>;
        type Error = Infallible;
        type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Infallible>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move {
                let mut trailers = HeaderMap::new();
                trailers.insert(
                    "grpc-status",
                    HeaderValue::from(if n == 1 { 14 } else { 0 }),
                );
                let frames = futures_util::stream::iter([
                    Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(vec![
                        0, 0, 0, 0, 1, 7,
                    ]))),
                    Ok(http_body::Frame::trailers(trailers)),
                ]);
                let body = http_body_util::StreamBody::new(frames);
                let mut response = Response::new(BodyExt::boxed(body));
                response
                    .headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/grpc"));
                Ok(response)
            })
        }
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let store = connect(&redis.url(), std::path::Path::new("."))
        .await
        .unwrap();
    let settings = IdempotencySettings {
        routes: vec!["/shop.payment.v1.PaymentBranches/Charge".into()],
        ..Default::default()
    };
    let service = IdempotencyLayer::new("payment", store, &settings).layer(Grpc(calls.clone()));
    let call = || {
        let service = service.clone();
        async move {
            let request = Request::post("/shop.payment.v1.PaymentBranches/Charge")
                .header("content-type", "application/grpc")
                .header("idempotency-key", "charge-1")
                .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 2, 8, 1])))
                .unwrap();
            let response = service.oneshot(request).await.unwrap();
            let (head, body) = response.into_parts();
            let collected = body.collect().await.unwrap();
            (head, collected.trailers().cloned(), collected.to_bytes())
        }
    };
    // UNAVAILABLE in the trailers: not stored, so the retry runs.
    let (_, trailers, _) = call().await;
    assert_eq!(trailers.unwrap()["grpc-status"], "14");
    let (head, trailers, body) = call().await;
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    assert!(head.headers.get("idempotent-replayed").is_none());
    // Now stored: replayed with its trailers and bytes.
    let (head2, trailers2, body2) = call().await;
    assert_eq!(head2.headers["idempotent-replayed"], "true");
    assert_eq!(head2.headers["content-type"], "application/grpc");
    assert_eq!(trailers2.unwrap()["grpc-status"], "0");
    assert_eq!(body2, body);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_in_flight_gets_409_when_configured() {
    let settings = IdempotencySettings {
        in_flight: InFlight::Conflict,
        ..settings()
    };
    let setup = setup("memory://", 1, settings).await;
    let first = {
        let service = setup.instances[0].service.clone();
        // Held until the duplicate below has met the key in progress.
        tokio::spawn(async move {
            Instance { service }
                .send(Some("k-409"), "{}", &[("x-hold", "2")])
                .await
        })
    };
    // The first has taken the key before the duplicate is sent.
    let mut begins = setup.begins.clone();
    tokio::time::timeout(Duration::from_secs(30), begins.wait_for(|b| *b >= 1))
        .await
        .unwrap()
        .unwrap();
    let duplicate = setup.instances[0].send(Some("k-409"), "{}", &[]).await;
    assert_eq!(duplicate.status, StatusCode::CONFLICT);
    assert_eq!(reason(&duplicate), "IDEMPOTENCY_KEY_IN_USE");
    assert_eq!(duplicate.headers["retry-after"], "1");
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(setup.effects.load(Ordering::SeqCst), 1);
    // Once done, the duplicate is a replay.
    let later = setup.instances[0].send(Some("k-409"), "{}", &[]).await;
    assert_eq!(later.body, first.body);
    // A bad key is refused with a reason.
    let bad = setup.instances[0].send(Some(""), "{}", &[]).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fingerprint_routes_dedupe_without_a_key_and_answers_expire() {
    let redis = trellis_testkit::Redis::start().unwrap();
    let settings = IdempotencySettings {
        fingerprint_routes: vec!["/v1/orders".into()],
        ttl: Duration::from_secs(1),
        ..Default::default()
    };
    let setup = setup(&redis.url(), 2, settings).await;
    let a = setup.instances[0].send(None, r#"{"a":1,"b":2}"#, &[]).await;
    let b = setup.instances[1].send(None, r#"{"b":2,"a":1}"#, &[]).await;
    assert_eq!(a.body, b.body);
    assert!(b.headers.get("idempotent-replayed").is_some());
    let other = setup.instances[1].send(None, r#"{"a":1,"b":3}"#, &[]).await;
    assert!(other.headers.get("idempotent-replayed").is_none());
    assert_eq!(setup.effects.load(Ordering::SeqCst), 2);
    // After the ttl the same request runs again.
    let fresh = trellis_testkit::eventually(
        Duration::from_secs(10),
        "the fingerprint's answer to expire",
        || async {
            let answer = setup.instances[0].send(None, r#"{"a":1,"b":2}"#, &[]).await;
            match answer.headers.get("idempotent-replayed") {
                None => Ok(answer),
                Some(_) => Err("still replayed"),
            }
        },
    )
    .await;
    assert_eq!(fresh.status, StatusCode::CREATED);
    assert_eq!(setup.effects.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_is_down_refuses_instead_of_running_twice() {
    let redis = trellis_testkit::Redis::start().unwrap();
    let setup = setup(&redis.url(), 1, settings()).await;
    let ok = setup.instances[0].send(Some("k-down"), "{}", &[]).await;
    assert_eq!(ok.status, StatusCode::CREATED);
    drop(redis);
    let refused = setup.instances[0].send(Some("k-down"), "{}", &[]).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(setup.effects.load(Ordering::SeqCst), 1);
    // Requests without a key are not held up.
    let plain = setup.instances[0].send(None, "{}", &[]).await;
    assert_eq!(plain.status, StatusCode::CREATED);
}
