//! The edge ↔ core RPC (`parley serve --role edge|core`): typed, versioned messages.
//!
//! An edge asks a core by NATS request/reply on `parley.rpc.v1.<method>`; every core of a region
//! subscribes to `parley.rpc.v1.>` in the queue group `parley-core`, so each request goes to one
//! core, and a core that dies takes only its in-flight requests with it. The version is in the
//! subject: a future `v2` runs next to `v1` while a region upgrades, and within `v1` changes are
//! additive only (new optional fields, new methods).
//!
//! Each method is one request struct implementing [`RpcMethod`], which names its subject token
//! and its reply type. On the wire a request is the JSON of [`Envelope`] (the caller's deadline
//! and the request); a reply is the JSON of [`Reply`]. The HTTP forwarding method carries the raw
//! body after the JSON, separated by one `\n` (compact JSON never contains a raw newline).
//!
//! The edge is trusted with *identity*, not with *rules*: it verifies access tokens and sends the
//! verified [`Caller`] with every request; the core re-checks membership and roles as it does for
//! its own REST callers. Only edges and cores can publish on `parley.rpc.>` (NATS permissions).
//!
//! This module does no IO.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{
    ChannelEvent, ErrorCode, PresenceStatus, Principal, ReadState, SendMessage, SendResult,
    TypingState,
};

/// Version token of the subjects.
pub const RPC_VERSION: &str = "v1";
/// Every request subject starts with this; the method's name follows.
pub const RPC_SUBJECT_PREFIX: &str = "parley.rpc.v1.";
/// What cores subscribe to.
pub const RPC_SUBJECT_ALL: &str = "parley.rpc.v1.>";
/// The queue group every core joins: one core answers each request.
pub const CORE_QUEUE_GROUP: &str = "parley-core";

/// One RPC method: its subject token and reply.
pub trait RpcMethod: Serialize + DeserializeOwned {
    /// The subject token after [`RPC_SUBJECT_PREFIX`].
    const NAME: &'static str;
    /// What the core answers on success.
    type Reply: Serialize + DeserializeOwned;
}

/// The subject of a method.
pub fn subject<M: RpcMethod>() -> String {
    format!("{RPC_SUBJECT_PREFIX}{}", M::NAME)
}

/// A request as it travels.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<M> {
    /// How long the caller waits for this attempt, in milliseconds (relative, so clocks need not
    /// agree). A core stops reads that outlive it; writes are never cut short (their commit may
    /// already be queued) and are made safe to retry by idempotency instead.
    pub timeout_ms: u64,
    pub req: M,
}

/// A reply as it travels.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply<T> {
    Ok(T),
    Err(RpcError),
}

/// A failure in public terms (the core logs the detail, never sends it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcError {
    pub code: ErrorCode,
    pub message: String,
}

/// The verified caller, as the edge read it from the access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub tenant_id: String,
    pub user_id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    pub expires_at: u64,
}

impl From<&Principal> for Caller {
    fn from(p: &Principal) -> Caller {
        Caller {
            tenant_id: p.tenant_id.clone(),
            user_id: p.user_id.clone(),
            roles: p.roles.clone(),
            expires_at: p.expires_at,
        }
    }
}

impl From<Caller> for Principal {
    fn from(c: Caller) -> Principal {
        Principal {
            tenant_id: c.tenant_id,
            user_id: c.user_id,
            roles: c.roles,
            expires_at: c.expires_at,
        }
    }
}

/// Sends of one user on one edge, in the order its connections sent them. The core commits them
/// in this order (they enter the storage writer's queue in order, usually as one batch); each
/// gets its own result. Retried as a whole on a timeout: every send carries a `client_msg_id`,
/// so a send that was committed by the first attempt is answered with the original message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendBatch {
    pub caller: Caller,
    pub sends: Vec<BatchedSend>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchedSend {
    pub channel_id: String,
    pub send: SendMessage,
}

impl RpcMethod for SendBatch {
    const NAME: &'static str = "send_batch";
    /// One result per send, in the order sent.
    type Reply = Vec<Reply<SendResult>>;
}

/// May the caller subscribe to the channel? Answers its last committed seq.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscribeCheck {
    pub caller: Caller,
    pub channel_id: String,
}

