//! The bus of a cluster: committed channel events over core NATS subjects.
//!
//! This module owns [`NatsBus`]: the NATS connection of one node, the subject layout
//! (`parley.ev.<channel_id>`, one subject per channel, every node subscribed to `parley.ev.>`),
//! the JSON encoding of [`ChannelEvent`] on the wire, and the translation of connection trouble
//! into [`BusMessage::Resync`].
//!
//! Core NATS, not JetStream: storage is the durable log and the bus is only the fast path, so a
//! message lost on the way is acceptable as long as the receiver learns that it may have lost
//! one. That happens in two ways, and both make every live subscription yield one `Resync`:
//!
//! * the client reconnected after losing its connection (anything published meanwhile is gone);
//! * the client dropped messages because the subscription fell too far behind (a slow
//!   consumer); that resync comes once the backlog held by the client has been delivered.
//!   (A server that gives up on a slow client closes the connection: a reconnection.)
//!
//! Before yielding a `Resync` after a reconnection, and before [`Bus::subscribe`] returns, the
//! subscription does a round trip to the server, so the server has registered the
//! subscription by the time the node re-reads storage: nothing committed after that read can
//! slip through unseen.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::client::{PublishErrorKind, RequestErrorKind, Statistics};
use async_nats::connection::State;
use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event, ServerAddr, Subscriber};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use parley_proto::ChannelEvent;
use tokio::sync::watch;
use tokio::time::{Instant, timeout};

use crate::{Bus, BusError, BusMessage, BusSubscription, Ephemeral};

/// Every channel event goes to `parley.ev.<channel_id>`.
const SUBJECT_PREFIX: &str = "parley.ev.";
/// Ephemeral events share the subscription under a token no channel id can take (they start
/// with `ch_`), so one subscription carries both, in one order per publisher.
const EPHEMERAL_SUBJECT: &str = "parley.ev._eph";
/// What a node subscribes to: the events of every channel.
const SUBJECT_ALL: &str = "parley.ev.>";
/// A subject nobody subscribes to: a request on it comes back as "no responders" once the
/// server has processed everything this connection sent before it.
const BARRIER_SUBJECT: &str = "parley.barrier";
/// The name this client gives itself on the server (visible in `connz`).
const CONNECTION_NAME: &str = "parley";

/// How long [`NatsBus::connect`] keeps trying before giving up.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Handshake timeout of one connection attempt.
const CONNECT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after the first failed attempt of the initial connect; doubles up to the cap.
const CONNECT_RETRY_FIRST: Duration = Duration::from_millis(100);
const CONNECT_RETRY_CAP: Duration = Duration::from_secs(2);
/// Messages the client buffers per subscription before dropping them as a slow consumer.
const SUBSCRIPTION_CAPACITY: usize = 65_536;
/// The client pings the server this often; two unanswered pings count as a lost connection.
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// How long `publish` may wait for room in the client's outgoing queue while connected.
const PUBLISH_WAIT: Duration = Duration::from_secs(1);
/// Bound of one server round trip (see [`Inner::barrier`]).
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);

/// A bus shared by several nodes through a NATS server (core NATS, no persistence).
///
/// Cloning is cheap and shares the connection. The connection lives as long as a clone of the
/// bus or one of its subscriptions does; the client reconnects on its own, forever.
#[derive(Clone)]
pub struct NatsBus {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    /// The client's counters; `connects` counts the initial connection and every reconnection.
    stats: Arc<Statistics>,
    signals: Arc<Signals>,
    /// The server URL with any password hidden, for logs and errors.
    url: String,
}

/// What the connection's event callback tells the subscriptions.
struct Signals {
    /// Slow-consumer reports so far. async-nats does not expose the id of a subscription, so a
    /// report makes every subscription of the connection resync (a node has one).
    slow_consumers: AtomicU64,
    /// Touched on every event that may call for a resync, to wake idle subscriptions.
    wake: watch::Sender<()>,
}

