//! What the closed-loop load generators of the bench scripts share:
//! gathering the callers' latencies and printing the one summary line the
//! scripts parse.

use std::time::Instant;

/// Waits for the callers (each returns its latencies in µs and its error
/// count) and prints `requests= errors= rps= p50_us= p99_us= max_us=`.
pub async fn report(
    workers: Vec<tokio::task::JoinHandle<(Vec<u64>, u64)>>,
    start: Instant,
) -> Result<(), Box<dyn std::error::Error>> {
    let (mut all, mut errors) = (Vec::new(), 0);
    for w in workers {
        let (l, e) = w.await?;
        all.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "requests={} errors={} rps={:.0} p50_us={} p99_us={} max_us={}",
        all.len(),
        errors,
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        all.last().copied().unwrap_or(0)
    );
    Ok(())
}
