//! The SFU inside `parley serve`: the `parley-sfu` driver (one UDP socket), the service that
//! maps the call layer's names (tenant, call, participant) to the SFU's handles and answers the
//! cores' [`SfuRequest`]s, and the pump that turns [`SfuEvent`]s into frames for the
//! participants (`call.sfu`) and channels (`call.active_speaker`) on the bus.
//!
//! `--role all` (the default) runs one in-process and hands the core an in-process
//! [`SfuDirectory`]; see docs/sfu.md.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use parley_core::Core;
use parley_core::calls::{SfuDirectory, SfuNode, SfuPlane, SfuSettings};
use parley_proto::ServerFrame;
use parley_proto::calls::{MediaKind, SfuNotice, SfuOp, SfuReply, SfuRequest};
use parley_sfu::{
    ListenConfig, ParticipantId, RoomKey, SfuConfig, SfuError, SfuEvent, SfuHandle, SfuServer,
    TrackId, TrackKind, VideoPrefs,
};
use parley_sync::{Bus, Ephemeral, EphemeralTarget};

/// SFU flags of `parley serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct SfuArgs {
    /// UDP address of the SFU's one socket (all calls, all participants). Port 0 picks a free
    /// port. Give a reachable address (e.g. `0.0.0.0:3479` plus `--sfu-announce`) in production.
    #[arg(long, env = "PARLEY_SFU_LISTEN", default_value = "127.0.0.1:0")]
    pub sfu_listen: SocketAddr,
    /// Addresses clients reach the SFU socket at (host candidates in every answer), comma
    /// separated; port 0 means the listen port. Required when `--sfu-listen` is a wildcard.
    #[arg(long, env = "PARLEY_SFU_ANNOUNCE", value_delimiter = ',')]
    pub sfu_announce: Vec<SocketAddr>,
    /// Secret shared by the cores and SFU processes for the participants' SFU credentials.
    /// Unset: a random one per process (enough when the SFU runs inside the one process).
    #[arg(long, env = "PARLEY_SFU_SECRET", hide_env_values = true)]
    pub sfu_secret: Option<String>,
    /// Present participants at which a P2P call escalates to the SFU (0: never).
    #[arg(long, env = "PARLEY_SFU_THRESHOLD", default_value_t = 4)]
    pub sfu_threshold: usize,
    /// Every call starts on the SFU.
    #[arg(long, env = "PARLEY_SFU_ALWAYS", default_value_t = false)]
    pub sfu_always: bool,
    /// Lifetime of a participant's SFU credential, in seconds.
    #[arg(long, env = "PARLEY_SFU_CREDENTIAL_TTL_SECS", default_value_t = 300)]
    pub sfu_credential_ttl_secs: u64,
    /// Do not run an SFU in this process (calls stay P2P unless SFU processes are reachable).
    #[arg(long, env = "PARLEY_NO_SFU", default_value_t = false)]
    pub no_sfu: bool,
}

impl SfuArgs {
    /// The shared secret, or a random one for a single process.
    fn secret(&self) -> Vec<u8> {
        match &self.sfu_secret {
            Some(s) => s.as_bytes().to_vec(),
            None => {
                let a = ulid::Ulid::new().to_string();
                let b = ulid::Ulid::new().to_string();
                format!("{a}{b}").into_bytes()
            }
        }
    }
}

const LOG: &str = "parley::sfu";

/// What the service knows of one admitted participant.
#[derive(Debug, Clone)]
struct Member {
    tenant: String,
    call: String,
    channel: String,
    participant: String,
    user: String,
}

#[derive(Debug, Clone)]
struct TrackInfo {
    room: RoomKey,
    publisher: ParticipantId,
    mid: String,
    kind: TrackKind,
    layers: Vec<String>,
}

