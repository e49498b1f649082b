//! The config centre end to end: `trellis serve --config-source etcd://`,
//! `trellis config get|set`, `/debug/config`.

mod support;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use support::Trellis;
use trellis_testkit::{Etcd, http};

fn trellis(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .output()
        .unwrap()
}

async fn debug_config(admin: std::net::SocketAddr) -> serde_json::Value {
    let res = http::get(admin, "/debug/config").await.unwrap();
    assert_eq!(res.status, 200, "{}", res.body);
    serde_json::from_str(&res.body).unwrap()
}

async fn wait_for_config(
    admin: std::net::SocketAddr,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let view = debug_config(admin).await;
        if f(&view) {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last view {view}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_change_live_through_etcd_and_bad_ones_never_land() {
    let etcd = Etcd::start().unwrap();
    let source = format!("etcd://{}/trellis/config", etcd.addr());
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("user.toml");
    std::fs::write(
        &file,
        "[server]\nrequest_timeout = \"30s\"\n[database]\nurl = \"sqlite://${DATA}/user.db\"\n",
    )
    .unwrap();
    let listen = format!("127.0.0.1:{}", trellis_testkit::free_port().unwrap());
    let admin: std::net::SocketAddr =
        format!("127.0.0.1:{}", trellis_testkit::free_port().unwrap())
            .parse()
            .unwrap();
    // The child gets DATA (for the placeholder) through its environment.
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"));
    child
        .env("DATA", data.path())
        .env_remove("RUST_LOG")
        .args([
            "serve",
            "user",
            "--listen",
            &listen,
            "--admin-listen",
            &admin.to_string(),
        ])
        .args([
            "--data-dir",
            data.path().to_str().unwrap(),
            "--config",
            file.to_str().unwrap(),
            "--config-source",
            &source,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut server = Trellis::from_child(child.spawn().unwrap());
    server.line_starting_with("user serving");

    let view = debug_config(admin).await;
    assert_eq!(view["config"]["server"]["request_timeout"], "30s");
    assert_eq!(
        view["config"]["database"]["url"], "[redacted]",
        "secrets stay hidden: {view}"
    );
    assert!(
        data.path().join("user.db").exists(),
        "the placeholder in database.url was expanded"
    );
    let first_version = view["version"].as_str().unwrap().to_owned();
    assert_eq!(
        http::get(listen.parse().unwrap(), "/debug/config")
            .await
            .unwrap()
            .status,
        404,
        "debug stays off the public port"
    );

    // A valid change through the CLI applies live.
    let out = trellis(&[
        "config",
        "set",
        "user/server.request_timeout",
        "50ms",
        "--config-source",
        &source,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view = wait_for_config(admin, "the new timeout", |v| {
        v["config"]["server"]["request_timeout"] == "50ms"
    })
    .await;
    assert_ne!(view["version"], first_version.as_str());
    assert!(
        view["sources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["source"].as_str().unwrap().starts_with("etcd "))
    );
    let got = trellis(&[
        "config",
        "get",
        "user/server.request_timeout",
        "--config-source",
        &source,
    ]);
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "50ms");

    // Bad values are refused by the CLI before they reach etcd.
    for (key, value, expect) in [
        ("user/server.request_timeout", "soon", "invalid duration"),
        ("user/server.colour", "red", "unknown key"),
        ("user/database.max_connections", "0", "between 1 and 1000"),
        ("user/log.level", "not-a-level", "names no level"),
        ("user/log.level", "info,chatty", "names no level"),
    ] {
        let out = trellis(&["config", "set", key, value, "--config-source", &source]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{key}={value} was accepted");
        assert!(stderr.contains(expect), "{key}={value}: {stderr}");
    }

    // A bad value written behind the CLI's back is rejected by the service,
    // which keeps its last good config and keeps serving.
    let mut kv = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    kv.put(
        "/trellis/config/user/server/max_concurrent_streams",
        "0",
        None,
    )
    .await
    .unwrap();
    let view = wait_for_config(admin, "the rejection", |v| {
        v["config_reload_failures_total"] == 1
    })
    .await;
    let err = view["last_error"].as_str().unwrap();
    assert!(
        err.contains("server.max_concurrent_streams") && err.contains("etcd /trellis/config/user/"),
        "{err}"
    );
    assert_eq!(view["config"]["server"]["request_timeout"], "50ms");
    assert_eq!(
        http::get(listen.parse().unwrap(), "/readyz")
            .await
            .unwrap()
            .status,
        200
    );
    let metrics = http::get(admin, "/metrics").await.unwrap().body;
    assert!(
        metrics
            .lines()
            .any(|l| l == "config_reload_failures_total 1"),
        "{metrics}"
    );

    // The live log level: debug lines appear after the change.
    let out = trellis(&[
        "config",
        "set",
        "user/log.level",
        "debug",
        "--config-source",
        &source,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The failed write above keeps the etcd layer rejected until it is fixed.
    kv.put(
        "/trellis/config/user/server/max_concurrent_streams",
        "64",
        None,
    )
    .await
    .unwrap();
    let view = wait_for_config(admin, "the fix", |v| v["config"]["log"]["level"] == "debug").await;

    // A level that names no level, written behind the CLI's back, is
    // refused by the service too (it would have silenced every line).
    let failures = view["config_reload_failures_total"].as_u64().unwrap();
    kv.put("/trellis/config/user/log/level", "word", None)
        .await
        .unwrap();
    let view = wait_for_config(admin, "the log level rejection", |v| {
        v["config_reload_failures_total"].as_u64() == Some(failures + 1)
    })
    .await;
    assert!(
        view["last_error"]
            .as_str()
            .unwrap()
            .contains("names no level"),
        "{view}"
    );
    assert_eq!(view["config"]["log"]["level"], "debug");
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait(Duration::from_secs(15)).code(), Some(0));
    let stderr = server.stderr();
    assert!(stderr.contains("log level changed"), "{stderr}");
}

#[test]
fn config_keys_must_name_a_service() {
    let out = trellis(&[
        "config",
        "get",
        "request_timeout",
        "--config-source",
        "etcd://127.0.0.1:1/x",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SERVICE/PATH"));
}

#[test]
fn up_wants_a_config_directory() {
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("user.toml");
    std::fs::write(&file, "").unwrap();
    let out = trellis(&[
        "up",
        "--base-port",
        "0",
        "--data-dir",
        data.path().to_str().unwrap(),
        "--config",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a directory"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A secret in the service's settings type (`database.url`) never shows in
/// `config set`, `get` or `watch`, nor in the refusal of a bad value; an
/// ordinary setting does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_commands_redact_the_services_secrets() {
    let etcd = Etcd::start().unwrap();
    let source = format!("etcd://{}/trellis/config", etcd.addr());
    let url = "postgres://app:hunter2@db:5432/shop";
    let set = trellis(&[
        "config",
        "set",
        "user/database.url",
        url,
        "--config-source",
        &source,
    ]);
    let stdout = String::from_utf8_lossy(&set.stdout);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    assert!(
        stdout.contains("user/database.url = [redacted]"),
        "{stdout}"
    );
    assert!(!stdout.contains("hunter2"), "{stdout}");
    let get = trellis(&[
        "config",
        "get",
        "user/database.url",
        "--config-source",
        &source,
    ]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "[redacted]");
    let plain = trellis(&[
        "config",
        "set",
        "user/server.request_timeout",
        "5s",
        "--config-source",
        &source,
    ]);
    assert!(String::from_utf8_lossy(&plain.stdout).contains("= 5s"));

    let bad = trellis(&[
        "config",
        "set",
        "user/database.url",
        "mysql://app:hunter2@db/shop",
        "--config-source",
        &source,
    ]);
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("database.url"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");

    let mut watch = support::spawn(&["config", "watch", "user", "--config-source", &source]);
    let mut lines = vec![
        watch.line_starting_with("user/"),
        watch.line_starting_with("user/"),
    ];
    lines.sort();
    assert_eq!(
        lines,
        [
            "user/database.url = [redacted]\n",
            "user/server.request_timeout = 5s\n"
        ]
    );
}
