//! `send_throughput`: persisted messages per second through `message.send` over WebSocket.
//!
//! Starts the release `parley serve` (SQLite in a temp folder, or PostgreSQL with
//! `--database-url`), creates C channels, opens M sender connections (sender i authenticates as
//! user `u{i mod U}` and sends to channel `i mod C`), and has each keep K `message.send` frames in
//! flight for a fixed time. A message counts only when its `ack` arrives, which the server sends
//! after the durable commit. Prints acknowledged messages/s, ack latency percentiles and CPU
//! use, then reads every channel's history and checks that the messages stored are exactly the
//! ones acknowledged.
//!
//! The server is started with the per-connection frame limit and the per-user REST limit raised
//! far above what the load needs (`--ws-frames-per-second`, `--ws-frame-burst`,
//! `--rate-per-minute`, `--rate-burst`), so the figures measure the send path, not the limiter.
//!
//! Prints figures; never passes or fails on time (it exits non-zero only if history disagrees
//! with the acks).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use futures::{SinkExt, StreamExt};
use parley_bench::{
    AuthMode, Reply, ReplyMessage, Rest, ServerProcess, Ws, percentile, source_addr, token,
    ws_connect,
};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[derive(Debug, Parser)]
#[command(
    about = "Acknowledged (durably committed) messages per second over WebSocket message.send"
)]
struct Args {
    /// The parley binary (release build).
    #[arg(long, default_value_os_t = parley_bench::default_parley_path())]
    parley: std::path::PathBuf,
    /// PostgreSQL URL; without it the server uses SQLite in a temp folder.
    #[arg(long)]
    database_url: Option<String>,
    /// Concurrent senders, each with its own connection.
    #[arg(long, short = 'm', default_value_t = 200)]
    senders: usize,
    /// Channel counts to run (comma-separated; one fresh server per run).
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    channels: Vec<usize>,
    /// Messages each sender keeps in flight (comma-separated list runs each).
    #[arg(long, value_delimiter = ',', default_value = "2")]
    in_flight: Vec<usize>,
    /// Distinct sending users (sender i is user u{i mod U}); all are members of every channel.
    #[arg(long, default_value_t = 50)]
    users: usize,
    /// Measured time, in seconds.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Load before the measured time, not counted, in seconds.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Longest wait for the last acks after the measured time, in seconds.
    #[arg(long, default_value_t = 30)]
    drain_secs: u64,
    /// Message text length in bytes.
    #[arg(long, default_value_t = 64)]
    text_bytes: usize,
    /// Client source addresses 127.0.0.2 .. 127.0.0.(1+K).
    #[arg(long, default_value_t = 4)]
    source_addrs: usize,
    /// Client runtime worker threads (the client shares the 2 cores with the server).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Also report the CPU of this process and its direct children over the measured window
    /// (e.g. the PostgreSQL postmaster: first line of `$PGDATA/postmaster.pid`).
    #[arg(long)]
    db_pid: Option<u32>,
    /// Extra flag passed to `parley serve` (repeatable), e.g. --server-arg=--database-pool=32.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (soft, hard) = parley_bench::raise_nofile_limit()?;
    println!(
        "send_throughput: {} | open files limit {soft} (hard {hard})",
        parley_bench::machine_summary()
    );
    let mut summaries = Vec::new();
    let mut mismatch = false;
    for &channels in &args.channels {
        for &k in &args.in_flight {
            let r = one_run(&args, channels.max(1), k.max(1)).await?;
            mismatch |= !r.verified;
            summaries.push(r.line);
        }
    }
    println!();
    for s in &summaries {
        println!("{s}");
    }
    if mismatch {
        bail!("history does not match the acknowledged messages (see above)");
    }
    Ok(())
}

struct RunSummary {
    line: String,
    verified: bool,
}

/// What one sender saw.
#[derive(Default)]
struct SenderResult {
    sent: u64,
    /// Every acknowledged message id (for the history check).
    acked_ids: Vec<String>,
    /// Acks that arrived inside the measured window, and their latencies in microseconds.
    window_acks: u64,
    latencies_us: Vec<u32>,
    errors: BTreeMap<String, u64>,
    first_error: Option<String>,
    /// Sent but never answered within the drain time.
    unanswered: u64,
    failure: Option<String>,
}

struct Plan {
    start: Instant,
    measure_from: Instant,
    measure_to: Instant,
    drain_until: Instant,
}

