//! The coordinator as a Trellis service — `trellis serve saga`, and one of
//! the services `trellis up` runs: the `trellis.saga.v1.SagaService` API
//! (gRPC and REST), the [`SagaLog`] in SQLite (default, in the data dir) or
//! PostgreSQL (`database.url`; several coordinators may share it), and the
//! [`Driver`] calling branches — gRPC services found through the registry,
//! HTTP endpoints by URL.
//!
//! Submit answers once the saga is in the log, and starts driving it at
//! once in the same process (claimed in the same write); on start the
//! driver resumes every saga that is due, including those a crashed
//! coordinator left.

use std::{collections::HashMap, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use trellis::{
    Code, Error,
    config::{Invalid, Validate},
    core::BoxError,
    registry::ServiceRegistry,
    service::{Context, Service},
    settings::{LogSettings, OtlpSettings, ServerSettings},
    transport::GrpcHttpServerBuilder,
};
use trellis_store::{DatabaseSettings, Pool};

use crate::{
    api::v1::{self, saga_service_server::SagaServiceServer},
    driver::{Callers, Channels, Driver, DriverConfig, GrpcCaller, GrpcChannel, HttpCaller},
    log::{Definition, Endpoint, LogError, Record, SagaLog, StepDefinition},
    machine::{Kind, Status as SagaStatus},
};

/// The coordinator's name: in the registry and `trellis serve saga`.
pub const SERVICE: &str = "saga";

/// The coordinator's configuration (`saga.toml`, `TRELLIS_*`, etcd).
///
/// ```toml
/// [database]
/// url = "postgres://saga:${DB_PASSWORD}@db:5432/saga"   # default: SQLite in the data dir
///
/// [driver]
/// lease = "30s"            # how long a claim lasts (renewed with every write)
/// call_timeout = "5s"      # each branch call's deadline
/// backoff = "100ms"        # first retry; doubled per attempt, with jitter
/// max_backoff = "10s"
/// timeout_to_fail = "60s"  # default for sagas that set none
/// max_in_flight = 1024     # sagas driven at once
/// log_batch = 256          # log writes sharing one commit, at most
///
/// [participants.tls]       # mutual TLS to the branches' services
/// ca_file = "ca.pem"
/// cert_file = "saga.pem"
/// key_file = "saga-key.pem"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SagaSettings {
    /// Server limits and timeouts.
    pub server: ServerSettings,
    /// Logging.
    pub log: LogSettings,
    /// OTLP export of traces, metrics and logs; trace sampling.
    pub otlp: OtlpSettings,
    /// Where the log is kept.
    pub database: DatabaseSettings,
    /// How sagas are driven.
    pub driver: DriverSettings,
    /// How branches' gRPC services are reached.
    pub participants: ParticipantSettings,
}

impl Default for SagaSettings {
    fn default() -> Self {
        let mut server = ServerSettings::default();
        // A submit waits for the log's commit (an fsync, shared by the
        // sagas committing with it): callers queue on the disk by design.
        // Shed only a queue that stands far longer than a commit.
        server.shedding.queue_delay = Some(Duration::from_millis(250));
        SagaSettings {
            server,
            log: LogSettings::default(),
            otlp: OtlpSettings::default(),
            database: DatabaseSettings::default(),
            driver: DriverSettings::default(),
            participants: ParticipantSettings::default(),
        }
    }
}

/// How sagas are driven (see [`DriverConfig`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DriverSettings {
    /// How long a claim lasts; renewed with every write. Default 30s.
    #[serde(with = "trellis::config::duration")]
    pub lease: Duration,
    /// Each branch call's deadline. Default 5s.
    #[serde(with = "trellis::config::duration")]
    pub call_timeout: Duration,
    /// The first retry's delay. Default 100ms.
    #[serde(with = "trellis::config::duration")]
    pub backoff: Duration,
    /// The longest delay between retries. Default 10s.
    #[serde(with = "trellis::config::duration")]
    pub max_backoff: Duration,
    /// `timeout_to_fail` of sagas that set none. Default 60s.
    #[serde(with = "trellis::config::duration")]
    pub timeout_to_fail: Duration,
    /// How often the log is searched for due sagas (retries, sagas left
    /// by a crashed coordinator). Default 1s.
    #[serde(with = "trellis::config::duration")]
    pub poll: Duration,
    /// Sagas claimed per search. Default 64.
    pub batch: u32,
    /// Sagas driven at once. Default 1024.
    pub max_in_flight: usize,
    /// Log writes committed together at most (group commit: writes that
    /// arrive during a commit share the next). 1 commits each alone.
    /// Default 256.
    pub log_batch: usize,
}

