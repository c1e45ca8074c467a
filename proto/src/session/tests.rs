//! Scenarios that drive a session without a socket: inputs in, outputs out, time passed in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;
use crate::{Message, SendResult, SessionLimits};

const HEARTBEAT: Duration = Duration::from_secs(25);

fn config() -> SessionConfig {
    SessionConfig {
        heartbeat_interval: HEARTBEAT,
        heartbeat_timeout: Duration::from_secs(60),
        auth_timeout: Duration::from_secs(10),
        max_frames_before_auth: 16,
        outbox_limit: 64,
        limits: SessionLimits {
            max_frame_bytes: 64 * 1024,
            max_text_chars: 4000,
            frames_per_second: 50,
            frame_burst: 100,
            flood_close_after: 200,
            send_queue: 64,
            max_replay: 10,
            max_resume_channels: 3,
            resume_window_ms: 120_000,
            presence_grace_ms: 5_000,
            typing_throttle_ms: 3_000,
        },
    }
}

fn principal(user: &str) -> Principal {
    Principal {
        user_id: user.into(),
        tenant_id: "t1".into(),
        roles: vec![],
        expires_at: 2_000_000_000,
    }
}

fn verified(user: &str, expires_in: Duration) -> Verified {
    Verified {
        principal: principal(user),
        expires_in,
    }
}

/// A session and what it has output so far, taken apart.
struct Harness {
    s: Session,
    t0: Instant,
    frames: Vec<Value>,
    pings: usize,
    requests: Vec<Request>,
    closed: Option<Option<CloseCode>>,
}

impl Harness {
    fn new(cfg: SessionConfig) -> Harness {
        let t0 = Instant::now();
        Harness {
            s: Session::new(Arc::new(cfg), "ses_1".into(), None, t0),
            t0,
            frames: Vec::new(),
            pings: 0,
            requests: Vec::new(),
            closed: None,
        }
    }

