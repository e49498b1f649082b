//! Submitting sagas from Rust: build the steps, submit to the coordinator
//! (`trellis serve saga`, or the one inside `trellis up`) over gRPC.
//!
//! ```no_run
//! # async fn run(channel: tonic::transport::Channel) -> Result<(), tonic::Status> {
//! use trellis_saga::{client::Saga, log::Endpoint};
//! use trellis_saga::api::v1::saga_service_client::SagaServiceClient;
//!
//! let reserve = b"...".to_vec(); // the Reserve request, encoded
//! let charge = b"...".to_vec();
//! let gid = Saga::new("order-42")
//!     .add(
//!         "reserve",
//!         Endpoint::grpc("inventory", "/shop.inventory.v1.InventoryService/Reserve"),
//!         Endpoint::grpc("inventory", "/shop.inventory.v1.InventoryService/Release"),
//!         reserve,
//!     )
//!     .add(
//!         "charge",
//!         Endpoint::grpc("payment", "/shop.payment.v1.PaymentService/Charge"),
//!         Endpoint::grpc("payment", "/shop.payment.v1.PaymentService/Refund"),
//!         charge,
//!     )
//!     .submit(&mut SagaServiceClient::new(channel))
//!     .await?;
//! # let _ = gid; Ok(()) }
//! ```

use std::time::Duration;

use crate::{
    api::v1::{self, saga_service_client::SagaServiceClient},
    log::Endpoint,
};

/// A saga being put together.
#[derive(Debug, Clone)]
pub struct Saga {
    request: v1::SubmitRequest,
}

impl Endpoint {
    /// A unary gRPC method (`/pkg.Service/Method`) of the service the
    /// registry knows as `service`.
    pub fn grpc(service: impl Into<String>, method: impl Into<String>) -> Endpoint {
        Endpoint::Grpc {
            service: service.into(),
            path: method.into(),
        }
    }

    /// An HTTP endpoint the payload is POSTed to.
    pub fn http(url: impl Into<String>) -> Endpoint {
        Endpoint::Http { url: url.into() }
    }
}

/// The wire form of an endpoint.
pub fn endpoint_to_proto(endpoint: &Endpoint) -> v1::Endpoint {
    v1::Endpoint {
        target: Some(match endpoint {
            Endpoint::Grpc { service, path } => v1::endpoint::Target::Grpc(v1::GrpcEndpoint {
                service: service.clone(),
                method: path.clone(),
            }),
            Endpoint::Http { url } => v1::endpoint::Target::HttpUrl(url.clone()),
        }),
    }
}

/// One step in its wire form.
fn step(
    name: impl Into<String>,
    action: &Endpoint,
    compensate: Option<&Endpoint>,
    confirm: Option<&Endpoint>,
    payload: impl Into<Vec<u8>>,
) -> v1::Step {
    v1::Step {
        name: name.into(),
        action: Some(endpoint_to_proto(action)),
        compensate: compensate.map(endpoint_to_proto),
        payload: payload.into(),
        confirm: confirm.map(endpoint_to_proto),
        after: Vec::new(),
    }
}

impl Saga {
    /// A saga with global id `gid`: choose it so that a retried submit
    /// names the same saga (the order's id, say); the coordinator accepts
    /// the same definition twice and refuses a different one.
    pub fn new(gid: impl Into<String>) -> Saga {
        Saga {
            request: v1::SubmitRequest {
                gid: gid.into(),
                ..Default::default()
            },
        }
    }

    /// Adds a step: `action` forward, `compensate` to undo it, both sent
    /// `payload` (an encoded protobuf request for gRPC, JSON for HTTP).
    pub fn add(
        mut self,
        name: impl Into<String>,
        action: Endpoint,
        compensate: Endpoint,
        payload: impl Into<Vec<u8>>,
    ) -> Saga {
        self.request
            .steps
            .push(step(name, &action, Some(&compensate), None, payload));
        self
    }

