//! Edge ↔ core over NATS request/reply (`--role edge` / `--role core`).
//!
//! - [`RpcClient`]: one request with a deadline per attempt and the retries its method allows.
//! - [`gateway::NatsGateway`]: the edge's [`parley_edge::CoreGateway`] over the RPC, with the
//!   per-user send lanes that keep a connection's pipelined sends in order across the hop.
//! - [`presence::EdgePresence`]: the edge's own presence tracker, published to the core in
//!   batches and refreshed within the presence TTL.
//! - [`forward`]: the edge's REST forwarding (a client needs one address).
//! - [`responder`]: the core's side, in the queue group `parley-core`.
//!
//! The messages are typed in `parley_proto::rpc`.

use std::time::Duration;

use async_nats::client::RequestErrorKind;
use bytes::Bytes;
use parley_edge::GatewayError;
use parley_proto::ErrorCode;
use parley_proto::rpc::{self, Reply, RpcMethod};

pub mod forward;
pub mod gateway;
pub mod presence;
pub mod responder;

/// Help text of the edge's RPC metrics.
pub fn describe_metrics() {
    metrics::describe_histogram!(
        "parley_rpc_duration_seconds",
        metrics::Unit::Seconds,
        "One request to a core, from the first attempt to the answer (retries included)."
    );
    metrics::describe_counter!(
        "parley_rpc_failures_total",
        "Failed attempts to reach a core, by method and kind (timeout, no_responders, other)."
    );
    metrics::describe_histogram!(
        "parley_rpc_send_batch_size",
        "Sends per send_batch request."
    );
}

/// Which failures a call may be retried after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Safe to run twice (reads; writes made idempotent by `client_msg_id` or that only move
    /// forward): retried after a timeout and after "no responders".
    Idempotent,
    /// Not safe to run twice: retried only when no core received it ("no responders").
    Undelivered,
}

/// Attempts per call at most.
const ATTEMPTS: u32 = 3;
/// Pause before a retry after "no responders" (cores restarting), doubled each time.
const NO_RESPONDERS_PAUSE: Duration = Duration::from_millis(100);

/// Requests to the cores of a region.
#[derive(Clone)]
pub struct RpcClient {
    client: async_nats::Client,
    /// Deadline of one attempt.
    timeout: Duration,
}

impl RpcClient {
    pub fn new(client: async_nats::Client, timeout: Duration) -> RpcClient {
        RpcClient {
            client,
            timeout: timeout.max(Duration::from_millis(50)),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Calls `M` and returns its reply and the raw body after it.
    pub async fn call<M: RpcMethod>(
        &self,
        req: &M,
        body: &[u8],
        retry: Retry,
    ) -> Result<(M::Reply, Bytes), GatewayError> {
        let subject = rpc::subject::<M>();
        let timeout_ms = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
        let payload = Bytes::from(rpc::encode_request(req, timeout_ms, body));
        let started = std::time::Instant::now();
        let mut pause = NO_RESPONDERS_PAUSE;
        let mut last = unavailable("no core answered");
        for attempt in 1..=ATTEMPTS {
            let request = async_nats::Request::new()
                .payload(payload.clone())
                .timeout(Some(self.timeout));
            match self.client.send_request(subject.clone(), request).await {
                Ok(msg) => {
                    metrics::histogram!("parley_rpc_duration_seconds", "method" => M::NAME)
                        .record(started.elapsed().as_secs_f64());
                    let (reply, _) = rpc::decode_reply::<M::Reply>(&msg.payload).map_err(|e| {
                        tracing::error!(method = M::NAME, error = %e, "undecodable RPC reply");
                        GatewayError {
                            code: ErrorCode::Internal,
                            message: "the core sent an answer this edge cannot read".into(),
                        }
                    })?;
                    let body_at = msg.payload.len() - reply_body_len(&msg.payload);
                    return match reply {
                        Reply::Ok(v) => Ok((v, msg.payload.slice(body_at..))),
                        Reply::Err(e) => Err(GatewayError {
                            code: e.code,
                            message: e.message,
                        }),
                    };
                }
                Err(e) => {
                    let retryable = match e.kind() {
                        RequestErrorKind::NoResponders => {
                            last = unavailable("no core is answering; retry shortly");
                            if attempt < ATTEMPTS {
                                tokio::time::sleep(pause).await;
                                pause *= 2;
                            }
                            true
                        }
                        RequestErrorKind::TimedOut => {
                            last = unavailable("the core did not answer in time; retry shortly");
                            retry == Retry::Idempotent
                        }
                        _ => {
                            last = unavailable("the bus to the core is unavailable");
                            retry == Retry::Idempotent
                        }
                    };
                    metrics::counter!("parley_rpc_failures_total", "method" => M::NAME, "kind" => kind_label(&e.kind()))
                        .increment(1);
                    tracing::debug!(method = M::NAME, attempt, error = %e, "RPC attempt failed");
                    if !retryable {
                        break;
                    }
                }
            }
        }
        Err(last)
    }
}

fn kind_label(k: &RequestErrorKind) -> &'static str {
    match k {
        RequestErrorKind::NoResponders => "no_responders",
        RequestErrorKind::TimedOut => "timeout",
        _ => "other",
    }
}

/// Length of the raw body after the reply's JSON line (0 when none).
fn reply_body_len(payload: &[u8]) -> usize {
    match payload.iter().position(|&b| b == b'\n') {
        Some(i) => payload.len() - i - 1,
        None => 0,
    }
}

pub fn unavailable(message: &str) -> GatewayError {
    GatewayError {
        code: ErrorCode::Unavailable,
        message: message.to_owned(),
    }
}
