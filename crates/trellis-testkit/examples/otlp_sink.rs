//! An OTLP/gRPC trace sink for load tests: prints its endpoint, then counts
//! spans until killed, printing the total every second on stderr.
//!
//! ```sh
//! cargo run --release -p trellis-testkit --features otlp --example otlp_sink
//! ```

use std::time::Duration;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let receiver = trellis_testkit::OtlpReceiver::start_counting().await?;
    println!("{}", receiver.endpoint());
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        eprintln!("spans {}", receiver.count());
    }
}
