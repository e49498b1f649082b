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

/// Writes `span`'s trace context (and the baggage it carries) into
/// `headers`: what a component that makes its own calls — not through
/// [`ClientTelemetry`](crate::ClientTelemetry) — sends so its callees join
/// the trace under `span`. Nothing when `span` records nothing.
pub fn inject_span(span: &tracing::Span, headers: &mut HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    inject_fast(&span.context(), headers);
}

/// Makes the trace a stored W3C `traceparent` names the parent of `span`
/// (work resumed later — a saga driven after a restart — joins the trace
/// that started it). A malformed value changes nothing.
pub fn adopt_traceparent(span: &tracing::Span, traceparent: &str) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let Ok(value) = HeaderValue::from_str(traceparent) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(trellis_core::protocol::TRACEPARENT, value);
    let parent = extract(&headers);
    // Only fails when no OpenTelemetry layer is installed: nothing to join.
    let _ = span.set_parent(parent);
}

/// Writes the current context's trace context and baggage into
/// `headers` (what a proxy sends upstream: its own span as the parent,
/// or the caller's context when it records none).
pub fn inject_current(headers: &mut HeaderMap) {
    inject_fast(&Context::current(), headers);
}

/// [`inject`], with the usual case — `traceparent` alone — written by
/// hand, and nothing written for an invalid context without baggage.
pub fn inject_fast(cx: &Context, headers: &mut HeaderMap) {
    use opentelemetry::{baggage::BaggageExt as _, trace::TraceContextExt as _};
    let span = cx.span();
    let sc = span.span_context();
    // Only a real trace context (a recorded span, or a caller's): an
    // empty or invalid one writes nothing, and costs nothing.
    if !sc.is_valid() && cx.baggage().is_empty() {
        return;
    }
    if !cx.baggage().is_empty() || !sc.trace_state().header().is_empty() {
        inject(cx, headers);
        return;
    }
    // The usual case, `traceparent` alone, written without the formatting
    // machinery (a tenth of the propagator's cost, on every proxied call).
    let mut value = [0u8; 55];
    value[..3].copy_from_slice(b"00-");
    hex(&sc.trace_id().to_bytes(), &mut value[3..35]);
    value[35] = b'-';
    hex(&sc.span_id().to_bytes(), &mut value[36..52]);
    value[52] = b'-';
    hex(&[sc.trace_flags().to_u8()], &mut value[53..55]);
    if let Ok(v) = HeaderValue::from_bytes(&value) {
        headers.insert(trellis_core::protocol::TRACEPARENT, v);
    }
}

/// Lower-case hex of `bytes` into `out` (twice as long).
fn hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
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

#[cfg(test)]
mod inject_tests {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    };

    use super::*;

    #[test]
    fn traceparent_written_by_hand_is_what_the_propagator_writes() {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id"),
            SpanId::from_hex("00f067aa0ba902b7").expect("span id"),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        );
        let cx = Context::new().with_remote_span_context(sc);
        let mut by_hand = HeaderMap::new();
        {
            let _attached = cx.clone().attach();
            inject_current(&mut by_hand);
        }
        let mut by_propagator = HeaderMap::new();
        inject(&cx, &mut by_propagator);
        assert_eq!(
            by_hand.get("traceparent"),
            by_propagator.get("traceparent"),
            "{by_hand:?} vs {by_propagator:?}"
        );
        assert_eq!(
            by_hand.get("traceparent").map(|v| v.as_bytes()),
            Some(&b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"[..])
        );
        // Nothing to carry: nothing written.
        let mut none = HeaderMap::new();
        inject_current(&mut none);
        assert!(none.is_empty());
    }
}
