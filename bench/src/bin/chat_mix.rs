//! `chat_mix`: many small conversations, open-loop, latency measured at the receivers.
//!
//! Starts the release `parley serve` (SQLite in a temp folder, or PostgreSQL with
//! `--database-url`). N connections, each a distinct user `cm{i}`; each user is the only member of
//! one personal channel (a 1-member channel it created, not a DM) and a member of one room of 10
//! (users 10r..10r+9 share room r, so there are N/10 rooms). Every connection subscribes to both.
//!
//! Sending is open-loop at a fixed total rate R: the k-th message of the run is due at k/R seconds
//! after the start and is sent by connection k mod N into its room, whatever happened to earlier
//! messages. Each message's text carries its intended send time, and every receiver (the 10
//! members of the room, the sender included) measures receive time minus intended send time, so
//! a stalled server or client shows up as latency instead of being hidden (no coordinated
//! omission). Messages due in the warm-up are delivered and checked but not in the percentiles.
//!
//! Every delivery is checked: per receiver and channel, event seqs must rise by exactly one from
//! the seq of the subscribe ack (a gap or a repeat is counted), and each receiver must get every
//! acknowledged message of its room (lost = acked messages a member did not receive). Server CPU
//! is read from `/proc/PID/stat` (utime + stime) at the start and end of the measured window and
//! reported as % of one core and as CPU microseconds per delivered message.
//!
//! One tokio task per connection (reading and sending), one client runtime thread by default,
//! 4 KiB read buffers: the client shares the machine with the server. Bounded: it sends for
//! warm-up + duration, then waits at most `--drain-secs` for the last deliveries, and ends.
//!
//! `--history-rate R` adds, over the measured window, an open-loop load of R history requests per
//! second (`parley_bench::HistoryLoad`, as in `history_latency`): pages of `--history-limit`
//! messages before a random seq of a random room (one in ten the latest page), each as a member
//! of the room, on a thread and Tokio runtime of its own (so the WebSocket tasks do not delay its
//! timing) over one keep-alive HTTP client. Latency is counted from each request's scheduled time
//! and from its actual start; every answer is checked (200, a full page unless nothing older
//! exists, seqs before the asked one), and a failed request fails the run like a lost delivery.
//! `--seed-messages-per-room N` (PostgreSQL only) first writes N messages into every room straight
//! into the database (`parley_bench::pg_bulk_seed`; 1,000 rooms × 10,000 = ten million), before
//! any connection subscribes, so the subscribe acks and the seq checks start after them, and marks
//! them read by every member (old history: the unread counts, and so the `unread.updated`
//! frames, are those of the mix without the seed).
//!
//! Prints figures; never passes or fails on time (it exits non-zero when a delivery was lost or
//! out of order).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::{SinkExt, StreamExt};
use parley_bench::{
    AuthMode, FrameHead as Frame, HistoryFigures, HistoryLoad, Rest, ServerProcess, Ws, due_offset,
    percentile, pg_bulk_seed, pg_mark_all_read, sent_offset, source_addr, token, ws_connect,
};
use serde_json::json;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[derive(Debug, Parser)]
#[command(
    about = "Chat mix: N distinct users, 1 personal channel each + rooms of 10, open-loop sends, \
                   latency at the receivers, loss/order checked, server CPU per delivery"
)]
struct Args {
    /// The parley binary (release build).
    #[arg(long, default_value_os_t = parley_bench::default_parley_path())]
    parley: std::path::PathBuf,
    /// PostgreSQL URL; without it the server uses SQLite in a temp folder.
    #[arg(long)]
    database_url: Option<String>,
    /// Connections, each a distinct user.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    connections: usize,
    /// Members per room (N / room-size rooms).
    #[arg(long, default_value_t = 10)]
    room_size: usize,
    /// Total messages per second over all connections (open-loop).
    #[arg(long, default_value_t = 2_000.0)]
    rate: f64,
    /// Measured time, in seconds.
    #[arg(long, default_value_t = 30)]
    duration_secs: u64,
    /// Sending before the measured time (checked, not in the percentiles nor the CPU), in seconds.
    #[arg(long, default_value_t = 3)]
    warmup_secs: u64,
    /// Longest wait for the last acks and deliveries after sending ends, in seconds.
    #[arg(long, default_value_t = 20)]
    drain_secs: u64,
    /// Message text length in bytes (at least what the send time and ids need).
    #[arg(long, default_value_t = 64)]
    text_bytes: usize,
    /// Client source addresses 127.0.0.2 .. 127.0.0.(1+K).
    #[arg(long, default_value_t = 4)]
    source_addrs: usize,
    /// Upgrades (and REST setup calls) in flight at once while setting up.
    #[arg(long, default_value_t = 32)]
    setup_concurrency: usize,
    /// Client runtime worker threads (the client shares the cores with the server).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Also report the CPU of this process and its direct children over the measured window
    /// (e.g. the PostgreSQL postmaster: first line of `$PGDATA/postmaster.pid`).
    #[arg(long)]
    db_pid: Option<u32>,
    /// History requests per second during the measured window (0 = none).
    #[arg(long, default_value_t = 0.0)]
    history_rate: f64,
    /// Messages per history page.
    #[arg(long, default_value_t = 50)]
    history_limit: u32,
    /// Messages written straight into PostgreSQL in every room before the run (needs
    /// --database-url).
    #[arg(long, default_value_t = 0)]
    seed_messages_per_room: usize,
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

/// The timing of the run, shared by every connection.
struct Plan {
    start: Instant,
    /// Messages due before this offset (µs from `start`) are not in the percentiles.
    warmup_us: u64,
    /// No message is due at or after this offset (µs from `start`).
    send_end_us: u64,
    /// Seconds between two consecutive messages of the whole run (1 / rate).
    interval: f64,
    connections: usize,
}

/// Counters the main task watches to know when the last deliveries are in.
#[derive(Default)]
struct Live {
    sent: AtomicU64,
    acked: AtomicU64,
    refused: AtomicU64,
    delivered: AtomicU64,
}

/// What a connection saw of one of its channels.
#[derive(Debug, Default, Clone, Copy)]
struct ChanCheck {
    subscribed: bool,
    last_seq: u64,
    messages: u64,
    gaps: u64,
    repeats: u64,
    before_ack: u64,
}

#[derive(Default)]
struct ConnResult {
    /// Latencies (µs) of messages due in the measured window.
    latencies_us: Vec<u32>,
    /// The same from each message's actual send.
    from_send_us: Vec<u32>,
    sent: u64,
    acked: u64,
    errors: std::collections::BTreeMap<String, u64>,
    first_error: Option<String>,
    personal: ChanCheck,
    room: ChanCheck,
    failure: Option<String>,
    /// `unread.updated` frames of the room received, and the last count.
    unread_frames: u64,
    unread_last: Option<u64>,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let n = args.connections.max(1);
    let room_size = args.room_size.max(1);
    if args.seed_messages_per_room > 0 && args.database_url.is_none() {
        bail!(
            "--seed-messages-per-room writes the messages straight into PostgreSQL: give --database-url (it cannot seed SQLite)"
        );
    }
    let (soft, hard) = parley_bench::raise_nofile_limit()?;
    if (n as u64) + 200 > soft {
        bail!("{n} connections need more than the open-files limit {soft} (hard {hard})");
    }
    println!(
        "chat_mix: {} | open files limit {soft} (hard {hard}) | load average {}",
        parley_bench::machine_summary(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    // What a durable commit costs at least on this disk: p50 at the receivers can't beat it.
    let fsync_dir = std::env::temp_dir();
    let fsync = parley_bench::fsync_latency_us(&fsync_dir, 200)
        .with_context(|| format!("measure fdatasync latency in {}", fsync_dir.display()))?;
    let fsync_p50 = percentile(&fsync, 50.0);
    println!(
        "disk: an 8 KiB write + fdatasync in {}, 200 times: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms",
        fsync_dir.display(),
        f64::from(fsync_p50) / 1000.0,
        f64::from(percentile(&fsync, 90.0)) / 1000.0,
        f64::from(percentile(&fsync, 99.0)) / 1000.0
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
    let rooms = n.div_ceil(room_size);
    println!(
        "== connections={n} (distinct users) personal=1-member channel each, rooms={rooms} of {room_size}, rate={} msgs/s open-loop, duration={} s (warm-up {} s), text={} B",
        args.rate, args.duration_secs, args.warmup_secs, args.text_bytes
    );
    println!("server: {} (pid {})", server.banner, server.pid());

    // Setup over REST: a personal channel per user, then the rooms.
    let t = Instant::now();
    let users: Vec<String> = (0..n).map(|i| format!("cm{i}")).collect();
    let tokens: Vec<String> = users.iter().map(|u| token(u)).collect();
    let rest = Rest::new(server.http_base());
    let conc = args.setup_concurrency.max(1);
    let (personal, room_ids) = rest
        .create_chat_mix_channels(&users, &tokens, room_size, conc)
        .await?;
    println!(
        "created {n} personal channels and {rooms} rooms in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let seeded = args.seed_messages_per_room;
    if let (true, Some(url)) = (seeded > 0, &args.database_url) {
        let t = Instant::now();
        pg_bulk_seed(url, &room_ids, seeded, SEED_SENDER).await?;
        pg_mark_all_read(url, &room_ids).await?;
        println!(
            "seeded {seeded} messages into each of the {rooms} rooms ({} in all) straight into PostgreSQL, read by every member, in {:.1} s; load average {}",
            seeded * rooms,
            t.elapsed().as_secs_f64(),
            parley_bench::loadavg()
        );
    }

    // Open and subscribe every connection.
    let t = Instant::now();
    let limit = Arc::new(Semaphore::new(conc));
    let mut opening = Vec::with_capacity(n);
    for (i, tok) in tokens.iter().enumerate() {
        let limit = limit.clone();
        let tok = tok.clone();
        let (addr, src) = (server.addr, source_addr(i, args.source_addrs));
        let (p, r) = (personal[i].clone(), room_ids[i / room_size].clone());
        opening.push(tokio::spawn(async move {
            let _permit = limit.acquire().await;
            tokio::time::timeout(
                Duration::from_secs(60),
                open_and_subscribe(addr, src, tok, p, r),
            )
            .await
            .map_err(|_| anyhow::anyhow!("open + subscribe timed out"))
            .and_then(|r| r)
        }));
    }
    let mut sockets = Vec::with_capacity(n);
    for h in opening {
        sockets.push(
            h.await?
                .context("a connection could not open or subscribe")?,
        );
    }
    println!(
        "opened and subscribed {n} connections (2 channels each) in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    server.check_alive()?;

    let live = Arc::new(Live::default());
    let acked_per_room: Arc<Vec<AtomicU64>> =
        Arc::new((0..rooms).map(|_| AtomicU64::new(0)).collect());
    let (go_tx, go_rx) = watch::channel::<Option<Arc<Plan>>>(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut handles = Vec::with_capacity(n);
    for (i, (ws, (p, r, ack_seqs))) in sockets.into_iter().enumerate() {
        let room = i / room_size;
        handles.push(tokio::spawn(connection(Conn {
            ws,
            index: i,
            personal: p,
            room: r,
            room_index: room,
            subscribed_seqs: ack_seqs,
            text_bytes: args.text_bytes,
            go: go_rx.clone(),
            stop: stop_rx.clone(),
            live: live.clone(),
            acked_per_room: acked_per_room.clone(),
        })));
    }
    drop(go_rx);
    let start = Instant::now() + Duration::from_millis(200);
    let interval = 1.0 / args.rate.max(0.001);
    let warmup = Duration::from_secs(args.warmup_secs);
    let send_end = warmup + Duration::from_secs(args.duration_secs);
    let plan = Arc::new(Plan {
        start,
        warmup_us: warmup.as_micros() as u64,
        send_end_us: send_end.as_micros() as u64,
        interval,
        connections: n,
    });
    let _ = go_tx.send(Some(plan.clone()));
    // The history load, over the measured window, on a thread and runtime of its own.
    let history_count = (args.history_rate * args.duration_secs as f64).round() as u64;
    let history = if history_count > 0 {
        let load = HistoryLoad {
            base: server.http_base(),
            targets: room_ids
                .iter()
                .enumerate()
                .map(|(r, id)| (id.clone(), tokens[r * room_size].clone()))
                .collect(),
            positions: seeded as u64,
            limit: args.history_limit,
            rate: args.history_rate,
            start: start + warmup,
            count: history_count,
            timeout: Duration::from_secs(args.drain_secs.max(1)),
            seed: 14,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("history-load".into())
            .spawn(move || {
                let samples = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(load.run()));
                let _ = tx.send(samples);
            })?;
        Some(rx)
    } else {
        None
    };

    tokio::time::sleep_until((start + warmup).into()).await;
    let (srv0, me0, del0, ack0, t0) = (
        server.cpu()?,
        parley_bench::cpu_time("self")?,
        live.delivered.load(Ordering::Relaxed),
        live.acked.load(Ordering::Relaxed),
        Instant::now(),
    );
    let (threads0, db0) = (
        parley_bench::thread_cpu(server.pid()),
        args.db_pid.map(parley_bench::tree_cpu),
    );
    tokio::time::sleep_until((start + send_end).into()).await;
    let (srv1, me1, del1, ack1, t1) = (
        server.cpu()?,
        parley_bench::cpu_time("self")?,
        live.delivered.load(Ordering::Relaxed),
        live.acked.load(Ordering::Relaxed),
        Instant::now(),
    );
    let (threads1, db1) = (
        parley_bench::thread_cpu(server.pid()),
        args.db_pid.map(parley_bench::tree_cpu),
    );
    let mem = server.mem()?;

    // Drain: until every send is answered and every acked message reached its room's members.
    let drain_until = Instant::now() + Duration::from_secs(args.drain_secs);
    let room_members = |r: usize| ((r + 1) * room_size).min(n) - r * room_size;
    loop {
        let answered = live.acked.load(Ordering::Relaxed) + live.refused.load(Ordering::Relaxed);
        let expected: u64 = acked_per_room
            .iter()
            .enumerate()
            .map(|(r, a)| a.load(Ordering::Relaxed) * room_members(r) as u64)
            .sum();
        let done = answered >= live.sent.load(Ordering::Relaxed)
            && live.delivered.load(Ordering::Relaxed) >= expected;
        if done || Instant::now() >= drain_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained = (Instant::now() - (start + send_end)).as_secs_f64();
    let _ = stop_tx.send(true);
    let mut results = Vec::with_capacity(n);
    for h in handles {
        results.push(h.await?);
    }
    let history = match history {
        Some(rx) => Some(HistoryFigures::new(
            &rx.await.context("the history load ended early")??,
        )),
        None => None,
    };
    server.check_alive()?;

    // Figures.
    let measured = (t1 - t0).as_secs_f64();
    let mut lat: Vec<u32> = results
        .iter()
        .flat_map(|r| r.latencies_us.iter().copied())
        .collect();
    lat.sort_unstable();
    let mut from_send: Vec<u32> = results
        .iter()
        .flat_map(|r| r.from_send_us.iter().copied())
        .collect();
    from_send.sort_unstable();
    let ms = |us: u32| us as f64 / 1000.0;
    let sent: u64 = results.iter().map(|r| r.sent).sum();
    let acked: u64 = results.iter().map(|r| r.acked).sum();
    let mut errors = std::collections::BTreeMap::<String, u64>::new();
    for r in &results {
        for (k, v) in &r.errors {
            *errors.entry(k.clone()).or_default() += v;
        }
    }
    let mut lost = 0u64;
    let mut extra = 0u64;
    let (mut gaps, mut repeats, mut unsubscribed, mut personal_msgs) = (0u64, 0u64, 0u64, 0u64);
    for (i, r) in results.iter().enumerate() {
        let want = acked_per_room[i / room_size].load(Ordering::Relaxed);
        lost += want.saturating_sub(r.room.messages);
        extra += r.room.messages.saturating_sub(want);
        for c in [&r.personal, &r.room] {
            gaps += c.gaps;
            repeats += c.repeats + c.before_ack;
            unsubscribed += u64::from(!c.subscribed);
        }
        personal_msgs += r.personal.messages;
    }
    // Nobody reads or deletes in this mix (the seeded messages were marked read): a member's
    // unread count of its room is the others' acknowledged messages there (up to 1,000).
    let (mut unread_frames, mut unread_exact) = (0u64, 0usize);
    for (i, r) in results.iter().enumerate() {
        unread_frames += r.unread_frames;
        let others = acked_per_room[i / room_size]
            .load(Ordering::Relaxed)
            .saturating_sub(r.acked);
        unread_exact += usize::from(r.unread_last == Some(others.min(1000)));
    }
    let failures: Vec<&String> = results.iter().filter_map(|r| r.failure.as_ref()).collect();
    let delivered_window = del1 - del0;
    let srv_cpu = (srv1 - srv0).as_secs_f64();
    let me_cpu = (me1 - me0).as_secs_f64();
    println!(
        "sent {sent} messages ({:.0} msgs/s in the window), acked {acked}, refused {errors:?}",
        (ack1 - ack0) as f64 / measured
    );
    println!(
        "deliveries: {} in total, {delivered_window} in the measured {measured:.1} s => {:.0}/s; drain took {drained:.1} s",
        live.delivered.load(Ordering::Relaxed),
        delivered_window as f64 / measured
    );
    println!(
        "latency at the receivers (receive - intended send), {} deliveries of messages due in the window: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        ms(percentile(&lat, 50.0)),
        ms(percentile(&lat, 90.0)),
        ms(percentile(&lat, 99.0)),
        ms(lat.last().copied().unwrap_or(0))
    );
    println!(
        "latency at the receivers from each message's actual send: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(percentile(&from_send, 50.0)),
        ms(percentile(&from_send, 90.0)),
        ms(percentile(&from_send, 99.0)),
        ms(from_send.last().copied().unwrap_or(0))
    );
    println!(
        "server CPU over the window: {:.0}% of one core, {:.1} µs per delivered message ({:.1} µs per acked message); bench client {:.0}%; server RSS {}",
        srv_cpu / measured * 100.0,
        srv_cpu * 1e6 / delivered_window.max(1) as f64,
        srv_cpu * 1e6 / (ack1 - ack0).max(1) as f64,
        me_cpu / measured * 100.0,
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
    println!(
        "unread.updated frames of the rooms: {unread_frames} ({:.2} per delivery); last count exact (the others' acked messages) at {unread_exact} of {} connections when the run ended",
        unread_frames as f64 / live.delivered.load(Ordering::Relaxed).max(1) as f64,
        results.len()
    );
    if let (Some(a), Some(b)) = (db0, db1) {
        println!(
            "database processes CPU: {:.0}% of one core",
            b.saturating_sub(a).as_secs_f64() / measured * 100.0
        );
    }
    if let Some(h) = &history {
        println!(
            "history load: {history_count} requests at {} req/s over the measured window, pages of {} {} of a random room of {rooms} (as a member), {} failed; load average {}",
            args.history_rate,
            args.history_limit,
            if seeded > 0 {
                format!("before a random seq of the {seeded} seeded (one in ten the latest page)")
            } else {
                "the latest page".to_owned()
            },
            h.errors,
            parley_bench::loadavg()
        );
        for (what, lat) in [
            ("from each request's scheduled time", &h.from_schedule_us),
            ("from each request's actual start", &h.from_start_us),
        ] {
            println!(
                "history latency {what}: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                ms(percentile(lat, 50.0)),
                ms(percentile(lat, 95.0)),
                ms(percentile(lat, 99.0)),
                ms(lat.last().copied().unwrap_or(0))
            );
        }
        if let Some(e) = &h.first_error {
            println!("first failed history request: {e}");
        }
    }
    let history_errors = history.as_ref().map_or(0, |h| h.errors);
    let ok = lost == 0
        && gaps == 0
        && repeats == 0
        && unsubscribed == 0
        && failures.is_empty()
        && history_errors == 0;
    println!(
        "check: lost {lost} (acked messages a room member did not get), extra {extra} (delivered, not acked), seq gaps {gaps}, repeats/out of order {repeats}, personal-channel events {personal_msgs}, connections failed {}: {}",
        failures.len(),
        if ok { "OK" } else { "FAILED" }
    );
    if let Some(e) = failures.first() {
        println!("first connection failure: {e}");
    }
    if let Some(e) = results.iter().find_map(|r| r.first_error.as_ref()) {
        println!("first error frame: {e}");
    }
    println!(
        "p50 at the receivers is {:.2} ms above the disk's fdatasync p50 ({:.2} ms) from the intended send, {:.2} ms from the actual send",
        ms(percentile(&lat, 50.0)) - ms(fsync_p50),
        ms(fsync_p50),
        ms(percentile(&from_send, 50.0)) - ms(fsync_p50)
    );
    let backend = if args.database_url.is_some() {
        "postgres"
    } else {
        "sqlite"
    };
    println!(
        "SUMMARY chat_mix backend={backend} connections={n} rooms={rooms} rate={} deliveries/s={:.0} p50={:.2}ms p90={:.2}ms p99={:.2}ms max={:.2}ms p50_from_send={:.2}ms p99_from_send={:.2}ms fsync_p50={:.2}ms server_cpu={:.0}% cpu_us_per_delivery={:.1} client_cpu={:.0}% lost={lost} gaps={gaps}{} ok={ok}",
        args.rate,
        delivered_window as f64 / measured,
        ms(percentile(&lat, 50.0)),
        ms(percentile(&lat, 90.0)),
        ms(percentile(&lat, 99.0)),
        ms(lat.last().copied().unwrap_or(0)),
        ms(percentile(&from_send, 50.0)),
        ms(percentile(&from_send, 99.0)),
        ms(fsync_p50),
        srv_cpu / measured * 100.0,
        srv_cpu * 1e6 / delivered_window.max(1) as f64,
        me_cpu / measured * 100.0,
        history_summary(seeded, args.history_rate, history.as_ref()),
    );
    drop(server);
    if !ok {
        bail!("deliveries were lost or out of order, or history requests failed (see above)");
    }
    Ok(())
}

/// Who the seeded messages are from (not a member of any room).
const SEED_SENDER: &str = "cm-seed";

/// The SUMMARY fields of the seed and the history load (empty without them).
fn history_summary(seeded: usize, rate: f64, history: Option<&HistoryFigures>) -> String {
    let mut out = String::new();
    if seeded > 0 {
        out += &format!(" seeded_per_room={seeded}");
    }
    if let Some(h) = history {
        let ms = |lat: &[u32], p: f64| percentile(lat, p) as f64 / 1000.0;
        let max = |lat: &[u32]| lat.last().copied().unwrap_or(0) as f64 / 1000.0;
        let (s, a) = (&h.from_schedule_us, &h.from_start_us);
        out += &format!(
            " history_rate={rate} history_p50={:.2}ms history_p95={:.2}ms history_p99={:.2}ms history_max={:.2}ms history_from_start_p50={:.2}ms history_from_start_p95={:.2}ms history_from_start_p99={:.2}ms history_from_start_max={:.2}ms history_errors={}",
            ms(s, 50.0),
            ms(s, 95.0),
            ms(s, 99.0),
            max(s),
            ms(a, 50.0),
            ms(a, 95.0),
            ms(a, 99.0),
            max(a),
            h.errors
        );
    }
    out
}

/// Opens a connection as `token`, subscribes to the personal channel and the room, and returns
/// it with both channel ids and the seqs of the two subscribe acks.
async fn open_and_subscribe(
    addr: std::net::SocketAddr,
    src: std::net::IpAddr,
    token: String,
    personal: String,
    room: String,
) -> anyhow::Result<(Ws, (String, String, [Option<u64>; 2]))> {
    let mut ws = ws_connect(addr, src, &token, AuthMode::Subprotocol).await?;
    for (id, ch) in [("p", &personal), ("r", &room)] {
        ws.feed(WsMessage::Text(
            json!({ "type": "subscribe", "id": id, "channel_id": ch })
                .to_string()
                .into(),
        ))
        .await?;
    }
    ws.flush().await?;
    let mut seqs = [None, None];
    while seqs.iter().any(Option::is_none) {
        let t = match ws.next().await {
            Some(Ok(WsMessage::Text(t))) => t,
            Some(Ok(WsMessage::Close(c))) => bail!("closed while subscribing: {c:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e).context("reading the subscribe acks"),
            None => bail!("closed while subscribing"),
        };
        let Ok(f) = serde_json::from_str::<Frame>(t.as_str()) else {
            continue;
        };
        let slot = match f.id {
            Some("p") => 0,
            Some("r") => 1,
            _ => continue,
        };
        if f.kind != "ack" {
            bail!("subscribe refused: {t}");
        }
        seqs[slot] = Some(f.seq.unwrap_or(0));
    }
    Ok((ws, (personal, room, seqs)))
}

struct Conn {
    ws: Ws,
    index: usize,
    personal: String,
    room: String,
    room_index: usize,
    subscribed_seqs: [Option<u64>; 2],
    text_bytes: usize,
    go: watch::Receiver<Option<Arc<Plan>>>,
    stop: watch::Receiver<bool>,
    live: Arc<Live>,
    acked_per_room: Arc<Vec<AtomicU64>>,
}

/// One connection: sends its share of the open-loop schedule into its room, and checks and times
/// everything it receives, until told to stop.
async fn connection(mut c: Conn) -> ConnResult {
    let mut r = ConnResult::default();
    for (check, seq) in [&mut r.personal, &mut r.room]
        .into_iter()
        .zip(c.subscribed_seqs)
    {
        check.subscribed = seq.is_some();
        check.last_seq = seq.unwrap_or(0);
    }
    let plan = loop {
        if let Some(p) = c.go.borrow_and_update().clone() {
            break p;
        }
        if c.go.changed().await.is_err() {
            r.failure = Some("no start signal".into());
            return r;
        }
    };
    // This connection's j-th message is due at (index + j * N) / rate seconds after the start.
    let due = |j: u64| -> u64 {
        ((c.index as f64 + j as f64 * plan.connections as f64) * plan.interval * 1e6) as u64
    };
    let mut j = 0u64;
    let mut next_due = due(0);
    let pad_to = c.text_bytes;
    loop {
        let sending = next_due < plan.send_end_us;
        let wake = plan.start + Duration::from_micros(next_due);
        tokio::select! {
            biased;
            changed = c.stop.changed() => {
                if changed.is_err() || *c.stop.borrow() {
                    break;
                }
            }
            _ = tokio::time::sleep_until(wake.into()), if sending => {
                // The actual send time too: the generator's timer may wake late (about 1 ms
                // granularity), which counts in the latency from the intended time.
                let sent_at = plan.start.elapsed().as_micros();
                let mut text = format!("t{next_due}.s{sent_at}.c{}.{j}.", c.index);
                while text.len() < pad_to {
                    text.push('x');
                }
                let frame = format!(
                    r#"{{"type":"message.send","id":"m{j}","channel_id":"{}","client_msg_id":"cm{}-{j}","text":"{text}"}}"#,
                    c.room, c.index
                );
                if let Err(e) = c.ws.send(WsMessage::Text(frame.into())).await {
                    r.failure = Some(format!("send: {e}"));
                    break;
                }
                r.sent += 1;
                c.live.sent.fetch_add(1, Ordering::Relaxed);
                j += 1;
                next_due = due(j);
            }
            msg = c.ws.next() => {
                let t = match msg {
                    Some(Ok(WsMessage::Text(t))) => t,
                    Some(Ok(WsMessage::Close(f))) => {
                        r.failure = Some(format!("server closed: {f:?}"));
                        break;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        r.failure = Some(format!("read: {e}"));
                        break;
                    }
                    None => {
                        r.failure = Some("connection ended".into());
                        break;
                    }
                };
                let now = Instant::now();
                let raw = t.as_str();
                let Ok(f) = serde_json::from_str::<Frame>(raw) else {
                    continue;
                };
                match f.kind {
                    "ack" => {
                        if f.id.is_some_and(|id| id.starts_with('m')) {
                            r.acked += 1;
                            c.live.acked.fetch_add(1, Ordering::Relaxed);
                            c.acked_per_room[c.room_index].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    "error" => {
                        *r.errors.entry(f.code.unwrap_or("?").to_owned()).or_default() += 1;
                        if r.first_error.is_none() {
                            r.first_error = Some(raw.to_owned());
                        }
                        if f.id.is_some_and(|id| id.starts_with('m')) {
                            c.live.refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    "unread.updated" => {
                        if f.channel_id == Some(c.room.as_str()) {
                            r.unread_frames += 1;
                            r.unread_last = unread_count(raw);
                        }
                    }
                    kind => {
                        let (Some(ch), Some(seq)) = (f.channel_id, f.seq) else {
                            continue; // unread.updated, presence, read receipts: not channel events
                        };
                        let check = if ch == c.room {
                            &mut r.room
                        } else if ch == c.personal {
                            &mut r.personal
                        } else {
                            continue;
                        };
                        if !check.subscribed {
                            check.before_ack += 1;
                        } else if seq == check.last_seq + 1 {
                            check.last_seq = seq;
                        } else if seq > check.last_seq + 1 {
                            check.gaps += seq - check.last_seq - 1;
                            check.last_seq = seq;
                        } else {
                            check.repeats += 1;
                        }
                        if kind == "message.new" {
                            check.messages += 1;
                            c.live.delivered.fetch_add(1, Ordering::Relaxed);
                            if let Some(at) = due_offset(raw)
                                && at >= plan.warmup_us
                            {
                                let intended = plan.start + Duration::from_micros(at);
                                let us = now.saturating_duration_since(intended).as_micros();
                                r.latencies_us.push(us.min(u128::from(u32::MAX)) as u32);
                                if let Some(sent) = sent_offset(raw) {
                                    let sent = plan.start + Duration::from_micros(sent);
                                    let us = now.saturating_duration_since(sent).as_micros();
                                    r.from_send_us.push(us.min(u128::from(u32::MAX)) as u32);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), c.ws.close(None)).await;
    r
}

/// The `unread_count` of an `unread.updated` frame.
fn unread_count(raw: &str) -> Option<u64> {
    let at = raw.find("\"unread_count\":")? + "\"unread_count\":".len();
    let digits = raw[at..].split(|c: char| !c.is_ascii_digit()).next()?;
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::{due_offset, sent_offset, unread_count};

    #[test]
    fn unread_count_is_read_from_the_frame() {
        let raw =
            r#"{"type":"unread.updated","channel_id":"c","unread_count":42,"last_read_seq":0}"#;
        assert_eq!(unread_count(raw), Some(42));
        assert_eq!(unread_count(r#"{"type":"ack"}"#), None);
    }

    #[test]
    fn due_offset_reads_the_send_time_from_the_text() {
        let raw = r#"{"type":"message.new","channel_id":"c","seq":3,"message":{"id":"m","text":"t1234567.c5.0.xxxx","deleted":false}}"#;
        assert_eq!(due_offset(raw), Some(1_234_567));
        assert_eq!(due_offset(r#"{"type":"ack"}"#), None);
        let raw = r#"{"type":"message.new","channel_id":"c","seq":3,"message":{"id":"m","text":"t1234567.s1235001.c5.0.xxxx","deleted":false}}"#;
        assert_eq!(due_offset(raw), Some(1_234_567));
        assert_eq!(sent_offset(raw), Some(1_235_001));
    }
}
