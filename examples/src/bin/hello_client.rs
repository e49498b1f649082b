//! A client of the hello service through discovery and the resilient
//! client stack: it runs a hello service in process, registered in an
//! in-process registry, then finds it by name and calls it — deadline,
//! retries within a budget, a breaker per method and p2c balancing, set
//! in code here (or read from a config file's `client` section).
//!
//! ```sh
//! cargo run -p trellis-examples --bin hello-client -- ada
//! ```

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use trellis::{
    App,
    config::Config,
    registry::{Discovery, MemoryRegistry},
    service::bind,
    settings::ClientSettings,
    transport::ServerConfig,
};
use trellis_examples::{
    Hello, HelloSettings,
    api::{SayHelloRequest, greeter_client::GreeterClient},
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let name = std::env::args().nth(1).unwrap_or_else(|| "world".into());
    let registry = MemoryRegistry::new();

    // The service, on a free port, registered as "hello" once ready.
    let config = Config::<HelloSettings>::builder().build().await?;
    let server = ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        ..ServerConfig::default()
    };
    let hello = bind::<Hello>(config, "./.trellis".as_ref(), server).await?;
    let app = hello.into_app(App::builder("hello").registry(Arc::new(registry.clone())));
    let stop = CancellationToken::new();
    let running = tokio::spawn(app.run_until(stop.clone().cancelled_owned()));

    // The client: found by name, behind the default client stack.
    let mut found = registry.watch("hello").await?;
    tokio::time::timeout(
        Duration::from_secs(10),
        found.wait_for(|set| !set.is_empty()),
    )
    .await
    .map_err(|_| "hello never registered")??;
    let mut settings = ClientSettings {
        timeout: Some(Duration::from_secs(2)),
        ..ClientSettings::default()
    };
    settings.retry.attempts = 3;
    settings.balancer.policy = "p2c_ewma".into();
    let channel = trellis::resilient_client_with(&registry, "hello", &settings).await?;
    let mut greeter = GreeterClient::new(channel);
    let reply = greeter
        .say_hello(SayHelloRequest { name: name.clone() })
        .await?
        .into_inner();
    println!("{}", reply.message);

    // Validation from the proto: an empty name is refused before the handler.
    let refused = greeter
        .say_hello(SayHelloRequest {
            name: String::new(),
        })
        .await
        .err()
        .ok_or("an empty name was accepted")?;
    println!("empty name: {:?} {}", refused.code(), refused.message());

    stop.cancel();
    running.await??;
    Ok(())
}