impl Signals {
    fn on_event(&self, url: &str, event: Event) {
        match event {
            Event::Connected => {
                // The initial connection counts too; subscriptions compare `connects` with the
                // value they saw when they were made, so only reconnections trigger a resync.
                tracing::info!(url, "NATS bus connected");
                self.wake.send_replace(());
            }
            Event::Disconnected => {
                tracing::warn!(url, "NATS bus disconnected; reconnecting");
            }
            Event::SlowConsumer(sid) => {
                let n = self.slow_consumers.fetch_add(1, Ordering::Relaxed) + 1;
                // One report per dropped message: log the 1st, 2nd, 4th, 8th, ...
                if n.is_power_of_two() {
                    tracing::warn!(
                        url,
                        sid,
                        reports = n,
                        "NATS bus subscription is a slow consumer; messages were dropped"
                    );
                }
                self.wake.send_replace(());
            }
            Event::LameDuckMode => {
                tracing::warn!(url, "NATS server entered lame duck mode");
            }
            Event::Closed => tracing::info!(url, "NATS bus connection closed"),
            Event::Draining => tracing::info!(url, "NATS bus connection draining"),
            Event::ServerError(err) => tracing::warn!(url, error = %err, "NATS server error"),
            Event::ClientError(err) => tracing::warn!(url, error = %err, "NATS client error"),
        }
    }
}

impl fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBus")
            .field("url", &self.inner.url)
            .field("state", &self.inner.client.connection_state())
            .finish_non_exhaustive()
    }
}

impl NatsBus {
    /// Connects to the NATS server at `url` (`nats://host:port`; several servers may be given
    /// separated by commas). Keeps trying for about 10 seconds, then fails with
    /// [`BusError::Unavailable`]. An invalid URL or a rejected authentication fails at once.
    pub async fn connect(url: &str) -> Result<NatsBus, BusError> {
        let shown = redact_url(url);
        let addrs = url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| BusError::Unavailable(format!("invalid NATS URL {shown}: {err}")))?;
        if addrs.is_empty() {
            return Err(BusError::Unavailable("empty NATS URL".into()));
        }

        let signals = Arc::new(Signals {
            slow_consumers: AtomicU64::new(0),
            wake: watch::Sender::new(()),
        });

        let deadline = Instant::now() + CONNECT_DEADLINE;
        let mut pause = CONNECT_RETRY_FIRST;
        let mut attempts = 0u32;
        let client = loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let options = connect_options(&signals, &shown).connection_timeout(
                remaining.clamp(Duration::from_millis(1), CONNECT_ATTEMPT_TIMEOUT),
            );
            let error = match timeout(remaining, options.connect(addrs.clone())).await {
                Ok(Ok(client)) => break client,
                Ok(Err(err)) => match err.kind() {
                    ConnectErrorKind::ServerParse
                    | ConnectErrorKind::Authentication
                    | ConnectErrorKind::AuthorizationViolation
                    | ConnectErrorKind::Tls => {
                        return Err(BusError::Unavailable(format!(
                            "cannot connect to NATS at {shown}: {err}"
                        )));
                    }
                    _ => err.to_string(),
                },
                Err(_) => "timed out".to_string(),
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(BusError::Unavailable(format!(
                    "cannot connect to NATS at {shown} within {}s ({attempts} attempts): {error}",
                    CONNECT_DEADLINE.as_secs()
                )));
            }
            tracing::debug!(url = %shown, attempt = attempts, %error, "NATS connect failed; retrying");
            tokio::time::sleep(pause.min(remaining)).await;
            pause = (pause * 2).min(CONNECT_RETRY_CAP);
        };

        let stats = client.statistics();
        Ok(NatsBus {
            inner: Arc::new(Inner {
                client,
                stats,
                signals,
                url: shown,
            }),
        })
    }
}

impl NatsBus {
    /// The node's NATS connection, shared with the edge ↔ core RPC (`--role edge|core`).
    pub fn client(&self) -> Client {
        self.inner.client.clone()
    }
}

/// The options of every connection attempt. The event callback only bumps counters and wakes
/// subscriptions; it holds no client, so dropping the last bus and subscription closes the
/// connection.
fn connect_options(signals: &Arc<Signals>, url: &str) -> ConnectOptions {
    let signals = Arc::clone(signals);
    let url = url.to_owned();
    ConnectOptions::new()
        .name(CONNECTION_NAME)
        .ping_interval(PING_INTERVAL)
        .max_reconnects(None)
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .event_callback(move |event| {
            signals.on_event(&url, event);
            std::future::ready(())
        })
}

