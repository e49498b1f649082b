//! The trace pipeline's two moving parts, both changeable while the process
//! runs: the sampler (ratio, parent-based or not, exporting or not) and the
//! export slot (an OTLP batch processor, or nothing).
//!
//! They are built once with the tracer provider and then retargeted by
//! [`crate::Telemetry::apply`], so the config centre can turn export on,
//! move it, or change the ratio without a restart, and so the subscriber can
//! be installed before a service's config has been read.

use std::{
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use opentelemetry::{
    Context, KeyValue,
    trace::{Link, SpanContext, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState},
};
use opentelemetry::{InstrumentationScope, logs::Severity};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    logs::{BatchLogProcessor, LogProcessor, SdkLogRecord},
    trace::{
        BatchSpanProcessor, IdGenerator, RandomIdGenerator, SamplingDecision, SamplingResult,
        ShouldSample, Span, SpanData, SpanProcessor,
    },
};

/// What the sampler decides from: one per process, like the subscriber.
/// Until [`crate::Telemetry`] sets it, nothing is recorded.
pub(crate) static SAMPLER: SamplerState = SamplerState::new();

/// What the sampler decides from.
#[derive(Debug, Default)]
pub(crate) struct SamplerState {
    /// Follow a valid parent's decision (`parentbased_*`).
    parent_based: AtomicBool,
    /// `f64` bits: the share of root spans to record.
    ratio: AtomicU64,
    /// An exporter is installed. Without one, root spans are never
    /// recorded (nobody would see them) but still get ids, so logs and
    /// downstream calls carry a trace id; a caller's sampled decision is
    /// still followed and passed on.
    exporting: AtomicBool,
}

impl SamplerState {
    pub(crate) const fn new() -> Self {
        SamplerState {
            parent_based: AtomicBool::new(false),
            ratio: AtomicU64::new(0),
            exporting: AtomicBool::new(false),
        }
    }

    /// Whether a span under `parent` may be recorded: the layers' cheap
    /// check before they build a span at all. `false` is final (the span
    /// would be dropped); `true` means the sampler will decide (for a new
    /// trace at a ratio strictly between 0 and 1, it may still drop it).
    pub(crate) fn may_record(&self, parent: &Context) -> bool {
        if !self.exporting.load(Relaxed) {
            return false;
        }
        let span = parent.span();
        let sc = span.span_context();
        if sc.is_valid() && self.parent_based.load(Relaxed) {
            return sc.is_sampled();
        }
        f64::from_bits(self.ratio.load(Relaxed)) > 0.0
    }

    pub(crate) fn set(&self, parent_based: bool, ratio: f64, exporting: bool) {
        self.parent_based.store(parent_based, Relaxed);
        self.ratio.store(ratio.clamp(0.0, 1.0).to_bits(), Relaxed);
        self.exporting.store(exporting, Relaxed);
    }
}

/// A parent-based ratio sampler whose settings can change at run time.
#[derive(Debug, Clone)]
pub(crate) struct DynamicSampler(pub(crate) &'static SamplerState);

impl ShouldSample for DynamicSampler {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        _name: &str,
        _span_kind: &SpanKind,
        _attributes: &[KeyValue],
        _links: &[Link],
    ) -> SamplingResult {
        let state = self.0;
        let parent = parent_context.filter(|cx| cx.span().span_context().is_valid());
        let trace_state = parent
            .map(|cx| cx.span().span_context().trace_state().clone())
            .unwrap_or_default();
        let decision = match parent {
            Some(cx) if state.parent_based.load(Relaxed) => {
                if cx.span().span_context().is_sampled() {
                    SamplingDecision::RecordAndSample
                } else {
                    SamplingDecision::Drop
                }
            }
            _ if !state.exporting.load(Relaxed) => SamplingDecision::Drop,
            _ => ratio_decision(f64::from_bits(state.ratio.load(Relaxed)), trace_id),
        };
        SamplingResult {
            decision,
            attributes: Vec::new(),
            trace_state,
        }
    }
}

