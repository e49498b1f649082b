//! A closed-loop gRPC load generator for `hello.v1.Greeter/SayHello`:
//! `CONCURRENCY` callers over `CONNECTIONS` HTTP/2 connections for
//! `SECONDS`, then requests/s and latency percentiles
//! (`scripts/bench/echo.sh` runs it against both servers).
//!
//! ```sh
//! cargo run --release -p trellis-examples --example hello_load -- 127.0.0.1:8090 32 4 10
//! ```

use std::time::{Duration, Instant};

use trellis_examples::api::{SayHelloRequest, greeter_client::GreeterClient};
use trellis_testkit::load;

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, concurrency, connections, seconds] = args.as_slice() else {
        return Err("usage: hello_load ADDR CONCURRENCY CONNECTIONS SECONDS".into());
    };
    let (concurrency, connections): (usize, usize) = (concurrency.parse()?, connections.parse()?);
    let duration = Duration::from_secs(seconds.parse()?);

    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        channels.push(channel);
    }
    let request = || SayHelloRequest {
        name: "bench".into(),
    };
    for ch in &channels {
        GreeterClient::new(ch.clone()).say_hello(request()).await?;
    }

    let start = Instant::now();
    let deadline = start + duration;
    let mut workers = Vec::new();
    for i in 0..concurrency {
        let mut client = GreeterClient::new(channels[i % channels.len()].clone());
        workers.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::with_capacity(100_000), 0u64);
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.say_hello(request()).await {
                    Ok(_) => latencies.push(t.elapsed().as_micros() as u64),
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    load::report(workers, start).await
}
