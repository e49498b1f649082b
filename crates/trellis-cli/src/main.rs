//! `trellis`: runs the reference shop on one machine (`trellis up`) or one
//! service per process (`trellis serve SERVICE`), and inspects the registry
//! and the config centre.

mod config_cmd;
mod events_cmd;
mod logging;
mod saga_cmd;
mod services;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use trellis::{App, ShutdownSignal, registry::ServiceRegistry, transport::ServerConfig};

use trellis::telemetry::Telemetry;

use trellis::service::{ConfigSources, Definition};

use crate::logging::LogFormat;

#[derive(Parser)]
#[command(
    name = "trellis",
    version,
    about = "Trellis: a Rust microservice platform and its reference shop"
)]
struct Cli {
    /// Log format: json (default when stderr is not a terminal) or pretty.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every service of the shop in this process, each on its own port.
    Up {
        /// Where the services keep their data.
        #[arg(long, default_value = "./.trellis")]
        data_dir: PathBuf,
        /// The interface every service listens on.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Services listen on consecutive ports from here (user = base + 2);
        /// 0 gives each a free port.
        #[arg(long, default_value_t = 8080)]
        base_port: u16,
        /// Where the services' admin listeners (probes, /metrics,
        /// /debug/config) go: each service on this port plus its offset,
        /// like --base-port (default: loopback, base port + 1000; port 0
        /// gives each a free port).
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
        /// A directory with one config file (or directory) per service:
        /// user.toml, user.yaml, user/ ...
        #[arg(long)]
        config: Option<PathBuf>,
        /// Mutual TLS between every service, and TLS on the gateway, with
        /// development certificates made once under DATA_DIR/certs
        /// (`trellis certs init`).
        #[arg(long)]
        tls: bool,
        #[command(flatten)]
        engines: EnginesArg,
        #[command(flatten)]
        config_source: ConfigSourceArg,
        #[command(flatten)]
        registry: RegistryArg,
        #[command(flatten)]
        shutdown: ShutdownArgs,
    },
    /// Make a development certificate authority and a certificate per
    /// service (SPIFFE ID spiffe://trellis/SERVICE, localhost, 127.0.0.1).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Run one service in this process.
    Serve {
        /// Which service.
        #[arg(value_parser = services::names())]
        service: String,
        /// Address for gRPC and HTTP (default: the service's port on 127.0.0.1).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// The HTTP-only admin address for probes, /metrics and
        /// /debug/config, which the main port never serves (default:
        /// loopback, the main port + 1000; port 0 picks a free port).
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
        /// Where the service keeps its data (SQLite by default).
        #[arg(long, default_value = "./.trellis")]
        data_dir: PathBuf,
        /// The service's database, over `database.url` from config, e.g.
        /// postgres://user@host:5432/db.
        #[arg(long, env = "TRELLIS_DATABASE_URL")]
        database_url: Option<String>,
        #[command(flatten)]
        engines: EnginesArg,
        /// The service's config: a TOML/YAML/JSON file or a directory of them.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        config_source: ConfigSourceArg,
        #[command(flatten)]
        registry: RegistryArg,
        /// The zone published in the registry.
        #[arg(long, default_value = "")]
        zone: String,
        #[command(flatten)]
        shutdown: ShutdownArgs,
    },
    /// Run the API gateway: routes from a document (file or etcd),
    /// reloaded live, in front of discovered services and static upstreams.
    Gateway {
        /// The routes and upstreams: a TOML/YAML/JSON file or a directory of
        /// them (docs/gateway.md), watched.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where clients connect.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Probes and /metrics, never served on the main port (default:
        /// loopback, the main port + 1000).
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
        /// A remote layer for the document: etcd://host:port/prefix; the
        /// gateway reads {prefix}gateway/, watched.
        #[command(flatten)]
        config_source: ConfigSourceArg,
        #[command(flatten)]
        registry: RegistryArg,
        #[command(flatten)]
        shutdown: ShutdownArgs,
        #[command(subcommand)]
        command: Option<GatewayCommand>,
    },
    /// Read and check an audit trail (a file of hash-chained records).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Manage the auth service's signing keys (in its database, as its
    /// config names it).
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
    /// Follow the event bus, and rebuild projections from it.
    Events {
        #[command(subcommand)]
        command: events_cmd::EventsCommand,
    },
    /// Inspect distributed locks.
    Lock {
        #[command(subcommand)]
        command: LockCommand,
    },
    /// Inspect the saga coordinator's transactions.
    Saga {
        #[command(subcommand)]
        command: saga_cmd::SagaCommand,
    },
    /// Inspect a service registry.
    Registry {
        #[command(subcommand)]
        command: RegistryCommand,
    },
    /// Read, change and follow settings in the config centre (etcd).
    Config {
        #[command(subcommand)]
        command: config_cmd::ConfigCommand,
    },
    /// Write a service's OpenAPI 3.1 document (its REST routes, from the
    /// google.api.http annotations, with the proto comments).
    Openapi {
        /// Which service.
        #[arg(value_parser = services::names())]
        service: String,
        /// Write to this file instead of stdout.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum LockCommand {
    /// The locks held now: resource, holder, lease left.
    Ls {
        /// Where the locks are: etcd://host:port[,host:port][?ca_file=…],
        /// redis://host:port (rediss:// for TLS), redlock://h1:p,h2:p,h3:p.
        #[arg(long)]
        locks: String,
        /// The key prefix the services lock under.
        #[arg(long, default_value = "trellis/")]
        prefix: String,
    },
}

#[derive(Subcommand)]
enum GatewayCommand {
    /// Print a running gateway's routes and upstream endpoints (from its
    /// admin listener's /gateway).
    Routes {
        /// The gateway's admin address.
        #[arg(long, default_value = "127.0.0.1:9080")]
        admin: SocketAddr,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write ca.pem, ca-key.pem and SERVICE.pem, SERVICE-key.pem for every
    /// service of the shop and the gateway (keys mode 0600). Refuses a
    /// directory that already has a CA.
    Init {
        /// Where to write them.
        #[arg(long, default_value = "./.trellis/certs")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuthCommand {
    /// Signing keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
        /// The auth service's data dir (its SQLite database and key
        /// encryption key file, unless its config names others).
        #[arg(long, default_value = "./.trellis", global = true)]
        data_dir: PathBuf,
        /// The auth service's config: a file or a directory of them.
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        #[command(flatten)]
        config_source: ConfigSourceArg,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make the next signing key: published at once, signing after
    /// --activate-in (give verifiers time to fetch it), the old one kept
    /// published until its tokens have expired. Running instances pick it
    /// up within keys.reload_interval.
    Rotate {
        /// How long the new key is published before it signs.
        #[arg(long, default_value = "1m", value_parser = parse_duration)]
        activate_in: Duration,
    },
    /// List the keys: id, algorithm, activation, state (pending, active,
    /// retiring, retired).
    Ls,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the chain: every record in sequence, following the one before
    /// it, its hash matching its contents. Exits 1 naming the first broken
    /// line; prints the head hash to keep elsewhere.
    Verify {
        /// The trail.
        file: PathBuf,
    },
    /// Print the last records as JSON lines, and with --follow the new
    /// ones as they are appended.
    Tail {
        /// The trail.
        file: PathBuf,
        /// How many of the last records.
        #[arg(long, short = 'n', default_value_t = 20)]
        lines: usize,
        /// Keep printing records as they come.
        #[arg(long, short)]
        follow: bool,
    },
}

#[derive(Subcommand)]
enum RegistryCommand {
    /// List registered instances: endpoints, version, zone, lease time left.
    Ls {
        /// Only this service.
        service: Option<String>,
        #[command(flatten)]
        registry: RegistryArg,
    },
}

#[derive(clap::Args, Clone)]
struct RegistryArg {
    /// Where instances register and clients discover them: memory:// (this
    /// process only) or etcd://host:port[,host:port][?ttl=5s].
    #[arg(
        long = "registry",
        env = "TRELLIS_REGISTRY",
        default_value = "memory://"
    )]
    registry: String,
}

impl RegistryArg {
    async fn connect(&self) -> Result<Arc<dyn ServiceRegistry>, String> {
        trellis::registry::connect(&self.registry)
            .await
            .map_err(|e| format!("{e} (set with --registry)"))
    }
}

#[derive(clap::Args, Clone)]
struct EnginesArg {
    /// Redis for what instances share beyond one process: idempotency keys
    /// (`server.idempotency.store`), the user cache's second level and its
    /// invalidations, and the shop's locks. redis://host:port, or
    /// rediss://host:port?ca_file=… for TLS.
    #[arg(long, env = "TRELLIS_REDIS")]
    redis: Option<String>,
    /// The event bus the order, inventory and payment outboxes publish to
    /// (and the order history reads): nats://host:port (tls://… for TLS)
    /// for NATS JetStream; default the embedded log, DATA_DIR/events.db.
    #[arg(long, env = "TRELLIS_EVENTS")]
    events: Option<String>,
}

#[derive(clap::Args, Clone)]
struct ConfigSourceArg {
    /// A remote config layer: etcd://host:port[,host:port]/prefix; each
    /// service reads {prefix}/{service}/, watched.
    #[arg(long = "config-source", env = "TRELLIS_CONFIG_SOURCE")]
    config_source: Option<String>,
}

#[derive(clap::Args, Clone, Copy)]
struct ShutdownArgs {
    /// How long in-flight requests may take to finish on shutdown (e.g. 10s,
    /// 500ms); over `server.shutdown_timeout` from config (default 10s).
    #[arg(long, value_parser = parse_duration)]
    shutdown_timeout: Option<Duration>,
    /// How long to keep serving after deregistering and turning unready,
    /// before closing listeners; over `server.pre_stop_delay` (default 1s).
    #[arg(long, value_parser = parse_duration)]
    pre_stop_delay: Option<Duration>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    trellis::config::duration::parse(s)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let process = match &cli.command {
        Command::Serve { service, .. } => service.clone(),
        _ => "trellis".to_owned(),
    };
    // One id for the process: its log lines, its spans' resource and (for
    // `serve`) its registration.
    let instance = uuid::Uuid::now_v7().to_string();
    let log = match logging::init(&process, &instance, cli.log_format) {
        Ok(t) => t,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Up {
            data_dir,
            host,
            base_port,
            admin_listen,
            config,
            tls,
            engines,
            config_source,
            registry,
            shutdown,
        } => {
            let admin_base = admin_listen.unwrap_or_else(|| loopback(admin_port(base_port)));
            up(
                &log,
                data_dir,
                host,
                base_port,
                admin_base,
                config,
                tls,
                engines,
                config_source,
                registry,
                shutdown,
            )
            .await
        }
        Command::Certs {
            command: CertsCommand::Init { dir },
        } => certs_init(&dir),
        Command::Serve {
            service,
            listen,
            admin_listen,
            data_dir,
            database_url,
            engines,
            config,
            config_source,
            registry,
            zone,
            shutdown,
        } => {
            // Checked by the argument parser against the same list.
            let Some(service) = services::find(&service) else {
                eprintln!("error: unknown service {service:?}");
                return ExitCode::FAILURE;
            };
            let mut sources = services::sources_for_serve(config, config_source.config_source);
            if let Some(url) = database_url {
                sources
                    .set
                    .push(("--database-url".into(), "database.url".into(), url));
            }
            sources.set.extend(services::engine_settings(
                service,
                &engines.redis,
                &engines.events,
                &registry.registry,
            ));
            let listen = listen.unwrap_or_else(|| loopback(services::port(service, 8080)));
            let server = ServerConfig {
                listen,
                admin_listen: Some(
                    admin_listen.unwrap_or_else(|| loopback(admin_port(listen.port()))),
                ),
                ..ServerConfig::default()
            };
            serve(
                &log, service, sources, server, data_dir, registry, zone, shutdown,
            )
            .await
        }
        Command::Gateway {
            config,
            listen,
            admin_listen,
            config_source,
            registry,
            shutdown,
            command,
        } => match command {
            Some(GatewayCommand::Routes { admin }) => gateway_routes(admin).await,
            None => {
                let admin = admin_listen.unwrap_or_else(|| loopback(admin_port(listen.port())));
                gateway(config, config_source, listen, admin, registry, shutdown).await
            }
        },
        Command::Registry {
            command: RegistryCommand::Ls { service, registry },
        } => registry_ls(service.as_deref(), &registry).await,
        Command::Config { command } => config_cmd::run(command).await,
        Command::Saga { command } => saga_cmd::run(command).await,
        Command::Events { command } => events_cmd::run(command).await,
        Command::Lock {
            command: LockCommand::Ls { locks, prefix },
        } => lock_ls(&locks, &prefix).await,
        Command::Audit { command } => audit(command).await,
        Command::Auth {
            command:
                AuthCommand::Keys {
                    command,
                    data_dir,
                    config,
                    config_source,
                },
        } => auth_keys(command, &data_dir, config, config_source).await,
        Command::Openapi { service, out } => match services::find(&service) {
            Some(service) => openapi(service, out.as_deref()),
            None => Err(format!("unknown service {service:?}")),
        },
    };
    // Spans still in the batch go out before the runtime ends.
    log.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The default admin port beside a main port: 1000 above it (0 stays 0: a
/// free port; past the top of the range, a free port too).
fn admin_port(main: u16) -> u16 {
    if main == 0 {
        0
    } else {
        main.checked_add(1000).unwrap_or(0)
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    log: &Telemetry,
    service: &dyn Definition,
    sources: ConfigSources,
    server: ServerConfig,
    data_dir: PathBuf,
    registry: RegistryArg,
    zone: String,
    shutdown: ShutdownArgs,
) -> Result<(), String> {
    let (signal, registry) = prepare(&registry).await?;
    let started = service
        .start(&sources, &data_dir, server, Some(&registry))
        .await
        .map_err(|e| {
            services::explain(&e, service.name(), "--listen or --admin-listen", &data_dir)
        })?;
    log.log().follow(started.log_level.clone());
    log.follow(started.otlp.clone());
    let admin = started
        .admin
        .map(|a| format!(", admin on {a}"))
        .unwrap_or_default();
    println!(
        "{} serving gRPC and HTTP on {} (ready at http://{}/readyz){admin}",
        service.name(),
        started.addr,
        started.addr
    );
    let builder = App::builder(service.name())
        .version(env!("CARGO_PKG_VERSION"))
        .instance_id(log.instance())
        .registry(registry)
        .zone(zone);
    let app = started.into_app(builder, shutdown.shutdown_timeout, shutdown.pre_stop_delay);
    app.run_until(signal.recv())
        .await
        .map_err(|e| format!("{}: {e}", service.name()))
}

#[allow(clippy::too_many_arguments)]
async fn up(
    log: &Telemetry,
    data_dir: PathBuf,
    host: std::net::IpAddr,
    base_port: u16,
    admin_base: SocketAddr,
    config: Option<PathBuf>,
    tls: bool,
    engines: EnginesArg,
    config_source: ConfigSourceArg,
    registry: RegistryArg,
    shutdown: ShutdownArgs,
) -> Result<(), String> {
    let registry_url = registry.registry.clone();
    let (signal, registry) = prepare(&registry).await?;
    let certs = match tls {
        true => Some(services::dev_certs(&data_dir)?),
        false => None,
    };
    let mut started = Vec::new();
    for &service in services::ALL {
        let port = services::port(service, base_port);
        let admin_port = services::port(service, admin_base.port());
        let mut sources = services::sources_for_up(
            service,
            config.as_deref(),
            config_source.config_source.clone(),
        )?;
        if let Some(certs) = &certs {
            sources.set.extend(services::tls_settings(service, certs));
        }
        sources.set.extend(services::engine_settings(
            service,
            &engines.redis,
            &engines.events,
            &registry_url,
        ));
        let server = ServerConfig {
            listen: SocketAddr::new(host, port),
            admin_listen: Some(SocketAddr::new(admin_base.ip(), admin_port)),
            ..ServerConfig::default()
        };
        let s = service
            .start(&sources, &data_dir, server, Some(&registry))
            .await
            .map_err(|e| {
                services::explain(
                    &e,
                    service.name(),
                    "--base-port or --admin-listen",
                    &data_dir,
                )
            })?;
        // With several services, the last `log.level` or `otlp` change wins.
        log.log().follow(s.log_level.clone());
        log.follow(s.otlp.clone());
        started.push((service, s));
    }

    // The gateway in front: every service's REST and gRPC routes, from
    // their protos, to the services as discovered in the registry.
    let stop = CancellationToken::new();
    let auth = started
        .iter()
        .find(|(service, _)| service.name() == shop_auth::SERVICE)
        .map(|(_, s)| s.addr);
    let front = start_gateway(
        SocketAddr::new(host, base_port),
        SocketAddr::new(admin_base.ip(), admin_base.port()),
        config.as_deref(),
        Shop {
            auth,
            data_dir: &data_dir,
            certs: certs.as_deref(),
        },
        registry.clone(),
        &stop,
        shutdown.shutdown_timeout.unwrap_or(Duration::from_secs(10)),
    )
    .await?;

    println!("{:<10} {:<22} {:<22} HEALTH", "SERVICE", "ADDRESS", "ADMIN");
    println!(
        "{:<10} {:<22} {:<22} http://{}/readyz",
        "gateway", front.addr, front.admin, front.admin
    );
    for (service, s) in &started {
        let admin = s.admin.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        let scheme = if certs.is_some() { "https" } else { "http" };
        println!(
            "{:<10} {:<22} {:<22} {scheme}://{}/readyz",
            service.name(),
            s.addr,
            admin,
            s.addr
        );
    }
    if let Some(certs) = &certs {
        println!(
            "mutual TLS between the services; the gateway serves HTTPS (CA {})",
            certs.join("ca.pem").display()
        );
    }
    println!("data in {}; press Ctrl-C to stop", data_dir.display());

    let mut running = tokio::task::JoinSet::new();
    for (service, s) in started {
        let builder = App::builder(service.name())
            .version(env!("CARGO_PKG_VERSION"))
            .registry(registry.clone());
        let app = s.into_app(builder, shutdown.shutdown_timeout, shutdown.pre_stop_delay);
        let stop = stop.clone();
        running.spawn(async move { (service, app.run_until(stop.cancelled_owned()).await) });
    }
    tokio::select! {
        _ = signal.recv() => {}
        // A service that stops on its own takes the others down with it.
        Some(joined) = running.join_next() => {
            stop.cancel();
            let failure = describe_exit(joined);
            while running.join_next().await.is_some() {}
            return Err(failure.unwrap_or_else(|| "a service stopped unexpectedly".into()));
        }
    }
    front.lifecycle.send_replace(trellis::State::Draining);
    stop.cancel();
    let mut failures = Vec::new();
    while let Some(joined) = running.join_next().await {
        failures.extend(describe_exit(joined));
    }
    for task in front.tasks {
        let _ = task.await;
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

/// What `serve` and `up` need before anything starts: signal handlers
/// (so the process is never up without a graceful way down) and the registry.
/// `trellis gateway`: the gateway on `listen`, its probes and metrics on
/// `admin`, until SIGINT/SIGTERM (then a drain of `--shutdown-timeout`).
async fn gateway(
    config: Option<PathBuf>,
    config_source: ConfigSourceArg,
    listen: SocketAddr,
    admin: SocketAddr,
    registry: RegistryArg,
    shutdown: ShutdownArgs,
) -> Result<(), String> {
    use trellis::gateway::GatewayConfig;
    if config.is_none() && config_source.config_source.is_none() {
        return Err(
            "give the gateway its routes: --config FILE or --config-source etcd://HOST:PORT/PREFIX"
                .into(),
        );
    }
    let sources = ConfigSources {
        files: config.into_iter().collect(),
        etcd: config_source.config_source,
        set: Vec::new(),
    };
    let store = sources
        .load::<GatewayConfig>("gateway")
        .await
        .map_err(|e| e.to_string())?;
    let (signal, registry) = prepare(&registry).await?;
    let stop = CancellationToken::new();
    let grace = shutdown.shutdown_timeout.unwrap_or(Duration::from_secs(10));
    let front = run_gateway(store, listen, admin, registry, &stop, grace).await?;
    tracing::info!(listen = %front.addr, admin = %front.admin, "gateway serving");
    println!(
        "gateway  http://{}  (admin http://{}, {} routes)",
        front.addr, front.admin, front.routes
    );
    signal.recv().await;
    // Unready first, so a load balancer in front stops sending, then drain.
    front.lifecycle.send_replace(trellis::State::Draining);
    stop.cancel();
    for task in front.tasks {
        let _ = task.await;
    }
    Ok(())
}

/// `trellis gateway routes`: the admin view of a running gateway, as tables.
async fn gateway_routes(admin: SocketAddr) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fail = |e: std::io::Error| format!("cannot read http://{admin}/gateway: {e}");
    let mut stream = tokio::net::TcpStream::connect(admin).await.map_err(fail)?;
    stream
        .write_all(
            format!("GET /gateway HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .map_err(fail)?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .map_err(|_| format!("http://{admin}/gateway did not answer within 10 s"))?
        .map_err(fail)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "http://{admin}/gateway answered {}",
            head.lines().next().unwrap_or("nothing")
        ));
    }
    let view: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("http://{admin}/gateway: {e}"))?;
    println!("version {}", view["version"].as_str().unwrap_or("?"));
    println!("{:<28} {:>8}  TARGETS", "ROUTE", "PRIORITY");
    for route in view["routes"].as_array().into_iter().flatten() {
        let targets: Vec<String> = route["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                format!(
                    "{} ({:.0} %)",
                    t["upstream"].as_str().unwrap_or("?"),
                    t["share"].as_f64().unwrap_or(0.0) * 100.0
                )
            })
            .collect();
        println!(
            "{:<28} {:>8}  {}",
            route["name"].as_str().unwrap_or("?"),
            route["priority"],
            targets.join(", ")
        );
    }
    println!();
    println!(
        "{:<16} {:<22} {:>6} {:>9} {:>10} {:>8}",
        "UPSTREAM", "ENDPOINT", "WEIGHT", "IN FLIGHT", "LATENCY", "EJECTED"
    );
    if let Some(upstreams) = view["upstreams"].as_object() {
        for (name, upstream) in upstreams {
            let endpoints = upstream["endpoints"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if endpoints.is_empty() {
                println!("{name:<16} (no endpoints)");
            }
            for e in endpoints {
                println!(
                    "{:<16} {:<22} {:>6} {:>9} {:>8.2}ms {:>8}",
                    name,
                    e["address"].as_str().unwrap_or("?"),
                    e["weight"],
                    e["in_flight"],
                    e["latency_ms"].as_f64().unwrap_or(0.0),
                    e["ejected"]
                );
            }
        }
    }
    Ok(())
}

/// `trellis certs init`.
fn certs_init(dir: &std::path::Path) -> Result<(), String> {
    let mut names: Vec<&str> = services::ALL.iter().map(|d| d.name()).collect();
    names.push("gateway");
    let made = trellis::transport::certs::init(dir, services::TRUST_DOMAIN, &names)
        .map_err(|e| e.to_string())?;
    println!("CA          {}", made.ca.display());
    for (name, cert, key) in made.services {
        println!(
            "{name:<11} {}  {}  spiffe://{}/{name}",
            cert.display(),
            key.display(),
            services::TRUST_DOMAIN
        );
    }
    Ok(())
}

/// `trellis auth keys rotate|ls`: on the auth service's store, as its
/// config names it.
async fn auth_keys(
    command: KeysCommand,
    data_dir: &std::path::Path,
    config: Option<PathBuf>,
    config_source: ConfigSourceArg,
) -> Result<(), String> {
    let sources = services::sources_for_serve(config, config_source.config_source);
    let config = sources
        .load::<shop_auth::AuthSettings>(shop_auth::SERVICE)
        .await
        .map_err(|e| format!("auth config: {e}"))?;
    let settings = config.current().config.clone();
    match command {
        KeysCommand::Rotate { activate_in } => {
            let key = shop_auth::rotate_key(&settings, data_dir, activate_in)
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "made key {} ({}), published now, signing from {}",
                key.kid,
                key.alg,
                rfc3339(key.activate_time_ms)
            );
        }
        KeysCommand::Ls => {
            let keys = shop_auth::key_status(&settings, data_dir)
                .await
                .map_err(|e| e.to_string())?;
            println!("{:<34} {:<6} {:<24} STATE", "KID", "ALG", "SIGNS FROM");
            for k in keys {
                println!(
                    "{:<34} {:<6} {:<24} {}",
                    k.key.kid,
                    k.key.alg,
                    rfc3339(k.key.activate_time_ms),
                    k.state
                );
            }
        }
    }
    Ok(())
}

/// Milliseconds since the epoch as an RFC 3339 UTC time.
/// `trellis lock ls`.
async fn lock_ls(url: &str, prefix: &str) -> Result<(), String> {
    let locks = trellis_lock::connect(url, prefix, Default::default())
        .await
        .map_err(|e| e.to_string())?;
    let held = locks.list().await.map_err(|e| e.to_string())?;
    println!("{:<40} {:<38} {:>10}", "RESOURCE", "HOLDER", "LEASE LEFT");
    for h in held {
        let left = h
            .expires_in
            .map(|d| format!("{:.1}s", d.as_secs_f64()))
            .unwrap_or_else(|| "-".into());
        println!("{:<40} {:<38} {:>10}", h.resource, h.holder, left);
    }
    Ok(())
}

fn rfc3339(ms: i64) -> String {
    trellis::telemetry::rfc3339(ms.div_euclid(1000), (ms.rem_euclid(1000) * 1000) as u32)
}

/// `trellis audit verify|tail`.
async fn audit(command: AuditCommand) -> Result<(), String> {
    use trellis::auth::audit;
    match command {
        AuditCommand::Verify { file } => {
            let report = audit::verify(&file).map_err(|e| e.to_string())?;
            match report.broken {
                None => {
                    println!(
                        "{}: {} records, chain intact; head {}",
                        file.display(),
                        report.records,
                        report.head
                    );
                    Ok(())
                }
                Some((line, why)) => Err(format!(
                    "{}: the chain breaks at line {line}: {why} ({} records before it are intact)",
                    file.display(),
                    report.records
                )),
            }
        }
        AuditCommand::Tail {
            file,
            lines,
            follow,
        } => {
            let records = audit::read_all(&file).map_err(|e| e.to_string())?;
            let mut printed = records.last().map_or(0, |r| r.seq);
            for record in records.iter().skip(records.len().saturating_sub(lines)) {
                println!("{}", serde_json::to_string(record).unwrap_or_default());
            }
            if !follow {
                return Ok(());
            }
            // New records: read again when the file grows (it is only ever
            // appended to), until interrupted.
            let mut size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
                }
                let now = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
                if now == size {
                    continue;
                }
                size = now;
                for record in audit::read_all(&file).map_err(|e| e.to_string())? {
                    if record.seq > printed {
                        printed = record.seq;
                        println!("{}", serde_json::to_string(&record).unwrap_or_default());
                    }
                }
            }
        }
    }
}