impl Default for DriverSettings {
    fn default() -> Self {
        let d = DriverConfig::default();
        DriverSettings {
            lease: d.lease,
            call_timeout: d.call_timeout,
            backoff: d.backoff,
            max_backoff: d.max_backoff,
            timeout_to_fail: Duration::from_secs(60),
            poll: Duration::from_secs(1),
            batch: d.batch,
            max_in_flight: d.max_in_flight,
            log_batch: 256,
        }
    }
}

/// How the branches' gRPC services are reached.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ParticipantSettings {
    /// TLS to them (with a certificate: mutual TLS). Default: plaintext.
    pub tls: Option<trellis::stack::ClientTlsSettings>,
}

/// The longest `timeout_to_fail` accepted.
pub const MAX_TIMEOUT_TO_FAIL: Duration = Duration::from_secs(7 * 24 * 3600);

impl Validate for SagaSettings {
    fn validate(&self) -> Result<(), Invalid> {
        trellis::service::check_common(&self.server, &self.otlp)?;
        self.database.validate("database")?;
        let d = &self.driver;
        let ms = Duration::from_millis;
        let between = Invalid::check_range::<Duration>;
        between(
            "driver.lease",
            d.lease,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        )?;
        between("driver.call_timeout", d.call_timeout, ms(10), d.lease / 2)?;
        between("driver.backoff", d.backoff, ms(1), Duration::from_secs(60))?;
        between(
            "driver.max_backoff",
            d.max_backoff,
            d.backoff,
            Duration::from_secs(3600),
        )?;
        between(
            "driver.timeout_to_fail",
            d.timeout_to_fail,
            ms(100),
            MAX_TIMEOUT_TO_FAIL,
        )?;
        between("driver.poll", d.poll, ms(10), Duration::from_secs(60))?;
        Invalid::check_range("driver.batch", d.batch, 1, 10_000)?;
        Invalid::check_range("driver.log_batch", d.log_batch, 1, 10_000)?;
        Invalid::check_range("driver.max_in_flight", d.max_in_flight, 1, 1_000_000)
    }
}

trellis::service_settings!(SagaSettings);

/// The coordinator, while it runs.
pub struct Coordinator {
    pool: Pool,
    stop: tokio::sync::watch::Sender<bool>,
    driving: tokio::task::JoinHandle<()>,
}

impl Service for Coordinator {
    type Settings = SagaSettings;
    const NAME: &'static str = SERVICE;
    const PORT_OFFSET: u16 = 3;
    const DESCRIPTORS: &'static [u8] = crate::api::FILE_DESCRIPTOR_SET;
    const GRPC_SERVICES: &'static [&'static str] = &["trellis.saga.v1.SagaService"];

    /// Opens (and migrates) the log, starts the driver and adds the API.
    async fn build(
        ctx: Context<'_, SagaSettings>,
        server: GrpcHttpServerBuilder,
    ) -> Result<(Coordinator, GrpcHttpServerBuilder), BoxError> {
        let settings = ctx.settings;
        let pool = Pool::open_settings(
            &settings.database,
            &ctx.data_dir.join("saga.db"),
            &crate::log::migrator(),
        )
        .await?;
        let mut client = trellis::transport::ClientConfig::default();
        if let Some(tls) = &settings.participants.tls {
            client.tls = Some(tls.follow()?);
        }
        let channels = Discovered {
            discovery: ctx.discovery.cloned(),
            client,
            cache: tokio::sync::Mutex::new(HashMap::new()),
        };
        let callers = Callers {
            http: HttpCaller::default(),
            grpc: GrpcCaller::new(channels),
        };
        let d = &settings.driver;
        let config = DriverConfig {
            owner: format!("{SERVICE}-{}", uuid::Uuid::now_v7()),
            lease: d.lease,
            call_timeout: d.call_timeout,
            backoff: d.backoff,
            max_backoff: d.max_backoff,
            batch: d.batch,
            max_in_flight: d.max_in_flight,
        };
        let driver = Driver::new(
            SagaLog::batched(pool.clone(), d.log_batch),
            Arc::new(callers),
            config,
        );
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let driving = tokio::spawn(driver.clone().run(d.poll, async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        let handler = Handler {
            driver,
            default_timeout_to_fail: d.timeout_to_fail,
        };
        let server = server.grpc_service(SagaServiceServer::new(handler));
        Ok((
            Coordinator {
                pool,
                stop,
                driving,
            },
            server,
        ))
    }

    /// Stops claiming work and closes the log. Sagas being driven are left
    /// where their last write put them; their leases run out and whoever
    /// claims next resumes them.
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.driving.await;
        self.pool.close().await;
    }
}

