//! The bus of a single node: a broadcast channel inside the process.

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use parley_proto::ChannelEvent;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

use crate::{
    Bus, BusError, BusMessage, Ephemeral, Interest, NodeSubscription, Registration, Topic,
};

/// What travels on the broadcast channel.
#[derive(Debug, Clone)]
enum Item {
    Event(Arc<ChannelEvent>),
    Ephemeral(Arc<Ephemeral>),
}

/// In-process bus. A receiver that falls more than `capacity` events behind gets
/// [`BusMessage::Resync`] instead of the events it missed.
#[derive(Debug, Clone)]
pub struct InProcessBus {
    tx: broadcast::Sender<Item>,
}

impl InProcessBus {
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(16));
        InProcessBus { tx }
    }
}

impl Default for InProcessBus {
    fn default() -> Self {
        InProcessBus::new(65_536)
    }
}

#[async_trait]
impl Bus for InProcessBus {
    fn kind(&self) -> &'static str {
        "in-process"
    }

    async fn publish(&self, event: &ChannelEvent) -> Result<(), BusError> {
        // No receiver means no node is listening yet; nothing is lost that storage does not keep.
        let _ = self.tx.send(Item::Event(Arc::new(event.clone())));
        Ok(())
    }

    async fn publish_ephemeral(&self, event: &Ephemeral) -> Result<(), BusError> {
        let _ = self.tx.send(Item::Ephemeral(Arc::new(event.clone())));
        Ok(())
    }

    async fn subscribe(&self) -> Result<NodeSubscription, BusError> {
        let rx = self.tx.subscribe();
        let stream = BroadcastStream::new(rx)
            .map(|item| match item {
                Ok(Item::Event(ev)) => BusMessage::Event(ev),
                Ok(Item::Ephemeral(ev)) => BusMessage::Ephemeral(ev),
                Err(_lagged) => BusMessage::Resync,
            })
            .boxed();
        Ok(NodeSubscription {
            stream,
            interest: Arc::new(Everything),
        })
    }
}

/// The in-process bus has one node, which receives every event: nothing to register.
struct Everything;

impl Interest for Everything {
    fn add(&self, _topic: &Topic) -> Registration {
        Registration::ready()
    }

    fn remove(&self, _topic: &Topic) {}
}
