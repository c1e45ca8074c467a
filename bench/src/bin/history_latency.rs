//! `history_latency`: latency of history pages under an open-loop request rate.
//!
//! Starts the release `parley serve` (SQLite in a temp folder, or PostgreSQL with
//! `--database-url`), fills `--channels` channels with `--messages` messages in all (REST sends,
//! `--seed-concurrency` in flight), then requests pages of `--limit` messages at `--rate`
//! requests per second for `--duration-secs`: each request asks for the page before a random
//! seq of a random channel (one in ten asks for the latest page). Requests start on schedule
//! whether or not earlier ones finished (open loop), and each latency is counted from the
//! request's scheduled time, so a stall shows in the figures instead of slowing the load (and
//! from its actual start). Every answer is checked: 200, `--limit` messages unless nothing older
//! exists, seqs rising and before the asked seq (the load is `parley_bench::HistoryLoad`, which
//! `chat_mix --history-rate` runs too).
//!
//! `--bulk-seed` (PostgreSQL only; `parley_bench::pg_bulk_seed`) writes the messages with one `INSERT ... SELECT
//! generate_series` per batch of channels straight into the database instead of sending them
//! (ten million messages take minutes that way, not hours), and moves each channel's `last_seq`
//! and message counter to match. `--send-rate` keeps sending messages (REST, to random channels)
//! while the pages are requested, so the reads meet a write load.
//!
//! Prints p50/p95/p99/max, errors and the server's CPU during the load. Never passes or fails on
//! time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use parley_bench::{
    HistoryFigures, HistoryLoad, Rest, ServerProcess, loadavg, percentile, pg_bulk_seed, token,
};
use tokio::sync::Semaphore;