#[derive(Default)]
struct State {
    /// (tenant, call, participant) -> the SFU's handle of its current session.
    by_name: HashMap<(String, String, String), ParticipantId>,
    members: HashMap<ParticipantId, Member>,
    tracks: HashMap<TrackId, TrackInfo>,
    /// Calls the cores placed here: (tenant, call) -> session.
    claims: HashMap<(String, String), String>,
}

/// The SFU process's side of the control plane: admits participants, passes offers,
/// candidates and subscriptions to the driver, and tells participants what happens.
pub struct SfuService {
    handle: SfuHandle,
    bus: Arc<dyn Bus>,
    state: Mutex<State>,
}

fn track_name(t: TrackId) -> String {
    format!("t{}", t.0)
}

fn parse_track(s: &str) -> Option<TrackId> {
    s.strip_prefix('t')?.parse().ok().map(TrackId)
}

fn kind_of(k: TrackKind) -> MediaKind {
    match k {
        TrackKind::Audio => MediaKind::Audio,
        TrackKind::Video => MediaKind::Video,
    }
}

fn refused(e: SfuError) -> SfuReply {
    SfuReply::Refused {
        code: e.code().to_owned(),
    }
}

impl SfuService {
    /// Starts the driver on `listen` and the event pump; frames go out on `bus`.
    pub async fn start(
        listen: ListenConfig,
        secret: Vec<u8>,
        bus: Arc<dyn Bus>,
    ) -> anyhow::Result<(Arc<SfuService>, SfuServer)> {
        let mut server = SfuServer::start(listen, SfuConfig::new(secret, Vec::new()))
            .await
            .context("cannot start the SFU (its UDP socket)")?;
        let events = server.events().context("SFU events taken")?;
        let service = Arc::new(SfuService {
            handle: server.handle(),
            bus,
            state: Mutex::default(),
        });
        tokio::spawn(service.clone().pump(events));
        Ok((service, server))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn handle(&self) -> &SfuHandle {
        &self.handle
    }

    /// Participants admitted now (the load the registry shows).
    pub fn load(&self) -> u64 {
        self.lock().members.len() as u64
    }

    /// The calls placed here, as (tenant, call, session).
    fn claims(&self) -> Vec<Claimed> {
        self.lock()
            .claims
            .iter()
            .map(|((tenant, call_id), session)| Claimed {
                tenant: tenant.clone(),
                call_id: call_id.clone(),
                session: session.clone(),
            })
            .collect()
    }

    fn lookup(&self, tenant: &str, call: &str, participant: &str) -> Option<ParticipantId> {
        self.lock()
            .by_name
            .get(&(tenant.to_owned(), call.to_owned(), participant.to_owned()))
            .copied()
    }

    /// Answers one request of a core.
    pub async fn handle_request(&self, req: SfuRequest) -> SfuReply {
        match req {
            SfuRequest::Offer {
                tenant,
                call_id,
                channel_id,
                participant_id,
                user_id,
                sdp,
                credential,
            } => {
                let known = self.lookup(&tenant, &call_id, &participant_id);
                let (pid, new_session) = match (credential, known) {
                    (Some(cred), _) => {
                        match self
                            .handle
                            .join(&tenant, &call_id, &participant_id, &cred)
                            .await
                        {
                            Ok(pid) => {
                                let mut st = self.lock();
                                if let Some(old) = st.by_name.insert(
                                    (tenant.clone(), call_id.clone(), participant_id.clone()),
                                    pid,
                                ) {
                                    st.members.remove(&old);
                                }
                                st.members.insert(
                                    pid,
                                    Member {
                                        tenant: tenant.clone(),
                                        call: call_id.clone(),
                                        channel: channel_id,
                                        participant: participant_id.clone(),
                                        user: user_id,
                                    },
                                );
                                (pid, true)
                            }
                            Err(e) => return refused(e),
                        }
                    }
                    (None, Some(pid)) => (pid, false),
                    (None, None) => {
                        return SfuReply::Refused {
                            code: "credential_missing".into(),
                        };
                    }
                };
                let answer = match self.handle.apply_offer(pid, &sdp).await {
                    Ok(a) => a,
                    Err(e) => return refused(e),
                };
                if new_session {
                    self.tell_existing_tracks(pid, &tenant, &call_id).await;
                }
                SfuReply::Answer { sdp: answer }
            }
            SfuRequest::Candidate {
                tenant,
                call_id,
                participant_id,
                candidate,
            } => match self.lookup(&tenant, &call_id, &participant_id) {
                None => SfuReply::Refused {
                    code: "unknown_participant".into(),
                },
                Some(pid) => match self.handle.add_remote_candidate(pid, &candidate).await {
                    Ok(()) => SfuReply::Done,
                    Err(e) => refused(e),
                },
            },
            SfuRequest::Subscription {
                tenant,
                call_id,
                participant_id,
                op,
                track_id,
                paused,
                max_size,
            } => {
                let Some(pid) = self.lookup(&tenant, &call_id, &participant_id) else {
                    return SfuReply::Refused {
                        code: "unknown_participant".into(),
                    };
                };
                let Some(track) = parse_track(&track_id) else {
                    return SfuReply::Refused {
                        code: "unknown_track".into(),
                    };
                };
                let prefs = VideoPrefs {
                    paused: paused.unwrap_or(false),
                    max_size,
                };
                let result = match op {
                    SfuOp::Subscribe => self.handle.subscribe(pid, track, prefs).await,
                    SfuOp::Unsubscribe => self.handle.unsubscribe(pid, track).await,
                    SfuOp::Video => self.handle.set_video(pid, track, prefs).await,
                };
                match result {
                    Ok(()) => SfuReply::Done,
                    Err(e) => refused(e),
                }
            }
            SfuRequest::Leave {
                tenant,
                call_id,
                participant_id,
            } => {
                let pid = {
                    let mut st = self.lock();
                    let pid = st.by_name.remove(&(tenant, call_id, participant_id));
                    if let Some(pid) = pid {
                        st.members.remove(&pid);
                    }
                    pid
                };
                if let Some(pid) = pid {
                    let _ = self.handle.leave(pid).await;
                }
                SfuReply::Done
            }
            SfuRequest::Claim {
                tenant,
                call_id,
                session,
            } => {
                self.lock().claims.insert((tenant, call_id), session);
                SfuReply::Done
            }
            SfuRequest::EndCall { tenant, call_id } => {
                let pids: Vec<ParticipantId> = {
                    let mut st = self.lock();
                    st.claims.remove(&(tenant.clone(), call_id.clone()));
                    let pids: Vec<ParticipantId> = st
                        .members
                        .iter()
                        .filter(|(_, m)| m.tenant == tenant && m.call == call_id)
                        .map(|(p, _)| *p)
                        .collect();
                    for p in &pids {
                        if let Some(m) = st.members.remove(p) {
                            st.by_name.remove(&(m.tenant, m.call, m.participant));
                        }
                    }
                    pids
                };
                for pid in pids {
                    let _ = self.handle.leave(pid).await;
                }
                SfuReply::Done
            }
        }
    }

    /// A new session learns every track already in its call.
    async fn tell_existing_tracks(&self, to: ParticipantId, tenant: &str, call: &str) {
        let notices: Vec<SfuNotice> = {
            let st = self.lock();
            let mut tracks: Vec<(&TrackId, &TrackInfo)> = st
                .tracks
                .iter()
                .filter(|(_, t)| t.room.tenant == tenant && t.room.call == call)
                .collect();
            tracks.sort_by_key(|(id, _)| **id);
            tracks
                .into_iter()
                .filter_map(|(id, t)| {
                    Some(SfuNotice::TrackPublished {
                        track_id: track_name(*id),
                        publisher: st.members.get(&t.publisher)?.participant.clone(),
                        kind: kind_of(t.kind),
                        mid: t.mid.clone(),
                        layers: t.layers.clone(),
                    })
                })
                .collect()
        };
        for n in notices {
            self.notify(to, n).await;
        }
    }

    /// Sends a notice to one participant's connection.
    async fn notify(&self, to: ParticipantId, notice: SfuNotice) {
        let Some(m) = self.lock().members.get(&to).cloned() else {
            return;
        };
        let frame = ServerFrame::CallSfu {
            call_id: m.call.clone(),
            participant_id: m.participant.clone(),
            notice,
        };
        let event = Ephemeral {
            target: EphemeralTarget::Participant {
                tenant_id: m.tenant,
                user_id: m.user,
                participant_id: m.participant,
            },
            skip_user: None,
            frame: serde_json::to_value(&frame).unwrap_or_default(),
        };
        if let Err(e) = self.bus.publish_ephemeral(&event).await {
            tracing::debug!(target: LOG, error = %e, "SFU notice dropped");
        }
    }

    fn room_members(&self, room: &RoomKey) -> Vec<ParticipantId> {
        self.lock()
            .members
            .iter()
            .filter(|(_, m)| m.tenant == room.tenant && m.call == room.call)
            .map(|(p, _)| *p)
            .collect()
    }

    fn participant_name(&self, p: ParticipantId) -> Option<String> {
        self.lock().members.get(&p).map(|m| m.participant.clone())
    }

    async fn pump(self: Arc<Self>, mut events: tokio::sync::mpsc::UnboundedReceiver<SfuEvent>) {
        while let Some(event) = events.recv().await {
            self.on_event(event).await;
        }
    }

    async fn on_event(&self, event: SfuEvent) {
        match event {
            SfuEvent::Connected { participant } => {
                self.notify(participant, SfuNotice::Connected).await;
            }
            SfuEvent::Disconnected { participant } => {
                self.notify(participant, SfuNotice::Disconnected).await;
                let mut st = self.lock();
                if let Some(m) = st.members.remove(&participant) {
                    st.by_name.remove(&(m.tenant, m.call, m.participant));
                }
            }
            SfuEvent::TrackPublished {
                room,
                publisher,
                track,
                mid,
                kind,
                layers,
            } => {
                let Some(name) = self.participant_name(publisher) else {
                    return;
                };
                self.lock().tracks.insert(
                    track,
                    TrackInfo {
                        room: room.clone(),
                        publisher,
                        mid: mid.clone(),
                        kind,
                        layers: layers.clone(),
                    },
                );
                for to in self.room_members(&room) {
                    let notice = SfuNotice::TrackPublished {
                        track_id: track_name(track),
                        publisher: name.clone(),
                        kind: kind_of(kind),
                        mid: mid.clone(),
                        layers: layers.clone(),
                    };
                    self.notify(to, notice).await;
                }
            }
            SfuEvent::TrackUnpublished {
                room,
                publisher,
                track,
            } => {
                self.lock().tracks.remove(&track);
                let name = self.participant_name(publisher).unwrap_or_default();
                for to in self.room_members(&room) {
                    let notice = SfuNotice::TrackUnpublished {
                        track_id: track_name(track),
                        publisher: name.clone(),
                    };
                    self.notify(to, notice).await;
                }
            }
            SfuEvent::RenegotiationNeeded {
                participant,
                audio,
                video,
            } => {
                self.notify(participant, SfuNotice::Renegotiate { audio, video })
                    .await;
            }
            SfuEvent::SubscriptionBound {
                subscriber,
                track,
                mid,
            } => {
                let publisher = {
                    let st = self.lock();
                    st.tracks
                        .get(&track)
                        .and_then(|t| st.members.get(&t.publisher))
                        .map(|m| m.participant.clone())
                        .unwrap_or_default()
                };
                let notice = SfuNotice::Bound {
                    track_id: track_name(track),
                    publisher,
                    mid,
                };
                self.notify(subscriber, notice).await;
            }
            SfuEvent::SubscriptionUnbound {
                subscriber,
                track,
                mid,
            } => {
                let notice = SfuNotice::Unbound {
                    track_id: track_name(track),
                    mid,
                };
                self.notify(subscriber, notice).await;
            }
            SfuEvent::LayerSwitched {
                subscriber,
                track,
                layer,
            } => {
                let notice = SfuNotice::Layer {
                    track_id: track_name(track),
                    layer,
                };
                self.notify(subscriber, notice).await;
            }
            SfuEvent::ActiveSpeaker { room, participant } => {
                let (channel, name) = {
                    let st = self.lock();
                    let channel = st
                        .members
                        .values()
                        .find(|m| m.tenant == room.tenant && m.call == room.call)
                        .map(|m| m.channel.clone());
                    let name = participant
                        .and_then(|p| st.members.get(&p))
                        .map(|m| m.participant.clone());
                    (channel, name)
                };
                let Some(channel_id) = channel else { return };
                let frame = ServerFrame::CallActiveSpeaker {
                    call_id: room.call,
                    participant_id: name,
                };
                let event = Ephemeral {
                    target: EphemeralTarget::Channel { channel_id },
                    skip_user: None,
                    frame: serde_json::to_value(&frame).unwrap_or_default(),
                };
                let _ = self.bus.publish_ephemeral(&event).await;
            }
        }
    }
}

/// The directory of a process whose only SFU runs inside it.
pub struct LocalDirectory {
    id: String,
    service: Arc<SfuService>,
}

#[async_trait::async_trait]
impl SfuDirectory for LocalDirectory {
    fn live(&self) -> Vec<SfuNode> {
        vec![SfuNode {
            id: self.id.clone(),
            load: self.service.load(),
        }]
    }

