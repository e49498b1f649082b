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
use trellis_resilience::{
    Breaker, BreakerConfig, BreakerPolicy, ConcurrencyLimit, DelayShedder, LimitKind, LocalLimiter,
    Outcome, Quota, SreBreaker, SreConfig,
};

fn decide(p: &dyn BreakerPolicy) {
    if let Some(permit) = p.acquire() {
        p.record(
            permit,
            black_box(Outcome::Success),
            Duration::from_micros(100),
        );
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let policies: Vec<(&str, Arc<dyn BreakerPolicy>)> = vec![
        (
            "breaker_closed",
            Arc::new(Breaker::new(BreakerConfig::default())),
        ),
        (
            "sre_throttle",
            Arc::new(SreBreaker::new(SreConfig::default())),
        ),
    ];
    let mut group = c.benchmark_group("decision/uncontended");
    for (name, p) in &policies {
        group.bench_function(*name, |b| b.iter(|| decide(p.as_ref())));
        group.bench_function(format!("{name}_acquire_only"), |b| {
            b.iter(|| black_box(p.acquire()))
        });
    }
    group.finish();

    // Limiters and shedders: admit (and release, for the shedders).
    let local = Arc::new(LocalLimiter::new(Quota::per_second(u32::MAX / 2), 100_000));
    let fixed = ConcurrencyLimit::new(LimitKind::Fixed(1_000_000));
    let vegas = ConcurrencyLimit::new(LimitKind::Adaptive {
        initial: 1000,
        min: 10,
        max: 1_000_000,
    });
    let delay = DelayShedder::new(Duration::from_millis(5));
    group_limiters(
        c,
        "decision/uncontended",
        &local,
        &fixed,
        &vegas,
        &delay,
        false,
    );
    group_limiters(
        c,
        "decision/2_threads",
        &local,
        &fixed,
        &vegas,
        &delay,
        true,
    );

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

fn group_limiters(
    c: &mut Criterion,
    name: &str,
    local: &Arc<LocalLimiter>,
    fixed: &Arc<ConcurrencyLimit>,
    vegas: &Arc<ConcurrencyLimit>,
    delay: &Arc<DelayShedder>,
    contended: bool,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let other = contended.then(|| {
        let (local, fixed, vegas, delay, stop) = (
            local.clone(),
            fixed.clone(),
            vegas.clone(),
            delay.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                black_box(local.check(Some("tenant-a")));
                black_box(local.check(None));
                drop(black_box(fixed.try_acquire()));
                drop(black_box(vegas.try_acquire()));
                drop(black_box(delay.try_acquire()));
            }
        })
    });
    let mut group = c.benchmark_group(name);
    group.bench_function("local_limiter_global", |b| {
        b.iter(|| black_box(local.check(None)))
    });
    group.bench_function("local_limiter_keyed", |b| {
        b.iter(|| black_box(local.check(Some("tenant-a"))))
    });
    group.bench_function("bulkhead_admit_release", |b| {
        b.iter(|| drop(black_box(fixed.try_acquire())))
    });
    group.bench_function("vegas_admit_release", |b| {
        b.iter(|| drop(black_box(vegas.try_acquire())))
    });
    group.bench_function("queue_delay_admit_release", |b| {
        b.iter(|| drop(black_box(delay.try_acquire())))
    });
    group.finish();
    stop.store(true, Ordering::Relaxed);
    if let Some(o) = other {
        let _ = o.join();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
