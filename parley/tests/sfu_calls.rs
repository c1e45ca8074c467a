//! Calls through the SFU, end to end through the real binary on 127.0.0.1: users join over
//! REST, negotiate with the reserved peer `sfu` over the WebSocket (`call.signal`), and real
//! WebRTC clients (str0m, the SFU crate's test clients: synthetic VP8 simulcast and Opus, one
//! UDP socket on 127.0.0.1 each) send media to the SFU inside the server. Every receiver counts
//! RTP packets and keyframes per receive slot, and reads the source tag inside each frame, so a
//! test knows exactly which publisher's track reached whom.

mod common;
#[path = "../../sfu/tests/common/mod.rs"]
#[allow(unused_imports)]
mod media;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::{Backend, Server, ServerBuilder, Ws, token, unique};
const SECRET: &str = "sfu-test-shared-secret";
use media::{Client, ClientConfig};
use serde_json::{Value, json};

/// How long media flows before the counts are read.
const MEDIA: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(10);

/// Publishes audio and simulcast video, and receives `slots` mids of each kind.
fn publisher(slots: usize) -> ClientConfig {
    ClientConfig {
        recv_audio: slots,
        recv_video: slots,
        ..ClientConfig::publisher(-40)
    }
}

/// A call participant: its WebSocket (subscribed to the channel, attached to the participant),
/// every frame it read, and its media client (named after the participant's index).
struct Member {
    name: String,
    user: String,
    pid: String,
    call_id: String,
    joined: Value,
    ws: Ws,
    /// Every frame read so far, in order.
    seen: Vec<Value>,
    client: Option<Client>,
}

impl Member {
    /// Connects a WebSocket for `user` and subscribes to the channel.
    async fn connect(server: &Server, name: &str, user: &str, channel: &str) -> Member {
        let mut ws = Ws::connect(server, &token(user)).await;
        ws.subscribe(channel).await;
        Member {
            name: name.to_owned(),
            user: user.to_owned(),
            pid: String::new(),
            call_id: String::new(),
            joined: Value::Null,
            ws,
            seen: Vec::new(),
            client: None,
        }
    }

    /// Joins the call over REST (again: the same participant, a fresh `sfu` block) and
    /// attaches the participant to the WebSocket the first time.
    async fn join(&mut self, server: &Server, call_id: &str) -> Value {
        let joined = server
            .api(&self.user)
            .request("POST", &format!("/v1/calls/{call_id}/join"), None)
            .await
            .ok();
        let pid = joined["participant_id"].as_str().expect("pid").to_owned();
        if self.pid.is_empty() {
            self.pid = pid;
            self.call_id = call_id.to_owned();
            let ack = self
                .request(
                    json!({"type": "call.attach", "call_id": call_id, "participant_id": self.pid}),
                )
                .await;
            assert_eq!(ack["type"], "ack", "attach: {ack}");
        } else {
            assert_eq!(pid, self.pid, "joining again keeps the participant");
        }
        self.joined = joined.clone();
        joined
    }

    async fn request(&mut self, frame: Value) -> Value {
        let reply = self.ws.request(frame).await;
        self.drain_backlog().await;
        reply
    }

    /// Moves frames `Ws::request` kept aside into `seen`.
    async fn drain_backlog(&mut self) {
        while let Ok(Some(f)) =
            tokio::time::timeout(Duration::from_millis(1), self.ws.next_json()).await
        {
            self.seen.push(f);
        }
    }

    /// The id of the `kind` track `publisher` published, from the `call.sfu` notices.
    async fn published_track(&mut self, what: &str, publisher: &str, kind: &str) -> String {
        self.wait_for(what, |f| {
            f["type"] == "call.sfu"
                && f["event"] == "track_published"
                && f["publisher"] == publisher
                && f["kind"] == kind
        })
        .await["track_id"]
            .as_str()
            .expect("track id")
            .to_owned()
    }

    /// Unsubscribes from `track` over `call.sfu`; the server acks it.
    async fn unsubscribe(&mut self, track: &str, what: &str) {
        let (call_id, pid) = (self.call_id.clone(), self.pid.clone());
        let ack = self
            .request(json!({"type": "call.sfu", "call_id": call_id, "participant_id": pid, "op": "unsubscribe", "track_id": track}))
            .await;
        assert_eq!(ack["type"], "ack", "{what}: {ack}");
    }