    async fn request(&self, node: &str, req: SfuRequest) -> Result<SfuReply, String> {
        if node != self.id {
            return Err(format!("SFU {node} is not known here"));
        }
        Ok(self.service.handle_request(req).await)
    }
}

// ---- the registry and control plane over NATS ----

/// Subject of the SFU processes' heartbeats (`{node, load}` as JSON, every
/// [`HEARTBEAT_EVERY`]).
pub const HEARTBEAT_SUBJECT: &str = "parley.sfu.hb";
/// Prefix of each SFU process's control subject (`parley.sfu.ctl.<node>`, request/reply).
pub const CONTROL_PREFIX: &str = "parley.sfu.ctl.";
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
/// An SFU not heard from for this long is dead: its calls move to another one.
const HEARTBEAT_TTL: Duration = Duration::from_millis(2_000);
/// How long a core waits for an SFU's reply.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(serde::Serialize, serde::Deserialize)]
struct Heartbeat {
    node: String,
    load: u64,
    /// The calls placed on this SFU.
    #[serde(default)]
    calls: Vec<Claimed>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Claimed {
    tenant: String,
    call_id: String,
    session: String,
}

/// What a core knows of one SFU process from its last heartbeat.
struct NodeView {
    load: u64,
    seen: tokio::time::Instant,
    /// (tenant, call) -> session.
    calls: HashMap<(String, String), String>,
}

/// The registry as a core sees it: every SFU process's last heartbeat, over NATS.
pub struct NatsDirectory {
    client: async_nats::Client,
    nodes: Arc<Mutex<HashMap<String, NodeView>>>,
}

impl NatsDirectory {
    pub async fn start(client: async_nats::Client) -> anyhow::Result<Arc<NatsDirectory>> {
        use futures::StreamExt;
        let mut sub = client
            .subscribe(HEARTBEAT_SUBJECT)
            .await
            .context("cannot subscribe to SFU heartbeats")?;
        let nodes: Arc<Mutex<HashMap<String, NodeView>>> = Arc::default();
        let table = nodes.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if let Ok(hb) = serde_json::from_slice::<Heartbeat>(&msg.payload) {
                    let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
                    let calls = hb
                        .calls
                        .into_iter()
                        .map(|c| ((c.tenant, c.call_id), c.session))
                        .collect();
                    let view = NodeView {
                        load: hb.load,
                        seen: tokio::time::Instant::now(),
                        calls,
                    };
                    t.insert(hb.node, view);
                    t.retain(|_, v| v.seen.elapsed() < HEARTBEAT_TTL * 30);
                }
            }
        });
        Ok(Arc::new(NatsDirectory { client, nodes }))
    }
}

