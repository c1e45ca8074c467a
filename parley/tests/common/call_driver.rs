//! A call participant for tests: a WebSocket to a Parley node, one str0m `Peer` per other
//! participant, and a background task that applies relayed `call.signal` frames to the peers
//! (offer → answer sent back, answer, trickled candidates). Shared by `calls.rs` and
//! `calls_multinode.rs`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::peer::{Peer, PeerConfig};
use super::{Api, Server, Ws, token};

/// Upper bound of every single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(10);

// ---- a call participant: a WebSocket, its WebRTC peers, its participant id ----

/// How the peers of a participant learn each other's ICE candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Candidates {
    /// In the SDP (the `a=candidate` line str0m writes).
    InSdp,
    /// Only as `candidate` signals trickled through Parley (stripped from the SDP).
    Trickle,
}

/// A request for the pump: send this frame (an `id` is added), reply with its ack or error.
pub type Request = (Value, oneshot::Sender<Value>);

/// What a participant and its pump task share.
pub struct Shared {
    pub name: String,
    call_id: String,
    pid: String,
    candidates: Candidates,
    /// One WebRTC peer per remote participant id.
    peers: Mutex<HashMap<String, Arc<Peer>>>,
    /// What went wrong in the pump (a refused automatic answer, a signal the peer rejected).
    errors: Mutex<Vec<String>>,
}

impl Shared {
    pub fn error(&self, e: String) {
        eprintln!("[{}] driver error: {e}", self.name);
        self.errors.lock().expect("errors").push(e);
    }

    pub fn peer(&self, remote: &str) -> Arc<Peer> {
        let mut peers = self.peers.lock().expect("peers");
        peers
            .entry(remote.to_owned())
            .or_insert_with(|| {
                let config = PeerConfig {
                    sdp_candidates: self.candidates == Candidates::InSdp,
                };
                Arc::new(Peer::with_config(format!("{}→{remote}", self.name), config))
            })
            .clone()
    }

    pub fn signal_frame(&self, to: &str, signal: Value) -> Value {
        json!({ "type": "call.signal", "call_id": self.call_id, "from": self.pid, "to": to, "signal": signal })
    }

    /// Applies a received `call.signal` to the peer of its sender; returns the signals to send
    /// back (the answer to an offer, then our trickled candidate).
    pub async fn apply(&self, frame: &Value) -> Vec<Value> {
        let from = frame["from"].as_str().unwrap_or_default().to_owned();
        if frame["call_id"] != json!(self.call_id) || frame["to"] != json!(self.pid) {
            self.error(format!("a signal for someone else: {frame}"));
            return Vec::new();
        }
        let signal = &frame["signal"];
        let peer = self.peer(&from);
        let mut out = Vec::new();
        match signal["kind"].as_str() {
            Some("offer") => {
                let sdp = signal["sdp"].as_str().unwrap_or_default();
                match peer.accept_offer(sdp).await {
                    Ok(answer) => {
                        out.push(
                            self.signal_frame(&from, json!({ "kind": "answer", "sdp": answer })),
                        );
                        if self.candidates == Candidates::Trickle {
                            match peer.local_candidate().await {
                                Ok(c) => out.push(self.signal_frame(
                                    &from,
                                    json!({ "kind": "candidate", "candidate": c }),
                                )),
                                Err(e) => self.error(format!("local candidate: {e:#}")),
                            }
                        }
                    }
                    Err(e) => self.error(format!("offer from {from} rejected: {e:#}")),
                }
            }
            Some("answer") => {
                let sdp = signal["sdp"].as_str().unwrap_or_default();
                if let Err(e) = peer.accept_answer(sdp).await {
                    self.error(format!("answer from {from} rejected: {e:#}"));
                }
            }
            Some("candidate") => {
                let c = signal["candidate"].as_str().unwrap_or_default();
                match peer.add_remote_candidate(c).await {
                    Ok(true) => {}
                    Ok(false) => self.error(format!("candidate from {from} ignored: {c}")),
                    Err(e) => self.error(format!("candidate from {from}: {e:#}")),
                }
            }
            _ => {}
        }
        out
    }
}