impl RpcMethod for SubscribeCheck {
    const NAME: &'static str = "subscribe_check";
    type Reply = u64;
}

/// Typing started or stopped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Typing {
    pub caller: Caller,
    pub channel_id: String,
    pub state: TypingState,
}

impl RpcMethod for Typing {
    const NAME: &'static str = "typing";
    type Reply = ();
}

/// Moves the caller's read position forward (idempotent: it only ever moves forward).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MarkRead {
    pub caller: Caller,
    pub channel_id: String,
    pub seq: u64,
}

impl RpcMethod for MarkRead {
    const NAME: &'static str = "mark_read";
    type Reply = ReadState;
}

/// The caller's read state of a channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetReadState {
    pub caller: Caller,
    pub channel_id: String,
}

impl RpcMethod for GetReadState {
    const NAME: &'static str = "read_state";
    type Reply = ReadState;
}

/// May the caller attach this call participant to a connection? Answers the call's channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachCall {
    pub caller: Caller,
    pub call_id: String,
    pub participant_id: String,
}

impl RpcMethod for AttachCall {
    const NAME: &'static str = "attach_call";
    type Reply = String;
}

/// Checks a signal between two participants of a call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckSignal {
    pub caller: Caller,
    pub call_id: String,
    pub from: String,
    pub to: String,
}

/// Where a signal goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalRoute {
    pub channel_id: String,
    pub target_user: String,
    pub sender_impolite: bool,
}

impl RpcMethod for CheckSignal {
    const NAME: &'static str = "check_signal";
    type Reply = SignalRoute;
}

/// A participant's request to its call's SFU (an offer, a candidate, a subscription change).
/// Answers the SFU's answer SDP for an offer, nothing otherwise.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SfuRequest {
    pub caller: Caller,
    pub call_id: String,
    pub participant_id: String,
    pub request: crate::calls::SfuClientRequest,
}

impl RpcMethod for SfuRequest {
    const NAME: &'static str = "sfu_request";
    type Reply = Option<String>;
}

/// A call participant did not come back within the grace period (leaving is idempotent).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParticipantTimedOut {
    pub tenant_id: String,
    pub call_id: String,
    pub participant_id: String,
}

impl RpcMethod for ParticipantTimedOut {
    const NAME: &'static str = "participant_timed_out";
    type Reply = ();
}

/// Persisted events of a channel with `after < seq <= up_to`, ascending (gap fills, resume).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChannelEvents {
    pub tenant_id: String,
    pub channel_id: String,
    pub after: u64,
    pub up_to: Option<u64>,
    pub limit: u32,
}

impl RpcMethod for ChannelEvents {
    const NAME: &'static str = "channel_events";
    type Reply = Vec<ChannelEvent>;
}

/// The committed last seq of channels `(tenant, channel)` (the edge's commit poll).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastSeqs {
    pub channels: Vec<(String, String)>,
}

impl RpcMethod for LastSeqs {
    const NAME: &'static str = "last_seqs";
    type Reply = Vec<(String, u64)>;
}

/// One edge's view of one user's presence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEntry {
    pub tenant_id: String,
    pub user_id: String,
    pub status: PresenceStatus,
    pub last_active_ms: u64,
    pub last_seen_ms: Option<u64>,
}

/// Presence transitions decided by an edge (its users' connections aggregated, grace period
/// applied), batched. The core writes them to the presence store under the edge's node id and
/// announces the users whose cluster-wide status changed. Re-sent until answered; applying an
/// entry twice is harmless.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PresenceUpdate {
    pub node_id: String,
    pub changes: Vec<PresenceEntry>,
}

impl RpcMethod for PresenceUpdate {
    const NAME: &'static str = "presence_update";
    type Reply = ();
}

/// Refreshes every entry an edge holds, so they outlive the store's TTL while the edge lives;
/// the entries of an edge that stops refreshing expire and its users go offline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PresenceRefresh {
    pub node_id: String,
    pub entries: Vec<PresenceEntry>,
}

impl RpcMethod for PresenceRefresh {
    const NAME: &'static str = "presence_refresh";
    type Reply = ();
}

