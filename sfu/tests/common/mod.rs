//! Test fixtures: a real SFU (the tokio driver on `127.0.0.1:0`) and real WebRTC clients (str0m,
//! full ICE, one UDP socket on `127.0.0.1`) that publish synthetic VP8 simulcast and Opus and
//! count what they receive.
//!
//! Every synthetic frame carries a source tag `SRC:<publisher>/<a|v>/<rid>;` after its codec
//! header, so a receiver knows which publisher, track and layer each frame came from without
//! trusting the SFU's bookkeeping. VP8 frames have a real frame tag (keyframe bit, and the
//! keyframe start code with the layer's size), so str0m's depacketizer recognizes keyframes.
//!
//! Clients send no periodic keyframes: a keyframe is sent on each layer's first frame and
//! whenever a keyframe request (PLI/FIR) arrives, so keyframes at subscribers prove that the
//! SFU forwards requests. Loopback only: the client's one candidate is `127.0.0.1`, it refuses
//! remote candidates and datagrams elsewhere.

#![allow(dead_code)]

pub mod proxy;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use parley_sfu::credential::{self, Claims};
use parley_sfu::{ListenConfig, SfuConfig, SfuEvent, SfuHandle, SfuServer};
use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{
    Direction, KeyframeRequestKind, MediaKind, MediaTime, Mid, Rid, Simulcast, SimulcastLayer,
};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

pub const SECRET: &[u8] = b"sfu test secret";
pub const TENANT: &str = "tenant-1";
pub const CALL: &str = "call-1";
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
pub const WAIT: Duration = Duration::from_secs(10);

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A credential for `participant` in the test call, valid for a minute.
pub fn credential(participant: &str) -> String {
    credential::issue(
        SECRET,
        &Claims {
            tenant: TENANT.into(),
            call: CALL.into(),
            participant: participant.into(),
            expiry: unix_now() + 60,
        },
    )
}

/// The SFU under test and every event it emitted.
pub struct TestSfu {
    pub server: SfuServer,
    pub handle: SfuHandle,
    pub events: Arc<Mutex<Vec<SfuEvent>>>,
    pub notify: Arc<Notify>,
    collector: JoinHandle<()>,
}

impl Drop for TestSfu {
    fn drop(&mut self) {
        self.collector.abort();
    }
}

impl TestSfu {
    pub async fn start(auto_subscribe: bool) -> TestSfu {
        TestSfu::start_with(|c| c.auto_subscribe = auto_subscribe).await
    }

    /// An SFU with the test secret, configured further by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut SfuConfig)) -> TestSfu {
        // RUST_LOG=parley_sfu=debug shows the SFU's decisions.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let mut config = SfuConfig::new(SECRET, vec![]);
        tweak(&mut config);
        let mut server = SfuServer::start(
            ListenConfig {
                listen: SocketAddr::new(LOOPBACK, 0),
                announce: vec![],
            },
            config,
        )
        .await
        .expect("starting the SFU on 127.0.0.1");
        let handle = server.handle();
        let mut rx = server.events().unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let notify = Arc::new(Notify::new());
        let (e, n) = (events.clone(), notify.clone());
        let collector = tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                e.lock().unwrap().push(ev);
                n.notify_waiters();
            }
        });
        TestSfu {
            server,
            handle,
            events,
            notify,
            collector,
        }
    }

    pub fn events(&self) -> Vec<SfuEvent> {
        self.events.lock().unwrap().clone()
    }

    /// Waits for the first event (from the start) matching `f`, returning what `f` extracts.
    pub async fn wait_event<T>(
        &self,
        what: &str,
        mut f: impl FnMut(&SfuEvent) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.notify.notified();
            if let Some(t) = self.events.lock().unwrap().iter().find_map(&mut f) {
                return Ok(t);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                bail!("no SFU event {what} within {WAIT:?}");
            }
        }
    }

    /// Joins with a valid credential, offers, applies the answer, waits until connected.
    pub async fn connect(&self, client: &Client) -> anyhow::Result<parley_sfu::ParticipantId> {
        let id = self
            .handle
            .join(TENANT, CALL, &client.name, &credential(&client.name))
            .await
            .map_err(|e| anyhow!("join {}: {e}", client.name))?;
        self.negotiate(client, id).await?;
        client.wait_connected().await?;
        Ok(id)
    }

    /// One offer/answer round (the client offers).
    pub async fn negotiate(
        &self,
        client: &Client,
        id: parley_sfu::ParticipantId,
    ) -> anyhow::Result<()> {
        let offer = client.offer(0, 0).await?;
        let answer = self
            .handle
            .apply_offer(id, &offer)
            .await
            .map_err(|e| anyhow!("apply_offer {}: {e}", client.name))?;
        client.accept_answer(&answer).await
    }
}

