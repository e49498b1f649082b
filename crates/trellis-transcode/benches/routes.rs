//! Route lookups in a table of 10, 100 and 1 000 REST routes (and 10 000, for
//! the gateway's scale), against the linear scan over templates the
//! transcoder used before: the trie's cost follows the depth of the path,
//! the scan's the number of routes. Also the time to build a table of
//! 1 000 and 10 000 routes.
//!
//! ```sh
//! cargo bench -p trellis-transcode --bench routes
//! ```

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::Method;
use trellis_transcode::{Lookup, PathTemplate, RouteTable};

/// `n` routes shaped like a real API: resources with ids, nested
/// collections, a verb, spread over versions.
fn templates(n: usize) -> Vec<(Method, String)> {
    let mut out = Vec::with_capacity(n);
    let mut i = 0;
    while out.len() < n {
        let resource = format!("r{i}");
        out.push((Method::GET, format!("/v{}/{resource}/{{id}}", i % 3 + 1)));
        out.push((Method::GET, format!("/v{}/{resource}", i % 3 + 1)));
        out.push((Method::POST, format!("/v{}/{resource}", i % 3 + 1)));
        out.push((
            Method::GET,
            format!("/v{}/{resource}/{{parent}}/items/{{id}}", i % 3 + 1),
        ));
        out.push((
            Method::POST,
            format!("/v{}/{{name={resource}/*}}:undelete", i % 3 + 1),
        ));
        i += 1;
    }
    out.truncate(n);
    out
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_lookup");
    for n in [10, 100, 1_000, 10_000] {
        let routes = templates(n);
        let mut table = RouteTable::new();
        let mut scan = Vec::new();
        for (i, (method, template)) in routes.iter().enumerate() {
            let parsed = PathTemplate::parse(template).unwrap();
            table.insert(method.clone(), parsed.clone(), i).unwrap();
            scan.push((method.clone(), parsed));
        }
        // The last resource's nested route: the scan's worst case.
        let last = routes.len() / 5 - 1;
        let path = format!("/v{}/r{last}/p7/items/42", last % 3 + 1);
        assert!(matches!(
            table.lookup(&Method::GET, &path),
            Lookup::Found(_)
        ));
        group.bench_with_input(BenchmarkId::new("trie", n), &path, |b, path| {
            b.iter(|| match table.lookup(&Method::GET, path) {
                Lookup::Found(found) => *found.value,
                _ => usize::MAX,
            })
        });
        if n <= 1_000 {
            group.bench_with_input(BenchmarkId::new("linear_scan", n), &path, |b, path| {
                b.iter(|| {
                    scan.iter()
                        .position(|(m, t)| *m == Method::GET && t.matches(path).is_some())
                })
            });
        }
    }
    group.finish();

    // Building the table: the gateway applies a whole new one on reload.
    let mut group = c.benchmark_group("route_table_build");
    group.sample_size(10);
    for n in [1_000, 10_000] {
        let parsed: Vec<(Method, PathTemplate)> = templates(n)
            .into_iter()
            .map(|(m, t)| (m, PathTemplate::parse(&t).unwrap()))
            .collect();
        group.bench_with_input(BenchmarkId::from_parameter(n), &parsed, |b, parsed| {
            b.iter(|| {
                let mut table = RouteTable::new();
                for (i, (method, template)) in parsed.iter().enumerate() {
                    table.insert(method.clone(), template.clone(), i).unwrap();
                }
                table.len()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
