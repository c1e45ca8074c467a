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
//! | `parley.ch.<bucket>.<channel_id>.ev` | the channel's persisted events ([`ChannelEvent`]) | cores only |
//! | `parley.ch.<bucket>.<channel_id>.eph` | the channel's ephemerals (typing, presence, receipts, call notices) | cores and edges |
//! | `parley.user.<tenant>.<bucket>.<user>` | ephemerals for one user's connections or call participants | cores and edges |
//! | `parley.barrier` | nobody subscribes: a request there is a round trip to the server | every node |
//!
//! Each subscription of async-nats holds a queue whose first block takes about 5.4 KB (and the
//! server about 1.1 KB), so a node cannot afford one per connected user or per subscribed
//! channel when it serves tens of thousands. Both kinds of subjects carry a **bucket**: one of
//! 256, from a fixed hash ([`user_bucket`] of tenant and user, [`channel_bucket`] of the channel
//! id), the same on every node and version (part of the wire layout).
//!
//! **Users**: a node holds one subscription, `parley.user.*.<bucket>.*`, per bucket in which it
//! has at least one user with local connections, and drops it when the bucket's last local user
//! goes. It receives the events of the other users of its buckets too and drops them (the edge's
//! user registry has no connection for them).
//!
//! **Channels**: per bucket, the node is in one of two forms, decided by [`BucketPolicy`] from
//! the number of the bucket's channels with local subscribers (see [`crate::Interest`]):
//! * *exact* while there are at most `K` ([`NatsOptions::channel_exact_max`], 8 by default): one
//!   subscription per channel, `parley.ch.<bucket>.<channel_id>.*` (both kinds). A node with few
//!   channels receives exactly their events and nothing else;
//! * *whole* beyond `K`: one subscription, `parley.ch.<bucket>.*.*`; the events of the bucket's
//!   channels without local subscribers are dropped by the subscription stream before decoding
//!   (`parley_bus_dropped_no_interest_total`). Back to exact once the bucket holds `K / 2` or
//!   fewer (the gap keeps a bucket near `K` from switching at every subscribe).
//!
//! So a node holds at most 256 channel subscriptions and 256 user ones, however many channels
//! and users it serves. A switch loses nothing and keeps each channel's order: the new form is
//! subscribed first, and once a barrier (below) has confirmed it, the replaced subscriptions are
//! *retired*: each sends its `UNSUB` and delivers what its queue holds (everything only it
//! received is in there, since the client reads the connection in order and the confirmation
//! came after), while the new form's subscriptions yield nothing until those have ended (a
//! [`Gate`]). Messages published between the new `SUB` and the old `UNSUB` arrive twice:
//! persisted events are dropped by the hubs' sequencers (a seq already delivered), channel
//! ephemerals by the stream, which keeps fingerprints of the ones it yielded for 2 s after a
//! switch (`parley_bus_duplicates_dropped_total`). Switches are counted in
//! `parley_bus_bucket_switches_total{to}`, subscriptions in
//! `parley_bus_subscriptions{kind="channel"|"channel_bucket"|"user_bucket"}`.
//!
//! Channel ids are one subject token already (generated `ch_` ids; anything else is refused);
//! tenant and user ids may hold `.`, so their tokens escape every byte outside
//! `A-Z a-z 0-9 _ - : @ |` as `%XX`. Channel ids are unique across tenants, so channel subjects
//! need no tenant. A channel message whose bucket token is not its channel's is refused. The
//! split between `.ev` and `.eph` is what the NATS permissions act on: only the core's
//! credentials may publish `parley.ch.*.*.ev` (`scripts/services.sh` shows the permissions,
//! `docs/operations.md` explains them).
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

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::client::{PublishErrorKind, RequestErrorKind, Statistics};
use async_nats::connection::State;
use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event, ServerAddr, Subscriber};
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::SelectAll;
use futures::task::AtomicWaker;
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
    /// A bucket of channels ([`channel_bucket`]) is subscribed channel by channel while it holds
    /// at most this many channels with local subscribers, and as a whole (one wildcard
    /// subscription, the events of channels without local subscribers dropped at the node) beyond
    /// it, until it falls to half of it. `None`: [`DEFAULT_CHANNEL_EXACT_MAX`]. Per node; nodes of
    /// one cluster may differ.
    pub channel_exact_max: Option<usize>,
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
            .field("channel_exact_max", &self.channel_exact_max)
            .finish()
    }
}

