//! ns per decision — breaker (closed) acquire + record, SRE throttle,
//! local rate limiter, bulkhead, Vegas, queue-delay shedder — alone and
//! with a second thread making the same decisions on the same state.
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

/// Times `op`; with `contended`, a second thread runs the same `op` on the
/// same state for the whole measurement, so both cores decide at once.
fn measure<F>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    contended: bool,
    op: F,
) where
    F: Fn() + Send + Sync + Clone + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let other = contended.then(|| {
        let (op, stop) = (op.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                op();
            }
        })
    });
    group.bench_function(name, |b| b.iter(&op));
    stop.store(true, Ordering::Relaxed);
    if let Some(o) = other {
        let _ = o.join();
    }
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
    let mut group = c.benchmark_group(name);
    let l = local.clone();
    measure(&mut group, "local_limiter_global", contended, move || {
        black_box(l.check(None));
    });
    let l = local.clone();
    measure(&mut group, "local_limiter_keyed", contended, move || {
        black_box(l.check(Some("tenant-a")));
    });
    // Each thread its own key: what a limiter keyed by client shows.
    let l = local.clone();
    measure(
        &mut group,
        "local_limiter_keyed_per_thread",
        contended,
        move || {
            thread_local!(static KEY: String = format!("client-{:?}", std::thread::current().id()));
            KEY.with(|k| black_box(l.check(Some(k))));
        },
    );
    let f = fixed.clone();
    measure(&mut group, "bulkhead_admit_release", contended, move || {
        drop(black_box(f.try_acquire()));
    });
    let v = vegas.clone();
    measure(&mut group, "vegas_admit_release", contended, move || {
        drop(black_box(v.try_acquire()));
    });
    let d = delay.clone();
    measure(
        &mut group,
        "queue_delay_admit_release",
        contended,
        move || {
            drop(black_box(d.try_acquire()));
        },
    );
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