#[async_trait::async_trait]
impl SfuDirectory for NatsDirectory {
    fn live(&self) -> Vec<SfuNode> {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, v)| v.seen.elapsed() < HEARTBEAT_TTL)
            .map(|(id, v)| SfuNode {
                id: id.clone(),
                load: v.load,
            })
            .collect()
    }

    fn claims(&self, tenant: &str, call_id: &str) -> Vec<(String, String)> {
        let key = (tenant.to_owned(), call_id.to_owned());
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, v)| v.seen.elapsed() < HEARTBEAT_TTL)
            .filter_map(|(id, v)| v.calls.get(&key).map(|s| (id.clone(), s.clone())))
            .collect()
    }

    async fn request(&self, node: &str, req: SfuRequest) -> Result<SfuReply, String> {
        let body = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
        let reply = tokio::time::timeout(
            CONTROL_TIMEOUT,
            self.client
                .request(format!("{CONTROL_PREFIX}{node}"), body.into()),
        )
        .await
        .map_err(|_| format!("SFU {node} did not answer"))?
        .map_err(|e| e.to_string())?;
        serde_json::from_slice(&reply.payload).map_err(|e| e.to_string())
    }
}

/// Makes `service` reachable as SFU `node`: answers its control subject and heartbeats.
pub async fn register(
    client: async_nats::Client,
    node: String,
    service: Arc<SfuService>,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let mut control = client
        .subscribe(format!("{CONTROL_PREFIX}{node}"))
        .await
        .context("cannot subscribe to the SFU control subject")?;
    {
        let client = client.clone();
        let service = service.clone();
        tokio::spawn(async move {
            while let Some(msg) = control.next().await {
                let (client, service) = (client.clone(), service.clone());
                tokio::spawn(async move {
                    let reply = match serde_json::from_slice::<SfuRequest>(&msg.payload) {
                        Ok(req) => service.handle_request(req).await,
                        Err(_) => SfuReply::Refused {
                            code: "bad_request".into(),
                        },
                    };
                    if let (Some(to), Ok(body)) = (msg.reply, serde_json::to_vec(&reply)) {
                        let _ = client.publish(to, body.into()).await;
                    }
                });
            }
        });
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
        loop {
            tick.tick().await;
            let hb = Heartbeat {
                node: node.clone(),
                load: service.load(),
                calls: service.claims(),
            };
            if let Ok(body) = serde_json::to_vec(&hb) {
                let _ = client.publish(HEARTBEAT_SUBJECT, body.into()).await;
                let _ = client.flush().await;
            }
        }
    });
    Ok(())
}

