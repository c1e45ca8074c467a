//! Loss and retransmission through the real SFU: a publisher and a subscriber reach the SFU
//! through UDP relays on 127.0.0.1 that drop every 20th video RTP packet (5 %), the publisher's
//! on the way up and the subscriber's on the way down. The subscriber must still get every
//! packet the relay dropped on its side, which only a retransmission can bring (the relay
//! never drops RTX), and the relays count the RTX packets each side sent: the SFU answers the
//! subscriber's NACKs with RTX, and NACKs what it lost of the publisher's media itself.

mod common;

use std::time::Duration;

use common::proxy::{Proxy, VideoPts};
use common::{CALL, Client, ClientConfig, TENANT, TestSfu, credential};

/// Joins `client` through `proxy`: the answer's candidate is the relay's address.
async fn connect_via(sfu: &TestSfu, client: &Client, proxy: &Proxy) -> anyhow::Result<()> {
    let id = sfu
        .handle
        .join(TENANT, CALL, &client.name, &credential(&client.name))
        .await?;
    let offer = client.offer(0, 0).await?;
    let pts = VideoPts::vp8(&offer).expect("the offer has VP8 with RTX");
    let answer = sfu.handle.apply_offer(id, &offer).await?;
    assert_eq!(
        VideoPts::vp8(&answer),
        Some(pts),
        "the SFU's answer keeps VP8 and its RTX payload type:\n{answer}"
    );
    proxy.watch(pts);
    let answer = proxy.rewrite_answer(&answer, sfu.handle.local_addr());
    client.accept_answer(&answer).await?;
    client.wait_connected().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_video_packets_are_nacked_and_retransmitted_both_ways() -> anyhow::Result<()> {
    let sfu = TestSfu::start(true).await;
    let publisher = Client::new("pub", ClientConfig::publisher(-30)).await;
    let sub = Client::new("sub", ClientConfig::receiver(1)).await;
    let sfu_addr = sfu.handle.local_addr();
    let pub_link = Proxy::start(sfu_addr).await;
    let sub_link = Proxy::start(sfu_addr).await;
    connect_via(&sfu, &publisher, &pub_link).await?;
    connect_via(&sfu, &sub, &sub_link).await?;
    pub_link.lose(20, 0);
    sub_link.lose(0, 20);
    publisher.start_media();

    // About 6 s of media (three layers up, one down), then no more loss and a moment for the
    // last repairs.
    tokio::time::sleep(Duration::from_secs(6)).await;
    pub_link.lose(0, 0);
    sub_link.lose(0, 0);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Down: every packet the relay dropped on the way to the subscriber arrived after all.
    let down = sub_link.down();
    let received = sub.received();
    let video = received
        .values()
        .find(|m| m.sources.keys().any(|s| s.starts_with("pub/v/")))
        .expect("the subscriber received the publisher's video");
    let missing: Vec<u16> = down
        .dropped
        .iter()
        .copied()
        .filter(|seq| !video.seqs.contains(seq))
        .collect();
    eprintln!(
        "down: {} video packets, {} dropped, {} RTX ({} of them padding), {} frames delivered; \
         up: {} video packets, {} dropped, {} RTX",
        down.video,
        down.dropped.len(),
        down.rtx,
        down.rtx_padding,
        video.frames,
        pub_link.up().video,
        pub_link.up().dropped.len(),
        pub_link.up().rtx,
    );
    assert!(
        down.dropped.len() >= 8,
        "the relay dropped video on the way down: {down:?}"
    );
    assert!(
        missing.is_empty(),
        "{} of {} packets dropped on the way to the subscriber never arrived (not \
         retransmitted): {missing:?}",
        missing.len(),
        down.dropped.len()
    );
    let resent = down.rtx - down.rtx_padding;
    assert!(
        resent >= down.dropped.len() as u64,
        "the SFU sent at least one RTX packet per loss: {down:?}"
    );

    // Up: the SFU asked the publisher for what it lost; the publisher (no bandwidth
    // estimation, so no probing padding) sends RTX only when NACKed.
    let up = pub_link.up();
    assert!(
        up.dropped.len() >= 8,
        "the relay dropped the publisher's video: {up:?}"
    );
    assert!(
        up.rtx >= up.dropped.len() as u64 * 9 / 10,
        "the publisher retransmitted what the SFU lost (the SFU NACKed): {up:?}"
    );
    // And the subscriber got the layer it receives without holes: every frame it was sent
    // was complete (str0m yields only complete frames), and frames kept coming.
    assert!(
        video.frames >= 50,
        "video kept flowing under loss: {video:?}"
    );
    Ok(())
}