/// Reads the WebSocket: routes replies to requests, applies `call.signal` frames to the peers
/// (answering offers through Parley), and hands every other frame, signals included, to the
/// test. Ends when the socket or the request channel closes.
pub async fn pump(
    mut ws: Ws,
    shared: Arc<Shared>,
    mut requests: mpsc::UnboundedReceiver<Request>,
    frames: mpsc::UnboundedSender<Value>,
) {
    let mut next = 0u64;
    // Request id → who waits for the reply (None: an automatic answer or candidate).
    let mut waiting: HashMap<String, Option<oneshot::Sender<Value>>> = HashMap::new();
    loop {
        tokio::select! {
            request = requests.recv() => {
                let Some((mut frame, reply)) = request else { return };
                next += 1;
                let id = format!("t{next}");
                frame["id"] = json!(id);
                waiting.insert(id, Some(reply));
                ws.send_raw(WsMessage::Text(frame.to_string().into())).await;
            }
            message = ws.stream.next() => {
                let frame: Value = match message {
                    Some(Ok(WsMessage::Text(t))) => match serde_json::from_str(t.as_str()) {
                        Ok(v) => v,
                        Err(e) => {
                            shared.error(format!("not JSON from the server: {e}"));
                            continue;
                        }
                    },
                    Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => return,
                    Some(Ok(_)) => continue,
                };
                let is_reply = matches!(frame["type"].as_str(), Some("ack" | "error" | "pong"));
                if let (true, Some(id)) = (is_reply, frame["id"].as_str()) {
                    match waiting.remove(id) {
                        Some(Some(reply)) => {
                            let _ = reply.send(frame);
                        }
                        Some(None) if frame["type"] == "ack" => {}
                        Some(None) => shared.error(format!("an automatic signal was refused: {frame}")),
                        None => shared.error(format!("a reply to no request: {frame}")),
                    }
                    continue;
                }
                if frame["type"] == "call.signal" {
                    for mut out in shared.apply(&frame).await {
                        next += 1;
                        let id = format!("auto{next}");
                        out["id"] = json!(id);
                        waiting.insert(id, None);
                        ws.send_raw(WsMessage::Text(out.to_string().into())).await;
                    }
                }
                let _ = frames.send(frame);
            }
        }
    }
}

/// A running pump.
pub struct Conn {
    pub requests: mpsc::UnboundedSender<Request>,
    frames: mpsc::UnboundedReceiver<Value>,
    task: tokio::task::JoinHandle<()>,
}

/// A call participant: joined over REST, a WebSocket subscribed to the channel and attached to
/// the participant, and one WebRTC peer per other participant (kept across reconnects).
pub struct Participant {
    shared: Arc<Shared>,
    user: String,
    channel_id: String,
    /// The join response.
    pub joined: Value,
    conn: Option<Conn>,
    /// Frames read while waiting for another one.
    backlog: VecDeque<Value>,
}

impl Drop for Participant {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.task.abort();
        }
    }
}

impl Participant {
    /// Joins the call as `user` (REST), connects a WebSocket, subscribes to the channel and
    /// attaches the participant.
    pub async fn join(
        server: &Server,
        user: &str,
        channel_id: &str,
        call_id: &str,
        candidates: Candidates,
    ) -> Participant {
        let joined = server
            .api(user)
            .request("POST", &format!("/v1/calls/{call_id}/join"), None)
            .await
            .ok();
        let pid = joined["participant_id"]
            .as_str()
            .expect("participant_id")
            .to_owned();
        let mut p = Participant {
            shared: Arc::new(Shared {
                name: user.split('-').next().unwrap_or(user).to_owned(),
                call_id: call_id.to_owned(),
                pid,
                candidates,
                peers: Mutex::default(),
                errors: Mutex::default(),
            }),
            user: user.to_owned(),
            channel_id: channel_id.to_owned(),
            joined,
            conn: None,
            backlog: VecDeque::new(),
        };
        p.connect(server).await;
        let ack = p.attach().await;
        assert_eq!(ack["type"], "ack", "call.attach failed: {ack}");
        p
    }

    pub fn pid(&self) -> &str {
        &self.shared.pid
    }

    /// A new WebSocket with a new pump, subscribed to the channel (not attached).
    pub async fn connect(&mut self, server: &Server) {
        let ws = Ws::connect(server, &token(&self.user)).await;
        let (requests, request_rx) = mpsc::unbounded_channel();
        let (frame_tx, frames) = mpsc::unbounded_channel();
        let task = tokio::spawn(pump(ws, self.shared.clone(), request_rx, frame_tx));
        self.conn = Some(Conn {
            requests,
            frames,
            task,
        });
        self.backlog.clear();
        let channel_id = self.channel_id.clone();
        let ack = self
            .request(json!({ "type": "subscribe", "channel_id": channel_id }))
            .await;
        assert_eq!(ack["type"], "ack", "subscribe failed: {ack}");
    }

    /// Drops the WebSocket without a close frame (the TCP connection just ends).
    pub async fn kill_connection(&mut self) {
        let conn = self.conn.take().expect("connected");
        conn.task.abort();
        let _ = conn.task.await;
    }

    /// Sends a request frame; returns its ack or error.
    pub async fn request(&mut self, frame: Value) -> Value {
        let (tx, rx) = oneshot::channel();
        let conn = self.conn.as_ref().expect("connected");
        conn.requests
            .send((frame, tx))
            .expect("the pump is running");
        tokio::time::timeout(WAIT, rx)
            .await
            .expect("a reply within the wait")
            .expect("the pump stopped before the reply")
    }

    pub async fn attach(&mut self) -> Value {
        let frame = json!({ "type": "call.attach", "call_id": self.shared.call_id, "participant_id": self.pid() });
        self.request(frame).await
    }

    /// Sends a signal to `to` from our participant; returns the ack or error.
    pub async fn signal(&mut self, to: &str, signal: Value) -> Value {
        let frame = self.shared.signal_frame(to, signal);
        self.request(frame).await
    }

