//! µs per call: the same unary call to an in-process gRPC service that
//! answers with its request, made as gRPC (a framed protobuf request) and
//! as REST through the transcoder (route, JSON/query → message, gRPC
//! request, message → JSON), so the difference is what transcoding costs.
//!
//! ```sh
//! cargo bench -p trellis-transcode --bench transcode
//! ```

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use axum::body::Body;
use bytes::{BufMut, Bytes, BytesMut};
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use tower::{Service, ServiceExt};
use trellis_transcode::Transcoder;

/// Answers every call with its request, as a real gRPC response.
#[derive(Clone)]
struct Echo;

impl<B> Service<Request<B>> for Echo
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        Box::pin(async move {
            let bytes = http_body_util::BodyExt::collect(req.into_body())
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(bytes)),
                Ok(Frame::trailers(trailers)),
            ];
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
            Ok(Response::builder()
                .header("content-type", "application/grpc")
                .body(Body::new(body))
                .unwrap_or_default())
        })
    }
}

fn descriptors() -> Vec<u8> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut compiler = protox::Compiler::new([root.join("tests/proto"), root.join("../../proto")])
        .unwrap_or_else(|e| panic!("{e}"));
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_files(["conformance/v1/mirror.proto"])
        .unwrap_or_else(|e| panic!("{e}"));
    compiler.encode_file_descriptor_set()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let set: &'static [u8] = Box::leak(descriptors().into_boxed_slice());
    let transcoder =
        Transcoder::new(&[set], &["conformance.v1.Mirror"]).unwrap_or_else(|e| panic!("{e}"));
    let rest = transcoder.service(Echo);
    // The same message both ways: Thing{id: "abc", name: "n"}.
    let message = Bytes::from_static(b"\x0a\x03abc\x12\x01n");
    let mut framed = BytesMut::new();
    framed.put_u8(0);
    framed.put_u32(message.len() as u32);
    framed.put_slice(&message);
    let framed = framed.freeze();

    let mut group = c.benchmark_group("unary_call");
    group.bench_function("gRPC, direct", |b| {
        b.iter(|| {
            rt.block_on(async {
                let req = Request::post("/conformance.v1.Mirror/Get")
                    .header("content-type", "application/grpc")
                    .body(Body::from(framed.clone()))
                    .unwrap_or_default();
                let resp = Echo.oneshot(req).await.unwrap_or_default();
                let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            })
        })
    });
    // Each call below must succeed, or the bench would time an error.
    for (method, uri, body) in [
        ("GET", "/v1/things/abc", ""),
        ("GET", "/v1/things/abc?name=n", ""),
        (
            "POST",
            "/conformance.v1.Mirror/Get",
            r#"{"id":"abc","name":"n"}"#,
        ),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap_or_default();
        let status = rt.block_on(rest.clone().oneshot(req)).map(|r| r.status());
        assert_eq!(status.ok(), Some(http::StatusCode::OK), "{method} {uri}");
    }
    // No body and no query: the request is written straight to the wire.
    group.bench_function("REST GET /v1/things/{id}", |b| {
        b.iter(|| {
            rt.block_on(async {
                let req = Request::get("/v1/things/abc")
                    .body(Body::empty())
                    .unwrap_or_default();
                let resp = rest.clone().oneshot(req).await.unwrap_or_default();
                let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            })
        })
    });
    group.bench_function("REST GET /v1/things/{id}?name=n", |b| {
        b.iter(|| {
            rt.block_on(async {
                let req = Request::get("/v1/things/abc?name=n")
                    .body(Body::empty())
                    .unwrap_or_default();
                let resp = rest.clone().oneshot(req).await.unwrap_or_default();
                let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            })
        })
    });
    group.bench_function("REST POST /conformance.v1.Mirror/Get (JSON body)", |b| {
        b.iter(|| {
            rt.block_on(async {
                let req = Request::post("/conformance.v1.Mirror/Get")
                    .header("content-type", "application/json")
                    .body(Body::from(r#"{"id":"abc","name":"n"}"#))
                    .unwrap_or_default();
                let resp = rest.clone().oneshot(req).await.unwrap_or_default();
                let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            })
        })
    });
    // The gRPC face's validation: a message whose only rules are REQUIRED
    // fields (checked on the wire) and one with value rules (decoded).
    let pool = transcoder.pool().clone();
    let validator = transcoder
        .validator()
        .cloned()
        .unwrap_or_else(|| panic!("validation is on by default"));
    let checked = tower::Layer::layer(
        &trellis_transcode::validate::ValidateLayer::new(&pool, validator, 1 << 20),
        Echo,
    );
    let frame_of = |b: &[u8]| {
        let mut f = BytesMut::new();
        f.put_u8(0);
        f.put_u32(b.len() as u32);
        f.put_slice(b);
        f.freeze()
    };
    // Ref{id: "x", parent: {}, tags: ["a"]}; Order{sku: "ABC", quantity: 1, ship_to: {}}
    let reference = frame_of(b"\x0a\x01x\x12\x00\x1a\x01a");
    let order = frame_of(b"\x0a\x03ABC\x10\x01\x2a\x00");
    for (name, path, body) in [
        (
            "gRPC through validation, REQUIRED only (wire check)",
            "/conformance.v1.Mirror/Lookup",
            reference,
        ),
        (
            "gRPC through validation, value rules (decoded)",
            "/conformance.v1.Mirror/Place",
            order,
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let req = Request::post(path)
                        .header("content-type", "application/grpc")
                        .body(Body::from(body.clone()))
                        .unwrap_or_default();
                    let resp = checked.clone().oneshot(req).await.unwrap_or_default();
                    assert!(
                        resp.headers().get("grpc-status").is_none(),
                        "{:?}",
                        resp.headers()
                    );
                    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