    /// The first frame (already seen or arriving within `WAIT`) that matches.
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for_from(0, what, pred).await
    }

    /// The first frame from `seen[start..]` on (or arriving within `WAIT`) that matches.
    async fn wait_for_from(
        &mut self,
        start: usize,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        if let Some(f) = self.seen.iter().skip(start).find(|f| pred(f)) {
            return f.clone();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.ws.next_json()).await {
                Ok(Some(f)) => {
                    self.seen.push(f.clone());
                    if pred(&f) {
                        return f;
                    }
                }
                Ok(None) => panic!("{}: connection closed waiting for {what}", self.name),
                Err(_) => panic!(
                    "{}: no {what} within {WAIT:?}; seen: {:?}",
                    self.name, self.seen
                ),
            }
        }
    }

    /// Reads whatever arrives for `within`.
    async fn read_for(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        while let Ok(Some(f)) = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            self.ws.next_json(),
        )
        .await
        {
            self.seen.push(f);
        }
    }

    /// Sends `call.signal` to `sfu`; returns the ack or error.
    async fn signal_sfu(&mut self, signal: Value) -> Value {
        let frame = json!({"type": "call.signal", "call_id": self.call_id, "from": self.pid, "to": "sfu", "signal": signal});
        self.request(frame).await
    }

    /// Opens the media connection to the SFU: offer with the join answer's credential, the
    /// answer from `sfu`, ICE/DTLS up.
    async fn connect_media(&mut self, config: ClientConfig) {
        let client = Client::new(&self.name, config).await;
        let offer = client.offer(0, 0).await.expect("offer");
        let mark = self.seen.len();
        let credential = self.joined["sfu"]["credential"]
            .as_str()
            .expect("an sfu block in the join answer")
            .to_owned();
        let ack = self
            .signal_sfu(json!({"kind": "offer", "sdp": offer, "credential": credential}))
            .await;
        assert_eq!(
            ack["type"], "ack",
            "{}: offer to sfu refused: {ack}",
            self.name
        );
        let answer = self
            .wait_for_from(mark, "the SFU's answer", |f| {
                f["type"] == "call.signal" && f["from"] == "sfu" && f["signal"]["kind"] == "answer"
            })
            .await;
        assert_eq!(answer["role"], "impolite");
        client
            .accept_answer(answer["signal"]["sdp"].as_str().expect("sdp"))
            .await
            .expect("answer applies");
        client.wait_connected().await.expect("connected to the SFU");
        self.client = Some(client);
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("media connected")
    }

    /// `call.sfu` notices seen with this `event`.
    fn notices(&self, event: &str) -> Vec<Value> {
        self.seen
            .iter()
            .filter(|f| f["type"] == "call.sfu" && f["event"] == event)
            .cloned()
            .collect()
    }

    /// The receive slot (mid) carrying `track_id` (last binding wins).
    fn bound_mid(&self, track_id: &str) -> Option<String> {
        self.notices("bound")
            .iter()
            .rev()
            .find(|n| n["track_id"] == track_id)
            .and_then(|n| n["mid"].as_str().map(str::to_owned))
    }

    /// The track ids `publisher` published, by kind (from `track_published` notices).
    fn tracks_of(&self, publisher: &str) -> HashMap<String, String> {
        self.notices("track_published")
            .iter()
            .filter(|n| n["publisher"] == publisher)
            .map(|n| {
                (
                    n["kind"].as_str().unwrap_or_default().to_owned(),
                    n["track_id"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// The publishers and kinds that reached this client (`<name>/a`, `<name>/v`), from the
    /// source tags inside the frames.
    fn received_sources(&self) -> BTreeSet<String> {
        self.client()
            .sources()
            .iter()
            .map(|s| s.rsplit_once('/').map_or(s.clone(), |(p, _)| p.to_owned()))
            .collect()
    }
}

fn server(extra: &[&str]) -> Server {
    let mut b = ServerBuilder::new(Backend::Sqlite);
    for a in ["--max-call-participants", "16"].iter().chain(extra) {
        b = b.arg(*a);
    }
    b.start()
}

/// `n` users in one channel, each with a connected, subscribed WebSocket; returns the channel
/// and the members (named `p0`, `p1`, ...).
async fn members(server: &Server, n: usize) -> (String, Vec<Member>) {
    let users: Vec<String> = (0..n).map(|i| unique(&format!("p{i}"))).collect();
    let refs: Vec<&str> = users.iter().skip(1).map(String::as_str).collect();
    let channel = server
        .api(&users[0])
        .create_channel(&unique("sfu"), &refs)
        .await;
    let mut out = Vec::new();
    for (i, u) in users.iter().enumerate() {
        out.push(Member::connect(server, &format!("p{i}"), u, &channel).await);
    }
    (channel, out)
}

async fn start_call(server: &Server, user: &str, channel: &str) -> Value {
    server
        .api(user)
        .request("POST", &format!("/v1/channels/{channel}/calls"), None)
        .await
        .ok()
}

/// Checks one subscriber: the set of (publisher, kind) that reached it is `expected`, and
/// each expected track arrived on the slot the SFU bound it to, with enough packets and, for
/// video, at least one keyframe.
fn check_received(sub: &Member, expected: &BTreeSet<String>, track_of: &HashMap<String, String>) {
    let got = sub.received_sources();
    assert_eq!(&got, expected, "{}: the tracks that arrived", sub.name);
    let received = sub.client().received();
    for source in expected {
        let track = track_of.get(source).expect("a published track");
        let mid = sub
            .bound_mid(track)
            .unwrap_or_else(|| panic!("{}: no bound notice for {source}", sub.name));
        let stats = received.get(&mid).cloned().unwrap_or_default();
        let only_this = stats
            .sources
            .keys()
            .all(|s| s.starts_with(&format!("{source}/")));
        assert!(
            only_this,
            "{}: slot {mid} carried {:?}",
            sub.name, stats.sources
        );
        if source.ends_with("/a") {
            assert!(stats.packets >= 50, "{}: {source}: {stats:?}", sub.name);
        } else {
            assert!(stats.frames >= 10, "{}: {source}: {stats:?}", sub.name);
            assert!(stats.keyframes >= 1, "{}: {source}: {stats:?}", sub.name);
            assert!(stats.packets >= stats.frames, "{}: {stats:?}", sub.name);
        }
    }
}

/// Every published track, `<publisher name>/<a|v>` → track id, as `who` learned them.
fn track_map(who: &Member, publishers: &[&Member]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for p in publishers {
        for (kind, id) in who.tracks_of(&p.pid) {
            let k = if kind == "audio" { "a" } else { "v" };
            out.insert(format!("{}/{k}", p.name), id);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_escalates_at_the_threshold_and_media_flows_through_the_sfu() {
    let server = server(&[]);
    let (channel, mut ms) = members(&server, 4).await;
    let call = start_call(&server, &ms[0].user, &channel).await;
    let call_id = call["id"].as_str().expect("call id").to_owned();
    assert_eq!(call["mode"], "p2p");
    // Three participants: still a mesh.
    for m in ms.iter_mut().take(3) {
        let joined = m.join(&server, &call_id).await;
        assert_eq!(joined["call"]["mode"], "p2p", "{}: {joined}", m.name);
        assert!(joined.get("sfu").is_none(), "no SFU access in a P2P call");
    }
    // The SFU refuses to negotiate in a P2P call.
    let refused = ms[0]
        .signal_sfu(json!({"kind": "offer", "sdp": "v=0"}))
        .await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["reason"], "not_sfu", "{refused}");
    // The fourth join reaches the default threshold of 4.
    let joined = ms[3].join(&server, &call_id).await;
    assert_eq!(joined["call"]["mode"], "sfu", "{joined}");
    let session = joined["call"]["sfu_session"]
        .as_str()
        .expect("sfu_session")
        .to_owned();
    assert_eq!(joined["sfu"]["session"], session.as_str());
    assert!(joined["sfu"]["expires_at"].as_u64().is_some());
    // Everyone subscribed to the channel is told; the others join again for their credential.
    for m in ms.iter_mut() {
        let changed = m
            .wait_for("call.mode_changed", |f| f["type"] == "call.mode_changed")
            .await;
        assert_eq!(changed["call_id"], call_id.as_str());
        assert_eq!(changed["mode"], "sfu");
        assert_eq!(changed["reason"], "threshold");
        assert_eq!(changed["sfu_session"], session.as_str());
    }
    for m in ms.iter_mut().take(3) {
        let again = m.join(&server, &call_id).await;
        assert_eq!(again["call"]["mode"], "sfu");
        assert_eq!(again["sfu"]["session"], session.as_str());
    }
    // The call object shows the mode too.
    let got = server
        .api(&ms[0].user)
        .get(&format!("/v1/calls/{call_id}"))
        .await
        .ok();
    assert_eq!(got["mode"], "sfu");
    assert_eq!(got["sfu_session"], session.as_str());

    // Everyone publishes audio and video and has slots for the three others.
    for m in ms.iter_mut() {
        m.connect_media(publisher(3)).await;
    }
    for m in &ms {
        m.client().start_media();
    }
    tokio::time::sleep(MEDIA).await;
    for m in ms.iter_mut() {
        m.read_for(Duration::from_millis(200)).await;
    }
    let refs: Vec<&Member> = ms.iter().collect();
    for (i, m) in ms.iter().enumerate() {
        let others: Vec<&Member> = refs.iter().copied().filter(|o| o.pid != m.pid).collect();
        let expected: BTreeSet<String> = others
            .iter()
            .flat_map(|o| [format!("{}/a", o.name), format!("{}/v", o.name)])
            .collect();
        let tracks = track_map(m, &others);
        assert_eq!(tracks.len(), 6, "{}: track notices {:?}", m.name, m.seen);
        check_received(m, &expected, &tracks);
        assert!(
            !m.notices("connected").is_empty(),
            "p{i}: no connected notice"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publisher_reaches_eight_subscribers_through_the_binary() {
    let server = server(&["--sfu-always"]);
    let (channel, mut ms) = members(&server, 9).await;
    let call = start_call(&server, &ms[0].user, &channel).await;
    assert_eq!(call["mode"], "sfu", "--sfu-always: {call}");
    let call_id = call["id"].as_str().expect("call id").to_owned();
    for m in ms.iter_mut() {
        let joined = m.join(&server, &call_id).await;
        assert_eq!(joined["call"]["mode"], "sfu");
    }
    ms[0].connect_media(publisher(0)).await;
    for m in ms.iter_mut().skip(1) {
        m.connect_media(ClientConfig::receiver(1)).await;
    }
    ms[0].client().start_media();
    tokio::time::sleep(MEDIA).await;
    for m in ms.iter_mut() {
        m.read_for(Duration::from_millis(200)).await;
    }
    let expected: BTreeSet<String> = ["p0/a".to_owned(), "p0/v".to_owned()].into();
    let (publisher, subs) = ms.split_first().expect("members");
    for s in subs {
        let tracks = track_map(s, &[publisher]);
        check_received(s, &expected, &tracks);
        assert_eq!(
            s.client().received().len(),
            2,
            "{}: only its two slots",
            s.name
        );
    }
    // The publisher subscribes to nothing, so nothing arrives there.
    assert!(publisher.client().received().is_empty());
    assert!(publisher.client().keyframe_requests() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_publishers_receive_exactly_what_they_subscribed() {
    const N: usize = 6;
    let server = server(&["--sfu-always"]);
    let (channel, mut ms) = members(&server, N).await;
    let call = start_call(&server, &ms[0].user, &channel).await;
    let call_id = call["id"].as_str().expect("call id").to_owned();
    for m in ms.iter_mut() {
        m.join(&server, &call_id).await;
    }
    for m in ms.iter_mut() {
        m.connect_media(publisher(N - 1)).await;
    }
    // Every track is known to everyone (auto-subscribed); each participant i then unsubscribes
    // from (i+1)'s video and (i+2)'s audio over `call.sfu`.
    for m in ms.iter_mut() {
        m.read_for(Duration::from_millis(300)).await;
    }
    let pids: Vec<(String, String)> = ms.iter().map(|m| (m.name.clone(), m.pid.clone())).collect();
    let mut expected = Vec::new();
    for i in 0..N {
        let video_of_next = ms[i]
            .published_track("video published", &pids[(i + 1) % N].1, "video")
            .await;
        let audio_of_second = ms[i]
            .published_track("audio published", &pids[(i + 2) % N].1, "audio")
            .await;
        for track in [video_of_next, audio_of_second] {
            ms[i].unsubscribe(&track, "unsubscribe").await;
        }
        let want: BTreeSet<String> = (0..N)
            .filter(|j| *j != i)
            .flat_map(|j| {
                let mut v = Vec::new();
                if j != (i + 1) % N {
                    v.push(format!("p{j}/v"));
                }
                if j != (i + 2) % N {
                    v.push(format!("p{j}/a"));
                }
                v
            })
            .collect();
        expected.push(want);
    }
    // Subscribing to one's own track is refused.
    let own = ms[0].tracks_of(&pids[0].1)["audio"].clone();
    let (call0, pid0) = (ms[0].call_id.clone(), ms[0].pid.clone());
    let refused = ms[0]
        .request(json!({"type": "call.sfu", "call_id": call0, "participant_id": pid0, "op": "subscribe", "track_id": own}))
        .await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["reason"], "not_allowed", "{refused}");
    // Media flows from now on (subscriptions are settled before the first frame).
    for m in &ms {
        m.client().start_media();
    }
    tokio::time::sleep(MEDIA).await;
    for m in ms.iter_mut() {
        m.read_for(Duration::from_millis(200)).await;
    }
    let refs: Vec<&Member> = ms.iter().collect();
    for (i, m) in ms.iter().enumerate() {
        let others: Vec<&Member> = refs.iter().copied().filter(|o| o.pid != m.pid).collect();
        let tracks = track_map(m, &others);
        check_received(m, &expected[i], &tracks);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_valid_credential_there_is_no_media() {
    let server = server(&["--sfu-always"]);
    let (channel, mut ms) = members(&server, 3).await;
    let call = start_call(&server, &ms[0].user, &channel).await;
    let call_id = call["id"].as_str().expect("call id").to_owned();
    ms[0].join(&server, &call_id).await;
    ms[1].join(&server, &call_id).await;
    ms[0].connect_media(publisher(0)).await;
    ms[0].client().start_media();

    let stranger = Client::new("stranger", ClientConfig::receiver(1)).await;
    let offer = stranger.offer(0, 0).await.expect("offer");
    // No credential in a first offer.
    let r = ms[1]
        .signal_sfu(json!({"kind": "offer", "sdp": offer}))
        .await;
    assert_eq!(
        (r["type"].as_str(), r["reason"].as_str()),
        (Some("error"), Some("credential_missing")),
        "{r}"
    );
    // A forged one.
    let own = ms[1].joined["sfu"]["credential"]
        .as_str()
        .expect("credential")
        .to_owned();
    let (body, tag) = own.rsplit_once('.').expect("v1.payload.tag");
    let flipped = if tag.starts_with('A') { "B" } else { "A" };
    let forged = format!("{body}.{flipped}{}", &tag[1..]);
    let r = ms[1]
        .signal_sfu(json!({"kind": "offer", "sdp": offer, "credential": forged}))
        .await;
    assert_eq!(r["code"], "forbidden", "{r}");
    assert_eq!(r["reason"], "credential_bad_signature", "{r}");
    // Someone else's (p0's credential, offered as p1).
    let theirs = ms[0].joined["sfu"]["credential"]
        .as_str()
        .expect("credential")
        .to_owned();
    let r = ms[1]
        .signal_sfu(json!({"kind": "offer", "sdp": offer, "credential": theirs}))
        .await;
    assert_eq!(r["reason"], "credential_wrong_subject", "{r}");
    // A member who has not joined the call cannot signal the SFU at all.
    let pid1 = ms[1].pid.clone();
    let frame = json!({"type": "call.signal", "call_id": call_id, "from": pid1, "to": "sfu", "signal": {"kind": "offer", "sdp": offer}});
    let r = ms[2].request(frame).await;
    assert_eq!(r["type"], "error", "{r}");
    // None of this produced an answer, so the stranger has nowhere to send: it never connects
    // and receives nothing, while the admitted publisher's media flows.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ms[1].read_for(Duration::from_millis(200)).await;
    assert!(
        !ms[1]
            .seen
            .iter()
            .any(|f| f["type"] == "call.signal" && f["from"] == "sfu"),
        "an answer reached an uncredentialed offer"
    );
    assert!(stranger.received().is_empty());
    assert!(stranger.wait_connected().await.is_err());
}

/// Two `--role sfu` processes and a core on NATS: the call's SFU is killed with SIGKILL, the
/// core moves the call to the other one (`call.mode_changed`, `sfu_failover`), and every
/// participant's media flows again through the new SFU within 10 s of the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_sfu_process_dies_the_call_moves_and_media_flows_again_within_10_s() {
    let sfu_process = || {
        ServerBuilder::new(Backend::Sqlite)
            .nats()
            .arg("--role")
            .arg("sfu")
            .arg("--sfu-secret")
            .arg(SECRET)
            .start()
    };
    let mut sfus = [sfu_process(), sfu_process()];
    let core = ServerBuilder::new(Backend::Sqlite)
        .nats()
        .arg("--no-sfu")
        .arg("--sfu-always")
        .arg("--sfu-secret")
        .arg(SECRET)
        .start();
    // Both SFUs heartbeat every 500 ms; let the core hear them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (channel, mut ms) = members(&core, 3).await;
    let call = start_call(&core, &ms[0].user, &channel).await;
    let call_id = call["id"].as_str().expect("call id").to_owned();
    let session = call["sfu_session"].as_str().expect("placed").to_owned();
    for m in ms.iter_mut() {
        m.join(&core, &call_id).await;
        m.connect_media(publisher(2)).await;
    }
    for m in &ms {
        m.client().start_media();
    }
    let expected = |i: usize| -> BTreeSet<String> {
        (0..3)
            .filter(|j| *j != i)
            .flat_map(|j| [format!("p{j}/a"), format!("p{j}/v")])
            .collect()
    };
    wait_media(&ms, &expected, Instant::now() + WAIT).await;

    // Which SFU holds the call: the one with three participants.
    let mut holder = None;
    for (i, s) in sfus.iter().enumerate() {
        let status: Value = reqwest::get(s.url("/v1/sfu"))
            .await
            .expect("status")
            .json()
            .await
            .expect("json");
        if status["participants"] == 3 {
            holder = Some(i);
        }
    }
    let holder = holder.expect("one SFU holds the call's three participants");
    sfus[holder].kill9();
    let killed = Instant::now();

    for m in ms.iter_mut() {
        let moved = m
            .wait_for("call.mode_changed after the failover", |f| {
                f["type"] == "call.mode_changed" && f["reason"] == "sfu_failover"
            })
            .await;
        let new_session = moved["sfu_session"].as_str().expect("session");
        assert_ne!(new_session, session, "a new SFU session");
        let again = m.join(&core, &call_id).await;
        assert_eq!(again["sfu"]["session"], new_session);
        m.connect_media(publisher(2)).await;
        m.client().start_media();
    }
    wait_media(&ms, &expected, killed + Duration::from_secs(10)).await;
    eprintln!("media flowed again {:?} after the kill", killed.elapsed());
    let other = 1 - holder;
    let status: Value = reqwest::get(sfus[other].url("/v1/sfu"))
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    assert_eq!(
        status["participants"], 3,
        "the surviving SFU holds the call"
    );
}

/// Waits until every member's current media client received exactly the expected sources
/// (at least a few frames of each), failing at `deadline`.
async fn wait_media(
    ms: &[Member],
    expected: &impl Fn(usize) -> BTreeSet<String>,
    deadline: Instant,
) {
    loop {
        let done = ms.iter().enumerate().all(|(i, m)| {
            let counts = m.client().sources();
            let got: BTreeSet<String> = counts
                .iter()
                .map(|s| s.rsplit_once('/').map_or(s.clone(), |(p, _)| p.to_owned()))
                .collect();
            got == expected(i)
        });
        if done {
            return;
        }
        if Instant::now() > deadline {
            let got: Vec<BTreeSet<String>> = ms.iter().map(|m| m.client().sources()).collect();
            panic!("media did not reach everyone in time: {got:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two nodes on PostgreSQL and NATS, two `--role sfu` processes: participants whose WebSockets
/// and joins are on different nodes all reach the one SFU the call was placed on (the placing
/// core claims the call at the SFU; the other core reads the claim from its heartbeats).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_on_different_nodes_reach_the_same_sfu() {
    let sfu_process = || {
        ServerBuilder::new(Backend::Sqlite)
            .nats()
            .arg("--role")
            .arg("sfu")
            .arg("--sfu-secret")
            .arg(SECRET)
            .start()
    };
    let sfus = [sfu_process(), sfu_process()];
    let node = || {
        ServerBuilder::new(Backend::Postgres)
            .nats()
            .arg("--no-sfu")
            .arg("--sfu-always")
            .arg("--sfu-secret")
            .arg(SECRET)
            .start()
    };
    let (a, b) = (node(), node());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let users: Vec<String> = (0..4).map(|i| unique(&format!("p{i}"))).collect();
    let refs: Vec<&str> = users.iter().skip(1).map(String::as_str).collect();
    let channel = a.api(&users[0]).create_channel(&unique("sfu"), &refs).await;
    let mut ms = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let node = if i < 2 { &a } else { &b };
        ms.push(Member::connect(node, &format!("p{i}"), u, &channel).await);
    }
    let call = start_call(&a, &ms[0].user, &channel).await;
    let call_id = call["id"].as_str().expect("call id").to_owned();
    let session = call["sfu_session"].as_str().expect("placed").to_owned();
    // One heartbeat carries the claim to node b.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for (i, m) in ms.iter_mut().enumerate() {
        let node = if i < 2 { &a } else { &b };
        let joined = m.join(node, &call_id).await;
        assert_eq!(
            joined["call"]["sfu_session"],
            session.as_str(),
            "{}",
            m.name
        );
        assert_eq!(joined["sfu"]["session"], session.as_str(), "{}", m.name);
    }
    for m in ms.iter_mut() {
        m.connect_media(publisher(3)).await;
    }
    for m in &ms {
        m.client().start_media();
    }
    let expected = |i: usize| -> BTreeSet<String> {
        (0..4)
            .filter(|j| *j != i)
            .flat_map(|j| [format!("p{j}/a"), format!("p{j}/v")])
            .collect()
    };
    wait_media(&ms, &expected, Instant::now() + WAIT).await;
    let mut loads = Vec::new();
    for s in &sfus {
        let status: Value = reqwest::get(s.url("/v1/sfu"))
            .await
            .expect("status")
            .json()
            .await
            .expect("json");
        loads.push(status["participants"].as_u64().unwrap_or(0));
    }
    loads.sort_unstable();
    assert_eq!(loads, [0, 4], "all four on one SFU");
}

/// A nats-server of one test alone, with the users and permissions of the test services'
/// server (scripts/services.sh: `parley-core`, `parley-edge`, which may not publish persisted
/// events nor touch `parley.sfu.>`): the services' nats.conf on a free port and a fresh
/// JetStream folder. Private, because cores of the other tests in this file, on the shared
/// NATS, would otherwise answer this test's edges (they share the queue group `parley-core`).
struct AuthNats {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl AuthNats {
    fn start() -> AuthNats {
        let services = std::env::var("PARLEY_SERVICES_DIR").expect(
            "PARLEY_SERVICES_DIR is not set: run the tests with scripts/test.sh (or eval \"$(scripts/services.sh start)\")",
        );
        let bin = std::env::var("PARLEY_NATS_SERVER_BIN").expect(
            "PARLEY_NATS_SERVER_BIN is not set: start the services with scripts/services.sh",
        );
        let conf = std::fs::read_to_string(format!("{services}/nats.conf"))
            .expect("the services' nats.conf (scripts/services.sh start writes it)");
        let port = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::tempdir().expect("temp dir");
        let conf: String = conf
            .lines()
            .map(|l| {
                if l.starts_with("listen:") {
                    format!("listen: \"127.0.0.1:{port}\"")
                } else if l.starts_with("jetstream") {
                    format!(
                        "jetstream {{ store_dir: \"{}\" }}",
                        dir.path().join("js").display()
                    )
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            conf.contains("authorization"),
            "the services' NATS has users"
        );
        let path = dir.path().join("nats.conf");
        std::fs::write(&path, conf).expect("write nats.conf");
        let child = std::process::Command::new(&bin)
            .arg("-c")
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let mut nats = AuthNats {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port)).is_err() {
            assert!(
                nats.child.try_wait().expect("nats-server").is_none(),
                "nats-server exited before listening"
            );
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen within 15 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        nats
    }

    /// `--nats-url` and the credentials of the services' `user` (`CORE` or `EDGE`).
    fn args(&self, user: &str) -> Vec<String> {
        let var = |name: String| {
            std::env::var(&name).unwrap_or_else(|_| {
                panic!("{name} is not set: start the services with scripts/services.sh")
            })
        };
        vec![
            "--nats-url".into(),
            format!("nats://127.0.0.1:{}", self.port),
            "--nats-user".into(),
            var(format!("PARLEY_TEST_NATS_{user}_USER")),
            "--nats-password".into(),
            var(format!("PARLEY_TEST_NATS_{user}_PASSWORD")),
        ]
    }
}

impl Drop for AuthNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Participants on two `--role edge` processes (NATS edge user: no database, no SFU access of
/// their own) in front of one `--role core` (PostgreSQL, NATS core user) and a `--role sfu`
/// process: the call escalates at the threshold, `call.mode_changed` and the SFU's notices
/// reach both edges, offers (`call.signal` to `sfu`) and subscription changes (`call.sfu`)
/// cross to the core as the `sfu_request` RPC, and media flows between the participants of
/// the two edges through the one SFU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sfu_call_through_two_edge_processes_and_a_core() {
    let nats = AuthNats::start();
    let start = |backend: Backend, user: &str, extra: &[&str]| {
        let b = nats
            .args(user)
            .into_iter()
            .chain(extra.iter().map(|s| (*s).to_owned()))
            .fold(ServerBuilder::new(backend), |b, a| b.arg(a));
        b.start()
    };
    let sfu = start(
        Backend::Sqlite,
        "CORE",
        &["--role", "sfu", "--sfu-secret", SECRET],
    );
    let _core = start(
        Backend::Postgres,
        "CORE",
        &["--role", "core", "--no-sfu", "--sfu-secret", SECRET],
    );
    let edges = [
        start(Backend::Sqlite, "EDGE", &["--role", "edge"]),
        start(Backend::Sqlite, "EDGE", &["--role", "edge"]),
    ];
    // The SFU heartbeats every 500 ms; let the core hear it.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let users: Vec<String> = (0..4).map(|i| unique(&format!("p{i}"))).collect();
    let refs: Vec<&str> = users.iter().skip(1).map(String::as_str).collect();
    let channel = edges[0]
        .api(&users[0])
        .create_channel(&unique("sfu"), &refs)
        .await;
    let edge_of = |i: usize| &edges[i % 2];
    let mut ms = Vec::new();
    for (i, u) in users.iter().enumerate() {
        ms.push(Member::connect(edge_of(i), &format!("p{i}"), u, &channel).await);
    }
    let call = start_call(edge_of(0), &ms[0].user, &channel).await;
    let call_id = call["id"].as_str().expect("call id").to_owned();
    assert_eq!(call["mode"], "p2p", "{call}");
    for (i, m) in ms.iter_mut().enumerate().take(3) {
        let joined = m.join(edge_of(i), &call_id).await;
        assert_eq!(joined["call"]["mode"], "p2p", "{}: {joined}", m.name);
    }
    // The fourth join (on the second edge) reaches the threshold.
    let joined = ms[3].join(edge_of(3), &call_id).await;
    assert_eq!(joined["call"]["mode"], "sfu", "{joined}");
    let session = joined["sfu"]["session"]
        .as_str()
        .expect("an sfu block in the join answer")
        .to_owned();
    for m in ms.iter_mut() {
        let changed = m
            .wait_for("call.mode_changed", |f| f["type"] == "call.mode_changed")
            .await;
        assert_eq!(changed["sfu_session"], session.as_str(), "{}", m.name);
    }
    for (i, m) in ms.iter_mut().enumerate().take(3) {
        let again = m.join(edge_of(i), &call_id).await;
        assert_eq!(again["sfu"]["session"], session.as_str(), "{}", m.name);
    }

    // Everyone publishes and has slots for the three others.
    for m in ms.iter_mut() {
        m.connect_media(publisher(3)).await;
    }
    // A subscription change through the edge: p0 (edge A) unsubscribes from p1's video
    // (edge B).
    ms[0].read_for(Duration::from_millis(300)).await;
    let p1 = ms[1].pid.clone();
    let p1_video = ms[0]
        .published_track("p1's video published", &p1, "video")
        .await;
    ms[0]
        .unsubscribe(&p1_video, "unsubscribe through the edge")
        .await;

    for m in &ms {
        m.client().start_media();
    }
    let expected = |i: usize| -> BTreeSet<String> {
        (0..4)
            .filter(|j| *j != i)
            .flat_map(|j| [format!("p{j}/a"), format!("p{j}/v")])
            .filter(|s| !(i == 0 && s == "p1/v"))
            .collect()
    };
    wait_media(&ms, &expected, Instant::now() + WAIT).await;
    tokio::time::sleep(MEDIA).await;
    for m in ms.iter_mut() {
        m.read_for(Duration::from_millis(200)).await;
    }
    let refs: Vec<&Member> = ms.iter().collect();
    for (i, m) in ms.iter().enumerate() {
        let others: Vec<&Member> = refs.iter().copied().filter(|o| o.pid != m.pid).collect();
        let tracks = track_map(m, &others);
        check_received(m, &expected(i), &tracks);
    }
    let status: Value = reqwest::get(sfu.url("/v1/sfu"))
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    assert_eq!(status["participants"], 4, "all four on the SFU: {status}");
    // The edges passed the offers and the unsubscribe to the core as `sfu_request` RPCs: two
    // offers per edge, and p0's unsubscribe on the first.
    for (i, edge) in edges.iter().enumerate() {
        let metrics = reqwest::get(edge.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let calls: f64 = metrics
            .lines()
            .filter(|l| {
                l.starts_with("parley_rpc_duration_seconds_count")
                    && l.contains("method=\"sfu_request\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        let want = if i == 0 { 3.0 } else { 2.0 };
        assert!(
            calls >= want,
            "edge {i}: {calls} sfu_request RPCs, expected at least {want}"
        );
    }
}

/// The escalation is durable: after the node restarts (its SFU and the placement in its memory
/// gone), the call still shows `sfu` mode in `GET /v1/calls/{id}`, is placed on the new SFU
/// (a session), and a join answers with an SFU credential, without a fourth join to escalate
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sfu_mode_outlives_a_restart_of_the_node() {
    mode_outlives_a_restart(Backend::Sqlite).await;
}

/// The same on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sfu_mode_outlives_a_restart_of_the_node_on_postgres() {
    mode_outlives_a_restart(Backend::Postgres).await;
}

async fn mode_outlives_a_restart(backend: Backend) {
    let mut server = ["--max-call-participants", "16"]
        .iter()
        .fold(ServerBuilder::new(backend), |b, a| b.arg(*a))
        .start();
    let (channel, mut ms) = members(&server, 4).await;
    let call = start_call(&server, &ms[0].user, &channel).await;
    let call_id = call["id"].as_str().expect("call id").to_owned();
    for m in ms.iter_mut() {
        m.join(&server, &call_id).await;
    }
    let got = server
        .api(&ms[0].user)
        .get(&format!("/v1/calls/{call_id}"))
        .await
        .ok();
    assert_eq!(got["mode"], "sfu", "escalated at the threshold: {got}");
    let user = ms[0].user.clone();
    drop(ms);

    server.restart();
    let got = server
        .api(&user)
        .get(&format!("/v1/calls/{call_id}"))
        .await
        .ok();
    assert_eq!(got["mode"], "sfu", "after the restart: {got}");
    assert!(
        got["sfu_session"].as_str().is_some_and(|s| !s.is_empty()),
        "placed on the restarted node's SFU: {got}"
    );
    let joined = server
        .api(&user)
        .request("POST", &format!("/v1/calls/{call_id}/join"), None)
        .await
        .ok();
    assert_eq!(joined["call"]["mode"], "sfu", "{joined}");
    assert_eq!(joined["sfu"]["session"], got["sfu_session"], "{joined}");
    assert!(joined["sfu"]["credential"].as_str().is_some(), "{joined}");
}
