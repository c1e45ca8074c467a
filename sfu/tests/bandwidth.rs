//! A simulcast switch under a real bandwidth cap: a subscriber reaches the SFU through a small
//! UDP shaping proxy on 127.0.0.1 that limits the SFU→subscriber direction. The SFU's bandwidth
//! estimate (str0m's TWCC BWE) falls, the layer allocation moves the subscriber down, and when
//! the cap lifts the estimate climbs and the subscriber moves back up. The frames' source tags
//! show which layer really arrived.

mod common;

use std::time::{Duration, Instant};

use common::proxy::{Proxy, VideoPts};
use common::{CALL, Client, ClientConfig, TENANT, TestSfu, credential};
use parley_sfu::{ParticipantId, SfuEvent};

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

/// A publisher of synthetic simulcast (q ≈ 36, h ≈ 108, f ≈ 300 kbit/s of payload at 15 fps,
/// plus Opus ≈ 32 kbit/s) and a subscriber behind a shaping relay, connected and receiving `f`.
struct Setup {
    sfu: TestSfu,
    _publisher: Client,
    sub: Client,
    id: ParticipantId,
    link: Proxy,
}

async fn setup() -> anyhow::Result<Setup> {
    let sfu = TestSfu::start(true).await;
    let publisher = Client::new("pub", ClientConfig::publisher(-30)).await;
    sfu.connect(&publisher).await?;
    // The subscriber reaches the SFU only through the relay: the answer's candidate is
    // rewritten to the relay's address.
    let sub = Client::new("sub", ClientConfig::receiver(1)).await;
    let link = Proxy::start(sfu.handle.local_addr()).await;
    let id = sfu
        .handle
        .join(TENANT, CALL, "sub", &credential("sub"))
        .await?;
    let offer = sub.offer(0, 0).await?;
    link.watch(VideoPts::vp8(&offer).expect("VP8 in the offer"));
    let answer = sfu.handle.apply_offer(id, &offer).await?;
    sub.accept_answer(&link.rewrite_answer(&answer, sfu.handle.local_addr()))
        .await?;
    sub.wait_connected().await?;
    publisher.start_media();

    // Unlimited: the best layer.
    wait_layer(&sfu, id, "f", Duration::from_secs(10), |l| l == "f").await;
    // The layer is chosen before its first frame reaches the subscriber (a loaded machine may
    // take a while): wait for one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let before_cap = loop {
        let frames = frames_per_layer(&sub);
        if frames[2] > 0 || tokio::time::Instant::now() > deadline {
            break frames;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(before_cap[2] > 0, "f frames arrived: {before_cap:?}");
    Ok(Setup {
        sfu,
        _publisher: publisher,
        sub,
        id,
        link,
    })
}

fn switches(sfu: &TestSfu) -> Vec<SfuEvent> {
    sfu.events()
        .into_iter()
        .filter(|e| matches!(e, SfuEvent::LayerSwitched { .. }))
        .collect()
}

/// After the cap lifts, the estimate climbs and the subscriber moves above `low`; frames of the
/// new layer arrive.
async fn back_up(s: &Setup, low: &str) {
    s.link.cap(0);
    let back = wait_layer(
        &s.sfu,
        s.id,
        "a higher layer",
        Duration::from_secs(30),
        |l| match low {
            "q" => l == "h" || l == "f",
            _ => l == "f",
        },
    )
    .await;
    let after = frames_per_layer(&s.sub);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = frames_per_layer(&s.sub);
    let idx = if back == "f" { 2 } else { 1 };
    assert!(
        later[idx] > after[idx],
        "{back} frames arrive after the cap lifted: {after:?} -> {later:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_capped_by_its_estimate_moves_down_a_layer_and_back_up() -> anyhow::Result<()>
{
    let s = setup().await?;
    // Capped at 250 kbit/s: audio (≈40 kbit/s reserved) plus f (≈300 kbit/s) does not fit.
    s.link.cap(250_000);
    let low = wait_layer(
        &s.sfu,
        s.id,
        "a lower layer",
        Duration::from_secs(20),
        |l| l == "q" || l == "h",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let capped_start = frames_per_layer(&s.sub);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let capped_end = frames_per_layer(&s.sub);
    eprintln!("switches so far: {:?}", switches(&s.sfu));
    // While capped, the lower layers carry the video: the estimate oscillates around the cap,
    // so the SFU may probe f again for a moment, but most frames are q/h (15 fps of one layer
    // would be 30 frames in these 2 s).
    let f = capped_end[2] - capped_start[2];
    let lower = (capped_end[0] + capped_end[1]) - (capped_start[0] + capped_start[1]);
    assert!(
        lower >= 10 && lower > 2 * f,
        "q/h frames carry the video while capped (switched to {low}): {capped_start:?} -> {capped_end:?}"
    );
    back_up(&s, &low).await;
    Ok(())
}

/// At 120 kbit/s (q with audio fits, h does not) the subscriber ends on `q`, and `q`'s frames
/// arrive once what was queued of the higher layers has drained (str0m's pacer queue and the
/// relay's 20 KB buffer). When the cap lifts it moves back up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_120_kbit_cap_the_subscriber_ends_on_q_and_recovers() -> anyhow::Result<()> {
    let s = setup().await?;
    s.link.cap(120_000);
    let capped = Instant::now();
    wait_layer(&s.sfu, s.id, "q", Duration::from_secs(20), |l| l == "q").await;
    // q's frames arrive within a few seconds of the switch (what was queued of h/f drains
    // first), and then carry the video: over 3 s, at least 20 frames (15 fps of one layer
    // would be 45), far more than any brief probe of a higher layer brings.
    let deadline = Instant::now() + Duration::from_secs(10);
    let start = frames_per_layer(&s.sub);
    while frames_per_layer(&s.sub)[0] < start[0] + 10 {
        assert!(
            Instant::now() < deadline,
            "q frames did not arrive within 10 s of the switch: {start:?} -> {:?}; overflow {}",
            frames_per_layer(&s.sub),
            s.link.down().overflow
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let q_flowing = Instant::now();
    let a = frames_per_layer(&s.sub);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let b = frames_per_layer(&s.sub);
    let (q, higher) = (b[0] - a[0], (b[1] + b[2]) - (a[1] + a[2]));
    eprintln!(
        "capped: {a:?} -> {b:?}; switches {:?}; down {:?}",
        switches(&s.sfu),
        s.link.down()
    );
    assert!(
        q >= 20 && q > 2 * higher,
        "q carries the video under the cap: {a:?} -> {b:?}"
    );
    // The congestion lasts a while (the estimate settles near the cap) before it ends; the
    // subscriber stays on q throughout.
    tokio::time::sleep(
        (capped + Duration::from_secs(15)).saturating_duration_since(Instant::now()),
    )
    .await;
    assert_eq!(
        layer_of(&s.sfu, s.id).as_deref(),
        Some("q"),
        "still on q at the end of the capped period; switches: {:?}",
        switches(&s.sfu)
    );
    let lifted = Instant::now();
    back_up(&s, "q").await;
    eprintln!(
        "cap 120 kbit/s: q frames flowing {:?} after the cap, back up {:?} after it lifted",
        q_flowing.duration_since(capped),
        lifted.elapsed()
    );
    Ok(())
}
