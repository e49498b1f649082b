//! A Trellis service in one file: `hello.v1.Greeter` over gRPC and, from
//! the same proto, `GET /v1/hello/{name}` over HTTP, on one port.
//!
//! ```sh
//! cargo run -p trellis-examples --bin hello -- 127.0.0.1:8090
//! curl localhost:8090/v1/hello/ada          # {"message":"hello, ada"}
//! curl localhost:9090/metrics               # the admin listener
//! TRELLIS_GREETING=hi cargo run -p trellis-examples --bin hello
//! ```
//!
//! SIGTERM or Ctrl-C drains it and exits 0.

use std::net::SocketAddr;

use trellis::{App, config::Config, service::bind, transport::ServerConfig};
use trellis_examples::{Hello, HelloSettings};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen: SocketAddr = match std::env::args().nth(1) {
        Some(arg) => arg.parse().map_err(|e| format!("LISTEN {arg:?}: {e}"))?,
        None => "127.0.0.1:8090".parse()?,
    };
    // Probes, /metrics and /debug/config on loopback, 1000 above (or a
    // free port when the main one is).
    let admin = SocketAddr::from(([127, 0, 0, 1], listen.port().checked_add(1000).unwrap_or(0)));
    let admin = if listen.port() == 0 {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        admin
    };

    // Defaults < hello.toml (if present) < TRELLIS_* variables.
    let mut config = Config::<HelloSettings>::builder().env("TRELLIS");
    if std::path::Path::new("hello.toml").is_file() {
        config = config.file("hello.toml");
    }
    let config = config.build().await?;

    let server = ServerConfig {
        listen,
        admin_listen: Some(admin),
        ..ServerConfig::default()
    };
    let hello = bind::<Hello>(config, "./.trellis".as_ref(), server).await?;
    println!(
        "hello on {} (admin {})",
        hello.local_addr(),
        hello
            .admin_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    hello.into_app(App::builder("hello")).run().await?;
    Ok(())
}