/// A gateway serving: where, and what to wait for on the way down.
struct Front {
    addr: SocketAddr,
    admin: SocketAddr,
    routes: usize,
    lifecycle: tokio::sync::watch::Sender<trellis::State>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The gateway on `listen` and its probes and /metrics on `admin`, until
/// `stop` (then a drain of `grace`).
async fn run_gateway(
    store: trellis::config::Config<trellis::gateway::GatewayConfig>,
    listen: SocketAddr,
    admin: SocketAddr,
    registry: Arc<dyn ServiceRegistry>,
    stop: &CancellationToken,
    grace: Duration,
) -> Result<Front, String> {
    let gateway = trellis::gateway::Gateway::new(store, Some(registry))
        .await
        .map_err(|e| e.to_string())?;
    let prometheus = trellis::telemetry::prometheus().map_err(|e| e.to_string())?;
    let (lifecycle, probes) = tokio::sync::watch::channel(trellis::State::Ready);
    let admin_router = trellis::telemetry::metrics_router(prometheus)
        .merge(trellis::transport::probe_router(probes))
        .merge(gateway.admin_router());
    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("the gateway cannot listen on {addr}: {e}"))
    };
    let listener = bind(listen).await?;
    let admin_listener = bind(admin).await?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let admin = admin_listener.local_addr().map_err(|e| e.to_string())?;
    let limits = trellis::transport::Limits::default();
    let routes = gateway.routes();
    let main = {
        let drain = trellis::core::Drain::new(stop.clone(), grace);
        let limits = limits.clone();
        tokio::spawn(async move { gateway.serve(listener, &limits, drain).await })
    };
    let admin_task = {
        let drain = trellis::core::Drain::new(stop.clone(), grace);
        tokio::spawn(async move {
            trellis::transport::serve::serve(
                admin_listener,
                move |_| admin_router.clone(),
                &limits,
                drain,
            )
            .await
        })
    };
    Ok(Front {
        addr,
        admin,
        routes,
        lifecycle,
        tasks: vec![main, admin_task],
    })
}

