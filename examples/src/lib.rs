//! Small whole programs using Trellis, compiled and run by the test suite:
//!
//! | program | shows |
//! |---|---|
//! | `hello` | a service: one proto gives gRPC and REST on one port, with validation, the default stack, health, metrics and config |
//! | `hello-client` | a client: discovery, balancing and the resilient client stack, configured in code |
//! | `axum-layers` | a plain axum app under Trellis' server stack, with `/metrics` |
//!
//! The hello service itself is here, so the client can run it too:
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use trellis::{App, config::Config, service::bind, transport::ServerConfig};
//! use trellis_examples::{Hello, HelloSettings};
//!
//! let config = Config::<HelloSettings>::builder().env("TRELLIS").build().await?;
//! let bound = bind::<Hello>(config, "./.trellis".as_ref(), ServerConfig::default()).await?;
//! bound.into_app(App::builder("hello")).run().await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

// The README's Rust snippets, compiled (and type-checked against this
// crate's generated code) as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct Readme;

use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use trellis::{
    config::{Invalid, Validate},
    core::BoxError,
    service::{Context, Service, ServiceSettings},
    settings::{LogSettings, OtlpSettings, ServerSettings},
    transport::GrpcHttpServerBuilder,
};

/// Generated from `proto/hello/v1/hello.proto`.
#[allow(missing_docs, clippy::all)]
pub mod api {
    include!(concat!(env!("OUT_DIR"), "/hello.v1.rs"));

    /// The encoded descriptor set (with imports).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/hello_v1.bin"));
}

/// The hello service's settings: its own, and the ones every service has.
///
/// ```toml
/// greeting = "hello"   # restart
/// [server]
/// request_timeout = "5s"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HelloSettings {
    /// The word before the name. Default: `hello`.
    pub greeting: String,
    /// Server limits and timeouts.
    pub server: ServerSettings,
    /// Logging.
    pub log: LogSettings,
    /// OTLP export.
    pub otlp: OtlpSettings,
}

impl Default for HelloSettings {
    fn default() -> Self {
        HelloSettings {
            greeting: "hello".into(),
            server: ServerSettings::default(),
            log: LogSettings::default(),
            otlp: OtlpSettings::default(),
        }
    }
}

impl Validate for HelloSettings {
    fn validate(&self) -> Result<(), Invalid> {
        if self.greeting.is_empty() || self.greeting.len() > 64 {
            return Err(Invalid::new("greeting", "must be 1 to 64 bytes"));
        }
        self.server.validate("server")
    }
}

impl ServiceSettings for HelloSettings {
    fn server(&self) -> &ServerSettings {
        &self.server
    }

    fn log(&self) -> &LogSettings {
        &self.log
    }

    fn otlp(&self) -> &OtlpSettings {
        &self.otlp
    }
}

/// The hello service.
pub struct Hello;

impl Service for Hello {
    type Settings = HelloSettings;
    const NAME: &'static str = "hello";
    const PORT_OFFSET: u16 = 10;
    const DESCRIPTORS: &'static [u8] = api::FILE_DESCRIPTOR_SET;
    const GRPC_SERVICES: &'static [&'static str] = &["hello.v1.Greeter"];

    async fn build(
        ctx: Context<'_, HelloSettings>,
        server: GrpcHttpServerBuilder,
    ) -> Result<(Hello, GrpcHttpServerBuilder), BoxError> {
        let greeter = Greeter::new(ctx.settings.greeting.clone());
        let server = server.grpc_service(api::greeter_server::GreeterServer::new(greeter));
        Ok((Hello, server))
    }
}

/// The `Greeter` handler: no I/O, so a benchmark of it measures the
/// server around it (`scripts/bench/echo.sh`).
pub struct Greeter {
    greeting: String,
}

impl Greeter {
    /// Greets with `greeting`.
    pub fn new(greeting: impl Into<String>) -> Greeter {
        Greeter {
            greeting: greeting.into(),
        }
    }
}

#[tonic::async_trait]
impl api::greeter_server::Greeter for Greeter {
    async fn say_hello(
        &self,
        request: Request<api::SayHelloRequest>,
    ) -> Result<Response<api::SayHelloReply>, Status> {
        // `name` is REQUIRED in the proto: the server refused an empty one
        // before this runs, on both faces.
        let name = request.into_inner().name;
        Ok(Response::new(api::SayHelloReply {
            message: format!("{}, {name}", self.greeting),
        }))
    }
}
