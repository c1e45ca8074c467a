//! The core's side of the RPC (`--role core`): answers edges on `parley.rpc.v1.>` in the queue
//! group `parley-core`.
//!
//! Stateless between requests: every request carries its caller and its arguments, and every
//! answer comes from the domain (`Core`) and storage, so any core of the region can answer any
//! request and cores scale by starting more. The caller is trusted for who it is (the edge
//! verified its token), never for what it may do: every method goes through the same `Core`
//! calls as REST, which re-check membership and roles.
//!
//! At most [`MAX_IN_FLIGHT`] requests run at once per core; beyond that the subscription's
//! buffer holds them, and edges whose deadline passes retry (to whichever core answers).
//!
//! **Fault injection.** `PARLEY_FAULT_RPC_DELAY_MS=N` (read once) delays each request by a
//! random 0..N ms before it is handled and its reply by another 0..N ms, so requests are handled
//! and answered out of order (`parley/tests/split_roles.rs` uses it for the send-order test).

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, Message};
use axum::Router;
use bytes::Bytes;
use futures::StreamExt;
use parley_core::presence_store::LocalPresence;
use parley_core::{Core, CoreError};
use parley_proto::calls::LeaveReason;
use parley_proto::rpc::{
    self, AttachCall, CORE_QUEUE_GROUP, ChannelEvents, CheckSignal, GetReadState, HttpRequest,
    HttpResponse, LastSeqs, MarkRead, ParticipantTimedOut, PresenceEntry, PresenceRefresh,
    PresenceUpdate, RPC_SUBJECT_ALL, RPC_SUBJECT_PREFIX, Reply, RpcError, RpcMethod, SendBatch,
    SfuRequest, SignalRoute, SubscribeCheck, Typing,
};
use parley_proto::{ErrorCode, Principal};
use tokio::sync::Semaphore;

/// Requests handled at once by one core.
pub const MAX_IN_FLIGHT: usize = 1024;

/// Largest answer body a core sends (REST pages); above it the request fails with
/// `unavailable` and a sentence asking for less.
fn max_reply_bytes(client: &Client) -> usize {
    client.server_info().max_payload.saturating_sub(4096)
}

/// What the responder serves with.
pub struct Responder {
    pub client: Client,
    pub core: Arc<Core>,
    /// The REST API (as the core serves it) for forwarded requests.
    pub http: Router,
}

impl Responder {
    /// Subscribes (the server has the subscription when this returns), then answers in a task
    /// until `shutdown` turns true; then stops taking requests (the queue group sends them to
    /// the other cores) and lets those in flight finish.
    pub async fn start(
        self,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let sub = self
            .client
            .queue_subscribe(RPC_SUBJECT_ALL, CORE_QUEUE_GROUP.to_owned())
            .await
            .map_err(|e| anyhow::anyhow!("cannot subscribe to {RPC_SUBJECT_ALL}: {e}"))?;
        // A round trip, so the server has the subscription before the node says it is up.
        self.client
            .flush()
            .await
            .map_err(|e| anyhow::anyhow!("NATS did not confirm the RPC subscription: {e}"))?;
        Ok(tokio::spawn(self.run(sub, shutdown)))
    }

