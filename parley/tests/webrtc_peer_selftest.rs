//! Self-test of the str0m-based WebRTC test peer (`common::peer`): no Parley server involved,
//! SDP and candidates are passed in memory. Everything runs on 127.0.0.1.

mod common;

use std::time::Duration;

use common::peer::{Peer, PeerConfig};

const WAIT: Duration = Duration::from_secs(5);

/// A offers, B answers; both connect and the channel opens on both sides.
async fn connect(a: &Peer, b: &Peer) {
    let offer = a.create_offer().await.expect("offer");
    let answer = b.accept_offer(&offer).await.expect("answer");
    a.accept_answer(&answer).await.expect("accept answer");
    for p in [a, b] {
        p.wait_connected(WAIT).await.expect("connected");
        p.wait_channel_open(WAIT).await.expect("channel open");
    }
}

/// Sends one message each way and checks it arrives.
async fn exchange(a: &Peer, b: &Peer, tag: &str) {
    let (to_b, to_a) = (format!("{tag}: a→b"), format!("{tag}: b→a"));
    a.send(&to_b).await.expect("a sends");
    b.send(&to_a).await.expect("b sends");
    assert_eq!(b.recv(WAIT).await.as_deref(), Some(to_b.as_str()));
    assert_eq!(a.recv(WAIT).await.as_deref(), Some(to_a.as_str()));
}

#[tokio::test]
async fn offer_answer_in_memory_connects_and_messages_flow() {
    let a = Peer::new("a");
    let b = Peer::new("b");
    assert!(!a.is_connected() && !b.is_connected());

    let offer = a.create_offer().await.expect("offer");
    let a_host = format!("127.0.0.1 {} typ host", a.local_addr().port());
    assert!(
        offer.contains(&a_host),
        "the offer carries A's host candidate:\n{offer}"
    );
    assert!(
        offer.contains("m=application"),
        "the offer has the data channel's m-line"
    );

    let answer = b.accept_offer(&offer).await.expect("answer");
    let b_host = format!("127.0.0.1 {} typ host", b.local_addr().port());
    assert!(
        answer.contains(&b_host),
        "the answer carries B's host candidate:\n{answer}"
    );
    a.accept_answer(&answer).await.expect("accept answer");

    for p in [&a, &b] {
        p.wait_connected(WAIT).await.expect("connected");
        p.wait_channel_open(WAIT).await.expect("channel open");
        assert!(p.is_connected() && p.is_channel_open());
        assert_eq!(p.connect_count(), 1);
    }

    // Several messages, in order, both ways.
    for i in 0..5 {
        a.send(&format!("a{i}")).await.expect("a sends");
        b.send(&format!("b{i}")).await.expect("b sends");
    }
    for i in 0..5 {
        assert_eq!(b.recv(WAIT).await, Some(format!("a{i}")));
        assert_eq!(a.recv(WAIT).await, Some(format!("b{i}")));
    }
    assert_eq!(a.recv(Duration::from_millis(100)).await, None);

    // A second create_offer has nothing to negotiate.
    assert!(a.create_offer().await.is_err());
    assert_eq!(a.ignored_candidates() + b.ignored_candidates(), 0);
}

#[tokio::test]
async fn ice_restart_from_either_side_reconnects() {
    let a = Peer::new("a");
    let b = Peer::new("b");
    connect(&a, &b).await;
    exchange(&a, &b, "before restart").await;

    // The offerer restarts ICE.
    let before = a.local_candidate().await.expect("candidate");
    let offer = a.ice_restart_offer().await.expect("restart offer");
    let answer = b.accept_offer(&offer).await.expect("restart answer");
    assert!(!b.is_connected(), "B restarted ICE on the offer");
    a.accept_answer(&answer)
        .await
        .expect("accept restart answer");
    assert!(!a.is_connected(), "A restarted ICE on the answer");
    for p in [&a, &b] {
        p.wait_connected(WAIT).await.expect("reconnected");
        assert_eq!(p.connect_count(), 2, "{p:?}");
        assert!(p.is_channel_open());
    }
    assert_ne!(
        a.local_candidate().await.expect("candidate"),
        before,
        "the restart changed the ufrag"
    );
    exchange(&a, &b, "after A's restart").await;

    // The answerer can restart ICE too.
    let offer = b.ice_restart_offer().await.expect("restart offer from B");
    let answer = a.accept_offer(&offer).await.expect("restart answer from A");
    b.accept_answer(&answer)
        .await
        .expect("accept restart answer");
    for p in [&a, &b] {
        p.wait_connected(WAIT).await.expect("reconnected");
        assert_eq!(p.connect_count(), 3, "{p:?}");
    }
    exchange(&a, &b, "after B's restart").await;
}

