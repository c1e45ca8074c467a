//! A UDP relay between one client and the SFU on 127.0.0.1, standing in for the network: the
//! SFU→client direction can be rate-limited (a token bucket with a bounded queue, as a
//! congested link), and either direction can lose a deterministic share of the video RTP
//! packets. It reads what SRTP leaves in the clear (the RTP header: payload type, sequence
//! number, SSRC) to count media and retransmissions (RTX) per direction.
//!
//! The client reaches the SFU only through the relay: the SFU's answer is rewritten
//! ([`Proxy::rewrite_answer`]) so that its one candidate is the relay's address.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

/// The largest SFU→client backlog the rate-limited link holds (bytes); what does not fit is
/// dropped, as on a congested link.
pub const QUEUE: usize = 20_000;

/// The payload types of the video codec and of its retransmissions, from the SDP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VideoPts {
    pub media: u8,
    pub rtx: u8,
}

impl VideoPts {
    /// VP8's payload type and the RTX payload type that repairs it (`a=fmtp:<rtx> apt=<vp8>`),
    /// from an offer or answer (the answerer uses the offerer's numbers).
    pub fn vp8(sdp: &str) -> Option<VideoPts> {
        let media = sdp.lines().find_map(|l| {
            let rest = l.trim().strip_prefix("a=rtpmap:")?;
            let (pt, codec) = rest.split_once(' ')?;
            codec
                .to_ascii_uppercase()
                .starts_with("VP8/")
                .then(|| pt.parse::<u8>().ok())?
        })?;
        let rtx = sdp.lines().find_map(|l| {
            let rest = l.trim().strip_prefix("a=fmtp:")?;
            let (pt, params) = rest.split_once(' ')?;
            (params.trim() == format!("apt={media}")).then(|| pt.parse::<u8>().ok())?
        })?;
        Some(VideoPts { media, rtx })
    }
}

/// What crossed the relay in one direction.
#[derive(Debug, Clone, Default)]
pub struct Direction {
    /// Video RTP packets (media payload type) passed on.
    pub video: u64,
    /// Sequence numbers of the video packets the relay dropped on purpose.
    pub dropped: Vec<u16>,
    /// RTP packets with the RTX payload type passed on (retransmissions, and str0m's probing
    /// padding, which also travels on the RTX stream).
    pub rtx: u64,
    /// Of those, packets with the RTP padding bit: blank probes, not retransmissions.
    pub rtx_padding: u64,
    /// Datagrams the rate-limited queue had no room for (SFU→client only).
    pub overflow: u64,
}

#[derive(Debug, Default)]
struct Shared {
    pts: Option<VideoPts>,
    /// Drop one video packet in this many, per direction (0: none).
    lose_up: u64,
    lose_down: u64,
    up: Direction,
    down: Direction,
}

pub struct Proxy {
    pub addr: SocketAddr,
    rate: Arc<AtomicU64>,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An RTP (not RTCP) packet's payload type, sequence number and padding bit.
fn rtp_header(d: &[u8]) -> Option<(u8, u16, bool)> {
    if d.len() < 12 || d[0] >> 6 != 2 || (192..=223).contains(&d[1]) {
        return None;
    }
    Some((
        d[1] & 0x7f,
        u16::from_be_bytes([d[2], d[3]]),
        d[0] & 0x20 != 0,
    ))
}

impl Shared {
    /// Counts a datagram; `false`: drop it.
    fn pass(&mut self, up: bool, d: &[u8]) -> bool {
        let Some(pts) = self.pts else { return true };
        let Some((pt, seq, padding)) = rtp_header(d) else {
            return true;
        };
        let lose = if up { self.lose_up } else { self.lose_down };
        let dir = if up { &mut self.up } else { &mut self.down };
        if pt == pts.rtx {
            dir.rtx += 1;
            if padding {
                dir.rtx_padding += 1;
            }
        } else if pt == pts.media {
            dir.video += 1;
            if lose > 0 && dir.video % lose == 0 {
                dir.dropped.push(seq);
                return false;
            }
        }
        true
    }
}

impl Proxy {
    pub async fn start(sfu: SocketAddr) -> Proxy {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = socket.local_addr().unwrap();
        let rate = Arc::new(AtomicU64::new(0));
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (r, sh) = (rate.clone(), shared.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let mut client: Option<SocketAddr> = None;
            let mut queue: VecDeque<Vec<u8>> = VecDeque::new();
            let mut queued = 0usize;
            let mut tokens = 0f64;
            let mut last = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            loop {
                tokio::select! {
                    got = socket.recv_from(&mut buf) => {
                        let Ok((n, from)) = got else { continue };
                        if from == sfu {
                            if queued + n <= QUEUE {
                                queued += n;
                                queue.push_back(buf[..n].to_vec());
                            } else {
                                sh.lock().unwrap().down.overflow += 1;
                            }
                        } else {
                            client = Some(from);
                            if sh.lock().unwrap().pass(true, &buf[..n]) {
                                let _ = socket.send_to(&buf[..n], sfu).await;
                            }
                        }
                    }
                    _ = tick.tick() => {}
                }
                let now = Instant::now();
                let rate = r.load(Ordering::Relaxed) as f64;
                if rate == 0.0 {
                    tokens = f64::MAX;
                } else {
                    if tokens == f64::MAX {
                        tokens = 0.0;
                    }
                    tokens = (tokens + rate * now.duration_since(last).as_secs_f64()).min(3_000.0);
                }
                last = now;
                let Some(to) = client else { continue };
                while let Some(d) = queue.front() {
                    if (d.len() as f64) > tokens {
                        break;
                    }
                    if tokens != f64::MAX {
                        tokens -= d.len() as f64;
                    }
                    let d = queue.pop_front().unwrap();
                    queued -= d.len();
                    if sh.lock().unwrap().pass(false, &d) {
                        let _ = socket.send_to(&d, to).await;
                    }
                }
            }
        });
        Proxy {
            addr,
            rate,
            shared,
            task,
        }
    }

    /// Limits the SFU→client direction to `bits_per_second` (0: no limit).
    pub fn cap(&self, bits_per_second: u64) {
        self.rate.store(bits_per_second / 8, Ordering::Relaxed);
    }

    /// Which payload types are video and RTX (nothing is counted or lost before this).
    pub fn watch(&self, pts: VideoPts) {
        self.shared.lock().unwrap().pts = Some(pts);
    }

    /// Drops one video RTP packet in `every` (media payload type only, never a
    /// retransmission) from the client to the SFU (`up`) and from the SFU to the client
    /// (`down`); 0 loses nothing.
    pub fn lose(&self, up: u64, down: u64) {
        let mut s = self.shared.lock().unwrap();
        s.lose_up = up;
        s.lose_down = down;
    }

    /// Client→SFU counts.
    pub fn up(&self) -> Direction {
        self.shared.lock().unwrap().up.clone()
    }

    /// SFU→client counts.
    pub fn down(&self) -> Direction {
        self.shared.lock().unwrap().down.clone()
    }

    /// The SFU's answer with its candidate replaced by the relay's address.
    pub fn rewrite_answer(&self, answer: &str, sfu: SocketAddr) -> String {
        answer.replace(
            &format!("{} {}", sfu.ip(), sfu.port()),
            &format!("{} {}", self.addr.ip(), self.addr.port()),
        )
    }
}
