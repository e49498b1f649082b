//! One engine process: spawn, ready-check, log, kill on drop.

use std::{
    fmt,
    fs::File,
    io::Read,
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Why an engine could not be started.
pub enum TestkitError {
    /// The engine's binary is not installed.
    NotInstalled {
        /// The binary looked for.
        binary: &'static str,
        /// The command that installs it.
        install: &'static str,
    },
    /// The engine started but did not become ready, or exited.
    Start {
        /// Which engine.
        engine: &'static str,
        /// What went wrong.
        reason: String,
        /// The tail of its log.
        log: String,
    },
    /// Preparing the engine's directory or config failed.
    Io {
        /// What we were doing.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

impl fmt::Display for TestkitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TestkitError::NotInstalled { binary, install } => write!(
                f,
                "`{binary}` is not installed; install it with `{install}` (or run scripts/test, which installs every engine)"
            ),
            TestkitError::Start {
                engine,
                reason,
                log,
            } => {
                write!(
                    f,
                    "{engine} did not start: {reason}\n--- {engine} log (tail) ---\n{log}"
                )
            }
            TestkitError::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

// `unwrap()` in a test prints Debug; make that the readable message.
impl fmt::Debug for TestkitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for TestkitError {}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestkitError {
    let context = context.into();
    move |source| TestkitError::Io { context, source }
}

/// Finds `binary` on `PATH` or in the places Debian and pip put engines
/// that are not on `PATH` (PostgreSQL's versioned bin directory).
pub fn find_binary(binary: &'static str, install: &'static str) -> Result<PathBuf, TestkitError> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(
        [
            "/usr/local/bin",
            "/usr/bin",
            "/usr/sbin",
            "/root/.local/bin",
        ]
        .map(PathBuf::from),
    );
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        dirs.extend(versions.into_iter().rev());
    }
    dirs.into_iter()
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
        .ok_or(TestkitError::NotInstalled { binary, install })
}

/// A free TCP port on 127.0.0.1 (bound and released; a small race remains,
/// which engine starts absorb by retrying).
pub fn free_port() -> Result<u16, TestkitError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("cannot find a free port"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(io_err("cannot find a free port"))
}

/// A running engine process. Killed with its process group on drop.
pub struct Engine {
    name: &'static str,
    child: Child,
    log_path: PathBuf,
    // Dropped after the process is killed (field order).
    dir: tempfile::TempDir,
}

impl Engine {
    /// Spawns `command` as a new process group with its output in a log file
    /// under `dir`. The process also dies if the test process dies.
    pub(crate) fn spawn(
        name: &'static str,
        command: Command,
        dir: tempfile::TempDir,
    ) -> Result<Engine, TestkitError> {
        let log_path = dir.path().join(format!("{name}.log"));
        let child = Self::start_child(name, command, &log_path)?;
        Ok(Engine {
            name,
            child,
            log_path,
            dir,
        })
    }

    /// Kills the running process and starts `command` in its place (same
    /// temp dir, same log), for restart tests.
    pub(crate) fn respawn(&mut self, command: Command) -> Result<(), TestkitError> {
        self.kill();
        self.child = Self::start_child(self.name, command, &self.log_path)?;
        Ok(())
    }

    fn start_child(
        name: &'static str,
        mut command: Command,
        log_path: &Path,
    ) -> Result<Child, TestkitError> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(io_err(format!("cannot open {}", log_path.display())))?;
        let log_err = log.try_clone().map_err(io_err("cannot clone log handle"))?;
        command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
            .spawn()
            .map_err(io_err(format!("cannot spawn {name}")))
    }

    /// The engine's temp dir (data, config, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The engine's OS process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the engine has logged so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Polls `ready` until it returns true, the process exits, or `timeout`.
    pub(crate) fn wait_ready(
        &mut self,
        timeout: Duration,
        mut ready: impl FnMut(&Engine) -> bool,
    ) -> Result<(), TestkitError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(TestkitError::Start {
                    engine: self.name,
                    reason: format!("exited with {status}"),
                    log: self.log_tail(),
                });
            }
            if ready(self) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(TestkitError::Start {
                    engine: self.name,
                    reason: format!("not ready after {timeout:?}"),
                    log: self.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Sends `signal` to the engine's process group.
    pub fn signal(&self, signal: i32) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: plain syscall; a stale group id only yields ESRCH.
            unsafe {
                libc::kill(-pid, signal);
            }
        }
    }

    /// Waits up to `timeout` for the process to exit by itself; whether it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the engine now (SIGKILL to its process group) and reaps it.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {} log ({}) ---\n{}",
                self.name,
                self.log_path.display(),
                self.log_tail()
            );
        }
        self.kill();
    }
}

/// Whether something accepts TCP connections at `addr`.
pub(crate) fn tcp_open(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// A blocking HTTP GET returning (status, body), for ready checks.
pub(crate) fn http_get_blocking(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Retries a start a few times: a free port can be taken between our probe
/// and the engine's bind.
pub(crate) fn with_retries<T>(
    mut start: impl FnMut() -> Result<T, TestkitError>,
) -> Result<T, TestkitError> {
    let mut last = None;
    for _ in 0..3 {
        match start() {
            Ok(engine) => return Ok(engine),
            Err(err @ TestkitError::NotInstalled { .. }) => return Err(err),
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or(TestkitError::Start {
        engine: "engine",
        reason: "no attempt made".into(),
        log: String::new(),
    }))
}

pub(crate) fn temp_dir(engine: &str) -> Result<tempfile::TempDir, TestkitError> {
    tempfile::Builder::new()
        .prefix(&format!("trellis-{engine}-"))
        .tempdir()
        .map_err(io_err(format!("cannot create a temp dir for {engine}")))
}
