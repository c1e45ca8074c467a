//! What an operator sees: logs (text or JSON), the Prometheus recorder behind `/metrics`, and
//! the HTTP layer that gives every request a span, an access log line and its metrics.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::response::Response;
use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Instrument;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event, with its span fields (request id) in front.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`, and `span` / `spans`
    /// with the request id of the request the line belongs to.
    Json,
}

/// Starts logging to stderr. The filter comes from `PARLEY_LOG` (default `info`). Whatever it
/// says, the WebSocket library logs at most at debug level: at trace it prints every frame's
/// payload, `auth` frames with their token included, and tokens are never logged.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter = EnvFilter::try_from_env("PARLEY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt: Box<dyn Layer<_> + Send + Sync> = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(no_frame_payloads())
        .with(fmt)
        .init();
}

/// Drops the WebSocket library's trace events (they print frame payloads, tokens included).
fn no_frame_payloads() -> tracing_subscriber::filter::FilterFn {
    tracing_subscriber::filter::filter_fn(|meta| {
        let target = meta.target();
        let frames = target.starts_with("tungstenite") || target.starts_with("tokio_tungstenite");
        !frames || *meta.level() <= tracing::Level::DEBUG
    })
}

/// Where traces go, when they are exported.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    /// The OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    /// Share of new traces recorded, 0–1. A trace continued from another node follows that
    /// node's decision.
    pub sample_ratio: f64,
}

/// The tracer provider while traces are exported; flushes on [`Tracing::shutdown`].
pub struct Tracing(Option<opentelemetry_sdk::trace::SdkTracerProvider>);

impl Tracing {
    /// Exports the spans still buffered.
    pub fn shutdown(self) {
        if let Some(p) = self.0
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "flushing traces at shutdown failed");
        }
    }
}

/// Targets whose spans never go to the OpenTelemetry layer: the exporter's own transport (it
/// would trace itself).
const NOT_TRACED: &[&str] = &["h2", "tonic", "hyper", "tower", "opentelemetry"];

/// Starts logging (as [`init_logging`]) and, with `otlp`, span export over OTLP/gRPC. Must run
/// inside the tokio runtime (the exporter's channel lives on it).
pub fn init(format: LogFormat, otlp: Option<&OtlpConfig>) -> anyhow::Result<Tracing> {
    let Some(otlp) = otlp else {
        init_logging(format);
        return Ok(Tracing(None));
    };
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::trace::Sampler;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer, filter};

    let ratio = otlp.sample_ratio;
    if !(0.0..=1.0).contains(&ratio) {
        anyhow::bail!("--trace-sample-ratio must be between 0 and 1, got {ratio}");
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(otlp.endpoint.clone())
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("parley")
        .with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            format!("node_{}", ulid::Ulid::new()),
        ))
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .with_resource(resource)
        .build();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let tracer = provider.tracer("parley");
    // Logs keep their own level filter; spans (debug and up, e.g. `ws.message.send`,
    // `storage.commit`, `bus.publish`) go to OpenTelemetry.
    let log_filter =
        EnvFilter::try_from_env("PARLEY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(filter::filter_fn(|meta| {
            meta.level() <= &tracing::Level::DEBUG
                && !NOT_TRACED
                    .iter()
                    .any(|t| meta.target() == *t || meta.target().starts_with(&format!("{t}::")))
        }));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt: Box<dyn Layer<_> + Send + Sync> = match format {
        LogFormat::Text => fmt.with_filter(log_filter).boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(log_filter)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(no_frame_payloads())
        .with(fmt)
        .with(otel)
        .try_init()?;
    tracing::info!(endpoint = %otlp.endpoint, sample_ratio = ratio, "exporting traces over OTLP");
    Ok(Tracing(Some(provider)))
}

/// Buckets of latency histograms, in seconds: 0.5 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets of count histograms (batch sizes, queue depths).
const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's Prometheus recorder (once; later calls return the same handle) and
/// describes every metric. Histograms get explicit buckets, so they render as histograms.
pub fn metrics_handle() -> anyhow::Result<PrometheusHandle> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_size".into()), COUNT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_depth".into()), COUNT_BUCKETS)?
        .install_recorder()?;
    describe();
    crate::health::Readiness::describe();
    parley_core::metrics::describe();
    parley_edge::metrics::describe();
    let handle = HANDLE.get_or_init(|| handle).clone();
    // Histograms are drained into their buckets on every render; without scrapes, this keeps
    // their pending samples bounded.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

fn describe() {
    describe_counter!(
        "parley_http_requests_total",
        "HTTP requests answered, by method, route template and status."
    );
    describe_histogram!(
        "parley_http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request (until the response head), by method and route template."
    );
    describe_gauge!(
        "process_resident_memory_bytes",
        Unit::Bytes,
        "Resident memory of the process."
    );
    describe_gauge!(
        "parley_allocator_allocated_bytes",
        Unit::Bytes,
        "Bytes the process's allocator has handed out and not had back (the live heap; set only when the binary's allocator reports it)."
    );
    describe_gauge!(
        "parley_allocator_resident_bytes",
        Unit::Bytes,
        "Bytes of physical memory the allocator holds (the live heap, its metadata, and freed pages not yet returned to the system)."
    );
    describe_gauge!("process_open_fds", "Open file descriptors of the process.");
    describe_gauge!(
        "process_max_fds",
        "The process's limit of open file descriptors (soft limit)."
    );
}

/// Reads the allocator's live heap and resident bytes; set by the binary that picks the global
/// allocator.
pub type AllocatorStats = fn() -> Option<(u64, u64)>;

static ALLOCATOR_STATS: std::sync::OnceLock<AllocatorStats> = std::sync::OnceLock::new();

/// Sets where `/metrics` reads the allocator's figures (once; later calls are ignored).
pub fn set_allocator_stats(stats: AllocatorStats) {
    let _ = ALLOCATOR_STATS.set(stats);
}

/// Renders `/metrics`, sampling the process gauges first.
pub fn render(handle: &PrometheusHandle) -> String {
    sample_process();
    handle.render()
}

/// Resident memory and open files, read from `/proc` (Linux); left unset elsewhere.
fn sample_process() {
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm")
        && let Some(pages) = statm
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
    {
        let bytes = pages * rustix::param::page_size() as u64;
        gauge!("process_resident_memory_bytes").set(bytes as f64);
    }
    if let Some((allocated, resident)) = ALLOCATOR_STATS.get().and_then(|stats| stats()) {
        gauge!("parley_allocator_allocated_bytes").set(allocated as f64);
        gauge!("parley_allocator_resident_bytes").set(resident as f64);
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        gauge!("process_open_fds").set(dir.count() as f64);
    }
    if let Some(max) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
        gauge!("process_max_fds").set(max as f64);
    }
}

/// The caller of a request, left in the response extensions by the REST authentication
/// (`tenant/user`), for the access log.
pub use parley_core::http::CallerId;

/// A tower layer for every HTTP route: a `request` span carrying the request id (so every log
/// line of the request has it), one access log line, and the request metrics. Apply it inside
/// the request-id middleware so the id is known, and with `Router::layer`, so the route
/// template ([`MatchedPath`]) is known.
#[derive(Clone, Copy, Default)]
pub struct HttpLayer;

impl<S> tower::Layer<S> for HttpLayer {
    type Service = HttpService<S>;
    fn layer(&self, inner: S) -> HttpService<S> {
        HttpService { inner }
    }
}

#[derive(Clone)]
pub struct HttpService<S> {
    inner: S,
}

impl<S> tower::Service<Request> for HttpService<S>
where
    S: tower::Service<Request, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let started = Instant::now();
        let method = method_label(req.method());
        let route: String = req
            .extensions()
            .get::<MatchedPath>()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "unmatched".to_owned());
        let request_id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let span = tracing::info_span!("request", request_id = %request_id, method, route = %route);
        let fut = self.inner.call(req).instrument(span.clone());
        Box::pin(async move {
            let res = fut.await?;
            let elapsed = started.elapsed();
            let status = res.status().as_u16();
            let user = res
                .extensions()
                .get::<CallerId>()
                .map(|c| c.0.as_str())
                .unwrap_or("-");
            span.in_scope(|| {
                tracing::info!(
                    target: "parley::access",
                    request_id = %request_id,
                    method,
                    route = %route,
                    user,
                    status,
                    latency_ms = elapsed.as_secs_f64() * 1000.0,
                    "request"
                );
            });
            counter!(
                "parley_http_requests_total",
                "method" => method,
                "route" => route.clone(),
                "status" => status.to_string()
            )
            .increment(1);
            metrics::histogram!(
                "parley_http_request_duration_seconds",
                "method" => method,
                "route" => route
            )
            .record(elapsed.as_secs_f64());
            Ok(res)
        })
    }
}

/// The method as a label from a fixed set.
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
