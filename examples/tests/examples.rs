//! Every example program, run as its users would run it: real processes,
//! real ports, real signals.

use std::{net::SocketAddr, process::Command, time::Duration};

use trellis_testkit::{Program, http};

/// `bin ARGS` with its stdout and stderr piped.
fn spawn(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Program {
    let mut command = Command::new(bin);
    command.args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        command.env(k, v);
    }
    Program::spawn(command).expect("the example starts")
}

/// The address after `marker` in a line like `hello on 127.0.0.1:1234 (...)`.
fn address_after(line: &str, marker: &str) -> SocketAddr {
    let rest = line
        .split_once(marker)
        .unwrap_or_else(|| panic!("no {marker:?} in {line:?}"))
        .1;
    let word = rest.split_whitespace().next().unwrap_or_default();
    word.trim_matches(|c| c == '(' || c == ')')
        .parse()
        .unwrap_or_else(|e| panic!("{word:?} in {line:?}: {e}"))
}

fn stop(mut program: Program) {
    program.signal(libc::SIGTERM);
    let status = program.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", program.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_serves_grpc_and_rest_from_one_proto_and_follows_config() {
    let mut hello = spawn(
        env!("CARGO_BIN_EXE_hello"),
        &["127.0.0.1:0"],
        &[("TRELLIS_GREETING", "hi")],
    );
    let line = hello.line_starting_with("hello on ");
    let addr = address_after(&line, "hello on ");
    let admin = address_after(&line, "(admin ");

    // REST, from the google.api.http annotation; the greeting from the environment.
    let r = http::get(addr, "/v1/hello/ada").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["message"], "hi, ada");

    // gRPC on the same port, validated by the proto's REQUIRED.
    let channel = trellis::transport::connect(&addr.to_string(), &Default::default())
        .await
        .unwrap();
    let mut greeter = trellis_examples::api::greeter_client::GreeterClient::new(channel);
    let reply = greeter
        .say_hello(trellis_examples::api::SayHelloRequest {
            name: "grace".into(),
        })
        .await
        .unwrap();
    assert_eq!(reply.get_ref().message, "hi, grace");
    let refused = greeter
        .say_hello(trellis_examples::api::SayHelloRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    // The admin listener: probes and metrics labelled by the RPC.
    assert_eq!(http::get(admin, "/readyz").await.unwrap().status, 200);
    let metrics = http::get(admin, "/metrics").await.unwrap().body;
    assert!(
        metrics.contains("http_route=\"/v1/hello/{name}\""),
        "no REST route in the metrics:\n{metrics}"
    );
    // Operator routes are not on the main port.
    assert_eq!(http::get(addr, "/metrics").await.unwrap().status, 404);

    stop(hello);
}

#[test]
fn hello_client_finds_the_service_and_calls_it_through_the_resilient_stack() {
    let mut client = spawn(env!("CARGO_BIN_EXE_hello-client"), &["ada"], &[]);
    let greeting = client.line_starting_with("hello, ");
    assert_eq!(greeting.trim(), "hello, ada");
    let refused = client.line_starting_with("empty name: ");
    assert!(refused.contains("InvalidArgument"), "{refused}");
    let status = client.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", client.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_axum_app_under_the_trellis_stack() {
    let mut app = spawn(env!("CARGO_BIN_EXE_axum-layers"), &["127.0.0.1:0"], &[]);
    let addr = address_after(
        &app.line_starting_with("axum-layers on "),
        "axum-layers on ",
    );

    let r = http::get(addr, "/greet/ada").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "hello, ada"));
    let metrics = http::get(addr, "/metrics").await.unwrap().body;
    // Labelled by the route template the router matched, not the path.
    assert!(
        metrics.contains("http_route=\"/greet/{name}\""),
        "no route template in the metrics:\n{metrics}"
    );
    assert!(!metrics.contains("/greet/ada"), "a raw path became a label");

    stop(app);
}
