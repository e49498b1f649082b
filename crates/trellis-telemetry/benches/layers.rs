//! ns per request through the server telemetry layers, around a handler
//! that answers at once: nothing, RED metrics only, and RED + a server span
//! with no exporter, exporting with sampling at 0 %, and at 100 % (to an
//! in-process OTLP receiver), each for a gRPC request that arrives with and
//! without a caller's `traceparent`.
//!
//! ```sh
//! cargo bench -p trellis-telemetry --bench layers
//! ```

use std::{convert::Infallible, hint::black_box, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::{Request, Response};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use trellis_telemetry::{LogFormat, OtlpSettings, RedLayer, ServerTraceLayer, Telemetry};
use trellis_testkit::OtlpReceiver;

fn request(traceparent: bool) -> Request<()> {
    let mut req = Request::post("/shop.user.v1.UserService/GetUser")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap_or_default();
    if traceparent {
        req.headers_mut().insert(
            "traceparent",
            http::HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        );
    }
    req
}

/// One request through `svc`; the response (an empty body) is dropped at
/// once, which is its end.
fn drive<S, RB>(svc: &mut S, traceparent: bool)
where
    S: Service<Request<()>, Response = Response<RB>, Error = Infallible>,
{
    let fut = svc
        .ready()
        .now_or_never()
        .and_then(Result::ok)
        .map(|s| s.call(request(traceparent)));
    if let Some(fut) = fut {
        black_box(fut.now_or_never());
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let _guard = rt.enter();
    let receiver = rt
        .block_on(OtlpReceiver::start_counting())
        .unwrap_or_else(|e| panic!("receiver: {e}"));
    let _recorder = trellis_telemetry::prometheus();
    let telemetry = Telemetry::builder("bench")
        .log_format(LogFormat::Json)
        .log_level("warn")
        .writer(std::io::sink)
        .init()
        .unwrap_or_else(|e| panic!("telemetry: {e}"));
    let handler = service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
    });

    let mut group = c.benchmark_group("server_layers");
    group.measurement_time(Duration::from_secs(4));
    let mut bare = handler;
    group.bench_function("no layers", |b| b.iter(|| drive(&mut bare, false)));
    let mut red = ServiceBuilder::new()
        .layer(RedLayer::new())
        .service(handler);
    group.bench_function("RED metrics", |b| b.iter(|| drive(&mut red, false)));
    let mut traced = ServiceBuilder::new()
        .layer(ServerTraceLayer::new())
        .layer(RedLayer::new())
        .service(handler);

    let modes = [
        ("RED + trace, no exporter", None, 1.0),
        (
            "RED + trace, exporting, sampling 0%",
            Some(receiver.endpoint()),
            0.0,
        ),
        (
            "RED + trace, exporting, sampling 100%",
            Some(receiver.endpoint()),
            1.0,
        ),
    ];
    for (label, endpoint, ratio) in modes {
        telemetry
            .apply(&OtlpSettings {
                endpoint,
                sample_ratio: ratio,
                ..OtlpSettings::default()
            })
            .unwrap_or_else(|e| panic!("apply: {e}"));
        group.bench_function(format!("{label}, new trace"), |b| {
            b.iter(|| drive(&mut traced, false))
        });
        group.bench_function(format!("{label}, caller sampled"), |b| {
            b.iter(|| drive(&mut traced, true))
        });
    }
    group.finish();
    rt.block_on(telemetry.flush());
    eprintln!("the receiver got {} spans", receiver.count());
}

criterion_group!(benches, bench);
criterion_main!(benches);
