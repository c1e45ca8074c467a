//! The Bus: how committed channel events reach every node.
//!
//! One node uses [`InProcessBus`]; several nodes share a NATS server through [`NatsBus`]. The bus
//! promises delivery to every node that is subscribed, not order across publishers: each node
//! restores per-channel order with `parley_proto::ChannelSequencer` and fills gaps from storage.
//! When a node may have missed messages (a lagging in-process receiver, a NATS reconnect), the
//! subscription yields [`BusMessage::Resync`] so the node re-reads from storage.
//!
//! The bus never touches storage and never decides who may see what.

use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use futures::Stream;
use parley_proto::ChannelEvent;

mod in_process;
mod nats;
mod trace;

pub use in_process::InProcessBus;
pub use nats::NatsBus;
pub use trace::take_received_span;

/// What a node's bus subscription yields.
#[derive(Debug, Clone)]
pub enum BusMessage {
    /// A committed channel event, published by this node or another.
    Event(Arc<ChannelEvent>),
    /// Messages may have been lost; every channel with local subscribers must re-read from
    /// storage what came after its last delivered seq.
    Resync,
    /// An ephemeral event (typing, presence, read receipts): no seq, no order across
    /// publishers, may be dropped under pressure.
    Ephemeral(Arc<Ephemeral>),
}

/// An event that is not persisted: delivered to whoever is connected now, or to nobody.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Ephemeral {
    pub target: EphemeralTarget,
    /// Not delivered to this user's connections (typing goes to the *other* members).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_user: Option<String>,
    /// The frame to send, a JSON object with its `type`.
    pub frame: serde_json::Value,
}

/// Who receives an [`Ephemeral`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "to", rename_all = "snake_case")]
pub enum EphemeralTarget {
    /// The subscribed members of a channel.
    Channel { channel_id: String },
    /// Every connection of one user.
    User { tenant_id: String, user_id: String },
    /// The connection attached to one call participant.
    Participant {
        tenant_id: String,
        user_id: String,
        participant_id: String,
    },
}

/// The stream of a node's subscription. It ends only when the bus is shut down.
pub type BusSubscription = Pin<Box<dyn Stream<Item = BusMessage> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    #[error("bus message could not be encoded or decoded: {0}")]
    Codec(String),
}

/// Publishes committed events and subscribes a node to all of them.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// `in-process` or `nats`, for logs.
    fn kind(&self) -> &'static str;

    /// Whether the bus is connected now (for readiness). Always in process.
    fn check(&self) -> Result<(), BusError> {
        Ok(())
    }

    /// Publishes one committed event to every subscribed node, this one included. Called after
    /// the commit; a failure here is recovered by the receivers' gap filling.
    async fn publish(&self, event: &ChannelEvent) -> Result<(), BusError>;

    /// Publishes an ephemeral event to every subscribed node, this one included. Best effort.
    async fn publish_ephemeral(&self, event: &Ephemeral) -> Result<(), BusError>;

    /// Subscribes this node to every channel event and every ephemeral event.
    async fn subscribe(&self) -> Result<BusSubscription, BusError>;
}
