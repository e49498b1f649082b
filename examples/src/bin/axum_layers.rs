//! A plain axum app — its own router and its own `axum::serve` — under
//! Trellis' default server stack: server spans, RED metrics labelled by
//! route template, rate limit and queue-delay shedding, from typed
//! settings; `/metrics` beside it.
//!
//! ```sh
//! cargo run -p trellis-examples --bin axum-layers -- 127.0.0.1:8091
//! curl localhost:8091/greet/ada
//! curl -s localhost:8091/metrics | grep http_server_request_duration
//! ```

use axum::{Router, extract::Path, routing::get};
use trellis::{settings::ServerSettings, stack::ServerStack};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8091".into());
    let metrics = trellis::telemetry::prometheus()?;

    let mut settings = ServerSettings::default();
    settings.rate_limit.rate = 1000; // requests per second ...
    settings.rate_limit.key = "route".into(); // ... per route template
    let stack = ServerStack::new("axum-layers", &settings);

    let app = Router::new()
        .route(
            "/greet/{name}",
            get(|Path(name): Path<String>| async move { format!("hello, {name}") }),
        )
        // route_layer: the stack sees the matched route (`/greet/{name}`),
        // so metrics and rate limits key on the template, not the path.
        .route_layer(stack)
        .merge(trellis::telemetry::metrics_router(metrics));

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    // Listen for SIGTERM/SIGINT before saying we are up: a signal that
    // arrives right after must shut down gracefully, not kill.
    let signal = trellis::ShutdownSignal::install()?;
    println!("axum-layers on {}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { signal.recv().await })
        .await?;
    Ok(())
}
