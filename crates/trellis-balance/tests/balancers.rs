//! Properties of the balancing algorithms.

use std::{collections::HashMap, sync::Arc, time::Duration};

use proptest::prelude::*;
use trellis_balance::{
    Balancer, ConsistentHash, Endpoint, LeastRequest, P2cEwma, PickSet, RandomPick, RoundRobin,
    SmoothWeightedRoundRobin, hash_key, now_ns,
};

fn endpoints(weights: &[u32]) -> Vec<Arc<Endpoint>> {
    weights
        .iter()
        .enumerate()
        .map(|(i, w)| {
            Arc::new(Endpoint::new(
                format!("e{i}"),
                format!("10.0.0.{i}:80"),
                *w,
                "",
            ))
        })
        .collect()
}

proptest! {
    /// Over one cycle of sum(weights) picks, each endpoint is picked exactly
    /// `weight` times — from any starting state, every cycle.
    #[test]
    fn smooth_wrr_hits_exact_proportions_every_cycle(weights in proptest::collection::vec(1u32..20, 1..8), cycles in 1usize..4) {
        let set = PickSet::new(&SmoothWeightedRoundRobin, endpoints(&weights));
        let total: u32 = weights.iter().sum();
        for _ in 0..cycles {
            let mut counts = vec![0u32; weights.len()];
            for _ in 0..total {
                counts[set.pick(None, 0).unwrap()] += 1;
            }
            prop_assert_eq!(&counts, &weights);
        }
    }

    /// Adding a node moves only keys to the new node, about 1/(n+1) of them;
    /// removing one moves only that node's keys.
    #[test]
    fn consistent_hash_moves_about_one_nth_of_keys(n in 3usize..12) {
        let keys: Vec<u64> = (0..4000u32).map(|k| hash_key(format!("key-{k}").as_bytes())).collect();
        let before = endpoints(&vec![100; n]);
        let ring = |eps: &[Arc<Endpoint>]| PickSet::new(&ConsistentHash::default(), eps.to_vec());
        let owner = |set: &PickSet, k: u64| set.endpoints()[set.pick(Some(k), 0).unwrap()].id().to_owned();
        let first = ring(&before);
        let placed: Vec<String> = keys.iter().map(|k| owner(&first, *k)).collect();

        let after = endpoints(&vec![100; n + 1]);
        let grown = ring(&after);
        let new_id = after[n].id().to_owned();
        let mut moved = 0;
        for (k, was) in keys.iter().zip(&placed) {
            let now = owner(&grown, *k);
            if &now != was {
                prop_assert_eq!(&now, &new_id, "a key moved between two old nodes");
                moved += 1;
            }
        }
        let share = moved as f64 / keys.len() as f64;
        let expected = 1.0 / (n + 1) as f64;
        prop_assert!(share > expected * 0.5 && share < expected * 1.6, "moved {share:.3}, expected ~{expected:.3}");

        // Remove node 0: only its keys move.
        let fewer = ring(&before[1..]);
        for (k, was) in keys.iter().zip(&placed) {
            if was != "e0" {
                prop_assert_eq!(&owner(&fewer, *k), was);
            }
        }
    }
}

#[test]
fn smooth_wrr_interleaves_like_nginx() {
    // nginx's documented example: weights 5, 1, 1 give a a b a c a a.
    let set = PickSet::new(&SmoothWeightedRoundRobin, endpoints(&[5, 1, 1]));
    let seq: String = (0..7)
        .map(|_| ["a", "b", "c"][set.pick(None, 0).unwrap()])
        .collect();
    assert_eq!(seq, "aabacaa");
}

#[test]
fn p2c_steers_away_from_a_slow_endpoint() {
    let eps = endpoints(&[100, 100, 100, 100]);
    for (i, e) in eps.iter().enumerate() {
        e.observe(Duration::from_millis(if i == 3 { 100 } else { 1 }));
    }
    let set = PickSet::new(&P2cEwma, eps);
    let mut counts = [0u32; 4];
    for _ in 0..10_000 {
        counts[set.pick(None, 0).unwrap()] += 1;
    }
    assert!(
        counts[3] < 100,
        "slow endpoint got {} of 10000 picks: {counts:?}",
        counts[3]
    );
    for (i, c) in counts.iter().take(3).enumerate() {
        assert!(*c > 2500, "fast endpoint {i} got only {c}: {counts:?}");
    }
}

