//! Calls on the wire: call sessions, participants, what joining returns, and the signaling frames
//! relayed between participants.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::signaling::{Role as NegotiationRole, SignalKind};

/// How media flows: directly between participants (a mesh), or through the call's SFU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CallMode {
    P2p,
    Sfu,
}

impl CallMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CallMode::P2p => "p2p",
            CallMode::Sfu => "sfu",
        }
    }

    pub fn parse(s: &str) -> Option<CallMode> {
        match s {
            "p2p" => Some(CallMode::P2p),
            "sfu" => Some(CallMode::Sfu),
            _ => None,
        }
    }
}

/// A call participant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CallParticipant {
    pub participant_id: String,
    pub user_id: String,
    pub joined_at: String,
    /// Set once the participant has left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_at: Option<String>,
}

/// A call of a channel. One active call per channel at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Call {
    pub id: String,
    pub channel_id: String,
    pub mode: CallMode,
    pub started_by: String,
    pub started_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// Participants, present and past, in join order.
    pub participants: Vec<CallParticipant>,
    /// In `sfu` mode: the call's SFU assignment (opaque). A new value means the call moved to
    /// another SFU process: clients open a new SFU connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sfu_session: Option<String>,
}

/// `GET /v1/channels/{id}/calls`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CallList {
    pub calls: Vec<Call>,
}

/// A STUN or TURN server for the RTCPeerConnection configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IceServer {
    pub urls: Vec<String>,
    /// TURN only: `expiry:user`, valid until the expiry (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN only: base64 HMAC-SHA1 of the username with the shared secret (coturn's REST API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Another participant as seen by one who joins, with the role the joiner plays towards them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Peer {
    pub participant_id: String,
    pub user_id: String,
    /// The joiner's role in perfect negotiation with this peer. The earlier participant of a
    /// pair is impolite, so a joiner is polite towards everyone already there.
    pub role: NegotiationRole,
}

/// `POST /v1/calls/{id}/join`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinedCall {
    pub call: Call,
    pub participant_id: String,
    /// The participants already in the call, each with the joiner's role towards them.
    pub peers: Vec<Peer>,
    pub ice_servers: Vec<IceServer>,
    /// In `sfu` mode: what the participant needs to connect to the call's SFU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sfu: Option<SfuAccess>,
}

/// The participant's access to the call's SFU (the join answer in `sfu` mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SfuAccess {
    /// The call's `sfu_session` this access is for.
    pub session: String,
    /// Opaque; goes in the first offer of a new SFU connection (`signal.credential`).
    pub credential: String,
    /// Unix seconds after which the SFU refuses the credential.
    pub expires_at: u64,
}

/// The reserved participant id of the SFU in `call.signal` (`to`/`from`).
pub const SFU_PEER: &str = "sfu";

/// `POST /v1/calls/{id}/leave`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaveCall {
    /// Your participant id from the join: `part_` and 26 letters and digits.
    #[schema(pattern = r"^part_[0-9A-Za-z]{26}$")]
    pub participant_id: String,
}

/// What a `call.signal` carries: an SDP (offer/answer), an ICE candidate, or nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SignalPayload {
    pub kind: SignalKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
    /// For offers: this offer restarts ICE.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ice_restart: bool,
    /// For the first offer of a new connection to the SFU (`to: "sfu"`): the participant's SFU
    /// credential from the join answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Why a call's mode or SFU session changed (`call.mode_changed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModeChangeReason {
    /// A join made the present participants reach the server's threshold.
    Threshold,
    /// The server puts every call on the SFU.
    Always,
    /// The call's SFU process died; the call moved to another.
    SfuFailover,
}

/// `op` of a client's `call.sfu` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SfuOp {
    Subscribe,
    Unsubscribe,
    Video,
}

/// Audio or video, on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MediaKind {
    Audio,
    Video,
}

/// An SFU notice for one participant (`call.sfu`, the `event` and its fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SfuNotice {
    /// A track exists in the call.
    TrackPublished {
        track_id: String,
        publisher: String,
        kind: MediaKind,
        /// The publisher's own mid of the track.
        mid: String,
        /// Simulcast rids, lowest first; empty without simulcast.
        layers: Vec<String>,
    },
    TrackUnpublished {
        track_id: String,
        publisher: String,
    },
    /// The subscribed track arrives on the receiver's slot `mid`.
    Bound {
        track_id: String,
        publisher: String,
        mid: String,
    },
    /// The slot `mid` no longer carries the track.
    Unbound {
        track_id: String,
        mid: String,
    },
    /// Add this many `recvonly` transceivers of each kind and offer again.
    Renegotiate {
        audio: usize,
        video: usize,
    },
    /// The layer now sent of a video track (`None`: no video).
    Layer {
        track_id: String,
        layer: Option<String>,
    },
    /// ICE and DTLS with the SFU are up.
    Connected,
    /// The SFU dropped the participant's connection.
    Disconnected,
}

/// What a participant asks of its call's SFU (through its edge and the core).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum SfuClientRequest {
    /// `call.signal` to `sfu`.
    Signal(SignalPayload),
    /// `call.sfu`.
    Subscription {
        op: SfuOp,
        track_id: String,
        paused: Option<bool>,
        max_size: Option<(u32, u32)>,
    },
}

/// A request from a core to the SFU process serving a call (in-process, or over the bus).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum SfuRequest {
    /// A participant's offer; `credential` starts a new session of the participant.
    Offer {
        tenant: String,
        call_id: String,
        channel_id: String,
        participant_id: String,
        user_id: String,
        sdp: String,
        credential: Option<String>,
    },
    Candidate {
        tenant: String,
        call_id: String,
        participant_id: String,
        candidate: String,
    },
    Subscription {
        tenant: String,
        call_id: String,
        participant_id: String,
        op: SfuOp,
        track_id: String,
        paused: Option<bool>,
        max_size: Option<(u32, u32)>,
    },
    Leave {
        tenant: String,
        call_id: String,
        participant_id: String,
    },
    /// Every participant of the call leaves.
    EndCall { tenant: String, call_id: String },
    /// The core placed the call on this SFU under `session`: the SFU lists the claim in its
    /// heartbeats, so every core routes the call here.
    Claim {
        tenant: String,
        call_id: String,
        session: String,
    },
}

/// The SFU's answer to an [`SfuRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum SfuReply {
    Answer {
        sdp: String,
    },
    Done,
    /// Refused; `code` is the SFU's stable error code (`credential_expired`, `bad_sdp`, ...).
    Refused {
        code: String,
    },
}

/// Why a participant left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LeaveReason {
    /// The participant left.
    Left,
    /// The connection did not come back within the reconnect grace period.
    Timeout,
    /// The user was removed from the channel.
    Removed,
    /// An owner or moderator ended the call.
    Ended,
}
