//! The sans-IO SFU: rooms, participants (one str0m [`Rtc`] each), published tracks,
//! subscriptions and forwarding. No sockets, no clock: every input carries `now`, and the
//! caller drains [`Sfu::poll_output`] (datagrams to send, events, the next timeout) after each
//! input, exactly like str0m's own `Rtc`. [`crate::driver`] is the tokio loop around it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::bwe::{Bitrate, BweKind};
use str0m::change::SdpOffer;
use str0m::format::PayloadParams;
use str0m::media::{Direction, KeyframeRequestKind, MediaData, MediaKind, Mid, Pt, Rid, Rids};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};

use crate::credential::{self, CredentialError};
use crate::layers::{self, LayerInfo, VideoWant};
use crate::speaker::{SpeakerConfig, SpeakerDetector};
use crate::stun;

const LOG: &str = "parley_sfu";

/// Largest SDP offer accepted (the call layer's frame limit is 64 KiB too).
pub const MAX_SDP_LEN: usize = 64 * 1024;
/// Most remote addresses remembered per participant (ICE tries a few; bounds the index).
const MAX_ADDRS_PER_PARTICIPANT: usize = 8;
/// Period of the SFU's own housekeeping (speaker detection, throttled keyframe requests).
const TICK: Duration = Duration::from_millis(100);
/// How often every subscriber's layers are re-allocated even without a new estimate.
const REALLOCATE_EVERY: Duration = Duration::from_secs(1);
/// A layer not seen for this long counts as stopped by its publisher.
const LAYER_IDLE: Duration = Duration::from_secs(2);
/// A DTLS record header, used to ask str0m whether it would accept non-STUN traffic from an
/// address (`Rtc::accepts`), i.e. whether ICE has verified that address.
const DTLS_PROBE: [u8; 13] = [23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
/// Bandwidth set aside per subscribed audio track before video is allocated.
const AUDIO_RESERVE_BPS: u64 = 40_000;

/// Configuration of an [`Sfu`].
#[derive(Debug, Clone)]
pub struct SfuConfig {
    /// Secret shared with the cores that issue join credentials ([`credential::issue`]).
    pub secret: Vec<u8>,
    /// The host candidates put in every answer (ICE-lite): the addresses clients can reach this
    /// SFU's one UDP socket at (for NAT or containers, the public/forwarded ones). Must not be
    /// empty. Every received datagram is handed to str0m as arriving on the first one (one
    /// wildcard socket cannot tell which address a client dialled; replies leave through the
    /// kernel's route, which is what a NAT in front expects).
    pub candidates: Vec<SocketAddr>,
    /// Least time between two keyframe requests for the same published layer.
    pub keyframe_request_interval: Duration,
    /// Subscribe every participant to every other participant's tracks as they appear.
    pub auto_subscribe: bool,
    /// Bandwidth estimate each subscriber starts with, before TWCC feedback refines it.
    pub initial_bitrate_bps: u64,
    /// Nominal bitrates of the rids `q`, `h`, `f` (and of a track without simulcast, last)
    /// used before a layer's bitrate has been measured.
    pub nominal_bitrates_bps: [u64; 4],
    pub max_participants_per_room: usize,
    pub max_participants: usize,
    /// Most tracks one participant may publish.
    pub max_tracks_per_participant: usize,
    /// A participant from which nothing arrived for this long (no media, no RTCP, no ICE
    /// consent checks, which clients send every few seconds) is removed as disconnected.
    pub idle_timeout: Duration,
    /// Packets of send history per outgoing video stream (str0m's ring buffer for pacing,
    /// NACK/RTX answers and probing). It dominates the memory per subscriber: about 1.1 KB per
    /// packet per subscribed video track.
    pub send_buffer_video: usize,
    pub speaker: SpeakerConfig,
}

impl SfuConfig {
    /// Defaults for the given secret and candidates.
    pub fn new(secret: impl Into<Vec<u8>>, candidates: Vec<SocketAddr>) -> SfuConfig {
        SfuConfig {
            secret: secret.into(),
            candidates,
            keyframe_request_interval: Duration::from_secs(1),
            auto_subscribe: true,
            initial_bitrate_bps: 2_500_000,
            nominal_bitrates_bps: [150_000, 500_000, 1_500_000, 1_000_000],
            max_participants_per_room: 100,
            max_participants: 2_000,
            max_tracks_per_participant: 8,
            idle_timeout: Duration::from_secs(15),
            send_buffer_video: 1000,
            speaker: SpeakerConfig::default(),
        }
    }
}

/// The SFU's handle of one joined participant (unique for the SFU's lifetime; a rejoin gets a
/// new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParticipantId(pub u64);

/// A published track (unique for the SFU's lifetime).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrackId(pub u64);

/// A room: one call of one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoomKey {
    pub tenant: String,
    pub call: String,
}

/// Audio or video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrackKind {
    Audio,
    Video,
}

/// What a subscriber wants of one video track.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VideoPrefs {
    /// `true`: no video of this track at all until resumed.
    pub paused: bool,
    /// Largest frame size wanted (the tile size on screen); `None`: the best that fits.
    pub max_size: Option<(u32, u32)>,
}

/// Something the call layer should know or tell a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SfuEvent {
    /// ICE and DTLS are up with this participant.
    Connected { participant: ParticipantId },
    /// The participant's connection died (nothing received for `idle_timeout`, or DTLS closed)
    /// and it was removed from its room, as if it had left.
    Disconnected { participant: ParticipantId },
    /// A participant started sending a track (from its offer). `mid` is the client's own mid;
    /// `layers` the simulcast rids, lowest first (empty without simulcast).
    TrackPublished {
        room: RoomKey,
        publisher: ParticipantId,
        track: TrackId,
        mid: String,
        kind: TrackKind,
        layers: Vec<String>,
    },
    /// The track is gone (publisher left or stopped sending it).
    TrackUnpublished {
        room: RoomKey,
        publisher: ParticipantId,
        track: TrackId,
    },
    /// The subscriber has more subscriptions than receive slots: its client should add this
    /// many more `recvonly` transceivers of each kind and send a new offer (the SFU never
    /// offers; see the crate docs).
    RenegotiationNeeded {
        participant: ParticipantId,
        audio: usize,
        video: usize,
    },
    /// `track` now arrives at the subscriber on its receive slot `mid` (the call layer tells
    /// the client, so it can label the incoming stream).
    SubscriptionBound {
        subscriber: ParticipantId,
        track: TrackId,
        mid: String,
    },
    /// The slot `mid` no longer carries `track` (unsubscribed or unpublished); it is free.
    SubscriptionUnbound {
        subscriber: ParticipantId,
        track: TrackId,
        mid: String,
    },
    /// The subscriber now receives this layer of the video track (`None`: no video).
    LayerSwitched {
        subscriber: ParticipantId,
        track: TrackId,
        layer: Option<String>,
    },
    /// The room's active speaker changed (`None`: the speaker left and nobody speaks).
    ActiveSpeaker {
        room: RoomKey,
        participant: Option<ParticipantId>,
    },
}

