//! Shared by the CLI's integration tests: the `trellis` binary as a child process.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A `trellis` child process, killed if the test ends early.
pub struct Trellis(Child, BufReader<std::process::ChildStdout>);

impl Drop for Trellis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // One reader for the life of the child: a reader per call could
        // buffer (and lose) lines past the one it returns.
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Trellis(child, stdout)
    }

    /// Wraps a child spawned by the test itself (stdout and stderr piped).
    pub fn from_child(mut child: Child) -> Trellis {
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Trellis(child, stdout)
    }

    /// Reads stdout until a line starting with `prefix`, returns that line.
    pub fn line_starting_with(&mut self, prefix: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.1.read_line(&mut line).unwrap();
            assert!(
                n > 0,
                "trellis exited before printing {prefix:?}: {}",
                self.stderr()
            );
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    pub fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
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
