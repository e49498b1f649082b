//! Prometheus scrapes a running `trellis serve user`: the request counts
//! arrive, and the exposition passes `promtool check metrics`.

mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use shop_user::api::v1::{
    GetUserRequest, ListUsersRequest, user_service_client::UserServiceClient,
};
use trellis_testkit::{Prometheus, http};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_red_metrics_that_promtool_accepts() {
    let data = tempfile::tempdir().unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", trellis_testkit::free_port().unwrap())
        .parse()
        .unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", trellis_testkit::free_port().unwrap())
        .parse()
        .unwrap();
    let mut server = support::spawn(&[
        "serve",
        "user",
        "--listen",
        &listen.to_string(),
        "--admin-listen",
        &admin.to_string(),
        "--data-dir",
        data.path().to_str().unwrap(),
    ]);
    server.line_starting_with("user serving");
    let prometheus = Prometheus::start(&[admin]).unwrap();

    let channel = trellis::transport::connect(&listen.to_string(), &Default::default())
        .await
        .unwrap();
    let mut users = UserServiceClient::new(channel);
    for _ in 0..7 {
        users
            .list_users(ListUsersRequest {
                page_size: 1,
                page_token: String::new(),
            })
            .await
            .unwrap();
    }
    for _ in 0..3 {
        let err = users
            .get_user(GetUserRequest {
                id: "not-a-uuid".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    let exposition = http::get(admin, "/metrics").await.unwrap();
    assert_eq!(exposition.status, 200);
    assert!(
        exposition
            .header("content-type")
            .unwrap()
            .starts_with("text/plain"),
        "{:?}",
        exposition.headers
    );
    let text = exposition.body;
    assert!(
        text.lines()
            .any(|l| l.starts_with("rpc_server_duration_seconds_count{")
                && l.contains("rpc_method=\"ListUsers\"")
                && l.contains("rpc_grpc_status_code=\"0\"")
                && l.ends_with(" 7")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("rpc_server_duration_seconds_count{")
                && l.contains("rpc_method=\"GetUser\"")
                && l.contains("rpc_grpc_status_code=\"3\"")
                && l.ends_with(" 3")),
        "{text}"
    );
    assert_eq!(
        http::get(listen, "/metrics").await.unwrap().status,
        404,
        "metrics stay off the public port"
    );
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"));
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(value > 0.0, "{line}");
    }
    assert!(
        text.contains(&format!(
            "trellis_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    assert!(
        text.contains("registry_events_total{event=\"registered\"} 1"),
        "{text}"
    );
    Prometheus::check_metrics(&text)
        .unwrap_or_else(|complaints| panic!("promtool: {complaints}\n{text}"));

    // Prometheus itself sees the counts.
    let query = "/api/v1/query?query=sum(rpc_server_duration_seconds_count%7Brpc_method%3D%22ListUsers%22%7D)";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let res = http::get(prometheus.addr(), query).await.unwrap();
        if res.body.contains("\"7\"]") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw 7 ListUsers calls: {}",
            res.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    server.signal(libc::SIGTERM);
    assert_eq!(server.wait(Duration::from_secs(15)).code(), Some(0));
}

/// Series at /metrics: lines that are not comments.
fn series(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_random_requests_add_a_bounded_number_of_series() {
    let data = tempfile::tempdir().unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", trellis_testkit::free_port().unwrap())
        .parse()
        .unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", trellis_testkit::free_port().unwrap())
        .parse()
        .unwrap();
    let mut server = support::spawn(&[
        "serve",
        "user",
        "--listen",
        &listen.to_string(),
        "--admin-listen",
        &admin.to_string(),
        "--data-dir",
        data.path().to_str().unwrap(),
    ]);
    server.line_starting_with("user serving");
    // One of each kind first, so the series they create are counted before.
    let warm = http::get(listen, "/v1/users/warm").await.unwrap();
    assert_eq!(warm.status, 400, "{}", warm.body);
    let before = series(&http::get(admin, "/metrics").await.unwrap().body);

    let channel = trellis::transport::connect(&listen.to_string(), &Default::default())
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    for i in 0..1000u32 {
        match i % 4 {
            // A random id on a real route: its template, not the path.
            0 => {
                let res = http::get(listen, &format!("/v1/users/{i}x")).await.unwrap();
                assert_eq!(res.status, 400);
            }
            // A made-up HTTP method.
            1 => {
                let res = http::request(listen, &format!("BREW{i}"), "/v1/users", None)
                    .await
                    .unwrap();
                assert_eq!(res.status, 405, "{}", res.body);
            }
            // A path no route matches.
            2 => {
                let res = http::get(listen, &format!("/nowhere/{i}")).await.unwrap();
                assert_eq!(res.status, 404);
            }
            // A gRPC method the service does not have.
            _ => {
                grpc.ready().await.unwrap();
                let path: ::http::uri::PathAndQuery =
                    format!("/shop.user.v1.UserService/Made{i}Up")
                        .parse()
                        .unwrap();
                let codec =
                    tonic_prost::ProstCodec::<ListUsersRequest, ListUsersRequest>::default();
                let err = grpc
                    .unary(
                        tonic::Request::new(ListUsersRequest::default()),
                        path,
                        codec,
                    )
                    .await
                    .unwrap_err();
                assert_eq!(err.code(), tonic::Code::Unimplemented);
            }
        }
    }
    let text = http::get(admin, "/metrics").await.unwrap().body;
    let added = series(&text) - before;
    eprintln!("1000 random requests added {added} series ({before} before)");
    assert!(added < 80, "{added} new series:\n{text}");
    for leaked in ["Made1Up", "BREW1", "/nowhere/2", "/v1/users/4x"] {
        assert!(!text.contains(leaked), "{leaked} became a label:\n{text}");
    }
    assert!(
        text.contains(
            "rpc_service=\"_OTHER\",rpc_method=\"_OTHER\",rpc_grpc_status_code=\"12\"} 250"
        ),
        "{text}"
    );
    assert!(text.contains("http_request_method=\"_OTHER\""), "{text}");
    assert!(text.contains("http_route=\"/v1/users/{id}\""), "{text}");
    server.signal(libc::SIGTERM);
    server.wait(Duration::from_secs(15));
}
