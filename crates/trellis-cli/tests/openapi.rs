//! `trellis openapi user` writes a document that an independent OpenAPI 3.1
//! validator accepts, with every REST route of the service.

mod support;

use std::process::Command;

#[test]
fn trellis_openapi_writes_a_valid_openapi_31_document() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("user.json");
    let status = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["openapi", "user", "--out", file.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    for (path, method) in [
        ("/v1/users", "post"),
        ("/v1/users", "get"),
        ("/v1/users/{id}", "get"),
        ("/v1/users/{user_id}", "patch"),
        ("/v1/users/{id}", "delete"),
        ("/shop.user.v1.UserService/GetUser", "post"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
    }

    let validator = trellis_testkit::find_binary(
        "openapi-spec-validator",
        "pip install openapi-spec-validator",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(validator).arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Schemathesis, an independent fuzzer, generates requests from the served
/// document against a live `trellis serve user`: no 5xx, and every response
/// (status, content type, headers, body) conforms to the document.
#[test]
fn a_fuzzer_driven_by_the_document_finds_no_server_errors_and_no_spec_violations() {
    let st = trellis_testkit::find_binary("st", "pip install schemathesis")
        .unwrap_or_else(|e| panic!("{e}"));
    let data = tempfile::tempdir().unwrap();
    let port = trellis_testkit::free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "serve",
            "user",
            "--listen",
            &listen,
            "--admin-listen",
            "127.0.0.1:0",
            "--data-dir",
            data.path().to_str().unwrap(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut server = support::Trellis::from_child(child);
    server.line_starting_with("user serving");

    let out = Command::new(st)
        .args([
            "run",
            &format!("http://{listen}/openapi.json"),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance",
            "--max-examples",
            "40",
            "--seed",
            "20261123",
            "--report-dir",
            data.path().join("report").to_str().unwrap(),
        ])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("passed"), "{text}");
}

/// The same fuzzer through the gateway `trellis up` puts in front of the
/// shop: the user service's document, every request sent to the gateway.
/// No 5xx, and the answers still conform (the gateway changes nothing the
/// document describes).
#[test]
fn the_fuzzer_through_the_gateway_finds_no_server_errors_either() {
    let st = trellis_testkit::find_binary("st", "pip install schemathesis")
        .unwrap_or_else(|e| panic!("{e}"));
    let data = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "up",
            "--base-port",
            "0",
            "--data-dir",
            data.path().to_str().unwrap(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut shop = support::Trellis::from_child(child);
    let gateway = shop.line_starting_with("gateway");
    let gateway = gateway.split_whitespace().nth(1).unwrap().to_owned();
    let user = shop.line_starting_with("user");
    let user = user.split_whitespace().nth(1).unwrap().to_owned();
    // The user instance registers once ready; the gateway then finds it
    // (another process: asked until it answers).
    // The user routes want a token: one from the shop's auth service.
    let addr: std::net::SocketAddr = gateway.parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let token = runtime.block_on(support::token_through(addr, "fuzzer@example.com"));
    let found = runtime.block_on(trellis_testkit::http::raw(
        addr,
        format!("GET /v1/users HTTP/1.1\r\nHost: shop\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n").as_bytes(),
        std::time::Duration::from_secs(20),
    ));
    assert!(
        found.as_ref().is_ok_and(|r| r.status == 200),
        "the gateway never reached the user service: {found:?}"
    );

    let out = Command::new(st)
        .args([
            "run",
            &format!("http://{user}/openapi.json"),
            "--url",
            &format!("http://{gateway}"),
            "--header",
            &format!("Authorization: Bearer {token}"),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            "30",
            "--seed",
            "20261130",
            "--report-dir",
            data.path().join("report").to_str().unwrap(),
        ])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("passed"), "{text}");
}
