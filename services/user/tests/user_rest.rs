//! The user service's REST face, from its `google.api.http` annotations,
//! served by the real server with its default stack: the whole contract over
//! JSON, errors in the error model, the OpenAPI document, and REST requests
//! measured under their route templates.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use shop_user::UserSettings;
use trellis::config::Config;
use trellis_testkit::http;

fn json(r: &http::Response) -> Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_service_over_rest() {
    let metrics = trellis::telemetry::prometheus().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = Config::<UserSettings>::builder()
        .env_vars(Vec::new())
        .build()
        .await
        .unwrap();
    let running = support::serve(config, dir.path()).await;
    let addr = running.addr;

    // Create: POST /v1/users, the user as the body.
    let created = http::request(
        addr,
        "POST",
        "/v1/users",
        Some(r#"{"email":"Ada@Example.com","displayName":"Ada"}"#),
    )
    .await
    .unwrap();
    assert_eq!(created.status, 200, "{}", created.body);
    let ada = json(&created);
    assert_eq!(ada["email"], "ada@example.com");
    let id = ada["id"].as_str().unwrap().to_owned();
    assert!(
        ada["createTime"].as_str().unwrap().ends_with('Z'),
        "Timestamps are RFC 3339: {ada}"
    );

    // Get, list (paged, from the query), update with the mask taken from the body, delete.
    let got = http::get(addr, &format!("/v1/users/{id}")).await.unwrap();
    assert_eq!(
        (got.status, json(&got)["displayName"].clone()),
        (200, json!("Ada"))
    );
    http::request(
        addr,
        "POST",
        "/v1/users",
        Some(r#"{"email":"grace@example.com","displayName":"Grace"}"#),
    )
    .await
    .unwrap();
    let page = json(&http::get(addr, "/v1/users?pageSize=1").await.unwrap());
    assert_eq!(page["users"].as_array().unwrap().len(), 1);
    let token = page["nextPageToken"].as_str().unwrap();
    assert!(!token.is_empty());
    let next = json(
        &http::get(addr, &format!("/v1/users?pageSize=1&page_token={token}"))
            .await
            .unwrap(),
    );
    assert_eq!(next["users"][0]["email"], "grace@example.com");

    let patched = http::request(
        addr,
        "PATCH",
        &format!("/v1/users/{id}"),
        Some(r#"{"displayName":"Ada L."}"#),
    )
    .await
    .unwrap();
    assert_eq!(patched.status, 200, "{}", patched.body);
    let patched = json(&patched);
    assert_eq!(
        (patched["displayName"].as_str(), patched["email"].as_str()),
        (Some("Ada L."), Some("ada@example.com"))
    );

    // Errors: the same model as gRPC, with HTTP statuses.
    let dup = http::request(
        addr,
        "POST",
        "/v1/users",
        Some(r#"{"email":"ada@example.com","displayName":"Again"}"#),
    )
    .await
    .unwrap();
    assert_eq!(
        (dup.status, json(&dup)["reason"].clone()),
        (409, json!("EMAIL_TAKEN"))
    );
    let bad = http::get(addr, "/v1/users/not-a-uuid").await.unwrap();
    assert_eq!(
        (bad.status, json(&bad)["metadata"]["field"].clone()),
        (400, json!("id"))
    );
    let typo = http::request(
        addr,
        "POST",
        "/v1/users",
        Some(r#"{"email":"x@example.com","displayNme":"X"}"#),
    )
    .await
    .unwrap();
    assert_eq!(
        (typo.status, json(&typo)["metadata"]["field"].clone()),
        (400, json!("user.displayNme"))
    );
    let gone = http::request(addr, "DELETE", &format!("/v1/users/{id}"), None)
        .await
        .unwrap();
    assert_eq!((gone.status, gone.body.as_str()), (200, "{}"));
    let missing = http::get(addr, &format!("/v1/users/{id}")).await.unwrap();
    assert_eq!(
        (missing.status, json(&missing)["reason"].clone()),
        (404, json!("USER_NOT_FOUND"))
    );
    let nowhere = http::get(addr, "/v2/nothing").await.unwrap();
    assert_eq!(
        (nowhere.status, json(&nowhere)["reason"].clone()),
        (404, json!("ROUTE_NOT_FOUND"))
    );

    // Any method by its gRPC name, and the document that lists them all.
    let by_name = http::request(
        addr,
        "POST",
        "/shop.user.v1.UserService/ListUsers",
        Some(r#"{"pageSize":5}"#),
    )
    .await
    .unwrap();
    assert_eq!(json(&by_name)["users"].as_array().unwrap().len(), 1);
    let doc = json(&http::get(addr, "/openapi.json").await.unwrap());
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc["paths"]["/v1/users/{id}"]["get"]["summary"],
        "Returns one user by id."
    );
    assert!(doc["paths"]["/v1/users/{user_id}"]["patch"].is_object());
    let page_size = doc["paths"]["/v1/users"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "page_size")
        .unwrap_or_else(|| panic!("{}", doc["paths"]["/v1/users"]))
        .clone();
    assert_eq!(
        page_size["schema"]["minimum"], 0,
        "rules reach query parameters too: {page_size}"
    );

    // Measured as HTTP, under the template, not the raw path.
    let text = metrics.render();
    assert!(
        text.lines().any(
            |l| l.starts_with("http_server_request_duration_seconds_count{")
                && l.contains("http_route=\"/v1/users/{id}\"")
                && l.contains("http_request_method=\"GET\"")
        ),
        "{text}"
    );
    assert!(!text.contains(&id), "no raw ids in labels");

    running.stop().await;
}

/// Runs the user service with `server.max_body_bytes` at 64 KiB.
async fn small_bodied() -> (support::Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::<UserSettings>::builder()
        .env_vars([(
            "TRELLIS_SERVER__MAX_BODY_BYTES".to_owned(),
            "65536".to_owned(),
        )])
        .env("TRELLIS")
        .build()
        .await
        .unwrap();
    assert_eq!(config.current().config.server.max_body_bytes, 65536);
    (support::serve(config, dir.path()).await, dir)
}

/// A request with these head lines and body bytes, answered within 5 s.
async fn send(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> http::Response {
    let mut request = format!("{head}\r\nHost: {addr}\r\nConnection: close\r\n").into_bytes();
    if !head.to_ascii_lowercase().contains("content-length") {
        request.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    request.extend_from_slice(body);
    http::raw(addr, &request, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{head}: {e}"))
}

fn problem(r: &http::Response) -> (u16, String, String) {
    let body = json(r);
    (
        r.status,
        body["reason"].as_str().unwrap_or("").to_owned(),
        body["message"].as_str().unwrap_or("").to_owned(),
    )
}

/// Bad input gets a 4xx naming the problem on both faces: bodies over
/// `server.max_body_bytes` (refused from `Content-Length` before they are
/// read), bodies that are not JSON, bytes that are not UTF-8 in the body,
/// the path or the query, numbers out of range, unknown enum names, JSON
/// nested past any sense.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_answered_4xx_naming_the_problem() {
    let (running, _dir) = small_bodied().await;
    let addr = running.addr;
    let user = |name: &str| format!(r#"{{"email":"{name}@example.com","displayName":"{name}"}}"#);

    // Declared 100 MiB, 64 KiB sent: refused at once, the limit named.
    let started = std::time::Instant::now();
    let huge = send(
        addr,
        "POST /v1/users HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 104857600",
        &vec![b' '; 64 * 1024],
    )
    .await;
    eprintln!(
        "a declared 100 MiB body was refused in {:?}",
        started.elapsed()
    );
    let (status, reason, message) = problem(&huge);
    assert_eq!(
        (status, reason.as_str()),
        (413, "BODY_TOO_LARGE"),
        "{message}"
    );
    assert!(message.contains("65536-byte limit"), "{message}");
    // Sent in chunks without a length: cut off at the limit, the same answer.
    let mut chunked = Vec::new();
    for _ in 0..3 {
        chunked.extend_from_slice(format!("{:x}\r\n", 40 * 1024).as_bytes());
        chunked.extend_from_slice(&vec![b' '; 40 * 1024]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let mut request =
        format!("POST /v1/users HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").into_bytes();
    request.extend_from_slice(&chunked);
    let streamed = http::raw(addr, &request, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(problem(&streamed).0, 413, "{}", streamed.body);
    // Within the limit it is served.
    let ok = send(
        addr,
        "POST /v1/users HTTP/1.1\r\nContent-Type: application/json; charset=utf-8",
        user("ada").as_bytes(),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);

    // Only JSON is read: a cross-site form or text post cannot write.
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let r = send(
            addr,
            &format!("POST /v1/users HTTP/1.1\r\nContent-Type: {content_type}"),
            user("eve").as_bytes(),
        )
        .await;
        let (status, reason, _) = problem(&r);
        assert_eq!(
            (status, reason.as_str()),
            (415, "UNSUPPORTED_MEDIA_TYPE"),
            "{content_type}"
        );
    }
    let r = send(addr, "POST /v1/users HTTP/1.1", user("eve").as_bytes()).await;
    assert_eq!(r.status, 415, "no content type: {}", r.body);
    let listed = json(&http::get(addr, "/v1/users").await.unwrap());
    assert_eq!(
        listed["users"].as_array().unwrap().len(),
        1,
        "eve was never written: {listed}"
    );

    // Bytes that are not UTF-8, wherever they are, and never replaced.
    let mut body = br#"{"email":"x@example.com","displayName":""#.to_vec();
    body.extend_from_slice(&[0xff, 0xfe]);
    body.extend_from_slice(br#""}"#);
    let r = send(
        addr,
        "POST /v1/users HTTP/1.1\r\nContent-Type: application/json",
        &body,
    )
    .await;
    let (status, reason, message) = problem(&r);
    assert_eq!(
        (status, reason.as_str()),
        (400, "INVALID_FIELD"),
        "{message}"
    );
    let r = http::get(addr, "/v1/users/%FF%FE").await.unwrap();
    let (status, reason, message) = problem(&r);
    assert_eq!((status, reason.as_str()), (400, "BAD_PATH"), "{message}");
    assert!(message.contains("%FF%FE"), "{message}");
    let r = http::get(addr, "/v1/users?pageToken=%FF").await.unwrap();
    assert_eq!(problem(&r).1, "BAD_QUERY", "{}", r.body);

    // Numbers past their type, JSON nested past any sense.
    let r = http::get(addr, "/v1/users?pageSize=99999999999")
        .await
        .unwrap();
    let body = json(&r);
    assert_eq!(
        (r.status, body["metadata"]["field"].as_str()),
        (400, Some("pageSize")),
        "{body}"
    );
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let r = http::request(addr, "POST", "/v1/users", Some(&deep))
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.len() < 2048, "the answer does not echo the input");

    // The gRPC face: a message over the limit is RESOURCE_EXHAUSTED.
    let channel = trellis::transport::connect(&addr.to_string(), &Default::default())
        .await
        .unwrap();
    let mut grpc = shop_user::api::v1::user_service_client::UserServiceClient::new(channel);
    let err = grpc
        .create_user(shop_user::api::v1::CreateUserRequest {
            user: Some(shop_user::api::v1::User {
                email: "big@example.com".into(),
                display_name: "x".repeat(100 * 1024),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(
        err.message().contains("65536-byte limit"),
        "{}",
        err.message()
    );
    let err = grpc
        .get_user(shop_user::api::v1::GetUserRequest {
            id: "x".repeat(100 * 1024),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");

    running.stop().await;
}
