//! `trellis openapi user` writes a document that an independent OpenAPI 3.1
//! validator accepts, with every REST route of the service.

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
        ("/v1/users/{user.id}", "patch"),
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