    /// Runs the steps concurrently: each starts once the steps named in
    /// its [`after`](Self::after) succeeded (at once when none), and is
    /// undone after the steps that waited for it.
    pub fn concurrent(mut self) -> Saga {
        self.request.concurrent = true;
        self
    }

    /// The last step added waits for these earlier ones (concurrent
    /// transactions).
    pub fn after(mut self, steps: &[&str]) -> Saga {
        if let Some(last) = self.request.steps.last_mut() {
            last.after = steps.iter().map(|s| (*s).to_owned()).collect();
        }
        self
    }

    /// A TCC transaction with global id `gid`: add its branches with
    /// [`add_tcc`](Self::add_tcc).
    pub fn tcc(gid: impl Into<String>) -> Saga {
        let mut saga = Saga::new(gid);
        saga.request.kind = v1::Kind::Tcc as i32;
        saga
    }

    /// Adds a TCC branch: `try_` reserves, `confirm` makes it final once
    /// every branch's Try succeeded, `cancel` releases it when one failed.
    pub fn add_tcc(
        mut self,
        name: impl Into<String>,
        try_: Endpoint,
        confirm: Endpoint,
        cancel: Endpoint,
        payload: impl Into<Vec<u8>>,
    ) -> Saga {
        self.request
            .steps
            .push(step(name, &try_, Some(&cancel), Some(&confirm), payload));
        self
    }

    /// A two-phase message with global id `gid`, checked back at `query`
    /// (which answers with [`barrier::grpc_query`](crate::barrier::grpc_query)
    /// or [`barrier::query_prepared`](crate::barrier::query_prepared)): add
    /// its branches with [`add_msg`](Self::add_msg), [`prepare`](Self::prepare)
    /// it, run the local transaction in
    /// [`barrier::msg_branch`](crate::barrier::msg_branch), then
    /// [`submit`](Self::submit).
    pub fn msg(gid: impl Into<String>, query: Endpoint) -> Saga {
        let mut saga = Saga::new(gid);
        saga.request.kind = v1::Kind::Msg as i32;
        saga.request.query = Some(endpoint_to_proto(&query));
        saga
    }

    /// Adds a message branch: `action`, retried until it succeeds.
    pub fn add_msg(
        mut self,
        name: impl Into<String>,
        action: Endpoint,
        payload: impl Into<Vec<u8>>,
    ) -> Saga {
        self.request
            .steps
            .push(step(name, &action, None, None, payload));
        self
    }

    /// Records a message as prepared (before its local transaction); then
    /// [`submit`](Self::submit) it once the local transaction committed.
    pub async fn prepare<T>(&self, client: &mut SagaServiceClient<T>) -> Result<(), tonic::Status>
    where
        T: tonic::client::GrpcService<tonic::body::Body>,
        T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        <T::ResponseBody as http_body::Body>::Error:
            Into<Box<dyn std::error::Error + Send + Sync>> + Send,
    {
        client.prepare(self.request.clone()).await.map(drop)
    }

    /// How long forward steps may keep failing retryably before the saga
    /// compensates (the coordinator's default: 60 s).
    pub fn timeout_to_fail(mut self, timeout: Duration) -> Saga {
        self.request.timeout_to_fail = Some(prost_types::Duration {
            seconds: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(timeout.subsec_nanos()).unwrap_or(0),
        });
        self
    }

    /// Its global id.
    pub fn gid(&self) -> &str {
        &self.request.gid
    }

    /// The request [`submit`](Self::submit) sends.
    pub fn into_request(self) -> v1::SubmitRequest {
        self.request
    }

    /// Submits it; once this returns, the saga is in the coordinator's log
    /// and will run to the end whatever crashes. Its gid.
    pub async fn submit<T>(self, client: &mut SagaServiceClient<T>) -> Result<String, tonic::Status>
    where
        T: tonic::client::GrpcService<tonic::body::Body>,
        T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        <T::ResponseBody as http_body::Body>::Error:
            Into<Box<dyn std::error::Error + Send + Sync>> + Send,
    {
        Ok(client.submit(self.request).await?.into_inner().gid)
    }
}
