//! Wire types of Parley API v1 and the sans-IO state machines built on them.
//!
//! This crate owns the *shape* of everything that crosses the network: REST bodies, WebSocket
//! frames, error codes, close codes. It also owns the protocol state machines that must behave the
//! same wherever they run (the per-channel sequencer that restores `seq` order at the edge).
//!
//! It must never do IO: no sockets, no tasks, no clocks. Time is passed in by the caller, so every
//! state machine here is unit-tested without sleeps.

pub mod calls;
pub mod conn;
pub mod error;
pub mod frames;
pub mod model;
pub mod presence;
pub mod rpc;
pub mod sequencer;
pub mod session;
pub mod signaling;
pub mod typing;
pub mod unread;

pub use error::{CloseCode, ErrorBody, ErrorCode};
pub use frames::{
    ClientFrame, ResumeChannel, ResumeRefusal, ResumedChannel, ServerFrame, TypingState,
};
pub use model::*;
pub use presence::{
    PresenceChange, PresenceStatus, PresenceTimings, PresenceTracker, UserKey, UserRef,
};
pub use sequencer::{ChannelSequencer, SequencerOutput};
// The negotiation role is re-exported as `NegotiationRole`: `Role` is a channel member's role.
pub use signaling::{
    NegotiationError, NegotiationStats, PairNegotiation, Relay, Role as NegotiationRole, Side,
    Signal, SignalKind, SignalingState, impolite_side,
};
pub use typing::{TypingOutput, TypingThrottle};

/// The WebSocket subprotocol of API v1. Within v1, changes are additive only.
pub const WS_SUBPROTOCOL: &str = "parley.v1";

/// Prefix of the optional subprotocol entry that carries the access token
/// (`Sec-WebSocket-Protocol: parley.v1, parley.auth.<jwt>`), for clients that cannot send an
/// `auth` frame first. Tokens are never accepted in the query string.
pub const WS_AUTH_SUBPROTOCOL_PREFIX: &str = "parley.auth.";
