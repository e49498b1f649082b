//! The coordinator's loop: claim due sagas from the [`SagaLog`], drive each
//! through the [`machine`](crate::machine) — persisting every answer (the
//! last one and the saga's end in one write) — and schedule retries with
//! exponential backoff and jitter. A coordinator killed at any moment
//! leaves sagas another one (or itself, restarted) resumes from their last
//! answer: it calls the unanswered operation again, and the participants'
//! barriers absorb the repeated calls.
//!
//! Branches are called through a [`Caller`]: [`HttpCaller`] POSTs the
//! step's payload with the branch headers (`trellis-saga-gid`, `-branch`,
//! `-op`) and sorts the answer: 2xx success, 409 a definite failure,
//! anything else (5xx, 429, no answer within the deadline) a retry.

use std::{sync::Arc, time::Duration};

use futures_util::future::BoxFuture;

use crate::{
    barrier::{Branch, Op},
    log::{Claimed, Endpoint, LogError, SagaLog, ms},
    machine::{Answer, Next},
};

/// Calls one branch operation; the answer, and a description of it for
/// the log and the saga's failure reason.
pub trait Caller: Send + Sync + 'static {
    /// Sends `payload` to `endpoint` with `headers` (the branch's, see
    /// [`Branch::headers`]), within `deadline`.
    fn call<'a>(
        &'a self,
        endpoint: &'a Endpoint,
        headers: &'a http::HeaderMap,
        payload: &'a [u8],
        deadline: Duration,
    ) -> BoxFuture<'a, (Answer, String)>;
}

/// Branches over HTTP/1.1 (POST).
#[derive(Clone)]
pub struct HttpCaller {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
}

impl Default for HttpCaller {
    fn default() -> Self {
        HttpCaller {
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http(),
        }
    }
}

/// What an HTTP status means for a saga.
pub fn answer_for(status: http::StatusCode) -> Answer {
    if status.is_success() {
        Answer::Success
    } else if status == http::StatusCode::CONFLICT {
        Answer::Failure
    } else {
        Answer::Retry
    }
}

impl Caller for HttpCaller {
    fn call<'a>(
        &'a self,
        endpoint: &'a Endpoint,
        headers: &'a http::HeaderMap,
        payload: &'a [u8],
        deadline: Duration,
    ) -> BoxFuture<'a, (Answer, String)> {
        Box::pin(async move {
            let Endpoint::Http { url } = endpoint else {
                return (Answer::Retry, "not an HTTP endpoint".to_owned());
            };
            let mut request = http::Request::post(url.as_str())
                .header(http::header::CONTENT_TYPE, "application/json");
            if let Some(h) = request.headers_mut() {
                h.extend(headers.clone());
                trellis_telemetry::propagation::inject_span(&tracing::Span::current(), h);
            }
            let request = match request.body(http_body_util::Full::new(
                bytes::Bytes::copy_from_slice(payload),
            )) {
                Ok(r) => r,
                Err(e) => return (Answer::Failure, format!("bad request to {url}: {e}")),
            };
            match tokio::time::timeout(deadline, self.client.request(request)).await {
                Err(_) => (
                    Answer::Retry,
                    format!("{url}: no answer within {deadline:?}"),
                ),
                Ok(Err(e)) => (Answer::Retry, format!("{url}: {e}")),
                Ok(Ok(response)) => {
                    let status = response.status();
                    (answer_for(status), format!("{url}: {status}"))
                }
            }
        })
    }
}

/// A gRPC channel to a participant, type-erased: a tonic `Channel`, a
/// balanced and traced one from discovery, anything tonic can call on
/// ([`boxed`] makes one).
pub type GrpcChannel = tower::util::BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    ChannelError,
>;

/// Errors of type-erased channels.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a type-erased channel failed (connecting, no endpoint, ...).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ChannelError(#[from] pub BoxError);

/// Erases a channel's type (a tonic `Channel`, a balanced or traced one).
pub fn boxed<S, B>(channel: S) -> GrpcChannel
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    use tower::ServiceExt as _;
    tower::util::BoxCloneSyncService::new(
        channel
            .map_response(|r: http::Response<B>| r.map(tonic::body::Body::new))
            .map_err(|e: S::Error| ChannelError(e.into())),
    )
}

/// Finds the channel to a service by its registry name.
pub trait Channels: Send + Sync + 'static {
    /// The channel to `service`, or why there is none (a retry).
    fn channel<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<GrpcChannel, String>>;
}

