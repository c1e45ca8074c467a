//! The edge's view of the core across processes: [`CoreGateway`] over NATS request/reply.
//!
//! **Send order across the hop.** In one process a connection's pipelined sends commit in the
//! order sent because each send enters the storage writer's queue before its first await. Over
//! a network that rule no longer holds: concurrent requests can reach different cores, and any
//! core can answer in any order. So sends go through a *lane* per user on this edge: a send is
//! appended to its lane synchronously, in the session's first poll of `send_message` (the same
//! place the in-process path queues it), and each lane has at most one request in flight. The
//! sends that queue up meanwhile leave together as one ordered [`SendBatch`], which the core
//! commits in that order (usually as one storage batch). A connection's sends are a
//! subsequence of its user's lane, so they commit in the order sent, whatever the core's reply
//! order. Lanes cost nothing while idle (removed when empty).
//!
//! **Retries.** A batch is retried as a whole after a timeout or "no responders": every send
//! carries a `client_msg_id`, so one that the first attempt committed is answered with the
//! original message (`created: false`) and never committed twice. The lane stays blocked while
//! it retries, so later sends cannot overtake.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use parley_core::auth::Authenticator;
use parley_edge::{CoreGateway, GatewayError, SignalRoute};
use parley_proto::rpc::{
    AttachCall, BatchedSend, Caller, ChannelEvents, CheckSignal, GetReadState, LastSeqs, MarkRead,
    ParticipantTimedOut, Reply, SendBatch, SfuRequest, SubscribeCheck, Typing,
};
use parley_proto::{ChannelEvent, Principal, ReadState, SendMessage, SendResult, TypingState};
use parley_sync::{Bus, Ephemeral};
use tokio::sync::oneshot;

use super::presence::EdgePresence;
use super::{Retry, RpcClient, unavailable};

/// Most sends in one batch.
const MAX_BATCH: usize = 64;
/// Most bytes of text and metadata in one batch (well under NATS's default 1 MB payload).
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// (tenant, user)
type LaneKey = (String, String);

struct Queued {
    principal: Principal,
    channel_id: String,
    send: SendMessage,
    reply: oneshot::Sender<Result<SendResult, GatewayError>>,
}

#[derive(Default)]
struct Lane {
    queue: VecDeque<Queued>,
}

/// Every user's sends on this edge, each user's in one ordered lane.
struct Lanes {
    rpc: RpcClient,
    /// A lane exists while it has a batch in flight or sends queued.
    lanes: Mutex<HashMap<LaneKey, Lane>>,
}

impl Lanes {
    /// Appends a send to its user's lane; starts the lane's driver when it was idle.
    fn enqueue(
        self: &Arc<Self>,
        p: &Principal,
        channel_id: &str,
        send: SendMessage,
    ) -> oneshot::Receiver<Result<SendResult, GatewayError>> {
        let (tx, rx) = oneshot::channel();
        let key = (p.tenant_id.clone(), p.user_id.clone());
        let queued = Queued {
            principal: p.clone(),
            channel_id: channel_id.to_owned(),
            send,
            reply: tx,
        };
        let start = {
            let mut lanes = lock(&self.lanes);
            match lanes.get_mut(&key) {
                Some(lane) => {
                    lane.queue.push_back(queued);
                    false
                }
                None => {
                    let mut lane = Lane::default();
                    lane.queue.push_back(queued);
                    lanes.insert(key.clone(), lane);
                    true
                }
            }
        };
        if start {
            tokio::spawn(self.clone().drive(key));
        }
        rx
    }

