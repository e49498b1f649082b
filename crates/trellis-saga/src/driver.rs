//! The coordinator's loop: claim due sagas from the [`SagaLog`], drive each
//! through the [`machine`](crate::machine) — persisting before every call
//! and after every answer — and schedule retries with exponential backoff
//! and jitter. Because every step is persisted first, a coordinator killed
//! at any moment leaves sagas another one (or itself, restarted) resumes
//! where they stood; the participants' barriers absorb the repeated calls.
//!
//! Branches are called through a [`Caller`]: [`HttpCaller`] POSTs the
//! step's payload with the branch headers (`trellis-saga-gid`, `-branch`,
//! `-op`) and sorts the answer: 2xx success, 409 a definite failure,
//! anything else (5xx, 429, no answer within the deadline) a retry.

use std::{sync::Arc, time::Duration};

use futures_util::future::BoxFuture;

use crate::{
    barrier::{Branch, Op},
    log::{Claimed, Endpoint, LogError, SagaLog},
    machine::{Answer, Next},
};

/// Calls one branch operation; the answer, and a description of it for
/// the log and the saga's failure reason.
pub trait Caller: Send + Sync + 'static {
    /// Sends `payload` to `endpoint` as `branch`, within `deadline`.
    fn call<'a>(
        &'a self,
        endpoint: &'a Endpoint,
        branch: &'a Branch,
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
        branch: &'a Branch,
        payload: &'a [u8],
        deadline: Duration,
    ) -> BoxFuture<'a, (Answer, String)> {
        Box::pin(async move {
            let Endpoint::Http { url } = endpoint else {
                return (Answer::Retry, "not an HTTP endpoint".to_owned());
            };
            let mut request = http::Request::post(url.as_str())
                .header(http::header::CONTENT_TYPE, "application/json");
            match branch.headers() {
                Ok(headers) => {
                    for (name, value) in headers {
                        request = request.header(name, value);
                    }
                }
                Err(e) => return (Answer::Failure, e.to_string()),
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

/// A gRPC channel to a participant (cheap to clone; reconnects itself).
pub type GrpcChannel = tonic::transport::Channel;

/// Branches over gRPC: unary calls whose request message is the step's
/// payload (protobuf bytes), with the branch headers as metadata, on the
/// channel `channels` gives for the endpoint's service. The answer's status
/// decides: OK success; ABORTED or FAILED_PRECONDITION a definite failure;
/// anything else a retry.
#[derive(Clone)]
pub struct GrpcCaller {
    channels: Arc<ChannelFor>,
}

/// Finds the channel to a service, by its name.
type ChannelFor = dyn Fn(&str) -> Option<GrpcChannel> + Send + Sync;

impl GrpcCaller {
    /// A caller that finds each service's channel with `channels`.
    pub fn new(channels: impl Fn(&str) -> Option<GrpcChannel> + Send + Sync + 'static) -> Self {
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
        branch: &'a Branch,
        payload: &'a [u8],
        deadline: Duration,
    ) -> BoxFuture<'a, (Answer, String)> {
        Box::pin(async move {
            let Endpoint::Grpc { service, path } = endpoint else {
                return (Answer::Retry, "not a gRPC endpoint".to_owned());
            };
            let Some(channel) = (self.channels)(service) else {
                return (Answer::Retry, format!("{service}: no channel"));
            };
            let Ok(path) = http::uri::PathAndQuery::try_from(path.as_str()) else {
                return (Answer::Failure, format!("{path:?} is not a method path"));
            };
            let mut request = tonic::Request::new(bytes::Bytes::copy_from_slice(payload));
            request.set_timeout(deadline);
            match branch.headers() {
                Ok(headers) => {
                    for (name, value) in headers {
                        if let (Ok(key), Ok(value)) = (
                            tonic::metadata::MetadataKey::from_bytes(name.as_str().as_bytes()),
                            tonic::metadata::MetadataValue::try_from(value.as_bytes()),
                        ) {
                            request.metadata_mut().insert(key, value);
                        }
                    }
                }
                Err(e) => return (Answer::Failure, e.to_string()),
            }
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

/// One unary call of raw bytes on `channel`.
async fn unary(
    channel: GrpcChannel,
    path: http::uri::PathAndQuery,
    request: tonic::Request<bytes::Bytes>,
) -> Result<tonic::Response<bytes::Bytes>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    grpc.unary(request, path, RawCodec).await
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
        branch: &'a Branch,
        payload: &'a [u8],
        deadline: Duration,
    ) -> BoxFuture<'a, (Answer, String)> {
        match endpoint {
            Endpoint::Http { .. } => self.http.call(endpoint, branch, payload, deadline),
            Endpoint::Grpc { .. } => self.grpc.call(endpoint, branch, payload, deadline),
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
        }
    }
}

/// Drives sagas from a log.
#[derive(Clone)]
pub struct Driver {
    log: SagaLog,
    caller: Arc<dyn Caller>,
    config: DriverConfig,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Driver {
    /// A driver over `log`, calling branches with `caller`.
    pub fn new(log: SagaLog, caller: Arc<dyn Caller>, config: DriverConfig) -> Driver {
        Driver {
            log,
            caller,
            config,
        }
    }

    /// Claims what is due and drives each saga until it ends or waits for
    /// a retry; how many it claimed.
    pub async fn run_once(&self) -> Result<usize, LogError> {
        let claimed = self
            .log
            .claim(&self.config.owner, self.config.lease, self.config.batch)
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

    /// Runs until `stop`: claims every `poll` what is due.
    pub async fn run(self, poll: Duration, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            if let Err(e) = self.run_once().await {
                tracing::warn!(error = %e, "saga driver round failed");
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }

    async fn drive(&self, mut claimed: Claimed) -> Result<(), LogError> {
        let owner = self.config.owner.clone();
        let lease = self.config.lease;
        let definition = claimed.record.definition.clone();
        let gid = claimed.record.gid.clone();
        let mut state = claimed.record.state.clone();
        loop {
            // A forward step retried past the saga's timeout_to_fail turns
            // the saga round.
            let age = trellis_store::now_ms().saturating_sub(claimed.record.create_time_ms);
            if age > i64::try_from(definition.timeout_to_fail_ms).unwrap_or(i64::MAX) {
                state.time_out(&format!(
                    "no step answered for good within {} ms",
                    definition.timeout_to_fail_ms
                ));
            }
            let (step, op) = match state.next() {
                Next::Done(_) => {
                    self.log
                        .save(&mut claimed, &owner, &state, i64::MAX, lease)
                        .await?;
                    return self.log.release(&claimed, &owner).await;
                }
                Next::Call { step, op } => (step, op),
            };
            let Some(def) = definition.steps.get(step) else {
                return Err(LogError::Corrupt {
                    gid,
                    what: "definition",
                    reason: format!("no step {step}"),
                });
            };
            // Persisted before the call: after a crash here the step counts
            // as possibly done, and is compensated if the saga turns round.
            state.calling(step, op);
            self.log
                .save(&mut claimed, &owner, &state, 0, lease)
                .await?;
            let branch = Branch::new(&gid, &def.name, op);
            let endpoint = if op == Op::Action {
                &def.action
            } else {
                &def.compensate
            };
            let (answer, said) = self
                .caller
                .call(endpoint, &branch, &def.payload, self.config.call_timeout)
                .await;
            state.record_with(step, op, answer, &said);
            if answer == Answer::Retry {
                let attempts = state.steps[step].attempts;
                let delay = backoff(self.config.backoff, self.config.max_backoff, attempts);
                tracing::debug!(%gid, step = %def.name, op = op.as_str(), %said, ?delay, "branch to retry");
                let due = trellis_store::now_ms().saturating_add(ms(delay));
                self.log
                    .save(&mut claimed, &owner, &state, due, lease)
                    .await?;
                return self.log.release(&claimed, &owner).await;
            }
            self.log
                .save(&mut claimed, &owner, &state, 0, lease)
                .await?;
        }
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
