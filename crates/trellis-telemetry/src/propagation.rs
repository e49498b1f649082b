//! W3C Trace Context (`traceparent`, `tracestate`) and Baggage (`baggage`)
//! over HTTP headers — which is also what gRPC metadata is on the wire.

use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapCompositePropagator, TextMapPropagator},
};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};

fn propagator() -> &'static TextMapCompositePropagator {
    static P: OnceLock<TextMapCompositePropagator> = OnceLock::new();
    P.get_or_init(|| {
        TextMapCompositePropagator::new(vec![
            Box::new(TraceContextPropagator::new()),
            Box::new(BaggagePropagator::new()),
        ])
    })
}

/// The trace context and baggage a request carries (an empty context when
/// it carries none, or carries them malformed).
pub fn extract(headers: &HeaderMap) -> Context {
    propagator().extract(&HeaderExtractor(headers))
}

/// Writes `cx`'s trace context and baggage into `headers`, replacing any
/// that were there.
pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    propagator().inject_context(cx, &mut HeaderInjector(headers));
}

/// Writes the current context's trace context and baggage into
/// `headers` (what a proxy sends upstream: its own span as the parent,
/// or the caller's context when it records none).
pub fn inject_current(headers: &mut HeaderMap) {
    use opentelemetry::{baggage::BaggageExt as _, trace::TraceContextExt as _};
    let cx = Context::current();
    // Only a real trace context (a recorded span, or a caller's): an
    // empty or invalid one writes nothing, and costs nothing.
    if cx.span().span_context().is_valid() || !cx.baggage().is_empty() {
        inject(&cx, headers);
    }
}

/// Whether the headers carry anything to extract.
pub(crate) fn carries_context(headers: &HeaderMap) -> bool {
    use trellis_core::protocol::{BAGGAGE, TRACEPARENT};
    headers.contains_key(TRACEPARENT) || headers.contains_key(BAGGAGE)
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }

    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        let all: Vec<&str> = self
            .0
            .get_all(key)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if all.is_empty() { None } else { Some(all) }
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // Propagators write lowercase ASCII names and printable values; a
        // value that is not a valid header (odd baggage) is dropped, never
        // sent half-encoded.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::{
        KeyValue,
        baggage::BaggageExt,
        trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
    };

    use super::*;

    #[test]
    fn round_trips_trace_context_and_baggage() {
        let sc = SpanContext::new(
            TraceId::from(0x0af7651916cd43dd8448eb211c80319c_u128),
            SpanId::from(0xb7ad6b7169203331_u64),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "x")]).unwrap(),
        );
        let cx = Context::new().with_remote_span_context(sc).with_baggage([
            KeyValue::new("tenant", "acme"),
            KeyValue::new("request_id", "r-1"),
        ]);
        let mut headers = HeaderMap::new();
        inject(&cx, &mut headers);
        assert_eq!(
            headers["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert_eq!(headers["tracestate"], "vendor=x");

        let back = extract(&headers);
        let span = back.span();
        assert_eq!(
            span.span_context().trace_id(),
            TraceId::from(0x0af7651916cd43dd8448eb211c80319c_u128)
        );
        assert!(span.span_context().is_remote() && span.span_context().is_sampled());
        assert_eq!(
            back.baggage().get("tenant").map(|v| v.to_string()),
            Some("acme".into())
        );
        assert_eq!(
            back.baggage().get("request_id").map(|v| v.to_string()),
            Some("r-1".into())
        );
    }

    #[test]
    fn malformed_headers_give_an_empty_context() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-zz-b7ad6b7169203331-01"),
        );
        assert!(!extract(&headers).span().span_context().is_valid());
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-00000000000000000000000000000000-b7ad6b7169203331-01"),
        );
        assert!(!extract(&headers).span().span_context().is_valid());
    }
}