/// The context a request runs in when no span is recorded for it: the
/// caller's, passed through unchanged (so a sampled caller's trace
/// continues below us without a gap), or for a request without one a new
/// unsampled trace, so its logs and downstream calls still share a trace id.
pub(crate) fn unrecorded(parent: Context) -> Context {
    if parent.span().span_context().is_valid() {
        return parent;
    }
    let ids = RandomIdGenerator::default();
    let sc = SpanContext::new(
        ids.new_trace_id(),
        ids.new_span_id(),
        TraceFlags::default(),
        false,
        TraceState::NONE,
    );
    parent.with_remote_span_context(sc)
}

/// The W3C/OTel `TraceIdRatioBased` rule: compare the trace id's low 63
/// bits with the ratio, so every service makes the same decision for a trace.
fn ratio_decision(ratio: f64, trace_id: TraceId) -> SamplingDecision {
    if ratio >= 1.0 {
        return SamplingDecision::RecordAndSample;
    }
    let bound = (ratio.max(0.0) * (1u64 << 63) as f64) as u64;
    let bytes = trace_id.to_bytes();
    let mut low = [0u8; 8];
    low.copy_from_slice(&bytes[8..]);
    if (u64::from_be_bytes(low) >> 1) < bound {
        SamplingDecision::RecordAndSample
    } else {
        SamplingDecision::Drop
    }
}

/// A processor that forwards to the current OTLP batch processor, if any:
/// spans ([`ExportSlot`]) or log records ([`LogSlot`]). Swapping one in
/// hands it the resource; the one swapped out is returned to be shut down
/// (flushing what it holds).
#[derive(Debug)]
pub(crate) struct Slot<P>(Arc<SlotInner<P>>);

/// Where spans go.
pub(crate) type ExportSlot = Slot<BatchSpanProcessor>;
/// Where log records go.
pub(crate) type LogSlot = Slot<BatchLogProcessor>;

#[derive(Debug)]
struct SlotInner<P> {
    current: RwLock<Option<P>>,
    resource: RwLock<Option<Resource>>,
}

impl<P> Default for Slot<P> {
    fn default() -> Self {
        Slot(Arc::new(SlotInner {
            current: RwLock::new(None),
            resource: RwLock::new(None),
        }))
    }
}

impl<P> Clone for Slot<P> {
    fn clone(&self) -> Self {
        Slot(Arc::clone(&self.0))
    }
}

/// What a slot needs of the processor it holds.
pub(crate) trait Resourced {
    fn take_resource(&mut self, resource: &Resource);
}

impl Resourced for BatchSpanProcessor {
    fn take_resource(&mut self, resource: &Resource) {
        SpanProcessor::set_resource(self, resource);
    }
}

impl Resourced for BatchLogProcessor {
    fn take_resource(&mut self, resource: &Resource) {
        LogProcessor::set_resource(self, resource);
    }
}

impl<P: Resourced> Slot<P> {
    /// Installs `processor` (or none), returning the one it replaces.
    pub(crate) fn replace(&self, mut processor: Option<P>) -> Option<P> {
        if let (Some(p), Some(resource)) = (
            processor.as_mut(),
            self.0
                .resource
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref(),
        ) {
            p.take_resource(resource);
        }
        std::mem::replace(
            &mut *self
                .0
                .current
                .write()
                .unwrap_or_else(PoisonError::into_inner),
            processor,
        )
    }

    fn with<R>(&self, f: impl FnOnce(&P) -> R) -> Option<R> {
        self.0
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(f)
    }

    fn holds(&self) -> bool {
        self.0
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    fn remember_resource(&self, resource: &Resource) {
        *self
            .0
            .resource
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(resource.clone());
        if let Some(p) = self
            .0
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            p.take_resource(resource);
        }
    }
}

impl SpanProcessor for Slot<BatchSpanProcessor> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.with(|p| p.on_start(span, cx));
    }

    fn on_end(&self, span: SpanData) {
        self.with(|p| p.on_end(span));
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.with(|p| p.force_flush()).unwrap_or(Ok(()))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.replace(None)
            .map_or(Ok(()), |p| p.shutdown_with_timeout(timeout))
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.remember_resource(resource);
    }
}