/// Channel subjects: `parley.ch.<bucket>.<channel_id>.ev` and `.eph`.
const CHANNEL_PREFIX: &str = "parley.ch.";
const PERSISTED_SUFFIX: &str = ".ev";
const EPHEMERAL_SUFFIX: &str = ".eph";
/// User subjects: `parley.user.<tenant>.<bucket>.<user>`.
const USER_PREFIX: &str = "parley.user.";
/// How many buckets user subjects are spread over. Part of the subject layout: every node of a
/// cluster must use the same value (and the same [`user_bucket`]), or user-targeted events
/// published by one node miss the subscriptions of another.
pub const USER_BUCKETS: u16 = 256;
/// How many buckets channel subjects are spread over ([`channel_bucket`]). Part of the subject
/// layout, like [`USER_BUCKETS`]: the same on every node of a cluster. It is also the most
/// channel subscriptions a node ever holds (one per bucket, however many channels it serves).
pub const CHANNEL_BUCKETS: u16 = 256;
/// The default of [`NatsOptions::channel_exact_max`]: a bucket is subscribed channel by
/// channel while it holds at most this many channels with local subscribers. With 8, a node
/// holds at most 256 × 8 = 2,048 exact subscriptions (about 11 MB) before every bucket is whole,
/// a node with up to a few hundred channels keeps exact interest in most buckets, and a whole
/// bucket is worth it as soon as it replaces 9 subscriptions (about 48 KB).
pub const DEFAULT_CHANNEL_EXACT_MAX: usize = 8;
/// How long after a bucket changes its form (see [`BucketPolicy`]) the subscription drops a
/// channel ephemeral it has already yielded: while both forms are subscribed, the server sends
/// each message once per subscription.
const SWITCH_DEDUP_WINDOW: Duration = Duration::from_secs(2);
/// How often a switch whose barrier failed tries again (see [`interest_worker`]).
const RETIRE_RETRY: Duration = Duration::from_secs(1);
/// Most fingerprints of ephemerals kept for that, per window.
const SWITCH_DEDUP_MAX: usize = 8192;
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
    /// When a bucket of channels is subscribed channel by channel, when as a whole.
    policy: BucketPolicy,
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
                policy: BucketPolicy {
                    exact_max: auth.channel_exact_max.unwrap_or(DEFAULT_CHANNEL_EXACT_MAX),
                },
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
        let filter = Arc::new(Mutex::new(ChannelFilter::default()));
        tokio::spawn(interest_worker(
            Worker {
                inner: Arc::clone(&inner),
                filter: Arc::clone(&filter),
                streams: streams_tx,
                users: HashMap::new(),
                buckets: HashMap::new(),
                retiring: Vec::new(),
            },
            commands_rx,
        ));
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
            filter,
            seen_ephemerals: HashSet::new(),
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

/// When a bucket of channels is subscribed channel by channel (*exact*) and when with one
/// wildcard subscription (*whole*).
///
/// Every async-nats subscription holds a queue whose first block takes about 5.4 KB, so a node
/// with one subscription per channel pays that per subscribed channel (and the server about
/// 1.1 KB). The whole form bounds the node to [`CHANNEL_BUCKETS`] channel subscriptions, at the
/// price of receiving (and dropping, before decoding) the events of the bucket's other channels.
/// A bucket goes whole when it would need more than `exact_max` exact subscriptions and back to
/// exact once it holds at most half of that (the gap keeps a bucket near the limit from
/// switching at every subscribe and unsubscribe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BucketPolicy {
    exact_max: usize,
}

impl BucketPolicy {
    /// Whether a bucket holding `channels` channels with local interest (at least one) is
    /// subscribed as a whole, given whether it is now.
    fn whole(&self, now_whole: bool, channels: usize) -> bool {
        channels > self.exact_max || (now_whole && channels > self.exact_max / 2)
    }
}

/// The channels with local interest, shared by the interest worker (which changes them) and
/// the subscription stream (which drops the messages of every other channel: a whole bucket
/// brings them all).
#[derive(Default)]
struct ChannelFilter {
    channels: HashSet<String>,
    /// Until when channel ephemerals are deduplicated: a bucket is changing its form, and while
    /// both forms are subscribed the server sends each message once per subscription.
    dedup_until: Option<Instant>,
}

impl ChannelFilter {
    fn open_dedup_window(&mut self) {
        self.dedup_until = Some(Instant::now() + SWITCH_DEDUP_WINDOW);
    }
}

fn lock(filter: &Mutex<ChannelFilter>) -> MutexGuard<'_, ChannelFilter> {
    filter
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The `kind` label of `parley_bus_subscriptions`.
const KIND_CHANNEL: &str = "channel";
const KIND_CHANNEL_BUCKET: &str = "channel_bucket";
const KIND_USER_BUCKET: &str = "user_bucket";

// The state of a subscription: 0 while live (the default), then one of these.
const SUB_RETIRE: u8 = 1;
const SUB_ABORT: u8 = 2;

