//! `/metrics`: a chat flow against the real binary moves the counters and histograms by the
//! amounts the flow implies (scraped and parsed before and after).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Backend, Server, ServerBuilder, Ws, token, unique};
use serde_json::json;

/// One scrape: series (name and sorted labels) to value.
#[derive(Debug, Default)]
struct Scrape {
    series: BTreeMap<String, f64>,
    text: String,
}

impl Scrape {
    async fn take(server: &Server) -> Scrape {
        let res = reqwest::get(server.url("/metrics"))
            .await
            .expect("GET /metrics");
        assert_eq!(res.status(), 200);
        let ctype = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        assert!(ctype.starts_with("text/plain"), "content-type {ctype}");
        let text = res.text().await.expect("body");
        let mut series = BTreeMap::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line.rsplit_once(' ').expect("series and value");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
            series.insert(normalize(key), value);
        }
        Scrape { series, text }
    }

    /// The value of a series (0 when absent: never touched yet).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series
            .get(&series_key(name, labels))
            .copied()
            .unwrap_or(0.0)
    }

    fn has_help(&self, name: &str) -> bool {
        self.text.contains(&format!("# HELP {name} "))
    }
}

/// `name{b="2",a="1"}` → `name{a="1",b="2"}`.
fn normalize(key: &str) -> String {
    let Some((name, rest)) = key.split_once('{') else {
        return key.to_owned();
    };
    let body = rest.trim_end_matches('}');
    let mut labels: Vec<(String, String)> = body
        .split("\",")
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("label");
            (k.to_owned(), v.trim_matches('"').to_owned())
        })
        .collect();
    labels.sort();
    let refs: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    series_key(name, &refs)
}

fn series_key(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_owned();
    }
    let mut sorted = labels.to_vec();
    sorted.sort();
    let inner: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

/// How much a series moved between two scrapes.
fn delta(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.get(name, labels) - before.get(name, labels)
}

