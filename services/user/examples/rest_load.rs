//! A closed-loop REST load generator for `GET /v1/users/{id}`: `CONCURRENCY`
//! callers over `CONNECTIONS` clients for `SECONDS`, over HTTP/1.1
//! (keep-alive, a connection per caller in flight) or h2c (HTTP/2 without
//! TLS, multiplexed like gRPC), then requests/s and latency percentiles.
//! Used by `scripts/bench/rest.sh` next to `grpc_load` on the same server.
//!
//! ```sh
//! cargo run --release -p shop-user --example rest_load -- 127.0.0.1:8082 USER_ID 32 4 10 h2c
//! ```

use trellis_testkit::load;

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, id, concurrency, connections, seconds, mode] = args.as_slice() else {
        return Err("usage: rest_load ADDR USER_ID CONCURRENCY CONNECTIONS SECONDS h1|h2c".into());
    };
    let (concurrency, connections): (usize, usize) = (concurrency.parse()?, connections.parse()?);
    let duration = Duration::from_secs(seconds.parse()?);
    let h2 = match mode.as_str() {
        "h2c" => true,
        "h1" => false,
        other => return Err(format!("mode {other:?}: expected h1 or h2c").into()),
    };
    let uri: http::Uri = format!("http://{addr}/v1/users/{id}").parse()?;

    let mut clients = Vec::new();
    for _ in 0..connections.max(1) {
        let mut builder = Client::builder(TokioExecutor::new());
        builder.http2_only(h2).pool_max_idle_per_host(concurrency);
        clients.push(builder.build::<_, Empty<bytes::Bytes>>(HttpConnector::new()));
    }
    // Warm up every client, and check the answer once.
    for c in &clients {
        let resp = c.get(uri.clone()).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            return Err(format!("GET {uri}: {status} {}", String::from_utf8_lossy(&body)).into());
        }
    }

    let start = Instant::now();
    let deadline = start + duration;
    let mut workers = Vec::new();
    for i in 0..concurrency {
        let client = clients[i % clients.len()].clone();
        let uri = uri.clone();
        workers.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::with_capacity(100_000), 0u64);
            while Instant::now() < deadline {
                let t = Instant::now();
                let ok = match client.get(uri.clone()).await {
                    Ok(resp) => {
                        let ok = resp.status().is_success();
                        ok && resp.into_body().collect().await.is_ok()
                    }
                    Err(_) => false,
                };
                if ok {
                    latencies.push(t.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    load::report(workers, start).await
}