/// What a client publishes and how many receive slots its first offer has.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub audio: bool,
    /// Publish VP8 video with simulcast layers q/h/f.
    pub video: bool,
    pub recv_audio: usize,
    pub recv_video: usize,
    /// Audio level (dBov) sent with each Opus packet.
    pub audio_level: i8,
}

impl ClientConfig {
    /// Publishes audio (at `level` dBov) and simulcast video; receives nothing.
    pub fn publisher(level: i8) -> ClientConfig {
        ClientConfig {
            audio: true,
            video: true,
            recv_audio: 0,
            recv_video: 0,
            audio_level: level,
        }
    }

    /// Publishes nothing; `slots` receive mids of each kind.
    pub fn receiver(slots: usize) -> ClientConfig {
        ClientConfig {
            audio: false,
            video: false,
            recv_audio: slots,
            recv_video: slots,
            audio_level: -127,
        }
    }
}

/// What arrived on one receive mid.
#[derive(Debug, Clone, Default)]
pub struct MidStats {
    /// RTP packets (sum of each frame's sequence number range).
    pub packets: u64,
    pub frames: u64,
    pub keyframes: u64,
    /// Source tags seen (`<publisher>/<a|v>/<rid>`), with frame counts.
    pub sources: BTreeMap<String, u64>,
    /// RTP sequence numbers (as on the wire, 16 bits) of every packet of every frame that
    /// str0m delivered: a packet lost on the way is in here only if it was retransmitted.
    pub seqs: BTreeSet<u16>,
}

#[derive(Debug, Default)]
struct Shared {
    received: HashMap<String, MidStats>,
    connected: bool,
    keyframe_requests: u64,
    sent_keyframes: u64,
    addr: Option<SocketAddr>,
}

type Reply<T> = oneshot::Sender<anyhow::Result<T>>;

enum Command {
    Offer(usize, usize, Reply<String>),
    Answer(String, Reply<()>),
    StartMedia,
    RequestKeyframe(String, Reply<()>),
    IceRestart(bool, Reply<String>),
}

pub struct Client {
    pub name: String,
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Mutex<Shared>>,
    task: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    pub async fn new(name: &str, config: ClientConfig) -> Client {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = socket.local_addr().unwrap();
        let mut rtc = Rtc::builder().build(Instant::now());
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        let shared = Arc::new(Mutex::new(Shared {
            addr: Some(addr),
            ..Shared::default()
        }));
        let (commands, rx) = mpsc::unbounded_channel();
        let driver = Driver {
            name: name.to_owned(),
            config,
            rtc,
            socket,
            addr,
            pending: None,
            rebound: None,
            first_offer_done: false,
            audio_mid: None,
            video_mid: None,
            media_on: false,
            shared: shared.clone(),
            key_wanted: HashMap::new(),
            next_audio: Instant::now(),
            next_video: Instant::now(),
            audio_ts: 0,
            video_ts: 0,
        };
        let task = tokio::spawn(driver.run(rx));
        Client {
            name: name.to_owned(),
            commands,
            shared,
            task,
        }
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> anyhow::Result<T> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .map_err(|_| anyhow!("client {} stopped", self.name))?;
        tokio::time::timeout(WAIT, rx)
            .await
            .context("client command timed out")?
            .context("client dropped the reply")?
    }

    /// An offer; the first one has the configured tracks and slots, later ones add
    /// `more_audio`/`more_video` receive slots.
    pub async fn offer(&self, more_audio: usize, more_video: usize) -> anyhow::Result<String> {
        self.call(|r| Command::Offer(more_audio, more_video, r))
            .await
    }

