//! What this node receives from the bus: the topics its hubs and user registry hold.
//!
//! A channel is a topic while it has a hub (local subscribers, pending or confirmed); a user
//! while they have a connection here (or a call participant inside its reconnect grace). The
//! registries call [`NodeInterest::add`] when an entry appears and [`NodeInterest::remove`] when
//! it goes, under their own lock, so the bus sees the changes of one topic in the order they
//! happened. The registration of an add is kept with the entry, shared: whoever needs the topic
//! live (a subscribe about to read the channel's last seq, a connection about to be welcomed)
//! awaits it, whether it started the add or joined an entry that already existed.
//!
//! How the bus turns topics into NATS subscriptions is its own business (`parley_sync`'s
//! `nats.rs`): a user shares one subscription with the other users of its bucket, and a channel
//! has one of its own while its bucket holds few local channels, or shares its bucket's
//! wildcard subscription beyond that. Either way only the added topics' events reach the
//! dispatcher. While a bucket changes form, a persisted event may arrive twice: the hub's
//! sequencer drops a seq it has already delivered (`hub.rs`).

use std::sync::{Arc, OnceLock};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use parley_sync::{BusError, Interest, Topic};

/// The confirmation of a topic's registration on the bus, awaitable by many.
pub(crate) type Registered = Shared<BoxFuture<'static, Result<(), BusError>>>;

/// An already confirmed registration (one shared value: no allocation per topic, which matters
/// for the in-process bus, where every topic is registered at once).
pub(crate) fn registered_now() -> Registered {
    static READY: OnceLock<Registered> = OnceLock::new();
    READY
        .get_or_init(|| futures::future::ready(Ok(())).boxed().shared())
        .clone()
}

/// The node's handle on its bus interest; set once the dispatcher starts. Before that (and
/// without a bus) every topic counts as registered.
#[derive(Default)]
pub(crate) struct NodeInterest {
    handle: OnceLock<Arc<dyn Interest>>,
    /// Forgets a channel's membership answers when the channel stops being a topic.
    membership: Option<Arc<crate::membership::MembershipCache>>,
}

impl NodeInterest {
    pub fn new(membership: Arc<crate::membership::MembershipCache>) -> NodeInterest {
        NodeInterest {
            handle: OnceLock::new(),
            membership: Some(membership),
        }
    }

    pub fn set(&self, interest: Arc<dyn Interest>) {
        if self.handle.set(interest).is_err() {
            tracing::error!("the node's bus interest was set twice; keeping the first");
        }
    }

    /// Starts receiving `topic`.
    pub fn add(&self, topic: Topic) -> Registered {
        crate::metrics::interest_changed(&topic, 1.0);
        match self.handle.get() {
            Some(interest) => {
                let registration = interest.add(&topic);
                if registration.is_ready() {
                    registered_now()
                } else {
                    registration.boxed().shared()
                }
            }
            None => registered_now(),
        }
    }

    /// Stops receiving `topic`.
    pub fn remove(&self, topic: Topic) {
        crate::metrics::interest_changed(&topic, -1.0);
        if let (Topic::Channel(channel_id), Some(m)) = (&topic, &self.membership) {
            m.unwatch(channel_id);
        }
        if let Some(interest) = self.handle.get() {
            interest.remove(&topic);
        }
    }
}