    async fn run(
        self,
        mut sub: async_nats::Subscriber,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let delay = fault_delay();
        let this = Arc::new(self);
        let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        loop {
            let msg = tokio::select! {
                m = sub.next() => match m { Some(m) => m, None => break },
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        let _ = sub.unsubscribe().await;
                        break;
                    }
                    continue;
                }
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let this = this.clone();
            tokio::spawn(async move {
                if let Some(max) = delay {
                    tokio::time::sleep(random_delay(max)).await;
                }
                let answer = this.handle(&msg).await;
                if let Some(max) = delay {
                    tokio::time::sleep(random_delay(max)).await;
                }
                if let Some(reply) = msg.reply
                    && let Err(e) = this.client.publish(reply, Bytes::from(answer)).await
                {
                    tracing::warn!(error = %e, "RPC reply not sent");
                }
                drop(permit);
            });
        }
        // In-flight requests finish (bounded) before the process goes.
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            permits.acquire_many(MAX_IN_FLIGHT as u32),
        )
        .await;
        let _ = this.client.flush().await;
    }

    async fn handle(&self, msg: &Message) -> Vec<u8> {
        let method = msg
            .subject
            .as_str()
            .strip_prefix(RPC_SUBJECT_PREFIX)
            .unwrap_or("");
        let p = &msg.payload[..];
        match method {
            SendBatch::NAME => self.serve(p, |r, _| self.send_batch(r)).await,
            SubscribeCheck::NAME => {
                self.serve_read(p, |r: SubscribeCheck, _| async move {
                    let caller = Principal::from(r.caller);
                    valid_channel(&r.channel_id)?;
                    Ok(self
                        .core
                        .get_channel(&caller, &r.channel_id)
                        .await
                        .map_err(rpc_err)?
                        .last_seq)
                })
                .await
            }
            Typing::NAME => {
                self.serve(p, |r: Typing, _| async move {
                    valid_channel(&r.channel_id)?;
                    let caller = Principal::from(r.caller);
                    self.core
                        .typing(&caller, &r.channel_id, r.state)
                        .await
                        .map_err(rpc_err)?;
                    Ok(())
                })
                .await
            }
            MarkRead::NAME => {
                self.serve(p, |r: MarkRead, _| async move {
                    valid_channel(&r.channel_id)?;
                    let caller = Principal::from(r.caller);
                    self.core
                        .mark_read(&caller, &r.channel_id, r.seq)
                        .await
                        .map_err(rpc_err)
                })
                .await
            }
            GetReadState::NAME => {
                self.serve_read(p, |r: GetReadState, _| async move {
                    valid_channel(&r.channel_id)?;
                    let caller = Principal::from(r.caller);
                    self.core
                        .read_state(&caller, &r.channel_id)
                        .await
                        .map_err(rpc_err)
                })
                .await
            }
            AttachCall::NAME => {
                self.serve(p, |r: AttachCall, _| async move {
                    let caller = Principal::from(r.caller);
                    self.core
                        .attach_check(&caller, &r.call_id, &r.participant_id)
                        .await
                        .map_err(rpc_err)
                })
                .await
            }
            CheckSignal::NAME => {
                self.serve(p, |r: CheckSignal, _| async move {
                    let caller = Principal::from(r.caller);
                    let route = self
                        .core
                        .check_signal(&caller, &r.call_id, &r.from, &r.to)
                        .await
                        .map_err(rpc_err)?;
                    Ok(SignalRoute {
                        channel_id: route.channel_id,
                        target_user: route.target_user,
                        sender_impolite: route.impolite == parley_proto::Side::A,
                    })
                })
                .await
            }
            SfuRequest::NAME => {
                self.serve(p, |r: SfuRequest, _| async move {
                    let caller = Principal::from(r.caller);
                    self.core
                        .sfu_request(&caller, &r.call_id, &r.participant_id, r.request)
                        .await
                        .map_err(rpc_err)
                })
                .await
            }
            ParticipantTimedOut::NAME => {
                self.serve(p, |r: ParticipantTimedOut, _| async move {
                    self.core
                        .leave_participant(
                            &r.tenant_id,
                            &r.call_id,
                            &r.participant_id,
                            LeaveReason::Timeout,
                        )
                        .await
                        .map_err(rpc_err)?;
                    Ok(())
                })
                .await
            }
            ChannelEvents::NAME => {
                self.serve_read(p, |r: ChannelEvents, _| async move {
                    self.core
                        .channel_events(&r.tenant_id, &r.channel_id, r.after, r.up_to, r.limit)
                        .await
                        .map_err(rpc_err)
                })
                .await
            }
            LastSeqs::NAME => {
                self.serve_read(p, |r: LastSeqs, _| async move {
                    self.core.last_seqs(&r.channels).await.map_err(rpc_err)
                })
                .await
            }
            PresenceUpdate::NAME => {
                self.serve(p, |r: PresenceUpdate, _| async move {
                    valid_node(&r.node_id)?;
                    let realtime = self.core.realtime();
                    for e in r.changes {
                        let (tenant, user, local) = local_of(e);
                        realtime.apply_edge(&r.node_id, &tenant, &user, local).await;
                    }
                    Ok(())
                })
                .await
            }
            PresenceRefresh::NAME => {
                self.serve(p, |r: PresenceRefresh, _| async move {
                    valid_node(&r.node_id)?;
                    let local: Vec<_> = r.entries.into_iter().map(local_of).collect();
                    self.core.realtime().refresh_edge(&r.node_id, &local).await;
                    Ok(())
                })
                .await
            }
            HttpRequest::NAME => self.http(p).await,
            _ => rpc::encode_reply::<()>(
                &Reply::Err(RpcError {
                    code: ErrorCode::InvalidRequest,
                    message: format!("unknown RPC method {method:?}"),
                }),
                &[],
            ),
        }
    }

    /// Decodes `M`, runs `f`, encodes its answer. Never cut short: writes finish even when the
    /// caller has given up (their retry is idempotent).
    async fn serve<'a, M, F, Fut>(&'a self, payload: &'a [u8], f: F) -> Vec<u8>
    where
        M: RpcMethod,
        F: FnOnce(M, &'a [u8]) -> Fut,
        Fut: Future<Output = Result<M::Reply, RpcError>>,
    {
        match rpc::decode_request::<M>(payload) {
            Ok((env, body)) => rpc::encode_reply(&reply_of(f(env.req, body).await), &[]),
            Err(e) => bad_request::<M>(&e),
        }
    }

    /// Like [`serve`](Self::serve) for reads, which stop at the caller's deadline.
    async fn serve_read<'a, M, F, Fut>(&'a self, payload: &'a [u8], f: F) -> Vec<u8>
    where
        M: RpcMethod,
        F: FnOnce(M, &'a [u8]) -> Fut,
        Fut: Future<Output = Result<M::Reply, RpcError>>,
    {
        match rpc::decode_request::<M>(payload) {
            Ok((env, body)) => {
                let limit = Duration::from_millis(env.timeout_ms.max(1));
                let out = match tokio::time::timeout(limit, f(env.req, body)).await {
                    Ok(r) => r,
                    Err(_) => Err(RpcError {
                        code: ErrorCode::Unavailable,
                        message: "the core did not answer in time; retry shortly".into(),
                    }),
                };
                rpc::encode_reply(&reply_of(out), &[])
            }
            Err(e) => bad_request::<M>(&e),
        }
    }

    /// Commits the sends in the order given: each enters its storage writer's queue in that
    /// order (first poll, before any await), then they complete together, usually as one
    /// storage batch.
    async fn send_batch(
        &self,
        r: SendBatch,
    ) -> Result<Vec<Reply<parley_proto::SendResult>>, RpcError> {
        let caller = Principal::from(r.caller);
        let mut sends = Vec::with_capacity(r.sends.len());
        for s in r.sends {
            let core = self.core.clone();
            let caller = caller.clone();
            let mut fut = Box::pin(tokio::task::unconstrained(async move {
                valid_channel(&s.channel_id)?;
                core.send_message(&caller, &s.channel_id, s.send)
                    .await
                    .map_err(rpc_err)
            }));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            let early = match fut.as_mut().poll(&mut cx) {
                std::task::Poll::Ready(r) => Some(r),
                std::task::Poll::Pending => None,
            };
            sends.push((fut, early));
        }
        let results = futures::future::join_all(sends.into_iter().map(|(fut, early)| async move {
            match early {
                Some(r) => r,
                None => fut.await,
            }
        }))
        .await;
        Ok(results.into_iter().map(reply_of).collect())
    }

    async fn http(&self, payload: &[u8]) -> Vec<u8> {
        use tower::ServiceExt;
        let (env, body) = match rpc::decode_request::<HttpRequest>(payload) {
            Ok(x) => x,
            Err(e) => return bad_request::<HttpRequest>(&e),
        };
        let r = env.req;
        let mut builder = axum::http::Request::builder()
            .method(r.method.as_str())
            .uri(r.uri.as_str());
        for (k, v) in &r.headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        let mut req = match builder.body(axum::body::Body::from(Bytes::copy_from_slice(body))) {
            Ok(req) => req,
            Err(e) => {
                return bad_request::<HttpRequest>(&format!("bad forwarded request: {e}"));
            }
        };
        if let Some(addr) = r
            .client_addr
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(addr));
        }
        let Ok(res) = self.http.clone().oneshot(req).await;
        let (parts, body) = res.into_parts();
        let limit = max_reply_bytes(&self.client);
        let body = match axum::body::to_bytes(body, limit).await {
            Ok(b) => b,
            Err(_) => {
                return rpc::encode_reply::<HttpResponse>(
                    &Reply::Err(RpcError {
                        code: ErrorCode::Unavailable,
                        message: "the answer is too large to forward; ask for fewer items (limit)"
                            .into(),
                    }),
                    &[],
                );
            }
        };
        let headers = parts
            .headers
            .iter()
            .filter(|(k, _)| *k != axum::http::header::CONTENT_LENGTH)
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        rpc::encode_reply(
            &Reply::Ok(HttpResponse {
                status: parts.status.as_u16(),
                headers,
            }),
            &body,
        )
    }
}