/// How the interest worker tells the stream what to do with one subscription.
#[derive(Default)]
struct SubControl {
    state: AtomicU8,
    waker: AtomicWaker,
    /// Set on a subscription that replaces others in a switch: it yields nothing until they
    /// have delivered what they hold, so each channel's messages keep their order.
    after: Option<Arc<Gate>>,
    /// The gates of the subscriptions that replace this one.
    successors: Mutex<Successors>,
}

#[derive(Default)]
struct Successors {
    /// The subscription has ended (its stream was dropped): a gate added now opens at once.
    ended: bool,
    gates: Vec<Arc<Gate>>,
}

/// What a new subscription waits for: the end of the subscriptions it replaces.
#[derive(Default)]
struct Gate {
    remaining: AtomicUsize,
    waker: AtomicWaker,
}

impl Gate {
    fn new(predecessors: usize) -> Arc<Gate> {
        Arc::new(Gate {
            remaining: AtomicUsize::new(predecessors),
            waker: AtomicWaker::new(),
        })
    }

    fn is_open(&self) -> bool {
        self.remaining.load(Ordering::Acquire) == 0
    }

    fn open_one(&self) {
        let _ = self
            .remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.waker.wake();
    }
}

/// The interest worker's handle on one NATS subscription, whose subscriber the stream polls.
/// Dropping it leaves the subscription as it is (and uncounted).
struct SubHandle {
    control: Arc<SubControl>,
    kind: &'static str,
}

impl SubHandle {
    fn new(
        subscriber: Subscriber,
        kind: &'static str,
        after: Option<Arc<Gate>>,
    ) -> (SubHandle, SubStream) {
        metrics::gauge!("parley_bus_subscriptions", "kind" => kind).increment(1.0);
        let control = Arc::new(SubControl {
            after,
            ..SubControl::default()
        });
        let stream = SubStream {
            subscriber,
            control: Arc::clone(&control),
            unsubscribed: false,
        };
        (SubHandle { control, kind }, stream)
    }

    fn set(&self, state: u8) {
        self.control.state.store(state, Ordering::Release);
        self.control.waker.wake();
    }

    /// Ends the subscription at once; what its queue holds is dropped (nobody wants it).
    fn abort(self) {
        self.set(SUB_ABORT);
    }

    /// Ends the subscription once its queue is delivered: another subscription, confirmed by
    /// the server, covers its subjects, so everything only this one received is in its queue
    /// already (the client reads the connection in order, and the confirmation came after).
    fn retire(self) {
        self.set(SUB_RETIRE);
    }

    /// `gate` opens (by one) when this subscription has ended.
    fn precede(&self, gate: &Arc<Gate>) {
        self.control.precede(gate);
    }
}

impl SubControl {
    /// `gate` opens (by one) when this subscription has ended.
    fn precede(&self, gate: &Arc<Gate>) {
        let mut successors = self
            .successors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if successors.ended {
            gate.open_one();
        } else {
            successors.gates.push(Arc::clone(gate));
        }
    }

    fn ended(&self) -> bool {
        self.successors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .ended
    }
}

impl Drop for SubHandle {
    fn drop(&mut self) {
        metrics::gauge!("parley_bus_subscriptions", "kind" => self.kind).decrement(1.0);
    }
}

/// One NATS subscription as the node's stream polls it.
struct SubStream {
    subscriber: Subscriber,
    control: Arc<SubControl>,
    /// The `UNSUB` of a retired subscription is queued: the queue ends after what it holds.
    unsubscribed: bool,
}

impl futures::Stream for SubStream {
    type Item = async_nats::Message;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = &mut *self;
        this.control.waker.register(cx.waker());
        let state = this.control.state.load(Ordering::Acquire);
        if state == SUB_ABORT {
            return std::task::Poll::Ready(None);
        }
        if let Some(gate) = &this.control.after
            && !gate.is_open()
        {
            gate.waker.register(cx.waker());
            if !gate.is_open() {
                return std::task::Poll::Pending;
            }
        }
        if state == SUB_RETIRE && !this.unsubscribed {
            // Sends the `UNSUB` and closes the queue, whose messages are still delivered; its
            // end (`None`) then removes it from the stream. The client's command queue is
            // bounded: when full, try again on the next poll.
            if this.subscriber.unsubscribe().now_or_never().is_some() {
                this.unsubscribed = true;
            } else {
                cx.waker().wake_by_ref();
            }
        }
        this.subscriber.poll_next_unpin(cx)
    }
}

impl Drop for SubStream {
    fn drop(&mut self) {
        let mut successors = self
            .control
            .successors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        successors.ended = true;
        for gate in successors.gates.drain(..) {
            gate.open_one();
        }
    }
}