/// Scrapes until `check` holds (counters that move after the answer, e.g. presence), or fails
/// after 10 s with the last scrape.
async fn eventually(server: &Server, check: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = Scrape::take(server).await;
        if check(&s) || tokio::time::Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_chat_flow_moves_the_counters_and_histograms_by_its_amounts() {
    let server = Server::sqlite();
    let (alice_id, bob_id) = (unique("alice"), unique("bob"));
    let alice = server.api(&alice_id);
    let channel = alice.create_channel("metrics", &[&bob_id]).await;

    let before = Scrape::take(&server).await;

    let mut bob = Ws::connect(&server, &token(&bob_id)).await;
    bob.subscribe(&channel).await;
    let mut alice_ws = Ws::connect(&server, &token(&alice_id)).await;
    for i in 0..3 {
        let ack = alice_ws
            .request(json!({ "type": "message.send", "channel_id": channel,
                "client_msg_id": format!("m{i}"), "text": format!("hello {i}") }))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    // One refused send: a channel that does not exist.
    let refused = alice_ws
        .request(json!({ "type": "message.send", "channel_id": "ch_nope",
            "client_msg_id": "x", "text": "lost" }))
        .await;
    assert_eq!(refused["type"], "error", "{refused}");
    let refused_code = refused["code"].as_str().expect("code").to_owned();
    let sent = alice.send(&channel, "rest-1", "over rest").await;
    assert_eq!(sent.status, 201, "{}", sent.body);
    for _ in 0..4 {
        let ev = bob.next_event().await;
        assert_eq!(ev["type"], "message.new", "{ev}");
    }

    let during = Scrape::take(&server).await;
    let ws = [("transport", "websocket")];
    assert_eq!(during.get("parley_connections", &ws), 2.0);
    assert_eq!(
        delta(&before, &during, "parley_connections_opened_total", &ws),
        2.0
    );
    // Frames in: two auth, one subscribe, four sends.
    for (kind, n) in [("auth", 2.0), ("subscribe", 1.0), ("message.send", 4.0)] {
        assert_eq!(
            delta(
                &before,
                &during,
                "parley_ws_frames_in_total",
                &[("type", kind)]
            ),
            n,
            "frames in of type {kind}"
        );
    }
    // Frames out: two welcomes, four message.new to bob, 1 subscribe ack + 3 send acks, 1 error.
    for (kind, n) in [
        ("welcome", 2.0),
        ("message.new", 4.0),
        ("ack", 4.0),
        ("error", 1.0),
    ] {
        assert_eq!(
            delta(
                &before,
                &during,
                "parley_ws_frames_out_total",
                &[("type", kind)]
            ),
            n,
            "frames out of type {kind}"
        );
    }
    assert_eq!(
        delta(
            &before,
            &during,
            "parley_ws_sends_total",
            &[("result", "ok")]
        ),
        3.0
    );
    assert_eq!(
        delta(
            &before,
            &during,
            "parley_ws_sends_total",
            &[("result", refused_code.as_str())]
        ),
        1.0
    );
    assert_eq!(
        delta(&before, &during, "parley_ws_send_ack_seconds_count", &[]),
        4.0
    );
    assert_eq!(
        delta(
            &before,
            &during,
            "parley_ws_send_ack_seconds_bucket",
            &[("le", "+Inf")]
        ),
        4.0
    );
    assert!(delta(&before, &during, "parley_ws_send_ack_seconds_sum", &[]) > 0.0);
    // Fan-out: four messages, one local subscriber (bob).
    assert_eq!(
        delta(&before, &during, "parley_fanout_seconds_count", &[]),
        4.0
    );
    assert_eq!(
        delta(
            &before,
            &during,
            "parley_bus_receive_lag_seconds_count",
            &[]
        ),
        4.0
    );
    // Storage: the four messages went through the group commit (batch sizes sum to them).
    let sqlite = [("engine", "sqlite")];
    assert_eq!(
        delta(&before, &during, "parley_storage_batch_size_sum", &sqlite),
        4.0
    );
    let batches = delta(&before, &during, "parley_storage_batch_size_count", &sqlite);
    assert!((1.0..=4.0).contains(&batches), "{batches} batches");
    assert_eq!(
        delta(
            &before,
            &during,
            "parley_storage_commit_seconds_count",
            &sqlite
        ),
        batches
    );
    assert_eq!(
        delta(
            &before,
            &during,
            "parley_bus_published_total",
            &[("bus", "in-process")]
        ),
        4.0
    );
    // The send queue was sampled on every batched write to bob and alice.
    assert!(delta(&before, &during, "parley_ws_send_queue_depth_count", &[]) >= 1.0);
    // The REST send: one request of its route template, status 201.
    let route = [
        ("method", "POST"),
        ("route", "/v1/channels/{channel_id}/messages"),
        ("status", "201"),
    ];
    assert_eq!(
        delta(&before, &during, "parley_http_requests_total", &route),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &during,
            "parley_http_request_duration_seconds_count",
            &[
                ("method", "POST"),
                ("route", "/v1/channels/{channel_id}/messages")
            ]
        ),
        1.0
    );
    // Presence: both users came online.
    let during = eventually(&server, |s| {
        delta(
            &before,
            s,
            "parley_presence_transitions_total",
            &[("status", "online")],
        ) >= 2.0
    })
    .await;
    assert_eq!(
        delta(
            &before,
            &during,
            "parley_presence_transitions_total",
            &[("status", "online")]
        ),
        2.0
    );
    // Process gauges are sampled on every scrape.
    assert!(during.get("process_resident_memory_bytes", &[]) > 1e6);
    assert!(during.get("process_open_fds", &[]) >= 3.0);
    assert!(during.get("process_max_fds", &[]) >= during.get("process_open_fds", &[]));

    // Bob leaves with a normal close: one close with code "none" (the server answers the
    // client's close; it chooses no code of its own), one connection fewer.
    bob.stream.close(None).await.expect("close");
    // Both moves: the gauge and the counter are two updates, and a scrape may fall between.
    let closed = [("transport", "websocket"), ("code", "none")];
    let after = eventually(&server, |s| {
        s.get("parley_connections", &ws) == 1.0
            && delta(&before, s, "parley_connections_closed_total", &closed) == 1.0
    })
    .await;
    assert_eq!(after.get("parley_connections", &ws), 1.0);
    assert_eq!(
        delta(&before, &after, "parley_connections_closed_total", &closed),
        1.0
    );

    // No series carries a user or channel id.
    for id in [&alice_id, &bob_id, &channel] {
        assert!(
            !after.text.contains(id.as_str()),
            "{id} appears in /metrics"
        );
    }
    // Every parley series has help text.
    for key in after.series.keys() {
        let name = key.split('{').next().unwrap_or(key);
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| after.has_help(b)))
            .unwrap_or(name);
        assert!(after.has_help(base), "{name} has no # HELP");
    }
}

