//! Cost of one pick per balancer over 10 endpoints, uncontended and with a
//! second thread picking from the same set concurrently.
//!
//! ```sh
//! cargo bench -p trellis-balance --bench pick
//! ```

use std::{
    hint::black_box,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use criterion::{Criterion, criterion_group, criterion_main};
use trellis_balance::{
    Balancer, ConsistentHash, Endpoint, LeastRequest, P2cEwma, PickSet, RandomPick, RoundRobin,
    SmoothWeightedRoundRobin, hash_key, now_ns,
};

fn endpoints() -> Vec<Arc<Endpoint>> {
    (0..10)
        .map(|i| {
            Arc::new(Endpoint::new(
                format!("e{i}"),
                format!("10.0.0.{i}:80"),
                100 + i * 10,
                "",
            ))
        })
        .collect()
}

fn balancers() -> Vec<Box<dyn Balancer>> {
    vec![
        Box::new(P2cEwma),
        Box::new(RoundRobin),
        Box::new(SmoothWeightedRoundRobin),
        Box::new(LeastRequest),
        Box::new(ConsistentHash::default()),
        Box::new(RandomPick),
    ]
}

fn pick(c: &mut Criterion) {
    let key = Some(hash_key(b"user-42"));
    // A real time, so every pick checks ejection as the pool's do.
    let now = now_ns();
    let mut group = c.benchmark_group("pick/uncontended");
    for b in balancers() {
        let set = PickSet::new(b.as_ref(), endpoints());
        group.bench_function(b.name(), |bench| {
            bench.iter(|| black_box(set.pick(black_box(key), now)))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("pick/2_threads");
    for b in balancers() {
        let set = Arc::new(PickSet::new(b.as_ref(), endpoints()));
        let stop = Arc::new(AtomicBool::new(false));
        let other = {
            let (set, stop) = (set.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    black_box(set.pick(key, now));
                }
            })
        };
        group.bench_function(b.name(), |bench| {
            bench.iter(|| black_box(set.pick(black_box(key), now)))
        });
        stop.store(true, Ordering::Relaxed);
        let _ = other.join();
    }
    group.finish();
}

criterion_group!(benches, pick);
criterion_main!(benches);