/// One NATS subscription shared by several topics (the users of one bucket).
struct Held {
    /// Adds not yet matched by a remove.
    holders: usize,
    /// `None` while the client refused the `SUB` (it was closed); the next add tries again.
    handle: Option<SubHandle>,
}

/// The node's channels of one bucket and their subscriptions.
#[derive(Default)]
struct Bucket {
    /// The wildcard subscription of the whole bucket: the bucket is in the whole form.
    whole: Option<SubHandle>,
    /// The whole subscription the bucket left, until it has delivered what it holds: a channel
    /// subscribed meanwhile waits for it too (it may hold older messages of that channel).
    whole_draining: Option<Arc<SubControl>>,
    channels: HashMap<String, Chan>,
}

/// A channel with local interest.
#[derive(Default)]
struct Chan {
    /// Adds not yet matched by a remove (1 for a channel's hub).
    holders: usize,
    /// Its own subscription, in the exact form.
    exact: Option<SubHandle>,
}

/// The state of [`interest_worker`].
struct Worker {
    inner: Arc<Inner>,
    filter: Arc<Mutex<ChannelFilter>>,
    /// New subscribers, for the stream.
    streams: mpsc::UnboundedSender<SubStream>,
    users: HashMap<u16, Held>,
    buckets: HashMap<u16, Bucket>,
    /// Subscriptions that another one covers now: retired once a barrier confirms that one.
    retiring: Vec<SubHandle>,
}

/// Subscribes to `subject` and hands the subscriber to the stream.
async fn subscribe_stream(
    inner: &Inner,
    streams: &mpsc::UnboundedSender<SubStream>,
    subject: String,
    kind: &'static str,
    after: Option<Arc<Gate>>,
) -> Result<SubHandle, BusError> {
    match inner.client.subscribe(subject).await {
        Ok(subscriber) => {
            let (handle, stream) = SubHandle::new(subscriber, kind, after);
            let _ = streams.send(stream);
            Ok(handle)
        }
        Err(err) => Err(BusError::Unavailable(format!(
            "subscribing on NATS at {}: {err}",
            inner.url
        ))),
    }
}

/// Brings bucket `b`'s subscriptions to the form [`BucketPolicy`] asks for. A switch subscribes
/// the new form first; the old one waits in `retiring` for the batch's barrier.
async fn reconcile(w: &mut Worker, b: u16) {
    let Some(bucket) = w.buckets.get_mut(&b) else {
        return;
    };
    if bucket.channels.is_empty() {
        if let Some(whole) = bucket.whole.take() {
            whole.abort();
        }
        w.buckets.remove(&b);
        return;
    }
    let want_whole = w
        .inner
        .policy
        .whole(bucket.whole.is_some(), bucket.channels.len());
    if want_whole && bucket.whole.is_none() {
        lock(&w.filter).open_dedup_window();
        if bucket.whole_draining.as_ref().is_some_and(|c| c.ended()) {
            bucket.whole_draining = None;
        }
        // After the exact subscriptions it replaces, and after an earlier whole one still
        // delivering what it holds.
        let exact = bucket
            .channels
            .values()
            .filter(|c| c.exact.is_some())
            .count();
        let before = exact + usize::from(bucket.whole_draining.is_some());
        let gate = (before > 0).then(|| Gate::new(before));
        if let (Some(gate), Some(draining)) = (&gate, &bucket.whole_draining) {
            draining.precede(gate);
        }
        match subscribe_stream(
            &w.inner,
            &w.streams,
            bucket_subject(b),
            KIND_CHANNEL_BUCKET,
            gate.clone(),
        )
        .await
        {
            Ok(handle) => {
                bucket.whole = Some(handle);
                for old in bucket.channels.values_mut().filter_map(|c| c.exact.take()) {
                    if let Some(gate) = &gate {
                        old.precede(gate);
                    }
                    w.retiring.push(old);
                }
                metrics::counter!("parley_bus_bucket_switches_total", "to" => "whole").increment(1);
            }
            Err(err) => {
                tracing::warn!(error = %err, bucket = b, "channel bucket not subscribed; staying exact");
            }
        }
    }
    if want_whole && bucket.whole.is_some() {
        return;
    }
    // The exact form (wanted, or the whole one could not be subscribed). Leaving the whole
    // form, each new subscription waits for the whole one to deliver what it holds.
    let leaving_whole = bucket.whole.is_some();
    if leaving_whole {
        lock(&w.filter).open_dedup_window();
    }
    if bucket.whole_draining.as_ref().is_some_and(|c| c.ended()) {
        bucket.whole_draining = None;
    }
    let drained_whole = bucket.whole_draining.clone();
    let mut gates = Vec::new();
    let mut complete = true;
    for (channel_id, chan) in &mut bucket.channels {
        if chan.exact.is_some() {
            continue;
        }
        let subject = match exact_subject(b, channel_id) {
            Ok(subject) => subject,
            Err(err) => {
                // Refused at the add; never here.
                tracing::warn!(error = %err, "channel without a subject");
                continue;
            }
        };
        let gate = (leaving_whole || drained_whole.is_some()).then(|| Gate::new(1));
        match subscribe_stream(&w.inner, &w.streams, subject, KIND_CHANNEL, gate.clone()).await {
            Ok(handle) => {
                chan.exact = Some(handle);
                // The whole subscription being left comes after any earlier one: wait for it.
                match (leaving_whole, &drained_whole, gate) {
                    (true, _, Some(gate)) => gates.push(gate),
                    (false, Some(draining), Some(gate)) => draining.precede(&gate),
                    _ => {}
                }
            }
            Err(err) => {
                complete = false;
                tracing::warn!(error = %err, "channel not subscribed");
            }
        }
    }
    match bucket.whole.take() {
        Some(whole) if complete => {
            for gate in &gates {
                whole.precede(gate);
            }
            bucket.whole_draining = Some(Arc::clone(&whole.control));
            w.retiring.push(whole);
            metrics::counter!("parley_bus_bucket_switches_total", "to" => "exact").increment(1);
        }
        Some(whole) => {
            // Both forms stay until a later change completes this one; nothing waits.
            bucket.whole = Some(whole);
            for gate in &gates {
                gate.open_one();
            }
        }
        None => {}
    }
}