impl Inner {
    /// One round trip to the server: when it returns `Ok`, the server has processed everything
    /// this connection sent before (in particular its subscriptions, including those the client
    /// re-sends after a reconnection, which go out before any later command).
    async fn barrier(&self) -> Result<(), BusError> {
        match timeout(
            BARRIER_TIMEOUT,
            self.client.request(BARRIER_SUBJECT, Bytes::new()),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) if err.kind() == RequestErrorKind::NoResponders => Ok(()),
            Ok(Err(err)) => Err(BusError::Unavailable(format!(
                "NATS at {} did not answer: {err}",
                self.url
            ))),
            Err(_) => Err(BusError::Unavailable(format!(
                "NATS at {} did not answer within {}s",
                self.url,
                BARRIER_TIMEOUT.as_secs()
            ))),
        }
    }
}

#[async_trait]
impl Bus for NatsBus {
    fn kind(&self) -> &'static str {
        "nats"
    }

    fn check(&self) -> Result<(), BusError> {
        match self.inner.client.connection_state() {
            State::Connected => Ok(()),
            other => Err(BusError::Unavailable(format!(
                "not connected to NATS at {} ({other:?})",
                self.inner.url
            ))),
        }
    }

    async fn publish(&self, event: &ChannelEvent) -> Result<(), BusError> {
        let subject = subject_for(&event.channel_id)?;
        let payload = serde_json::to_vec(event)
            .map_err(|err| BusError::Codec(format!("encoding a channel event: {err}")))?;
        let client = &self.inner.client;
        // The client queues what it is given while it reconnects, and sends it once connected.
        // While disconnected, take only what fits in that queue right away: a caller must not
        // wait for the server to come back (receivers resync after the reconnection anyway).
        let wait = if client.connection_state() == State::Connected {
            PUBLISH_WAIT
        } else {
            Duration::ZERO
        };
        let sent = match crate::trace::current_headers() {
            Some(headers) => {
                timeout(
                    wait,
                    client.publish_with_headers(subject, headers, Bytes::from(payload)),
                )
                .await
            }
            None => timeout(wait, client.publish(subject, Bytes::from(payload))).await,
        };
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(match err.kind() {
                PublishErrorKind::MaxPayloadExceeded | PublishErrorKind::InvalidSubject => {
                    BusError::Codec(format!("publishing to NATS: {err}"))
                }
                PublishErrorKind::Send => BusError::Unavailable(format!(
                    "publishing to NATS at {}: {err}",
                    self.inner.url
                )),
            }),
            Err(_) => Err(BusError::Unavailable(format!(
                "NATS at {} is not taking messages ({:?}); outgoing queue full",
                self.inner.url,
                client.connection_state()
            ))),
        }
    }

    async fn publish_ephemeral(&self, event: &Ephemeral) -> Result<(), BusError> {
        let payload = serde_json::to_vec(event)
            .map_err(|err| BusError::Codec(format!("encoding an ephemeral event: {err}")))?;
        // Best effort: never wait while disconnected, at most a moment while connected.
        let wait = if self.inner.client.connection_state() == State::Connected {
            PUBLISH_WAIT
        } else {
            Duration::ZERO
        };
        match timeout(
            wait,
            self.inner
                .client
                .publish(EPHEMERAL_SUBJECT, Bytes::from(payload)),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(BusError::Unavailable(format!("publishing to NATS: {err}"))),
            Err(_) => Err(BusError::Unavailable("NATS outgoing queue full".into())),
        }
    }

    async fn subscribe(&self) -> Result<BusSubscription, BusError> {
        let inner = Arc::clone(&self.inner);
        // Taken before subscribing: a reconnection in between costs a spurious resync, never a
        // missed one.
        let seen_connects = inner.stats.connects.load(Ordering::Acquire);
        let seen_slow = inner.signals.slow_consumers.load(Ordering::Acquire);
        let wake = inner.signals.wake.subscribe();
        let subscriber = inner.client.subscribe(SUBJECT_ALL).await.map_err(|err| {
            BusError::Unavailable(format!("subscribing on NATS at {}: {err}", inner.url))
        })?;
        if let Err(err) = inner.barrier().await {
            // The subscription stays registered in the client, which re-sends it when it gets
            // the connection back; that reconnection then makes the stream yield a resync.
            tracing::warn!(error = %err, "NATS subscription not confirmed by the server");
        }
        let state = SubscriptionState {
            inner,
            subscriber,
            wake,
            wake_open: true,
            seen_connects,
            seen_slow,
            slow_backlog: None,
        };
        Ok(futures::stream::unfold(state, |mut state| async move {
            let item = state.next_message().await?;
            Some((item, state))
        })
        .boxed())
    }
}

