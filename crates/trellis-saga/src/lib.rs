//! Distributed transactions for Trellis services, in the spirit of dtm.
//!
//! [`machine`] is the coordinator's state machine, pure: what to call next
//! and what an answer changes (property-tested with random answers and
//! crash points). [`barrier`] is the participant's side: the one call a
//! branch handler wraps its work in, so that whatever a coordinator's
//! retries and the network do — a branch delivered twice, a compensation
//! arriving for a step that never ran, a step arriving after its
//! compensation — each branch operation has its effect once, in the
//! participant's own database transaction (SQLite or PostgreSQL).
//!
//! ```no_run
//! # async fn run(pool: &trellis_store::Pool) -> Result<(), Box<dyn std::error::Error>> {
//! use trellis_saga::barrier::{self, Branch, Op};
//!
//! // The barrier's table joins the participant's migrations:
//! let migrations = trellis_store::migrator("_inventory_migrations", &[barrier::MIGRATION]);
//! let branch = Branch::new("order-42", "reserve", Op::Action);
//! let outcome = barrier::run(pool, &branch, |tx| Box::pin(async move {
//!     trellis_store::with_tx!(tx, c => sqlx::query("UPDATE stock SET n = n - 1 WHERE sku = 'tea'")
//!         .execute(&mut **c).await.map(drop))
//! })).await?;
//! # let _ = (migrations, outcome); Ok(()) }
//! ```
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `sqlite` | yes | participants on SQLite |
//! | `postgres` | yes | participants on PostgreSQL |
//! | `service` | no | the coordinator as a Trellis service ([`service`]) |

#![warn(missing_docs)]

pub mod api;
pub mod barrier;
pub mod client;
pub mod driver;
pub mod log;
pub mod machine;
#[cfg(feature = "service")]
pub mod service;