/// Channels to the branches' services, found through the registry, one
/// balanced and traced channel per service, made on first use.
struct Discovered {
    discovery: Option<Arc<dyn ServiceRegistry>>,
    client: trellis::transport::ClientConfig,
    cache: tokio::sync::Mutex<HashMap<String, GrpcChannel>>,
}

/// Services the coordinator keeps channels to (the names come from
/// submitted sagas: bounded).
const MAX_SERVICES: usize = 1024;

impl Channels for Discovered {
    fn channel<'a>(
        &'a self,
        service: &'a str,
    ) -> futures_util::future::BoxFuture<'a, Result<GrpcChannel, String>> {
        Box::pin(async move {
            use tower::Layer as _;
            let Some(discovery) = &self.discovery else {
                return Err(format!("{service}: no registry to find it in"));
            };
            let mut cache = self.cache.lock().await;
            if let Some(channel) = cache.get(service) {
                return Ok(channel.clone());
            }
            if cache.len() >= MAX_SERVICES {
                return Err(format!(
                    "{service}: more than {MAX_SERVICES} services called"
                ));
            }
            let balanced = trellis::balanced_channel_with(
                discovery.as_ref(),
                service,
                Default::default(),
                self.client.clone(),
            )
            .await
            .map_err(|e| format!("{service}: {e}"))?;
            let channel = crate::driver::boxed(
                trellis::telemetry::ClientTelemetryLayer::new().layer(balanced),
            );
            cache.insert(service.to_owned(), channel.clone());
            Ok(channel)
        })
    }
}

/// Bounds on what a submit may hold.
pub mod limits {
    /// Steps per saga.
    pub const MAX_STEPS: usize = 64;
    /// Bytes of one step's payload.
    pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
    /// Bytes of a service name.
    pub const MAX_SERVICE_BYTES: usize = 128;
    /// Bytes of a gRPC method path or an HTTP URL.
    pub const MAX_TARGET_BYTES: usize = 2048;
}

fn valid_id(value: &str, max: usize, extra: &[char]) -> bool {
    !value.is_empty()
        && value.len() <= max
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || extra.contains(&c))
}

fn endpoint_from(field: &str, endpoint: Option<v1::Endpoint>) -> Result<Endpoint, Error> {
    use limits::*;
    match endpoint.and_then(|e| e.target) {
        None => Err(Error::invalid_argument(
            field,
            format!("{field} is required"),
        )),
        Some(v1::endpoint::Target::Grpc(g)) => {
            if !valid_id(&g.service, MAX_SERVICE_BYTES, &['.']) {
                return Err(Error::invalid_argument(
                    format!("{field}.grpc.service"),
                    format!("a service name: 1 to {MAX_SERVICE_BYTES} of [A-Za-z0-9_.-]"),
                ));
            }
            let parts: Vec<&str> = g.method.splitn(3, '/').collect();
            let well_formed = g.method.len() <= MAX_TARGET_BYTES
                && parts.len() == 3
                && parts[0].is_empty()
                && valid_id(parts[1], MAX_TARGET_BYTES, &['.'])
                && valid_id(parts[2], MAX_TARGET_BYTES, &[]);
            if !well_formed {
                return Err(Error::invalid_argument(
                    format!("{field}.grpc.method"),
                    format!(
                        "{:?} is not a method path like /pkg.Service/Method",
                        g.method
                    ),
                ));
            }
            Ok(Endpoint::Grpc {
                service: g.service,
                path: g.method,
            })
        }
        Some(v1::endpoint::Target::HttpUrl(url)) => {
            let ok = url.len() <= MAX_TARGET_BYTES
                && url
                    .parse::<http::Uri>()
                    .is_ok_and(|u| u.scheme_str() == Some("http") && u.host().is_some());
            if !ok {
                return Err(Error::invalid_argument(
                    format!("{field}.http_url"),
                    format!("an http:// URL of at most {MAX_TARGET_BYTES} bytes"),
                ));
            }
            Ok(Endpoint::Http { url })
        }
    }
}

