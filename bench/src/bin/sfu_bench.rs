//! `sfu_bench`: what the SFU core costs per forwarded packet, per subscriber in memory, and in
//! added latency.
//!
//! Runs the sans-IO `parley_sfu::Sfu` and its peers (str0m `Rtc`s, full ICE, DTLS, SRTP: real
//! WebRTC endpoints) in ONE thread, exchanging datagrams in memory: no socket is opened, so no
//! traffic leaves the process. Publishers send synthetic VP8 simulcast (q/h/f) and Opus at real
//! time; subscribers receive every publisher's audio and video.
//!
//! Measured:
//! - **forwarded packets per second per core**: RTP datagrams the SFU emitted to subscribers,
//!   divided by the thread CPU time spent inside the SFU's own calls (`handle_datagram`,
//!   `handle_timeout`, `poll_output`), so the peers' work does not count. Socket system calls are
//!   not included (the driver adds one `sendto` per datagram).
//! - **processing time per input RTP datagram** (p50/p99): wall time from handing the datagram to
//!   the SFU until every output it caused has been polled.
//! - **end-to-end frame latency** (p50/p99): from the publisher writing a frame to the subscriber's
//!   str0m emitting it, through both str0m endpoints and the SFU. An upper bound of what the SFU
//!   adds: it includes the peers' pacing and jitter buffers and the time this one thread spends
//!   on other peers.
//! - **memory per subscriber**: jemalloc's allocated bytes, read before and after the SFU drops
//!   every subscriber (its `Rtc` with send history, subscriptions), after the run, and right after
//!   join + offer (idle).
//!
//! Prints figures; never passes or fails on them.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use parley_sfu::credential::{self, Claims};
use parley_sfu::{ParticipantId, Sfu, SfuConfig, SfuOutput};
use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{
    Direction, Frequency, MediaKind, MediaTime, Mid, Rid, Simulcast, SimulcastLayer,
};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(about = "SFU core: forwarded packets per CPU second, memory per subscriber, latency")]
struct Args {
    /// Participants that publish audio and simulcast video.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Participants that only receive (every publisher's audio and video).
    #[arg(long, default_value_t = 50)]
    subscribers: usize,
    /// Measured seconds of media (after the warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Seconds of media before measuring.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Video frames per second per layer.
    #[arg(long, default_value_t = 30)]
    fps: u32,
    /// `SfuConfig::send_buffer_video`: packets of send history per outgoing video stream.
    #[arg(long, default_value_t = 1000)]
    send_buffer_video: usize,
    /// Drive the real driver: the SFU's one UDP socket on 127.0.0.1 and its tokio task in a
    /// thread of its own, every peer with a UDP socket on 127.0.0.1 (see the module docs).
    #[arg(long)]
    udp: bool,
}

const SECRET: &[u8] = b"sfu bench secret";
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// (rid, width, height, frame bytes at 30 fps: ≈150 / 500 / 1,500 kbit/s)
const LAYERS: [(&str, u16, u16, usize); 3] = [
    ("q", 320, 180, 625),
    ("h", 640, 360, 2_080),
    ("f", 1280, 720, 6_250),
];

struct Peer {
    addr: SocketAddr,
    rtc: Rtc,
    id: Option<ParticipantId>,
    timeout: Instant,
    pending: Option<SdpPendingOffer>,
    audio: Option<Mid>,
    video: Option<Mid>,
    key_wanted: [bool; 3],
}

struct Histogram(Vec<u64>);

impl Histogram {
    fn percentile(&mut self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0.sort_unstable();
        let i = ((self.0.len() - 1) as f64 * p).round() as usize;
        Duration::from_nanos(self.0[i])
    }
}

fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

fn allocated() -> anyhow::Result<usize> {
    tikv_jemalloc_ctl::epoch::advance().map_err(|e| anyhow::anyhow!("jemalloc epoch: {e}"))?;
    tikv_jemalloc_ctl::stats::allocated::read().map_err(|e| anyhow::anyhow!("jemalloc: {e}"))
}