async fn one_run(
    args: &Args,
    channel_count: usize,
    in_flight: usize,
) -> anyhow::Result<RunSummary> {
    let mut server_args: Vec<String> = [
        "--ws-frames-per-second",
        "100000",
        "--ws-frame-burst",
        "100000",
        "--rate-per-minute",
        "100000000",
        "--rate-burst",
        "1000000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(url) = &args.database_url {
        server_args.push("--database-url".into());
        server_args.push(url.clone());
    }
    server_args.extend(args.server_args.iter().cloned());
    let mut server = ServerProcess::start(&args.parley, &server_args)?;
    println!();
    println!(
        "== run: senders={} channels={channel_count} in_flight={in_flight} users={} text={} B duration={} s (warm-up {} s)",
        args.senders, args.users, args.text_bytes, args.duration_secs, args.warmup_secs
    );
    println!("server: {} (pid {})", server.banner, server.pid());

    let users: Vec<String> = (0..args.users.max(1)).map(|i| format!("u{i}")).collect();
    let rest = Rest::new(server.http_base());
    let owner = token("bench-owner");
    let run_tag = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let mut channels = Vec::new();
    for c in 0..channel_count {
        let initial: Vec<String> = users.iter().take(99).cloned().collect();
        let id = rest
            .create_channel(&owner, &format!("bench-{run_tag}-{c}"), &initial)
            .await?;
        for u in users.iter().skip(99) {
            rest.add_member(&owner, &id, u).await?;
        }
        channels.push(id);
    }

    // Open every sender's connection first.
    let limit = Arc::new(Semaphore::new(64));
    let mut opening = Vec::new();
    for i in 0..args.senders {
        let limit = limit.clone();
        let tok = token(&users[i % users.len()]);
        let (addr, src) = (server.addr, source_addr(i, args.source_addrs));
        opening.push(tokio::spawn(async move {
            let _p = limit.acquire().await;
            tokio::time::timeout(
                Duration::from_secs(30),
                ws_connect(addr, src, &tok, AuthMode::Subprotocol),
            )
            .await
        }));
    }
    let mut sockets = Vec::new();
    for h in opening {
        match h.await? {
            Ok(Ok(ws)) => sockets.push(ws),
            Ok(Err(e)) => bail!("cannot open a sender connection: {e:#}"),
            Err(_) => bail!("opening a sender connection timed out"),
        }
    }
    println!("opened {} sender connections", sockets.len());

    let text: String = "x".repeat(args.text_bytes.max(1));
    let (go_tx, go_rx) = watch::channel::<Option<Arc<Plan>>>(None);
    let mut handles = Vec::new();
    for (i, ws) in sockets.into_iter().enumerate() {
        let channel = channels[i % channels.len()].clone();
        let prefix = format!("b{run_tag}-{i}-");
        let text = text.clone();
        let go = go_rx.clone();
        handles.push(tokio::spawn(sender(
            ws, channel, prefix, text, in_flight, go,
        )));
    }
    let start = Instant::now();
    let plan = Arc::new(Plan {
        start,
        measure_from: start + Duration::from_secs(args.warmup_secs),
        measure_to: start + Duration::from_secs(args.warmup_secs + args.duration_secs),
        drain_until: start
            + Duration::from_secs(args.warmup_secs + args.duration_secs + args.drain_secs),
    });
    let _ = go_tx.send(Some(plan.clone()));
    tokio::time::sleep_until(plan.measure_from.into()).await;
    let (srv_cpu0, me_cpu0, t0) = (
        server.cpu()?,
        parley_bench::cpu_time("self")?,
        Instant::now(),
    );
    let (threads0, db0) = (
        parley_bench::thread_cpu(server.pid()),
        args.db_pid.map(parley_bench::tree_cpu),
    );
    tokio::time::sleep_until(plan.measure_to.into()).await;
    let (srv_cpu1, me_cpu1, t1) = (
        server.cpu()?,
        parley_bench::cpu_time("self")?,
        Instant::now(),
    );
    let (threads1, db1) = (
        parley_bench::thread_cpu(server.pid()),
        args.db_pid.map(parley_bench::tree_cpu),
    );
    let mem = server.mem()?;

    let mut results = Vec::new();
    for h in handles {
        results.push(h.await?);
    }
    let drained_at = plan.start.elapsed();
    server.check_alive()?;

    let window = (plan.measure_to - plan.measure_from).as_secs_f64();
    let sent: u64 = results.iter().map(|r| r.sent).sum();
    let acked: u64 = results.iter().map(|r| r.acked_ids.len() as u64).sum();
    let window_acks: u64 = results.iter().map(|r| r.window_acks).sum();
    let unanswered: u64 = results.iter().map(|r| r.unanswered).sum();
    let mut lat: Vec<u32> = results
        .iter()
        .flat_map(|r| r.latencies_us.iter().copied())
        .collect();
    lat.sort_unstable();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for r in &results {
        for (k, v) in &r.errors {
            *errors.entry(k.clone()).or_default() += v;
        }
    }
    let failures: Vec<&String> = results.iter().filter_map(|r| r.failure.as_ref()).collect();
    let rate = window_acks as f64 / window;
    let measured = (t1 - t0).as_secs_f64();
    let srv_cpu = (srv_cpu1 - srv_cpu0).as_secs_f64() / measured;
    let me_cpu = (me_cpu1 - me_cpu0).as_secs_f64() / measured;
    let ms = |us: u32| us as f64 / 1000.0;
    println!(
        "acked in the measured {window:.0} s: {window_acks} => {rate:.0} msgs/s; ack latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(percentile(&lat, 50.0)),
        ms(percentile(&lat, 90.0)),
        ms(percentile(&lat, 99.0)),
        ms(lat.last().copied().unwrap_or(0))
    );
    println!(
        "CPU over the measured window: server {:.0}% of one core, bench client {:.0}% (2 cores = 200%); server RSS {}",
        srv_cpu * 100.0,
        me_cpu * 100.0,
        parley_bench::mib(mem.rss)
    );
    let per_thread: Vec<String> = threads1
        .iter()
        .map(|(name, t)| {
            let before = threads0.get(name).copied().unwrap_or_default();
            (
                name,
                t.saturating_sub(before).as_secs_f64() / measured * 100.0,
            )
        })
        .filter(|(_, pct)| *pct >= 0.5)
        .map(|(name, pct)| format!("{name} {pct:.0}%"))
        .collect();
    println!("server CPU by thread name: {}", per_thread.join(", "));
    if args.database_url.is_none() {
        // The WAL's size after the window shows whether it starts over under a steady load.
        let size =
            |name: &str| std::fs::metadata(server.data_dir.join(name)).map_or(0, |m| m.len());
        println!(
            "sqlite files after the window: database {}, WAL {}",
            parley_bench::mib(size("parley.db")),
            parley_bench::mib(size("parley.db-wal"))
        );
    }
    if let (Some(a), Some(b)) = (db0, db1) {
        println!(
            "database processes CPU: {:.0}% of one core",
            b.saturating_sub(a).as_secs_f64() / measured * 100.0
        );
    }
    println!(
        "whole run ({:.1} s incl. warm-up and drain): sent {sent}, acked {acked}, errors {errors:?}, unanswered {unanswered}",
        drained_at.as_secs_f64()
    );
    if let Some(e) = results.iter().find_map(|r| r.first_error.as_ref()) {
        println!("first error frame: {e}");
    }
    if !failures.is_empty() {
        println!(
            "{} sender connections failed; first: {}",
            failures.len(),
            failures[0]
        );
    }

    // Verify: history holds exactly the acknowledged messages.
    let t = Instant::now();
    let mut by_channel: Vec<HashSet<String>> = vec![HashSet::new(); channels.len()];
    for (i, r) in results.iter().enumerate() {
        by_channel[i % channels.len()].extend(r.acked_ids.iter().cloned());
    }
    let mut verified = true;
    let mut stored_total = 0usize;
    for (c, id) in channels.iter().enumerate() {
        let stored = rest.all_messages(&owner, id).await?;
        stored_total += stored.len();
        let stored_ids: HashSet<&str> = stored.iter().map(|(m, _)| m.as_str()).collect();
        let missing = by_channel[c]
            .iter()
            .filter(|m| !stored_ids.contains(m.as_str()))
            .count();
        if stored.len() != by_channel[c].len() || missing > 0 {
            verified = false;
            println!(
                "MISMATCH channel {id}: {} stored, {} acked, {missing} acked but not stored",
                stored.len(),
                by_channel[c].len()
            );
        }
    }
    println!(
        "history check ({:.1} s): {stored_total} messages stored, {acked} acked: {}",
        t.elapsed().as_secs_f64(),
        if verified {
            "equal, every acked id present"
        } else {
            "MISMATCH"
        }
    );
    let backend = if args.database_url.is_some() {
        "postgres"
    } else {
        "sqlite"
    };
    let line = format!(
        "SUMMARY send_throughput backend={backend} senders={} channels={channel_count} in_flight={in_flight} msgs/s={rate:.0} p50={:.2}ms p99={:.2}ms server_cpu={:.0}% client_cpu={:.0}% verified={verified}",
        args.senders,
        ms(percentile(&lat, 50.0)),
        ms(percentile(&lat, 99.0)),
        srv_cpu * 100.0,
        me_cpu * 100.0,
    );
    drop(server);
    Ok(RunSummary { line, verified })
}