/// A submit request as the log's [`Definition`], checked and bounded.
pub fn definition_from(
    request: v1::SubmitRequest,
    default_timeout_to_fail: Duration,
    traceparent: Option<String>,
) -> Result<(String, Definition), Error> {
    use limits::*;
    if !valid_id(&request.gid, crate::barrier::MAX_GID_BYTES, &['.', ':']) {
        return Err(Error::invalid_argument(
            "gid",
            format!("1 to {} of [A-Za-z0-9_.:-]", crate::barrier::MAX_GID_BYTES),
        ));
    }
    if request.steps.is_empty() || request.steps.len() > MAX_STEPS {
        return Err(Error::invalid_argument(
            "steps",
            format!("1 to {MAX_STEPS} steps"),
        ));
    }
    let timeout = match request.timeout_to_fail {
        None => default_timeout_to_fail,
        Some(d) => {
            let secs = u64::try_from(d.seconds).ok();
            let nanos = u32::try_from(d.nanos).ok();
            match (secs, nanos) {
                (Some(s), Some(n)) if n < 1_000_000_000 => Duration::new(s, n),
                _ => {
                    return Err(Error::invalid_argument(
                        "timeout_to_fail",
                        "must not be negative",
                    ));
                }
            }
        }
    };
    if timeout.is_zero() || timeout > MAX_TIMEOUT_TO_FAIL {
        return Err(Error::invalid_argument(
            "timeout_to_fail",
            format!("must be above 0 and at most {MAX_TIMEOUT_TO_FAIL:?}"),
        ));
    }
    let kind = match v1::Kind::try_from(request.kind) {
        Ok(v1::Kind::Saga) => Kind::Saga,
        Ok(v1::Kind::Tcc) => Kind::Tcc,
        Ok(v1::Kind::Msg) => Kind::Msg,
        Err(_) => return Err(Error::invalid_argument("kind", "saga, tcc or msg")),
    };
    let query = match (kind, request.query) {
        (Kind::Msg, Some(q)) => Some(endpoint_from("query", Some(q))?),
        (Kind::Msg, None) => None,
        (_, Some(_)) => {
            return Err(Error::invalid_argument(
                "query",
                "only messages are checked back",
            ));
        }
        (_, None) => None,
    };
    if request.concurrent && kind == Kind::Msg {
        return Err(Error::invalid_argument(
            "concurrent",
            "a message's branches run one after another",
        ));
    }
    let mut steps = Vec::with_capacity(request.steps.len());
    for (i, step) in request.steps.into_iter().enumerate() {
        let field = format!("steps[{i}]");
        if !valid_id(&step.name, crate::barrier::MAX_BRANCH_BYTES, &['.']) {
            return Err(Error::invalid_argument(
                format!("{field}.name"),
                format!(
                    "1 to {} of [A-Za-z0-9_.-]",
                    crate::barrier::MAX_BRANCH_BYTES
                ),
            ));
        }
        if steps.iter().any(|s: &StepDefinition| s.name == step.name) {
            return Err(Error::invalid_argument(
                format!("{field}.name"),
                format!("{:?} names two steps", step.name),
            ));
        }
        if step.payload.len() > MAX_PAYLOAD_BYTES {
            return Err(Error::invalid_argument(
                format!("{field}.payload"),
                format!("at most {MAX_PAYLOAD_BYTES} bytes"),
            ));
        }
        let action = endpoint_from(&format!("{field}.action"), step.action)?;
        let (compensate, confirm) = match kind {
            Kind::Saga | Kind::Tcc => {
                let compensate = endpoint_from(&format!("{field}.compensate"), step.compensate)?;
                let confirm = match (kind, step.confirm) {
                    (Kind::Tcc, confirm) => {
                        Some(endpoint_from(&format!("{field}.confirm"), confirm)?)
                    }
                    (_, Some(_)) => {
                        return Err(Error::invalid_argument(
                            format!("{field}.confirm"),
                            "only TCC branches are confirmed",
                        ));
                    }
                    (_, None) => None,
                };
                (compensate, confirm)
            }
            Kind::Msg => {
                if step.compensate.is_some() || step.confirm.is_some() {
                    return Err(Error::invalid_argument(
                        format!("{field}.compensate"),
                        "a message's branches are not undone or confirmed",
                    ));
                }
                // Never called: a message is not compensated.
                (action.clone(), None)
            }
        };
        let mut after = Vec::with_capacity(step.after.len());
        for (k, name) in step.after.iter().enumerate() {
            let Some(index) = steps.iter().position(|s: &StepDefinition| &s.name == name) else {
                return Err(Error::invalid_argument(
                    format!("{field}.after[{k}]"),
                    format!("{name:?} is not an earlier step"),
                ));
            };
            after.push(index);
        }
        if !after.is_empty() && !request.concurrent {
            return Err(Error::invalid_argument(
                format!("{field}.after"),
                "only the steps of a concurrent transaction wait for others",
            ));
        }
        steps.push(StepDefinition {
            action,
            compensate,
            confirm,
            after,
            name: step.name,
            payload: step.payload,
        });
    }
    Ok((
        request.gid,
        Definition {
            kind,
            query,
            concurrent: request.concurrent,
            steps,
            timeout_to_fail_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            traceparent,
        },
    ))
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

fn status_to_proto(status: SagaStatus) -> v1::Status {
    match status {
        SagaStatus::Prepared => v1::Status::Prepared,
        SagaStatus::Running => v1::Status::Running,
        SagaStatus::Confirming => v1::Status::Confirming,
        SagaStatus::Compensating => v1::Status::Compensating,
        SagaStatus::Succeeded => v1::Status::Succeeded,
        SagaStatus::Compensated => v1::Status::Compensated,
        SagaStatus::Aborted => v1::Status::Aborted,
    }
}

/// A logged saga in its wire form.
pub fn saga_to_proto(record: &Record) -> v1::Saga {
    let (failed_step, failure_reason) = match &record.state.failure {
        Some((step, reason)) => (
            record
                .definition
                .steps
                .get(*step)
                .map(|s| s.name.clone())
                .unwrap_or_default(),
            reason.clone(),
        ),
        None => Default::default(),
    };
    let terminal = record.state.status.is_terminal();
    v1::Saga {
        gid: record.gid.clone(),
        status: status_to_proto(record.state.status) as i32,
        steps: record
            .definition
            .steps
            .iter()
            .zip(&record.state.steps)
            .map(|(def, s)| v1::StepState {
                name: def.name.clone(),
                called: s.called,
                succeeded: s.succeeded,
                compensated: s.compensated,
                confirmed: s.confirmed,
                attempts: s.attempts,
                last_error: s.last_error.clone(),
                last_attempt_time: (s.last_attempt_ms > 0).then(|| timestamp(s.last_attempt_ms)),
            })
            .collect(),
        failed_step,
        failure_reason,
        create_time: Some(timestamp(record.create_time_ms)),
        update_time: Some(timestamp(record.update_time_ms)),
        next_attempt_time: (!terminal).then(|| timestamp(record.next_attempt_ms)),
        kind: match record.definition.kind {
            Kind::Saga => v1::Kind::Saga,
            Kind::Tcc => v1::Kind::Tcc,
            Kind::Msg => v1::Kind::Msg,
        } as i32,
    }
}

fn log_error(e: LogError) -> Error {
    match e {
        LogError::Store(trellis_store::Failure::Unavailable(detail)) => {
            Error::unavailable(format!("saga log: {detail}"))
        }
        other => {
            tracing::error!(error = %other, "saga log");
            Error::internal("the saga log failed; see the coordinator's log")
        }
    }
}

/// The caller's `traceparent`: its span is the saga's parent, so the
/// branches join the caller's trace.
fn traceparent<T>(request: &Request<T>) -> Option<String> {
    request
        .metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128)
        .map(str::to_owned)
}

