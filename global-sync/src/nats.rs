//! The bus of a cluster: committed channel events over core NATS subjects.
//!
//! This module owns [`NatsBus`]: the NATS connection of one node, the subject layout, the
//! node's interest (which subjects it subscribes to), the JSON encoding of [`ChannelEvent`] and
//! [`Ephemeral`] on the wire, and the translation of connection trouble into
//! [`BusMessage::Resync`].
//!
//! # Subjects
//!
//! | subject | carries | published by |
//! |---|---|---|
//! | `parley.ch.<channel_id>.ev` | the channel's persisted events ([`ChannelEvent`]) | cores only |
//! | `parley.ch.<channel_id>.eph` | the channel's ephemerals (typing, presence, receipts, call notices) | cores and edges |
//! | `parley.user.<tenant>.<bucket>.<user>` | ephemerals for one user's connections or call participants | cores and edges |
//! | `parley.barrier` | nobody subscribes: a request there is a round trip to the server | every node |
//!
//! A node subscribes to `parley.ch.<channel_id>.*` (one subscription per channel, both kinds)
//! while the channel has local subscribers (see [`crate::Interest`]). Users are not one
//! subscription each: every user falls in one of [`USER_BUCKETS`] buckets ([`user_bucket`], a
//! fixed hash of tenant and user, the same on every node), and a node holds one subscription,
//! `parley.user.*.<bucket>.*`, per bucket in which it has at least one user with local
//! connections; it drops it when the bucket's last local user goes. The node receives the
//! events of the other users of its buckets too and drops them (the edge's user registry has no
//! connection for them). This keeps the client's memory per connected user near zero: each
//! subscription of async-nats holds a queue whose first block takes about 5.4 KB. Channel ids
//! are one subject token already
//! (generated `ch_` ids; anything else is refused); tenant and user ids may hold `.`, so their
//! tokens escape every byte outside `A-Z a-z 0-9 _ - : @ |` as `%XX`. Channel ids are unique
//! across tenants, so channel subjects need no tenant. The split between `.ev` and `.eph` is what
//! the NATS permissions act on: only the core's credentials may publish `parley.ch.*.ev`
//! (`scripts/services.sh` shows the permissions, `docs/operations.md` explains them).
//!
//! # Exactness
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
//! Interest changes go, in the order they are made, through one task that sends the `SUB`s and
//! `UNSUB`s and then does one round trip to the server for the whole batch ([`Inner::barrier`]);
//! only then does each [`crate::Registration`] resolve. So the server has registered a topic by
//! the time the node reads storage for it, and nothing committed after that read can slip
//! through unseen. Before yielding a `Resync` after a reconnection the subscription does the same
//! round trip (the client re-sends every subscription first).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::client::{PublishErrorKind, RequestErrorKind, Statistics};
use async_nats::connection::State;
use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event, ServerAddr, Subscriber};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{AbortHandle, Abortable, SelectAll};
use futures::{FutureExt, StreamExt};
use parley_proto::ChannelEvent;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, timeout};

use crate::{
    Bus, BusError, BusMessage, Ephemeral, EphemeralTarget, Interest, NodeSubscription,
    Registration, Topic,
};

/// How a node authenticates to NATS and checks the server's certificate. Credentials in the
/// URL (`nats://user:password@host`) work too; these take precedence.
#[derive(Clone, Default)]
pub struct NatsOptions {
    /// User name, with `password`.
    pub user: Option<String>,
    pub password: Option<String>,
    /// A token (instead of user and password).
    pub token: Option<String>,
    /// An NKey seed (`SU...`): the server knows the user by its public key and checks a
    /// signature of its nonce; no secret crosses the network.
    pub nkey_seed: Option<String>,
    /// PEM file of the CA that signed the server's certificate; setting it requires TLS.
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate and key (PEM), for servers that verify clients.
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    /// Refuse a server that does not offer TLS.
    pub require_tls: bool,
}

impl fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsOptions")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("nkey_seed", &self.nkey_seed.as_ref().map(|_| "***"))
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("require_tls", &self.require_tls)
            .finish()
    }
}