/// One sender: waits for the plan, keeps `in_flight` sends outstanding until the measured window
/// ends, then waits (bounded) for the outstanding acks.
async fn sender(
    mut ws: Ws,
    channel: String,
    prefix: String,
    text: String,
    in_flight: usize,
    mut go: watch::Receiver<Option<Arc<Plan>>>,
) -> SenderResult {
    let mut r = SenderResult::default();
    let plan = loop {
        if let Some(p) = go.borrow_and_update().clone() {
            break p;
        }
        if go.changed().await.is_err() {
            r.failure = Some("no start signal".into());
            return r;
        }
    };
    let mut outstanding: Vec<(u64, Instant)> = Vec::with_capacity(in_flight);
    let mut next = 0u64;
    loop {
        let now = Instant::now();
        let sending = now < plan.measure_to;
        if sending && outstanding.len() < in_flight {
            while outstanding.len() < in_flight {
                let frame = format!(
                    r#"{{"type":"message.send","id":"{next}","channel_id":"{channel}","client_msg_id":"{prefix}{next}","text":"{text}"}}"#
                );
                if let Err(e) = ws.feed(WsMessage::Text(frame.into())).await {
                    r.failure = Some(format!("send: {e}"));
                    return r;
                }
                outstanding.push((next, Instant::now()));
                next += 1;
                r.sent += 1;
            }
            if let Err(e) = ws.flush().await {
                r.failure = Some(format!("flush: {e}"));
                return r;
            }
        }
        if !sending && outstanding.is_empty() {
            break;
        }
        let deadline = if sending {
            plan.measure_to
        } else {
            plan.drain_until
        };
        let msg = match tokio::time::timeout_at(deadline.into(), ws.next()).await {
            Err(_) if sending => continue,
            Err(_) => {
                r.unanswered = outstanding.len() as u64;
                break;
            }
            Ok(m) => m,
        };
        let text = match msg {
            Some(Ok(WsMessage::Text(t))) => t,
            Some(Ok(WsMessage::Close(f))) => {
                r.failure = Some(format!("server closed: {f:?}"));
                r.unanswered = outstanding.len() as u64;
                return r;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                r.failure = Some(format!("read: {e}"));
                r.unanswered = outstanding.len() as u64;
                return r;
            }
            None => {
                r.failure = Some("connection ended".into());
                r.unanswered = outstanding.len() as u64;
                return r;
            }
        };
        let acked_at = Instant::now();
        let Ok(reply) = serde_json::from_str::<Reply>(text.as_str()) else {
            continue;
        };
        let Some(n) = reply.id.as_deref().and_then(|v| v.parse::<u64>().ok()) else {
            continue;
        };
        let Some(pos) = outstanding.iter().position(|(id, _)| *id == n) else {
            continue;
        };
        let (_, sent_at) = outstanding.swap_remove(pos);
        match (reply.kind.as_str(), reply.message) {
            ("ack", Some(ReplyMessage::Committed { id, seq: _ })) => {
                r.acked_ids.push(id);
                if acked_at >= plan.measure_from && acked_at < plan.measure_to {
                    r.window_acks += 1;
                    let us = (acked_at - sent_at).as_micros().min(u128::from(u32::MAX)) as u32;
                    r.latencies_us.push(us);
                }
            }
            _ => {
                let code = reply.code.unwrap_or_else(|| reply.kind.clone());
                *r.errors.entry(code).or_default() += 1;
                if r.first_error.is_none() {
                    r.first_error = Some(text.to_string());
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    r
}
