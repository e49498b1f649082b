//! Shared by the CLI's integration tests: the `trellis` binary as a child process.

#![allow(dead_code)]

use std::process::Command;

pub use trellis_testkit::Program as Trellis;

/// `trellis ARGS` with `RUST_LOG=info`.
pub fn spawn(args: &[&str]) -> Trellis {
    spawn_with_log(args, Some("info"))
}

/// Like `spawn`; `rust_log: None` leaves RUST_LOG unset so that the
/// config's `log.level` governs. `serve` without `--admin-listen` gets a
/// free admin port (its default, the main port + 1000, may be taken).
pub fn spawn_with_log(args: &[&str], rust_log: Option<&str>) -> Trellis {
    let mut command = Command::new(env!("CARGO_BIN_EXE_trellis"));
    command.args(args);
    if args.first() == Some(&"serve") && !args.contains(&"--admin-listen") {
        command.args(["--admin-listen", "127.0.0.1:0"]);
    }
    command.env_remove("RUST_LOG");
    if let Some(level) = rust_log {
        command.env("RUST_LOG", level);
    }
    Trellis::spawn(command).expect("the trellis binary starts")
}

/// Registers `email` and logs in through the gateway of `trellis up` (the
/// auth service's routes are public), once the gateway has found the auth
/// service; the access token.
#[allow(dead_code)]
pub async fn token_through(gateway: std::net::SocketAddr, email: &str) -> String {
    use trellis_testkit::http;
    let jwks = http::poll_until(
        gateway,
        "/.well-known/jwks.json",
        std::time::Duration::from_secs(20),
        |r| r.status == 200,
    )
    .await
    .unwrap();
    assert_eq!(
        jwks.status, 200,
        "the gateway never reached auth: {}",
        jwks.body
    );
    let password = "correct horse battery";
    let account = serde_json::json!({"email": email, "password": password, "display_name": "Ann"});
    let created = http::request(
        gateway,
        "POST",
        "/v1/auth/register",
        Some(&account.to_string()),
    )
    .await
    .unwrap();
    assert_eq!(created.status, 200, "{}", created.body);
    let login = serde_json::json!({"email": email, "password": password});
    let answer = http::request(gateway, "POST", "/v1/auth/login", Some(&login.to_string()))
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    let tokens: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    tokens["access_token"].as_str().unwrap().to_owned()
}

/// `METHOD path` with `headers` and a JSON `body`, on a connection of its
/// own; the answer.
#[allow(dead_code)]
pub async fn call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> trellis_testkit::http::Response {
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: shop\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    trellis_testkit::http::raw(addr, request.as_bytes(), std::time::Duration::from_secs(20))
        .await
        .unwrap()
}