impl<F> Channels for F
where
    F: Fn(&str) -> Option<GrpcChannel> + Send + Sync + 'static,
{
    fn channel<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<GrpcChannel, String>> {
        let found = self(service).ok_or_else(|| format!("{service}: no channel"));
        Box::pin(std::future::ready(found))
    }
}

/// Branches over gRPC: unary calls whose request message is the step's
/// payload (protobuf bytes), with the branch headers as metadata, on the
/// channel [`Channels`] gives for the endpoint's service. The answer's
/// status decides: OK success; ABORTED or FAILED_PRECONDITION a definite
/// failure; anything else a retry.
#[derive(Clone)]
pub struct GrpcCaller {
    channels: Arc<dyn Channels>,
}

impl GrpcCaller {
    /// A caller that finds each service's channel with `channels`.
    pub fn new(channels: impl Channels) -> Self {
        GrpcCaller {
            channels: Arc::new(channels),
        }
    }
}

/// What a gRPC status means for a saga.
pub fn answer_for_code(code: tonic::Code) -> Answer {
    match code {
        tonic::Code::Ok => Answer::Success,
        tonic::Code::Aborted | tonic::Code::FailedPrecondition => Answer::Failure,
        _ => Answer::Retry,
    }
}

/// Passes the payload through as the message's bytes, both ways.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = bytes::Bytes;
    type Decode = bytes::Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: bytes::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = bytes::Bytes;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<bytes::Bytes>, tonic::Status> {
        use bytes::Buf as _;
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Caller for GrpcCaller {
    fn call<'a>(
        &'a self,
        endpoint: &'a Endpoint,
        headers: &'a http::HeaderMap,
        payload: &'a [u8],
        deadline: Duration,
    ) -> BoxFuture<'a, (Answer, String)> {
        Box::pin(async move {
            let Endpoint::Grpc { service, path } = endpoint else {
                return (Answer::Retry, "not a gRPC endpoint".to_owned());
            };
            let channel = match self.channels.channel(service).await {
                Ok(channel) => channel,
                Err(e) => return (Answer::Retry, e),
            };
            let Ok(path) = http::uri::PathAndQuery::try_from(path.as_str()) else {
                return (Answer::Failure, format!("{path:?} is not a method path"));
            };
            let mut request = tonic::Request::new(bytes::Bytes::copy_from_slice(payload));
            request.set_timeout(deadline);
            let mut metadata = headers.clone();
            trellis_telemetry::propagation::inject_span(&tracing::Span::current(), &mut metadata);
            *request.metadata_mut() = tonic::metadata::MetadataMap::from_headers(metadata);
            let answer = match tokio::time::timeout(deadline, unary(channel, path, request)).await {
                Err(_) => {
                    return (
                        Answer::Retry,
                        format!("{service}: no answer within {deadline:?}"),
                    );
                }
                Ok(answer) => answer,
            };
            match answer {
                Ok(_) => (Answer::Success, format!("{service}: OK")),
                Err(status) => (
                    answer_for_code(status.code()),
                    format!("{service}: {:?}: {}", status.code(), status.message()),
                ),
            }
        })
    }
}

/// One unary call of raw bytes on `channel` (a named future: the
/// compiler cannot prove an inline one `Send` for every lifetime).
fn unary(
    channel: GrpcChannel,
    path: http::uri::PathAndQuery,
    request: tonic::Request<bytes::Bytes>,
) -> BoxFuture<'static, Result<tonic::Response<bytes::Bytes>, tonic::Status>> {
    Box::pin(async move {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        grpc.unary(request, path, RawCodec).await
    })
}

/// Calls HTTP endpoints with one caller and gRPC ones with another.
#[derive(Clone)]
pub struct Callers {
    /// For [`Endpoint::Http`].
    pub http: HttpCaller,
    /// For [`Endpoint::Grpc`].
    pub grpc: GrpcCaller,
}

impl Caller for Callers {
    fn call<'a>(
        &'a self,
        endpoint: &'a Endpoint,
        headers: &'a http::HeaderMap,
        payload: &'a [u8],
        deadline: Duration,
    ) -> BoxFuture<'a, (Answer, String)> {
        match endpoint {
            Endpoint::Http { .. } => self.http.call(endpoint, headers, payload, deadline),
            Endpoint::Grpc { .. } => self.grpc.call(endpoint, headers, payload, deadline),
        }
    }
}