/// What the gateway of `up` needs to know of the shop behind it.
struct Shop<'a> {
    /// The auth service, whose key set verifies tokens.
    auth: Option<SocketAddr>,
    /// Where the gateway's audit trail goes.
    data_dir: &'a std::path::Path,
    /// With `--tls`: the development certificates (the gateway serves TLS
    /// and calls the services with its client certificate).
    certs: Option<&'a std::path::Path>,
}

/// For `up`: the gateway with every service's generated routes — those of
/// every service but `auth` requiring a token its key set verifies — and a
/// `gateway.toml|yaml|yml|json` (or `gateway/`) from `--config` adding
/// routes of its own or changing these.
async fn start_gateway(
    listen: SocketAddr,
    admin: SocketAddr,
    config_dir: Option<&std::path::Path>,
    shop: Shop<'_>,
    registry: Arc<dyn ServiceRegistry>,
    stop: &CancellationToken,
    grace: Duration,
) -> Result<Front, String> {
    use trellis::gateway::{GatewayConfig, document_source, routes_for};
    let mut document = GatewayConfig::default();
    for &service in services::ALL {
        if services::INTERNAL.contains(&service.name()) {
            continue;
        }
        let (descriptors, names) = service.descriptors();
        let mut part =
            routes_for(service.name(), &[descriptors], names).map_err(|e| e.to_string())?;
        if shop.auth.is_some() && !services::PUBLIC.contains(&service.name()) {
            for route in part.routes.values_mut() {
                route.jwt = Some(Default::default());
            }
        }
        document.upstreams.extend(part.upstreams);
        document.routes.extend(part.routes);
    }
    let identity = shop.certs.map(|dir| {
        let (cert, key) = trellis::transport::certs::DevCerts::paths(dir, "gateway");
        (dir.join("ca.pem"), cert, key)
    });
    if let Some((ca, cert, key)) = &identity {
        for upstream in document.upstreams.values_mut() {
            upstream.tls = Some(trellis::gateway::config::UpstreamTlsConfig {
                ca_file: Some(ca.clone()),
                server_name: None,
                cert_file: Some(cert.clone()),
                key_file: Some(key.clone()),
            });
        }
        document.tls = Some(trellis::gateway::config::TlsConfig {
            cert_file: cert.clone(),
            key_file: key.clone(),
        });
    }
    if let Some(auth) = shop.auth {
        let scheme = if identity.is_some() { "https" } else { "http" };
        document.jwt = Some(trellis::gateway::JwtConfig {
            jwks_url: Some(format!("{scheme}://{auth}/.well-known/jwks.json")),
            ca_file: identity.as_ref().map(|i| i.0.clone()),
            cert_file: identity.as_ref().map(|i| i.1.clone()),
            key_file: identity.as_ref().map(|i| i.2.clone()),
            issuer: "trellis".into(),
            audience: vec!["shop".into()],
            // The order service knows its customer by this header.
            claims_to_headers: [(
                "sub".to_owned(),
                shop_order::service::USER_HEADER.to_owned(),
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        });
        document.audit = Some(trellis::auth::audit::AuditSettings {
            file: shop.data_dir.join("gateway-audit.jsonl"),
            max_refusals_per_second: 100,
        });
    }
    let mut builder = trellis::config::Config::<GatewayConfig>::builder();
    if let Some(dir) = config_dir {
        for name in [
            "gateway.toml",
            "gateway.yaml",
            "gateway.yml",
            "gateway.json",
            "gateway",
        ] {
            let path = dir.join(name);
            if path.exists() {
                builder = builder.file(path);
            }
        }
    }
    let store = builder
        .source(
            document_source("generated from the services' protos", &document)
                .map_err(|e| e.to_string())?,
        )
        .build()
        .await
        .map_err(|e| format!("gateway: {e}"))?;
    run_gateway(store, listen, admin, registry, stop, grace).await
}

async fn prepare(
    registry: &RegistryArg,
) -> Result<(ShutdownSignal, Arc<dyn ServiceRegistry>), String> {
    let signal =
        ShutdownSignal::install().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    Ok((signal, registry.connect().await?))
}

fn openapi(service: &dyn Definition, out: Option<&std::path::Path>) -> Result<(), String> {
    let (descriptors, names) = service.descriptors();
    let transcoder =
        trellis::transcode::Transcoder::new(&[descriptors], names).map_err(|e| e.to_string())?;
    let doc = trellis::transcode::openapi(&transcoder);
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    match out {
        Some(path) => std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display())),
        None => {
            println!("{text}");
            Ok(())
        }
    }
}