#[tokio::test]
async fn refused_upgrades_and_rate_limits_are_counted_by_reason() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--ws-frames-per-second")
        .arg("1")
        .arg("--ws-frame-burst")
        .arg("2")
        .start();
    let before = Scrape::take(&server).await;

    // No parley.v1 subprotocol: refused before any connection opens.
    let refused = Ws::connect_raw(&server, &["chat"]).await;
    assert!(
        refused.is_err(),
        "an upgrade without parley.v1 must be refused"
    );
    // A bad token in the subprotocol header.
    let refused = Ws::connect_raw(&server, &["parley.v1", "parley.auth.not-a-token"]).await;
    assert!(
        refused.is_err(),
        "an upgrade with a bad token must be refused"
    );

    // Three pings at once with a burst of two (the auth frame is not budgeted): one refused.
    let mut ws = Ws::connect(&server, &token(&unique("flood"))).await;
    for i in 0..3 {
        ws.send_json(json!({ "type": "ping", "id": format!("p{i}") }))
            .await;
    }
    let mut limited = 0;
    for _ in 0..3 {
        let f = ws.next_json().await.expect("answer");
        if f["type"] == "error" {
            assert_eq!(f["code"], "rate_limited", "{f}");
            limited += 1;
        }
    }
    assert_eq!(limited, 1, "one of three pings is over the burst");

    let after = Scrape::take(&server).await;
    assert_eq!(
        delta(
            &before,
            &after,
            "parley_upgrades_refused_total",
            &[("reason", "subprotocol")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "parley_upgrades_refused_total",
            &[("reason", "auth")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "parley_rate_limited_total",
            &[("limit", "ws_frames")]
        ),
        1.0
    );
}

/// Requests without a valid token from one address, past its failed-authentication budget, are
/// refused with 429 and counted under `parley_rate_limited_total{limit="auth_failures_per_ip"}`,
/// one per refusal.
#[tokio::test]
async fn refused_failed_authentications_are_counted_by_their_limit() {
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--auth-failures-per-minute")
        .arg("1")
        .arg("--auth-failure-burst")
        .arg("2")
        .start();
    let before = Scrape::take(&server).await;
    let http = reqwest::Client::new();
    let mut limited = 0.0;
    for _ in 0..5 {
        let res = http
            .get(server.url("/v1/channels"))
            .send()
            .await
            .expect("request");
        match res.status().as_u16() {
            401 => {}
            429 => limited += 1.0,
            other => panic!("a request without a token got {other}"),
        }
    }
    assert!(limited >= 1.0, "the budget of 2 failures refuses some of 5");
    let after = Scrape::take(&server).await;
    assert_eq!(
        delta(
            &before,
            &after,
            "parley_rate_limited_total",
            &[("limit", "auth_failures_per_ip")]
        ),
        limited
    );
}
