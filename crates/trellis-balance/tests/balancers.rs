//! Properties of the balancing algorithms.

use std::{collections::HashMap, sync::Arc, time::Duration};

use proptest::prelude::*;
use trellis_balance::{
    Balancer, ConsistentHash, Endpoint, LeastRequest, P2cEwma, RoundRobin,
    SmoothWeightedRoundRobin, hash_key,
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
        let eps = endpoints(&weights);
        let b = SmoothWeightedRoundRobin::new();
        b.rebuild(&eps);
        let total: u32 = weights.iter().sum();
        for _ in 0..cycles {
            let mut counts = vec![0u32; eps.len()];
            for _ in 0..total {
                counts[b.pick(&eps, None).unwrap()] += 1;
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
        let ring = ConsistentHash::default();
        ring.rebuild(&before);
        let owner = |eps: &[Arc<Endpoint>], ring: &ConsistentHash, k: u64| eps[ring.pick(eps, Some(k)).unwrap()].id().to_owned();
        let placed: Vec<String> = keys.iter().map(|k| owner(&before, &ring, *k)).collect();

        let after = endpoints(&vec![100; n + 1]);
        ring.rebuild(&after);
        let new_id = after[n].id().to_owned();
        let mut moved = 0;
        for (k, was) in keys.iter().zip(&placed) {
            let now = owner(&after, &ring, *k);
            if &now != was {
                prop_assert_eq!(&now, &new_id, "a key moved between two old nodes");
                moved += 1;
            }
        }
        let share = moved as f64 / keys.len() as f64;
        let expected = 1.0 / (n + 1) as f64;
        prop_assert!(share > expected * 0.5 && share < expected * 1.6, "moved {share:.3}, expected ~{expected:.3}");

        // Remove node 0: only its keys move.
        let fewer: Vec<Arc<Endpoint>> = before[1..].to_vec();
        ring.rebuild(&before);
        ring.rebuild(&fewer);
        for (k, was) in keys.iter().zip(&placed) {
            if was != "e0" {
                prop_assert_eq!(&owner(&fewer, &ring, *k), was);
            }
        }
    }
}

#[test]
fn smooth_wrr_interleaves_like_nginx() {
    // nginx's documented example: weights 5, 1, 1 give a a b a c a a.
    let eps = endpoints(&[5, 1, 1]);
    let b = SmoothWeightedRoundRobin::new();
    let seq: String = (0..7)
        .map(|_| ["a", "b", "c"][b.pick(&eps, None).unwrap()])
        .collect();
    assert_eq!(seq, "aabacaa");
}

#[test]
fn p2c_steers_away_from_a_slow_endpoint() {
    let eps = endpoints(&[100, 100, 100, 100]);
    for (i, e) in eps.iter().enumerate() {
        e.observe(Duration::from_millis(if i == 3 { 100 } else { 1 }));
    }
    let b = P2cEwma;
    let mut counts = [0u32; 4];
    for _ in 0..10_000 {
        counts[b.pick(&eps, None).unwrap()] += 1;
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
    let b = P2cEwma;
    assert!((0..100).all(|_| b.pick(&eps, None) == Some(1)));
}

/// A discrete simulation: endpoint 0 finishes one request every 8 ticks, the
/// others finish everything each tick. Round robin lets the slow endpoint's
/// queue grow without bound; least-request keeps it short.
fn max_queue_on_slow_endpoint(b: &dyn Balancer) -> u32 {
    let eps = endpoints(&[100, 100, 100]);
    let mut max_slow = 0;
    for tick in 0..8000u32 {
        for _ in 0..2 {
            let i = b.pick(&eps, None).unwrap();
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
    let rr = max_queue_on_slow_endpoint(&RoundRobin::new());
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
    let eps = endpoints(&[100, 100, 100]);
    let all: Vec<Box<dyn Balancer>> = vec![
        Box::new(P2cEwma),
        Box::new(RoundRobin::new()),
        Box::new(SmoothWeightedRoundRobin::new()),
        Box::new(LeastRequest),
        Box::new(trellis_balance::RandomPick),
        Box::new(ConsistentHash::default()),
    ];
    for b in all {
        b.rebuild(&eps);
        assert_eq!(b.pick(&[], None), None, "{}", b.name());
        let mut seen = HashMap::new();
        for k in 0..600u32 {
            let key = Some(hash_key(&k.to_le_bytes()));
            *seen.entry(b.pick(&eps, key).unwrap()).or_insert(0) += 1;
        }
        assert_eq!(
            seen.len(),
            3,
            "{} never picked some endpoint: {seen:?}",
            b.name()
        );
    }
}
