//! Shared by the user service's integration tests: the service bound and
//! running in this process until stopped.

use std::{net::SocketAddr, path::Path, time::Duration};

use shop_user::{UserService, UserSettings};
use tokio::sync::oneshot;
use trellis::{App, AppError, State, config::Config, transport::ServerConfig};

/// A running user service.
pub struct Running {
    /// Where it serves gRPC and HTTP.
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), AppError>>,
}

/// Binds the user service with `config` (data in `dir`), runs it, and
/// returns once it is ready.
pub async fn serve(config: Config<UserSettings>, dir: &Path) -> Running {
    let service = trellis::service::bind::<UserService>(config, dir, ServerConfig::default())
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
    .expect("ready within 10 s")
    .unwrap();
    Running { addr, stop, task }
}

impl Running {
    /// Stops it and waits for a clean exit.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}
