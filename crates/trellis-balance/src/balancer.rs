//! The balancing algorithms.
//!
//! A [`Balancer`] is an algorithm; [`Balancer::prepare`] turns one endpoint
//! set into a [`Picker`] holding whatever the algorithm precomputes for it
//! (the consistent-hash ring, the weighted schedule, round-robin counters).
//! The picker belongs to an immutable [`PickSet`] that is swapped whole when
//! the set changes, so a pick takes no lock: it reads the picker, bumps at
//! most one per-thread counter, and skips endpoints ejected at the time it
//! is given.

mod consistent_hash;
mod least_request;
mod p2c;
mod random;
mod round_robin;
mod weighted;

use std::sync::Arc;

pub use consistent_hash::{ConsistentHash, MAX_RING_POINTS};
pub use least_request::LeastRequest;
pub use p2c::P2cEwma;
pub use random::RandomPick;
pub use round_robin::RoundRobin;
pub use weighted::{MAX_SCHEDULE, SmoothWeightedRoundRobin};

use crate::{Endpoint, rng};

/// A load-balancing algorithm.
pub trait Balancer: Send + Sync + 'static {
    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;

    /// What the algorithm keeps for picking from `endpoints`; called once
    /// per endpoint set, off the request path.
    fn prepare(&self, endpoints: &[Arc<Endpoint>]) -> Box<dyn Picker>;
}

/// Picks from one endpoint set, prepared by a [`Balancer`].
pub trait Picker: Send + Sync + 'static {
    /// An index into `endpoints` — the slice this picker was prepared for —
    /// of an endpoint not ejected at `now` (see [`Endpoint::is_ejected_at`];
    /// `u64::MAX` considers none ejected). `key` is the request's hash key,
    /// if any. `None` when every endpoint is ejected, or there are none.
    fn pick(&self, endpoints: &[Arc<Endpoint>], key: Option<u64>, now: u64) -> Option<usize>;
}

/// An endpoint set with its prepared picker: what a pool swaps in whole
/// when discovery reports a change.
///
/// ```
/// use std::sync::Arc;
/// use trellis_balance::{Endpoint, PickSet, SmoothWeightedRoundRobin};
///
/// let endpoints = vec![
///     Arc::new(Endpoint::new("a", "10.0.0.1:80", 2, "")),
///     Arc::new(Endpoint::new("b", "10.0.0.2:80", 1, "")),
/// ];
/// let set = PickSet::new(&SmoothWeightedRoundRobin, endpoints);
/// let picks: Vec<&str> = (0..3)
///     .map(|_| set.endpoints()[set.pick(None, 0).unwrap()].id())
///     .collect();
/// assert_eq!(picks, ["a", "b", "a"]);
/// ```
pub struct PickSet {
    endpoints: Box<[Arc<Endpoint>]>,
    picker: Box<dyn Picker>,
}

impl PickSet {
    /// `endpoints` prepared for `balancer`.
    pub fn new(balancer: &dyn Balancer, endpoints: Vec<Arc<Endpoint>>) -> PickSet {
        let picker = balancer.prepare(&endpoints);
        PickSet {
            endpoints: endpoints.into_boxed_slice(),
            picker,
        }
    }

    /// The endpoints, in the order picks index them.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Picks an endpoint not ejected at `now` ([`crate::now_ns`]; 0 or
    /// `u64::MAX` when ejection does not matter).
    #[inline]
    pub fn pick(&self, key: Option<u64>, now: u64) -> Option<usize> {
        self.picker.pick(&self.endpoints, key, now)
    }
}

impl std::fmt::Debug for PickSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PickSet")
            .field("endpoints", &self.endpoints.len())
            .finish_non_exhaustive()
    }
}

/// Random draws tried before a scan; with at most half the set ejected
/// (the default cap) four draws all miss one time in sixteen.
const DRAWS: usize = 4;

/// A uniformly random endpoint not ejected at `now`, other than `except`.
pub(crate) fn random_eligible(
    endpoints: &[Arc<Endpoint>],
    now: u64,
    except: Option<usize>,
) -> Option<usize> {
    let n = endpoints.len();
    if n == 0 {
        return None;
    }
    let usable = |i: usize| Some(i) != except && !endpoints[i].is_ejected_at(now);
    for _ in 0..DRAWS {
        let i = rng::below(n);
        if usable(i) {
            return Some(i);
        }
    }
    // Mostly ejected (or tiny): scan from a random start.
    let start = rng::below(n);
    (0..n).map(|k| (start + k) % n).find(|&i| usable(i))
}

/// Two distinct random endpoints not ejected at `now` — one when only one
/// is left — for the power-of-two-choices balancers.
pub(crate) fn two_eligible(
    endpoints: &[Arc<Endpoint>],
    now: u64,
) -> Option<(usize, Option<usize>)> {
    match endpoints.len() {
        0 => None,
        1 => (!endpoints[0].is_ejected_at(now)).then_some((0, None)),
        n => {
            let (a, b) = rng::two_below(n);
            let (ok_a, ok_b) = (
                !endpoints[a].is_ejected_at(now),
                !endpoints[b].is_ejected_at(now),
            );
            match (ok_a, ok_b) {
                (true, true) => Some((a, Some(b))),
                (true, false) => Some((a, random_eligible(endpoints, now, Some(a)))),
                (false, true) => Some((b, random_eligible(endpoints, now, Some(b)))),
                (false, false) => {
                    let a = random_eligible(endpoints, now, None)?;
                    Some((a, random_eligible(endpoints, now, Some(a))))
                }
            }
        }
    }
}

/// The first endpoint not ejected at `now` among `at(start)`,
/// `at(start + 1)`, … (`len` positions, wrapping): how the schedule-driven
/// pickers skip an ejected endpoint — the next one in turn takes the pick.
#[inline]
pub(crate) fn first_eligible(
    endpoints: &[Arc<Endpoint>],
    len: usize,
    start: usize,
    now: u64,
    at: impl Fn(usize) -> usize,
) -> Option<usize> {
    if len == 0 {
        return None;
    }
    let start = start % len;
    (0..len)
        .map(|k| at((start + k) % len))
        .find(|&i| !endpoints[i].is_ejected_at(now))
}