/// The API over the log and the driver.
struct Handler {
    driver: Driver,
    default_timeout_to_fail: Duration,
}

impl Handler {
    /// The request's saga, checked, with the caller's trace.
    fn definition(
        &self,
        request: Request<v1::SubmitRequest>,
    ) -> Result<(String, Definition), Error> {
        let traceparent = traceparent(&request);
        definition_from(
            request.into_inner(),
            self.default_timeout_to_fail,
            traceparent,
        )
    }

    /// A gid submitted again: accepted when the definition is the one
    /// logged (a retried submit), refused otherwise.
    async fn resubmitted(&self, gid: &str, definition: &Definition) -> Result<(), Error> {
        let logged = self
            .driver
            .log()
            .get(gid)
            .await
            .map_err(log_error)?
            .ok_or_else(|| Error::unavailable(format!("saga {gid}: submitted concurrently")))?;
        let same = logged.definition.steps == definition.steps
            && logged.definition.kind == definition.kind
            && logged.definition.query == definition.query
            && logged.definition.concurrent == definition.concurrent
            && logged.definition.timeout_to_fail_ms == definition.timeout_to_fail_ms;
        if same {
            Ok(())
        } else {
            Err(Error::already_exists(
                "SAGA_EXISTS",
                format!("saga {gid} was submitted with other steps"),
            ))
        }
    }
}