#[test]
fn p2c_shifts_load_to_an_idle_endpoint_when_one_queues_up() {
    let eps = endpoints(&[100, 100]);
    for e in &eps {
        e.observe(Duration::from_millis(5));
    }
    for _ in 0..20 {
        eps[0].start();
    }
    let set = PickSet::new(&P2cEwma, eps);
    assert!((0..100).all(|_| set.pick(None, 0) == Some(1)));
}

/// A discrete simulation: endpoint 0 finishes one request every 8 ticks, the
/// others finish everything each tick. Round robin lets the slow endpoint's
/// queue grow without bound; least-request keeps it short.
fn max_queue_on_slow_endpoint(b: &dyn Balancer) -> u32 {
    let eps = endpoints(&[100, 100, 100]);
    let set = PickSet::new(b, eps.clone());
    let mut max_slow = 0;
    for tick in 0..8000u32 {
        for _ in 0..2 {
            let i = set.pick(None, 0).unwrap();
            eps[i].start();
        }
        if tick % 8 == 0 && eps[0].in_flight() > 0 {
            eps[0].finish(Duration::from_millis(8));
        }
        for e in &eps[1..] {
            while e.in_flight() > 0 {
                e.finish(Duration::from_millis(1));
            }
        }
        max_slow = max_slow.max(eps[0].in_flight());
    }
    max_slow
}

#[test]
fn least_request_balances_uneven_handlers() {
    let rr = max_queue_on_slow_endpoint(&RoundRobin);
    let lr = max_queue_on_slow_endpoint(&LeastRequest);
    assert!(
        rr > 1000,
        "round robin should pile up on the slow endpoint, got {rr}"
    );
    assert!(
        lr < 20,
        "least-request let the slow endpoint queue {lr} requests"
    );
}

#[test]
fn every_balancer_spreads_over_all_endpoints_and_handles_empty_sets() {
    for b in all_balancers() {
        let empty = PickSet::new(b.as_ref(), Vec::new());
        assert_eq!(empty.pick(None, 0), None, "{}", b.name());
        assert_eq!(empty.pick(Some(7), u64::MAX), None, "{}", b.name());
        let set = PickSet::new(b.as_ref(), endpoints(&[100, 100, 100]));
        let mut seen = HashMap::new();
        for k in 0..600u32 {
            let key = Some(hash_key(&k.to_le_bytes()));
            *seen.entry(set.pick(key, 0).unwrap()).or_insert(0) += 1;
        }
        assert_eq!(
            seen.len(),
            3,
            "{} never picked some endpoint: {seen:?}",
            b.name()
        );
    }
}

fn all_balancers() -> Vec<Box<dyn Balancer>> {
    vec![
        Box::new(P2cEwma),
        Box::new(RoundRobin),
        Box::new(SmoothWeightedRoundRobin),
        Box::new(LeastRequest),
        Box::new(RandomPick),
        Box::new(ConsistentHash::default()),
    ]
}

/// Ejection is honoured inside every algorithm: an ejected endpoint is
/// never picked while others are not, its share spreads over the rest, and
/// with everything ejected a pick says so (the pool then tries anyway).
#[test]
fn every_balancer_skips_ejected_endpoints() {
    for b in all_balancers() {
        let eps = endpoints(&[100, 100, 100, 100]);
        let set = PickSet::new(b.as_ref(), eps.clone());
        // Before: endpoint 1 is picked (the skip below is not vacuous).
        let hits = |now: u64| {
            let mut counts = [0u32; 4];
            for k in 0..4000u32 {
                let key = Some(hash_key(&k.to_le_bytes()));
                counts[set.pick(key, now).unwrap()] += 1;
            }
            counts
        };
        let before = hits(now_ns());
        assert!(before[1] > 0, "{}: {before:?}", b.name());

        let minute = Duration::from_secs(60);
        eps[1].eject(minute, minute);
        let after = hits(now_ns());
        assert_eq!(
            after[1],
            0,
            "{} picked an ejected endpoint: {after:?}",
            b.name()
        );
        for i in [0, 2, 3] {
            assert!(
                after[i] > 600,
                "{}: {i} got too little of the ejected share: {after:?}",
                b.name()
            );
        }
        // Ejection does not apply at u64::MAX.
        assert!(hits(u64::MAX)[1] > 0, "{}", b.name());

        for e in &eps {
            e.eject(minute, minute);
        }
        assert_eq!(set.pick(Some(1), now_ns()), None, "{}", b.name());
    }
}
