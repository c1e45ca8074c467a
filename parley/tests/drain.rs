//! SIGTERM drains a node: readiness goes false, new upgrades are refused, connected clients get
//! a `reconnect` frame with a delay hint and, at the end of the drain window, a 1001 close; sends
//! in flight are acked. Under a send load on two nodes (PostgreSQL + NATS), no acked message is
//! lost and the drained node's clients resume on the other node without a gap.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{Backend, Server, ServerBuilder, Ws, token, unique};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WINDOW_MS: u64 = 2_000;
/// Messages the moving sender sends in all (before, during and after the drain).
const TOTAL: usize = 120;
/// Sends in flight at once (pipelined) per sender.
const BURST: usize = 5;

enum Frame {
    Json(Value),
    Close(u16),
    Gone,
}

async fn next_frame(ws: &mut Ws) -> Frame {
    loop {
        match tokio::time::timeout(Duration::from_secs(15), ws.stream.next()).await {
            Err(_) => panic!("no frame within 15 s"),
            Ok(None) | Ok(Some(Err(_))) => return Frame::Gone,
            Ok(Some(Ok(WsMessage::Text(t)))) => {
                return Frame::Json(serde_json::from_str(t.as_str()).expect("json"));
            }
            Ok(Some(Ok(WsMessage::Close(f)))) => {
                return Frame::Close(f.map(|f| u16::from(f.code)).unwrap_or(1005));
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Sends a burst of messages and reads their acks; returns the acked (client_msg_id, seq) and
/// the reconnect hint if one arrived meanwhile. `None` acks: the connection ended first.
async fn burst(
    ws: &mut Ws,
    channel: &str,
    ids: &[String],
) -> (Vec<(String, u64)>, Option<u64>, Option<u16>) {
    for id in ids {
        // A connection closing meanwhile is read below (its close frame or its end).
        let frame = json!({ "type": "message.send", "id": id, "channel_id": channel,
            "client_msg_id": id, "text": format!("text {id}") });
        ws.send_raw(WsMessage::Text(frame.to_string().into())).await;
    }
    let mut acked = Vec::new();
    let mut hint = None;
    let mut waiting: BTreeSet<&String> = ids.iter().collect();
    while !waiting.is_empty() {
        match next_frame(ws).await {
            Frame::Json(f) if f["type"] == "reconnect" => {
                hint = Some(f["delay_ms"].as_u64().expect("delay_ms"));
            }
            Frame::Json(f) if f["type"] == "ack" => {
                let id = f["id"].as_str().expect("id").to_owned();
                waiting.remove(&id);
                acked.push((id, f["seq"].as_u64().expect("seq")));
            }
            Frame::Json(f) if f["type"] == "error" => panic!("send refused: {f}"),
            Frame::Json(_) => {}
            Frame::Close(code) => return (acked, hint, Some(code)),
            Frame::Gone => return (acked, hint, Some(1006)),
        }
    }
    (acked, hint, None)
}

async fn connect(server: &Server, user: &str) -> Ws {
    Ws::connect(server, &token(user)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_one_of_two_nodes_under_load_without_losing_acked_messages() {
    // The clients send bursts back to back for the whole window: a frame budget large enough
    // that this test is about draining, never about the budget (with TCP_NODELAY the acks come
    // back fast enough for the default 50/s to refuse sends).
    let budget = |b: ServerBuilder| {
        b.arg("--ws-frames-per-second")
            .arg("100000")
            .arg("--ws-frame-burst")
            .arg("100000")
    };
    let a = budget(ServerBuilder::new(Backend::Postgres).nats())
        .arg("--drain-window-ms")
        .arg(WINDOW_MS.to_string())
        .start();
    let b = std::sync::Arc::new(budget(ServerBuilder::new(Backend::Postgres).nats()).start());
    let (sender_id, reader_id, stayer_id) = (unique("mover"), unique("reader"), unique("stayer"));
    let channel = b
        .api(&sender_id)
        .create_channel("drain", &[&reader_id, &stayer_id])
        .await;

    let mut reader = connect(&a, &reader_id).await;
    let reader_session = reader.welcome["session_id"].as_str().unwrap().to_owned();
    let start_seq = reader.subscribe(&channel).await;
    let mut sender = connect(&a, &sender_id).await;
    // A client that ignores the reconnect frame and keeps sending until it is closed.
    let mut stayer = connect(&a, &stayer_id).await;

    // The reader: reads events on A; on `reconnect`, waits the hint, resumes on B (filling
    // from history when B cannot replay), and reads on until it has every message.
    let reader_task = {
        let (channel, b) = (channel.clone(), b.clone());
        let reader_id = reader_id.clone();
        tokio::spawn(async move {
            let mut seqs: Vec<u64> = Vec::new();
            let mut last = start_seq;
            // On A until told to move.
            let hint = loop {
                match next_frame(&mut reader).await {
                    Frame::Json(f) if f["type"] == "reconnect" => {
                        break f["delay_ms"].as_u64();
                    }
                    Frame::Json(f) if f["type"] == "message.new" => {
                        let seq = f["seq"].as_u64().unwrap();
                        assert_eq!(seq, last + 1, "gap on A");
                        last = seq;
                        seqs.push(seq);
                    }
                    Frame::Json(_) => {}
                    other => panic!(
                        "reader's connection on A ended before a reconnect frame ({})",
                        matches!(other, Frame::Gone)
                    ),
                }
            };
            let hint = hint.expect("a delay hint");
            assert!(
                hint <= WINDOW_MS / 2,
                "delay hint {hint} ms past half the window"
            );
            tokio::time::sleep(Duration::from_millis(hint)).await;
            drop(reader);
            let mut on_b = connect(&b, &reader_id).await;
            let ack = on_b
                .request(json!({ "type": "resume", "session_id": reader_session,
                    "channels": [{ "channel_id": channel, "seq": last }] }))
                .await;
            assert_eq!(ack["type"], "ack", "{ack}");
            let outcome = &ack["resumed"][0];
            let live_from = outcome["seq"].as_u64().expect("subscribed on B");
            // Replayed events (if B replayed) came before the ack, in the backlog.
            let mut pending: BTreeMap<u64, Value> = BTreeMap::new();
            if outcome["replayed"] != true {
                // Fill from history up to where live delivery starts.
                let mut after = last;
                while after < live_from {
                    let page = b
                        .api(&reader_id)
                        .get(&format!(
                            "/v1/channels/{channel}/events?after={after}&limit=200"
                        ))
                        .await
                        .ok();
                    for ev in page["events"].as_array().expect("events") {
                        let seq = ev["seq"].as_u64().unwrap();
                        if seq <= live_from {
                            pending.insert(seq, ev.clone());
                        }
                        after = after.max(seq);
                    }
                    if page["has_more"] != true {
                        break;
                    }
                }
            }
            (on_b, seqs, last, pending, live_from, outcome.clone())
        })
    };

    // The moving sender: bursts on A; when told, finishes its burst, waits the hint and goes
    // on on B.
    let mut acked: Vec<(String, u64)> = Vec::new();
    let mut on_a = true;
    let mut moved_hint = None;
    let mut stayer_acked: Vec<(String, u64)> = Vec::new();
    let mut stayer_sent = 0;
    let mut stayer_close = None;
    let mut sent = 0;
    let mut terminated = false;
    let mut readyz_during = None;
    let mut upgrade_during = None;
    while sent < TOTAL {
        let ids: Vec<String> = (sent..(sent + BURST).min(TOTAL))
            .map(|i| format!("m{i:04}"))
            .collect();
        sent += ids.len();
        let (got, hint, closed) = burst(&mut sender, &channel, &ids).await;
        assert!(
            closed.is_none(),
            "the sender's connection closed: {closed:?}"
        );
        acked.extend(got);
        // The stayer sends alongside while its connection lives.
        if stayer_close.is_none() {
            let ids: Vec<String> = (0..BURST)
                .map(|i| format!("s{:04}", stayer_sent + i))
                .collect();
            stayer_sent += BURST;
            let (got, _, closed) = burst(&mut stayer, &channel, &ids).await;
            stayer_acked.extend(got);
            stayer_close = closed;
        }
        if !terminated && sent >= TOTAL / 4 {
            a.terminate();
            terminated = true;
        }
        if let Some(h) = hint.filter(|_| on_a) {
            // The node is draining now: not ready, and it refuses new upgrades.
            let res = reqwest::get(a.url("/readyz")).await.expect("readyz");
            readyz_during = Some((res.status().as_u16(), res.text().await.unwrap()));
            upgrade_during = Some(common::upgrade_refusal(
                Ws::connect_raw(&a, &["parley.v1"]).await,
            ));
            moved_hint = Some(h);
            tokio::time::sleep(Duration::from_millis(h)).await;
            sender = connect(&b, &sender_id).await;
            on_a = false;
        }
    }
    assert!(!on_a, "the sender never got a reconnect frame");
    let hint = moved_hint.unwrap();
    assert!(hint <= WINDOW_MS / 2, "hint {hint} ms");
    let (status, body) = readyz_during.expect("readiness read while draining");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    let refusal = upgrade_during.expect("upgrade tried while draining");
    assert_eq!(refusal.status, 503, "{refusal:?}");
    assert_eq!(refusal.code.as_deref(), Some("unavailable"), "{refusal:?}");

    // The stayer is closed with 1001 at the end of the window, after its acks.
    while stayer_close.is_none() {
        let ids: Vec<String> = (0..BURST)
            .map(|i| format!("s{:04}", stayer_sent + i))
            .collect();
        stayer_sent += BURST;
        let (got, _, closed) = burst(&mut stayer, &channel, &ids).await;
        stayer_acked.extend(got);
        stayer_close = closed;
    }
    assert_eq!(stayer_close, Some(1001), "the stayer's close");
    assert!(!stayer_acked.is_empty());

    // The reader resumed on B: live events follow the filled range with no gap, until the last
    // acked message.
    let (mut on_b, mut seqs, mut last, pending, live_from, outcome) =
        reader_task.await.expect("reader");
    for (seq, ev) in pending {
        assert_eq!(seq, last + 1, "gap in the history fill: {outcome}");
        if ev["type"] == "message.new" {
            seqs.push(seq);
        }
        last = seq;
    }
    if outcome["replayed"] != true {
        assert_eq!(last, live_from, "history filled up to the live start");
    }
    let final_seq = acked
        .iter()
        .chain(stayer_acked.iter())
        .map(|(_, s)| *s)
        .max()
        .unwrap();
    while last < final_seq {
        let ev = on_b.next_event().await;
        let seq = ev["seq"].as_u64().unwrap();
        assert_eq!(seq, last + 1, "gap in live delivery on B");
        last = seq;
        seqs.push(seq);
    }

    // Nothing acked is lost: every acked seq is in history with its client_msg_id, and the
    // reader saw it.
    let history = b.api(&sender_id).all_messages(&channel).await;
    let by_seq: BTreeMap<u64, String> = history
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().unwrap(),
                m["client_msg_id"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let seen: BTreeSet<u64> = seqs.iter().copied().collect();
    for (id, seq) in acked.iter().chain(stayer_acked.iter()) {
        assert_eq!(
            by_seq.get(seq),
            Some(id),
            "acked {id} at seq {seq} is not in history"
        );
        assert!(seen.contains(seq), "the reader never got acked seq {seq}");
    }
    assert_eq!(
        acked.len(),
        TOTAL,
        "every send of the moving sender was acked"
    );
}
