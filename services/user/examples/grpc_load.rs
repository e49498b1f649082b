//! A closed-loop gRPC load generator for `GetUser`: `CONCURRENCY` callers
//! over `CONNECTIONS` HTTP/2 connections for `SECONDS`, then requests/s and
//! latency percentiles. Used by `scripts/bench/rpc.sh` against both the
//! Trellis server and the bare tonic baseline, so both see the same load.
//!
//! ```sh
//! cargo run --release -p shop-user --example grpc_load -- 127.0.0.1:8082 USER_ID 32 4 10
//! ```

use trellis_testkit::load;

use std::time::{Duration, Instant};

use shop_user::api::v1::{GetUserRequest, user_service_client::UserServiceClient};

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, id, concurrency, connections, seconds] = args.as_slice() else {
        return Err("usage: grpc_load ADDR USER_ID CONCURRENCY CONNECTIONS SECONDS".into());
    };
    let (concurrency, connections): (usize, usize) = (concurrency.parse()?, connections.parse()?);
    let duration = Duration::from_secs(seconds.parse()?);

    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        channels.push(trellis::transport::connect(addr, &Default::default()).await?);
    }
    // Warm up every connection.
    for ch in &channels {
        UserServiceClient::new(ch.clone())
            .get_user(GetUserRequest { id: id.clone() })
            .await?;
    }

    let start = Instant::now();
    let deadline = start + duration;
    let mut workers = Vec::new();
    for i in 0..concurrency {
        let mut client = UserServiceClient::new(channels[i % channels.len()].clone());
        let id = id.clone();
        workers.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::with_capacity(100_000), 0u64);
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.get_user(GetUserRequest { id: id.clone() }).await {
                    Ok(_) => latencies.push(t.elapsed().as_micros() as u64),
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    load::report(workers, start).await
}
