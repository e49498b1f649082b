//! A program under test, as a child process: the binaries' end-to-end
//! tests (the `trellis` command, the examples) run them through this.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// A program under test as a child process, killed if the test ends
/// early. Its stderr is drained by a thread from the start (a full pipe
/// would block the program mid-log line) and kept for [`Program::stderr`];
/// its stdout is read a line at a time ([`Program::line_starting_with`]).
pub struct Program(
    Child,
    BufReader<std::process::ChildStdout>,
    Arc<Mutex<String>>,
    Option<JoinHandle<()>>,
);

impl Drop for Program {
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

impl Program {
    /// Runs `command` with stdout and stderr piped.
    pub fn spawn(mut command: Command) -> std::io::Result<Program> {
        let child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        Ok(Self::from_child(child))
    }

    /// Wraps a child spawned by the test itself (stdout and stderr piped).
    pub fn from_child(mut child: Child) -> Program {
        // One reader for the life of the child: a reader per call could
        // buffer (and lose) lines past the one it returns.
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (stderr, reader) = drain(child.stderr.take());
        Program(child, stdout, stderr, reader)
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
                    "the program exited ({status}) before printing {prefix:?}: {}",
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

    /// Sends `signal` (`libc::SIGTERM`, ...).
    pub fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.0.id() as i32, signal);
        }
    }

    /// Waits for the process to exit, up to `timeout` (a failed test past it).
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the program did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