/// A datagram to send from the SFU's socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    pub destination: SocketAddr,
    pub contents: Vec<u8>,
}

/// What [`Sfu::poll_output`] returns.
#[derive(Debug)]
pub enum SfuOutput {
    Transmit(Datagram),
    Event(SfuEvent),
    /// Nothing more to do until this instant (or the next input).
    Timeout(Instant),
}

/// Why a call into the SFU was refused. [`SfuError::code`] is stable; messages carry no input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SfuError {
    #[error("{0}")]
    Credential(#[from] CredentialError),
    #[error("unknown participant")]
    UnknownParticipant,
    #[error("unknown track")]
    UnknownTrack,
    #[error("a participant cannot subscribe to its own or another room's track")]
    NotAllowed,
    #[error("the room is full")]
    RoomFull,
    #[error("the SFU is full")]
    ServerFull,
    #[error("the session description was refused")]
    BadSdp,
    #[error("the candidate was refused")]
    BadCandidate,
    #[error("the SFU has stopped")]
    Stopped,
}

impl SfuError {
    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            SfuError::Credential(e) => e.code(),
            SfuError::UnknownParticipant => "unknown_participant",
            SfuError::UnknownTrack => "unknown_track",
            SfuError::NotAllowed => "not_allowed",
            SfuError::RoomFull => "room_full",
            SfuError::ServerFull => "server_full",
            SfuError::BadSdp => "bad_sdp",
            SfuError::BadCandidate => "bad_candidate",
            SfuError::Stopped => "stopped",
        }
    }
}

/// Counters, for tests, metrics and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SfuStats {
    pub rooms: usize,
    pub participants: usize,
    pub tracks: usize,
    /// Frames (audio packets, video frames) written to subscribers.
    pub forwarded_frames: u64,
    /// RTP packets those frames were made of on the publisher side, times subscribers.
    pub forwarded_packets: u64,
    /// Datagrams that matched no participant (unknown ufrag or address) or did not parse.
    pub dropped_datagrams: u64,
    /// Keyframe requests sent to publishers.
    pub keyframe_requests: u64,
}

type Layer = Option<Rid>;

struct Room {
    participants: Vec<ParticipantId>,
    tracks: Vec<TrackId>,
    speaker: SpeakerDetector<ParticipantId>,
}

struct Participant {
    name: String,
    room: RoomKey,
    rtc: Rtc,
    ufrag: Option<String>,
    addrs: Vec<SocketAddr>,
    negotiated: bool,
    connected: bool,
    published: HashMap<Mid, TrackId>,
    slots: Vec<Slot>,
    subs: HashMap<TrackId, Sub>,
    estimate_bps: u64,
    last_input: Instant,
    timeout: Instant,
    dirty: bool,
    /// Last `RenegotiationNeeded` counts sent (not repeated while unchanged).
    asked_slots: (usize, usize),
}

struct Slot {
    mid: Mid,
    kind: TrackKind,
    track: Option<TrackId>,
}

struct Sub {
    kind: TrackKind,
    slot: Option<Mid>,
    pt: Option<Pt>,
    prefs: VideoPrefs,
    /// Layer index chosen by the allocator.
    target: Option<usize>,
    /// Layer index being forwarded.
    current: Option<usize>,
    /// Highest VP8 temporal layer to forward (`None`: all), and the highest one the subscriber
    /// is in sync with.
    temporal_cap: Option<u8>,
    temporal_synced: u8,
    ts: TsRewrite,
}

/// Keeps a subscriber's RTP timeline continuous across layer switches and slot rebinding
/// (simulcast layers need not share an RTP timestamp base).
#[derive(Default)]
struct TsRewrite {
    offset: i64,
    last: Option<(u64, Instant)>,
}

impl TsRewrite {
    fn rewrite(&mut self, numer: u64, frequency: u32, now: Instant, rebase: bool) -> u64 {
        if rebase && let Some((last, at)) = self.last {
            let elapsed = now.saturating_duration_since(at);
            let ticks =
                (elapsed.as_micros() as u64).saturating_mul(u64::from(frequency)) / 1_000_000;
            let expected = last.saturating_add(ticks.max(1));
            self.offset = (expected as i64).wrapping_sub(numer as i64);
        }
        let out = (numer as i64).saturating_add(self.offset).max(0) as u64;
        self.last = Some((out, now));
        out
    }
}

struct Track {
    room: RoomKey,
    publisher: ParticipantId,
    mid: Mid,
    kind: TrackKind,
    layers: Vec<LayerState>,
    subscribers: Vec<ParticipantId>,
}

struct LayerState {
    rid: Layer,
    nominal_bps: u64,
    window_start: Option<Instant>,
    window_bytes: u64,
    measured_bps: u64,
    width: u32,
    height: u32,
    last_seen: Option<Instant>,
    last_keyframe_request: Option<Instant>,
    keyframe_pending: bool,
}

impl LayerState {
    fn new(rid: Layer, nominal_bps: u64) -> LayerState {
        LayerState {
            rid,
            nominal_bps,
            window_start: None,
            window_bytes: 0,
            measured_bps: 0,
            width: 0,
            height: 0,
            last_seen: None,
            last_keyframe_request: None,
            keyframe_pending: false,
        }
    }

    fn record(&mut self, now: Instant, bytes: usize) {
        self.last_seen = Some(now);
        let start = *self.window_start.get_or_insert(now);
        self.window_bytes += bytes as u64;
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= Duration::from_secs(1) {
            self.measured_bps = self.window_bytes * 8 * 1_000_000 / elapsed.as_micros() as u64;
            self.window_start = Some(now);
            self.window_bytes = 0;
        }
    }

    fn bitrate(&self) -> u64 {
        if self.measured_bps > 0 {
            self.measured_bps
        } else {
            self.nominal_bps
        }
    }
}

/// The SFU core; see the module docs.
pub struct Sfu {
    config: SfuConfig,
    next_id: u64,
    rooms: HashMap<RoomKey, Room>,
    participants: HashMap<ParticipantId, Participant>,
    by_name: HashMap<(RoomKey, String), ParticipantId>,
    by_ufrag: HashMap<String, ParticipantId>,
    by_addr: HashMap<SocketAddr, ParticipantId>,
    tracks: HashMap<TrackId, Track>,
    out: VecDeque<SfuOutput>,
    dirty: Vec<ParticipantId>,
    next_tick: Instant,
    next_reallocate: Instant,
    /// Set while an offer's events are processed: slot checks wait for the whole offer.
    applying_offer: bool,
    deferred_slot_checks: Vec<ParticipantId>,
    stats: SfuStats,
}

