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
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let nats = Nats::start().unwrap();
    let res = http::get(nats.monitor_addr(), "/jsz").await.unwrap();
    assert_eq!(res.status, 200);
    assert!(
        res.body.contains("\"config\""),
        "JetStream not enabled: {}",
        res.body
    );
    // The client port speaks NATS: INFO (announcing JetStream), then
    // PONG for a PING.
    let addr = nats.url().trim_start_matches("nats://").to_owned();
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let info = lines.next_line().await.unwrap().unwrap();
    assert!(info.starts_with("INFO "), "{info}");
    assert!(info.contains("\"jetstream\":true"), "{info}");
    write
        .write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n")
        .await
        .unwrap();
    assert_eq!(lines.next_line().await.unwrap().unwrap(), "PONG");
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

/// Runs `sql` with psql as the `postgres` role; returns its output.
fn psql(pg: &Postgres, sql: &str) -> String {
    let bin = trellis_testkit::find_binary("psql", "apt-get install -y postgresql-client").unwrap();
    let out = std::process::Command::new(bin)
        .args(["-h", "127.0.0.1", "-p", &pg.addr().port().to_string()])
        .args([
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-Atc",
            sql,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn postgres_starts_as_the_postgres_user() {
    let mut pg = Postgres::start().unwrap();
    assert!(pg.url().starts_with("postgres://postgres@127.0.0.1:"));
    // A query, as the postgres role, on a server that is not root's.
    assert_eq!(psql(&pg, "select current_user"), "postgres");
    let status = std::fs::read_to_string(format!("/proc/{}/status", pg.engine().pid())).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap();
    assert_ne!(uid, "0", "postgres runs as root");

    // A restart keeps the data and the port.
    psql(
        &pg,
        "create table kept (v int); insert into kept values (7)",
    );
    pg.restart().unwrap();
    assert_eq!(psql(&pg, "select v from kept"), "7");

    let addr = pg.addr();
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
