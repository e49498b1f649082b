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
        let stdout = BufReader::new(
            child
                .stdout
                .take()
                .expect("Program::from_child needs the child's stdout piped"),
        );
        let (stderr, reader) = drain(child.stderr.take());
        Program(child, stdout, stderr, reader)
    }

    /// Reads stdout until a line starting with `prefix`, returns that line.
    pub fn line_starting_with(&mut self, prefix: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            // A read error is the end of what the program will say.
            let n = self.1.read_line(&mut line).unwrap_or(0);
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

    /// Waits for the process to exit, up to `timeout` (a failed test past
    /// it): woken by the exit itself (a pidfd becomes readable), not by
    /// polling.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_pidfd_open, self.0.id() as libc::pid_t, 0) } as i32;
        loop {
            match self.0.try_wait() {
                Ok(Some(status)) => {
                    if fd >= 0 {
                        // SAFETY: our own descriptor, closed once.
                        unsafe { libc::close(fd) };
                    }
                    return status;
                }
                Ok(None) => {}
                Err(e) => panic!("cannot wait for the program: {e}"),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero() && fd >= 0,
                "the program did not exit within {timeout:?}{}",
                if fd < 0 {
                    " (pidfd_open refused: Linux 5.3 or later is needed)"
                } else {
                    ""
                }
            );
            let mut pollfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; an interrupted poll just loops.
            unsafe {
                libc::poll(
                    &mut pollfd,
                    1,
                    left.as_millis().min(i32::MAX as u128) as i32,
                )
            };
        }
    }
}