fn is_rtp(d: &[u8]) -> bool {
    d.len() >= 12 && (128..192).contains(&d[0]) && !(72..=76).contains(&(d[1] & 0x7f))
}

/// A publisher writes the audio packet and video frames (every layer) that are due.
fn write_media(
    peer: &mut Peer,
    now: Instant,
    stamp: u64,
    audio_due: bool,
    video_due: bool,
    audio_ts: u64,
    video_ts: u64,
) {
    if audio_due && let Some(mid) = peer.audio {
        let mut payload = b"TS".to_vec();
        payload.extend_from_slice(&stamp.to_be_bytes());
        payload.resize(80, 0xaa);
        if let Some(w) = peer.rtc.writer(mid) {
            let pt = w
                .payload_params()
                .find(|p| p.spec().codec == Codec::Opus)
                .map(|p| p.pt());
            let Some(pt) = pt else {
                return;
            };
            let _ = w.audio_level(-30, true).write(
                pt,
                now,
                MediaTime::new(audio_ts, Frequency::FORTY_EIGHT_KHZ),
                payload,
            );
        }
    }
    if video_due && let Some(mid) = peer.video {
        for (l, (rid, w, h, size)) in LAYERS.into_iter().enumerate() {
            let key = peer.key_wanted[l];
            let mut frame = Vec::with_capacity(size);
            if key {
                frame.extend_from_slice(&[0x10, 0, 0, 0x9d, 0x01, 0x2a]);
                frame.extend_from_slice(&w.to_le_bytes());
                frame.extend_from_slice(&h.to_le_bytes());
            } else {
                frame.extend_from_slice(&[0x11, 0, 0]);
            }
            frame.extend_from_slice(b"TS");
            frame.extend_from_slice(&stamp.to_be_bytes());
            frame.resize(size, 0x55);
            let Some(writer) = peer.rtc.writer(mid) else {
                break;
            };
            let Some(pt) = writer
                .payload_params()
                .find(|p| p.spec().codec == Codec::Vp8)
                .map(|p| p.pt())
            else {
                break;
            };
            if writer
                .rid(Rid::from(rid))
                .write(pt, now, MediaTime::from_90khz(video_ts), frame)
                .is_ok()
            {
                peer.key_wanted[l] = false;
            }
        }
    }
}

/// The SFU plus the accounting of the time spent in it.
struct Measured {
    sfu: Sfu,
    cpu: Duration,
    outputs: Vec<(SocketAddr, Vec<u8>)>,
    rtp_out: u64,
    timeout: Instant,
}