/// How a coordinator drives sagas.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Its name on leases.
    pub owner: String,
    /// How long a claim lasts; renewed with every write.
    pub lease: Duration,
    /// Each branch call's deadline.
    pub call_timeout: Duration,
    /// The first retry's delay; doubled per attempt up to `max_backoff`,
    /// with jitter.
    pub backoff: Duration,
    /// The longest delay between retries.
    pub max_backoff: Duration,
    /// Sagas claimed at once.
    pub batch: u32,
    /// Sagas driven at once (past it, new ones wait in the log).
    pub max_in_flight: usize,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            owner: format!("coordinator-{}", std::process::id()),
            lease: Duration::from_secs(30),
            call_timeout: Duration::from_secs(5),
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            batch: 64,
            max_in_flight: 1024,
        }
    }
}

/// Drives sagas from a log.
#[derive(Clone)]
pub struct Driver {
    inner: Arc<Inner>,
}

struct Inner {
    log: SagaLog,
    caller: Arc<dyn Caller>,
    config: DriverConfig,
    slots: Arc<tokio::sync::Semaphore>,
    wake: tokio::sync::Notify,
}

/// A place among the sagas a driver drives at once ([`Driver::slot`]).
#[derive(Debug)]
pub struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Counts a saga being driven, for as long as it is (a drop guard: a
/// panicking or cancelled drive still leaves the gauge).
struct InFlight;

impl InFlight {
    fn new() -> InFlight {
        metrics::gauge!("saga_in_flight").increment(1.0);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("saga_in_flight").decrement(1.0);
    }
}

impl Driver {
    /// A driver over `log`, calling branches with `caller`.
    pub fn new(log: SagaLog, caller: Arc<dyn Caller>, config: DriverConfig) -> Driver {
        let slots = Arc::new(tokio::sync::Semaphore::new(config.max_in_flight.max(1)));
        Driver {
            inner: Arc::new(Inner {
                log,
                caller,
                config,
                slots,
                wake: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Its settings.
    pub fn config(&self) -> &DriverConfig {
        &self.inner.config
    }

    /// Its log.
    pub fn log(&self) -> &SagaLog {
        &self.inner.log
    }

    /// Looks for due sagas at once (one was made due: a message
    /// submitted after it was prepared).
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// A free place to drive one more saga, if there is one.
    pub fn slot(&self) -> Option<Slot> {
        self.inner
            .slots
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|p| Slot { _permit: p })
    }

    /// Drives `claimed` in the background, in `slot` (a saga submitted
    /// with [`SagaLog::submit_claimed`] starts at once this way).
    pub fn spawn(&self, claimed: Claimed, slot: Slot) {
        let this = self.clone();
        tokio::spawn(async move {
            let gid = claimed.record.gid.clone();
            match this.drive(claimed).await {
                Ok(()) | Err(LogError::LeaseLost(_)) => {}
                Err(e) => tracing::warn!(%gid, error = %e, "saga left for a later round"),
            }
            drop(slot);
            // A place came free: sagas waiting in the log may be claimed.
            this.inner.wake.notify_one();
        });
    }

    /// Claims what is due and drives each saga until it ends or waits for
    /// a retry, waiting for all of them; how many it claimed.
    pub async fn run_once(&self) -> Result<usize, LogError> {
        let config = &self.inner.config;
        let claimed = self
            .inner
            .log
            .claim(&config.owner, config.lease, config.batch)
            .await?;
        let n = claimed.len();
        let mut running = tokio::task::JoinSet::new();
        for c in claimed {
            let this = self.clone();
            running.spawn(async move { this.drive(c).await });
        }
        while let Some(done) = running.join_next().await {
            match done {
                Ok(Ok(())) => {}
                // Another coordinator has it now: nothing to do.
                Ok(Err(LogError::LeaseLost(_))) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => {
                    return Err(LogError::Corrupt {
                        gid: String::new(),
                        what: "driver task",
                        reason: e.to_string(),
                    });
                }
            }
        }
        Ok(n)
    }

    /// Runs until `stop`: claims what is due — every `poll`, and at once
    /// when a place comes free — and drives it in the background, up to
    /// `max_in_flight` sagas at a time.
    pub async fn run(self, poll: Duration, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let config = &self.inner.config;
        loop {
            let free = self
                .inner
                .slots
                .available_permits()
                .min(config.batch as usize);
            let mut full_batch = false;
            if free > 0 {
                let limit = u32::try_from(free).unwrap_or(config.batch);
                match self
                    .inner
                    .log
                    .claim(&config.owner, config.lease, limit)
                    .await
                {
                    Ok(claimed) => {
                        full_batch = claimed.len() == free;
                        for c in claimed {
                            match self.slot() {
                                Some(slot) => self.spawn(c, slot),
                                // Submissions took the places meanwhile.
                                None => {
                                    if let Err(e) = self.inner.log.release(&c, &config.owner).await
                                    {
                                        tracing::warn!(error = %e, "saga not released");
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "saga claim failed"),
                }
            }
            if full_batch {
                // More may be due: claim again at once.
                continue;
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(poll) => {}
                _ = self.inner.wake.notified() => {}
            }
        }
    }

    async fn drive(&self, claimed: Claimed) -> Result<(), LogError> {
        use tracing::Instrument as _;
        let span = tracing::info_span!(
            "saga",
            otel.name = "saga.drive",
            saga.gid = %claimed.record.gid,
        );
        if let Some(parent) = &claimed.record.definition.traceparent {
            trellis_telemetry::propagation::adopt_traceparent(&span, parent);
        }
        let _in_flight = InFlight::new();
        self.drive_in_span(claimed).instrument(span).await
    }

    async fn drive_in_span(&self, mut claimed: Claimed) -> Result<(), LogError> {
        let config = &self.inner.config;
        let log = &self.inner.log;
        let owner = config.owner.as_str();
        let lease = config.lease;
        let definition = claimed.record.definition.clone();
        let gid = claimed.record.gid.clone();
        let mut state = claimed.record.state.clone();
        let corrupt = |reason: String| LogError::Corrupt {
            gid: gid.clone(),
            what: "definition",
            reason,
        };
        loop {
            // A forward step retried past the saga's timeout_to_fail turns
            // the saga round (sagas and TCC; messages are never given up).
            let age = trellis_store::now_ms().saturating_sub(claimed.record.create_time_ms);
            if age > i64::try_from(definition.timeout_to_fail_ms).unwrap_or(i64::MAX) {
                state.time_out(&format!(
                    "no step answered for good within {} ms",
                    definition.timeout_to_fail_ms
                ));
            }
            let round: Vec<(Option<usize>, Op)> = match state.next() {
                Next::Done(status) => return self.finish(&mut claimed, &state, status).await,
                Next::Query => vec![(None, Op::Action)],
                // Every call whose turn it is (one, unless the steps are
                // concurrent), made at once.
                Next::Call { .. } => state
                    .ready()
                    .into_iter()
                    .map(|(s, op)| (Some(s), op))
                    .collect(),
            };
            let mut calls = Vec::with_capacity(round.len());
            for &(step, op) in &round {
                let (name, endpoint, payload) = match step {
                    None => {
                        let query = definition.query.as_ref().ok_or_else(|| {
                            corrupt("a prepared message without a query endpoint".into())
                        })?;
                        ("query", query, &[][..])
                    }
                    Some(step) => {
                        let def = definition
                            .steps
                            .get(step)
                            .ok_or_else(|| corrupt(format!("no step {step}")))?;
                        let endpoint = match op {
                            Op::Action | Op::Try => &def.action,
                            Op::Compensate | Op::Cancel => &def.compensate,
                            Op::Confirm => def.confirm.as_ref().ok_or_else(|| {
                                corrupt(format!("step {} has no confirm", def.name))
                            })?,
                        };
                        // Not persisted before the call: after a crash the
                        // round is made again (the barrier absorbs the
                        // repeats), and a step given up on is compensated
                        // whether or not its call was recorded.
                        state.calling(step, op);
                        if let Some(s) = state.steps.get_mut(step) {
                            s.last_attempt_ms = trellis_store::now_ms();
                        }
                        (def.name.as_str(), endpoint, &def.payload[..])
                    }
                };
                let mut headers = http::HeaderMap::new();
                headers.extend(
                    Branch::new(&gid, name, op)
                        .headers()
                        .map_err(|e| corrupt(e.to_string()))?,
                );
                if let (Op::Compensate | Op::Cancel, Some((_, why))) = (op, &state.failure) {
                    headers.insert(crate::barrier::REASON, crate::barrier::reason_value(why));
                }
                calls.push(self.call(step, op, name, endpoint, headers, payload));
            }
            let answers = futures_util::future::join_all(calls).await;
            let before = progress(&state);
            let mut said_last = String::new();
            for ((step, op), (answer, said)) in round.iter().copied().zip(answers) {
                match step {
                    Some(step) => {
                        state.record_with(step, op, answer, &said);
                        if answer != Answer::Success
                            && let Some(s) = state.steps.get_mut(step)
                        {
                            s.last_error = said.clone();
                        }
                    }
                    None => state.record_query(answer),
                }
                if answer != Answer::Success {
                    said_last = said;
                }
            }
            // No progress — retryable answers, or refusals of what is only
            // retried (a compensation, a confirmation, a message's branch):
            // again later, backing off.
            if progress(&state) == before {
                let attempts = round
                    .iter()
                    .filter_map(|(s, _)| s.and_then(|s| state.steps.get(s)))
                    .map(|s| s.attempts)
                    .max()
                    .unwrap_or(1);
                let delay = backoff(config.backoff, config.max_backoff, attempts);
                tracing::debug!(%gid, said = %said_last, ?delay, "branches to retry");
                let due = trellis_store::now_ms().saturating_add(ms(delay));
                return log.save_released(&mut claimed, owner, &state, due).await;
            }
            // The last answer and the end are one write.
            if let Next::Done(status) = state.next() {
                return self.finish(&mut claimed, &state, status).await;
            }
            log.save(&mut claimed, owner, &state, 0, lease).await?;
        }
    }

    /// One branch call, in its span, measured.
    async fn call(
        &self,
        step: Option<usize>,
        op: Op,
        name: &str,
        endpoint: &Endpoint,
        headers: http::HeaderMap,
        payload: &[u8],
    ) -> (Answer, String) {
        use tracing::Instrument as _;
        let started = std::time::Instant::now();
        let span = tracing::info_span!(
            "saga.branch",
            otel.name = %format_args!("saga.{} {}", op.as_str(), name),
            saga.step = %name,
            saga.op = op.as_str(),
        );
        let (answer, said) = self
            .inner
            .caller
            .call(endpoint, &headers, payload, self.inner.config.call_timeout)
            .instrument(span)
            .await;
        let op_label = if step.is_some() { op.as_str() } else { "query" };
        metrics::histogram!("saga_branch_duration_seconds", "op" => op_label)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("saga_branch_calls_total", "op" => op_label, "answer" => answer_text(answer))
            .increment(1);
        (answer, said)
    }
}

/// What a round can change: the status and each step's outcomes.
fn progress(state: &crate::machine::Saga) -> (crate::machine::Status, Vec<(bool, bool, bool)>) {
    (
        state.status,
        state
            .steps
            .iter()
            .map(|s| (s.succeeded, s.confirmed, s.compensated))
            .collect(),
    )
}

impl Driver {
    /// Writes the saga's end and gives it back, in one write.
    async fn finish(
        &self,
        claimed: &mut Claimed,
        state: &crate::machine::Saga,
        status: crate::machine::Status,
    ) -> Result<(), LogError> {
        self.inner
            .log
            .save_released(claimed, &self.inner.config.owner, state, i64::MAX)
            .await?;
        metrics::counter!("saga_finished_total", "status" => crate::log::status_text(status))
            .increment(1);
        Ok(())
    }
}

fn answer_text(answer: Answer) -> &'static str {
    match answer {
        Answer::Success => "success",
        Answer::Failure => "failure",
        Answer::Retry => "retry",
    }
}

/// `base` doubled per attempt past the first, capped at `max`, with up to
/// half of it as jitter (so retries of many sagas do not arrive together).
pub fn backoff(base: Duration, max: Duration, attempts: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
    let capped = exp.min(max);
    let jitter = capped.as_nanos() as u64 / 2;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    capped - Duration::from_nanos(if jitter == 0 { 0 } else { seed % jitter })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters_downwards() {
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(2));
        for attempts in 1..40 {
            let d = backoff(base, max, attempts);
            let full = base.saturating_mul(1 << (attempts - 1).min(20)).min(max);
            assert!(d <= full && d >= full / 2, "{attempts}: {d:?} vs {full:?}");
        }
    }

    #[test]
    fn grpc_codes_sort_into_answers() {
        assert_eq!(answer_for_code(tonic::Code::Ok), Answer::Success);
        for code in [tonic::Code::Aborted, tonic::Code::FailedPrecondition] {
            assert_eq!(answer_for_code(code), Answer::Failure, "{code:?}");
        }
        for code in [
            tonic::Code::Unavailable,
            tonic::Code::DeadlineExceeded,
            tonic::Code::Internal,
            tonic::Code::ResourceExhausted,
        ] {
            assert_eq!(answer_for_code(code), Answer::Retry, "{code:?}");
        }
    }

    #[test]
    fn http_statuses_sort_into_answers() {
        assert_eq!(answer_for(http::StatusCode::OK), Answer::Success);
        assert_eq!(answer_for(http::StatusCode::CONFLICT), Answer::Failure);
        for s in [500, 502, 503, 429, 404, 400] {
            assert_eq!(
                answer_for(http::StatusCode::from_u16(s).unwrap()),
                Answer::Retry,
                "{s}"
            );
        }
    }
}
