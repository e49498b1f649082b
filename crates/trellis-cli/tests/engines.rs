//! `trellis up --redis`: the shop's shared state moves to Redis — order
//! idempotency keys, the user cache's second level, the order sweep's lock.

mod support;

use std::{net::SocketAddr, process::Command, time::Duration};

fn redis_cli(redis: &trellis_testkit::Redis, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &redis.addr().port().to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs (apt-get install redis-tools)");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_redis_keeps_keys_cache_and_locks_there() {
    let redis = trellis_testkit::Redis::start().unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    std::fs::write(
        config.path().join("order.toml"),
        "resubmit_after = \"100ms\"\n",
    )
    .unwrap();
    let mut trellis = support::spawn(&[
        "up",
        "--base-port",
        "0",
        "--data-dir",
        data.path().to_str().unwrap(),
        "--config",
        config.path().to_str().unwrap(),
        "--redis",
        &redis.url(),
    ]);
    let front = trellis.line_starting_with("gateway");
    let gateway: SocketAddr = front.split_whitespace().nth(1).unwrap().parse().unwrap();
    let token = support::token_through(gateway, "kai@example.com").await;
    let bearer = format!("Bearer {token}");
    let auth = [
        ("Authorization", bearer.as_str()),
        ("Idempotency-Key", "k-1"),
    ];

    // A keyed order: its key and answer are in Redis, and the repeat is
    // answered from there.
    let lines = r#"{"lines":[{"sku":"tea","quantity":1}]}"#;
    let first = support::call(gateway, "POST", "/v1/orders", &auth, lines).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let again = support::call(gateway, "POST", "/v1/orders", &auth, lines).await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, first.body);
    assert_eq!(
        redis_cli(&redis, &["--scan", "--pattern", "idempotency:order:*"])
            .lines()
            .count(),
        1
    );

    // A user read twice: loaded once, kept in Redis for other instances.
    let created = support::call(
        gateway,
        "POST",
        "/v1/users",
        &auth[..1],
        r#"{"email":"kai.two@example.com","displayName":"Kai"}"#,
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.body);
    let id = serde_json::from_str::<serde_json::Value>(&created.body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..2 {
        let got = support::call(gateway, "GET", &format!("/v1/users/{id}"), &auth[..1], "").await;
        assert_eq!(got.status, 200, "{}", got.body);
    }
    let cached = redis_cli(&redis, &["GET", &format!("cache:user:{id}")]);
    assert!(cached.contains("kai.two@example.com"), "{cached:?}");

    // The order sweep takes its lock in Redis (every 100 ms).
    trellis_testkit::eventually(
        Duration::from_secs(10),
        "the sweep's lock granted in Redis",
        || async {
            let tokens = redis_cli(&redis, &["GET", "shop:lock-tokens"]);
            match tokens.parse::<u64>() {
                Ok(n) if n >= 2 => Ok(()),
                _ => Err(tokens),
            }
        },
    )
    .await;

    trellis.signal(libc::SIGTERM);
    assert_eq!(
        trellis.wait(Duration::from_secs(15)).code(),
        Some(0),
        "{}",
        trellis.stderr()
    );
}