    pub async fn accept_answer(&self, sdp: &str) -> anyhow::Result<()> {
        self.call(|r| Command::Answer(sdp.to_owned(), r)).await
    }

    /// Starts sending the configured media (call after connecting).
    pub fn start_media(&self) {
        let _ = self.commands.send(Command::StartMedia);
    }

    pub async fn wait_connected(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if self.shared.lock().unwrap().connected {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!("client {} not connected within {WAIT:?}", self.name)
    }

    /// What arrived so far, per receive mid.
    pub fn received(&self) -> HashMap<String, MidStats> {
        self.shared.lock().unwrap().received.clone()
    }

    /// Every source tag received on any mid.
    pub fn sources(&self) -> BTreeSet<String> {
        self.received()
            .values()
            .flat_map(|m| m.sources.keys().cloned())
            .collect()
    }

    /// Keyframe requests (PLI/FIR) this client received for what it publishes.
    /// The client's current UDP address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.shared.lock().unwrap().addr
    }

    pub fn keyframe_requests(&self) -> u64 {
        self.shared.lock().unwrap().keyframe_requests
    }

    /// An ICE-restart offer. With `rebind`, the client also moves to a new UDP socket (a new
    /// port on 127.0.0.1, as after a network change) and drops its old candidate.
    pub async fn ice_restart_offer(&self, rebind: bool) -> anyhow::Result<String> {
        self.call(|r| Command::IceRestart(rebind, r)).await
    }

    /// Sends a PLI for what arrives on the receive slot `mid`.
    pub async fn request_keyframe(&self, mid: &str) -> anyhow::Result<()> {
        self.call(|r| Command::RequestKeyframe(mid.to_owned(), r))
            .await
    }
}

struct Driver {
    name: String,
    config: ClientConfig,
    rtc: Rtc,
    socket: UdpSocket,
    addr: SocketAddr,
    pending: Option<SdpPendingOffer>,
    /// The new address of an ICE restart with rebind, until its answer is applied.
    rebound: Option<SocketAddr>,
    first_offer_done: bool,
    audio_mid: Option<Mid>,
    video_mid: Option<Mid>,
    media_on: bool,
    shared: Arc<Mutex<Shared>>,
    /// Per rid: the next frame must be a keyframe.
    key_wanted: HashMap<String, bool>,
    next_audio: Instant,
    next_video: Instant,
    audio_ts: u64,
    video_ts: u64,
}

const AUDIO_EVERY: Duration = Duration::from_millis(20);
const VIDEO_EVERY: Duration = Duration::from_millis(66);
/// (rid, width, height, frame bytes)
const LAYERS: [(&str, u16, u16, usize); 3] = [
    ("q", 320, 180, 300),
    ("h", 640, 360, 900),
    ("f", 1280, 720, 2500),
];

impl Driver {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut buf = vec![0u8; 65536];
        loop {
            let timeout = self.drain().await;
            let connected = self.rtc.is_connected();
            self.shared.lock().unwrap().connected = connected;
            let now = Instant::now();
            let mut wake = timeout;
            if self.media_on {
                wake = wake.min(self.next_audio).min(self.next_video);
            }
            if wake <= now {
                if self.media_on {
                    self.send_media(now);
                }
                let _ = self.rtc.handle_input(Input::Timeout(now));
                continue;
            }
            tokio::select! {
                c = commands.recv() => match c {
                    None => break,
                    Some(Command::Offer(a, v, r)) => { let _ = r.send(self.offer(a, v)); }
                    Some(Command::Answer(sdp, r)) => { let _ = r.send(self.answer(&sdp)); }
                    Some(Command::RequestKeyframe(mid, r)) => {
                        let result = self
                            .rtc
                            .writer(Mid::from(mid.as_str()))
                            .context("no such mid")
                            .and_then(|mut w| {
                                w.request_keyframe(None, KeyframeRequestKind::Pli)
                                    .map_err(|e| anyhow!("request_keyframe: {e}"))
                            });
                        let _ = r.send(result);
                    }
                    Some(Command::IceRestart(rebind, r)) => {
                        let _ = r.send(self.ice_restart(rebind));
                    }
                    Some(Command::StartMedia) => {
                        self.media_on = true;
                        self.next_audio = Instant::now();
                        self.next_video = Instant::now();
                    }
                },
                received = self.socket.recv_from(&mut buf) => {
                    if let Ok((n, source)) = received
                        && source.ip() == LOOPBACK
                        && let Ok(r) = Receive::new(Protocol::Udp, source, self.addr, &buf[..n])
                    {
                        let _ = self.rtc.handle_input(Input::Receive(Instant::now(), r));
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    let _ = self.rtc.handle_input(Input::Timeout(Instant::now()));
                }
            }
        }
    }

