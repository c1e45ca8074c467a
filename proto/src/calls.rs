//! Calls on the wire: call sessions, participants, what joining returns, and the signaling frames
//! relayed between participants.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::signaling::{Role as NegotiationRole, SignalKind};

/// How media flows: directly between participants, or through the SFU (a later version).
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
}

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
