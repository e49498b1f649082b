//! ns per decision: breaker (closed) acquire + record, SRE throttle,
//! uncontended and with a second thread doing the same.
//!
//! ```sh
//! cargo bench -p trellis-resilience --bench decision
//! ```

use std::{
    hint::black_box,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use criterion::{Criterion, criterion_group, criterion_main};
use trellis_resilience::{Breaker, BreakerConfig, Outcome, Policy, SreBreaker, SreConfig};

fn decide(p: &dyn Policy) {
    if let Some(permit) = p.acquire() {
        p.record(permit, black_box(Outcome::Success), Duration::from_micros(100));
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let _guard = rt.enter();
    let policies: Vec<(&str, Arc<dyn Policy>)> = vec![
        ("breaker_closed", Arc::new(Breaker::new(BreakerConfig::default()))),
        ("sre_throttle", Arc::new(SreBreaker::new(SreConfig::default()))),
    ];
    let mut group = c.benchmark_group("decision/uncontended");
    for (name, p) in &policies {
        group.bench_function(*name, |b| b.iter(|| decide(p.as_ref())));
        group.bench_function(format!("{name}_acquire_only"), |b| b.iter(|| black_box(p.acquire())));
    }
    group.finish();

    let mut group = c.benchmark_group("decision/2_threads");
    for (name, p) in &policies {
        let stop = Arc::new(AtomicBool::new(false));
        let other = {
            let (p, stop) = (p.clone(), stop.clone());
            let handle = rt.handle().clone();
            std::thread::spawn(move || {
                let _guard = handle.enter();
                while !stop.load(Ordering::Relaxed) {
                    decide(p.as_ref());
                }
            })
        };
        group.bench_function(*name, |b| b.iter(|| decide(p.as_ref())));
        stop.store(true, Ordering::Relaxed);
        let _ = other.join();
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