#[derive(Debug, Parser)]
#[command(about = "Latency of history pages at an open-loop request rate")]
struct Args {
    /// The parley binary (release build).
    #[arg(long, default_value_os_t = parley_bench::default_parley_path())]
    parley: std::path::PathBuf,
    /// PostgreSQL instead of SQLite.
    #[arg(long)]
    database_url: Option<String>,
    /// Channels to fill.
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Messages in all, spread evenly over the channels.
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Sends in flight while filling.
    #[arg(long, default_value_t = 64)]
    seed_concurrency: usize,
    /// History requests per second.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Measured time.
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// Messages per page.
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Write the messages straight into PostgreSQL (needs --database-url).
    #[arg(long)]
    bulk_seed: bool,
    /// Messages per second sent (REST) while the pages are requested.
    #[arg(long, default_value_t = 0)]
    send_rate: u32,
    /// Extra `parley serve` flags (repeat).
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut flags: Vec<String> = ["--rate-per-minute", "100000000", "--rate-burst", "1000000"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if let Some(url) = &args.database_url {
        flags.extend(["--database-url".to_owned(), url.clone()]);
    }
    flags.extend(args.server_args.iter().cloned());
    let mut server = ServerProcess::start(&args.parley, &flags)?;
    let engine = if args.database_url.is_some() {
        "postgres"
    } else {
        "sqlite"
    };
    println!(
        "history_latency: {} | {engine} | {} channels, {} messages, page {}, {} req/s for {} s",
        parley_bench::machine_summary(),
        args.channels,
        args.messages,
        args.limit,
        args.rate,
        args.duration_secs
    );
    let rest = Arc::new(Rest::new(server.http_base()));
    let owner = token("hist-owner");
    let mut channels = Vec::with_capacity(args.channels);
    for c in 0..args.channels.max(1) {
        channels.push(
            rest.create_channel(&owner, &format!("history {c}"), &[])
                .await?,
        );
    }

    // Fill: every channel gets its share, with `seed_concurrency` sends in flight.
    let t0 = Instant::now();
    let per_channel = args.messages.div_ceil(channels.len());
    if args.bulk_seed {
        let url = args
            .database_url
            .as_deref()
            .context("--bulk-seed writes into PostgreSQL: give --database-url")?;
        pg_bulk_seed(url, &channels, per_channel, "hist-owner").await?;
    }
    let slots = Arc::new(Semaphore::new(args.seed_concurrency.max(1)));
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..if args.bulk_seed { 0 } else { per_channel } {
        for ch in &channels {
            let permit = slots.clone().acquire_owned().await?;
            let (rest, owner, ch) = (rest.clone(), owner.clone(), ch.clone());
            sends.spawn(async move {
                let _permit = permit;
                let text = format!("history message {i}: some text of an ordinary length here");
                rest.send_message(&owner, &ch, &format!("s{i}"), &text)
                    .await
            });
            while let Some(done) = sends.try_join_next() {
                done??;
            }
        }
    }
    while let Some(done) = sends.join_next().await {
        done??;
    }
    let filled = t0.elapsed();
    println!(
        "filled {} messages in {:.1} s ({:.0} msgs/s), load average {}",
        per_channel * channels.len(),
        filled.as_secs_f64(),
        (per_channel * channels.len()) as f64 / filled.as_secs_f64(),
        loadavg()
    );
    server.check_alive()?;

    // Measure, open loop.
    let base = server.http_base();
    let total = u64::from(args.rate) * args.duration_secs;
    // The write load, open loop too, until the reads are done.
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(args.send_rate > 0));
    let writer = {
        let (rest, owner, channels, writing) = (
            rest.clone(),
            owner.clone(),
            channels.clone(),
            writing.clone(),
        );
        let every = Duration::from_secs_f64(1.0 / f64::from(args.send_rate.max(1)));
        tokio::spawn(async move {
            let (mut sent, mut failed) = (0u64, 0u64);
            let mut sends = tokio::task::JoinSet::new();
            let mut next = Instant::now();
            let mut k = 0u64;
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep_until(next.into()).await;
                next += every;
                k += 1;
                let ch = channels[(k as usize) % channels.len()].clone();
                let (rest, owner) = (rest.clone(), owner.clone());
                sends.spawn(async move {
                    rest.send_message(&owner, &ch, &format!("load-{k}"), "written during reads")
                        .await
                        .is_ok()
                });
                while let Some(done) = sends.try_join_next() {
                    if matches!(done, Ok(true)) {
                        sent += 1
                    } else {
                        failed += 1
                    }
                }
            }
            while let Some(done) = sends.join_next().await {
                if matches!(done, Ok(true)) {
                    sent += 1
                } else {
                    failed += 1
                }
            }
            (sent, failed)
        })
    };
    let cpu0 = server.cpu()?;
    let start = Instant::now() + Duration::from_millis(200);
    let samples = HistoryLoad {
        base,
        targets: channels
            .iter()
            .map(|c| (c.clone(), owner.clone()))
            .collect(),
        positions: per_channel as u64,
        limit: args.limit,
        rate: f64::from(args.rate),
        start,
        count: total,
        timeout: Duration::from_secs(30),
        seed: 14,
    }
    .run()
    .await?;
    // Also from the request's start: the generator's timer wakes up to a millisecond after the
    // scheduled time (tokio's timer resolution), which the scheduled figures include.
    let HistoryFigures {
        from_schedule_us: lat_us,
        from_start_us: sent_us,
        errors,
        first_error,
    } = HistoryFigures::new(&samples);
    let wall = start.elapsed();
    let cpu = server.cpu()?.saturating_sub(cpu0);
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    let (sent, failed) = writer.await?;
    if args.send_rate > 0 {
        println!(
            "write load: {sent} messages sent during the reads ({:.0}/s), {failed} failed",
            sent as f64 / wall.as_secs_f64()
        );
    }
    server.check_alive()?;
    if lat_us.is_empty() {
        bail!(
            "no request succeeded; the first failed: {}",
            first_error.unwrap_or_default()
        );
    }
    let ms = |us: u32| f64::from(us) / 1000.0;
    println!(
        "{} requests ({errors} failed) in {:.1} s: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms; server CPU {:.1} % ({:.0} µs per request); load average {}",
        lat_us.len(),
        wall.as_secs_f64(),
        ms(percentile(&lat_us, 50.0)),
        ms(percentile(&lat_us, 95.0)),
        ms(percentile(&lat_us, 99.0)),
        ms(*lat_us.last().context("a latency")?),
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / lat_us.len() as f64,
        loadavg()
    );
    println!(
        "  from each request's actual start: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms",
        ms(percentile(&sent_us, 50.0)),
        ms(percentile(&sent_us, 95.0)),
        ms(percentile(&sent_us, 99.0)),
    );
    if let Some(e) = first_error {
        println!("  first failed request: {e}");
    }
    Ok(())
}