impl Sfu {
    /// A new SFU. Panics if `config.candidates` is empty (a configuration error of the caller).
    pub fn new(config: SfuConfig, now: Instant) -> Sfu {
        assert!(
            !config.candidates.is_empty(),
            "the SFU needs at least one announced candidate"
        );
        Sfu {
            config,
            next_id: 1,
            rooms: HashMap::new(),
            participants: HashMap::new(),
            by_name: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            tracks: HashMap::new(),
            out: VecDeque::new(),
            dirty: Vec::new(),
            next_tick: now + TICK,
            next_reallocate: now + REALLOCATE_EVERY,
            applying_offer: false,
            deferred_slot_checks: Vec::new(),
            stats: SfuStats::default(),
        }
    }

    pub fn config(&self) -> &SfuConfig {
        &self.config
    }

    pub fn stats(&self) -> SfuStats {
        SfuStats {
            rooms: self.rooms.len(),
            participants: self.participants.len(),
            tracks: self.tracks.len(),
            ..self.stats
        }
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Admits a participant to the room `tenant`/`call` if `credential` was issued for exactly
    /// this tenant, call and participant and has not expired (`now_unix`, seconds). A participant
    /// joining again (reconnect) replaces its previous session. The client then sends its offer
    /// ([`Sfu::apply_offer`]).
    pub fn join(
        &mut self,
        now: Instant,
        now_unix: u64,
        tenant: &str,
        call: &str,
        participant: &str,
        credential: &str,
    ) -> Result<ParticipantId, SfuError> {
        credential::verify_for(
            &self.config.secret,
            credential,
            now_unix,
            tenant,
            call,
            participant,
        )?;
        let room_key = RoomKey {
            tenant: tenant.to_owned(),
            call: call.to_owned(),
        };
        if let Some(old) = self
            .by_name
            .get(&(room_key.clone(), participant.to_owned()))
            .copied()
        {
            self.remove(now, old);
        }
        if self.participants.len() >= self.config.max_participants {
            return Err(SfuError::ServerFull);
        }
        if self
            .rooms
            .get(&room_key)
            .is_some_and(|r| r.participants.len() >= self.config.max_participants_per_room)
        {
            return Err(SfuError::RoomFull);
        }

        let mut rtc = Rtc::builder()
            .set_ice_lite(true)
            .enable_bwe(Some(Bitrate::bps(self.config.initial_bitrate_bps)))
            .set_send_buffer_video(self.config.send_buffer_video.max(1))
            .build(now);
        for addr in &self.config.candidates {
            match Candidate::host(*addr, "udp") {
                Ok(c) => {
                    rtc.add_local_candidate(c);
                }
                Err(e) => tracing::warn!(target: LOG, %addr, "unusable candidate: {e}"),
            }
        }
        let id = ParticipantId(self.next_id());
        self.participants.insert(
            id,
            Participant {
                name: participant.to_owned(),
                room: room_key.clone(),
                rtc,
                ufrag: None,
                addrs: Vec::new(),
                negotiated: false,
                connected: false,
                published: HashMap::new(),
                slots: Vec::new(),
                subs: HashMap::new(),
                estimate_bps: self.config.initial_bitrate_bps,
                last_input: now,
                timeout: now,
                dirty: false,
                asked_slots: (0, 0),
            },
        );
        self.by_name
            .insert((room_key.clone(), participant.to_owned()), id);
        let speaker = self.config.speaker;
        let room = self.rooms.entry(room_key).or_insert_with(|| Room {
            participants: Vec::new(),
            tracks: Vec::new(),
            speaker: SpeakerDetector::new(speaker),
        });
        room.participants.push(id);
        if self.config.auto_subscribe {
            let existing: Vec<TrackId> = room.tracks.clone();
            for track in existing {
                self.subscribe_inner(now, id, track, VideoPrefs::default());
            }
        }
        Ok(id)
    }

    /// Applies the client's offer (the first one or any re-offer: new tracks, more receive
    /// slots, ICE restart) and returns the SFU's answer, which carries every configured host
    /// candidate and `a=ice-lite`.
    pub fn apply_offer(
        &mut self,
        now: Instant,
        participant: ParticipantId,
        sdp: &str,
    ) -> Result<String, SfuError> {
        if sdp.len() > MAX_SDP_LEN {
            return Err(SfuError::BadSdp);
        }
        let p = self
            .participants
            .get_mut(&participant)
            .ok_or(SfuError::UnknownParticipant)?;
        let offer = SdpOffer::from_sdp_string(sdp).map_err(|e| {
            tracing::debug!(target: LOG, ?participant, "unparsable offer: {e}");
            SfuError::BadSdp
        })?;
        let answer = p.rtc.sdp_api().accept_offer(offer).map_err(|e| {
            tracing::debug!(target: LOG, ?participant, "offer refused: {e}");
            SfuError::BadSdp
        })?;
        let answer = answer.to_sdp_string();
        let ufrag = answer
            .lines()
            .find_map(|l| l.trim_end().strip_prefix("a=ice-ufrag:"))
            .map(str::to_owned);
        if let Some(ufrag) = ufrag
            && p.ufrag.as_deref() != Some(ufrag.as_str())
        {
            if let Some(old) = p.ufrag.replace(ufrag.clone()) {
                self.by_ufrag.remove(&old);
            }
            self.by_ufrag.insert(ufrag, participant);
        }
        p.negotiated = true;
        self.mark_dirty(participant);
        self.applying_offer = true;
        // str0m announces new media (`MediaAdded`) only once connected; register the offer's
        // tracks and slots right away so subscriptions bind before the first packet.
        let mids: Vec<Mid> = answer
            .lines()
            .filter_map(|l| l.trim_end().strip_prefix("a=mid:"))
            .map(Mid::from)
            .collect();
        for mid in mids {
            let Some(p) = self.participants.get(&participant) else {
                break;
            };
            let Some(media) = p.rtc.media(mid) else {
                // The data channel's m-line.
                continue;
            };
            let rids = match media.rids_rx() {
                Rids::Specific(rids) => rids.clone(),
                _ => Vec::new(),
            };
            let (kind, direction) = (media.kind(), media.direction());
            self.media_added(now, participant, mid, kind, direction, rids);
        }
        self.run(now);
        self.applying_offer = false;
        let mut deferred = std::mem::take(&mut self.deferred_slot_checks);
        deferred.push(participant);
        deferred.sort();
        deferred.dedup();
        for id in deferred {
            self.check_slots(id);
        }
        Ok(answer)
    }

    /// Adds a trickled client candidate (`candidate:…`, an `a=` prefix is accepted). Optional
    /// with ICE-lite: the SFU learns the client's address from its connectivity checks.
    pub fn add_remote_candidate(
        &mut self,
        participant: ParticipantId,
        candidate: &str,
    ) -> Result<(), SfuError> {
        let p = self
            .participants
            .get_mut(&participant)
            .ok_or(SfuError::UnknownParticipant)?;
        let s = candidate.trim();
        let s = s.strip_prefix("a=").unwrap_or(s);
        if s.is_empty() {
            return Ok(());
        }
        let c = Candidate::from_sdp_string(s).map_err(|_| SfuError::BadCandidate)?;
        p.rtc.add_remote_candidate(c);
        Ok(())
    }

    /// Removes a participant: its tracks are unpublished, its subscriptions dropped.
    pub fn leave(&mut self, now: Instant, participant: ParticipantId) -> Result<(), SfuError> {
        if !self.participants.contains_key(&participant) {
            return Err(SfuError::UnknownParticipant);
        }
        self.remove(now, participant);
        Ok(())
    }

    /// Subscribes `subscriber` to `track` (a track of another participant of the same room).
    /// Idempotent; for video, `prefs` replace earlier ones.
    pub fn subscribe(
        &mut self,
        now: Instant,
        subscriber: ParticipantId,
        track: TrackId,
        prefs: VideoPrefs,
    ) -> Result<(), SfuError> {
        let room = &self
            .participants
            .get(&subscriber)
            .ok_or(SfuError::UnknownParticipant)?
            .room;
        let t = self.tracks.get(&track).ok_or(SfuError::UnknownTrack)?;
        if t.publisher == subscriber || &t.room != room {
            return Err(SfuError::NotAllowed);
        }
        self.subscribe_inner(now, subscriber, track, prefs);
        self.run(now);
        Ok(())
    }

    /// Ends a subscription; its slot becomes free for another track.
    pub fn unsubscribe(
        &mut self,
        now: Instant,
        subscriber: ParticipantId,
        track: TrackId,
    ) -> Result<(), SfuError> {
        if !self.participants.contains_key(&subscriber) {
            return Err(SfuError::UnknownParticipant);
        }
        self.unsubscribe_inner(now, subscriber, track);
        self.run(now);
        Ok(())
    }

    /// Pauses/resumes a subscribed video track or changes its requested size.
    pub fn set_video(
        &mut self,
        now: Instant,
        subscriber: ParticipantId,
        track: TrackId,
        prefs: VideoPrefs,
    ) -> Result<(), SfuError> {
        let p = self
            .participants
            .get_mut(&subscriber)
            .ok_or(SfuError::UnknownParticipant)?;
        let sub = p.subs.get_mut(&track).ok_or(SfuError::UnknownTrack)?;
        sub.prefs = prefs;
        self.reallocate(now, subscriber);
        self.run(now);
        Ok(())
    }

    /// The tracks published in a room, with their publisher and kind.
    pub fn room_tracks(&self, room: &RoomKey) -> Vec<(TrackId, ParticipantId, TrackKind)> {
        let Some(r) = self.rooms.get(room) else {
            return vec![];
        };
        r.tracks
            .iter()
            .filter_map(|id| self.tracks.get(id).map(|t| (*id, t.publisher, t.kind)))
            .collect()
    }

    /// Feeds one datagram received on the SFU's socket from `source`. It goes to the participant
    /// whose ICE ufrag a STUN request names, or to the participant that address belongs to;
    /// anything else is dropped.
    pub fn handle_datagram(&mut self, now: Instant, source: SocketAddr, data: &[u8]) {
        let id = if stun::is_stun(data) {
            match stun::local_ufrag(data).and_then(|u| self.by_ufrag.get(u)) {
                Some(id) => Some(*id),
                // A STUN response or indication: whoever owns the address.
                None => self.by_addr.get(&source).copied(),
            }
        } else {
            self.by_addr.get(&source).copied()
        };
        let Some(id) = id else {
            self.stats.dropped_datagrams += 1;
            return;
        };
        let destination = self.config.candidates[0];
        let Some(p) = self.participants.get_mut(&id) else {
            self.stats.dropped_datagrams += 1;
            return;
        };
        let receive = match Receive::new(Protocol::Udp, source, destination, data) {
            Ok(r) => r,
            Err(_) => {
                self.stats.dropped_datagrams += 1;
                return;
            }
        };
        if let Err(e) = p.rtc.handle_input(Input::Receive(now, receive)) {
            tracing::debug!(target: LOG, participant = ?id, "handle_input: {e}");
        }
        // Learn the source address only once str0m has verified it (a STUN request with valid
        // MESSAGE-INTEGRITY makes it a viable remote candidate): someone who only knows a
        // participant's ufrag cannot bind addresses to it, or push its real address out.
        let known = p.addrs.contains(&source);
        let verified = known
            || Receive::new(Protocol::Udp, source, destination, &DTLS_PROBE)
                .is_ok_and(|probe| p.rtc.accepts(&Input::Receive(now, probe)));
        if verified {
            p.last_input = now;
        }
        if verified && !known {
            if p.addrs.len() >= MAX_ADDRS_PER_PARTICIPANT {
                let old = p.addrs.remove(0);
                self.by_addr.remove(&old);
            }
            p.addrs.push(source);
            if let Some(prev) = self.by_addr.insert(source, id)
                && prev != id
                && let Some(q) = self.participants.get_mut(&prev)
            {
                q.addrs.retain(|a| *a != source);
            }
        }
        self.mark_dirty(id);
        self.run(now);
    }

    /// Advances time: str0m timers of every participant due, speaker detection, throttled
    /// keyframe requests, periodic layer re-allocation.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<ParticipantId> = self
            .participants
            .iter()
            .filter(|(_, p)| p.timeout <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let p = self.participants.get_mut(&id).expect("present");
            if let Err(e) = p.rtc.handle_input(Input::Timeout(now)) {
                tracing::debug!(target: LOG, participant = ?id, "timeout: {e}");
            }
            self.mark_dirty(id);
        }
        if now >= self.next_tick {
            self.next_tick = now + TICK;
            self.tick(now);
        }
        if now >= self.next_reallocate {
            self.next_reallocate = now + REALLOCATE_EVERY;
            let ids: Vec<ParticipantId> = self.participants.keys().copied().collect();
            for id in ids {
                self.reallocate(now, id);
            }
        }
        self.run(now);
    }

