//! JSON log lines: one object per event, carrying the service, the
//! instance, the trace and span ids of the span it happened in, and the
//! request's baggage (request id, tenant, business tags).
//!
//! A purpose-built layer rather than `tracing-subscriber`'s JSON formatter:
//! it reads the trace ids from the active OpenTelemetry context (a thread
//! local) instead of formatting every span's fields when the span opens, so
//! a request that logs nothing pays nothing here.

use std::{
    io::Write,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use opentelemetry::{Context, baggage::BaggageExt, trace::TraceContextExt};
use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    Layer,
    fmt::{MakeWriter, writer::BoxMakeWriter},
    layer,
    registry::LookupSpan,
};

use crate::server::ServiceName;

/// Writes every event as one JSON line.
pub(crate) struct JsonLayer {
    service: Arc<str>,
    instance: Arc<str>,
    writer: BoxMakeWriter,
}

impl JsonLayer {
    pub(crate) fn new(service: &str, instance: &str, writer: BoxMakeWriter) -> Self {
        JsonLayer {
            service: service.into(),
            instance: instance.into(),
            writer,
        }
    }
}

impl<S> Layer<S> for JsonLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &Event<'_>, _ctx: layer::Context<'_, S>) {
        let meta = event.metadata();
        let mut line = Line::with_capacity(320);
        line.buf.push(b'{');
        line.key("timestamp");
        line.raw_str(&rfc3339_now());
        line.key("level");
        line.raw_str(meta.level().as_str());
        line.key("target");
        line.string(meta.target());
        event.record(&mut line);

        // An event's own `service`/`instance` fields (an app announcing
        // itself) win, then the service the request belongs to, then the
        // process's; keys are never repeated.
        let cx = Context::current();
        if !line.has("service") {
            line.key("service");
            line.string(cx.get::<ServiceName>().map_or(&*self.service, |s| &*s.0));
        }
        if !line.has("instance") {
            line.key("instance");
            line.string(&self.instance);
        }

        let span = cx.span();
        let sc = span.span_context();
        if sc.is_valid() {
            line.key("trace_id");
            line.raw_str(&sc.trace_id().to_string());
            line.key("span_id");
            line.raw_str(&sc.span_id().to_string());
        }
        for (key, (value, _)) in cx.baggage().iter() {
            if !line.has(key.as_str()) {
                line.key(key.as_str());
                line.string(value.as_str().as_ref());
            }
        }
        line.buf.extend_from_slice(b"}\n");
        // Logging must never take a request down: a failed write is dropped.
        let _ = self.writer.make_writer_for(meta).write_all(&line.buf);
    }
}

/// One line being built, and which keys it already has.
struct Line {
    buf: Vec<u8>,
    seen: Vec<String>,
}

impl Line {
    fn with_capacity(n: usize) -> Self {
        Line {
            buf: Vec::with_capacity(n),
            seen: Vec::new(),
        }
    }

    fn has(&self, key: &str) -> bool {
        self.seen.iter().any(|k| k == key)
    }

    fn key(&mut self, key: &str) {
        if self.buf.len() > 1 {
            self.buf.push(b',');
        }
        self.string(key);
        self.buf.push(b':');
    }

    /// A JSON string, escaped.
    fn string(&mut self, s: &str) {
        // Writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.buf, s);
    }

    /// A string known to need no escaping.
    fn raw_str(&mut self, s: &str) {
        self.buf.push(b'"');
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(b'"');
    }

    fn field(&mut self, field: &Field) {
        let name = field.name();
        // `r#type` and friends arrive with the raw prefix.
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.key(name);
        self.seen.push(name.to_owned());
    }
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field);
        self.string(value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field);
        let _ = write!(self.buf, "{value}");
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field);
        let _ = write!(self.buf, "{value}");
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field);
        let _ = serde_json::to_writer(&mut self.buf, &value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field);
        self.buf
            .extend_from_slice(if value { b"true" } else { b"false" });
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.field(field);
        self.string(&value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.field(field);
        self.string(&format!("{value:?}"));
    }
}

/// The current UTC time as RFC 3339 with microseconds.
fn rfc3339_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs() as i64, now.subsec_micros())
}

/// `secs` since the Unix epoch (and `micros`) as an RFC 3339 UTC time,
/// `2026-11-30T14:05:15.000123Z`.
pub fn rfc3339(secs: i64, micros: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.000005Z");
        assert_eq!(
            rfc3339(1_795_478_399, 999_999),
            "2026-11-23T23:59:59.999999Z"
        );
    }
}
