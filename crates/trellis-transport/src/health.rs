//! Health that follows the lifecycle: `grpc.health.v1.Health` and HTTP probes.
//!
//! Both read one `watch` channel of the instance [`State`], so they can never
//! disagree. Kubernetes probe semantics: `/livez` fails only when the process
//! should be restarted (here: once it has stopped), `/readyz` passes only
//! while Ready (so a draining instance leaves load balancers before it stops),
//! `/startupz` passes once startup is over.
//!
//! Our own gRPC health service, rather than tonic-health's reporter, because
//! a `Watch` stream is a long-lived HTTP/2 stream: it must end when the
//! listener closes, or every watching client would hold the drain open until
//! the shutdown deadline.

use std::{collections::HashSet, pin::Pin, sync::Arc};

use axum::{Json, Router, extract::State as AxumState, http::StatusCode, routing::get};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::codegen::tokio_stream::Stream;
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse,
    health_check_response::ServingStatus,
    health_server::{Health, HealthServer},
};
use trellis_core::State;

/// The HTTP probe routes (`/livez`, `/readyz`, `/startupz`) over a lifecycle receiver.
pub fn probe_router(state: watch::Receiver<State>) -> Router {
    Router::new()
        .route(
            "/livez",
            get(|s: AxumState<watch::Receiver<State>>| probe(s, State::is_alive)),
        )
        .route(
            "/readyz",
            get(|s: AxumState<watch::Receiver<State>>| probe(s, State::is_ready)),
        )
        .route(
            "/startupz",
            get(|s: AxumState<watch::Receiver<State>>| probe(s, State::has_started)),
        )
        .with_state(state)
}

async fn probe(
    AxumState(rx): AxumState<watch::Receiver<State>>,
    passes: fn(State) -> bool,
) -> (StatusCode, Json<serde_json::Value>) {
    let state = *rx.borrow();
    let (code, status) = if passes(state) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "failing")
    };
    (
        code,
        Json(serde_json::json!({ "status": status, "state": state.as_str() })),
    )
}

/// `grpc.health.v1.Health` over the instance state: SERVING only while Ready.
#[derive(Clone)]
pub(crate) struct LifecycleHealth {
    services: Arc<HashSet<String>>,
    state: watch::Receiver<State>,
    closed: CancellationToken,
}

impl LifecycleHealth {
    /// A health service for `services` (and the whole server, `""`); `closed`
    /// ends open Watch streams when the listener closes.
    pub(crate) fn new(
        services: &[String],
        state: watch::Receiver<State>,
        closed: CancellationToken,
    ) -> HealthServer<LifecycleHealth> {
        HealthServer::new(LifecycleHealth {
            services: Arc::new(services.iter().cloned().collect()),
            state,
            closed,
        })
    }

    fn knows(&self, service: &str) -> bool {
        service.is_empty() || self.services.contains(service)
    }
}

fn serving(state: State) -> ServingStatus {
    if state.is_ready() {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

#[tonic::async_trait]
impl Health for LifecycleHealth {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        let service = &request.get_ref().service;
        if !self.knows(service) {
            return Err(tonic::Status::not_found(format!(
                "unknown service {service:?}"
            )));
        }
        Ok(tonic::Response::new(response(serving(
            *self.state.borrow(),
        ))))
    }

    type WatchStream =
        Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send>>;

    async fn watch(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let known = self.knows(&request.get_ref().service);
        let mut state = self.state.clone();
        let closed = self.closed.clone();
        // Per the protocol an unknown service is reported as SERVICE_UNKNOWN
        // and the stream stays open (the service may appear later).
        let current = move |s: State| {
            if known {
                serving(s)
            } else {
                ServingStatus::ServiceUnknown
            }
        };
        let first = current(*state.borrow_and_update());
        let stream = watch_stream(first, state, closed, current);
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

/// Yields `first`, then each change of status, until the listener closes.
fn watch_stream(
    first: ServingStatus,
    mut state: watch::Receiver<State>,
    closed: CancellationToken,
    current: impl Fn(State) -> ServingStatus + Send + 'static,
) -> impl Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send {
    async_stream(move |tx| async move {
        let mut last = first;
        if tx.send(Ok(response(first))).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                _ = closed.cancelled() => return,
                changed = state.changed() => {
                    if changed.is_err() { return; }
                    let now = current(*state.borrow_and_update());
                    if now != last {
                        last = now;
                        if tx.send(Ok(response(now))).await.is_err() { return; }
                    }
                }
            }
        }
    })
}

/// A stream fed by a task through a small channel; the task stops when the
/// stream is dropped (its sends fail).
fn async_stream<T, F, Fut>(producer: F) -> impl Stream<Item = T> + Send
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(producer(tx));
    tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx)
}
