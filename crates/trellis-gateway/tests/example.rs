//! The example document in `examples/gateway/gateway.toml`, which
//! docs/gateway.md walks through, loads and routes as its comments say.

use http::{HeaderMap, HeaderValue, Method};
use trellis_config::Config;
use trellis_gateway::GatewayConfig;

#[tokio::test]
async fn the_example_document_routes_as_documented() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/gateway/gateway.toml");
    let config = Config::<GatewayConfig>::builder()
        .file(&path)
        .watch(false)
        .build()
        .await
        .expect("the example document loads and validates");
    let doc = config.current().config.clone();
    let route = |method: Method, host: Option<&str>, path: &str, headers: &[(&str, &str)]| {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                HeaderValue::from_str(v).expect("header value"),
            );
        }
        doc.route_for(&method, host, path, &map)
            .expect("the document compiles")
    };
    let some = |s: &str| Some(s.to_owned());
    assert_eq!(
        route(Method::GET, None, "/v1/users/42", &[]),
        some("get_user")
    );
    assert_eq!(
        route(Method::DELETE, None, "/v1/users/42", &[]),
        some("users")
    );
    assert_eq!(route(Method::POST, None, "/v1/users", &[]), some("users"));
    assert_eq!(
        route(Method::GET, None, "/v1/users/42", &[("x-canary", "always")]),
        some("users_canary")
    );
    assert_eq!(
        route(Method::GET, None, "/v1/users/me?debug=1", &[]),
        some("debug")
    );
    assert_eq!(
        route(Method::GET, None, "/v1/users/me", &[]),
        some("get_user")
    );
    assert_eq!(
        route(
            Method::GET,
            Some("legacy.example.com"),
            "/old/orders/7",
            &[]
        ),
        some("legacy")
    );
    assert_eq!(
        route(Method::GET, Some("eu.legacy.example.com:8080"), "/old", &[]),
        some("legacy")
    );
    assert_eq!(
        route(Method::GET, Some("other.example.com"), "/old/orders/7", &[]),
        None
    );
    assert_eq!(
        route(
            Method::POST,
            None,
            "/shop.search.v1.SearchService/Search",
            &[]
        ),
        some("search")
    );
    assert_eq!(route(Method::GET, None, "/nothing/here", &[]), None);
}
