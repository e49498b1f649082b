//! The user service's handler on a bare tonic server, the baseline the
//! Trellis server is measured against (`scripts/bench/rpc.sh`).
//!
//! ```sh
//! cargo run --release -p shop-user --example bare_tonic -- 127.0.0.1:9100 sqlite:///tmp/bench/user.db
//! ```
//!
//! Prints `seeded <id>` (a user to fetch), then serves until killed.

use shop_user::{
    api::v1::user_service_server::UserServiceServer, biz::Users, data::SqlUserRepo,
    service::UserServiceHandler,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args
        .next()
        .ok_or("usage: bare_tonic LISTEN_ADDR DATABASE_URL")?
        .parse()?;
    let url = args
        .next()
        .ok_or("usage: bare_tonic LISTEN_ADDR DATABASE_URL")?;
    let settings = trellis_store::DatabaseSettings {
        url: Some(trellis::config::Secret::new(url)),
        ..Default::default()
    };
    let repo = SqlUserRepo::open(&settings, "unused.db".as_ref()).await?;
    let users = Users::new(repo);
    let seeded = users
        .create(
            &format!("bench-{}@example.com", std::process::id()),
            "Bench",
        )
        .await?;
    println!("seeded {}", seeded.id);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(UserServiceServer::new(UserServiceHandler::new(users)))
        .serve(listen)
        .await?;
    Ok(())
}
