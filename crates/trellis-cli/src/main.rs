//! `trellis`: runs the reference shop on one machine (`trellis up`) or one
//! service per process (`trellis serve SERVICE`).

mod services;

use std::{io::IsTerminal, net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use trellis::{
    App, ShutdownSignal,
    registry::ServiceRegistry,
};

use crate::services::{Service, StartError};

#[derive(Parser)]
#[command(name = "trellis", version, about = "Trellis: a Rust microservice platform and its reference shop")]
struct Cli {
    /// Log format: json (default when stderr is not a terminal) or pretty.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Auto,
    Json,
    Pretty,
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
        #[command(flatten)]
        registry: RegistryArg,
        #[command(flatten)]
        shutdown: ShutdownArgs,
    },
    /// Run one service in this process.
    Serve {
        /// Which service.
        #[arg(value_enum)]
        service: Service,
        /// Address for gRPC and HTTP (default: the service's port on 127.0.0.1).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// An optional HTTP-only admin address for probes.
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
        /// Where the service keeps its data (SQLite by default).
        #[arg(long, default_value = "./.trellis")]
        data_dir: PathBuf,
        /// The service's database instead of SQLite under --data-dir, e.g.
        /// postgres://user@host:5432/db.
        #[arg(long, env = "TRELLIS_DATABASE_URL")]
        database_url: Option<String>,
        #[command(flatten)]
        registry: RegistryArg,
        /// The zone published in the registry.
        #[arg(long, default_value = "")]
        zone: String,
        #[command(flatten)]
        shutdown: ShutdownArgs,
    },
    /// Inspect a service registry.
    Registry {
        #[command(subcommand)]
        command: RegistryCommand,
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
    #[arg(long = "registry", env = "TRELLIS_REGISTRY", default_value = "memory://")]
    url: String,
}

impl RegistryArg {
    async fn connect(&self) -> Result<Arc<dyn ServiceRegistry>, String> {
        trellis::registry::connect(&self.url).await.map_err(|e| format!("{e} (set with --registry)"))
    }
}

#[derive(clap::Args, Clone, Copy)]
struct ShutdownArgs {
    /// How long in-flight requests may take to finish on shutdown (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
    /// How long to keep serving after deregistering and turning unready,
    /// before closing listeners (default: 1s, enough for clients to see the
    /// deregistration).
    #[arg(long, value_parser = parse_duration)]
    pre_stop_delay: Option<Duration>,
}

impl ShutdownArgs {
    fn apply(self, app: trellis::AppBuilder) -> trellis::AppBuilder {
        let app = app.shutdown_timeout(self.shutdown_timeout);
        match self.pre_stop_delay {
            Some(delay) => app.pre_stop_delay(delay),
            None => app,
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a duration like 10s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?} has an unknown unit {unit:?}; use ms, s or m")),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Up { data_dir, host, base_port, registry, shutdown } => {
            up(data_dir, host, base_port, registry, shutdown).await
        }
        Command::Serve { service, listen, admin_listen, data_dir, database_url, registry, zone, shutdown } => {
            serve(service, listen, admin_listen, data_dir, database_url, registry, zone, shutdown).await
        }
        Command::Registry { command: RegistryCommand::Ls { service, registry } } => {
            registry_ls(service.as_deref(), &registry).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    service: Service,
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    data_dir: PathBuf,
    database_url: Option<String>,
    registry: RegistryArg,
    zone: String,
    shutdown: ShutdownArgs,
) -> Result<(), String> {
    let signal = ShutdownSignal::install().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let registry = registry.connect().await?;
    let listen = listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], service.port(8080))));
    let started = service
        .start(&data_dir, listen, admin_listen, database_url)
        .await
        .map_err(|e| e.explain(service, "--listen"))?;
    println!("{} serving gRPC and HTTP on {} (ready at http://{}/readyz)", service.name(), started.addr, started.addr);
    let builder = App::builder(service.name()).version(env!("CARGO_PKG_VERSION")).registry(registry).zone(zone);
    let app = started.into_app(shutdown.apply(builder));
    app.run_until(signal.recv()).await.map_err(|e| format!("{}: {e}", service.name()))
}

async fn up(
    data_dir: PathBuf,
    host: std::net::IpAddr,
    base_port: u16,
    registry: RegistryArg,
    shutdown: ShutdownArgs,
) -> Result<(), String> {
    let signal = ShutdownSignal::install().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let registry = registry.connect().await?;
    let mut started = Vec::new();
    for service in Service::ALL {
        let port = if base_port == 0 { 0 } else { service.port(base_port) };
        let s = service
            .start(&data_dir, SocketAddr::new(host, port), None, None)
            .await
            .map_err(|e: StartError| e.explain(service, "--base-port"))?;
        started.push((service, s));
    }

    println!("{:<10} {:<22} HEALTH", "SERVICE", "ADDRESS");
    for (service, s) in &started {
        println!("{:<10} {:<22} http://{}/readyz", service.name(), s.addr, s.addr);
    }
    println!("data in {}; press Ctrl-C to stop", data_dir.display());

    let stop = CancellationToken::new();
    let mut running = tokio::task::JoinSet::new();
    for (service, s) in started {
        let builder = App::builder(service.name()).version(env!("CARGO_PKG_VERSION")).registry(registry.clone());
        let app = s.into_app(shutdown.apply(builder));
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
    stop.cancel();
    let mut failures = Vec::new();
    while let Some(joined) = running.join_next().await {
        failures.extend(describe_exit(joined));
    }
    if failures.is_empty() { Ok(()) } else { Err(failures.join("; ")) }
}

async fn registry_ls(service: Option<&str>, registry: &RegistryArg) -> Result<(), String> {
    let registry = registry.connect().await?;
    let listed = registry.list(service).await.map_err(|e| format!("{e} (set with --registry)"))?;
    println!("{:<10} {:<38} {:<8} {:<6} {:<6} ENDPOINTS", "SERVICE", "INSTANCE", "VERSION", "ZONE", "TTL");
    for l in &listed {
        let i = &l.instance;
        let endpoints: Vec<String> = i.endpoints.iter().map(|(p, a)| format!("{p}={a}")).collect();
        let ttl = l.ttl_left.map(|t| format!("{}s", t.as_secs())).unwrap_or_else(|| "-".into());
        let or_dash = |s: &str| if s.is_empty() { "-".to_owned() } else { s.to_owned() };
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
        eprintln!("no instances registered{}", service.map(|s| format!(" for {s}")).unwrap_or_default());
    }
    Ok(())
}

fn describe_exit(
    joined: Result<(Service, Result<(), trellis::AppError>), tokio::task::JoinError>,
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
        assert!(parse_duration("5h").is_err());
    }

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