    /// Authenticated with a token that has `expires_in` left; outputs so far drained.
    fn open(cfg: SessionConfig, expires_in: Duration) -> Harness {
        let t0 = Instant::now();
        let mut h = Harness {
            s: Session::new(
                Arc::new(cfg),
                "ses_1".into(),
                Some(verified("alice", expires_in)),
                t0,
            ),
            t0,
            frames: Vec::new(),
            pings: 0,
            requests: Vec::new(),
            closed: None,
        };
        h.drain();
        assert_eq!(h.frames[0]["type"], "welcome");
        h.frames.clear();
        h.requests.clear();
        h
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn text(&mut self, ms: u64, frame: Value) -> Verdict {
        let now = self.at(ms);
        let v = self.s.handle_input(now, Input::Text(&frame.to_string()));
        self.drain();
        v
    }

    fn reply(&mut self, ms: u64, tag: u64, reply: Reply) {
        let now = self.at(ms);
        self.s.handle_reply(now, tag, reply);
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(o) = self.s.poll_output() {
            assert!(self.closed.is_none(), "output after the close: {o:?}");
            match o {
                Output::Transmit(Transmit::Text(t) | Transmit::AfterEvents(t)) => {
                    self.frames.push(serde_json::from_str(&t).unwrap())
                }
                Output::Transmit(Transmit::Ping) => self.pings += 1,
                Output::Request(r) => self.requests.push(r),
                Output::Close(c) => self.closed = Some(c),
            }
        }
    }

    fn last_request(&self) -> &Request {
        self.requests.last().expect("a request")
    }
}

fn message(seq: u64, cmid: &str) -> SendResult {
    SendResult {
        message: serde_json::from_value::<Message>(json!({
            "id": format!("msg_{seq}"), "channel_id": "ch_1", "seq": seq, "sender_id": "alice",
            "client_msg_id": cmid, "text": "hi", "created_at": "2026-01-01T00:00:00Z",
        }))
        .unwrap(),
        created: true,
    }
}

#[test]
fn no_auth_frame_in_time_closes_with_4002() {
    let mut h = Harness::new(config());
    assert_eq!(h.s.poll_timeout(), Some(h.at(10_000)));
    h.s.handle_timeout(h.at(9_999));
    h.drain();
    assert!(h.closed.is_none() && h.frames.is_empty());
    h.s.handle_timeout(h.at(10_000));
    h.drain();
    assert_eq!(h.frames.len(), 1);
    assert_eq!(h.frames[0]["code"], "auth_required");
    assert_eq!(h.closed, Some(Some(CloseCode::AuthTimeout)));
}

#[test]
fn auth_frame_then_ack_and_welcome_with_timings_and_limits() {
    let mut h = Harness::new(config());
    h.text(
        5,
        json!({"type": "subscribe", "id": "x", "channel_id": "c"}),
    );
    assert_eq!(h.frames[0]["code"], "auth_required");
    assert!(h.requests.is_empty());
    h.text(10, json!({"type": "auth", "id": "a1", "token": "tok"}));
    assert!(
        !h.s.wants_read(),
        "no frame is read while the token is checked"
    );
    let Request {
        tag,
        op: Op::Authenticate { token },
    } = h.last_request().clone()
    else {
        panic!("expected authenticate: {:?}", h.requests);
    };
    assert_eq!(token, "tok");
    h.reply(
        11,
        tag,
        Reply::Verified(Ok(verified("alice", Duration::from_secs(3600)))),
    );
    assert!(matches!(h.last_request().op, Op::Open));
    assert_eq!(h.frames[1], json!({"type": "ack", "id": "a1"}));
    let w = &h.frames[2];
    assert_eq!(w["type"], "welcome");
    assert_eq!(w["session_id"], "ses_1");
    assert_eq!(w["user_id"], "alice");
    assert_eq!(w["tenant_id"], "t1");
    assert_eq!(w["heartbeat_interval_ms"], 25_000);
    assert_eq!(w["heartbeat_timeout_ms"], 60_000);
    assert_eq!(w["token_expires_at"], 2_000_000_000u64);
    assert_eq!(w["token_expires_in_ms"], 3_600_000);
    assert_eq!(w["limits"]["frames_per_second"], 50);
    assert_eq!(w["limits"]["max_resume_channels"], 3);
    assert!(h.s.wants_read());
    // Authenticated: no auth deadline, and a token an hour away needs no timer yet.
    assert_eq!(h.s.poll_timeout(), None);
}

#[test]
fn a_refused_token_closes_with_4001_and_too_many_frames_before_auth_too() {
    let mut h = Harness::new(config());
    h.text(0, json!({"type": "auth", "token": "bad"}));
    let tag = h.last_request().tag;
    h.reply(
        1,
        tag,
        Reply::Verified(Err(CoreError::new(
            ErrorCode::TokenBadSignature,
            "bad token",
        ))),
    );
    assert_eq!(h.frames[0]["code"], "token_bad_signature");
    assert_eq!(h.closed, Some(Some(CloseCode::AuthFailed)));

    let mut h = Harness::new(config());
    for i in 0..15 {
        h.text(i, json!({"type": "ping", "id": format!("p{i}")}));
        assert!(h.closed.is_none(), "closed after {i} frames");
    }
    h.text(20, json!({"type": "ping", "id": "p15"}));
    assert_eq!(h.frames.last().unwrap()["code"], "auth_required");
    assert_eq!(h.closed, Some(Some(CloseCode::AuthFailed)));
}

#[test]
fn refresh_with_the_same_user_extends_and_another_user_is_refused() {
    let mut h = Harness::open(config(), Duration::from_secs(30));
    // 30 s left is within two heartbeats: the expiry is a timeout.
    assert_eq!(h.s.poll_timeout(), Some(h.at(30_000)));
    h.text(
        1_000,
        json!({"type": "auth.refresh", "id": "r1", "token": "other"}),
    );
    let tag = h.last_request().tag;
    assert!(matches!(h.last_request().op, Op::Authenticate { .. }));
    h.reply(
        1_001,
        tag,
        Reply::Verified(Ok(verified("mallory", Duration::from_secs(3600)))),
    );
    assert_eq!(h.frames[0]["id"], "r1");
    assert_eq!(h.frames[0]["code"], "token_invalid_claims");
    assert_eq!(h.s.principal().unwrap().user_id, "alice");
    assert_eq!(h.s.poll_timeout(), Some(h.at(30_000)), "old token in force");

    h.text(
        2_000,
        json!({"type": "auth.refresh", "id": "r2", "token": "new"}),
    );
    let tag = h.last_request().tag;
    h.reply(
        2_001,
        tag,
        Reply::Verified(Ok(verified("alice", Duration::from_secs(3600)))),
    );
    assert_eq!(h.frames[1]["type"], "ack");
    assert_eq!(h.frames[1]["token_expires_in_ms"], 3_600_000);
    assert_eq!(h.s.poll_timeout(), None, "the new token is an hour away");
    h.s.handle_timeout(h.at(30_000));
    h.drain();
    assert!(
        h.closed.is_none(),
        "the refreshed token did not end the session"
    );
}

#[test]
fn token_expiry_closes_with_4011_at_exp() {
    let mut h = Harness::open(config(), Duration::from_secs(120));
    // Two minutes away: beyond two heartbeats, looked at again at the heartbeat.
    assert_eq!(h.s.poll_timeout(), None);
    h.s.handle_input(h.at(79_000), Input::Heard);
    h.s.handle_heartbeat(h.at(80_000));
    assert_eq!(h.s.poll_timeout(), Some(h.at(120_000)));
    h.s.handle_timeout(h.at(119_999));
    h.drain();
    assert!(h.closed.is_none());
    h.s.handle_timeout(h.at(120_000));
    h.drain();
    assert_eq!(h.frames.last().unwrap()["code"], "token_expired");
    assert_eq!(h.closed, Some(Some(CloseCode::TokenExpired)));
}

#[test]
fn flood_closes_with_4008_after_the_stated_number_of_refusals() {
    let mut cfg = config();
    cfg.limits.frame_burst = 5;
    cfg.limits.flood_close_after = 20;
    let mut h = Harness::open(cfg, Duration::from_secs(3600));
    for i in 0..5 {
        let v = h.text(0, json!({"type": "ping", "id": format!("p{i}")}));
        assert_eq!(v, Verdict::Accepted("ping"));
    }
    // Every further frame at the same instant is refused; the 20th refusal closes.
    for i in 0..19 {
        let v = h.text(0, json!({"type": "ping", "id": format!("r{i}")}));
        assert_eq!(v, Verdict::Refused);
        let last = h.frames.last().unwrap();
        assert_eq!(last["code"], "rate_limited");
        assert_eq!(last["id"], format!("r{i}"));
        assert_eq!(last["retry_after_ms"], 20);
        assert!(h.closed.is_none(), "closed after {} refusals", i + 1);
    }
    assert_eq!(
        h.text(0, json!({"type": "ping", "id": "last"})),
        Verdict::Refused
    );
    assert_eq!(h.closed, Some(Some(CloseCode::RateLimitFlood)));
}

#[test]
fn heartbeat_pings_and_silence_closes_with_4003() {
    let mut h = Harness::open(config(), Duration::from_secs(3600));
    h.s.handle_heartbeat(h.at(25_000));
    h.drain();
    assert_eq!(h.pings, 1);
    // A pong (or any frame) keeps it alive.
    h.s.handle_input(h.at(26_000), Input::Heard);
    h.s.handle_heartbeat(h.at(75_000));
    h.drain();
    assert_eq!(h.pings, 2);
    assert!(h.closed.is_none());
    // Then nothing for more than the 60 s timeout.
    h.s.handle_heartbeat(h.at(86_001));
    h.drain();
    assert_eq!(h.pings, 2);
    assert_eq!(h.closed, Some(Some(CloseCode::HeartbeatTimeout)));
}

fn resume_to(h: &mut Harness, channels: Value) -> u64 {
    h.text(
        0,
        json!({"type": "resume", "id": "res", "session_id": "ses_0", "channels": channels}),
    );
    h.last_request().tag
}

#[test]
fn resume_over_max_resume_channels_is_refused_without_work() {
    let mut h = Harness::open(config(), Duration::from_secs(3600));
    let chans: Vec<Value> = (0..4)
        .map(|i| json!({"channel_id": format!("c{i}"), "seq": 0}))
        .collect();
    h.text(
        0,
        json!({"type": "resume", "id": "res", "session_id": "s", "channels": chans}),
    );
    assert!(h.requests.is_empty(), "{:?}", h.requests);
    assert_eq!(h.frames[0]["code"], "invalid_argument");
    assert_eq!(h.frames[0]["id"], "res");
    assert!(h.s.wants_read());
}

#[test]
fn resume_replays_exactly_or_refuses_a_channel_too_far_behind() {
    let mut h = Harness::open(config(), Duration::from_secs(3600));
    let tag = resume_to(
        &mut h,
        json!([{"channel_id": "near", "seq": 5}, {"channel_id": "far", "seq": 1}]),
    );
    assert!(matches!(h.last_request().op, Op::CheckSession { .. }));
    assert!(!h.s.wants_read() && h.s.holds_events());
    h.reply(1, tag, Reply::SessionChecked(SessionStatus::Live));
    let Op::Subscribe { channel_id } = &h.last_request().op else {
        panic!()
    };
    assert_eq!(channel_id, "near");
    let tag = h.last_request().tag;
    h.reply(2, tag, Reply::Subscribed(Ok(7)));
    let Op::ChannelEvents {
        after,
        up_to,
        limit,
        ..
    } = h.last_request().op.clone()
    else {
        panic!()
    };
    assert_eq!((after, up_to, limit), (5, 7, 11));
    let tag = h.last_request().tag;
    let events: Vec<crate::ChannelEvent> = (6..=7)
        .map(|seq| {
            serde_json::from_value(json!({
                "type": "call.ended", "channel_id": "near", "seq": seq, "call_id": "call_1",
                "by": "alice",
            }))
            .unwrap()
        })
        .collect();
    h.reply(3, tag, Reply::Events(Ok(events)));
    assert_eq!(h.frames.len(), 2, "both missed events replayed");
    assert_eq!(h.frames[0]["seq"], 6);
    // The next channel: 100 behind, max_replay is 10.
    let tag = h.last_request().tag;
    assert!(matches!(&h.last_request().op, Op::Subscribe { channel_id } if channel_id == "far"));
    h.reply(4, tag, Reply::Subscribed(Ok(101)));
    let ack = h.frames.last().unwrap();
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["resumed"][0]["replayed"], true);
    assert_eq!(ack["resumed"][0]["events"], 2);
    assert_eq!(ack["resumed"][1]["replayed"], false);
    assert_eq!(ack["resumed"][1]["reason"], "too_far_behind");
    assert_eq!(ack["resumed"][1]["seq"], 101);
    assert!(h.s.wants_read() && !h.s.holds_events());
    assert_eq!(h.s.subscriptions().count(), 2);
}

