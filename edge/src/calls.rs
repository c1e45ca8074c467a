//! Call signaling at the edge: which connection carries which call participant, the per-pair
//! negotiation state (`PairNegotiation`, sans-IO in `proto`) as seen from each local
//! participant, and the reconnect grace period of participants whose connection dropped.
//!
//! Every signal is checked twice: by the core (both are present participants of one call, the
//! sender is the caller's, the caller is still a member) and by the pair's negotiation state
//! machine, on the sender's node before relaying and on the receiver's node on delivery, so
//! each node's view of a pair sees both directions.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use crate::queue::FrameSender;
use axum::extract::ws::Utf8Bytes;
use parley_proto::calls::{SFU_PEER, SfuClientRequest, SfuOp, SignalPayload};
use parley_proto::frames::Ack;
use parley_proto::{ErrorCode, Principal, SignalKind};
use parley_proto::{
    NegotiationError, NegotiationRole, PairNegotiation, Relay, ServerFrame, Side, Signal,
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A participant attached to a connection of this node.
struct Attached {
    conn: u64,
    tx: FrameSender,
    call_id: String,
    channel_id: String,
}

/// Publishes the calls and participants held by this node's connections.
fn record_gauges(attached: &HashMap<String, Attached>) {
    let calls: std::collections::HashSet<&str> =
        attached.values().map(|a| a.call_id.as_str()).collect();
    crate::metrics::calls_on_node(calls.len(), attached.len());
}

/// (call, local participant, remote participant)
type PairKey = (String, String, String);

#[derive(Default)]
pub(crate) struct CallRegistry {
    attached: Mutex<HashMap<String, Attached>>,
    pairs: Mutex<HashMap<PairKey, PairNegotiation>>,
    /// Participants whose connection dropped, with the timer that makes them leave.
    reconnecting: Mutex<HashMap<String, tokio::task::AbortHandle>>,
}

/// Outcome of an outgoing signal.
pub(crate) enum Outgoing {
    /// Relay the signal to the target.
    Forward,
    /// Do not relay; the sender's offer lost a glare.
    RolledBack,
    /// Do not relay; nothing to report (trickle of a rolled-back offer).
    Discard,
}

impl CallRegistry {
    /// Attaches a participant to a connection. Returns true when it was reconnecting (its
    /// timer is cancelled and its pairs need an ICE restart).
    pub fn attach(
        &self,
        participant_id: &str,
        call_id: &str,
        channel_id: &str,
        conn: u64,
        tx: FrameSender,
    ) -> bool {
        {
            let mut attached = lock(&self.attached);
            attached.insert(
                participant_id.to_owned(),
                Attached {
                    conn,
                    tx,
                    call_id: call_id.to_owned(),
                    channel_id: channel_id.to_owned(),
                },
            );
            record_gauges(&attached);
        }
        let was_reconnecting = match lock(&self.reconnecting).remove(participant_id) {
            Some(timer) => {
                timer.abort();
                true
            }
            None => false,
        };
        if was_reconnecting {
            // Both views of each pair held here: the participant's own (it is side A) and those
            // of the other local participants facing it (it is side B).
            for ((_, local, remote), pair) in lock(&self.pairs).iter_mut() {
                if remote == SFU_PEER {
                    // The media path to the SFU does not change with the WebSocket.
                    continue;
                }
                if local == participant_id {
                    pair.handle_rejoined(Side::A);
                } else if remote == participant_id {
                    pair.handle_rejoined(Side::B);
                }
            }
        }
        was_reconnecting
    }

    /// A participant attached on some node (maybe this one). If it was reconnecting here, its
    /// grace timer is cancelled and, when it now lives on another node, its views here are
    /// dropped. Returns whether it was reconnecting here.
    pub fn remote_attached(&self, participant_id: &str) -> bool {
        let was_reconnecting = match lock(&self.reconnecting).remove(participant_id) {
            Some(timer) => {
                timer.abort();
                true
            }
            None => false,
        };
        let attached_here = lock(&self.attached).contains_key(participant_id);
        if was_reconnecting && !attached_here {
            lock(&self.pairs).retain(|(_, local, _), _| local != participant_id);
        }
        was_reconnecting
    }

    /// A participant came back after a drop (announced by the node it dropped on): every local
    /// view facing it needs an ICE restart.
    pub fn peer_reconnected(&self, participant_id: &str) {
        for ((_, _, remote), pair) in lock(&self.pairs).iter_mut() {
            if remote == participant_id {
                pair.handle_rejoined(Side::B);
            }
        }
    }

    /// The connection `conn` ended: its participants become reconnecting. Returns
    /// (participant, call, channel) of each, for the caller to announce and time out.
    pub fn detach_connection(&self, conn: u64) -> Vec<(String, String, String)> {
        let mut attached = lock(&self.attached);
        let gone: Vec<String> = attached
            .iter()
            .filter(|(_, a)| a.conn == conn)
            .map(|(p, _)| p.clone())
            .collect();
        let mut out = Vec::new();
        for pid in gone {
            if let Some(a) = attached.remove(&pid) {
                out.push((pid, a.call_id, a.channel_id));
            }
        }
        if !out.is_empty() {
            record_gauges(&attached);
        }
        drop(attached);
        let mut pairs = lock(&self.pairs);
        for (pid, _, _) in &out {
            for ((_, local, remote), pair) in pairs.iter_mut() {
                if local == pid {
                    pair.handle_left(Side::A);
                } else if remote == pid {
                    pair.handle_left(Side::B);
                }
            }
        }
        out
    }

    pub fn set_reconnect_timer(&self, participant_id: &str, timer: tokio::task::AbortHandle) {
        if let Some(old) = lock(&self.reconnecting).insert(participant_id.to_owned(), timer) {
            old.abort();
        }
    }

    /// The reconnect grace ended without a reconnect (or the participant left): forget it.
    pub fn forget(&self, participant_id: &str) {
        lock(&self.reconnecting).remove(participant_id);
        lock(&self.pairs)
            .retain(|(_, local, remote), _| local != participant_id && remote != participant_id);
    }

    /// Whether `participant_id` is attached on this node (to `conn`).
    pub fn is_attached_to(&self, participant_id: &str, conn: u64) -> bool {
        lock(&self.attached)
            .get(participant_id)
            .is_some_and(|a| a.conn == conn)
    }

    /// Runs an outgoing signal through the sender's view of the pair.
    pub fn outgoing(
        &self,
        call_id: &str,
        from: &str,
        to: &str,
        sender_impolite: bool,
        payload: &SignalPayload,
    ) -> Result<Outgoing, NegotiationError> {
        let signal = Signal::from_wire(payload.kind, payload.ice_restart);
        let key = (call_id.to_owned(), from.to_owned(), to.to_owned());
        let target_reconnecting = lock(&self.reconnecting).contains_key(to);
        let mut pairs = lock(&self.pairs);
        let pair = pairs.entry(key).or_insert_with(|| {
            let mut pair = PairNegotiation::new(if sender_impolite { Side::A } else { Side::B });
            // A pair first used while the target is reconnecting starts with the target gone.
            if target_reconnecting {
                pair.handle_left(Side::B);
            }
            pair
        });
        match pair.handle_signal(Side::A, signal)? {
            Relay::Forward { .. } | Relay::ForwardRollingBack { .. } => Ok(Outgoing::Forward),
            Relay::RolledBack { .. } => Ok(Outgoing::RolledBack),
            Relay::Discard => Ok(Outgoing::Discard),
        }
    }

    /// Delivers an incoming signal to its local participant: updates the receiver's view of the
    /// pair and queues the frame. Returns false when the participant is not attached here.
    pub fn deliver(&self, to: &str, frame: &ServerFrame) -> bool {
        let tx = match lock(&self.attached).get(to) {
            Some(a) => a.tx.clone(),
            None => return false,
        };
        let ServerFrame::CallSignal {
            call_id,
            from,
            role,
            signal,
            ..
        } = frame
        else {
            // SFU notices (`call.sfu`) and other participant-targeted frames: queue as they are.
            if let Ok(json) = serde_json::to_string(frame) {
                let _ = tx.try_send(Utf8Bytes::from(json));
            }
            return true;
        };
        {
            let key = (call_id.clone(), to.to_owned(), from.clone());
            let mut pairs = lock(&self.pairs);
            let pair = pairs.entry(key).or_insert_with(|| {
                PairNegotiation::new(if *role == NegotiationRole::Impolite {
                    Side::A
                } else {
                    Side::B
                })
            });
            // The sender's node validated the signal; a disagreement here is a race between
            // crossing signals, which the peers' own perfect negotiation settles.
            if let Err(e) =
                pair.handle_signal(Side::B, Signal::from_wire(signal.kind, signal.ice_restart))
            {
                tracing::debug!(error = %e, call = %call_id, "signal delivered despite local pair state");
            }
        }
        if let Ok(json) = serde_json::to_string(frame) {
            let _ = tx.try_send(Utf8Bytes::from(json));
        }
        true
    }
}

impl CallRegistry {
    /// Runs a signal of `from` to the SFU through the participant's SFU pair: the client is
    /// always the offerer (impolite side A), the SFU the answerer.
    fn sfu_outgoing(
        &self,
        call_id: &str,
        from: &str,
        payload: &SignalPayload,
    ) -> Result<Outgoing, NegotiationError> {
        self.outgoing(call_id, from, SFU_PEER, true, payload)
    }

    /// The SFU's answer (`answered`) or refusal (`!answered`) of an offer of `from`: the pair
    /// returns to stable either way.
    fn sfu_settled(&self, call_id: &str, from: &str, answered: bool) {
        let key = (call_id.to_owned(), from.to_owned(), SFU_PEER.to_owned());
        if let Some(pair) = lock(&self.pairs).get_mut(&key) {
            let (side, kind) = if answered {
                (Side::B, SignalKind::Answer)
            } else {
                (Side::A, SignalKind::Rollback)
            };
            if let Err(e) = pair.handle_signal(side, Signal::from_wire(kind, false)) {
                tracing::debug!(error = %e, call = %call_id, "SFU pair out of step");
            }
        }
    }
}

/// The error frame of a refused SFU request: the reason (the message's `reason:` prefix, when
/// the core put one there) goes in `reason`.
fn sfu_error(id: String, code: ErrorCode, message: String) -> ServerFrame {
    let reason = message
        .split_once(": ")
        .map(|(r, _)| r)
        .filter(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        .map(str::to_owned);
    ServerFrame::Error {
        id: Some(id),
        code,
        message,
        retry_after_ms: None,
        reason,
    }
}

/// `call.signal` to the reserved peer `sfu` (docs/calls.md): checked by the participant's SFU
/// pair, passed to the call's SFU through the core; an offer's answer is queued to the
/// connection as a `call.signal` from `sfu`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn sfu_signal(
    edge: &crate::Edge,
    principal: &Principal,
    conn: u64,
    tx: FrameSender,
    id: String,
    call_id: String,
    from: String,
    signal: SignalPayload,
) -> ServerFrame {
    if !edge.calls.is_attached_to(&from, conn) {
        return sfu_error(
            id,
            ErrorCode::InvalidRequest,
            "attach the participant to this connection first (call.attach)".into(),
        );
    }
    if signal.kind == SignalKind::Answer {
        return sfu_error(
            id,
            ErrorCode::Conflict,
            "answer_from_offerer: the SFU never offers; only offers, candidates and rollbacks go to it"
                .into(),
        );
    }
    match edge.calls.sfu_outgoing(&call_id, &from, &signal) {
        Err(e) => {
            return sfu_error(id, ErrorCode::Conflict, format!("{}: {e}", e.code()));
        }
        Ok(Outgoing::Discard | Outgoing::RolledBack) => return ServerFrame::ack(id),
        Ok(Outgoing::Forward) => {}
    }
    let kind = signal.kind;
    if matches!(kind, SignalKind::EndOfCandidates | SignalKind::Rollback) {
        // Nothing for the SFU: it is ICE-lite, and a rolled-back offer never reached it.
        return ServerFrame::ack(id);
    }
    let result = edge
        .gateway
        .sfu_request(principal, &call_id, &from, SfuClientRequest::Signal(signal))
        .await;
    match result {
        Ok(answer) => {
            if kind == SignalKind::Offer {
                edge.calls.sfu_settled(&call_id, &from, true);
                if let Some(sdp) = answer {
                    let frame = ServerFrame::CallSignal {
                        call_id,
                        from: SFU_PEER.to_owned(),
                        to: from,
                        role: NegotiationRole::Impolite,
                        signal: SignalPayload {
                            kind: SignalKind::Answer,
                            sdp: Some(sdp),
                            candidate: None,
                            ice_restart: false,
                            credential: None,
                        },
                    };
                    if let Ok(json) = serde_json::to_string(&frame) {
                        let _ = tx.try_send(Utf8Bytes::from(json));
                    }
                }
            }
            ServerFrame::ack(id)
        }
        Err(e) => {
            if kind == SignalKind::Offer {
                edge.calls.sfu_settled(&call_id, &from, false);
            }
            sfu_error(id, e.code, e.message)
        }
    }
}

/// `call.sfu`: a subscription change of the connection's participant.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn sfu_subscription(
    edge: &crate::Edge,
    principal: &Principal,
    conn: u64,
    id: String,
    call_id: String,
    participant_id: String,
    op: SfuOp,
    track_id: String,
    paused: Option<bool>,
    max_size: Option<(u32, u32)>,
) -> ServerFrame {
    if !edge.calls.is_attached_to(&participant_id, conn) {
        return sfu_error(
            id,
            ErrorCode::InvalidRequest,
            "attach the participant to this connection first (call.attach)".into(),
        );
    }
    let req = SfuClientRequest::Subscription {
        op,
        track_id,
        paused,
        max_size,
    };
    match edge
        .gateway
        .sfu_request(principal, &call_id, &participant_id, req)
        .await
    {
        Ok(_) => ServerFrame::Ack(Ack::new(id)),
        Err(e) => sfu_error(id, e.code, e.message),
    }
}
