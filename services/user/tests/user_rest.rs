//! The user service's REST face, from its `google.api.http` annotations,
//! served by the real server with its default stack: the whole contract over
//! JSON, errors in the error model, the OpenAPI document, and REST requests
//! measured under their route templates.

use std::time::Duration;

use serde_json::{Value, json};
use shop_user::{UserService, UserSettings};
use tokio::sync::oneshot;
use trellis::{App, State, config::Config, transport::ServerConfig};
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
    let service = UserService::bind_with_config(config, dir.path(), None, ServerConfig::default())
        .await
        .unwrap();
    let addr = service.local_addr();
    let app = service.into_app(App::builder("user"));
    let mut lifecycle = app.lifecycle();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    tokio::time::timeout(
        Duration::from_secs(10),
        lifecycle.wait_for(|s| *s == State::Ready),
    )
    .await
    .unwrap()
    .unwrap();

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

    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
