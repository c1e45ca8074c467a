//! Parley's selective forwarding unit.
//!
//! Every participant of a call connects to the SFU with one WebRTC connection; the SFU forwards
//! each published track (no mixing, no transcoding) to the participants that subscribe to it.
//!
//! # Shape
//!
//! - [`Sfu`] is the sans-IO core, in str0m's own style: one str0m [`str0m::Rtc`] per participant
//!   (ICE-lite, every configured host candidate in the answer), inputs carry `now`, outputs are
//!   polled ([`Sfu::poll_output`]: datagrams to send, [`SfuEvent`]s, the next timeout). No
//!   sockets, no clock, no tasks; it is tested and benchmarked without a network.
//! - [`driver`] is the thin tokio loop: ONE UDP socket per SFU process for every participant of
//!   every room. Incoming datagrams are routed by the ICE ufrag of STUN requests (the part of
//!   `USERNAME` before the colon is the SFU-side ufrag, unique per participant) and, after that,
//!   by the remote address the participant's checks came from.
//!
//! # Negotiation: the client is the only offerer
//!
//! The SFU never sends an offer. Each participant has one connection; its client offers
//! `sendonly` (or `sendrecv`) m-lines for what it publishes (video with simulcast rids
//! `q`/`h`/`f`) and `recvonly` m-lines as *receive slots*; the SFU answers. A slot carries one
//! subscribed track at a time ([`SfuEvent::SubscriptionBound`] tells which), and a freed slot
//! is reused for the next subscription without any renegotiation. When a subscriber has more
//! subscriptions than free slots, the SFU emits [`SfuEvent::RenegotiationNeeded`] with how many
//! `recvonly` transceivers of each kind to add, and the client re-offers.
//!
//! Why this and not a second, SFU-offered subscriber connection: with a single offerer per
//! connection glare cannot happen, so the call layer's existing per-pair state machine
//! (`stable → have-offer → stable`) carries SFU negotiation unchanged with the client as the
//! offerer and the SFU as the answering peer; one connection means one ICE/DTLS handshake, one
//! ufrag to route by and one congestion controller (TWCC) per participant, which the layer
//! allocation needs anyway; and slots make subscription changes free of signaling in the common
//! case (a client that pre-allocates a few slots never renegotiates for subscriptions).
//! The price: adding slots costs a client round trip, which the call layer carries as one more
//! offer/answer.
//!
//! # Admission
//!
//! [`Sfu::join`] admits only a holder of a short-lived credential ([`credential`]) issued by the
//! core for exactly this tenant, call and participant; without one there is no `Rtc`, no answer,
//! no ufrag to route by, so datagrams from anyone else are dropped before str0m sees them.
//!
//! # Forwarding
//!
//! Media is handled frame by frame (str0m's frame API): str0m reorders, depacketizes, answers
//! NACKs and sends RTX for every outgoing stream where RTX is negotiated, and repacketizes with
//! each subscriber's own SSRC and sequence numbers. The SFU keeps each subscriber's RTP
//! timestamps continuous across layer switches ([`layers`]), forwards keyframe requests (PLI/FIR)
//! from subscribers to the publisher throttled to one per second per published layer, asks for a
//! keyframe whenever a subscriber starts or switches a layer, and reads the audio-level header
//! extension for [`speaker`] detection.

pub mod core;
pub mod credential;
pub mod driver;
pub mod layers;
pub mod speaker;
mod stun;

pub use crate::core::{
    Datagram, ParticipantId, RoomKey, Sfu, SfuConfig, SfuError, SfuEvent, SfuOutput, SfuStats,
    TrackId, TrackKind, VideoPrefs,
};
pub use crate::driver::{ListenConfig, SfuHandle, SfuServer};