#[tonic::async_trait]
impl v1::saga_service_server::SagaService for Handler {
    async fn submit(
        &self,
        request: Request<v1::SubmitRequest>,
    ) -> Result<Response<v1::SubmitResponse>, Status> {
        let (gid, definition) = self.definition(request)?;
        let log = self.driver.log();
        // A message prepared before: its local transaction committed, so
        // it runs now.
        if definition.kind == Kind::Msg
            && let Some(logged) = log.get(&gid).await.map_err(log_error)?
        {
            self.resubmitted(&gid, &definition).await?;
            if logged.state.status == SagaStatus::Prepared
                && log.promote(&gid).await.map_err(log_error)?
            {
                self.driver.wake();
            }
            return Ok(Response::new(v1::SubmitResponse { gid }));
        }
        let submitted = match self.driver.slot() {
            Some(slot) => {
                let config = self.driver.config();
                log.submit_claimed(&gid, &definition, &config.owner, config.lease)
                    .await
                    .map(|claimed| self.driver.spawn(claimed, slot))
            }
            // Busy: the saga waits in the log for a place.
            None => log.submit(&gid, &definition).await,
        };
        match submitted {
            Ok(()) => metrics::counter!("saga_started_total").increment(1),
            Err(LogError::Duplicate(_)) => self.resubmitted(&gid, &definition).await?,
            Err(e) => return Err(log_error(e).into()),
        }
        Ok(Response::new(v1::SubmitResponse { gid }))
    }

    async fn prepare(
        &self,
        request: Request<v1::SubmitRequest>,
    ) -> Result<Response<v1::SubmitResponse>, Status> {
        let (gid, definition) = self.definition(request)?;
        if definition.kind != Kind::Msg {
            return Err(Error::invalid_argument("kind", "only messages are prepared").into());
        }
        if definition.query.is_none() {
            return Err(Error::invalid_argument(
                "query",
                "a prepared message needs a query endpoint to be checked back",
            )
            .into());
        }
        match self.driver.log().prepare(&gid, &definition).await {
            Ok(()) => metrics::counter!("saga_started_total").increment(1),
            Err(LogError::Duplicate(_)) => self.resubmitted(&gid, &definition).await?,
            Err(e) => return Err(log_error(e).into()),
        }
        Ok(Response::new(v1::SubmitResponse { gid }))
    }

    async fn get_saga(
        &self,
        request: Request<v1::GetSagaRequest>,
    ) -> Result<Response<v1::Saga>, Status> {
        let gid = &request.get_ref().gid;
        match self.driver.log().get(gid).await.map_err(log_error)? {
            Some(record) => Ok(Response::new(saga_to_proto(&record))),
            None => Err(Error::not_found("SAGA_NOT_FOUND", format!("no saga {gid:?}")).into()),
        }
    }

