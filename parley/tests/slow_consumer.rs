//! A subscriber that stops reading is cut off as a slow consumer without slowing anyone else,
//! and loses nothing: history gives it everything after the last event it saw.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{ServerBuilder, Ws, token, unique};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const TOTAL: u64 = 2000;
const TEXT_CHARS: usize = 3000;

/// Upper bound for each phase of the test.
const PHASE: Duration = Duration::from_secs(60);

/// How the slow connection ended, as its client saw it once it read again.
#[derive(Debug)]
enum Ending {
    /// A close frame with this code and reason.
    Close(u16, String),
    /// The stream ended or failed without a close frame.
    Abrupt(String),
}

/// Reads what the server managed to hand over before it gave up on the connection, then how it
/// ended. Returns the seqs of the events read, in arrival order.
async fn drain(ws: &mut Ws) -> (Vec<u64>, Ending) {
    let mut seqs = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), ws.stream.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the slow connection is still open (read {} events, then silence)",
                    seqs.len()
                )
            });
        match next {
            Some(Ok(WsMessage::Text(t))) => {
                let f: Value = serde_json::from_str(t.as_str()).expect("json frame");
                if f["type"] == "message.new" {
                    seqs.push(f["seq"].as_u64().expect("seq"));
                }
            }
            Some(Ok(WsMessage::Close(Some(c)))) => {
                return (seqs, Ending::Close(c.code.into(), c.reason.to_string()));
            }
            Some(Ok(WsMessage::Close(None))) => {
                return (seqs, Ending::Abrupt("close frame without a code".into()));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return (seqs, Ending::Abrupt(e.to_string())),
            None => return (seqs, Ending::Abrupt("end of stream".into())),
        }
    }
}

/// With a send queue of 128 events, a subscriber that stops reading while 2,000 messages of
/// 3,000 characters are sent is disconnected; a well-behaved subscriber meanwhile receives all
/// 2,000 in order and stays connected. The slow one, reading again, finds a gapless prefix of
/// the events, then the end of the connection (close 4009 "slow consumer", or an abrupt end if
/// the close frame could not be written); reconnecting, it gets the rest from history after its
/// last seen seq: nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_cut_off_alone_and_catches_up_from_history() {
    let server = ServerBuilder::new(common::Backend::Sqlite)
        .arg("--ws-send-queue")
        .arg("128")
        .arg("--rate-per-minute")
        .arg("1000000")
        .arg("--rate-burst")
        .arg("100000")
        .start();
    let (alice, slow, good) = (unique("alice"), unique("slow"), unique("good"));
    let channel = server
        .api(&alice)
        .create_channel("firehose", &[&slow, &good])
        .await;

    let mut slow_ws = Ws::connect(&server, &token(&slow)).await;
    assert_eq!(slow_ws.welcome["limits"]["send_queue"], 128);
    assert_eq!(slow_ws.subscribe(&channel).await, 0);
    // From here on nobody reads slow_ws until the sending is over.
    let mut good_ws = Ws::connect(&server, &token(&good)).await;
    assert_eq!(good_ws.subscribe(&channel).await, 0);
    let good_reader = tokio::spawn(async move {
        let mut events = Vec::with_capacity(TOTAL as usize);
        while (events.len() as u64) < TOTAL {
            events.push(good_ws.next_event().await);
        }
        (good_ws, events)
    });

    let senders: Vec<_> = (0..8)
        .map(|t| {
            let (api, channel) = (server.api(&alice), channel.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                for i in 0..TOTAL as usize / 8 {
                    let head = format!("t{t}-{i} ");
                    let text = format!("{head}{}", "x".repeat(TEXT_CHARS - head.len()));
                    let res = api.send(&channel, &format!("t{t}-{i}"), &text).await;
                    assert_eq!(res.status, 201, "{}", res.body);
                    let m = &res.body["message"];
                    out.push((
                        m["seq"].as_u64().expect("seq"),
                        m["id"].as_str().expect("id").to_owned(),
                    ));
                }
                out
            })
        })
        .collect();
    let mut acks = BTreeMap::new();
    for r in tokio::time::timeout(PHASE, futures::future::join_all(senders))
        .await
        .expect("2,000 sends within 60 s")
    {
        acks.extend(r.expect("sender"));
    }
    assert_eq!(
        acks.keys().copied().collect::<Vec<_>>(),
        (1..=TOTAL).collect::<Vec<_>>()
    );

    // The well-behaved subscriber got everything, in order, and is still connected.
    let (mut good_ws, events) = tokio::time::timeout(PHASE, good_reader)
        .await
        .expect("2,000 events within 60 s")
        .expect("good reader");
    let got: Vec<u64> = events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(
        got,
        (1..=TOTAL).collect::<Vec<_>>(),
        "the good subscriber gets every message, in order"
    );
    for e in &events {
        let seq = e["seq"].as_u64().expect("seq");
        assert_eq!(e["message"]["id"].as_str(), Some(acks[&seq].as_str()));
        assert_eq!(
            e["message"]["text"].as_str().map(str::len),
            Some(TEXT_CHARS)
        );
    }
    let pong = good_ws.request(json!({ "type": "ping" })).await;
    assert_eq!(
        pong["type"], "pong",
        "the good subscriber is still connected: {pong}"
    );

    // The slow one reads again: a gapless prefix, then the end of its connection.
    let (seen, ending) = drain(&mut slow_ws).await;
    let how = match &ending {
        Ending::Close(code, reason) => format!("close frame {code} {reason:?}"),
        Ending::Abrupt(why) => format!("abrupt end ({why})"),
    };
    eprintln!(
        "slow consumer: read {} of {TOTAL} events, then {how}",
        seen.len()
    );
    let last_seen = seen.last().copied().unwrap_or(0);
    assert_eq!(
        seen,
        (1..=last_seen).collect::<Vec<_>>(),
        "what the slow one got is in order and gapless"
    );
    assert!(
        last_seen < TOTAL,
        "the slow consumer was cut off before receiving everything"
    );
    if let Ending::Close(code, reason) = &ending {
        assert_eq!(
            (*code, reason.as_str()),
            (4009, "slow consumer"),
            "a close frame must say slow consumer"
        );
    }

    // Reconnected, it resumes: live delivery starts at the channel's last seq, history has the rest.
    let mut again = Ws::connect(&server, &token(&slow)).await;
    assert_eq!(again.subscribe(&channel).await, TOTAL);
    let api = server.api(&slow);
    let mut missed = Vec::new();
    let mut after = last_seen;
    loop {
        let page = api
            .get(&format!(
                "/v1/channels/{channel}/messages?after={after}&limit=200"
            ))
            .await
            .ok();
        let msgs = page["messages"].as_array().expect("messages").clone();
        if let Some(m) = msgs.last() {
            after = m["seq"].as_u64().expect("seq");
        }
        missed.extend(msgs);
        if !page["has_after"].as_bool().expect("has_after") {
            break;
        }
    }
    let missed_seqs: Vec<u64> = missed
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(
        missed_seqs,
        (last_seen + 1..=TOTAL).collect::<Vec<_>>(),
        "history has exactly what was missed"
    );
    for m in &missed {
        assert_eq!(
            m["id"].as_str(),
            Some(acks[&m["seq"].as_u64().expect("seq")].as_str())
        );
    }
}