/// A client's REST request, forwarded by the edge to run through the core's router. The body
/// follows the JSON on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HttpRequest {
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// The headers the API reads (authorization, content type, request id, ...).
    pub headers: Vec<(String, String)>,
    /// The client's address as the edge saw it (per-address budgets).
    pub client_addr: Option<String>,
}

/// The core's answer to an [`HttpRequest`]; the body follows the JSON on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl RpcMethod for HttpRequest {
    const NAME: &'static str = "http";
    type Reply = HttpResponse;
}

/// Encodes a request (with an optional raw body after a newline).
pub fn encode_request<M: RpcMethod>(req: &M, timeout_ms: u64, body: &[u8]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Out<'a, M> {
        timeout_ms: u64,
        req: &'a M,
    }
    let mut out = serde_json::to_vec(&Out { timeout_ms, req }).unwrap_or_default();
    if !body.is_empty() {
        out.push(b'\n');
        out.extend_from_slice(body);
    }
    out
}

/// Decodes a request: the envelope and the raw body after it (empty when none).
pub fn decode_request<M: RpcMethod>(payload: &[u8]) -> Result<(Envelope<M>, &[u8]), String> {
    let (json, body) = split(payload);
    let env = serde_json::from_slice(json).map_err(|e| format!("bad {} request: {e}", M::NAME))?;
    Ok((env, body))
}

/// Encodes a reply (with an optional raw body after a newline).
pub fn encode_reply<T: Serialize>(reply: &Reply<T>, body: &[u8]) -> Vec<u8> {
    let mut out = serde_json::to_vec(reply).unwrap_or_default();
    if !body.is_empty() {
        out.push(b'\n');
        out.extend_from_slice(body);
    }
    out
}

/// Decodes a reply and the raw body after it.
pub fn decode_reply<T: DeserializeOwned>(payload: &[u8]) -> Result<(Reply<T>, &[u8]), String> {
    let (json, body) = split(payload);
    let reply = serde_json::from_slice(json).map_err(|e| format!("bad reply: {e}"))?;
    Ok((reply, body))
}

fn split(payload: &[u8]) -> (&[u8], &[u8]) {
    match payload.iter().position(|&b| b == b'\n') {
        Some(i) => (&payload[..i], &payload[i + 1..]),
        None => (payload, &[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_bodies_round_trip() {
        let req = HttpRequest {
            method: "POST".into(),
            uri: "/v1/channels?x=1".into(),
            headers: vec![("content-type".into(), "application/json".into())],
            client_addr: Some("127.0.0.1:5".into()),
        };
        let body = b"{\"a\":\n\"b\"}\n";
        let wire = encode_request(&req, 1500, body);
        let (env, got) = decode_request::<HttpRequest>(&wire).unwrap();
        assert_eq!(env.timeout_ms, 1500);
        assert_eq!(env.req.uri, "/v1/channels?x=1");
        assert_eq!(
            got, body,
            "the body is kept byte for byte, newlines included"
        );

        let wire = encode_request(
            &SubscribeCheck {
                caller: Caller {
                    tenant_id: "t".into(),
                    user_id: "u\nv".into(),
                    roles: vec![],
                    expires_at: 9,
                },
                channel_id: "ch_1".into(),
            },
            10,
            &[],
        );
        let (env, body) = decode_request::<SubscribeCheck>(&wire).unwrap();
        assert_eq!(env.req.caller.user_id, "u\nv");
        assert!(body.is_empty());
    }

    #[test]
    fn replies_carry_errors_with_their_codes() {
        let wire = encode_reply::<u64>(
            &Reply::Err(RpcError {
                code: ErrorCode::Forbidden,
                message: "no".into(),
            }),
            &[],
        );
        let (reply, _) = decode_reply::<u64>(&wire).unwrap();
        assert!(matches!(reply, Reply::Err(e) if e.code == ErrorCode::Forbidden));
        assert!(decode_reply::<u64>(b"garbage").is_err());
        assert!(decode_request::<LastSeqs>(b"{}").is_err());
    }

    #[test]
    fn subjects_are_versioned() {
        assert_eq!(subject::<SendBatch>(), "parley.rpc.v1.send_batch");
        assert!(RPC_SUBJECT_ALL.starts_with("parley.rpc.v1."));
    }
}
