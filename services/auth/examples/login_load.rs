//! A closed-loop load generator for `Login`: registers one account, then
//! `CONCURRENCY` callers log in over one HTTP/2 connection for `SECONDS`,
//! and prints requests/s and latency percentiles. `MODE` is `ok` (the
//! right password), `wrong` (a wrong one) or `unknown` (no such account) —
//! the last two should cost the same. Used by `scripts/bench/login.sh`.
//!
//! ```sh
//! cargo run --release -p shop-auth --example login_load -- 127.0.0.1:8081 ok 4 10
//! ```

use std::time::{Duration, Instant};

use shop_auth::api::v1::{LoginRequest, RegisterRequest, auth_service_client::AuthServiceClient};
use trellis_testkit::load;

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, mode, concurrency, seconds] = args.as_slice() else {
        return Err("usage: login_load ADDR ok|wrong|unknown CONCURRENCY SECONDS".into());
    };
    let concurrency: usize = concurrency.parse()?;
    let duration = Duration::from_secs(seconds.parse()?);
    let channel = trellis::transport::connect(addr, &Default::default()).await?;
    let email = format!("load-{}@example.com", std::process::id());
    let password = "correct horse battery staple";
    AuthServiceClient::new(channel.clone())
        .register(RegisterRequest {
            email: email.clone(),
            password: password.into(),
            display_name: "Load".into(),
        })
        .await?;
    let (email, password, expect_ok) = match mode.as_str() {
        "ok" => (email, password.to_owned(), true),
        "wrong" => (email, "wrong horse battery staple".to_owned(), false),
        "unknown" => ("nobody@example.com".to_owned(), password.to_owned(), false),
        other => return Err(format!("unknown mode {other:?}").into()),
    };
    let start = Instant::now();
    let deadline = start + duration;
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let mut client = AuthServiceClient::new(channel.clone());
        let (email, password) = (email.clone(), password.clone());
        workers.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0u64);
            while Instant::now() < deadline {
                let t = Instant::now();
                let answer = client
                    .login(LoginRequest {
                        email: email.clone(),
                        password: password.clone(),
                    })
                    .await;
                // A refusal is the expected answer for the failing modes;
                // anything else (limits, errors) counts as an error.
                let as_expected = match &answer {
                    Ok(_) => expect_ok,
                    Err(s) => !expect_ok && s.code() == tonic::Code::Unauthenticated,
                };
                if as_expected {
                    latencies.push(t.elapsed().as_micros() as u64);
                } else {
                    if errors == 0 {
                        eprintln!("unexpected answer: {answer:?}");
                    }
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    load::report(workers, start).await
}
