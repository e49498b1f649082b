//! A closed-loop gRPC load generator for `GetUser`: `CONCURRENCY` callers
//! over `CONNECTIONS` HTTP/2 connections for `SECONDS`, then requests/s and
//! latency percentiles. Used by `scripts/bench/rpc.sh` and
//! `scripts/bench/secure.sh` against the Trellis server and the bare tonic
//! baseline, so all see the same load.
//!
//! ```sh
//! cargo run --release -p shop-user --example grpc_load -- 127.0.0.1:8082 USER_ID 32 4 10
//! ```
//!
//! - `BEARER=TOKEN` sends `authorization: Bearer TOKEN` with every call;
//! - `TLS_DIR=DIR TLS_NAME=NAME` speaks mutual TLS with `DIR/ca.pem` and
//!   `DIR/NAME.pem` (as `trellis certs init` writes them);
//! - `CONNECTIONS=0` opens a new connection (and handshake) for every call.

use trellis_testkit::load;

use std::time::{Duration, Instant};

use shop_user::api::v1::{GetUserRequest, user_service_client::UserServiceClient};
use trellis::transport::{ClientConfig, tls};

fn request(
    id: &str,
    bearer: Option<&tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
) -> tonic::Request<GetUserRequest> {
    let mut request = tonic::Request::new(GetUserRequest { id: id.to_owned() });
    if let Some(b) = bearer {
        request.metadata_mut().insert("authorization", b.clone());
    }
    request
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, id, concurrency, connections, seconds] = args.as_slice() else {
        return Err("usage: grpc_load ADDR USER_ID CONCURRENCY CONNECTIONS SECONDS".into());
    };
    let (concurrency, connections): (usize, usize) = (concurrency.parse()?, connections.parse()?);
    let duration = Duration::from_secs(seconds.parse()?);
    let bearer = match std::env::var("BEARER") {
        Ok(token) => Some(format!("Bearer {token}").parse()?),
        Err(_) => None,
    };
    let mut config = ClientConfig::default();
    if let (Ok(dir), Ok(name)) = (std::env::var("TLS_DIR"), std::env::var("TLS_NAME")) {
        let dir = std::path::Path::new(&dir);
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        config.tls = Some(tls::fixed(tls::load_client(
            &dir.join("ca.pem"),
            Some((&cert, &key)),
        )?));
    }

    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(trellis::transport::connect(addr, &config).await?);
    }
    // Warm up every connection (or check one call works).
    match channels.is_empty() {
        true => {
            let channel = trellis::transport::connect(addr, &config).await?;
            UserServiceClient::new(channel)
                .get_user(request(id, bearer.as_ref()))
                .await?;
        }
        false => {
            for ch in &channels {
                UserServiceClient::new(ch.clone())
                    .get_user(request(id, bearer.as_ref()))
                    .await?;
            }
        }
    }

    let start = Instant::now();
    let deadline = start + duration;
    let mut workers = Vec::new();
    for i in 0..concurrency {
        let shared = channels.get(i % channels.len().max(1)).cloned();
        let (id, bearer, config, addr) = (id.clone(), bearer.clone(), config.clone(), addr.clone());
        workers.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::with_capacity(100_000), 0u64);
            while Instant::now() < deadline {
                let t = Instant::now();
                let channel = match &shared {
                    Some(ch) => ch.clone(),
                    // A connection of its own: TCP, TLS and HTTP/2 handshakes.
                    None => match trellis::transport::connect(&addr, &config).await {
                        Ok(ch) => ch,
                        Err(_) => {
                            errors += 1;
                            continue;
                        }
                    },
                };
                match UserServiceClient::new(channel)
                    .get_user(request(&id, bearer.as_ref()))
                    .await
                {
                    Ok(_) => latencies.push(t.elapsed().as_micros() as u64),
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    load::report(workers, start).await
}
