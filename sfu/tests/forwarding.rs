//! The SFU with real WebRTC peers over UDP on 127.0.0.1: str0m clients publish synthetic VP8
//! simulcast and Opus through the real one-socket driver; every receiver checks, from the
//! source tags inside the frames, exactly which tracks reached it.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use common::{Client, ClientConfig, TestSfu};
use parley_sfu::{ParticipantId, SfuError, SfuEvent, TrackId, TrackKind, VideoPrefs};

/// How long media flows in each test.
const MEDIA: Duration = Duration::from_secs(3);

/// The tracks a participant published, from the SFU's events: (audio, video).
async fn tracks_of(sfu: &TestSfu, who: ParticipantId) -> anyhow::Result<(TrackId, TrackId)> {
    let find = |kind: TrackKind| {
        move |e: &SfuEvent| match e {
            SfuEvent::TrackPublished {
                publisher,
                track,
                kind: k,
                ..
            } if *publisher == who && *k == kind => Some(*track),
            _ => None,
        }
    };
    let audio = sfu
        .wait_event("audio published", find(TrackKind::Audio))
        .await?;
    let video = sfu
        .wait_event("video published", find(TrackKind::Video))
        .await?;
    Ok((audio, video))
}

/// The subscriber's slot mid carrying `track` (last binding wins).
fn bound_mid(sfu: &TestSfu, subscriber: ParticipantId, track: TrackId) -> Option<String> {
    sfu.events().iter().rev().find_map(|e| match e {
        SfuEvent::SubscriptionBound {
            subscriber: s,
            track: t,
            mid,
        } if *s == subscriber && *t == track => Some(mid.clone()),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publisher_reaches_eight_subscribers() -> anyhow::Result<()> {
    let sfu = TestSfu::start(true).await;
    let publisher_client = Client::new("pub", ClientConfig::publisher(-30)).await;
    let pub_id = sfu.connect(&publisher_client).await?;
    let (audio, video) = tracks_of(&sfu, pub_id).await?;

    // Four subscribers bring their receive slots in the first offer; four bring none and must
    // add them when the SFU asks (RenegotiationNeeded → a second offer).
    let mut subs = Vec::new();
    for i in 0..8 {
        let slots = if i < 4 { 1 } else { 0 };
        let c = Client::new(&format!("sub{i}"), ClientConfig::receiver(slots)).await;
        let id = sfu.connect(&c).await?;
        if slots == 0 {
            let (a, v) = sfu
                .wait_event("renegotiation needed", |e| match e {
                    SfuEvent::RenegotiationNeeded {
                        participant,
                        audio,
                        video,
                    } if *participant == id => Some((*audio, *video)),
                    _ => None,
                })
                .await?;
            assert_eq!((a, v), (1, 1), "sub{i} needs one slot of each kind");
            let offer = c.offer(a, v).await?;
            let answer = sfu.handle.apply_offer(id, &offer).await?;
            c.accept_answer(&answer).await?;
        }
        subs.push((c, id));
    }
    publisher_client.start_media();
    tokio::time::sleep(MEDIA).await;

    // Only the subscribers without slots were asked to renegotiate, once each.
    let asked: Vec<ParticipantId> = sfu
        .events()
        .iter()
        .filter_map(|e| match e {
            SfuEvent::RenegotiationNeeded { participant, .. } => Some(*participant),
            _ => None,
        })
        .collect();
    let without_slots: Vec<ParticipantId> = subs[4..].iter().map(|(_, id)| *id).collect();
    assert_eq!(asked, without_slots);

    for (c, id) in &subs {
        let received = c.received();
        let audio_mid = bound_mid(&sfu, *id, audio).expect("audio bound");
        let video_mid = bound_mid(&sfu, *id, video).expect("video bound");
        let a = received.get(&audio_mid).cloned().unwrap_or_default();
        let v = received.get(&video_mid).cloned().unwrap_or_default();
        // 50 packets/s for 3 s are sent; allow for connection set-up.
        assert!(a.packets >= 75, "{}: audio packets {a:?}", c.name);
        assert_eq!(
            a.sources.keys().collect::<Vec<_>>(),
            ["pub/a/"],
            "{}: audio sources",
            c.name
        );
        assert!(v.frames >= 15, "{}: video frames {v:?}", c.name);
        assert!(v.keyframes >= 1, "{}: no keyframe {v:?}", c.name);
        assert!(v.packets >= v.frames, "{}: {v:?}", c.name);
        assert!(
            v.sources.keys().all(|s| s.starts_with("pub/v/")),
            "{}: video sources {:?}",
            c.name,
            v.sources
        );
        // Nothing else arrived anywhere.
        assert_eq!(received.len(), 2, "{}: mids {:?}", c.name, received.keys());
    }
    // The publisher receives nothing (it has no slots and subscribes to nobody).
    assert!(publisher_client.received().is_empty());
    // Subscribers started from keyframes the SFU asked for.
    assert!(publisher_client.keyframe_requests() >= 1);
    let stats = sfu.handle.stats().await?;
    assert_eq!(stats.participants, 9);
    assert!(stats.forwarded_packets > 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_participants_receive_exactly_what_they_subscribed() -> anyhow::Result<()> {
    const N: usize = 6;
    let sfu = TestSfu::start(false).await;
    let mut clients = Vec::new();
    for i in 0..N {
        // Participant 0 talks loudly; the others are near silence.
        let level = if i == 0 { -20 } else { -80 };
        let mut config = ClientConfig::publisher(level);
        config.recv_audio = N - 1;
        config.recv_video = N - 1;
        let c = Client::new(&format!("p{i}"), config).await;
        let id = sfu.connect(&c).await?;
        clients.push((c, id));
    }
    let mut tracks = Vec::new();
    for (_, id) in &clients {
        tracks.push(tracks_of(&sfu, *id).await?);
    }
    // Each participant i subscribes to everyone's audio and video except (i+1)'s video and
    // (i+2)'s audio.
    let mut expected: Vec<BTreeSet<String>> = Vec::new();
    for (i, (_, id)) in clients.iter().enumerate() {
        let mut want = BTreeSet::new();
        for (j, (audio, video)) in tracks.iter().enumerate() {
            if j == i {
                continue;
            }
            if j != (i + 1) % N {
                sfu.handle
                    .subscribe(*id, *video, VideoPrefs::default())
                    .await?;
                want.insert(format!("p{j}/v"));
            }
            if j != (i + 2) % N {
                sfu.handle
                    .subscribe(*id, *audio, VideoPrefs::default())
                    .await?;
                want.insert(format!("p{j}/a"));
            }
        }
        expected.push(want);
    }
    // Subscribing to one's own track is refused.
    let (own_audio, _) = tracks[0];
    assert_eq!(
        sfu.handle
            .subscribe(clients[0].1, own_audio, VideoPrefs::default())
            .await,
        Err(SfuError::NotAllowed)
    );
    for (c, _) in &clients {
        c.start_media();
    }
    tokio::time::sleep(MEDIA).await;

    for (i, (c, id)) in clients.iter().enumerate() {
        let received = c.received();
        // Which (publisher, kind) came in, from the tags inside the frames.
        let got: BTreeSet<String> = c
            .sources()
            .iter()
            .map(|s| s.rsplit_once('/').unwrap().0.to_owned())
            .collect();
        assert_eq!(got, expected[i], "{}: tracks received", c.name);
        // Per subscribed track: enough packets, and keyframes for video, on its bound slot.
        for (j, (audio, video)) in tracks.iter().enumerate() {
            for (track, kind) in [(audio, "a"), (video, "v")] {
                let tag = format!("p{j}/{kind}");
                let mid = bound_mid(&sfu, *id, *track);
                if !expected[i].contains(&tag) {
                    assert!(mid.is_none(), "{}: {tag} bound but not subscribed", c.name);
                    continue;
                }
                let stats = received
                    .get(&mid.expect("subscribed track is bound"))
                    .cloned()
                    .unwrap_or_default();
                assert!(
                    stats.sources.keys().all(|s| s.starts_with(&tag)),
                    "{}: slot of {tag} carried {:?}",
                    c.name,
                    stats.sources
                );
                if kind == "a" {
                    assert!(stats.packets >= 75, "{}: {tag} {stats:?}", c.name);
                } else {
                    assert!(stats.frames >= 15, "{}: {tag} {stats:?}", c.name);
                    assert!(stats.keyframes >= 1, "{}: {tag} {stats:?}", c.name);
                }
            }
        }
    }
    // The loud participant is announced as the active speaker.
    let speaker = sfu
        .wait_event("active speaker", |e| match e {
            SfuEvent::ActiveSpeaker { participant, .. } => Some(*participant),
            _ => None,
        })
        .await?;
    assert_eq!(speaker, Some(clients[0].1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_valid_credential_there_is_no_media() -> anyhow::Result<()> {
    let sfu = TestSfu::start(true).await;
    let publisher_client = Client::new("pub", ClientConfig::publisher(-30)).await;
    sfu.connect(&publisher_client).await?;
    publisher_client.start_media();

    // Refused joins: wrong secret, other participant's credential, other call, expired,
    // garbage. None yields a participant, so there is nothing to offer to.
    let forged = parley_sfu::credential::issue(
        b"not the secret",
        &parley_sfu::credential::Claims {
            tenant: common::TENANT.into(),
            call: common::CALL.into(),
            participant: "mallory".into(),
            expiry: common::unix_now() + 60,
        },
    );
    let expired = parley_sfu::credential::issue(
        common::SECRET,
        &parley_sfu::credential::Claims {
            tenant: common::TENANT.into(),
            call: common::CALL.into(),
            participant: "mallory".into(),
            expiry: common::unix_now() - 1,
        },
    );
    let cases: [(&str, &str, String, &str); 5] = [
        (common::CALL, "mallory", forged, "credential_bad_signature"),
        (
            common::CALL,
            "mallory",
            common::credential("pub"),
            "credential_wrong_subject",
        ),
        (
            "other-call",
            "mallory",
            common::credential("mallory"),
            "credential_wrong_subject",
        ),
        (common::CALL, "mallory", expired, "credential_expired"),
        (
            common::CALL,
            "mallory",
            "v1.junk".into(),
            "credential_malformed",
        ),
    ];
    for (call, who, cred, code) in cases {
        let err = sfu
            .handle
            .join(common::TENANT, call, who, &cred)
            .await
            .expect_err("join must be refused");
        assert_eq!(err.code(), code);
    }
    // An offer for a participant that was never admitted is refused.
    let mallory = Client::new("mallory", ClientConfig::receiver(1)).await;
    let offer = mallory.offer(0, 0).await?;
    assert_eq!(
        sfu.handle.apply_offer(ParticipantId(9_999), &offer).await,
        Err(SfuError::UnknownParticipant)
    );

    // Raw datagrams at the SFU's port (a STUN binding request with an unknown ufrag, and
    // RTP-looking bytes) get nothing back and are counted as dropped.
    let before = sfu.handle.stats().await?.dropped_datagrams;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let mut stun = vec![0x00, 0x01, 0x00, 0x0c, 0x21, 0x12, 0xa4, 0x42];
    stun.extend_from_slice(&[1; 12]);
    stun.extend_from_slice(&[0x00, 0x06, 0x00, 0x07]);
    stun.extend_from_slice(b"nope:me\0");
    let sfu_addr = sfu.handle.local_addr();
    for _ in 0..5 {
        socket.send_to(&stun, sfu_addr).await?;
        socket.send_to(&[0x80; 200], sfu_addr).await?;
    }
    let mut buf = [0u8; 2048];
    let got = tokio::time::timeout(Duration::from_millis(1500), socket.recv_from(&mut buf)).await;
    assert!(got.is_err(), "the SFU answered a stranger: {got:?}");
    let after = sfu.handle.stats().await?.dropped_datagrams;
    assert!(after >= before + 10, "dropped {before} -> {after}");
    // And the refused client never connected nor received anything.
    assert!(mallory.received().is_empty());
    let stats = sfu.handle.stats().await?;
    assert_eq!(stats.participants, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_pause_and_unsubscribe_control_what_a_subscriber_gets() -> anyhow::Result<()> {
    let sfu = TestSfu::start(true).await;
    let p = Client::new("pub", ClientConfig::publisher(-30)).await;
    let pub_id = sfu.connect(&p).await?;
    let (audio, video) = tracks_of(&sfu, pub_id).await?;
    let s = Client::new("sub", ClientConfig::receiver(1)).await;
    let sub_id = sfu.connect(&s).await?;
    p.start_media();
    let video_mid = bound_mid(&sfu, sub_id, video).expect("video bound");
    let audio_mid = bound_mid(&sfu, sub_id, audio).expect("audio bound");

    // A small tile: the SFU moves the subscriber to the q layer (on a q keyframe).
    sfu.handle
        .set_video(
            sub_id,
            video,
            VideoPrefs {
                paused: false,
                max_size: Some((320, 180)),
            },
        )
        .await?;
    sfu.wait_event("switch to q", |e| match e {
        SfuEvent::LayerSwitched {
            subscriber,
            track,
            layer: Some(l),
        } if *subscriber == sub_id && *track == video && l == "q" => Some(()),
        _ => None,
    })
    .await?;
    let at_switch = layer_frames(&s, &video_mid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = layer_frames(&s, &video_mid);
    let delta = |rid: &str| after.get(rid).unwrap_or(&0) - at_switch.get(rid).unwrap_or(&0);
    assert!(delta("q") >= 8, "q frames after the switch: {after:?}");
    assert!(
        delta("h") + delta("f") <= 1,
        "other layers after the switch: {after:?}"
    );

    // Paused: no video at all, audio goes on.
    sfu.handle
        .set_video(
            sub_id,
            video,
            VideoPrefs {
                paused: true,
                max_size: None,
            },
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let paused_video = s.received()[&video_mid].frames;
    let paused_audio = s.received()[&audio_mid].frames;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        s.received()[&video_mid].frames,
        paused_video,
        "video while paused"
    );
    assert!(
        s.received()[&audio_mid].frames >= paused_audio + 25,
        "audio while paused"
    );

    // Resumed without a size limit: video comes back, from a keyframe.
    let keyframes = s.received()[&video_mid].keyframes;
    sfu.handle
        .set_video(sub_id, video, VideoPrefs::default())
        .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let v = &s.received()[&video_mid];
    assert!(v.frames >= paused_video + 8, "video after resume: {v:?}");
    assert!(v.keyframes > keyframes, "no keyframe after resume: {v:?}");

    // Unsubscribed from audio: the slot goes quiet and is reported free.
    sfu.handle.unsubscribe(sub_id, audio).await?;
    sfu.wait_event("audio unbound", |e| match e {
        SfuEvent::SubscriptionUnbound {
            subscriber, track, ..
        } if *subscriber == sub_id && *track == audio => Some(()),
        _ => None,
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a = s.received()[&audio_mid].frames;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        s.received()[&audio_mid].frames,
        a,
        "audio after unsubscribe"
    );
    Ok(())
}

/// Frames received on `mid` per layer rid.
fn layer_frames(c: &Client, mid: &str) -> HashMap<String, u64> {
    c.received()
        .get(mid)
        .map(|m| {
            m.sources
                .iter()
                .map(|(s, n)| (s.rsplit('/').next().unwrap().to_owned(), *n))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_subscriber_gets_a_keyframe_and_requests_reach_the_publisher_throttled()
-> anyhow::Result<()> {
    let sfu = TestSfu::start(true).await;
    let p = Client::new("pub", ClientConfig::publisher(-30)).await;
    let pub_id = sfu.connect(&p).await?;
    let (_, video) = tracks_of(&sfu, pub_id).await?;
    let early = Client::new("early", ClientConfig::receiver(1)).await;
    let early_id = sfu.connect(&early).await?;
    p.start_media();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The publisher sends keyframes only on request: a subscriber joining now can only decode
    // because the SFU asks for one when it subscribes.
    let late = Client::new("late", ClientConfig::receiver(1)).await;
    let late_id = sfu.connect(&late).await?;
    let late_mid = bound_mid(&sfu, late_id, video).expect("video bound");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let v = late.received().get(&late_mid).cloned().unwrap_or_default();
    assert!(v.keyframes >= 1, "late subscriber got no keyframe: {v:?}");
    assert!(v.frames >= 5, "late subscriber: {v:?}");

    // Ten PLIs from a subscriber within a second reach the publisher at most about once a
    // second per layer (not ten times), and bring a keyframe.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let early_mid = bound_mid(&sfu, early_id, video).expect("video bound");
    let before = p.keyframe_requests();
    let keyframes_before = early.received()[&early_mid].keyframes;
    for _ in 0..10 {
        early.request_keyframe(&early_mid).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let forwarded = p.keyframe_requests() - before;
    assert!(
        (1..=3).contains(&forwarded),
        "10 PLIs in 1 s became {forwarded} requests at the publisher"
    );
    assert!(early.received()[&early_mid].keyframes > keyframes_before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_or_vanishing_unpublishes_and_frees_slots() -> anyhow::Result<()> {
    let sfu = TestSfu::start_with(|c| c.idle_timeout = Duration::from_secs(2)).await;
    let a = Client::new("a", ClientConfig::publisher(-30)).await;
    let a_id = sfu.connect(&a).await?;
    let (a_audio, a_video) = tracks_of(&sfu, a_id).await?;
    let s = Client::new("s", ClientConfig::receiver(1)).await;
    let s_id = sfu.connect(&s).await?;
    a.start_media();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // a leaves: both tracks are unpublished and s's slots freed.
    sfu.handle.leave(a_id).await?;
    for track in [a_audio, a_video] {
        sfu.wait_event("a's track unpublished", |e| match e {
            SfuEvent::TrackUnpublished { track: t, .. } if *t == track => Some(()),
            _ => None,
        })
        .await?;
        sfu.wait_event("s's slot freed", |e| match e {
            SfuEvent::SubscriptionUnbound {
                subscriber,
                track: t,
                ..
            } if *subscriber == s_id && *t == track => Some(()),
            _ => None,
        })
        .await?;
    }
    assert_eq!(
        sfu.handle.leave(a_id).await,
        Err(SfuError::UnknownParticipant)
    );

    // b publishes, s gets b's tracks on the freed slots (no renegotiation), then b's process
    // vanishes without a word: after the idle timeout b is removed and its tracks go away.
    let b = Client::new("b", ClientConfig::publisher(-30)).await;
    let b_id = sfu.connect(&b).await?;
    let (_, b_video) = tracks_of(&sfu, b_id).await?;
    b.start_media();
    let mid = sfu
        .wait_event("b's video bound at s", |e| match e {
            SfuEvent::SubscriptionBound {
                subscriber,
                track,
                mid,
            } if *subscriber == s_id && *track == b_video => Some(mid.clone()),
            _ => None,
        })
        .await?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let from_b = s.received()[&mid]
        .sources
        .iter()
        .filter(|(k, _)| k.starts_with("b/v/"))
        .map(|(_, n)| *n)
        .sum::<u64>();
    assert!(from_b >= 5, "b's video on the reused slot: {from_b}");
    assert!(
        !sfu.events()
            .iter()
            .any(|e| matches!(e, SfuEvent::RenegotiationNeeded { participant, .. } if *participant == s_id)),
        "a freed slot is reused without renegotiation"
    );
    drop(b);
    sfu.wait_event("b disconnected", |e| match e {
        SfuEvent::Disconnected { participant } if *participant == b_id => Some(()),
        _ => None,
    })
    .await?;
    sfu.wait_event("b's video unpublished", |e| match e {
        SfuEvent::TrackUnpublished { track, .. } if *track == b_video => Some(()),
        _ => None,
    })
    .await?;
    // s is still there (it keeps sending RTCP and consent checks).
    assert_eq!(sfu.handle.stats().await?.participants, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_restart_from_a_new_address_keeps_media_flowing() -> anyhow::Result<()> {
    let sfu = TestSfu::start(true).await;
    let p = Client::new("pub", ClientConfig::publisher(-30)).await;
    let pub_id = sfu.connect(&p).await?;
    let (_, video) = tracks_of(&sfu, pub_id).await?;
    let s = Client::new("sub", ClientConfig::receiver(1)).await;
    let sub_id = sfu.connect(&s).await?;
    p.start_media();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mid = bound_mid(&sfu, sub_id, video).expect("video bound");
    let old_addr = s.local_addr();

    // The subscriber's network changes: new socket, new ufrag. The SFU can only find it by the
    // new ufrag (the address is unknown to it), answers with a new ufrag of its own, and media
    // resumes on the same slot.
    let offer = s.ice_restart_offer(true).await?;
    let answer = sfu.handle.apply_offer(sub_id, &offer).await?;
    let ufrag = |sdp: &str| {
        sdp.lines()
            .find_map(|l| l.strip_prefix("a=ice-ufrag:"))
            .map(str::to_owned)
    };
    assert_ne!(ufrag(&offer), None);
    s.accept_answer(&answer).await?;
    assert_ne!(s.local_addr(), old_addr);
    s.wait_connected().await?;
    let before = s.received()[&mid].frames;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = s.received()[&mid].frames;
    assert!(
        after >= before + 10,
        "video after the ICE restart: {before} -> {after}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knowing_a_ufrag_does_not_let_a_stranger_take_over_the_route() -> anyhow::Result<()> {
    let sfu = TestSfu::start(true).await;
    // The publisher connects by hand, to learn the SFU's ufrag for it from the answer.
    let p = Client::new("pub", ClientConfig::publisher(-30)).await;
    let pub_id = sfu
        .handle
        .join(
            common::TENANT,
            common::CALL,
            "pub",
            &common::credential("pub"),
        )
        .await?;
    let answer = sfu
        .handle
        .apply_offer(pub_id, &p.offer(0, 0).await?)
        .await?;
    p.accept_answer(&answer).await?;
    p.wait_connected().await?;
    let ufrag = answer
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("a=ice-ufrag:"))
        .expect("ufrag in the answer")
        .to_owned();
    let (_, video) = tracks_of(&sfu, pub_id).await?;
    let s = Client::new("sub", ClientConfig::receiver(1)).await;
    let sub_id = sfu.connect(&s).await?;
    p.start_media();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mid = bound_mid(&sfu, sub_id, video).expect("video bound");

    // Twenty strangers keep sending binding requests that name the publisher's ufrag, without
    // valid integrity, from twenty addresses (more than the SFU remembers per participant). If
    // the SFU learned addresses from them, the publisher's own address would be pushed out and
    // its media dropped.
    let stun = forged_binding_request(&format!("{ufrag}:evil"));
    let mut strangers = Vec::new();
    for _ in 0..20 {
        strangers.push(tokio::net::UdpSocket::bind("127.0.0.1:0").await?);
    }
    let target = sfu.handle.local_addr();
    let flood = async {
        for _ in 0..60 {
            for socket in &strangers {
                socket.send_to(&stun, target).await?;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(())
    };
    let before = s.received()[&mid].frames;
    flood.await?;
    let after = s.received()[&mid].frames;
    assert!(
        after >= before + 8,
        "the publisher's video stopped during the flood: {before} -> {after}"
    );
    // And no stranger got anything back.
    let mut buf = [0u8; 1500];
    for socket in &strangers {
        assert!(socket.try_recv_from(&mut buf).is_err());
    }
    Ok(())
}

/// A well-formed STUN binding request (USERNAME, MESSAGE-INTEGRITY, FINGERPRINT) whose integrity
/// is made up: what someone who knows a ufrag but not the password can send.
fn forged_binding_request(username: &str) -> Vec<u8> {
    fn attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
        out.extend_from_slice(value);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for b in data {
            crc ^= u32::from(*b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let mut body = Vec::new();
    attr(&mut body, 0x0006, username.as_bytes());
    attr(&mut body, 0x0024, &0x6e7f_00ffu32.to_be_bytes()); // PRIORITY
    attr(&mut body, 0x0008, &[0x5a; 20]); // MESSAGE-INTEGRITY, made up
    let mut m = vec![0x00, 0x01];
    m.extend_from_slice(&((body.len() + 8) as u16).to_be_bytes());
    m.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    m.extend_from_slice(&[9; 12]);
    m.extend_from_slice(&body);
    let fingerprint = crc32(&m) ^ 0x5354_554e;
    attr(&mut m, 0x8028, &fingerprint.to_be_bytes());
    m
}
