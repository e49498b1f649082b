//! SIGINT/SIGTERM handling shared by every app in a process.

use std::io;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};

/// Installed SIGINT and SIGTERM handlers.
///
/// Install them before serving (so a process is never up without a way to
/// stop it gracefully), then await [`ShutdownSignal::recv`].
pub struct ShutdownSignal {
    term: Signal,
    int: Signal,
}

impl ShutdownSignal {
    /// Installs the handlers.
    pub fn install() -> io::Result<Self> {
        Ok(ShutdownSignal {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on the first SIGINT or SIGTERM and arms a second: another
    /// signal after that exits the process at once (exit code 130), for an
    /// operator who does not want to wait for the drain.
    pub async fn recv(mut self) {
        let name = tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        };
        info!(
            signal = name,
            "shutting down gracefully; send another signal to exit at once"
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = self.term.recv() => {},
                _ = self.int.recv() => {},
            }
            warn!("second signal: exiting without finishing the drain");
            std::process::exit(130);
        });
    }
}

/// Installs the handlers and resolves on the first SIGINT or SIGTERM; see
/// [`ShutdownSignal::recv`].
pub async fn shutdown_signal() -> io::Result<()> {
    ShutdownSignal::install()?.recv().await;
    Ok(())
}