async fn registry_ls(service: Option<&str>, registry: &RegistryArg) -> Result<(), String> {
    let registry = registry.connect().await?;
    let listed = registry
        .list(service)
        .await
        .map_err(|e| format!("{e} (set with --registry)"))?;
    println!(
        "{:<10} {:<38} {:<8} {:<6} {:<6} ENDPOINTS",
        "SERVICE", "INSTANCE", "VERSION", "ZONE", "TTL"
    );
    for l in &listed {
        let i = &l.instance;
        let endpoints: Vec<String> = i
            .endpoints
            .iter()
            .map(|(p, a)| format!("{p}={a}"))
            .collect();
        let ttl = l
            .ttl_left
            .map(|t| format!("{}s", t.as_secs()))
            .unwrap_or_else(|| "-".into());
        let or_dash = |s: &str| {
            if s.is_empty() {
                "-".to_owned()
            } else {
                s.to_owned()
            }
        };
        println!(
            "{:<10} {:<38} {:<8} {:<6} {:<6} {}",
            i.service,
            i.id,
            or_dash(&i.version),
            or_dash(&i.zone),
            ttl,
            endpoints.join(" ")
        );
    }
    if listed.is_empty() {
        eprintln!(
            "no instances registered{}",
            service.map(|s| format!(" for {s}")).unwrap_or_default()
        );
    }
    Ok(())
}

fn describe_exit(
    joined: Result<
        (&'static dyn Definition, Result<(), trellis::AppError>),
        tokio::task::JoinError,
    >,
) -> Option<String> {
    match joined {
        Ok((_, Ok(()))) => None,
        Ok((service, Err(e))) => Some(format!("{}: {e}", service.name())),
        Err(e) => Some(format!("a service task failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn admin_ports_sit_1000_above_and_zero_stays_free() {
        assert_eq!(admin_port(8082), 9082);
        assert_eq!(admin_port(0), 0);
        assert_eq!(admin_port(65000), 0);
    }

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
