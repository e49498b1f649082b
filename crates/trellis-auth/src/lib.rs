//! Authentication for Trellis services and the gateway: bearer JWTs
//! verified against a key set (JWKS), access rules by path, and a tower
//! layer that enforces them on HTTP routes and gRPC methods alike.
//!
//! What a token must be to pass:
//! - a compact JWS of at most [`MAX_TOKEN_BYTES`], signed with an
//!   algorithm on the allowlist (Ed25519, ES256, RS256 by default; never
//!   `none`, never `HS*` from a key set), by a key of the configured set —
//!   `jku`, `x5u` and `jwk` headers are never followed and `kid` is only a
//!   map key;
//! - `typ` absent or accepted (`JWT`, `at+jwt`), no `crit`;
//! - `iss` and `aud` accepted, `sub` and `exp` present, `exp`/`nbf` within
//!   a small leeway.
//!
//! Refusals answer in the platform's error model: 401 with
//! `WWW-Authenticate: Bearer …` (UNAUTHENTICATED for gRPC), 403 naming the
//! missing permission (PERMISSION_DENIED), 503 while no key set has ever
//! been fetched.
//!
//! ```no_run
//! use std::sync::Arc;
//! use trellis_auth::{Access, AuthLayer, Jwks, JwksTiming, Policy, UrlSource, Verifier, VerifierConfig};
//!
//! # fn layer() -> Result<AuthLayer, String> {
//! let keys = Jwks::new(
//!     UrlSource::new("http://127.0.0.1:8081/.well-known/jwks.json", None)?,
//!     JwksTiming::default(),
//! );
//! let verifier = Arc::new(Verifier::new(VerifierConfig::new("https://auth.shop", "shop"), keys)?);
//! let policy = Policy::new()
//!     .rule("/v1/products*", Access::Public)
//!     .rule("/shop.order.v1.Orders/*", Access::Require(vec!["orders:write".into()]));
//! Ok(AuthLayer::new(verifier, policy))
//! # }
//! ```

#![warn(missing_docs)]

pub mod audit;
mod claims;
mod fetch;
pub mod jwks;
mod layer;
mod settings;
mod sign;
mod verify;

pub use claims::Claims;
pub use jsonwebtoken::{Algorithm, Header, jwk::JwkSet};
pub use jwks::{FileSource, Jwks, JwksTiming, KeySource, StaticSource, UrlSource};
pub use layer::{Access, Auth, AuthLayer, Policy, with_identity};
pub use settings::{AuthSettings, PolicySettings, SettingsError, VerifierSettings};
pub use sign::SigningKey;
pub use verify::{MAX_TOKEN_BYTES, Refusal, Verifier, VerifierConfig, bearer, forbidden};