    /// The next output: a datagram to send, an event, or (when there is nothing else) the
    /// instant at which [`Sfu::handle_timeout`] is due.
    pub fn poll_output(&mut self) -> SfuOutput {
        if let Some(o) = self.out.pop_front() {
            return o;
        }
        let next = self
            .participants
            .values()
            .map(|p| p.timeout)
            .chain([self.next_tick])
            .min()
            .unwrap_or(self.next_tick);
        SfuOutput::Timeout(next)
    }

    // ---------------------------------------------------------------------------------------
    // Internals

    fn mark_dirty(&mut self, id: ParticipantId) {
        if let Some(p) = self.participants.get_mut(&id)
            && !p.dirty
        {
            p.dirty = true;
            self.dirty.push(id);
        }
    }

    /// Drains every participant whose `Rtc` may have output, until none has.
    fn run(&mut self, now: Instant) {
        while let Some(id) = self.dirty.pop() {
            let Some(p) = self.participants.get_mut(&id) else {
                continue;
            };
            p.dirty = false;
            let mut events = Vec::new();
            loop {
                match p.rtc.poll_output() {
                    Ok(Output::Timeout(t)) => {
                        p.timeout = t;
                        break;
                    }
                    Ok(Output::Transmit(t)) => self.out.push_back(SfuOutput::Transmit(Datagram {
                        destination: t.destination,
                        contents: t.contents.into(),
                    })),
                    Ok(Output::Event(e)) => events.push(e),
                    Err(e) => {
                        tracing::debug!(target: LOG, participant = ?id, "poll_output: {e}");
                        p.timeout = now + Duration::from_millis(20);
                        break;
                    }
                }
            }
            let alive = p.rtc.is_alive();
            for e in events {
                self.handle_event(now, id, e);
            }
            if !alive && self.participants.contains_key(&id) {
                self.remove(now, id);
                self.out
                    .push_back(SfuOutput::Event(SfuEvent::Disconnected { participant: id }));
            }
        }
    }