#[test]
fn resume_short_read_is_refused_and_passed_window_refuses_all() {
    let mut h = Harness::open(config(), Duration::from_secs(3600));
    let tag = resume_to(&mut h, json!([{"channel_id": "a", "seq": 5}]));
    h.reply(1, tag, Reply::SessionChecked(SessionStatus::Live));
    let tag = h.last_request().tag;
    h.reply(2, tag, Reply::Subscribed(Ok(8)));
    let tag = h.last_request().tag;
    // Three missed, two read: never a partial replay.
    let ev = |seq: u64| -> crate::ChannelEvent {
        serde_json::from_value(json!({
            "type": "call.ended", "channel_id": "a", "seq": seq, "call_id": "call_1",
            "by": "alice",
        }))
        .unwrap()
    };
    h.reply(3, tag, Reply::Events(Ok(vec![ev(6), ev(7)])));
    assert_eq!(h.frames.len(), 1, "nothing replayed: {:?}", h.frames);
    assert_eq!(h.frames[0]["resumed"][0]["reason"], "too_far_behind");

    let mut h = Harness::open(config(), Duration::from_secs(3600));
    let tag = resume_to(&mut h, json!([{"channel_id": "a", "seq": 5}]));
    h.reply(1, tag, Reply::SessionChecked(SessionStatus::Expired));
    let tag = h.last_request().tag;
    h.reply(2, tag, Reply::Subscribed(Ok(6)));
    assert_eq!(h.frames[0]["resumed"][0]["reason"], "window_passed");
}