/// Channel subjects: `parley.ch.<channel_id>.ev` and `.eph`.
const CHANNEL_PREFIX: &str = "parley.ch.";
const PERSISTED_SUFFIX: &str = ".ev";
const EPHEMERAL_SUFFIX: &str = ".eph";
/// User subjects: `parley.user.<tenant>.<bucket>.<user>`.
const USER_PREFIX: &str = "parley.user.";
/// How many buckets user subjects are spread over. Part of the subject layout: every node of a
/// cluster must use the same value (and the same [`user_bucket`]), or user-targeted events
/// published by one node miss the subscriptions of another.
pub const USER_BUCKETS: u16 = 256;
/// A subject nobody subscribes to: a request on it comes back as "no responders" once the
/// server has processed everything this connection sent before it.
const BARRIER_SUBJECT: &str = "parley.barrier";
/// Most interest changes sent before one barrier confirms them.
const INTEREST_BATCH: usize = 4096;
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
        NatsBus::connect_with(url, &NatsOptions::default()).await
    }

    /// [`NatsBus::connect`] with credentials and TLS settings.
    pub async fn connect_with(url: &str, auth: &NatsOptions) -> Result<NatsBus, BusError> {
        let shown = redact_url(url);
        if auth.password.is_some() != auth.user.is_some() {
            return Err(BusError::Unavailable(
                "a NATS user needs a password, and a password a user".into(),
            ));
        }
        if auth.tls_cert.is_some() != auth.tls_key.is_some() {
            return Err(BusError::Unavailable(
                "a NATS client certificate needs its key, and a key its certificate".into(),
            ));
        }
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
        // The client does not read credentials from the URL itself: `user:password@` (or a
        // lone `token@`) of the first server is used unless the options give some.
        let mut auth = auth.clone();
        if auth.user.is_none()
            && auth.token.is_none()
            && let Some(user) = addrs[0].username()
        {
            let user = percent_decode(user);
            match addrs[0].password() {
                Some(password) => {
                    auth.user = Some(user);
                    auth.password = Some(percent_decode(password));
                }
                None => auth.token = Some(user),
            }
        }
        let auth = &auth;
        // Without its user info: the client would otherwise show the password in debug logs.
        let addrs = addrs
            .into_iter()
            .map(|addr| {
                let mut url = url_without_user_info(addr.as_url_str());
                if url.is_empty() {
                    url = addr.as_url_str().to_owned();
                }
                url.parse::<ServerAddr>().unwrap_or(addr)
            })
            .collect::<Vec<_>>();

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
            let options = connect_options(&signals, &shown, auth).connection_timeout(
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
                // A server that refuses the client's certificate (or its lack of one) closes
                // the connection after the handshake, which the client sees as a timeout.
                let hint = if auth.tls_ca.is_some() {
                    "; with TLS, check that --nats-tls-ca signed the server's certificate and, \
                     if the server verifies clients, that --nats-tls-cert/--nats-tls-key hold a \
                     certificate it accepts"
                } else {
                    ""
                };
                return Err(BusError::Unavailable(format!(
                    "cannot connect to NATS at {shown} within {}s ({attempts} attempts): {error}{hint}",
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
fn connect_options(signals: &Arc<Signals>, url: &str, auth: &NatsOptions) -> ConnectOptions {
    let signals = Arc::clone(signals);
    let url = url.to_owned();
    let mut options = ConnectOptions::new();
    if let (Some(user), Some(password)) = (&auth.user, &auth.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &auth.token {
        options = options.token(token.clone());
    }
    if let Some(seed) = &auth.nkey_seed {
        options = options.nkey(seed.clone());
    }
    if let Some(ca) = &auth.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&auth.tls_cert, &auth.tls_key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if auth.require_tls {
        options = options.require_tls(true);
    }
    options
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
        let subject = persisted_subject(&event.channel_id)?;
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
        let subject = ephemeral_subject(&event.target)?;
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
            self.inner.client.publish(subject, Bytes::from(payload)),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(BusError::Unavailable(format!("publishing to NATS: {err}"))),
            Err(_) => Err(BusError::Unavailable("NATS outgoing queue full".into())),
        }
    }

    async fn subscribe(&self) -> Result<NodeSubscription, BusError> {
        let inner = Arc::clone(&self.inner);
        // Taken before subscribing: a reconnection in between costs a spurious resync, never a
        // missed one.
        let seen_connects = inner.stats.connects.load(Ordering::Acquire);
        let seen_slow = inner.signals.slow_consumers.load(Ordering::Acquire);
        let wake = inner.signals.wake.subscribe();
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (streams_tx, streams_rx) = mpsc::unbounded_channel();
        tokio::spawn(interest_worker(Arc::clone(&inner), commands_rx, streams_tx));
        let state = SubscriptionState {
            inner,
            subs: SelectAll::new(),
            new_subs: streams_rx,
            new_subs_open: true,
            wake,
            wake_open: true,
            seen_connects,
            seen_slow,
            slow_backlog: None,
        };
        let stream = futures::stream::unfold(state, |mut state| async move {
            let item = state.next_message().await?;
            Some((item, state))
        })
        .boxed();
        Ok(NodeSubscription {
            stream,
            interest: Arc::new(NatsInterest { commands }),
        })
    }
}

/// A change of interest, in the order the node made it.
enum Command {
    Add(Topic, oneshot::Sender<Result<(), BusError>>),
    Remove(Topic),
}

/// The node's [`Interest`] over NATS: commands for [`interest_worker`].
struct NatsInterest {
    commands: mpsc::UnboundedSender<Command>,
}

impl Interest for NatsInterest {
    fn add(&self, topic: &Topic) -> Registration {
        let (tx, rx) = oneshot::channel();
        // A closed worker drops the sender: the registration then fails.
        let _ = self.commands.send(Command::Add(topic.clone(), tx));
        Registration::waiting(rx)
    }

    fn remove(&self, topic: &Topic) {
        let _ = self.commands.send(Command::Remove(topic.clone()));
    }
}

/// A topic's NATS subscription, as the subscription stream polls it.
type TopicStream = Abortable<Subscriber>;

/// One NATS subscription of the node and the topics that hold it.
struct Held {
    /// Adds not yet matched by a remove (users of a bucket, or 1 for a channel's hub).
    holders: usize,
    /// `None` while the client refused the `SUB` (it was closed); the next add tries again.
    handle: Option<AbortHandle>,
}

/// Applies interest changes in order: a `SUB` for each subscription a topic needs and the node
/// does not hold yet (its subscriber handed to the stream), an `UNSUB` for each one whose last
/// topic went (its subscriber aborted: the stream drops it, which unsubscribes), then one
/// barrier for the batch, after which its registrations resolve. Ends when the node's
/// [`Interest`] handle is dropped.
async fn interest_worker(
    inner: Arc<Inner>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    streams: mpsc::UnboundedSender<TopicStream>,
) {
    let mut held: std::collections::HashMap<SubKey, Held> = Default::default();
    let mut batch = Vec::new();
    while commands.recv_many(&mut batch, INTEREST_BATCH).await > 0 {
        let mut waiting = Vec::new();
        for command in batch.drain(..) {
            match command {
                Command::Add(topic, done) => {
                    let key = SubKey::of(&topic);
                    let subject = match key.subject() {
                        Ok(subject) => subject,
                        Err(err) => {
                            let _ = done.send(Err(err));
                            continue;
                        }
                    };
                    let kind = key.kind();
                    let entry = held.entry(key).or_insert_with(|| {
                        metrics::gauge!("parley_bus_subscriptions", "kind" => kind).increment(1.0);
                        Held {
                            holders: 0,
                            handle: None,
                        }
                    });
                    entry.holders += 1;
                    if entry.handle.is_none() {
                        match inner.client.subscribe(subject).await {
                            Ok(subscriber) => {
                                let (handle, registration) = AbortHandle::new_pair();
                                entry.handle = Some(handle);
                                let _ = streams.send(Abortable::new(subscriber, registration));
                            }
                            Err(err) => {
                                let _ = done.send(Err(BusError::Unavailable(format!(
                                    "subscribing on NATS at {}: {err}",
                                    inner.url
                                ))));
                                continue;
                            }
                        }
                    }
                    waiting.push(done);
                }
                Command::Remove(topic) => {
                    let key = SubKey::of(&topic);
                    if let std::collections::hash_map::Entry::Occupied(mut entry) = held.entry(key)
                    {
                        entry.get_mut().holders -= 1;
                        if entry.get().holders == 0 {
                            let kind = entry.key().kind();
                            metrics::gauge!("parley_bus_subscriptions", "kind" => kind)
                                .decrement(1.0);
                            if let Some(handle) = entry.remove().handle {
                                handle.abort();
                            }
                        }
                    }
                }
            }
        }
        if !waiting.is_empty() {
            let confirmed = inner.barrier().await;
            if let Err(err) = &confirmed {
                // The subscriptions stay registered in the client, which re-sends them when it
                // gets the connection back; that reconnection then makes the stream resync.
                tracing::warn!(error = %err, "NATS subscriptions not confirmed by the server");
            }
            for done in waiting {
                let _ = done.send(confirmed.clone());
            }
        }
    }
    // The node's interest is gone: so are its subscriptions.
    for (key, _) in held.drain() {
        metrics::gauge!("parley_bus_subscriptions", "kind" => key.kind()).decrement(1.0);
    }
}

/// The node's subscription: every topic's subscriber, plus what it needs to notice a resync.
struct SubscriptionState {
    /// Keeps the connection alive and gives the client for barriers.
    inner: Arc<Inner>,
    subs: SelectAll<TopicStream>,
    /// Subscribers of newly added topics, from [`interest_worker`].
    new_subs: mpsc::UnboundedReceiver<TopicStream>,
    new_subs_open: bool,
    wake: watch::Receiver<()>,
    /// False once the wake sender is gone (cannot happen while `inner` lives; kept defensive so
    /// a closed channel never spins the loop).
    wake_open: bool,
    seen_connects: u64,
    seen_slow: u64,
    /// Set when messages were dropped for a slow consumer: the resync waits until the backlog
    /// the subscribers hold is delivered (so the node re-reads only what is really missing, and
    /// a burst of drops makes one resync), counting the messages delivered meanwhile.
    slow_backlog: Option<usize>,
}

impl SubscriptionState {
    /// The next item of the stream; `None` once the node's interest handle is gone and every
    /// subscriber has ended.
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

            // Take in the subscribers of new topics first: their messages wait in them.
            while let Ok(sub) = self.new_subs.try_recv() {
                self.subs.push(sub);
            }

            let slow = self.inner.signals.slow_consumers.load(Ordering::Acquire);
            if slow != self.seen_slow {
                self.seen_slow = slow;
                self.slow_backlog.get_or_insert(0);
            }
            if let Some(delivered) = self.slow_backlog {
                // Under a sustained overload the backlog never empties: resync after at most
                // one buffer's worth, which is all that was queued when the drop happened.
                let ready = if delivered < SUBSCRIPTION_CAPACITY && !self.subs.is_empty() {
                    self.subs.next().now_or_never().flatten()
                } else {
                    None
                };
                match ready {
                    Some(message) => {
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

            if !self.new_subs_open && self.subs.is_empty() {
                return None;
            }
            tokio::select! {
                biased;
                changed = self.wake.changed(), if self.wake_open => {
                    if changed.is_err() {
                        self.wake_open = false;
                    }
                }
                sub = self.new_subs.recv(), if self.new_subs_open => match sub {
                    Some(sub) => self.subs.push(sub),
                    None => self.new_subs_open = false,
                },
                message = self.subs.next(), if !self.subs.is_empty() => {
                    // `None`: the last subscriber ended (its topic was removed).
                    if let Some(message) = message
                        && let Some(item) = decode_message(&message.subject, &message.payload)
                    {
                        traced(&item, message.headers.as_ref());
                        return Some(item);
                    }
                }
            }
        }
    }
}

/// Whether `id` can be one subject token as it is: not empty, no `.`, `*`, `>`, whitespace or
/// control characters.
fn is_token(id: &str) -> bool {
    !id.is_empty()
        && !id
            .chars()
            .any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control())
}

fn channel_token(channel_id: &str) -> Result<&str, BusError> {
    if is_token(channel_id) {
        Ok(channel_id)
    } else {
        Err(BusError::Codec(format!(
            "channel id {channel_id:?} is not a valid NATS subject token"
        )))
    }
}

/// A tenant or user id as one subject token: bytes outside `A-Z a-z 0-9 _ - : @ |` become
/// `%XX`, so distinct ids give distinct tokens.
fn escaped_token(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'@' | b'|') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push('%');
    }
    out
}

/// The subject of a channel's persisted events.
fn persisted_subject(channel_id: &str) -> Result<String, BusError> {
    Ok(format!(
        "{CHANNEL_PREFIX}{}{PERSISTED_SUFFIX}",
        channel_token(channel_id)?
    ))
}

/// The bucket of a user's subject: FNV-1a (64 bit) over the tenant id's length (8 bytes, little
/// endian), the tenant id and the user id, mixed by the finalizer of SplitMix64, modulo
/// [`USER_BUCKETS`]. Stable across nodes, builds and versions (it is part of the wire layout).
pub fn user_bucket(tenant_id: &str, user_id: &str) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let len = (tenant_id.len() as u64).to_le_bytes();
    for &b in len
        .iter()
        .chain(tenant_id.as_bytes())
        .chain(user_id.as_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h % u64::from(USER_BUCKETS)) as u16
}

fn user_subject(tenant_id: &str, user_id: &str) -> String {
    format!(
        "{USER_PREFIX}{}.{}.{}",
        escaped_token(tenant_id),
        user_bucket(tenant_id, user_id),
        escaped_token(user_id)
    )
}

/// The subscription of one bucket of user subjects, for every tenant.
fn user_bucket_subject(bucket: u16) -> String {
    format!("{USER_PREFIX}*.{bucket}.*")
}

/// The subject of an ephemeral event, from its target.
fn ephemeral_subject(target: &EphemeralTarget) -> Result<String, BusError> {
    Ok(match target {
        EphemeralTarget::Channel { channel_id } => format!(
            "{CHANNEL_PREFIX}{}{EPHEMERAL_SUFFIX}",
            channel_token(channel_id)?
        ),
        EphemeralTarget::User { tenant_id, user_id }
        | EphemeralTarget::Participant {
            tenant_id, user_id, ..
        } => user_subject(tenant_id, user_id),
    })
}

/// What a node subscribes to for a topic: one subscription per channel, one per bucket of users.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SubKey {
    Channel(String),
    UserBucket(u16),
}

