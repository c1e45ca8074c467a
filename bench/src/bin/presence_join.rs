//! `presence_join`: a mass join. N distinct users, all members of one channel, connect one after
//! the other (`--concurrency` upgrades in flight) and each subscribes to the channel right after
//! its `welcome`. Every user coming online is a presence change announced to the channel's
//! subscribers, so without coalescing the subscribers get about N²/2 presence frames.
//!
//! Reports, from the start of the joins until `--settle-secs` after the last subscribe ack:
//! server CPU from `/proc/PID/stat` (total and per joined user), the server's own count of
//! frames written by type (`parley_ws_frames_out_total` from `/metrics`, before and after), and
//! what the clients received: presence frames, `presence.batch` frames and the presence entries
//! they carried, and how many distinct users each subscriber learned were online.
//!
//! Starts the release `parley serve` on 127.0.0.1 (SQLite in a temp folder unless
//! `--database-url`); bounded: the joins have a time limit and the server is killed at the end.
//! Prints figures; never passes or fails on time.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::{SinkExt, StreamExt};
use parley_bench::{AuthMode, Rest, ServerProcess, source_addr, token, ws_connect};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[derive(Debug, Parser)]
#[command(
    about = "Mass join: N users of one channel connect and subscribe; presence frames and server CPU"
)]
struct Args {
    /// The parley binary (release build).
    #[arg(long, default_value_os_t = parley_bench::default_parley_path())]
    parley: std::path::PathBuf,
    /// PostgreSQL URL; without it the server uses SQLite in a temp folder.
    #[arg(long)]
    database_url: Option<String>,
    /// Users joining (each one connection, a distinct user, all members of the channel).
    #[arg(long, short = 'n', default_value_t = 5_000)]
    users: usize,
    /// Upgrades + subscribes in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Wait after the last subscribe ack for the last presence frames, in seconds.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// Longest time for all joins, in seconds.
    #[arg(long, default_value_t = 300)]
    join_limit_secs: u64,
    /// Client source addresses 127.0.0.2 .. 127.0.0.(1+K).
    #[arg(long, default_value_t = 4)]
    source_addrs: usize,
    /// Client runtime worker threads.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Extra flag passed to `parley serve` (repeatable), e.g.
    /// --server-arg=--presence-fanout-max-members=100000.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?
        .block_on(run(args))
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    id: Option<&'a str>,
    #[serde(default, borrow)]
    user_id: Option<&'a str>,
    #[serde(default, borrow)]
    status: Option<&'a str>,
    #[serde(default, borrow)]
    presences: Vec<Entry<'a>>,
}

#[derive(Deserialize)]
struct Entry<'a> {
    #[serde(borrow)]
    user_id: &'a str,
    #[serde(borrow)]
    status: &'a str,
}

#[derive(Default)]
struct Counts {
    presence_changed: AtomicU64,
    presence_batch: AtomicU64,
    batch_entries: AtomicU64,
    other: AtomicU64,
}

