//! The Bus: how committed channel events reach the nodes that need them.
//!
//! One node uses [`InProcessBus`]; several nodes share a NATS server through [`NatsBus`]. The bus
//! promises delivery to every node that is interested, not order across publishers: each node
//! restores per-channel order with `parley_proto::ChannelSequencer` and fills gaps from storage.
//! When a node may have missed messages (a lagging in-process receiver, a NATS reconnect), the
//! subscription yields [`BusMessage::Resync`] so the node re-reads from storage.
//!
//! **Interest.** A node receives only the [`Topic`]s it asked for through its subscription's
//! [`Interest`] handle: a channel while it has local subscribers (the channel's persisted events
//! and its ephemerals: typing, presence, receipts), a user while that user has local connections
//! (user-targeted events: `channel.added`, unread counts, call signals). An added topic is
//! *registered* once [`Interest::add`]'s [`Registration`] resolves: every event published after
//! that reaches the subscription, so a node that adds a channel's interest, waits, and only then
//! reads the channel's last seq from storage misses nothing between that read and the live
//! stream. The in-process bus delivers everything to its one node; its interest is a no-op.
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
pub use nats::{
    CHANNEL_BUCKETS, DEFAULT_CHANNEL_EXACT_MAX, NatsBus, NatsOptions, USER_BUCKETS, channel_bucket,
    user_bucket,
};
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

/// What a node can be interested in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// A channel's persisted events and its ephemerals ([`EphemeralTarget::Channel`]).
    Channel(String),
    /// Events targeted at one user's connections or call participants
    /// ([`EphemeralTarget::User`], [`EphemeralTarget::Participant`]).
    User { tenant_id: String, user_id: String },
}

/// A node's subscription: the stream of what it receives, and the handle that says what that is.
pub struct NodeSubscription {
    pub stream: BusSubscription,
    pub interest: Arc<dyn Interest>,
}

/// What a node receives. Both calls are cheap and never block. Adds and removes are counted:
/// a topic is received while it has had more adds than removes, so every add must be matched
/// by exactly one remove (the node's registries add a topic when its entry appears and remove
/// it when the entry goes). Over NATS several topics may share one subscription (all users of
/// one bucket; the channels of one bucket when the node has many there), which lives while any
/// of them is held; the stream yields only the held channels' events (`nats.rs`, "Subjects").
pub trait Interest: Send + Sync + 'static {
    /// Starts receiving `topic`. The registration resolves once every event published from
    /// then on is sure to reach the subscription, or with an error when the bus could not
    /// confirm it (the topic stays added; a reconnection brings a [`BusMessage::Resync`]).
    /// Calls take effect in the order they are made, across `add` and `remove`.
    fn add(&self, topic: &Topic) -> Registration;

    /// Stops receiving `topic`. Events already on their way may still arrive.
    fn remove(&self, topic: &Topic);
}

/// The pending confirmation of an [`Interest::add`].
pub struct Registration(Option<tokio::sync::oneshot::Receiver<Result<(), BusError>>>);

impl Registration {
    /// Already registered (the in-process bus).
    pub fn ready() -> Registration {
        Registration(None)
    }

    /// Whether it is registered already (nothing to wait for).
    pub fn is_ready(&self) -> bool {
        self.0.is_none()
    }

    /// Resolved by whoever sends on the other end; a dropped sender counts as a failure.
    pub fn waiting(rx: tokio::sync::oneshot::Receiver<Result<(), BusError>>) -> Registration {
        Registration(Some(rx))
    }
}

impl std::future::Future for Registration {
    type Output = Result<(), BusError>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.0.as_mut() {
            None => std::task::Poll::Ready(Ok(())),
            Some(rx) => Pin::new(rx).poll(cx).map(|r| {
                r.unwrap_or_else(|_| Err(BusError::Unavailable("the bus shut down".into())))
            }),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    #[error("bus message could not be encoded or decoded: {0}")]
    Codec(String),
}

/// Publishes committed events and subscribes a node to the ones it is interested in.
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

    /// Opens this node's subscription. Over NATS it receives nothing until topics are added
    /// through its [`Interest`]; in process it receives everything.
    async fn subscribe(&self) -> Result<NodeSubscription, BusError>;
}