impl SubKey {
    fn of(topic: &Topic) -> SubKey {
        match topic {
            Topic::Channel(channel_id) => SubKey::Channel(channel_id.clone()),
            Topic::User { tenant_id, user_id } => {
                SubKey::UserBucket(user_bucket(tenant_id, user_id))
            }
        }
    }

    fn subject(&self) -> Result<String, BusError> {
        Ok(match self {
            SubKey::Channel(channel_id) => {
                format!("{CHANNEL_PREFIX}{}.*", channel_token(channel_id)?)
            }
            SubKey::UserBucket(bucket) => user_bucket_subject(*bucket),
        })
    }

    fn kind(&self) -> &'static str {
        match self {
            SubKey::Channel(_) => "channel",
            SubKey::UserBucket(_) => "user_bucket",
        }
    }
}

/// What a node subscribes to for a topic.
#[cfg(test)]
fn interest_subject(topic: &Topic) -> Result<String, BusError> {
    SubKey::of(topic).subject()
}

/// Leaves the trace context of a received event for the dispatcher (see `trace.rs`).
fn traced(item: &BusMessage, headers: Option<&async_nats::HeaderMap>) {
    if let BusMessage::Event(ev) = item {
        crate::trace::received(headers, ev);
    }
}

/// Decodes a message received on a node's subjects into what the subscription yields.
/// Anything that is not what its subject says is logged and dropped: it comes from the network.
fn decode_message(subject: &str, payload: &[u8]) -> Option<BusMessage> {
    if let Some(rest) = subject.strip_prefix(CHANNEL_PREFIX) {
        if let Some(channel) = rest.strip_suffix(PERSISTED_SUFFIX) {
            return decode(channel, subject, payload)
                .map(|event| BusMessage::Event(Arc::new(event)));
        }
        if let Some(channel) = rest.strip_suffix(EPHEMERAL_SUFFIX) {
            return decode_ephemeral(subject, payload)
                .filter(|e| {
                    matches!(&e.target, EphemeralTarget::Channel { channel_id } if channel_id == channel)
                })
                .map(|e| BusMessage::Ephemeral(Arc::new(e)));
        }
    } else if subject.starts_with(USER_PREFIX) {
        return decode_ephemeral(subject, payload)
            .filter(|e| ephemeral_subject(&e.target).is_ok_and(|s| s == subject))
            .map(|e| BusMessage::Ephemeral(Arc::new(e)));
    }
    tracing::warn!(subject, "dropping a NATS bus message on an unknown subject");
    None
}