#[tokio::test]
async fn trickled_candidates_connect() {
    let trickle = PeerConfig {
        sdp_candidates: false,
    };
    let a = Peer::with_config("a", trickle.clone());
    let b = Peer::with_config("b", trickle);

    let offer = a.create_offer().await.expect("offer");
    assert!(
        !offer.contains("a=candidate"),
        "no candidate in the offer:\n{offer}"
    );
    let answer = b.accept_offer(&offer).await.expect("answer");
    assert!(
        !answer.contains("a=candidate"),
        "no candidate in the answer:\n{answer}"
    );
    a.accept_answer(&answer).await.expect("accept answer");

    // Without candidates nothing can connect.
    assert!(a.wait_connected(Duration::from_millis(300)).await.is_err());
    assert!(!b.is_connected());

    // The loopback-only policy: other addresses and TCP are ignored, garbage is an error.
    let ignored = [
        "candidate:1 1 udp 2130706431 192.0.2.7 4000 typ host",
        "a=candidate:1 1 udp 2130706431 127.0.0.2 4000 typ host",
        "candidate:1 1 tcp 2130706431 127.0.0.1 4000 typ host tcptype passive",
    ];
    for c in ignored {
        assert!(!b.add_remote_candidate(c).await.expect("parses"), "{c}");
    }
    assert!(b.add_remote_candidate("candidate:nonsense").await.is_err());
    assert!(!b.add_remote_candidate("").await.expect("end of candidates"));
    assert_eq!(b.ignored_candidates(), 4);

    let a_cand = a.local_candidate().await.expect("a's candidate");
    let b_cand = b.local_candidate().await.expect("b's candidate");
    assert!(a_cand.starts_with("candidate:"), "{a_cand}");
    assert!(a_cand.contains(&format!("127.0.0.1 {} typ host", a.local_addr().port())));
    assert!(
        b.add_remote_candidate(&a_cand)
            .await
            .expect("a's candidate")
    );
    assert!(
        a.add_remote_candidate(&format!("a={b_cand}\r\n"))
            .await
            .expect("b's")
    );

    for p in [&a, &b] {
        p.wait_connected(WAIT).await.expect("connected");
        p.wait_channel_open(WAIT).await.expect("channel open");
    }
    exchange(&a, &b, "trickled").await;

    // A remote SDP's non-loopback candidates are dropped too.
    let offer = a.ice_restart_offer().await.expect("restart offer");
    let offer = offer.replace(
        "a=ice-ufrag:",
        "a=candidate:1 1 udp 2130706431 198.51.100.9 9 typ host\r\na=ice-ufrag:",
    );
    let answer = b.accept_offer(&offer).await.expect("restart answer");
    a.accept_answer(&answer)
        .await
        .expect("accept restart answer");
    assert_eq!(b.ignored_candidates(), 5);
    // The restart cleared the remote candidates: trickle again (new ufrags).
    let a_cand = a.local_candidate().await.expect("a's candidate");
    let b_cand = b.local_candidate().await.expect("b's candidate");
    assert!(
        b.add_remote_candidate(&a_cand)
            .await
            .expect("a's candidate")
    );
    assert!(
        a.add_remote_candidate(&b_cand)
            .await
            .expect("b's candidate")
    );
    for p in [&a, &b] {
        p.wait_connected(WAIT).await.expect("reconnected");
        assert_eq!(p.connect_count(), 2, "{p:?}");
    }
    exchange(&a, &b, "trickled after restart").await;
}

#[tokio::test]
async fn dropping_a_peer_stops_it() {
    let a = Peer::new("a");
    let b = Peer::new("b");
    connect(&a, &b).await;
    let addr = a.local_addr();
    drop(a);
    // The task and its socket go away: the port can be bound again soon.
    let mut rebound = false;
    for _ in 0..50 {
        if std::net::UdpSocket::bind(addr).is_ok() {
            rebound = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rebound, "A's socket {addr} was released");
    // B is still usable (its sends may go nowhere, but nothing panics).
    b.send("anyone?").await.expect("b can still write");
}
