//! Shared by this crate's integration tests: run an app until told to stop.

use std::time::Duration;

use tokio::sync::{oneshot, watch};
use trellis::{App, AppError, State};

/// An app running in a task; `stop()` ends it and returns its result.
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), AppError>>,
    /// The app's lifecycle.
    pub lifecycle: watch::Receiver<State>,
}

impl Running {
    /// Starts `app` without waiting for it to become ready.
    pub fn spawn(app: App) -> Running {
        let lifecycle = app.lifecycle();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        Running {
            stop: Some(stop),
            task,
            lifecycle,
        }
    }

    /// Starts `app` and waits until it is Ready.
    pub async fn ready(app: App) -> Running {
        let mut running = Running::spawn(app);
        running.wait_for(State::Ready).await;
        running
    }

    /// Waits (up to 10 s) for the lifecycle to reach `state`.
    pub async fn wait_for(&mut self, state: State) {
        tokio::time::timeout(
            Duration::from_secs(10),
            self.lifecycle.wait_for(|s| *s == state),
        )
        .await
        .unwrap_or_else(|_| panic!("app did not reach {state} within 10 s"))
        .unwrap_or_else(|_| panic!("app dropped its lifecycle before {state}"));
    }

    /// Asks the app to shut down, without waiting.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Asks the app to shut down and waits for its result.
    pub async fn stop(mut self) -> Result<(), AppError> {
        self.begin_stop();
        self.join().await
    }

    /// Waits for the app to finish on its own.
    pub async fn join(self) -> Result<(), AppError> {
        self.task.await.expect("app task panicked")
    }
}