    fn handle_event(&mut self, now: Instant, id: ParticipantId, event: Event) {
        match event {
            Event::Connected => {
                let Some(p) = self.participants.get_mut(&id) else {
                    return;
                };
                p.connected = true;
                // Media written before the connection came up was dropped by str0m: start every
                // video subscription over from a fresh keyframe.
                let mut wanted = Vec::new();
                for (track, sub) in &mut p.subs {
                    sub.current = None;
                    if let Some(t) = sub.target {
                        wanted.push((*track, t));
                    }
                }
                self.emit(SfuEvent::Connected { participant: id });
                for (track, layer) in wanted {
                    self.request_keyframe(now, track, layer);
                }
            }
            Event::MediaAdded(m) => {
                let rids = m
                    .simulcast
                    .map(|s| if s.recv.is_empty() { s.send } else { s.recv })
                    .unwrap_or_default()
                    .into_iter()
                    .map(|l| l.rid)
                    .collect();
                self.media_added(now, id, m.mid, m.kind, m.direction, rids)
            }
            Event::MediaChanged(m) => self.media_changed(now, id, m.mid, m.direction),
            Event::MediaData(data) => self.forward(now, id, data),
            Event::KeyframeRequest(req) => {
                let Some(p) = self.participants.get(&id) else {
                    return;
                };
                let found = p.subs.iter().find(|(_, s)| s.slot == Some(req.mid));
                if let Some((track, sub)) = found
                    && let Some(layer) = sub.current.or(sub.target)
                {
                    let track = *track;
                    self.request_keyframe(now, track, layer);
                }
            }
            Event::EgressBitrateEstimate(BweKind::Twcc { estimate, .. }) => {
                tracing::debug!(target: LOG, participant = ?id, %estimate, "egress estimate");
                if let Some(p) = self.participants.get_mut(&id) {
                    p.estimate_bps = estimate.as_u64();
                }
                self.reallocate(now, id);
            }
            _ => {}
        }
    }

    fn emit(&mut self, event: SfuEvent) {
        self.out.push_back(SfuOutput::Event(event));
    }

    fn media_added(
        &mut self,
        now: Instant,
        id: ParticipantId,
        mid: Mid,
        kind: MediaKind,
        direction: Direction,
        rids: Vec<Rid>,
    ) {
        let kind = match kind {
            MediaKind::Audio => TrackKind::Audio,
            MediaKind::Video => TrackKind::Video,
        };
        match direction {
            // The client sends: a published track.
            Direction::RecvOnly | Direction::SendRecv => {
                self.publish(now, id, mid, kind, rids);
            }
            // The client receives: a slot for a subscription.
            Direction::SendOnly => {
                if let Some(p) = self.participants.get_mut(&id)
                    && !p.slots.iter().any(|s| s.mid == mid)
                {
                    p.slots.push(Slot {
                        mid,
                        kind,
                        track: None,
                    });
                }
                self.bind_slots(now, id);
            }
            Direction::Inactive => {}
        }
    }

