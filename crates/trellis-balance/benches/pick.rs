//! Cost of one pick per balancer over 10 endpoints, uncontended and with a
//! second thread picking concurrently.
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
    Balancer, ConsistentHash, Endpoint, LeastRequest, P2cEwma, RandomPick, RoundRobin,
    SmoothWeightedRoundRobin, hash_key,
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
        Box::new(RoundRobin::new()),
        Box::new(SmoothWeightedRoundRobin::new()),
        Box::new(LeastRequest),
        Box::new(ConsistentHash::default()),
        Box::new(RandomPick),
    ]
}

fn pick(c: &mut Criterion) {
    let eps = endpoints();
    let key = Some(hash_key(b"user-42"));
    let mut group = c.benchmark_group("pick/uncontended");
    for b in balancers() {
        b.rebuild(&eps);
        group.bench_function(b.name(), |bench| {
            bench.iter(|| black_box(b.pick(black_box(&eps), key)))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("pick/2_threads");
    for b in balancers() {
        let b: Arc<dyn Balancer> = Arc::from(b);
        b.rebuild(&eps);
        let stop = Arc::new(AtomicBool::new(false));
        let other = {
            let (b, eps, stop) = (b.clone(), eps.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    black_box(b.pick(&eps, key));
                }
            })
        };
        group.bench_function(b.name(), |bench| {
            bench.iter(|| black_box(b.pick(black_box(&eps), key)))
        });
        stop.store(true, Ordering::Relaxed);
        let _ = other.join();
    }
    group.finish();
}

criterion_group!(benches, pick);
criterion_main!(benches);