#[test]
fn pipelined_sends_are_handed_out_in_order_and_acked_in_order() {
    let mut h = Harness::open(config(), Duration::from_secs(3600));
    for i in 0..3 {
        h.text(
            i,
            json!({"type": "message.send", "id": format!("s{i}"), "channel_id": "ch_1",
                   "client_msg_id": format!("m{i}"), "text": "hi"}),
        );
        assert!(h.s.wants_read(), "sends do not hold the connection");
    }
    let sends: Vec<(u64, u64, String)> = h
        .requests
        .iter()
        .map(|r| match &r.op {
            Op::Send { seq, message, .. } => (r.tag, *seq, message.client_msg_id.clone()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        sends.iter().map(|s| s.1).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "send seqs count up without gaps"
    );
    assert!(sends.windows(2).all(|w| w[0].0 < w[1].0), "tags increase");
    assert_eq!(sends[0].2, "m0");
    // Results come back 3, 1, 2: acks leave 1, 2, 3.
    h.reply(10, sends[2].0, Reply::Sent(Ok(message(3, "m2"))));
    assert!(h.frames.is_empty(), "ack of the third held for the first");
    h.reply(11, sends[0].0, Reply::Sent(Ok(message(1, "m0"))));
    assert_eq!(h.frames.len(), 1);
    h.reply(
        12,
        sends[1].0,
        Reply::Sent(Err(CoreError::new(ErrorCode::NotAMember, "no"))),
    );
    let ids: Vec<&str> = h.frames.iter().map(|f| f["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["s0", "s1", "s2"]);
    assert_eq!(h.frames[0]["seq"], 1);
    assert_eq!(h.frames[1]["code"], "not_a_member");
    assert_eq!(h.frames[2]["seq"], 3);
}

#[test]
fn a_peer_that_takes_nothing_is_closed_as_a_slow_consumer() {
    let mut cfg = config();
    cfg.outbox_limit = 20;
    cfg.limits.max_replay = 0;
    cfg.limits.frame_burst = 1000;
    let t0 = Instant::now();
    let mut s = Session::new(
        Arc::new(cfg),
        "ses".into(),
        Some(verified("alice", Duration::from_secs(3600))),
        t0,
    );
    // The driver takes the welcome, then its writes stop: it takes nothing more.
    while s.poll_output().is_some() {}
    for i in 0..21 {
        s.handle_input(
            t0,
            Input::Text(&json!({"type": "ping", "id": format!("p{i}")}).to_string()),
        );
        assert_eq!(s.closing(), None, "closed after {i} frames");
    }
    s.handle_input(t0, Input::Text(r#"{"type":"ping","id":"one-more"}"#));
    assert_eq!(s.closing(), Some(Some(CloseCode::SlowConsumer)));
    // It would not read them: nothing queued is left to write before the close.
    assert!(matches!(
        s.poll_output(),
        Some(Output::Close(Some(CloseCode::SlowConsumer)))
    ));
    assert!(s.poll_output().is_none());
}

#[test]
fn a_frame_too_big_closes_with_1009_and_binary_is_refused() {
    let mut h = Harness::open(config(), Duration::from_secs(3600));
    h.s.handle_input(h.at(0), Input::Binary);
    h.drain();
    assert_eq!(h.frames[0]["code"], "invalid_request");
    assert!(h.closed.is_none());
    h.s.handle_input(h.at(1), Input::TooBig);
    h.drain();
    assert_eq!(h.closed, Some(Some(CloseCode::MessageTooBig)));
    // Nothing after the close is acted on.
    h.s.handle_input(h.at(2), Input::Text(r#"{"type":"ping","id":"p"}"#));
    assert!(h.s.poll_output().is_none());
}

#[test]
fn subscribe_failure_forgets_the_channel_and_unread_lookups_coalesce() {
    let mut h = Harness::open(config(), Duration::from_secs(3600));
    h.text(
        0,
        json!({"type": "subscribe", "id": "s1", "channel_id": "c1"}),
    );
    assert!(!h.s.wants_read());
    assert_eq!(h.s.subscriptions().collect::<Vec<_>>(), vec!["c1"]);
    let tag = h.last_request().tag;
    h.reply(
        1,
        tag,
        Reply::Subscribed(Err(CoreError::new(ErrorCode::NotAMember, "no"))),
    );
    assert_eq!(h.frames[0]["code"], "not_a_member");
    assert_eq!(h.s.subscriptions().count(), 0);

    h.requests.clear();
    h.s.unread_changed("c1");
    h.s.unread_changed("c2");
    h.s.unread_changed("c2");
    h.drain();
    assert_eq!(h.requests.len(), 1, "one lookup at a time");
    let tag = h.last_request().tag;
    h.reply(
        2,
        tag,
        Reply::ReadState(Err(CoreError::new(ErrorCode::Internal, "x"))),
    );
    assert!(h.frames.len() == 1, "a failed lookup says nothing");
    let tag = h.last_request().tag;
    let state = crate::ReadState {
        channel_id: "c2".into(),
        last_read_seq: 3,
        unread_count: 4,
        seq: None,
    };
    h.reply(2, tag, Reply::ReadState(Ok(state)));
    assert_eq!(h.frames.last().unwrap()["type"], "unread.updated");
    assert_eq!(h.requests.len(), 2, "then the other channel");
    let tag = h.last_request().tag;
    h.reply(
        3,
        tag,
        Reply::ReadState(Err(CoreError::new(ErrorCode::Internal, "x"))),
    );
    assert_eq!(h.requests.len(), 2, "and no more");
}

#[test]
fn a_refused_refresh_leaves_the_old_token_which_still_ends_the_session_with_4011() {
    let mut h = Harness::open(config(), Duration::from_secs(30));
    h.text(
        1_000,
        json!({"type": "auth.refresh", "id": "r1", "token": "other"}),
    );
    let tag = h.last_request().tag;
    h.reply(
        1_001,
        tag,
        Reply::Verified(Ok(verified("mallory", Duration::from_secs(3600)))),
    );
    assert_eq!(h.frames[0]["code"], "token_invalid_claims");
    // An expired token of the right user is refused too (the verifier's leeway let it through).
    h.text(
        2_000,
        json!({"type": "auth.refresh", "id": "r2", "token": "stale"}),
    );
    let tag = h.last_request().tag;
    h.reply(
        2_001,
        tag,
        Reply::Verified(Ok(verified("alice", Duration::ZERO))),
    );
    assert_eq!(h.frames[1]["code"], "token_expired");
    assert!(h.closed.is_none());
    h.s.handle_timeout(h.at(30_000));
    h.drain();
    assert_eq!(h.frames.last().unwrap()["code"], "token_expired");
    assert_eq!(h.closed, Some(Some(CloseCode::TokenExpired)));
}

#[test]
fn the_token_deadline_is_not_a_timer_until_it_is_near_and_a_past_one_closes_at_open() {
    let mut h = Harness::open(config(), Duration::from_secs(3600));
    assert_eq!(h.s.poll_timeout(), None);
    // Opened with a token that is already past its exp: welcome, then the 4011.
    let t0 = Instant::now();
    let mut s = Session::new(
        Arc::new(config()),
        "ses".into(),
        Some(verified("alice", Duration::ZERO)),
        t0,
    );
    let mut outs = Vec::new();
    while let Some(o) = s.poll_output() {
        outs.push(o);
    }
    assert!(matches!(
        outs.last(),
        Some(Output::Close(Some(CloseCode::TokenExpired)))
    ));
    let texts: Vec<Value> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Transmit(Transmit::Text(t)) => Some(serde_json::from_str(t).unwrap()),
            _ => None,
        })
        .collect();
    assert_eq!(texts[0]["type"], "welcome");
    assert_eq!(texts[1]["code"], "token_expired");
    h.s.handle_heartbeat(h.at(1_000));
    h.drain();
    assert_eq!(h.pings, 1);
}

fn read_state(channel_id: &str, last_read_seq: u64, unread_count: u64, seq: u64) -> ReadState {
    ReadState {
        channel_id: channel_id.into(),
        last_read_seq,
        unread_count,
        seq: Some(seq),
    }
}

/// Subscribes to `channel_id`, live after `live_from`; outputs drained.
fn subscribed(h: &mut Harness, channel_id: &str, live_from: u64) {
    h.text(
        0,
        json!({"type": "subscribe", "id": "s", "channel_id": channel_id}),
    );
    let tag = h.last_request().tag;
    h.reply(0, tag, Reply::Subscribed(Ok(live_from)));
    h.frames.clear();
    h.requests.clear();
}

fn unread_frames(h: &Harness) -> Vec<&Value> {
    h.frames
        .iter()
        .filter(|f| f["type"] == "unread.updated")
        .collect()
}

use crate::ReadState;
use crate::unread::UnreadEvent;

#[test]
fn unread_counts_follow_the_events_after_one_lookup() {
    let mut h = Harness::open(config(), Duration::from_secs(3600));
    subscribed(&mut h, "c1", 10);
    // The first change: the count is read once.
    h.s.unread_event("c1", 11, UnreadEvent::New);
    h.drain();
    assert_eq!(h.requests.len(), 1);
    let Request {
        tag,
        op: Op::ReadState { channel_id },
    } = h.last_request().clone()
    else {
        panic!("a lookup: {:?}", h.requests)
    };
    assert_eq!(channel_id, "c1");
    // Two more arrive while it is out: no second lookup.
    h.s.unread_event("c1", 12, UnreadEvent::New);
    h.s.unread_event("c1", 13, UnreadEvent::New);
    h.drain();
    assert_eq!(h.requests.len(), 1, "one lookup");
    // It read the channel at seq 12: 13 is counted on top.
    h.reply(1, tag, Reply::ReadState(Ok(read_state("c1", 4, 6, 12))));
    assert_eq!(
        unread_frames(&h),
        vec![
            &json!({"type": "unread.updated", "channel_id": "c1", "unread_count": 7, "last_read_seq": 4})
        ]
    );
    // From now on no lookup: each batch of events makes one frame with the latest count.
    h.frames.clear();
    for seq in 14..=16 {
        h.s.unread_event("c1", seq, UnreadEvent::New);
    }
    h.s.unread_event("c1", 17, UnreadEvent::Deleted { message_seq: 3 });
    h.s.unread_event("c1", 18, UnreadEvent::Deleted { message_seq: 15 });
    h.drain();
    assert_eq!(h.requests.len(), 1, "no further lookup");
    assert_eq!(
        unread_frames(&h),
        vec![
            &json!({"type": "unread.updated", "channel_id": "c1", "unread_count": 9, "last_read_seq": 4})
        ],
        "one frame for the batch: +3, a read message deleted, an unread one deleted"
    );
    // Nothing changed, nothing said.
    h.frames.clear();
    h.s.unread_event("c1", 19, UnreadEvent::Deleted { message_seq: 2 });
    h.drain();
    assert!(h.frames.is_empty(), "{:?}", h.frames);
}

#[test]
fn reads_from_this_and_other_connections_move_the_count() {
    let mut h = Harness::open(config(), Duration::from_secs(3600));
    subscribed(&mut h, "c1", 0);
    h.s.unread_pushed(read_state("c1", 0, 5, 5));
    h.drain();
    assert!(h.requests.is_empty(), "a pushed state needs no lookup");
    assert_eq!(unread_frames(&h)[0]["unread_count"], 5);
    h.frames.clear();
    // This connection reads up to 3; events 6 and 7 arrive before the answer (as of seq 5).
    h.text(
        1,
        json!({"type": "read", "id": "r1", "channel_id": "c1", "seq": 3}),
    );
    let tag = h.last_request().tag;
    h.s.unread_event("c1", 6, UnreadEvent::New);
    h.s.unread_event("c1", 7, UnreadEvent::New);
    h.drain();
    assert_eq!(unread_frames(&h).last().unwrap()["unread_count"], 7);
    h.frames.clear();
    h.reply(2, tag, Reply::ReadState(Ok(read_state("c1", 3, 2, 5))));
    assert_eq!(h.frames[0]["type"], "ack");
    assert_eq!(
        unread_frames(&h),
        vec![
            &json!({"type": "unread.updated", "channel_id": "c1", "unread_count": 4, "last_read_seq": 3})
        ]
    );
    // The core's push of the same read comes after: nothing new.
    h.frames.clear();
    h.s.unread_pushed(read_state("c1", 3, 2, 5));
    h.drain();
    assert!(h.frames.is_empty(), "{:?}", h.frames);
    // Another device read to the end while event 8 was on its way here.
    h.s.unread_pushed(read_state("c1", 8, 0, 8));
    h.s.unread_event("c1", 8, UnreadEvent::New);
    h.drain();
    assert_eq!(
        unread_frames(&h),
        vec![
            &json!({"type": "unread.updated", "channel_id": "c1", "unread_count": 0, "last_read_seq": 8})
        ]
    );
    // A channel this connection does not follow: passed on as it is.
    h.frames.clear();
    h.s.unread_pushed(read_state("elsewhere", 2, 1, 9));
    h.drain();
    assert_eq!(
        h.frames,
        vec![
            json!({"type": "unread.updated", "channel_id": "elsewhere", "unread_count": 1, "last_read_seq": 2})
        ]
    );
    assert!(
        h.requests
            .iter()
            .all(|r| !matches!(r.op, Op::ReadState { .. }))
    );
}

#[test]
fn a_resume_that_missed_events_reads_the_count_once_after_its_ack() {
    let mut h = Harness::open(config(), Duration::from_secs(3600));
    let tag = resume_to(&mut h, json!([{"channel_id": "a", "seq": 5}]));
    h.reply(1, tag, Reply::SessionChecked(SessionStatus::Live));
    let tag = h.last_request().tag;
    h.reply(2, tag, Reply::Subscribed(Ok(6)));
    let tag = h.last_request().tag;
    assert!(matches!(h.last_request().op, Op::ChannelEvents { .. }));
    let ev: crate::ChannelEvent = serde_json::from_value(json!({
        "type": "call.ended", "channel_id": "a", "seq": 6, "call_id": "call_1", "by": "alice",
    }))
    .unwrap();
    h.reply(3, tag, Reply::Events(Ok(vec![ev])));
    assert_eq!(h.frames.last().unwrap()["type"], "ack");
    let Request {
        tag,
        op: Op::ReadState { channel_id },
    } = h.last_request().clone()
    else {
        panic!("a lookup after the ack: {:?}", h.requests)
    };
    assert_eq!(channel_id, "a");
    h.reply(4, tag, Reply::ReadState(Ok(read_state("a", 5, 1, 6))));
    assert_eq!(
        h.frames.last().unwrap(),
        &json!({"type": "unread.updated", "channel_id": "a", "unread_count": 1, "last_read_seq": 5})
    );
}

#[test]
fn unread_frames_leave_after_the_events_they_count() {
    let mut h = Harness::open(config(), Duration::from_secs(3600));
    subscribed(&mut h, "c1", 0);
    h.s.unread_pushed(read_state("c1", 0, 0, 0));
    h.s.unread_event("c1", 1, UnreadEvent::New);
    let mut outputs = Vec::new();
    while let Some(o) = h.s.poll_output() {
        outputs.push(o);
    }
    assert_eq!(outputs.len(), 1, "{outputs:?}");
    assert!(
        matches!(&outputs[0], Output::Transmit(Transmit::AfterEvents(t)) if t.contains("\"unread_count\":1")),
        "{outputs:?}"
    );
}

#[test]
fn after_a_bus_resync_the_next_change_reads_the_count_again() {
    let mut h = Harness::open(config(), Duration::from_secs(3600));
    subscribed(&mut h, "c1", 0);
    h.s.unread_pushed(read_state("c1", 0, 2, 2));
    h.s.unread_event("c1", 3, UnreadEvent::New);
    h.drain();
    assert!(h.requests.is_empty());
    assert_eq!(unread_frames(&h).last().unwrap()["unread_count"], 3);
    // A push may have been lost with the bus messages: nothing is said until the next change,
    // which is read from storage rather than counted on a count that may be stale.
    h.s.unread_resync();
    h.drain();
    assert!(h.requests.is_empty(), "no lookup storm at the resync");
    h.s.unread_event("c1", 4, UnreadEvent::New);
    h.drain();
    let Request {
        tag,
        op: Op::ReadState { .. },
    } = h.last_request().clone()
    else {
        panic!("a lookup: {:?}", h.requests)
    };
    h.frames.clear();
    // Another device had read up to 3 (its push was lost): 1 unread, not 4.
    h.reply(1, tag, Reply::ReadState(Ok(read_state("c1", 3, 1, 4))));
    assert_eq!(
        unread_frames(&h),
        vec![
            &json!({"type": "unread.updated", "channel_id": "c1", "unread_count": 1, "last_read_seq": 3})
        ]
    );
}

/// Every idle connection holds its machine: what only a busy connection needs (queued outputs,
/// requests waiting for replies, sends, unread lookups, a resume, the flood meter) is boxed and
/// given back when done. Fails if the machine regrows.
#[test]
fn an_idle_session_stays_small() {
    let size = std::mem::size_of::<Session>();
    println!("size_of::<Session>() = {size} B");
    // 408 B before the busy state was boxed.
    assert!(size <= 224, "Session is {size} B");
}