async fn metrics_frames(base: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let body = reqwest::get(format!("{base}/metrics"))
        .await?
        .text()
        .await?;
    let mut out = BTreeMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("parley_ws_frames_out_total{") else {
            continue;
        };
        let Some(at) = rest.find("type=\"") else {
            continue;
        };
        let kind = rest[at + 6..].split('"').next().unwrap_or("").to_owned();
        let value = line
            .rsplit(' ')
            .next()
            .unwrap_or("0")
            .parse::<f64>()
            .unwrap_or(0.0);
        *out.entry(kind).or_insert(0) += value as u64;
    }
    Ok(out)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let n = args.users.max(1);
    let (soft, hard) = parley_bench::raise_nofile_limit()?;
    if (n as u64) + 200 > soft {
        bail!("{n} connections need more than the open-files limit {soft} (hard {hard})");
    }
    println!(
        "presence_join: {} | load average {}",
        parley_bench::machine_summary(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
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
    println!("server: {} (pid {})", server.banner, server.pid());
    let base = server.http_base();
    let rest = Rest::new(base.clone());

    // One channel, owner pj-owner (never connects), members pj0..pj{n-1}.
    let owner = token("pj-owner");
    let setup = Instant::now();
    let channel = rest.create_channel(&owner, "mass-join", &[]).await?;
    let sem = Arc::new(Semaphore::new(32));
    let mut adds = Vec::with_capacity(n);
    for i in 0..n {
        let (rest, owner, channel, sem) =
            (rest.clone(), owner.clone(), channel.clone(), sem.clone());
        adds.push(tokio::spawn(async move {
            let _p = sem.acquire().await;
            rest.add_member(&owner, &channel, &format!("pj{i}")).await
        }));
    }
    for a in adds {
        a.await??;
    }
    println!(
        "setup: 1 channel, {n} members in {:.1} s",
        setup.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    let counts = Arc::new(Counts::default());
    let frames_before = metrics_frames(&base).await?;
    let cpu_before = server.cpu()?;
    let started = Instant::now();
    let sem = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut joins = Vec::with_capacity(n);
    let seen: Arc<Vec<std::sync::Mutex<HashSet<String>>>> = Arc::new(
        (0..n)
            .map(|_| std::sync::Mutex::new(HashSet::new()))
            .collect(),
    );
    let (joined_tx, mut joined_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    for i in 0..n {
        let (sem, counts, channel, seen) =
            (sem.clone(), counts.clone(), channel.clone(), seen.clone());
        let (addr, source) = (server.addr, source_addr(i, args.source_addrs));
        let mut stop = stop_rx.clone();
        let joined = joined_tx.clone();
        joins.push(tokio::spawn(async move {
            let permit = sem.acquire().await;
            let mut ws = ws_connect(addr, source, &token(&format!("pj{i}")), AuthMode::Subprotocol)
                .await
                .with_context(|| format!("connection {i}"))?;
            ws.send(WsMessage::Text(
                json!({"type": "subscribe", "id": "s", "channel_id": channel}).to_string().into(),
            ))
            .await?;
            let mut acked = false;
            let mut permit = Some(permit);
            loop {
                tokio::select! {
                    msg = ws.next() => {
                        let Some(Ok(msg)) = msg else { break };
                        let WsMessage::Text(t) = msg else { continue };
                        let Ok(f) = serde_json::from_str::<Frame>(t.as_str()) else { continue };
                        match f.kind {
                            "presence.changed" => {
                                counts.presence_changed.fetch_add(1, Ordering::Relaxed);
                                if f.status == Some("online") && let Some(u) = f.user_id {
                                    seen[i].lock().unwrap().insert(u.to_owned());
                                }
                            }
                            "presence.batch" => {
                                counts.presence_batch.fetch_add(1, Ordering::Relaxed);
                                counts.batch_entries.fetch_add(f.presences.len() as u64, Ordering::Relaxed);
                                let mut s = seen[i].lock().unwrap();
                                for e in f.presences.iter().filter(|e| e.status == "online") {
                                    s.insert(e.user_id.to_owned());
                                }
                            }
                            "ack" if f.id == Some("s") && !acked => {
                                acked = true;
                                permit.take();
                                let _ = joined.send(());
                            }
                            _ => {
                                counts.other.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    _ = stop.changed() => break,
                }
            }
            anyhow::Ok(())
        }));
    }
    drop(joined_tx);
    let limit = tokio::time::sleep(Duration::from_secs(args.join_limit_secs));
    tokio::pin!(limit);
    let mut joined = 0usize;
    while joined < n {
        tokio::select! {
            j = joined_rx.recv() => match j { Some(()) => joined += 1, None => break },
            _ = &mut limit => break,
        }
    }
    let join_secs = started.elapsed().as_secs_f64();
    println!("joined: {joined} of {n} subscribed in {join_secs:.1} s");
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let cpu = server.cpu()?.saturating_sub(cpu_before);
    let wall = started.elapsed().as_secs_f64();
    let frames_after = metrics_frames(&base).await?;
    server.check_alive()?;
    let _ = stop_tx.send(true);
    for j in joins {
        if let Err(e) = j.await? {
            println!("a connection failed: {e:#}");
        }
    }
    let delta = |k: &str| {
        frames_after
            .get(k)
            .copied()
            .unwrap_or(0)
            .saturating_sub(frames_before.get(k).copied().unwrap_or(0))
    };
    let total_out: u64 = frames_after.keys().map(|k| delta(k)).sum();
    let learned: Vec<usize> = seen.iter().map(|s| s.lock().unwrap().len()).collect();
    let learned_total: usize = learned.iter().sum();
    println!(
        "server CPU from the first join to {}s after the last: {:.2} s ({:.0} % of one core over {wall:.1} s), {:.0} µs per joined user",
        args.settle_secs,
        cpu.as_secs_f64(),
        100.0 * cpu.as_secs_f64() / wall,
        cpu.as_secs_f64() * 1e6 / n as f64
    );
    println!(
        "server frames written (parley_ws_frames_out_total): {total_out} in all; presence.changed {}, presence.batch {}, ack {}, welcome {}",
        delta("presence.changed"),
        delta("presence.batch"),
        delta("ack"),
        delta("welcome"),
    );
    println!(
        "clients received: presence.changed {}, presence.batch {} carrying {} entries, other {}",
        counts.presence_changed.load(Ordering::Relaxed),
        counts.presence_batch.load(Ordering::Relaxed),
        counts.batch_entries.load(Ordering::Relaxed),
        counts.other.load(Ordering::Relaxed),
    );
    println!(
        "online users learned per subscriber: mean {:.0}, min {}, max {} (a subscriber that joined k-th can learn of up to n-k later joiners, n(n-1)/2 = {} in all; learned {learned_total})",
        learned_total as f64 / n as f64,
        learned.iter().min().copied().unwrap_or(0),
        learned.iter().max().copied().unwrap_or(0),
        n * (n - 1) / 2,
    );
    Ok(())
}