fn decode_ephemeral(subject: &str, payload: &[u8]) -> Option<Ephemeral> {
    match serde_json::from_slice::<Ephemeral>(payload) {
        Ok(e) => Some(e),
        Err(err) => {
            tracing::warn!(subject, error = %err, "dropping an undecodable ephemeral bus message");
            None
        }
    }
}

/// Decodes a persisted event received on `subject`, the subject of `channel`. Anything else
/// than a channel event of that channel is logged and dropped.
fn decode(channel: &str, subject: &str, payload: &[u8]) -> Option<ChannelEvent> {
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
    if channel != event.channel_id {
        tracing::warn!(
            subject,
            channel_id = %event.channel_id,
            "dropping a NATS bus message published on another channel's subject"
        );
        return None;
    }
    Some(event)
}

/// `url` without its `user:password@` part.
fn url_without_user_info(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('/') {
            Some((authority, path)) => format!(
                "{scheme}://{}/{path}",
                authority
                    .rsplit_once('@')
                    .map_or(authority, |(_, host)| host)
            ),
            None => format!(
                "{scheme}://{}",
                rest.rsplit_once('@').map_or(rest, |(_, host)| host)
            ),
        },
        None => url
            .rsplit_once('@')
            .map_or(url, |(_, host)| host)
            .to_owned(),
    }
}

