//! The hello handler on a bare tonic server: the baseline the Trellis
//! server (`hello`, the default stack) is measured against by
//! `scripts/bench/echo.sh`.
//!
//! ```sh
//! cargo run --release -p trellis-examples --example hello_bare_tonic -- 127.0.0.1:9200
//! ```

use trellis_examples::{Greeter, api::greeter_server::GreeterServer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen = std::env::args()
        .nth(1)
        .ok_or("usage: hello_bare_tonic LISTEN_ADDR")?
        .parse()?;
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(GreeterServer::new(Greeter::new("hello")))
        .serve(listen)
        .await?;
    Ok(())
}