    fn media_changed(&mut self, now: Instant, id: ParticipantId, mid: Mid, direction: Direction) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        if let Some(track) = p.published.get(&mid).copied()
            && !direction.is_receiving()
        {
            p.published.remove(&mid);
            self.unpublish(now, track);
            return;
        }
        if let Some(i) = p.slots.iter().position(|s| s.mid == mid)
            && !direction.is_sending()
        {
            let slot = p.slots.remove(i);
            if let Some(track) = slot.track
                && let Some(sub) = p.subs.get_mut(&track)
            {
                sub.slot = None;
                sub.pt = None;
                self.emit(SfuEvent::SubscriptionUnbound {
                    subscriber: id,
                    track,
                    mid: mid.to_string(),
                });
                self.bind_slots(now, id);
            }
        }
    }

    fn publish(
        &mut self,
        now: Instant,
        id: ParticipantId,
        mid: Mid,
        kind: TrackKind,
        mut rids: Vec<Rid>,
    ) {
        let max_tracks = self.config.max_tracks_per_participant;
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        if p.published.contains_key(&mid) || p.published.len() >= max_tracks {
            return;
        }
        let rank = |r: &Rid| match &**r {
            "q" => 0,
            "h" => 1,
            "f" => 2,
            _ => 3,
        };
        rids.sort_by_key(rank);
        let nominal = self.config.nominal_bitrates_bps;
        let layers: Vec<LayerState> = if rids.is_empty() {
            vec![LayerState::new(None, nominal[3])]
        } else {
            rids.iter()
                .map(|r| LayerState::new(Some(*r), nominal[rank(r).min(2)]))
                .collect()
        };
        let track = TrackId(self.next_id());
        let p = self.participants.get_mut(&id).expect("present");
        p.published.insert(mid, track);
        let room = p.room.clone();
        self.tracks.insert(
            track,
            Track {
                room: room.clone(),
                publisher: id,
                mid,
                kind,
                layers,
                subscribers: Vec::new(),
            },
        );
        let others: Vec<ParticipantId> = match self.rooms.get_mut(&room) {
            Some(r) => {
                r.tracks.push(track);
                r.participants
                    .iter()
                    .copied()
                    .filter(|o| *o != id)
                    .collect()
            }
            None => vec![],
        };
        self.emit(SfuEvent::TrackPublished {
            room,
            publisher: id,
            track,
            mid: mid.to_string(),
            kind,
            layers: rids.iter().map(|r| r.to_string()).collect(),
        });
        if self.config.auto_subscribe {
            for other in others {
                self.subscribe_inner(now, other, track, VideoPrefs::default());
            }
        }
    }

    fn unpublish(&mut self, now: Instant, track: TrackId) {
        let Some(t) = self.tracks.remove(&track) else {
            return;
        };
        if let Some(r) = self.rooms.get_mut(&t.room) {
            r.tracks.retain(|x| *x != track);
        }
        for sub in t.subscribers {
            self.drop_sub(sub, track);
            self.bind_slots(now, sub);
        }
        self.emit(SfuEvent::TrackUnpublished {
            room: t.room,
            publisher: t.publisher,
            track,
        });
    }

    fn subscribe_inner(
        &mut self,
        now: Instant,
        subscriber: ParticipantId,
        track: TrackId,
        prefs: VideoPrefs,
    ) {
        let Some(t) = self.tracks.get_mut(&track) else {
            return;
        };
        let kind = t.kind;
        let Some(p) = self.participants.get_mut(&subscriber) else {
            return;
        };
        if let Some(sub) = p.subs.get_mut(&track) {
            sub.prefs = prefs;
        } else {
            p.subs.insert(
                track,
                Sub {
                    kind,
                    slot: None,
                    pt: None,
                    prefs,
                    target: None,
                    current: None,
                    temporal_cap: None,
                    temporal_synced: u8::MAX,
                    ts: TsRewrite::default(),
                },
            );
            t.subscribers.push(subscriber);
        }
        self.bind_slots(now, subscriber);
    }

    fn unsubscribe_inner(&mut self, now: Instant, subscriber: ParticipantId, track: TrackId) {
        if let Some(t) = self.tracks.get_mut(&track) {
            t.subscribers.retain(|s| *s != subscriber);
        }
        self.drop_sub(subscriber, track);
        self.bind_slots(now, subscriber);
    }

    /// Removes the subscription and frees its slot (no re-binding).
    fn drop_sub(&mut self, subscriber: ParticipantId, track: TrackId) {
        let Some(p) = self.participants.get_mut(&subscriber) else {
            return;
        };
        let Some(sub) = p.subs.remove(&track) else {
            return;
        };
        if let Some(mid) = sub.slot {
            if let Some(slot) = p.slots.iter_mut().find(|s| s.mid == mid) {
                slot.track = None;
            }
            self.emit(SfuEvent::SubscriptionUnbound {
                subscriber,
                track,
                mid: mid.to_string(),
            });
        }
    }

    /// Binds unbound subscriptions to free slots of their kind (in track order), then
    /// re-allocates layers and asks for more slots if some are still missing.
    fn bind_slots(&mut self, now: Instant, id: ParticipantId) {
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        let mut unbound: Vec<TrackId> = p
            .subs
            .iter()
            .filter(|(_, s)| s.slot.is_none())
            .map(|(t, _)| *t)
            .collect();
        unbound.sort();
        let mut bound = Vec::new();
        for track in unbound {
            let kind = p.subs[&track].kind;
            let Some(slot) = p
                .slots
                .iter_mut()
                .find(|s| s.kind == kind && s.track.is_none())
            else {
                continue;
            };
            slot.track = Some(track);
            let sub = p.subs.get_mut(&track).expect("present");
            sub.slot = Some(slot.mid);
            sub.pt = None;
            sub.current = None;
            sub.target = None;
            bound.push((track, slot.mid));
        }
        for (track, mid) in bound {
            self.emit(SfuEvent::SubscriptionBound {
                subscriber: id,
                track,
                mid: mid.to_string(),
            });
        }
        self.reallocate(now, id);
        self.check_slots(id);
    }

    /// Emits `RenegotiationNeeded` when the subscriber lacks slots (after its first offer, and
    /// only when the numbers changed).
    fn check_slots(&mut self, id: ParticipantId) {
        if self.applying_offer {
            self.deferred_slot_checks.push(id);
            return;
        }
        let Some(p) = self.participants.get_mut(&id) else {
            return;
        };
        if !p.negotiated {
            return;
        }
        let missing = |kind| {
            let unbound = p
                .subs
                .values()
                .filter(|s| s.kind == kind && s.slot.is_none())
                .count();
            let free = p
                .slots
                .iter()
                .filter(|s| s.kind == kind && s.track.is_none())
                .count();
            unbound.saturating_sub(free)
        };
        let need = (missing(TrackKind::Audio), missing(TrackKind::Video));
        if need != p.asked_slots {
            p.asked_slots = need;
            if need != (0, 0) {
                self.emit(SfuEvent::RenegotiationNeeded {
                    participant: id,
                    audio: need.0,
                    video: need.1,
                });
            }
        }
    }

    /// Re-runs the layer allocation for one subscriber; asks for keyframes of new targets.
    fn reallocate(&mut self, now: Instant, id: ParticipantId) {
        let Some(p) = self.participants.get(&id) else {
            return;
        };
        let mut video: Vec<TrackId> = p
            .subs
            .iter()
            .filter(|(_, s)| s.kind == TrackKind::Video && s.slot.is_some())
            .map(|(t, _)| *t)
            .collect();
        video.sort();
        let audio = p
            .subs
            .values()
            .filter(|s| s.kind == TrackKind::Audio && s.slot.is_some())
            .count() as u64;
        let budget = p.estimate_bps.saturating_sub(audio * AUDIO_RESERVE_BPS);
        let infos: Vec<Vec<LayerInfo>> = video
            .iter()
            .map(|t| {
                self.tracks
                    .get(t)
                    .map(|t| layer_infos(t, now))
                    .unwrap_or_default()
            })
            .collect();
        let wants: Vec<VideoWant<'_>> = video
            .iter()
            .zip(&infos)
            .map(|(t, layers)| {
                let prefs = p.subs[t].prefs;
                VideoWant {
                    layers,
                    max_size: prefs.max_size,
                    enabled: !prefs.paused,
                }
            })
            .collect();
        let chosen = layers::allocate(budget, &wants);
        let caps = layers::temporal_caps(budget, &wants, &chosen);
        let desired: u64 = wants
            .iter()
            .map(|w| {
                layers::size_cap(w.layers, w.max_size)
                    .filter(|_| w.enabled)
                    .map_or(0, |i| w.layers[i].bitrate_bps)
            })
            .sum::<u64>()
            + audio * AUDIO_RESERVE_BPS;
        // The estimate only climbs on evidence: keep the link at the rate of the next layer up
        // (padding fills what media leaves, capped by the estimate), or a subscriber that fell
        // to a low layer stays there after the congestion is gone.
        let minimum = layers::next_step_bps(&wants, &chosen)
            .map_or(0, |video| video + audio * AUDIO_RESERVE_BPS);

        let p = self.participants.get_mut(&id).expect("present");
        let mut requests = Vec::new();
        let mut stopped = Vec::new();
        for ((track, target), cap) in video.iter().zip(chosen).zip(caps) {
            let sub = p.subs.get_mut(track).expect("present");
            sub.temporal_cap = cap;
            if sub.target != target {
                sub.target = target;
                match target {
                    Some(t) if sub.current != Some(t) => requests.push((*track, t)),
                    None if sub.current.is_some() => {
                        sub.current = None;
                        stopped.push(*track);
                    }
                    _ => {}
                }
            }
        }
        if p.connected {
            let desired = desired.max(AUDIO_RESERVE_BPS);
            p.rtc
                .bwe()
                .set_bitrate(Bitrate::bps(minimum.min(desired)), Bitrate::bps(desired));
            self.mark_dirty(id);
        }
        for track in stopped {
            self.emit(SfuEvent::LayerSwitched {
                subscriber: id,
                track,
                layer: None,
            });
        }
        for (track, layer) in requests {
            self.request_keyframe(now, track, layer);
        }
    }

    /// Asks the publisher of `track` for a keyframe of `layer`, at most once per
    /// `keyframe_request_interval` per layer; a throttled request is sent when the interval
    /// has passed (on a tick).
    fn request_keyframe(&mut self, now: Instant, track: TrackId, layer: usize) {
        let interval = self.config.keyframe_request_interval;
        let Some(t) = self.tracks.get_mut(&track) else {
            return;
        };
        if t.kind != TrackKind::Video {
            return;
        }
        let Some(l) = t.layers.get_mut(layer) else {
            return;
        };
        if l.last_keyframe_request
            .is_some_and(|at| now.saturating_duration_since(at) < interval)
        {
            l.keyframe_pending = true;
            return;
        }
        let rid = l.rid;
        let publisher = t.publisher;
        let mid = t.mid;
        let Some(p) = self.participants.get_mut(&publisher) else {
            return;
        };
        let Some(mut writer) = p.rtc.writer(mid) else {
            return;
        };
        let kind = if writer.is_request_keyframe_possible(KeyframeRequestKind::Pli) {
            KeyframeRequestKind::Pli
        } else {
            KeyframeRequestKind::Fir
        };
        let sent = writer.request_keyframe(rid, kind).is_ok();
        let l = &mut self.tracks.get_mut(&track).expect("present").layers[layer];
        if sent {
            l.last_keyframe_request = Some(now);
            l.keyframe_pending = false;
            self.stats.keyframe_requests += 1;
            self.mark_dirty(publisher);
        } else {
            // Nothing received on that layer yet: retry on a later tick.
            l.keyframe_pending = true;
        }
    }

    fn tick(&mut self, now: Instant) {
        let idle = self.config.idle_timeout;
        let gone: Vec<ParticipantId> = self
            .participants
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.last_input) > idle)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            tracing::debug!(target: LOG, participant = ?id, "idle: removed");
            self.remove(now, id);
            self.emit(SfuEvent::Disconnected { participant: id });
        }
        let mut changes = Vec::new();
        for (key, room) in &mut self.rooms {
            if let Some(change) = room.speaker.tick(now) {
                changes.push((key.clone(), change));
            }
        }
        for (room, participant) in changes {
            self.emit(SfuEvent::ActiveSpeaker { room, participant });
        }
        let pending: Vec<(TrackId, usize)> = self
            .tracks
            .iter()
            .flat_map(|(id, t)| {
                t.layers
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.keyframe_pending)
                    .map(move |(i, _)| (*id, i))
            })
            .collect();
        for (track, layer) in pending {
            self.request_keyframe(now, track, layer);
        }
    }

    /// One frame (or audio packet) from a publisher, to every subscriber that should get it.
    fn forward(&mut self, now: Instant, publisher: ParticipantId, data: MediaData) {
        let Some(p) = self.participants.get(&publisher) else {
            return;
        };
        let Some(track_id) = p.published.get(&data.mid).copied() else {
            return;
        };
        let room = p.room.clone();
        let Some(track) = self.tracks.get_mut(&track_id) else {
            return;
        };
        let Some(layer) = track.layers.iter().position(|l| l.rid == data.rid) else {
            return;
        };
        let keyframe = data.is_keyframe();
        let l = &mut track.layers[layer];
        l.record(now, data.data.len());
        if keyframe && let Some((w, h)) = vp8_keyframe_size(&data.data) {
            l.width = w;
            l.height = h;
        }
        let kind = track.kind;
        if kind == TrackKind::Audio
            && let Some(level) = data.ext_vals.audio_level
            && let Some(r) = self.rooms.get_mut(&room)
        {
            r.speaker.record(publisher, now, level);
        }
        let packets = (**data.seq_range.end())
            .saturating_sub(**data.seq_range.start())
            .saturating_add(1);
        let subscribers = track.subscribers.clone();
        for s in subscribers {
            let Some(sp) = self.participants.get_mut(&s) else {
                continue;
            };
            if !sp.connected {
                continue;
            }
            let Some(sub) = sp.subs.get_mut(&track_id) else {
                continue;
            };
            let Some(mid) = sub.slot else {
                continue;
            };
            let mut rebase = sub.ts.last.is_none();
            let mut switched_to = None;
            if kind == TrackKind::Video {
                let f = layers::forward(sub.current, sub.target, layer, keyframe);
                let before = sub.current;
                sub.current = f.current;
                if before != f.current {
                    switched_to = Some(f.current);
                }
                if !f.send {
                    if let Some(now_layer) = switched_to {
                        let layer = now_layer.map(|i| layer_name(track, i));
                        self.out
                            .push_back(SfuOutput::Event(SfuEvent::LayerSwitched {
                                subscriber: s,
                                track: track_id,
                                layer,
                            }));
                    }
                    continue;
                }
                rebase |= f.switched;
                // Temporal layers (VP8 with a TL0PICIDX): drop above the cap at once.
                if let str0m::format::CodecExtra::Vp8(e) = &data.codec_extra
                    && e.tl0_picture_id.is_some()
                {
                    let (send, synced) = layers::temporal_forward(
                        sub.temporal_cap,
                        sub.temporal_synced,
                        e.layer_index,
                        e.sync,
                        keyframe,
                    );
                    sub.temporal_synced = synced;
                    if !send {
                        continue;
                    }
                }
            }
            let Some(writer) = sp.rtc.writer(mid) else {
                continue;
            };
            let pt = match sub.pt {
                Some(pt) => pt,
                None => match match_pt(&writer, &data.params) {
                    Some(pt) => {
                        sub.pt = Some(pt);
                        pt
                    }
                    None => continue,
                },
            };
            let time = data.time;
            let numer = sub.ts.rewrite(time.numer(), time.denom(), now, rebase);
            let mut writer = writer;
            if let Some(level) = data.ext_vals.audio_level {
                writer = writer.audio_level(level, data.ext_vals.voice_activity.unwrap_or(false));
            }
            let result = writer.write(
                pt,
                data.network_time,
                str0m::media::MediaTime::new(numer, time.frequency()),
                data.data.clone(),
            );
            match result {
                Ok(()) => {
                    self.stats.forwarded_frames += 1;
                    self.stats.forwarded_packets += packets;
                }
                Err(e) => tracing::debug!(target: LOG, subscriber = ?s, "write: {e}"),
            }
            if let Some(now_layer) = switched_to {
                let layer = now_layer.map(|i| layer_name(track, i));
                self.out
                    .push_back(SfuOutput::Event(SfuEvent::LayerSwitched {
                        subscriber: s,
                        track: track_id,
                        layer,
                    }));
            }
            if !sp.dirty {
                sp.dirty = true;
                self.dirty.push(s);
            }
        }
    }

    /// Removes a participant and everything that hangs on it.
    fn remove(&mut self, now: Instant, id: ParticipantId) {
        let Some(p) = self.participants.get(&id) else {
            return;
        };
        let published: Vec<TrackId> = p.published.values().copied().collect();
        let subs: Vec<TrackId> = p.subs.keys().copied().collect();
        for track in published {
            self.unpublish(now, track);
        }
        for track in subs {
            if let Some(t) = self.tracks.get_mut(&track) {
                t.subscribers.retain(|s| *s != id);
            }
        }
        let Some(mut p) = self.participants.remove(&id) else {
            return;
        };
        p.rtc.disconnect();
        if let Some(u) = &p.ufrag {
            self.by_ufrag.remove(u);
        }
        for a in &p.addrs {
            if self.by_addr.get(a) == Some(&id) {
                self.by_addr.remove(a);
            }
        }
        if self.by_name.get(&(p.room.clone(), p.name.clone())) == Some(&id) {
            self.by_name.remove(&(p.room.clone(), p.name.clone()));
        }
        let empty = match self.rooms.get_mut(&p.room) {
            Some(r) => {
                r.participants.retain(|x| *x != id);
                r.speaker.remove(&id);
                r.participants.is_empty()
            }
            None => false,
        };
        if empty {
            self.rooms.remove(&p.room);
        }
    }
}

