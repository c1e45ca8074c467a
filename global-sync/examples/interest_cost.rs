//! What 10,000 subscribed channels cost one node's bus: the time to register them, the node's
//! memory for them, and the NATS server's side (subscriptions and memory), on a private
//! nats-server started here with its monitoring port.
//!
//! ```sh
//! eval "$(scripts/services.sh start)"   # for PARLEY_NATS_SERVER_BIN (or set it yourself)
//! cargo run --release -p parley-sync --example interest_cost -- 10000        # default --nats-channel-exact-max (8)
//! cargo run --release -p parley-sync --example interest_cost -- 10000 100000 # one subscription per channel
//! ```
//!
//! The second argument is the node's `channel_exact_max` (see `NatsOptions`): how many channels
//! of one of the 256 buckets it subscribes to one by one before taking the whole bucket.
//!
//! Prints one line per figure. Memory is the resident set (VmRSS) of this process and of the
//! server, read from /proc before and after; registration time is wall clock from the first
//! `add` to the last registration resolving (each batch confirmed by one server round trip).

use std::time::{Duration, Instant};

use parley_sync::{Bus, NatsBus, NatsOptions, Topic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// GET `path` from the monitoring port; the JSON body.
async fn monitor(port: u16, path: &str) -> serde_json::Value {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("monitor connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("read");
    let json = body.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(json).expect("monitor json")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("count"))
        .unwrap_or(10_000);
    let exact_max: Option<usize> = std::env::args()
        .nth(2)
        .map(|a| a.parse().expect("channel_exact_max"));
    let bin = std::env::var("PARLEY_NATS_SERVER_BIN")
        .expect("set PARLEY_NATS_SERVER_BIN (eval \"$(scripts/services.sh start)\" does)");
    let (port, mport) = (free_port(), free_port());
    let mut server = std::process::Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .args(["-m", &mport.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start nats-server");
    let server_pid = server.id().to_string();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let options = NatsOptions {
        channel_exact_max: exact_max,
        ..Default::default()
    };
    let bus = NatsBus::connect_with(&format!("nats://127.0.0.1:{port}"), &options)
        .await
        .expect("connect");
    let sub = bus.subscribe().await.expect("subscribe");
    // The stream is read, as a node's dispatcher does (a bucket's replaced subscriptions end
    // once the stream has delivered what they hold).
    let (mut stream, interest) = (sub.stream, sub.interest);
    tokio::spawn(async move {
        use futures::StreamExt;
        while stream.next().await.is_some() {}
    });
    // Warm: one topic, so the first measured registration is not the connection's first.
    interest
        .add(&Topic::Channel("ch_warm".into()))
        .await
        .expect("warm");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let me = std::process::id().to_string();
    let (node_before, server_before) = (rss_kib(&me), rss_kib(&server_pid));
    let varz_before = monitor(mport, "/varz").await;

    let started = Instant::now();
    let registrations: Vec<_> = (0..n)
        .map(|i| interest.add(&Topic::Channel(format!("ch_{i:026}"))))
        .collect();
    for r in registrations {
        r.await.expect("registration");
    }
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (node_after, server_after) = (rss_kib(&me), rss_kib(&server_pid));
    let varz_after = monitor(mport, "/varz").await;
    let subsz = monitor(mport, "/subsz").await;

    // One by one, each awaited: the latency a single subscribe adds.
    let mut one = Vec::new();
    for i in 0..200 {
        let t = Instant::now();
        interest
            .add(&Topic::Channel(format!("ch_single_{i}")))
            .await
            .expect("registration");
        one.push(t.elapsed());
    }
    one.sort();

    println!(
        "channels: {n}, channel_exact_max {}",
        exact_max.map_or("default".into(), |k| k.to_string())
    );
    println!(
        "registration of all {n} (batched, one round trip per batch): {:.1} ms",
        took.as_secs_f64() * 1e3
    );
    println!(
        "one registration alone: p50 {:.3} ms, p99 {:.3} ms",
        one[one.len() / 2].as_secs_f64() * 1e3,
        one[one.len() * 99 / 100].as_secs_f64() * 1e3
    );
    println!(
        "node RSS: {node_before} KiB -> {node_after} KiB (+{:.0} bytes per channel)",
        (node_after.saturating_sub(node_before) * 1024) as f64 / n as f64
    );
    println!(
        "nats-server RSS: {server_before} KiB -> {server_after} KiB (+{:.0} bytes per channel)",
        (server_after.saturating_sub(server_before) * 1024) as f64 / n as f64
    );
    println!(
        "nats-server varz mem: {} -> {} bytes; subscriptions: {} (subsz num_subscriptions {})",
        varz_before["mem"],
        varz_after["mem"],
        varz_after["subscriptions"],
        subsz["num_subscriptions"]
    );
    let _ = server.kill();
    let _ = server.wait();
}