    async fn list_sagas(
        &self,
        request: Request<v1::ListSagasRequest>,
    ) -> Result<Response<v1::ListSagasResponse>, Status> {
        let req = request.into_inner();
        let status = match v1::Status::try_from(req.status) {
            Ok(v1::Status::Unspecified) => None,
            Ok(v1::Status::Prepared) => Some(SagaStatus::Prepared),
            Ok(v1::Status::Running) => Some(SagaStatus::Running),
            Ok(v1::Status::Confirming) => Some(SagaStatus::Confirming),
            Ok(v1::Status::Compensating) => Some(SagaStatus::Compensating),
            Ok(v1::Status::Succeeded) => Some(SagaStatus::Succeeded),
            Ok(v1::Status::Compensated) => Some(SagaStatus::Compensated),
            Ok(v1::Status::Aborted) => Some(SagaStatus::Aborted),
            Err(_) => {
                return Err(Error::invalid_argument("status", "not a saga status").into());
            }
        };
        let size = match req.page_size {
            0 => 50,
            n @ 1..=1000 => n as u32,
            _ => {
                return Err(Error::new(
                    Code::InvalidArgument,
                    "INVALID_FIELD",
                    "page_size must be between 0 and 1000",
                )
                .with_metadata("field", "page_size")
                .into());
            }
        };
        let records = self
            .driver
            .log()
            .list(status, size)
            .await
            .map_err(log_error)?;
        Ok(Response::new(v1::ListSagasResponse {
            sagas: records.iter().map(saga_to_proto).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::endpoint_to_proto;

    fn step(name: &str) -> v1::Step {
        v1::Step {
            name: name.into(),
            action: Some(endpoint_to_proto(&Endpoint::grpc(
                "inventory",
                "/shop.inventory.v1.InventoryService/Reserve",
            ))),
            compensate: Some(endpoint_to_proto(&Endpoint::http(
                "http://127.0.0.1:1/undo",
            ))),
            payload: vec![1, 2, 3],
            confirm: None,
            after: Vec::new(),
        }
    }

    fn field_of(request: v1::SubmitRequest) -> String {
        let e = definition_from(request, Duration::from_secs(60), None).unwrap_err();
        e.metadata()["field"].clone()
    }

    #[test]
    fn submits_are_checked_and_bounded() {
        let ok = v1::SubmitRequest {
            gid: "order-1".into(),
            steps: vec![step("reserve"), step("charge")],
            timeout_to_fail: None,
            ..Default::default()
        };
        let (gid, def) = definition_from(ok.clone(), Duration::from_secs(60), None).unwrap();
        assert_eq!(gid, "order-1");
        assert_eq!(def.steps.len(), 2);
        assert_eq!(def.timeout_to_fail_ms, 60_000);

        let mut bad = ok.clone();
        bad.gid = "no spaces".into();
        assert_eq!(field_of(bad), "gid");
        let mut bad = ok.clone();
        bad.steps.clear();
        assert_eq!(field_of(bad), "steps");
        let mut bad = ok.clone();
        bad.steps = vec![step("x"); limits::MAX_STEPS + 1];
        assert_eq!(field_of(bad), "steps");
        let mut bad = ok.clone();
        bad.steps[1].name = "reserve".into();
        assert_eq!(field_of(bad), "steps[1].name");
        let mut bad = ok.clone();
        bad.steps[0].payload = vec![0; limits::MAX_PAYLOAD_BYTES + 1];
        assert_eq!(field_of(bad), "steps[0].payload");
        let mut bad = ok.clone();
        bad.steps[0].action = None;
        assert_eq!(field_of(bad), "steps[0].action");
        let mut bad = ok.clone();
        bad.steps[0].action = Some(endpoint_to_proto(&Endpoint::grpc("inventory", "Reserve")));
        assert_eq!(field_of(bad), "steps[0].action.grpc.method");
        let mut bad = ok.clone();
        bad.steps[1].compensate = Some(endpoint_to_proto(&Endpoint::http("file:///etc/passwd")));
        assert_eq!(field_of(bad), "steps[1].compensate.http_url");
        let mut bad = ok;
        bad.timeout_to_fail = Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        });
        assert_eq!(field_of(bad), "timeout_to_fail");
    }
}