/// `%XX` escapes of a URL's user info, decoded (invalid escapes are kept as they are).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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
            persisted_subject("ch_01JABCDEF").unwrap(),
            "parley.ch.ch_01JABCDEF.ev"
        );
        assert_eq!(
            interest_subject(&Topic::Channel("ch_1".into())).unwrap(),
            "parley.ch.ch_1.*"
        );
        for bad in [
            "", "a.b", "a*", ">", "a b", "a\tb", "a\nb", "a\u{0}b", "a\u{a0}b",
        ] {
            assert!(
                matches!(persisted_subject(bad), Err(BusError::Codec(_))),
                "{bad:?} accepted"
            );
            let target = EphemeralTarget::Channel {
                channel_id: bad.into(),
            };
            assert!(matches!(
                ephemeral_subject(&target),
                Err(BusError::Codec(_))
            ));
        }
    }

    #[test]
    fn user_subjects_escape_ids_into_one_token_each() {
        let target = |t: &str, u: &str| EphemeralTarget::User {
            tenant_id: t.into(),
            user_id: u.into(),
        };
        let bucket = user_bucket("acme", "alice@x.io");
        assert_eq!(
            ephemeral_subject(&target("acme", "alice@x.io")).unwrap(),
            format!("parley.user.acme.{bucket}.alice@x%2Eio")
        );
        // Distinct ids, distinct subjects (the escape is injective).
        let a = ephemeral_subject(&target("a.b", "c")).unwrap();
        let b = ephemeral_subject(&target("a", "b.c")).unwrap();
        let c = ephemeral_subject(&target("a%2Eb", "c")).unwrap();
        assert!(a != b && a != c && b != c, "{a} {b} {c}");
        assert_eq!(a.split('.').count(), 5, "{a}");
        // A participant goes to its user's subject.
        let p = EphemeralTarget::Participant {
            tenant_id: "t".into(),
            user_id: "u".into(),
            participant_id: "par_1".into(),
        };
        let bucket = user_bucket("t", "u");
        assert_eq!(
            ephemeral_subject(&p).unwrap(),
            format!("parley.user.t.{bucket}.u")
        );
        // A user topic is its bucket's subscription, for every tenant.
        assert_eq!(
            interest_subject(&Topic::User {
                tenant_id: "t".into(),
                user_id: "u".into()
            })
            .unwrap(),
            format!("parley.user.*.{bucket}.*")
        );
    }

    #[test]
    fn user_buckets_are_fixed_and_spread_users_evenly() {
        // Part of the wire layout: these values must never change between versions (checked
        // against an independent implementation of the same hash).
        assert_eq!(user_bucket("", ""), 19);
        assert_eq!(user_bucket("default", "u0"), 119);
        assert_eq!(user_bucket("acme", "alice@x.io"), 96);
        // The tenant is part of the hash, and its length keeps (ab, c) apart from (a, bc).
        assert_ne!(user_bucket("ab", "c"), user_bucket("a", "bc"));
        let mut counts = vec![0u32; usize::from(USER_BUCKETS)];
        for i in 0..256_000 {
            counts[usize::from(user_bucket("default", &format!("u{i}")))] += 1;
        }
        let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
        // 1,000 per bucket on average; a fair hash stays well within ±15 %.
        assert!(min > 850 && max < 1150, "min {min} max {max}");
    }

    #[test]
    fn decode_accepts_events_on_their_own_subject_only() {
        let ev = event("ch_1");
        let payload = serde_json::to_vec(&ev).unwrap();
        assert_eq!(decode("ch_1", "parley.ch.ch_1.ev", &payload), Some(ev));
        assert_eq!(decode("ch_2", "parley.ch.ch_2.ev", &payload), None);
        assert_eq!(decode("ch_1", "parley.ch.ch_1.ev", b"not json"), None);
        assert_eq!(
            decode("ch_1", "parley.ch.ch_1.ev", b"{\"channel_id\":\"ch_1\"}"),
            None
        );
        assert_eq!(decode("ch_1", "parley.ch.ch_1.ev", &[0xff, 0xfe]), None);
        assert!(decode_message("parley.ch.ch_1.ev", &payload).is_some());
        assert!(decode_message("parley.ch.ch_2.ev", &payload).is_none());
        assert!(decode_message("parley.ch.ch_1.x", &payload).is_none());
        assert!(decode_message("parley.ch.ch_1.eph", &payload).is_none());
    }

    #[test]
    fn decode_accepts_ephemerals_on_their_target_subject_only() {
        let eph = |target| {
            serde_json::to_vec(&Ephemeral {
                target,
                skip_user: None,
                frame: serde_json::json!({"type": "typing"}),
            })
            .unwrap()
        };
        let ch = eph(EphemeralTarget::Channel {
            channel_id: "ch_1".into(),
        });
        assert!(decode_message("parley.ch.ch_1.eph", &ch).is_some());
        assert!(decode_message("parley.ch.ch_2.eph", &ch).is_none());
        assert!(decode_message("parley.ch.ch_1.ev", &ch).is_none());
        let user = eph(EphemeralTarget::User {
            tenant_id: "t".into(),
            user_id: "u.1".into(),
        });
        let bucket = user_bucket("t", "u.1");
        assert!(decode_message(&format!("parley.user.t.{bucket}.u%2E1"), &user).is_some());
        assert!(decode_message(&format!("parley.user.t.{bucket}.other"), &user).is_none());
        assert!(decode_message("parley.user.t.u%2E1", &user).is_none());
        assert!(decode_message("parley.ch.ch_1.eph", &user).is_none());
    }

    #[test]
    fn user_info_is_taken_out_of_urls() {
        assert_eq!(
            url_without_user_info("nats://u:p@127.0.0.1:4222"),
            "nats://127.0.0.1:4222"
        );
        assert_eq!(
            url_without_user_info("nats://127.0.0.1:4222/"),
            "nats://127.0.0.1:4222/"
        );
        assert_eq!(url_without_user_info("tok@h:1"), "h:1");
    }

    #[test]
    fn url_user_info_is_percent_decoded() {
        assert_eq!(percent_decode("p%40ss%3Aw"), "p@ss:w");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("bad%zz%4"), "bad%zz%4");
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