/// One subscription: the NATS subscriber plus what it needs to notice a resync.
struct SubscriptionState {
    /// Keeps the connection alive and gives the client for barriers.
    inner: Arc<Inner>,
    subscriber: Subscriber,
    wake: watch::Receiver<()>,
    /// False once the wake sender is gone (cannot happen while `inner` lives; kept defensive so
    /// a closed channel never spins the loop).
    wake_open: bool,
    seen_connects: u64,
    seen_slow: u64,
    /// Set when messages were dropped for a slow consumer: the resync waits until the backlog
    /// the subscriber holds is delivered (so the node re-reads only what is really missing, and
    /// a burst of drops makes one resync), counting the messages delivered meanwhile.
    slow_backlog: Option<usize>,
}

impl SubscriptionState {
    /// The next item of the stream; `None` once the connection is closed for good.
    async fn next_message(&mut self) -> Option<BusMessage> {
        loop {
            // Checked on every turn, not only on wake-ups: should the client ever drop an event
            // (its event queue is bounded), the next message still reveals the reconnection.
            let connects = self.inner.stats.connects.load(Ordering::Acquire);
            if connects != self.seen_connects {
                self.seen_connects = connects;
                // This resync also covers any drop reported so far.
                self.seen_slow = self.inner.signals.slow_consumers.load(Ordering::Acquire);
                self.slow_backlog = None;
                if let Err(err) = self.inner.barrier().await {
                    // Most likely disconnected again: the next reconnection brings another
                    // resync. Resync now anyway, it costs only a storage read.
                    tracing::warn!(error = %err, "NATS resubscription not confirmed");
                }
                tracing::info!(url = %self.inner.url, "NATS bus reconnected; resync");
                return Some(BusMessage::Resync);
            }

            let slow = self.inner.signals.slow_consumers.load(Ordering::Acquire);
            if slow != self.seen_slow {
                self.seen_slow = slow;
                self.slow_backlog.get_or_insert(0);
            }
            if let Some(delivered) = self.slow_backlog {
                // Under a sustained overload the backlog never empties: resync after at most
                // one buffer's worth, which is all that was queued when the drop happened.
                let ready = if delivered < SUBSCRIPTION_CAPACITY {
                    self.subscriber.next().now_or_never()
                } else {
                    None
                };
                match ready {
                    Some(None) => return None,
                    Some(Some(message)) => {
                        self.slow_backlog = Some(delivered + 1);
                        if let Some(item) = decode_message(&message.subject, &message.payload) {
                            traced(&item, message.headers.as_ref());
                            return Some(item);
                        }
                        continue;
                    }
                    None => {
                        self.slow_backlog = None;
                        tracing::warn!(url = %self.inner.url, "NATS bus dropped messages; resync");
                        return Some(BusMessage::Resync);
                    }
                }
            }

            tokio::select! {
                biased;
                changed = self.wake.changed(), if self.wake_open => {
                    if changed.is_err() {
                        self.wake_open = false;
                    }
                }
                message = self.subscriber.next() => {
                    let message = message?;
                    if let Some(item) = decode_message(&message.subject, &message.payload) {
                        traced(&item, message.headers.as_ref());
                        return Some(item);
                    }
                }
            }
        }
    }
}

/// The subject of a channel's events. A channel id must be one subject token: not empty, no
/// `.`, `*`, `>`, whitespace or control characters.
fn subject_for(channel_id: &str) -> Result<String, BusError> {
    let bad = channel_id.is_empty()
        || channel_id
            .chars()
            .any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control());
    if bad {
        return Err(BusError::Codec(format!(
            "channel id {channel_id:?} is not a valid NATS subject token"
        )));
    }
    Ok(format!("{SUBJECT_PREFIX}{channel_id}"))
}