fn settings(args: &SfuArgs, secret: Vec<u8>) -> SfuSettings {
    SfuSettings {
        secret,
        threshold: args.sfu_threshold,
        always: args.sfu_always,
        credential_ttl: Duration::from_secs(args.sfu_credential_ttl_secs.max(10)),
    }
}

/// The SFU side of a node that runs the core (`--role all`): with NATS, the core places calls
/// on every SFU process that heartbeats there (this process's own SFU included, unless
/// `--no-sfu`); without NATS, on the SFU inside this process. Returns the in-process SFU's
/// server (keep it for the process's lifetime).
pub async fn start_for_core(
    args: &SfuArgs,
    nats: Option<async_nats::Client>,
    core: &Arc<Core>,
    bus: Arc<dyn Bus>,
) -> anyhow::Result<Option<SfuServer>> {
    if nats.is_some() && args.sfu_secret.is_none() {
        // Several nodes cannot share a random secret: without one, calls stay P2P.
        tracing::warn!(
            target: LOG,
            "no SFU: with --nats-url, give every node and SFU process the same --sfu-secret \
             (PARLEY_SFU_SECRET); calls stay peer to peer"
        );
        return Ok(None);
    }
    let secret = args.secret();
    let server = if args.no_sfu {
        None
    } else {
        let listen = ListenConfig {
            listen: args.sfu_listen,
            announce: args.sfu_announce.clone(),
        };
        Some(SfuService::start(listen, secret.clone(), bus).await?)
    };
    let directory: Arc<dyn SfuDirectory> = match (&nats, &server) {
        (Some(client), server) => {
            if let Some((service, _)) = server {
                let node = format!("sfu-{}", ulid::Ulid::new().to_string().to_lowercase());
                register(client.clone(), node, service.clone()).await?;
            }
            NatsDirectory::start(client.clone()).await?
        }
        (None, Some((service, _))) => Arc::new(LocalDirectory {
            id: format!("local-{}", ulid::Ulid::new()),
            service: service.clone(),
        }),
        (None, None) => return Ok(None),
    };
    if let Some((_, s)) = &server {
        tracing::info!(
            target: LOG,
            listen = %s.handle().local_addr(),
            announce = ?s.handle().announced(),
            threshold = args.sfu_threshold,
            always = args.sfu_always,
            "SFU running in this process"
        );
    }
    core.set_sfu(Arc::new(SfuPlane::new(settings(args, secret), directory)));
    tokio::spawn(core.clone().run_sfu_failover(HEARTBEAT_EVERY));
    Ok(server.map(|(_, s)| s))
}