fn layer_name(track: &Track, i: usize) -> String {
    track.layers[i]
        .rid
        .map(|r| r.to_string())
        .unwrap_or_default()
}

fn layer_infos(track: &Track, now: Instant) -> Vec<LayerInfo> {
    let any_recent = track.layers.iter().any(|l| {
        l.last_seen
            .is_some_and(|t| now.saturating_duration_since(t) < LAYER_IDLE)
    });
    track
        .layers
        .iter()
        .map(|l| LayerInfo {
            bitrate_bps: l.bitrate(),
            width: l.width,
            height: l.height,
            active: !any_recent
                || l.last_seen
                    .is_some_and(|t| now.saturating_duration_since(t) < LAYER_IDLE),
        })
        .collect()
}

fn match_pt(writer: &str0m::media::Writer<'_>, params: &PayloadParams) -> Option<Pt> {
    writer.match_params(*params)
}

/// Width and height from a VP8 keyframe's uncompressed header (RFC 6386 §9.1), if it is one.
pub fn vp8_keyframe_size(frame: &[u8]) -> Option<(u32, u32)> {
    if frame.len() < 10 || frame[0] & 1 != 0 || frame[3..6] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let w = u32::from(u16::from_le_bytes([frame[6], frame[7]]) & 0x3fff);
    let h = u32::from(u16::from_le_bytes([frame[8], frame[9]]) & 0x3fff);
    Some((w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_stay_continuous_across_a_rebase() {
        let t0 = Instant::now();
        let mut ts = TsRewrite::default();
        // The first frame passes unchanged; later ones keep their spacing.
        assert_eq!(ts.rewrite(1_000, 90_000, t0, false), 1_000);
        assert_eq!(
            ts.rewrite(4_000, 90_000, t0 + Duration::from_millis(33), false),
            4_000
        );
        // A switch to a layer with another timestamp base, 100 ms later: the output continues
        // from the last one plus the elapsed time, then keeps the new layer's spacing.
        let after = ts.rewrite(9_000_000, 90_000, t0 + Duration::from_millis(133), true);
        assert_eq!(after, 4_000 + 9_000);
        assert_eq!(
            ts.rewrite(9_003_000, 90_000, t0 + Duration::from_millis(166), false),
            after + 3_000
        );
        // A rebase with no time elapsed still moves forward.
        let again = ts.rewrite(5, 90_000, t0 + Duration::from_millis(166), true);
        assert_eq!(again, after + 3_001);
        // Extreme inputs do not panic.
        ts.rewrite(u64::MAX, 90_000, t0, true);
        ts.rewrite(0, 90_000, t0, true);
    }

    fn cred(who: &str, call: &str) -> String {
        credential::issue(
            b"s",
            &credential::Claims {
                tenant: "t".into(),
                call: call.into(),
                participant: who.into(),
                expiry: 100,
            },
        )
    }

    #[test]
    fn joins_are_limited_and_a_rejoin_replaces_the_session() {
        let now = Instant::now();
        let mut config = SfuConfig::new(b"s".to_vec(), vec!["127.0.0.1:3479".parse().unwrap()]);
        config.max_participants_per_room = 2;
        config.max_participants = 3;
        let mut sfu = Sfu::new(config, now);
        let a = sfu.join(now, 0, "t", "c1", "a", &cred("a", "c1")).unwrap();
        sfu.join(now, 0, "t", "c1", "b", &cred("b", "c1")).unwrap();
        assert_eq!(
            sfu.join(now, 0, "t", "c1", "c", &cred("c", "c1")),
            Err(SfuError::RoomFull)
        );
        // A rejoin replaces the old session (a new handle; the old one is gone).
        let a2 = sfu.join(now, 0, "t", "c1", "a", &cred("a", "c1")).unwrap();
        assert_ne!(a, a2);
        assert_eq!(sfu.leave(now, a), Err(SfuError::UnknownParticipant));
        assert_eq!(sfu.stats().participants, 2);
        sfu.join(now, 0, "t", "c2", "x", &cred("x", "c2")).unwrap();
        assert_eq!(
            sfu.join(now, 0, "t", "c2", "y", &cred("y", "c2")),
            Err(SfuError::ServerFull)
        );
        // Expired, and bad SDP for an admitted participant.
        assert_eq!(
            sfu.join(now, 100, "t", "c2", "y", &cred("y", "c2")),
            Err(SfuError::Credential(CredentialError::Expired))
        );
        assert_eq!(
            sfu.apply_offer(now, a2, "v=0 nonsense"),
            Err(SfuError::BadSdp)
        );
        let huge = "a".repeat(MAX_SDP_LEN + 1);
        assert_eq!(sfu.apply_offer(now, a2, &huge), Err(SfuError::BadSdp));
        assert_eq!(
            sfu.add_remote_candidate(a2, "candidate:garbage"),
            Err(SfuError::BadCandidate)
        );
        // Subscribing to a track that does not exist.
        assert_eq!(
            sfu.subscribe(now, a2, TrackId(999), VideoPrefs::default()),
            Err(SfuError::UnknownTrack)
        );
        // Leaving empties the rooms.
        for id in [a2, ParticipantId(2)] {
            sfu.leave(now, id).unwrap();
        }
        assert_eq!(sfu.stats().rooms, 1);
    }

    #[test]
    fn vp8_keyframe_size_reads_the_header_and_ignores_the_rest() {
        let key = [0x10, 0, 0, 0x9d, 0x01, 0x2a, 0x00, 0x05, 0xd0, 0x02, 0xff];
        assert_eq!(vp8_keyframe_size(&key), Some((1280, 720)));
        // Interframe, bad start code, truncated.
        assert_eq!(
            vp8_keyframe_size(&[0x11, 0, 0, 0x9d, 0x01, 0x2a, 0, 5, 0xd0, 2]),
            None
        );
        assert_eq!(
            vp8_keyframe_size(&[0x10, 0, 0, 0x9d, 0x01, 0x2b, 0, 5, 0xd0, 2]),
            None
        );
        assert_eq!(vp8_keyframe_size(&key[..9]), None);
    }
}
