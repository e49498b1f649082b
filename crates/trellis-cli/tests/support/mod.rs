//! Shared by the CLI's integration tests: the `trellis` binary as a child process.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// A `trellis` child process, killed if the test ends early. Its stderr is
/// drained by a thread from the start (a full pipe would block the server
/// mid-log line) and kept for [`Trellis::stderr`].
pub struct Trellis(
    Child,
    BufReader<std::process::ChildStdout>,
    Arc<Mutex<String>>,
    Option<JoinHandle<()>>,
);

impl Drop for Trellis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads `stderr` to its end into a shared buffer, on a thread of its own.
fn drain(
    stderr: Option<std::process::ChildStderr>,
) -> (Arc<Mutex<String>>, Option<JoinHandle<()>>) {
    let buffer = Arc::new(Mutex::new(String::new()));
    let reader = stderr.map(|mut stderr| {
        let buffer = buffer.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n) = stderr.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&chunk[..n]);
                buffer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&text);
            }
        })
    });
    (buffer, reader)
}

impl Trellis {
    pub fn spawn(args: &[&str]) -> Trellis {
        Self::spawn_with_log(args, Some("info"))
    }

    /// Like `spawn`; `rust_log: None` leaves RUST_LOG unset so that the
    /// config's `log.level` governs. `serve` without `--admin-listen` gets a
    /// free admin port (its default, the main port + 1000, may be taken).
    pub fn spawn_with_log(args: &[&str], rust_log: Option<&str>) -> Trellis {
        let mut command = Command::new(env!("CARGO_BIN_EXE_trellis"));
        command.args(args);
        if args.first() == Some(&"serve") && !args.contains(&"--admin-listen") {
            command.args(["--admin-listen", "127.0.0.1:0"]);
        }
        command.env_remove("RUST_LOG");
        if let Some(level) = rust_log {
            command.env("RUST_LOG", level);
        }
        let child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Self::from_child(child)
    }

    /// Wraps a child spawned by the test itself (stdout and stderr piped).
    pub fn from_child(mut child: Child) -> Trellis {
        // One reader for the life of the child: a reader per call could
        // buffer (and lose) lines past the one it returns.
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (stderr, reader) = drain(child.stderr.take());
        Trellis(child, stdout, stderr, reader)
    }

    /// Reads stdout until a line starting with `prefix`, returns that line.
    pub fn line_starting_with(&mut self, prefix: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.1.read_line(&mut line).unwrap();
            if n == 0 {
                // stdout closed: the process is exiting; let it finish so
                // the whole of stderr is there to show.
                let status = self.wait(Duration::from_secs(10));
                panic!(
                    "trellis exited ({status}) before printing {prefix:?}: {}",
                    self.stderr()
                );
            }
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    /// Everything the child wrote to stderr so far; all of it once the
    /// child has exited.
    pub fn stderr(&mut self) -> String {
        if matches!(self.0.try_wait(), Ok(Some(_)))
            && let Some(reader) = self.3.take()
        {
            let _ = reader.join();
        }
        self.2.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.0.id() as i32, signal);
        }
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "trellis did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