    /// The WebRTC peer facing the participant `remote` (created on first use).
    pub fn peer(&self, remote: &str) -> Arc<Peer> {
        self.shared.peer(remote)
    }

    /// Sends an offer (initial, or restarting ICE) to `to` through Parley, then, when
    /// trickling, our candidate.
    pub async fn offer(&mut self, to: &str, ice_restart: bool) {
        let peer = self.peer(to);
        let sdp = if ice_restart {
            peer.ice_restart_offer().await
        } else {
            peer.create_offer().await
        }
        .expect("an offer");
        let mut signal = json!({ "kind": "offer", "sdp": sdp });
        if ice_restart {
            signal["ice_restart"] = json!(true);
        }
        let ack = self.signal(to, signal).await;
        assert_eq!(ack["type"], "ack", "offer refused: {ack}");
        assert!(ack.get("rolled_back").is_none(), "{ack}");
        if self.shared.candidates == Candidates::Trickle {
            let c = peer.local_candidate().await.expect("our candidate");
            let ack = self
                .signal(to, json!({ "kind": "candidate", "candidate": c }))
                .await;
            assert_eq!(ack["type"], "ack", "candidate refused: {ack}");
        }
    }

    /// The next frame (other than replies) matching `pred`; earlier non-matching frames stay
    /// for later calls.
    pub async fn expect_frame(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i).expect("present");
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        let conn = self.conn.as_mut().expect("connected");
        loop {
            match tokio::time::timeout_at(deadline, conn.frames.recv()).await {
                Err(_) => panic!(
                    "[{}] no {what} within {WAIT:?}; frames meanwhile: {:?}",
                    self.shared.name, self.backlog
                ),
                Ok(None) => panic!("[{}] connection ended before {what}", self.shared.name),
                Ok(Some(f)) if pred(&f) => return f,
                Ok(Some(f)) => self.backlog.push_back(f),
            }
        }
    }

    /// Frames (other than replies) that arrive within `wait`, backlog first.
    pub async fn frames_within(&mut self, wait: Duration) -> Vec<Value> {
        let mut out: Vec<Value> = self.backlog.drain(..).collect();
        let conn = self.conn.as_mut().expect("connected");
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(f)) = tokio::time::timeout_at(deadline, conn.frames.recv()).await {
            out.push(f);
        }
        out
    }

    pub fn errors(&self) -> Vec<String> {
        self.shared.errors.lock().expect("errors").clone()
    }
}

/// Matches a frame of type `kind` whose `field` is `value`.
pub fn frame_is(kind: &'static str, field: &'static str, value: &str) -> impl Fn(&Value) -> bool {
    let value = value.to_owned();
    move |f: &Value| f["type"] == kind && f[field] == json!(value)
}

/// Matches a channel event `call.participant_left` of `pid` with `reason`.
pub fn left(pid: &str, reason: &'static str) -> impl Fn(&Value) -> bool {
    let pid = pid.to_owned();
    move |f: &Value| {
        f["type"] == "call.participant_left"
            && f["participant_id"] == json!(pid)
            && f["reason"] == reason
    }
}

/// Both sides of the pair are connected and the data channel is open on both.
pub async fn wait_pair(a: &Participant, b: &Participant) {
    let (ab, ba) = (a.peer(b.pid()), b.peer(a.pid()));
    for p in [&ab, &ba] {
        p.wait_connected(WAIT).await.expect("connected");
        p.wait_channel_open(WAIT).await.expect("channel open");
    }
}

/// Waits until `peer` has become connected `n` times (an ICE restart counts again).
pub async fn wait_connect_count(peer: &Peer, n: u32) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while peer.connect_count() < n || !peer.is_connected() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{peer:?} not connected {n} times within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `count` messages each way on the pair's data channel; checks they arrive in order.
pub async fn exchange(a: &Participant, b: &Participant, tag: &str, count: usize) {
    let (ab, ba) = (a.peer(b.pid()), b.peer(a.pid()));
    for i in 0..count {
        ab.send(&format!("{tag} a→b {i}")).await.expect("a sends");
        ba.send(&format!("{tag} b→a {i}")).await.expect("b sends");
    }
    for i in 0..count {
        assert_eq!(ba.recv(WAIT).await, Some(format!("{tag} a→b {i}")), "{tag}");
        assert_eq!(ab.recv(WAIT).await, Some(format!("{tag} b→a {i}")), "{tag}");
    }
}

pub fn calls_path(channel: &str) -> String {
    format!("/v1/channels/{channel}/calls")
}

/// Starts (or gets) the channel's call; returns its id.
pub async fn start_call(api: &Api, channel: &str) -> String {
    let body = api.request("POST", &calls_path(channel), None).await.ok();
    body["id"].as_str().expect("call id").to_owned()
}

pub fn assert_no_errors(ps: &[&Participant]) {
    for p in ps {
        assert_eq!(
            p.errors(),
            Vec::<String>::new(),
            "driver errors of {}",
            p.shared.name
        );
    }
}