fn local_of(e: PresenceEntry) -> (String, String, LocalPresence) {
    (
        e.tenant_id,
        e.user_id,
        LocalPresence {
            status: e.status,
            last_active_ms: e.last_active_ms,
            last_seen_ms: e.last_seen_ms,
        },
    )
}

fn reply_of<T>(r: Result<T, RpcError>) -> Reply<T> {
    match r {
        Ok(v) => Reply::Ok(v),
        Err(e) => Reply::Err(e),
    }
}

fn bad_request<M: RpcMethod>(e: &str) -> Vec<u8> {
    tracing::warn!(method = M::NAME, error = %e, "undecodable RPC request");
    rpc::encode_reply::<M::Reply>(
        &Reply::Err(RpcError {
            code: ErrorCode::InvalidRequest,
            message: format!("undecodable {} request", M::NAME),
        }),
        &[],
    )
}

fn rpc_err(e: CoreError) -> RpcError {
    if let Some(detail) = e.detail() {
        tracing::error!(code = e.code().as_str(), error = %detail, "core call failed");
    }
    RpcError {
        code: e.code(),
        message: e.public_message(),
    }
}

fn valid_channel(channel_id: &str) -> Result<(), RpcError> {
    parley_core::validate::channel_id(channel_id).map_err(|m| RpcError {
        code: ErrorCode::InvalidArgument,
        message: m,
    })
}

/// A node id is a key part in the presence store: letters and digits only.
fn valid_node(node: &str) -> Result<(), RpcError> {
    if node.is_empty() || node.len() > 64 || !node.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(RpcError {
            code: ErrorCode::InvalidArgument,
            message: "node_id must be 1-64 letters or digits".into(),
        });
    }
    Ok(())
}

fn fault_delay() -> Option<u64> {
    let ms = std::env::var("PARLEY_FAULT_RPC_DELAY_MS")
        .ok()?
        .parse::<u64>()
        .ok()?;
    tracing::warn!(
        max_ms = ms,
        "fault injection: RPC requests and replies delayed at random"
    );
    (ms > 0).then_some(ms)
}

fn random_delay(max_ms: u64) -> Duration {
    Duration::from_millis(rand::random_range(0..=max_ms))
}
