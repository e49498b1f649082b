//! Lock round trips per backend and the idempotency layer's cost per
//! request, against engines started here (scripts/bench/engines.sh).
//!
//!   cargo run --release -p trellis-lock --all-features --example lock_bench

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt, service_fn};
use trellis_lock::{
    LockConfig,
    idempotency::{IdempotencyLayer, IdempotencySettings, connect},
};

async fn locks(name: &str, url: &str, n: usize) {
    let locks = trellis_lock::connect(url, "bench:", LockConfig::default())
        .await
        .unwrap();
    // Sequential: one acquire and one release per iteration.
    let started = Instant::now();
    for i in 0..n {
        let guard = locks
            .try_lock(&format!("r{}", i % 64))
            .await
            .unwrap()
            .expect("free");
        guard.release().await.unwrap();
    }
    let each = started.elapsed() / n as u32;
    // 16 workers on their own resources.
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..16 {
        let locks = locks.clone();
        workers.push(tokio::spawn(async move {
            for _ in 0..n / 16 {
                let guard = locks
                    .try_lock(&format!("w{w}"))
                    .await
                    .unwrap()
                    .expect("free");
                guard.release().await.unwrap();
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let rate = (n / 16 * 16) as f64 / started.elapsed().as_secs_f64();
    println!(
        "| {name} | {:.1} µs | {:.0} /s |",
        each.as_secs_f64() * 1e6,
        rate
    );
}

type Handler =
    tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, Infallible>;

fn handler() -> Handler {
    tower::util::BoxCloneSyncService::new(service_fn(|_: Request<Full<Bytes>>| async {
        let mut r = Response::new(Full::new(Bytes::from_static(
            br#"{"id":"o-1","status":"PENDING"}"#,
        )));
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        Ok::<_, Infallible>(r)
    }))
}

fn request(key: Option<&str>) -> Request<Full<Bytes>> {
    let mut r = Request::post("/v1/orders")
        .header("content-type", "application/json")
        .header("x-user-id", "alice");
    if let Some(key) = key {
        r = r.header("idempotency-key", key);
    }
    r.body(Full::new(Bytes::from_static(
        br#"{"lines":[{"sku":"tea","quantity":2},{"sku":"teapot","quantity":1}]}"#,
    )))
    .unwrap()
}

async fn time<S, B>(service: &S, n: usize, key: impl Fn(usize) -> Option<String>) -> Duration
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let started = Instant::now();
    for i in 0..n {
        let response = service
            .clone()
            .oneshot(request(key(i).as_deref()))
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
    }
    started.elapsed() / n as u32
}

async fn idempotency(name: &str, url: &str, n: usize) {
    let store = connect(url, std::path::Path::new("/tmp")).await.unwrap();
    let settings = IdempotencySettings {
        routes: vec!["/v1/orders".into()],
        ..Default::default()
    };
    let layered = IdempotencyLayer::new("bench", store, &settings).layer(handler());
    let bare = time(&handler(), n, |_| None).await;
    let run = uuid::Uuid::new_v4();
    let executed = time(&layered, n, |i| Some(format!("{run}-{i}"))).await;
    let replayed = time(&layered, n, |i| Some(format!("{run}-{i}"))).await;
    let unkeyed = time(&layered, n, |_| None).await;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "| {name} | {:.2} µs | {:.2} µs | {:.1} µs | {:.1} µs |",
        us(bare),
        us(unkeyed),
        us(executed),
        us(replayed)
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let redis = trellis_testkit::Redis::start().unwrap();
    let etcd = trellis_testkit::Etcd::start().unwrap();
    let three = [
        trellis_testkit::Redis::start().unwrap(),
        trellis_testkit::Redis::start().unwrap(),
        trellis_testkit::Redis::start().unwrap(),
    ];
    let redlock = format!(
        "redlock://{}",
        three
            .iter()
            .map(|r| r.addr().to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    println!("| lock backend | acquire + release, one caller | 16 callers |");
    println!("|---|---|---|");
    locks("in process", "memory://", 200_000).await;
    locks("Redis", &redis.url(), 5_000).await;
    locks("Redlock (3 Redis)", &redlock, 3_000).await;
    locks("etcd", &format!("etcd://{}", etcd.addr()), 1_000).await;
    println!();
    println!(
        "| idempotency store | handler alone | layer, no key | new key (runs, stored) | repeat (replayed) |"
    );
    println!("|---|---|---|---|---|");
    idempotency("memory", "memory://", 50_000).await;
    idempotency("Redis", &redis.url(), 5_000).await;
    let _ = Arc::new(());
}