/// Leaves the trace context of a received event for the dispatcher (see `trace.rs`).
fn traced(item: &BusMessage, headers: Option<&async_nats::HeaderMap>) {
    if let BusMessage::Event(ev) = item {
        crate::trace::received(headers, ev);
    }
}

/// Decodes a message received on `parley.ev.>` into what the subscription yields.
fn decode_message(subject: &str, payload: &[u8]) -> Option<BusMessage> {
    if subject == EPHEMERAL_SUBJECT {
        return match serde_json::from_slice::<Ephemeral>(payload) {
            Ok(e) => Some(BusMessage::Ephemeral(Arc::new(e))),
            Err(err) => {
                tracing::warn!(subject, error = %err, "dropping an undecodable ephemeral bus message");
                None
            }
        };
    }
    decode(subject, payload).map(|event| BusMessage::Event(Arc::new(event)))
}

/// Decodes a message received on `parley.ev.>`. Anything else than a channel event of the
/// channel its subject names is logged and dropped: it comes from the network.
fn decode(subject: &str, payload: &[u8]) -> Option<ChannelEvent> {
    let event = match serde_json::from_slice::<ChannelEvent>(payload) {
        Ok(event) => event,
        Err(err) => {
            tracing::warn!(
                subject,
                len = payload.len(),
                error = %err,
                "dropping an undecodable NATS bus message"
            );
            return None;
        }
    };
    if subject.strip_prefix(SUBJECT_PREFIX) != Some(event.channel_id.as_str()) {
        tracing::warn!(
            subject,
            channel_id = %event.channel_id,
            "dropping a NATS bus message published on another channel's subject"
        );
        return None;
    }
    Some(event)
}

/// `url` with the password (or token) of any `user:password@` part replaced by `***`.
fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let one = one.trim();
            let (scheme, rest) = match one.split_once("://") {
                Some((scheme, rest)) => (Some(scheme), rest),
                None => (None, one),
            };
            let rest = match rest.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _password)) => format!("{user}:***@{host}"),
                    None => format!("***@{host}"),
                },
                None => rest.to_owned(),
            };
            match scheme {
                Some(scheme) => format!("{scheme}://{rest}"),
                None => rest,
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use parley_proto::EventBody;

    use super::*;

    fn event(channel_id: &str) -> ChannelEvent {
        ChannelEvent {
            channel_id: channel_id.into(),
            seq: 7,
            body: EventBody::MemberRemoved {
                user_id: "usr_1".into(),
                by: "usr_2".into(),
            },
        }
    }

    #[test]
    fn subjects_are_one_token_per_channel() {
        assert_eq!(
            subject_for("ch_01JABCDEF").unwrap(),
            "parley.ev.ch_01JABCDEF"
        );
        for bad in [
            "", "a.b", "a*", ">", "a b", "a\tb", "a\nb", "a\u{0}b", "a\u{a0}b",
        ] {
            assert!(
                matches!(subject_for(bad), Err(BusError::Codec(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn decode_accepts_events_on_their_own_subject_only() {
        let ev = event("ch_1");
        let payload = serde_json::to_vec(&ev).unwrap();
        assert_eq!(decode("parley.ev.ch_1", &payload), Some(ev));
        assert_eq!(decode("parley.ev.ch_2", &payload), None);
        assert_eq!(decode("parley.ev.ch_1.x", &payload), None);
        assert_eq!(decode("parley.ev.ch_1", b"not json"), None);
        assert_eq!(decode("parley.ev.ch_1", b"{\"channel_id\":\"ch_1\"}"), None);
        assert_eq!(decode("parley.ev.ch_1", &[0xff, 0xfe]), None);
    }

    #[test]
    fn urls_are_shown_without_passwords() {
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(
            redact_url("nats://me:secret@h:4222, tls://tok@h2"),
            "nats://me:***@h:4222,tls://***@h2"
        );
        assert_eq!(redact_url("me:pw@h"), "me:***@h");
    }
}