/// Whether the subscriptions the node holds cover `channel_id` (`None`: it has no interest in
/// it any more).
fn covered(w: &Worker, b: u16, channel_id: &str) -> Option<bool> {
    let bucket = w.buckets.get(&b)?;
    let chan = bucket.channels.get(channel_id)?;
    Some(bucket.whole.is_some() || chan.exact.is_some())
}

/// Applies interest changes in order: counts each topic's adds and removes, subscribes what the
/// node needs and does not hold yet (a bucket of users; a channel, or its whole bucket, as
/// [`BucketPolicy`] says), ends what no topic needs any more, then does one barrier for the
/// batch, after which its registrations resolve and the subscriptions a switch replaced are
/// retired. Ends when the node's [`Interest`] handle is dropped.
async fn interest_worker(mut w: Worker, mut commands: mpsc::UnboundedReceiver<Command>) {
    let mut batch = Vec::new();
    loop {
        // While replaced subscriptions wait for a confirmed barrier (the last one failed), try
        // again now and then even without new commands: their replacements wait for them.
        let received = if w.retiring.is_empty() {
            commands.recv_many(&mut batch, INTEREST_BATCH).await
        } else {
            tokio::select! {
                n = commands.recv_many(&mut batch, INTEREST_BATCH) => n,
                () = tokio::time::sleep(RETIRE_RETRY) => usize::MAX,
            }
        };
        if received == 0 {
            break;
        }
        let mut waiting = Vec::new();
        let mut touched = Vec::new();
        for command in batch.drain(..) {
            match command {
                Command::Add(Topic::Channel(channel_id), done) => {
                    if let Err(err) = channel_token(&channel_id) {
                        let _ = done.send(Err(err));
                        continue;
                    }
                    let b = channel_bucket(&channel_id);
                    let chan = w
                        .buckets
                        .entry(b)
                        .or_default()
                        .channels
                        .entry(channel_id.clone())
                        .or_default();
                    chan.holders += 1;
                    if chan.holders == 1 {
                        lock(&w.filter).channels.insert(channel_id.clone());
                    }
                    touched.push(b);
                    waiting.push((Some((b, channel_id)), done));
                }
                Command::Remove(Topic::Channel(channel_id)) => {
                    let b = channel_bucket(&channel_id);
                    if let Some(bucket) = w.buckets.get_mut(&b)
                        && let Entry::Occupied(mut entry) = bucket.channels.entry(channel_id)
                    {
                        entry.get_mut().holders -= 1;
                        if entry.get().holders == 0 {
                            let (channel_id, chan) = entry.remove_entry();
                            lock(&w.filter).channels.remove(&channel_id);
                            if let Some(exact) = chan.exact {
                                exact.abort();
                            }
                            touched.push(b);
                        }
                    }
                }
                Command::Add(Topic::User { tenant_id, user_id }, done) => {
                    let b = user_bucket(&tenant_id, &user_id);
                    let entry = w.users.entry(b).or_insert(Held {
                        holders: 0,
                        handle: None,
                    });
                    entry.holders += 1;
                    if entry.handle.is_none() {
                        match subscribe_stream(
                            &w.inner,
                            &w.streams,
                            user_bucket_subject(b),
                            KIND_USER_BUCKET,
                            None,
                        )
                        .await
                        {
                            Ok(handle) => entry.handle = Some(handle),
                            Err(err) => {
                                let _ = done.send(Err(err));
                                continue;
                            }
                        }
                    }
                    waiting.push((None, done));
                }
                Command::Remove(Topic::User { tenant_id, user_id }) => {
                    let b = user_bucket(&tenant_id, &user_id);
                    if let Entry::Occupied(mut entry) = w.users.entry(b) {
                        entry.get_mut().holders -= 1;
                        if entry.get().holders == 0
                            && let Some(handle) = entry.remove().handle
                        {
                            handle.abort();
                        }
                    }
                }
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for b in touched {
            reconcile(&mut w, b).await;
        }
        if waiting.is_empty() && w.retiring.is_empty() {
            continue;
        }
        let confirmed = w.inner.barrier().await;
        match &confirmed {
            Ok(()) if !w.retiring.is_empty() => {
                lock(&w.filter).open_dedup_window();
                for handle in w.retiring.drain(..) {
                    handle.retire();
                }
            }
            Ok(()) => {}
            // The subscriptions stay registered in the client, which re-sends them when it
            // gets the connection back; that reconnection then makes the stream resync. What
            // a switch replaced stays until a barrier confirms its replacement.
            Err(err) => {
                tracing::warn!(error = %err, "NATS subscriptions not confirmed by the server");
            }
        }
        for (channel, done) in waiting {
            let result = match channel {
                Some((b, channel_id)) if covered(&w, b, &channel_id) == Some(false) => {
                    Err(BusError::Unavailable(format!(
                        "subscribing on NATS at {}: the client refused the subscription",
                        w.inner.url
                    )))
                }
                _ => confirmed.clone(),
            };
            let _ = done.send(result);
        }
    }
    // The node's interest is gone: its handles go (uncounted); the stream keeps what it polls.
}

/// The node's subscription: every topic's subscriber, plus what it needs to notice a resync.
struct SubscriptionState {
    /// Keeps the connection alive and gives the client for barriers.
    inner: Arc<Inner>,
    subs: SelectAll<SubStream>,
    /// Subscribers of newly added topics, from [`interest_worker`].
    new_subs: mpsc::UnboundedReceiver<SubStream>,
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
    /// The channels the node wants; shared with the interest worker.
    filter: Arc<Mutex<ChannelFilter>>,
    /// Fingerprints of the channel ephemerals yielded during a switch's dedup window.
    seen_ephemerals: HashSet<u64>,
}

impl SubscriptionState {
    /// What a received message yields: nothing for a channel without local interest (a whole
    /// bucket brings the other channels' events too; dropped before decoding), for a duplicate
    /// of a channel ephemeral during a switch, or for anything malformed.
    fn accept(&mut self, message: &async_nats::Message) -> Option<BusMessage> {
        if let Some((channel_id, ephemeral)) = channel_subject_parts(&message.subject) {
            let mut filter = lock(&self.filter);
            if !filter.channels.contains(channel_id) {
                drop(filter);
                let kind = if ephemeral { "ephemeral" } else { "event" };
                metrics::counter!("parley_bus_dropped_no_interest_total", "kind" => kind)
                    .increment(1);
                return None;
            }
            let dedup = match filter.dedup_until {
                Some(until) if Instant::now() < until => true,
                Some(_) => {
                    filter.dedup_until = None;
                    false
                }
                None => false,
            };
            drop(filter);
            if !dedup {
                if !self.seen_ephemerals.is_empty() {
                    self.seen_ephemerals = HashSet::new();
                }
            } else if ephemeral {
                // The same message through both forms of a switching bucket: the second copy
                // removes the first's fingerprint and is dropped. (Persisted events need no
                // such help: each hub drops a seq it has already delivered.)
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                message.subject.as_str().hash(&mut hasher);
                message.payload.hash(&mut hasher);
                let fingerprint = hasher.finish();
                if self.seen_ephemerals.remove(&fingerprint) {
                    metrics::counter!("parley_bus_duplicates_dropped_total").increment(1);
                    return None;
                }
                if self.seen_ephemerals.len() < SWITCH_DEDUP_MAX {
                    self.seen_ephemerals.insert(fingerprint);
                }
            }
        }
        let item = decode_message(&message.subject, &message.payload)?;
        traced(&item, message.headers.as_ref());
        Some(item)
    }

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
                        if let Some(item) = self.accept(&message) {
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
                        && let Some(item) = self.accept(&message)
                    {
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
    let token = channel_token(channel_id)?;
    Ok(format!(
        "{CHANNEL_PREFIX}{}.{token}{PERSISTED_SUFFIX}",
        channel_bucket(token)
    ))
}

/// The subject of a channel's ephemerals.
fn channel_ephemeral_subject(channel_id: &str) -> Result<String, BusError> {
    let token = channel_token(channel_id)?;
    Ok(format!(
        "{CHANNEL_PREFIX}{}.{token}{EPHEMERAL_SUFFIX}",
        channel_bucket(token)
    ))
}

/// The subscription of one channel (both kinds), in bucket `bucket`.
fn exact_subject(bucket: u16, channel_id: &str) -> Result<String, BusError> {
    Ok(format!(
        "{CHANNEL_PREFIX}{bucket}.{}.*",
        channel_token(channel_id)?
    ))
}

/// The subscription of every channel of one bucket (both kinds).
fn bucket_subject(bucket: u16) -> String {
    format!("{CHANNEL_PREFIX}{bucket}.*.*")
}

/// The channel and kind (`true`: ephemeral) of a channel subject whose bucket token is the
/// channel's; `None` for anything else.
fn channel_subject_parts(subject: &str) -> Option<(&str, bool)> {
    let rest = subject.strip_prefix(CHANNEL_PREFIX)?;
    let (bucket, rest) = rest.split_once('.')?;
    let (channel_id, ephemeral) = if let Some(c) = rest.strip_suffix(PERSISTED_SUFFIX) {
        (c, false)
    } else {
        (rest.strip_suffix(EPHEMERAL_SUFFIX)?, true)
    };
    (is_token(channel_id) && bucket.parse::<u16>().ok()? == channel_bucket(channel_id))
        .then_some((channel_id, ephemeral))
}

/// FNV-1a (64 bit) over `bytes`, mixed by the finalizer of SplitMix64. Part of the wire layout
/// (the buckets of subjects): it must never change.
fn stable_hash(bytes: impl Iterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    h
}

/// The bucket of a user's subject: [`stable_hash`] over the tenant id's length (8 bytes, little
/// endian), the tenant id and the user id, modulo [`USER_BUCKETS`]. Stable across nodes, builds
/// and versions (it is part of the wire layout).
pub fn user_bucket(tenant_id: &str, user_id: &str) -> u16 {
    let len = (tenant_id.len() as u64).to_le_bytes();
    let h = stable_hash(
        len.iter()
            .chain(tenant_id.as_bytes())
            .chain(user_id.as_bytes())
            .copied(),
    );
    (h % u64::from(USER_BUCKETS)) as u16
}

/// The bucket of a channel's subjects: [`stable_hash`] over the channel id, modulo
/// [`CHANNEL_BUCKETS`]. Stable across nodes, builds and versions (part of the wire layout).
/// Channel ids are unique across tenants, so the tenant is not part of it.
pub fn channel_bucket(channel_id: &str) -> u16 {
    (stable_hash(channel_id.bytes()) % u64::from(CHANNEL_BUCKETS)) as u16
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
        EphemeralTarget::Channel { channel_id } => channel_ephemeral_subject(channel_id)?,
        EphemeralTarget::User { tenant_id, user_id }
        | EphemeralTarget::Participant {
            tenant_id, user_id, ..
        } => user_subject(tenant_id, user_id),
    })
}

/// What a node subscribes to for a topic in the exact form.
#[cfg(test)]
fn interest_subject(topic: &Topic) -> Result<String, BusError> {
    match topic {
        Topic::Channel(channel_id) => exact_subject(channel_bucket(channel_id), channel_id),
        Topic::User { tenant_id, user_id } => {
            Ok(user_bucket_subject(user_bucket(tenant_id, user_id)))
        }
    }
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
    if subject.starts_with(CHANNEL_PREFIX) {
        match channel_subject_parts(subject) {
            Some((channel, false)) => {
                return decode(channel, subject, payload)
                    .map(|event| BusMessage::Event(Arc::new(event)));
            }
            Some((channel, true)) => {
                return decode_ephemeral(subject, payload)
                    .filter(|e| {
                        matches!(&e.target, EphemeralTarget::Channel { channel_id } if channel_id == channel)
                    })
                    .map(|e| BusMessage::Ephemeral(Arc::new(e)));
            }
            None => {}
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
    fn channel_subjects_are_a_bucket_then_one_token_per_channel() {
        assert_eq!(
            persisted_subject("ch_01JABCDEF").unwrap(),
            "parley.ch.93.ch_01JABCDEF.ev"
        );
        assert_eq!(
            ephemeral_subject(&EphemeralTarget::Channel {
                channel_id: "ch_1".into()
            })
            .unwrap(),
            "parley.ch.219.ch_1.eph"
        );
        assert_eq!(
            interest_subject(&Topic::Channel("ch_1".into())).unwrap(),
            "parley.ch.219.ch_1.*"
        );
        assert_eq!(bucket_subject(219), "parley.ch.219.*.*");
        assert_eq!(
            channel_subject_parts("parley.ch.219.ch_1.ev"),
            Some(("ch_1", false))
        );
        assert_eq!(
            channel_subject_parts("parley.ch.219.ch_1.eph"),
            Some(("ch_1", true))
        );
        // A channel on another bucket's subject, or a malformed one, is nobody's.
        for bad in [
            "parley.ch.218.ch_1.ev",
            "parley.ch.ch_1.ev",
            "parley.ch.219.ch_1.x",
            "parley.ch.219..ev",
            "parley.ch.x.ch_1.ev",
        ] {
            assert_eq!(channel_subject_parts(bad), None, "{bad}");
        }
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
    fn channel_buckets_are_fixed_and_spread_channels_evenly() {
        // Part of the wire layout: these values must never change between versions (checked
        // against an independent implementation of the same hash).
        assert_eq!(channel_bucket(""), 155);
        assert_eq!(channel_bucket("ch_1"), 219);
        assert_eq!(channel_bucket("ch_01JABCDEF"), 93);
        assert_eq!(channel_bucket("ch_01HZX5K3M8Q9R2T4V6W8Y0A1B3"), 210);
        let mut counts = vec![0u32; usize::from(CHANNEL_BUCKETS)];
        for i in 0..256_000 {
            counts[usize::from(channel_bucket(&format!("ch_{i:026}")))] += 1;
        }
        let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
        assert!(min > 850 && max < 1150, "min {min} max {max}");
    }

    #[test]
    fn a_bucket_is_exact_up_to_the_limit_and_whole_beyond_with_hysteresis() {
        let p = BucketPolicy { exact_max: 8 };
        // From exact: whole only beyond the limit.
        for n in 1..=8 {
            assert!(!p.whole(false, n), "{n}");
        }
        assert!(p.whole(false, 9));
        assert!(p.whole(false, 10_000));
        // From whole: stays whole down to half the limit (exclusive), exact at or below it.
        for n in 5..=9 {
            assert!(p.whole(true, n), "{n}");
        }
        for n in 1..=4 {
            assert!(!p.whole(true, n), "{n}");
        }
        // A walk up and down: switches exactly twice.
        let mut whole = false;
        let mut switches = Vec::new();
        for n in (1..=12).chain((1..=11).rev()) {
            let next = p.whole(whole, n);
            if next != whole {
                switches.push((n, next));
            }
            whole = next;
        }
        assert_eq!(switches, vec![(9, true), (4, false)]);
        // 0: every bucket whole (at most one subscription per bucket); 1: whole from 2 channels
        // until the bucket empties.
        let p0 = BucketPolicy { exact_max: 0 };
        assert!(p0.whole(false, 1) && p0.whole(true, 1));
        let p1 = BucketPolicy { exact_max: 1 };
        assert!(!p1.whole(false, 1) && p1.whole(false, 2) && p1.whole(true, 1));
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
        let (s1, s2) = (
            persisted_subject("ch_1").unwrap(),
            persisted_subject("ch_2").unwrap(),
        );
        assert_eq!(decode("ch_1", &s1, &payload), Some(ev));
        assert_eq!(decode("ch_2", &s2, &payload), None);
        assert_eq!(decode("ch_1", &s1, b"not json"), None);
        assert_eq!(decode("ch_1", &s1, b"{\"channel_id\":\"ch_1\"}"), None);
        assert_eq!(decode("ch_1", &s1, &[0xff, 0xfe]), None);
        assert!(decode_message(&s1, &payload).is_some());
        assert!(decode_message(&s2, &payload).is_none());
        assert!(decode_message("parley.ch.219.ch_1.x", &payload).is_none());
        assert!(decode_message("parley.ch.219.ch_1.eph", &payload).is_none());
        // The old layout (no bucket), and a wrong bucket, are refused.
        assert!(decode_message("parley.ch.ch_1.ev", &payload).is_none());
        assert!(decode_message("parley.ch.218.ch_1.ev", &payload).is_none());
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
        assert!(decode_message("parley.ch.219.ch_1.eph", &ch).is_some());
        let ch2 = channel_ephemeral_subject("ch_2").unwrap();
        assert!(decode_message(&ch2, &ch).is_none());
        assert!(decode_message("parley.ch.219.ch_1.ev", &ch).is_none());
        let user = eph(EphemeralTarget::User {
            tenant_id: "t".into(),
            user_id: "u.1".into(),
        });
        let bucket = user_bucket("t", "u.1");
        assert!(decode_message(&format!("parley.user.t.{bucket}.u%2E1"), &user).is_some());
        assert!(decode_message(&format!("parley.user.t.{bucket}.other"), &user).is_none());
        assert!(decode_message("parley.user.t.u%2E1", &user).is_none());
        assert!(decode_message("parley.ch.219.ch_1.eph", &user).is_none());
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