impl Measured {
    /// Drains the SFU's outputs into `self.outputs` (not timed by itself).
    fn drain(&mut self) {
        loop {
            match self.sfu.poll_output() {
                SfuOutput::Transmit(d) => {
                    if is_rtp(&d.contents) {
                        self.rtp_out += 1;
                    }
                    self.outputs.push((d.destination, d.contents));
                }
                SfuOutput::Event(_) => {}
                SfuOutput::Timeout(t) => {
                    self.timeout = t;
                    return;
                }
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.udp {
        return udp::run(&args);
    }
    let start = Instant::now();
    let sfu_addr = SocketAddr::new(LOCALHOST, 3479);
    let mut config = SfuConfig::new(SECRET, vec![sfu_addr]);
    config.max_participants_per_room = args.publishers + args.subscribers + 1;
    config.max_participants = config.max_participants_per_room;
    config.send_buffer_video = args.send_buffer_video;
    let mut m = Measured {
        sfu: Sfu::new(config, start),
        cpu: Duration::ZERO,
        outputs: Vec::new(),
        rtp_out: 0,
        timeout: start,
    };

    // Peers and their offers first, so that the memory read around the joins is the SFU's.
    let total = args.publishers + args.subscribers;
    let mut peers = Vec::with_capacity(total);
    let mut offers = Vec::with_capacity(total);
    for i in 0..total {
        let addr = SocketAddr::new(LOCALHOST, 20_000 + i as u16);
        let mut rtc = Rtc::builder().build(start);
        rtc.add_local_candidate(Candidate::host(addr, "udp")?);
        let mut api = rtc.sdp_api();
        let (mut audio, mut video) = (None, None);
        if i < args.publishers {
            audio = Some(api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None));
            let mut sim = Simulcast::new();
            for (rid, ..) in LAYERS {
                sim.add_send_layer(SimulcastLayer::new(rid));
            }
            video =
                Some(api.add_media(MediaKind::Video, Direction::SendOnly, None, None, Some(sim)));
        } else {
            for _ in 0..args.publishers {
                api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
                api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
            }
        }
        let (offer, pending) = api.apply().context("an offer")?;
        offers.push(offer.to_sdp_string());
        peers.push(Peer {
            addr,
            rtc,
            id: None,
            timeout: start,
            pending: Some(pending),
            audio,
            video,
            key_wanted: [true; 3],
        });
    }
    let before_join = allocated()?;
    let expiry = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
    let mut answers = Vec::with_capacity(total);
    for (i, offer) in offers.iter().enumerate() {
        let name = format!("p{i}");
        let cred = credential::issue(
            SECRET,
            &Claims {
                tenant: "t".into(),
                call: "c".into(),
                participant: name.clone(),
                expiry,
            },
        );
        let now = Instant::now();
        let now_unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let id = m.sfu.join(now, now_unix, "t", "c", &name, &cred)?;
        answers.push(m.sfu.apply_offer(now, id, offer)?);
        peers[i].id = Some(id);
    }
    let after_join = allocated()?;
    m.drain();
    for (peer, answer) in peers.iter_mut().zip(answers) {
        let answer = SdpAnswer::from_sdp_string(&answer)?;
        let pending = peer.pending.take().context("pending")?;
        peer.rtc.sdp_api().accept_answer(pending, answer)?;
    }
    let index: HashMap<SocketAddr, usize> =
        peers.iter().enumerate().map(|(i, p)| (p.addr, i)).collect();

    // The run: connect, warm up, measure.
    let mut to_sfu: VecDeque<(SocketAddr, Vec<u8>)> = VecDeque::new();
    let mut processing = Histogram(Vec::new());
    let mut e2e = Histogram(Vec::new());
    let audio_every = Duration::from_millis(20);
    let video_every = Duration::from_secs(1) / args.fps;
    let (mut next_audio, mut next_video) = (start, start);
    let (mut audio_ts, mut video_ts) = (0u64, 0u64);
    let connect_deadline = Instant::now() + Duration::from_secs(20);
    let mut measuring_since: Option<(Instant, Duration, u64, u64)> = None;
    let mut media_since: Option<Instant> = None;
    let end_of_run;
    loop {
        let now = Instant::now();
        if media_since.is_none() {
            if peers.iter().all(|p| p.rtc.is_connected()) {
                media_since = Some(now);
                next_audio = now;
                next_video = now;
                println!(
                    "{} peers connected in {:.1} s",
                    total,
                    (now - start).as_secs_f64()
                );
            } else if now > connect_deadline {
                bail!("peers did not connect within 20 s");
            }
        }
        if let Some(since) = media_since {
            if measuring_since.is_none() && now >= since + Duration::from_secs(args.warmup) {
                let s = m.sfu.stats();
                measuring_since = Some((now, m.cpu, m.rtp_out, s.forwarded_packets));
                processing.0.clear();
                e2e.0.clear();
            }
            if let Some((t0, ..)) = measuring_since
                && now >= t0 + Duration::from_secs(args.seconds)
            {
                end_of_run = now;
                break;
            }
            // Publishers write what is due.
            let stamp = (now - start).as_nanos() as u64;
            let audio_due = now >= next_audio;
            let video_due = now >= next_video;
            if audio_due {
                next_audio += audio_every;
                audio_ts += 960;
            }
            if video_due {
                next_video += video_every;
                video_ts += u64::from(90_000 / args.fps);
            }
            for peer in peers.iter_mut().take(args.publishers) {
                write_media(peer, now, stamp, audio_due, video_due, audio_ts, video_ts);
            }
        }

        // Peers: timers, outputs, events.
        for peer in peers.iter_mut() {
            if peer.timeout <= now {
                let _ = peer.rtc.handle_input(Input::Timeout(now));
            }
            loop {
                match peer.rtc.poll_output() {
                    Ok(Output::Timeout(t)) => {
                        peer.timeout = t;
                        break;
                    }
                    Ok(Output::Transmit(t)) => to_sfu.push_back((peer.addr, t.contents.into())),
                    Ok(Output::Event(Event::MediaData(d))) => {
                        if let Some(at) = d.data.windows(2).take(16).position(|w| w == b"TS")
                            && let Some(bytes) = d.data.get(at + 2..at + 10)
                        {
                            let sent = u64::from_be_bytes(bytes.try_into().expect("8 bytes"));
                            let got = (Instant::now() - start).as_nanos() as u64;
                            e2e.0.push(got.saturating_sub(sent));
                        }
                    }
                    Ok(Output::Event(Event::KeyframeRequest(r))) => {
                        let rid = r.rid.map(|r| r.to_string()).unwrap_or_default();
                        if let Some(l) = LAYERS.iter().position(|(x, ..)| *x == rid) {
                            peer.key_wanted[l] = true;
                        }
                    }
                    Ok(Output::Event(_)) => {}
                    Err(e) => {
                        eprintln!("peer: {e}");
                        peer.timeout = now + Duration::from_millis(10);
                        break;
                    }
                }
            }
        }

        // The SFU: every queued datagram, then its timers. Only this part is timed.
        while let Some((source, data)) = to_sfu.pop_front() {
            let rtp = is_rtp(&data);
            let (t0, c0) = (Instant::now(), thread_cpu());
            m.sfu.handle_datagram(t0, source, &data);
            m.drain();
            let (t1, c1) = (Instant::now(), thread_cpu());
            m.cpu += c1 - c0;
            if rtp {
                processing.0.push((t1 - t0).as_nanos() as u64);
            }
        }
        let now = Instant::now();
        if m.timeout <= now {
            let c0 = thread_cpu();
            m.sfu.handle_timeout(now);
            m.drain();
            m.cpu += thread_cpu() - c0;
        }
        // Deliver the SFU's datagrams.
        for (destination, data) in m.outputs.drain(..) {
            let Some(&i) = index.get(&destination) else {
                continue;
            };
            let peer = &mut peers[i];
            if let Ok(r) = Receive::new(Protocol::Udp, sfu_addr, peer.addr, &data) {
                let _ = peer.rtc.handle_input(Input::Receive(Instant::now(), r));
            }
        }
        // Sleep until something is due when idle.
        if to_sfu.is_empty() {
            let mut wake = m.timeout;
            for p in &peers {
                wake = wake.min(p.timeout);
            }
            if media_since.is_some() {
                wake = wake.min(next_audio).min(next_video);
            }
            let now = Instant::now();
            if wake > now {
                std::thread::sleep((wake - now).min(Duration::from_millis(2)));
            }
        }
    }

    let (t0, cpu0, rtp0, fwd0) = measuring_since.context("measured")?;
    let wall = (end_of_run - t0).as_secs_f64();
    let cpu = (m.cpu - cpu0).as_secs_f64();
    let rtp = m.rtp_out - rtp0;
    let stats = m.sfu.stats();
    let forwarded = stats.forwarded_packets - fwd0;
    let in_run = allocated()?;
    let now = Instant::now();
    for peer in peers.iter().skip(args.publishers) {
        m.sfu.leave(now, peer.id.expect("joined"))?;
    }
    m.drain();
    m.outputs.clear();
    let after_leave = allocated()?;

    let per_sec = rtp as f64 / wall;
    println!(
        "publishers {} × (Opus 50 pkt/s + VP8 simulcast q/h/f at {} fps), subscribers {}, video send buffer {} packets",
        args.publishers, args.fps, args.subscribers, args.send_buffer_video
    );
    println!(
        "measured {:.1} s: {} RTP datagrams out to subscribers ({:.0}/s), {} packets forwarded by the core's count",
        wall, rtp, per_sec, forwarded
    );
    println!(
        "SFU thread CPU {:.2} s ({:.0}% of one core) → {:.0} forwarded RTP datagrams per CPU second",
        cpu,
        100.0 * cpu / wall,
        rtp as f64 / cpu
    );
    println!(
        "processing per input RTP datagram: p50 {:?}, p99 {:?} ({} samples)",
        processing.percentile(0.5),
        processing.percentile(0.99),
        processing.0.len()
    );
    println!(
        "end-to-end frame latency publisher → subscriber (both str0m ends + SFU, one thread): p50 {:?}, p99 {:?} ({} frames)",
        e2e.percentile(0.5),
        e2e.percentile(0.99),
        e2e.0.len()
    );
    let n = args.subscribers.max(1) as f64;
    println!(
        "SFU memory per subscriber: {:.1} KiB after join + offer (idle), {:.1} KiB after the run",
        (after_join.saturating_sub(before_join)) as f64 / total as f64 / 1024.0,
        (in_run.saturating_sub(after_leave)) as f64 / n / 1024.0
    );
    println!(
        "keyframe requests sent to publishers: {}, datagrams dropped: {}",
        stats.keyframe_requests, stats.dropped_datagrams
    );
    Ok(())
}

/// `--udp`: the real driver (`SfuServer`: one UDP socket, one tokio task) in a thread of its
/// own, peers with their own UDP sockets on 127.0.0.1 in the main thread. Forwarded datagrams
/// per CPU second are the RTP datagrams the subscribers' sockets received, divided by the CPU
/// time of the driver's thread (from `/proc/self/task/<tid>/stat`), which includes the socket
/// system calls. Latency is end to end (publisher write → subscriber frame, sockets included).
mod udp {
    use std::net::UdpSocket;
    use std::sync::mpsc;

    use parley_sfu::{ListenConfig, SfuServer};

    use super::*;

    /// User + system CPU time of one thread of this process.
    fn task_cpu(tid: i32) -> anyhow::Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))?;
        let after = stat.rsplit_once(')').context("stat")?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 of the line (utime, stime) are 12 and 13 after the ')'.
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        // The kernel's USER_HZ is 100 on Linux.
        Ok(Duration::from_millis(ticks * 10))
    }

    pub(super) fn run(args: &Args) -> anyhow::Result<()> {
        let start = Instant::now();
        let total = args.publishers + args.subscribers;
        let mut config = SfuConfig::new(SECRET, vec![]);
        config.max_participants_per_room = total + 1;
        config.max_participants = total + 1;
        config.send_buffer_video = args.send_buffer_video;
        // The driver's thread: a current-thread runtime that owns the SFU task.
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("sfu-driver".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                // "/proc/thread-self" links to "<pid>/task/<tid>".
                let tid: i32 = std::fs::read_link("/proc/thread-self")
                    .ok()
                    .and_then(|l| l.file_name()?.to_str()?.parse().ok())
                    .expect("this thread's id");
                rt.block_on(async move {
                    let listen = ListenConfig {
                        listen: SocketAddr::new(LOCALHOST, 0),
                        announce: vec![],
                    };
                    let server = SfuServer::start(listen, config).await.expect("SFU");
                    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
                    tx.send((
                        server.handle(),
                        tid,
                        tokio::runtime::Handle::current(),
                        stop_tx,
                    ))
                    .expect("main thread");
                    let _ = stop_rx.await;
                    drop(server);
                });
            })?;
        let (handle, tid, rt, stop) = rx.recv()?;
        let sfu_addr = handle.local_addr();

        let mut peers = Vec::with_capacity(total);
        let mut sockets = Vec::with_capacity(total);
        let mut offers = Vec::with_capacity(total);
        for i in 0..total {
            let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
            socket.set_nonblocking(true)?;
            let addr = socket.local_addr()?;
            let mut rtc = Rtc::builder().build(start);
            rtc.add_local_candidate(Candidate::host(addr, "udp")?);
            let mut api = rtc.sdp_api();
            let (mut audio, mut video) = (None, None);
            if i < args.publishers {
                audio =
                    Some(api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None));
                let mut sim = Simulcast::new();
                for (rid, ..) in LAYERS {
                    sim.add_send_layer(SimulcastLayer::new(rid));
                }
                video = Some(api.add_media(
                    MediaKind::Video,
                    Direction::SendOnly,
                    None,
                    None,
                    Some(sim),
                ));
            } else {
                for _ in 0..args.publishers {
                    api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
                    api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
                }
            }
            let (offer, pending) = api.apply().context("an offer")?;
            offers.push(offer.to_sdp_string());
            sockets.push(socket);
            peers.push(Peer {
                addr,
                rtc,
                id: None,
                timeout: start,
                pending: Some(pending),
                audio,
                video,
                key_wanted: [true; 3],
            });
        }
        let expiry = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
        for (i, offer) in offers.iter().enumerate() {
            let name = format!("p{i}");
            let cred = credential::issue(
                SECRET,
                &Claims {
                    tenant: "t".into(),
                    call: "c".into(),
                    participant: name.clone(),
                    expiry,
                },
            );
            let (id, answer) = rt.block_on(async {
                let id = handle.join("t", "c", &name, &cred).await?;
                let answer = handle.apply_offer(id, offer).await?;
                Ok::<_, parley_sfu::SfuError>((id, answer))
            })?;
            let peer = &mut peers[i];
            peer.id = Some(id);
            let pending = peer.pending.take().context("pending")?;
            peer.rtc
                .sdp_api()
                .accept_answer(pending, SdpAnswer::from_sdp_string(&answer)?)?;
        }

        let mut e2e = Histogram(Vec::new());
        let audio_every = Duration::from_millis(20);
        let video_every = Duration::from_secs(1) / args.fps;
        let (mut next_audio, mut next_video) = (start, start);
        let (mut audio_ts, mut video_ts) = (0u64, 0u64);
        let connect_deadline = Instant::now() + Duration::from_secs(20);
        let mut measuring_since: Option<(Instant, Duration, u64)> = None;
        let mut media_since: Option<Instant> = None;
        let mut rtp_in = 0u64;
        let mut buf = vec![0u8; 2048];
        let end_of_run;
        loop {
            let now = Instant::now();
            if media_since.is_none() {
                if peers.iter().all(|p| p.rtc.is_connected()) {
                    media_since = Some(now);
                    next_audio = now;
                    next_video = now;
                    println!(
                        "{total} peers connected over UDP in {:.1} s",
                        (now - start).as_secs_f64()
                    );
                } else if now > connect_deadline {
                    bail!("peers did not connect within 20 s");
                }
            }
            if let Some(since) = media_since {
                if measuring_since.is_none() && now >= since + Duration::from_secs(args.warmup) {
                    measuring_since = Some((now, task_cpu(tid)?, rtp_in));
                    e2e.0.clear();
                }
                if let Some((t0, ..)) = measuring_since
                    && now >= t0 + Duration::from_secs(args.seconds)
                {
                    end_of_run = now;
                    break;
                }
                let stamp = (now - start).as_nanos() as u64;
                let audio_due = now >= next_audio;
                let video_due = now >= next_video;
                if audio_due {
                    next_audio += audio_every;
                    audio_ts += 960;
                }
                if video_due {
                    next_video += video_every;
                    video_ts += u64::from(90_000 / args.fps);
                }
                for peer in peers.iter_mut().take(args.publishers) {
                    write_media(peer, now, stamp, audio_due, video_due, audio_ts, video_ts);
                }
            }
            let mut busy = false;
            for (i, (peer, socket)) in peers.iter_mut().zip(&sockets).enumerate() {
                // What arrived from the SFU.
                while let Ok((n, from)) = socket.recv_from(&mut buf) {
                    busy = true;
                    if i >= args.publishers && is_rtp(&buf[..n]) {
                        rtp_in += 1;
                    }
                    if let Ok(r) = Receive::new(Protocol::Udp, from, peer.addr, &buf[..n]) {
                        let _ = peer.rtc.handle_input(Input::Receive(Instant::now(), r));
                    }
                }
                let now = Instant::now();
                if peer.timeout <= now {
                    let _ = peer.rtc.handle_input(Input::Timeout(now));
                }
                loop {
                    match peer.rtc.poll_output() {
                        Ok(Output::Timeout(t)) => {
                            peer.timeout = t;
                            break;
                        }
                        Ok(Output::Transmit(t)) => {
                            busy = true;
                            let _ = socket.send_to(&t.contents, sfu_addr);
                        }
                        Ok(Output::Event(Event::MediaData(d))) => {
                            if let Some(at) = d.data.windows(2).take(16).position(|w| w == b"TS")
                                && let Some(bytes) = d.data.get(at + 2..at + 10)
                            {
                                let sent = u64::from_be_bytes(bytes.try_into().expect("8 bytes"));
                                let got = (Instant::now() - start).as_nanos() as u64;
                                e2e.0.push(got.saturating_sub(sent));
                            }
                        }
                        Ok(Output::Event(Event::KeyframeRequest(r))) => {
                            let rid = r.rid.map(|r| r.to_string()).unwrap_or_default();
                            if let Some(l) = LAYERS.iter().position(|(x, ..)| *x == rid) {
                                peer.key_wanted[l] = true;
                            }
                        }
                        Ok(Output::Event(_)) => {}
                        Err(e) => {
                            eprintln!("peer: {e}");
                            peer.timeout = now + Duration::from_millis(10);
                            break;
                        }
                    }
                }
            }
            if !busy {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        let (t0, cpu0, rtp0) = measuring_since.context("measured")?;
        let wall = (end_of_run - t0).as_secs_f64();
        let cpu = (task_cpu(tid)? - cpu0).as_secs_f64();
        let rtp = rtp_in - rtp0;
        let stats = rt.block_on(handle.stats())?;
        let in_run = allocated()?;
        for peer in peers.iter().skip(args.publishers) {
            rt.block_on(handle.leave(peer.id.expect("joined")))?;
        }
        std::thread::sleep(Duration::from_millis(200));
        let after_leave = allocated()?;
        let _ = stop.send(());

        println!(
            "UDP driver: publishers {} × (Opus 50 pkt/s + VP8 simulcast q/h/f at {} fps), subscribers {}, video send buffer {} packets",
            args.publishers, args.fps, args.subscribers, args.send_buffer_video
        );
        println!(
            "measured {wall:.1} s: {rtp} RTP datagrams received by the subscribers' sockets ({:.0}/s)",
            rtp as f64 / wall
        );
        println!(
            "driver thread CPU {cpu:.2} s ({:.0}% of one core, sockets included) → {:.0} forwarded RTP datagrams per CPU second",
            100.0 * cpu / wall,
            rtp as f64 / cpu.max(0.01)
        );
        println!(
            "end-to-end frame latency publisher → subscriber (sockets, driver, both str0m ends): p50 {:?}, p99 {:?} ({} frames)",
            e2e.percentile(0.5),
            e2e.percentile(0.99),
            e2e.0.len()
        );
        println!(
            "SFU memory per subscriber after the run: {:.1} KiB",
            (in_run.saturating_sub(after_leave)) as f64 / args.subscribers.max(1) as f64 / 1024.0
        );
        println!(
            "keyframe requests sent to publishers: {}, datagrams dropped: {}",
            stats.keyframe_requests, stats.dropped_datagrams
        );
        Ok(())
    }
}