/// `parley serve --role sfu`: an SFU process. It registers in NATS (heartbeats with its load,
/// a control subject the cores send requests to), sends participants' notices over the bus,
/// and serves `/healthz` and `/v1/sfu` (its node id, UDP address and load) over HTTP.
pub async fn serve_sfu(args: &crate::config::ServeArgs) -> anyhow::Result<()> {
    let url = args
        .nats_url
        .as_deref()
        .context("--role sfu registers in NATS: give --nats-url (PARLEY_NATS_URL)")?;
    if args.sfu.sfu_secret.is_none() {
        anyhow::bail!(
            "--role sfu needs --sfu-secret (PARLEY_SFU_SECRET), the secret the cores issue \
             credentials with"
        );
    }
    // One connection, with the node's NATS credentials, for the bus and the registry.
    let nats = parley_sync::NatsBus::connect_with(url, &crate::server::nats_options(args)?)
        .await
        .context("cannot connect to NATS")?;
    let client = nats.client();
    let bus: Arc<dyn Bus> = Arc::new(nats);
    let listen = ListenConfig {
        listen: args.sfu.sfu_listen,
        announce: args.sfu.sfu_announce.clone(),
    };
    let (service, server) = SfuService::start(listen, args.sfu.secret(), bus).await?;
    let node = format!("sfu-{}", ulid::Ulid::new().to_string().to_lowercase());
    register(client, node.clone(), service.clone()).await?;
    let udp = server.handle().local_addr();
    let status = {
        let (node, service) = (node.clone(), service.clone());
        move || {
            let body = serde_json::json!({
                "node": node,
                "udp": udp.to_string(),
                "participants": service.load(),
            });
            std::future::ready(axum::Json(body))
        }
    };
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/v1/sfu", axum::routing::get(status));
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "parley listening on http://{addr} (role: sfu, node: {node}, udp: {udp})"
        );
        let _ = out.flush();
    }
    tracing::info!(target: LOG, %node, %udp, "SFU process registered");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            #[cfg(unix)]
            if let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
                return;
            }
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    drop(server);
    Ok(())
}