impl LogProcessor for Slot<BatchLogProcessor> {
    fn emit(&self, data: &mut SdkLogRecord, instrumentation: &InstrumentationScope) {
        self.with(|p| p.emit(data, instrumentation));
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.with(|p| p.force_flush()).unwrap_or(Ok(()))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.replace(None)
            .map_or(Ok(()), |p| p.shutdown_with_timeout(timeout))
    }

    // With nothing to export to, the tracing bridge builds no record at all.
    fn event_enabled(&self, _level: Severity, _target: &str, _name: Option<&str>) -> bool {
        self.holds()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.remember_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::SpanId;

    use super::*;

    fn decide(
        sampler: &DynamicSampler,
        parent: Option<TraceFlags>,
        trace_id: u128,
    ) -> SamplingDecision {
        let cx = parent.map(|flags| {
            Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from(7u128),
                SpanId::from(9u64),
                flags,
                true,
                TraceState::default(),
            ))
        });
        sampler
            .should_sample(
                cx.as_ref(),
                TraceId::from(trace_id),
                "s",
                &SpanKind::Server,
                &[],
                &[],
            )
            .decision
    }

    #[test]
    fn without_an_exporter_roots_are_dropped_but_a_sampled_caller_is_followed() {
        let state: &'static SamplerState = Box::leak(Box::new(SamplerState::new()));
        state.set(true, 1.0, false);
        let sampler = DynamicSampler(state);
        assert_eq!(decide(&sampler, None, 1), SamplingDecision::Drop);
        assert_eq!(
            decide(&sampler, Some(TraceFlags::SAMPLED), 1),
            SamplingDecision::RecordAndSample
        );
        assert_eq!(
            decide(&sampler, Some(TraceFlags::default()), 1),
            SamplingDecision::Drop
        );
    }

    #[test]
    fn the_ratio_applies_to_roots_only_when_parent_based() {
        let state: &'static SamplerState = Box::leak(Box::new(SamplerState::new()));
        state.set(true, 0.0, true);
        let sampler = DynamicSampler(state);
        assert_eq!(decide(&sampler, None, u128::MAX), SamplingDecision::Drop);
        assert_eq!(
            decide(&sampler, Some(TraceFlags::SAMPLED), 1),
            SamplingDecision::RecordAndSample
        );
        // Not parent-based: the ratio decides even under a sampled parent.
        state.set(false, 0.0, true);
        assert_eq!(
            decide(&sampler, Some(TraceFlags::SAMPLED), 1),
            SamplingDecision::Drop
        );
    }

    #[test]
    fn the_cheap_check_agrees_with_the_sampler() {
        let state = SamplerState::new();
        let sampled = Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(7u128),
            SpanId::from(9u64),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ));
        assert!(
            !state.may_record(&sampled),
            "nothing is recorded before telemetry is set up"
        );
        state.set(true, 0.0, false);
        assert!(!state.may_record(&sampled), "nor without an exporter");
        state.set(true, 0.0, true);
        assert!(state.may_record(&sampled));
        assert!(!state.may_record(&Context::new()), "a new trace at ratio 0");
        state.set(true, 0.1, true);
        assert!(
            state.may_record(&Context::new()),
            "the sampler decides at a fractional ratio"
        );
        let unsampled = unrecorded(Context::new());
        assert!(
            unsampled.span().span_context().is_valid()
                && !unsampled.span().span_context().is_sampled()
        );
        assert!(!state.may_record(&unsampled));
        // A caller's context passes through untouched.
        let passed = unrecorded(sampled.clone());
        assert_eq!(passed.span().span_context(), sampled.span().span_context());
    }

    #[test]
    fn a_ratio_samples_about_that_share_of_trace_ids() {
        let state: &'static SamplerState = Box::leak(Box::new(SamplerState::new()));
        state.set(true, 0.25, true);
        let sampler = DynamicSampler(state);
        // Trace ids spread over the low 64 bits, as random ids are.
        let sampled = (0..10_000u128)
            .filter(|i| {
                let id = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)) | 1;
                decide(&sampler, None, id) == SamplingDecision::RecordAndSample
            })
            .count();
        assert!(
            (2_000..3_000).contains(&sampled),
            "{sampled} of 10000 at 0.25"
        );
    }
}