    /// Sends the lane's queue in batches, one in flight at a time, until it is empty.
    async fn drive(self: Arc<Self>, key: LaneKey) {
        loop {
            let batch: Vec<Queued> = {
                let mut lanes = lock(&self.lanes);
                let Some(lane) = lanes.get_mut(&key) else {
                    return;
                };
                let mut batch = Vec::new();
                let mut bytes = 0usize;
                while let Some(next) = lane.queue.front() {
                    let size = next.send.text.len()
                        + next
                            .send
                            .metadata
                            .as_ref()
                            .map_or(0, |m| m.to_string().len())
                        + 128;
                    if !batch.is_empty()
                        && (batch.len() >= MAX_BATCH || bytes + size > MAX_BATCH_BYTES)
                    {
                        break;
                    }
                    bytes += size;
                    batch.extend(lane.queue.pop_front());
                }
                if batch.is_empty() {
                    lanes.remove(&key);
                    return;
                }
                batch
            };
            let req = SendBatch {
                caller: Caller::from(&batch[0].principal),
                sends: batch
                    .iter()
                    .map(|q| BatchedSend {
                        channel_id: q.channel_id.clone(),
                        send: q.send.clone(),
                    })
                    .collect(),
            };
            metrics::histogram!("parley_rpc_send_batch_size").record(batch.len() as f64);
            match self.rpc.call(&req, &[], Retry::Idempotent).await {
                Ok((results, _)) if results.len() == batch.len() => {
                    for (q, r) in batch.into_iter().zip(results) {
                        let _ = q.reply.send(match r {
                            Reply::Ok(v) => Ok(v),
                            Reply::Err(e) => Err(GatewayError {
                                code: e.code,
                                message: e.message,
                            }),
                        });
                    }
                }
                Ok(_) => {
                    tracing::error!(
                        "a core answered a send batch with the wrong number of results"
                    );
                    for q in batch {
                        let _ = q
                            .reply
                            .send(Err(unavailable("the core's answer was incomplete")));
                    }
                }
                Err(e) => {
                    for q in batch {
                        let _ = q.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}

/// [`CoreGateway`] over NATS: what an edge process uses.
pub struct NatsGateway {
    rpc: RpcClient,
    auth: Arc<Authenticator>,
    bus: Arc<dyn Bus>,
    lanes: Arc<Lanes>,
    presence: Arc<EdgePresence>,
}

impl NatsGateway {
    pub fn new(
        rpc: RpcClient,
        auth: Arc<Authenticator>,
        bus: Arc<dyn Bus>,
        presence: Arc<EdgePresence>,
    ) -> NatsGateway {
        NatsGateway {
            lanes: Arc::new(Lanes {
                rpc: rpc.clone(),
                lanes: Mutex::default(),
            }),
            rpc,
            auth,
            bus,
            presence,
        }
    }
}

fn valid_channel(channel_id: &str) -> Result<(), GatewayError> {
    parley_core::validate::channel_id(channel_id).map_err(|m| GatewayError {
        code: parley_proto::ErrorCode::InvalidArgument,
        message: m,
    })
}

#[async_trait]
impl CoreGateway for NatsGateway {
    fn authenticate(&self, token: &str) -> Result<Principal, GatewayError> {
        self.auth.verify(token).map_err(|e| GatewayError {
            code: e.code,
            message: e.message,
        })
    }

    async fn subscribe_check(&self, p: &Principal, channel_id: &str) -> Result<u64, GatewayError> {
        valid_channel(channel_id)?;
        let req = SubscribeCheck {
            caller: p.into(),
            channel_id: channel_id.to_owned(),
        };
        Ok(self.rpc.call(&req, &[], Retry::Idempotent).await?.0)
    }

    async fn send_message(
        &self,
        p: &Principal,
        channel_id: &str,
        req: SendMessage,
    ) -> Result<SendResult, GatewayError> {
        // Everything before the first await runs in the session's first poll: the send takes
        // its place in the lane there, in the order the connection sent it.
        valid_channel(channel_id)?;
        let rx = self.lanes.enqueue(p, channel_id, req);
        self.presence.activity(p);
        rx.await
            .unwrap_or_else(|_| Err(unavailable("the send was dropped; retry it")))
    }

    async fn connection_opened(&self, p: &Principal) {
        self.presence.connected(p);
    }

    fn connection_closed(&self, p: &Principal) {
        self.presence.disconnected(p);
    }

    async fn typing(
        &self,
        p: &Principal,
        channel_id: &str,
        state: TypingState,
    ) -> Result<(), GatewayError> {
        valid_channel(channel_id)?;
        if state == TypingState::Start {
            self.presence.activity(p);
        }
        let req = Typing {
            caller: p.into(),
            channel_id: channel_id.to_owned(),
            state,
        };
        // Ephemeral: a lost one is not worth a second announcement.
        self.rpc.call(&req, &[], Retry::Undelivered).await?;
        Ok(())
    }

    async fn mark_read(
        &self,
        p: &Principal,
        channel_id: &str,
        seq: u64,
    ) -> Result<ReadState, GatewayError> {
        valid_channel(channel_id)?;
        self.presence.activity(p);
        let req = MarkRead {
            caller: p.into(),
            channel_id: channel_id.to_owned(),
            seq,
        };
        // The read position only moves forward: a second run changes nothing.
        Ok(self.rpc.call(&req, &[], Retry::Idempotent).await?.0)
    }

    async fn read_state(&self, p: &Principal, channel_id: &str) -> Result<ReadState, GatewayError> {
        valid_channel(channel_id)?;
        let req = GetReadState {
            caller: p.into(),
            channel_id: channel_id.to_owned(),
        };
        Ok(self.rpc.call(&req, &[], Retry::Idempotent).await?.0)
    }

    async fn set_away(&self, p: &Principal, away: bool) {
        self.presence.set_away(p, away);
    }

    async fn attach_call(
        &self,
        p: &Principal,
        call_id: &str,
        participant_id: &str,
    ) -> Result<String, GatewayError> {
        let req = AttachCall {
            caller: p.into(),
            call_id: call_id.to_owned(),
            participant_id: participant_id.to_owned(),
        };
        Ok(self.rpc.call(&req, &[], Retry::Idempotent).await?.0)
    }

    async fn check_signal(
        &self,
        p: &Principal,
        call_id: &str,
        from: &str,
        to: &str,
    ) -> Result<SignalRoute, GatewayError> {
        let req = CheckSignal {
            caller: p.into(),
            call_id: call_id.to_owned(),
            from: from.to_owned(),
            to: to.to_owned(),
        };
        let route = self.rpc.call(&req, &[], Retry::Idempotent).await?.0;
        Ok(SignalRoute {
            channel_id: route.channel_id,
            target_user: route.target_user,
            sender_impolite: route.sender_impolite,
        })
    }

    async fn publish_ephemeral(&self, event: Ephemeral) {
        // Edges publish ephemeral events themselves (no storage involved).
        if let Err(e) = self.bus.publish_ephemeral(&event).await {
            tracing::debug!(error = %e, "ephemeral event dropped");
        }
    }

    async fn sfu_request(
        &self,
        p: &Principal,
        call_id: &str,
        participant_id: &str,
        req: parley_proto::calls::SfuClientRequest,
    ) -> Result<Option<String>, GatewayError> {
        let req = SfuRequest {
            caller: p.into(),
            call_id: call_id.to_owned(),
            participant_id: participant_id.to_owned(),
            request: req,
        };
        // An offer applied twice would renegotiate twice: only retried when no core took it.
        Ok(self.rpc.call(&req, &[], Retry::Undelivered).await?.0)
    }

    async fn participant_timed_out(&self, tenant: &str, call_id: &str, participant_id: &str) {
        let req = ParticipantTimedOut {
            tenant_id: tenant.to_owned(),
            call_id: call_id.to_owned(),
            participant_id: participant_id.to_owned(),
        };
        if let Err(e) = self.rpc.call(&req, &[], Retry::Idempotent).await {
            tracing::warn!(error = %e, call = %call_id, "could not time out a call participant");
        }
    }

    async fn channel_events(
        &self,
        tenant: &str,
        channel_id: &str,
        after: u64,
        up_to: Option<u64>,
        limit: u32,
    ) -> Result<Vec<ChannelEvent>, GatewayError> {
        let req = ChannelEvents {
            tenant_id: tenant.to_owned(),
            channel_id: channel_id.to_owned(),
            after,
            up_to,
            limit,
        };
        Ok(self.rpc.call(&req, &[], Retry::Idempotent).await?.0)
    }

    async fn last_seqs(
        &self,
        channels: &[(String, String)],
    ) -> Result<Vec<(String, u64)>, GatewayError> {
        let mut out = Vec::new();
        // Bounded requests: a poll of many channels goes in slices.
        for slice in channels.chunks(1000) {
            let req = LastSeqs {
                channels: slice.to_vec(),
            };
            out.extend(self.rpc.call(&req, &[], Retry::Idempotent).await?.0);
        }
        Ok(out)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