    async fn drain(&mut self) -> Instant {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(t)) => return t,
                Ok(Output::Transmit(t)) => {
                    if t.destination.ip() == LOOPBACK {
                        let _ = self.socket.send_to(&t.contents, t.destination).await;
                    }
                }
                Ok(Output::Event(e)) => self.event(e),
                Err(_) => return Instant::now() + Duration::from_millis(10),
            }
        }
    }

    fn event(&mut self, e: Event) {
        match e {
            Event::MediaData(d) => {
                let packets = (**d.seq_range.end()) - (**d.seq_range.start()) + 1;
                let source = source_tag(&d.data).unwrap_or_else(|| "untagged".into());
                let mut s = self.shared.lock().unwrap();
                let m = s.received.entry(d.mid.to_string()).or_default();
                m.packets += packets;
                m.frames += 1;
                for seq in **d.seq_range.start()..=**d.seq_range.end() {
                    m.seqs.insert(seq as u16);
                }
                if d.is_keyframe() {
                    m.keyframes += 1;
                }
                *m.sources.entry(source).or_default() += 1;
            }
            Event::KeyframeRequest(req) => {
                let rid = req.rid.map(|r| r.to_string()).unwrap_or_default();
                self.key_wanted.insert(rid, true);
                self.shared.lock().unwrap().keyframe_requests += 1;
            }
            _ => {}
        }
    }

    fn offer(&mut self, more_audio: usize, more_video: usize) -> anyhow::Result<String> {
        let mut api = self.rtc.sdp_api();
        if !self.first_offer_done {
            // As a browser client would: the app's data channel (also makes an offer of a
            // client that neither publishes nor receives yet non-empty).
            api.add_channel("parley".into());
        }
        let (recv_a, recv_v) = if self.first_offer_done {
            (more_audio, more_video)
        } else {
            if self.config.audio {
                self.audio_mid = Some(api.add_media(
                    MediaKind::Audio,
                    Direction::SendOnly,
                    Some(self.name.clone()),
                    Some(format!("{}-audio", self.name)),
                    None,
                ));
            }
            if self.config.video {
                let mut sim = Simulcast::new();
                for (rid, ..) in LAYERS {
                    sim.add_send_layer(SimulcastLayer::new(rid));
                }
                self.video_mid = Some(api.add_media(
                    MediaKind::Video,
                    Direction::SendOnly,
                    Some(self.name.clone()),
                    Some(format!("{}-video", self.name)),
                    Some(sim),
                ));
            }
            (
                self.config.recv_audio + more_audio,
                self.config.recv_video + more_video,
            )
        };
        for _ in 0..recv_a {
            api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
        }
        for _ in 0..recv_v {
            api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
        }
        let (offer, pending) = api.apply().ok_or_else(|| anyhow!("nothing to offer"))?;
        self.pending = Some(pending);
        self.first_offer_done = true;
        Ok(offer.to_sdp_string())
    }

    fn ice_restart(&mut self, rebind: bool) -> anyhow::Result<String> {
        let mut api = self.rtc.sdp_api();
        api.ice_restart(!rebind);
        let (offer, pending) = api.apply().context("nothing to offer")?;
        self.pending = Some(pending);
        if rebind {
            let std_socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
            std_socket.set_nonblocking(true)?;
            self.socket = UdpSocket::from_std(std_socket)?;
            self.addr = self.socket.local_addr()?;
            // str0m clears the old candidates when the answer is applied; the new one is
            // added after that.
            self.rebound = Some(self.addr);
            self.shared.lock().unwrap().addr = Some(self.addr);
        }
        Ok(offer.to_sdp_string())
    }

    fn answer(&mut self, sdp: &str) -> anyhow::Result<()> {
        // Loopback only: the SFU must announce 127.0.0.1 and nothing else.
        for line in sdp.lines() {
            if let Some(c) = line.trim().strip_prefix("a=candidate:")
                && !c.contains(" 127.0.0.1 ")
            {
                bail!("non-loopback candidate in the SFU's answer: {line}");
            }
        }
        let answer = SdpAnswer::from_sdp_string(sdp)?;
        let pending = self.pending.take().context("no pending offer")?;
        self.rtc.sdp_api().accept_answer(pending, answer)?;
        if let Some(addr) = self.rebound.take() {
            self.rtc
                .add_local_candidate(Candidate::host(addr, "udp")?)
                .context("str0m refused the new candidate")?;
        }
        self.shared.lock().unwrap().connected = self.rtc.is_connected();
        Ok(())
    }

    fn send_media(&mut self, now: Instant) {
        if !self.rtc.is_connected() {
            return;
        }
        if now >= self.next_audio {
            self.next_audio += AUDIO_EVERY;
            if let Some(mid) = self.audio_mid {
                self.audio_ts += 960;
                let mut payload = format!("SRC:{}/a/;", self.name).into_bytes();
                payload.resize(80, 0xaa);
                if let Some(w) = self.rtc.writer(mid) {
                    let pt = w
                        .payload_params()
                        .find(|p| p.spec().codec == Codec::Opus)
                        .map(|p| p.pt());
                    if let Some(pt) = pt {
                        let _ = w.audio_level(self.config.audio_level, true).write(
                            pt,
                            now,
                            MediaTime::new(self.audio_ts, str0m::media::Frequency::FORTY_EIGHT_KHZ),
                            payload,
                        );
                    }
                }
            }
        }
        if now >= self.next_video {
            self.next_video += VIDEO_EVERY;
            if let Some(mid) = self.video_mid {
                self.video_ts += 5940;
                for (rid, w, h, size) in LAYERS {
                    let key = *self.key_wanted.entry(rid.into()).or_insert(true);
                    let frame = vp8_frame(&self.name, rid, key, w, h, size);
                    let Some(writer) = self.rtc.writer(mid) else {
                        return;
                    };
                    let pt = writer
                        .payload_params()
                        .find(|p| p.spec().codec == Codec::Vp8)
                        .map(|p| p.pt());
                    let Some(pt) = pt else {
                        return;
                    };
                    let ok = writer
                        .rid(Rid::from(rid))
                        .write(pt, now, MediaTime::from_90khz(self.video_ts), frame)
                        .is_ok();
                    if ok && key {
                        self.key_wanted.insert(rid.into(), false);
                        self.shared.lock().unwrap().sent_keyframes += 1;
                    }
                }
            }
        }
    }
}

/// A synthetic VP8 frame: a real frame tag (keyframe bit, show_frame; for keyframes the start
/// code and size), the source tag, padding.
fn vp8_frame(name: &str, rid: &str, key: bool, w: u16, h: u16, size: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(size);
    if key {
        f.extend_from_slice(&[0x10, 0x00, 0x00, 0x9d, 0x01, 0x2a]);
        f.extend_from_slice(&w.to_le_bytes());
        f.extend_from_slice(&h.to_le_bytes());
    } else {
        f.extend_from_slice(&[0x11, 0x00, 0x00]);
    }
    f.extend_from_slice(format!("SRC:{name}/v/{rid};").as_bytes());
    f.resize(size, 0x55);
    f
}

fn source_tag(data: &[u8]) -> Option<String> {
    let at = data.windows(4).position(|w| w == b"SRC:")?;
    let rest = &data[at + 4..];
    let end = rest.iter().position(|b| *b == b';')?;
    String::from_utf8(rest[..end].to_vec()).ok()
}
