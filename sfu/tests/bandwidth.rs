//! A simulcast switch under a real bandwidth cap: a subscriber reaches the SFU through a small
//! UDP shaping proxy on 127.0.0.1 that limits the SFU→subscriber direction. The SFU's bandwidth
//! estimate (str0m's TWCC BWE) falls, the layer allocation moves the subscriber down, and when
//! the cap lifts the estimate climbs and the subscriber moves back up. The frames' source tags
//! show which layer really arrived.

mod common;

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{CALL, Client, ClientConfig, TENANT, TestSfu, credential};
use parley_sfu::{ParticipantId, SfuEvent};
use tokio::net::UdpSocket;

/// A UDP relay between one client and the SFU. Client→SFU passes at once; SFU→client passes
/// through a token bucket of `rate` bytes/s (0: no limit) with a queue of at most `QUEUE`
/// bytes; what does not fit is dropped, as on a congested link.
struct Shaper {
    addr: SocketAddr,
    rate: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Shaper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const QUEUE: usize = 20_000;

impl Shaper {
    async fn start(sfu: SocketAddr) -> Shaper {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = socket.local_addr().unwrap();
        let rate = Arc::new(AtomicU64::new(0));
        let r = rate.clone();
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
                            }
                        } else {
                            client = Some(from);
                            let _ = socket.send_to(&buf[..n], sfu).await;
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
                    let _ = socket.send_to(&d, to).await;
                }
            }
        });
        Shaper { addr, rate, task }
    }

    fn cap(&self, bits_per_second: u64) {
        self.rate.store(bits_per_second / 8, Ordering::Relaxed);
    }
}

/// The subscriber's latest layer of the publisher's video, from the SFU's events.
fn layer_of(sfu: &TestSfu, subscriber: ParticipantId) -> Option<String> {
    sfu.events().iter().rev().find_map(|e| match e {
        SfuEvent::LayerSwitched {
            subscriber: s,
            layer,
            ..
        } if *s == subscriber => Some(layer.clone().unwrap_or_default()),
        _ => None,
    })
}

async fn wait_layer(
    sfu: &TestSfu,
    subscriber: ParticipantId,
    what: &str,
    within: Duration,
    ok: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some(l) = layer_of(sfu, subscriber)
            && ok(&l)
        {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "no switch to {what} within {within:?}; switches: {:?}",
            sfu.events()
                .iter()
                .filter(|e| matches!(e, SfuEvent::LayerSwitched { .. }))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Frames of each layer that arrived at `client` so far.
fn frames_per_layer(client: &Client) -> [u64; 3] {
    let mut out = [0; 3];
    for stats in client.received().values() {
        for (source, n) in &stats.sources {
            for (i, rid) in ["q", "h", "f"].iter().enumerate() {
                if source == &format!("pub/v/{rid}") {
                    out[i] += n;
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_capped_by_its_estimate_moves_down_a_layer_and_back_up() -> anyhow::Result<()>
{
    let sfu = TestSfu::start(true).await;
    let publisher = Client::new(
        "pub",
        ClientConfig {
            audio: true,
            video: true,
            recv_audio: 0,
            recv_video: 0,
            audio_level: -30,
        },
    )
    .await;
    sfu.connect(&publisher).await?;
    // The subscriber reaches the SFU only through the shaper: the answer's candidate is
    // rewritten to the shaper's address.
    let sub = Client::new(
        "sub",
        ClientConfig {
            audio: false,
            video: false,
            recv_audio: 1,
            recv_video: 1,
            audio_level: -127,
        },
    )
    .await;
    let shaper = Shaper::start(sfu.handle.local_addr()).await;
    let id = sfu
        .handle
        .join(TENANT, CALL, "sub", &credential("sub"))
        .await?;
    let offer = sub.offer(0, 0).await?;
    let answer = sfu.handle.apply_offer(id, &offer).await?;
    let sfu_addr = sfu.handle.local_addr();
    let answer = answer.replace(
        &format!("{} {}", sfu_addr.ip(), sfu_addr.port()),
        &format!("{} {}", shaper.addr.ip(), shaper.addr.port()),
    );
    sub.accept_answer(&answer).await?;
    sub.wait_connected().await?;
    publisher.start_media();

    // Unlimited: the best layer (the synthetic f is about 300 kbit/s).
    wait_layer(&sfu, id, "f", Duration::from_secs(10), |l| l == "f").await;
    let before_cap = frames_per_layer(&sub);
    assert!(before_cap[2] > 0, "f frames arrived: {before_cap:?}");

    // Capped at 120 kbit/s: audio (≈40 kbit/s reserved) plus f does not fit any more.
    shaper.cap(120_000);
    let low = wait_layer(&sfu, id, "a lower layer", Duration::from_secs(20), |l| {
        l == "q" || l == "h"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let capped_start = frames_per_layer(&sub);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let capped_end = frames_per_layer(&sub);
    assert_eq!(
        capped_end[2], capped_start[2],
        "no f frame arrives while capped (switched to {low})"
    );
    let lower = if low == "q" { 0 } else { 1 };
    assert!(
        capped_end[lower] > capped_start[lower],
        "{low} frames arrive while capped: {capped_start:?} -> {capped_end:?}"
    );

    // The cap lifts: the estimate climbs and the subscriber moves back up.
    shaper.cap(0);
    let back = wait_layer(
        &sfu,
        id,
        "a higher layer",
        Duration::from_secs(30),
        |l| match low.as_str() {
            "q" => l == "h" || l == "f",
            _ => l == "f",
        },
    )
    .await;
    let after = frames_per_layer(&sub);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = frames_per_layer(&sub);
    let idx = if back == "f" { 2 } else { 1 };
    assert!(
        later[idx] > after[idx],
        "{back} frames arrive after the cap lifted: {after:?} -> {later:?}"
    );
    Ok(())
}
