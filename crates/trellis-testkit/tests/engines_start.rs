//! Smoke tests: every engine starts, answers, and is gone after drop.

use std::net::TcpStream;

use trellis_testkit::{Etcd, Nats, Postgres, Prometheus, Redis, http};

fn gone(addr: std::net::SocketAddr) -> bool {
    TcpStream::connect(addr).is_err()
}

#[tokio::test]
async fn etcd_starts_and_answers_health() {
    let etcd = Etcd::start().unwrap();
    let res = http::get(etcd.addr(), "/health").await.unwrap();
    assert_eq!(res.status, 200);
    assert!(res.body.contains("true"), "{}", res.body);
    let addr = etcd.addr();
    drop(etcd);
    assert!(gone(addr), "etcd still listening after drop");
}

#[tokio::test]
async fn nats_starts_with_jetstream() {
    let nats = Nats::start().unwrap();
    let res = http::get(nats.monitor_addr(), "/jsz").await.unwrap();
    assert_eq!(res.status, 200);
    assert!(
        res.body.contains("\"config\""),
        "JetStream not enabled: {}",
        res.body
    );
    assert!(nats.url().starts_with("nats://127.0.0.1:"));
}

#[tokio::test]
async fn redis_starts_and_answers_ping() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let redis = Redis::start().unwrap();
    let mut s = tokio::net::TcpStream::connect(redis.addr()).await.unwrap();
    s.write_all(b"SET k v\r\nGET k\r\n").await.unwrap();
    let mut buf = vec![0u8; 64];
    let mut got = Vec::new();
    while !got.ends_with(b"v\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "redis closed the connection");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"+OK\r\n$1\r\nv\r\n");
}

#[tokio::test]
async fn postgres_starts_as_the_postgres_user() {
    let mut pg = Postgres::start().unwrap();
    assert!(pg.url().starts_with("postgres://postgres@127.0.0.1:"));
    let addr = pg.addr();
    assert!(TcpStream::connect(addr).is_ok());
    pg.engine().kill();
    assert!(gone(addr), "postgres still listening after kill");
}

#[tokio::test]
async fn prometheus_starts_and_its_own_metrics_pass_promtool() {
    // Scraping a Trellis service is tested in trellis-cli's metrics test.
    let prom = Prometheus::start(&[]).unwrap();
    let res = http::get(prom.addr(), "/api/v1/status/buildinfo")
        .await
        .unwrap();
    assert_eq!(res.status, 200);
    assert!(res.body.contains("\"version\""), "{}", res.body);
    let exposition = http::get(prom.addr(), "/metrics").await.unwrap().body;
    Prometheus::check_metrics(&exposition).unwrap();
}

#[test]
fn missing_binary_names_the_install_command() {
    let err = trellis_testkit::find_binary(
        "trellis-no-such-engine",
        "apt-get install -y no-such-engine",
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("apt-get install -y no-such-engine"), "{text}");
}
