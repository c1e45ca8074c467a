//! Trace context across the bus: the W3C `traceparent` (and `tracestate`) of the publishing span
//! travel in NATS message headers, so one message's trace covers send → commit → publish →
//! delivery on every node that delivers it.
//!
//! Publishing injects the current span's context (nothing when tracing is off or the span is
//! not sampled). Receiving extracts it into a `bus.deliver` span, which the node's dispatcher
//! takes with [`take_received_span`] right after the subscription yields the event (in the same
//! poll, so on the same thread) and enters while it delivers.

use std::cell::RefCell;

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use parley_proto::ChannelEvent;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Inject<'a>(&'a mut HeaderMap);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct Extract<'a>(&'a HeaderMap);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Headers carrying the current span's context, if it is a sampled trace.
pub(crate) fn current_headers() -> Option<HeaderMap> {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_sampled() {
        return None;
    }
    let mut headers = HeaderMap::new();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut Inject(&mut headers))
    });
    Some(headers)
}

thread_local! {
    static RECEIVED: RefCell<Option<tracing::Span>> = const { RefCell::new(None) };
}

/// An event arrived with `headers`: when they carry a trace context, a `bus.deliver` span
/// continuing it is left for [`take_received_span`].
pub(crate) fn received(headers: Option<&HeaderMap>, event: &ChannelEvent) {
    let span = headers.and_then(|h| {
        let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Extract(h)));
        if !parent.span().span_context().is_valid() {
            return None;
        }
        let span = tracing::info_span!(
            "bus.deliver",
            channel_id = %event.channel_id,
            seq = event.seq
        );
        let _ = span.set_parent(parent);
        Some(span)
    });
    RECEIVED.with(|r| *r.borrow_mut() = span);
}

/// The `bus.deliver` span of the event the subscription just yielded, if it was traced.
pub fn take_received_span() -> Option<tracing::Span> {
    RECEIVED.with(|r| r.borrow_mut().take())
}
