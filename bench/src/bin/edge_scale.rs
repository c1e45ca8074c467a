//! `edge_scale`: tens of thousands of WebSocket clients over several edge processes, one core,
//! NATS and PostgreSQL (issue 11 §8). Not a timed test: it prints figures.
//!
//! `edge_scale run` is the coordinator. It starts the server processes (one core and `--edges`
//! edges; `--topology all` runs every one of them as today's `--role all` node on the shared
//! PostgreSQL and NATS, the "core" being a node that holds no client connection and takes the
//! REST setup and the fan-out sends; `--topology split` runs `--role core` + `--role edge`), then
//! creates the users' channels over REST on the core: a personal 1-member channel per user, rooms
//! of `--room-size` and one channel with every user (the fan-out channel). It starts
//! `--generators` load-generator processes (`edge_scale gen`, this same binary; each holds at most
//! its open-files limit of connections) and drives them over their stdin/stdout, one line per
//! command and per answer:
//!
//! 1. open a quarter of the connections (each an authenticated WebSocket from 127.0.0.x to edge
//!    `i mod edges`), then the rest: each edge's RSS growth between the two, per connection, is
//!    the memory per idle connection without the edge's one-time costs;
//! 2. subscribe every connection to the fan-out channel (which all share): the memory per idle
//!    subscribed connection is the idle figure plus this step's growth per connection; then to
//!    its personal channel and its room (three channels each);
//! 3. `--fanouts` times: one message to the fan-out channel over REST; each generator stamps
//!    every delivery with the wall clock (shared by the processes of one machine) and reports the
//!    first, median, p99 and last, which the coordinator compares with the send's commit (its
//!    REST answer);
//! 4. the chat mix: open-loop sends at `--rate` messages/s in total, the k-th due at k/rate s
//!    and sent by connection k mod N into its room; every receiver measures receive time minus
//!    intended send time, and checks seqs (no gap, no repeat) and that it got every acknowledged
//!    message of its room.
//!
//! Core and edge memory (`/proc/PID/status`) and CPU (`/proc/PID/stat`) are read at every step.
//! Every phase is bounded in time; every process it started is killed when it ends.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use futures::{SinkExt, StreamExt};
use parley_bench::{
    AuthMode, FrameHead, MemStatus, Rest, SeqCheck, ServerProcess, due_offset, epoch_us, mib,
    percentile, source_addr, token, ws_connect,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[derive(Debug, Parser)]
#[command(about = "Connections at scale over several edges, one core, NATS and PostgreSQL")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The coordinator: starts the servers and the load generators, prints the figures.
    Run(Box<RunArgs>),
    /// A load generator (started by `run`; commands on stdin, answers on stdout).
    Gen(GenArgs),
}

/// Which processes serve: today's `--role all` nodes, or separate `--role core` / `--role edge`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Topology {
    All,
    Split,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The parley binary (release build).
    #[arg(long, default_value_os_t = parley_bench::default_parley_path())]
    parley: PathBuf,
    #[arg(long, env = "PARLEY_TEST_DATABASE_URL")]
    database_url: String,
    #[arg(long, env = "PARLEY_TEST_NATS_URL")]
    nats_url: String,
    /// The NATS URL of the `--role edge` processes (the edge user's credentials), in the split
    /// topology; the core's by default.
    #[arg(long)]
    edge_nats_url: Option<String>,
    #[arg(long, value_enum, default_value_t = Topology::All)]
    topology: Topology,
    /// Edge processes holding the connections.
    #[arg(long, default_value_t = 3)]
    edges: usize,
    /// WebSocket connections, each a distinct user.
    #[arg(long, short = 'n', default_value_t = 50_000)]
    connections: usize,
    /// Load-generator processes.
    #[arg(long, default_value_t = 4)]
    generators: usize,
    /// Client source addresses 127.0.0.2 .. 127.0.0.(1+K).
    #[arg(long, default_value_t = 16)]
    source_addrs: usize,
    /// Members per room.
    #[arg(long, default_value_t = 10)]
    room_size: usize,
    /// Messages to the all-users channel, one at a time.
    #[arg(long, default_value_t = 3)]
    fanouts: usize,
    /// Chat-mix messages per second over all connections (open-loop); 0 skips the chat mix.
    #[arg(long, default_value_t = 1_000.0)]
    rate: f64,
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    #[arg(long, default_value_t = 3)]
    warmup_secs: u64,
    /// Longest wait for the last chat-mix deliveries after sending ends.
    #[arg(long, default_value_t = 30)]
    drain_secs: u64,
    /// REST setup calls in flight.
    #[arg(long, default_value_t = 32)]
    setup_concurrency: usize,
    /// Upgrades (and subscribes) in flight per generator.
    #[arg(long, default_value_t = 64)]
    open_concurrency: usize,
    /// Pause before each memory reading.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// Longest wait for each open/subscribe/fan-out phase.
    #[arg(long, default_value_t = 300)]
    phase_timeout_secs: u64,
    /// The PostgreSQL postmaster's pid: its CPU (with its backends) is reported too.
    #[arg(long)]
    db_pid: Option<u32>,
    /// The nats-server's pid: its CPU is reported too.
    #[arg(long)]
    nats_pid: Option<u32>,
    /// Extra flag for every `parley serve` (repeatable), e.g. --server-arg=--database-pool=32.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct GenArgs {
    /// The plan written by the coordinator.
    #[arg(long)]
    plan: PathBuf,
    /// This generator's index.
    #[arg(long)]
    index: usize,
}

/// Everything a generator needs to know, written once by the coordinator.
#[derive(Debug, Serialize, Deserialize)]
struct Plan {
    edges: Vec<SocketAddr>,
    connections: usize,
    generators: usize,
    source_addrs: usize,
    room_size: usize,
    personal: Vec<String>,
    rooms: Vec<String>,
    fanout_channel: String,
    open_concurrency: usize,
    phase_timeout_secs: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?
            .block_on(run(*args)),
        Cmd::Gen(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?
            .block_on(generator(args)),
    }
}

fn user(i: usize) -> String {
    format!("es{i}")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

// ------------------------------------------------------------------------------------------
// The coordinator
// ------------------------------------------------------------------------------------------

/// One load-generator process and its command pipe.
struct Generator {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Generator {
    async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.write_all(b"\n").await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn answer(&mut self) -> anyhow::Result<serde_json::Value> {
        let line = self
            .stdout
            .next_line()
            .await?
            .context("a load generator ended early")?;
        serde_json::from_str(&line).with_context(|| format!("generator said {line:?}"))
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Sends `line` to every generator and collects one answer of each.
async fn all(gens: &mut [Generator], line: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    for g in gens.iter_mut() {
        g.send(line).await?;
    }
    let mut out = Vec::with_capacity(gens.len());
    for g in gens.iter_mut() {
        out.push(g.answer().await?);
    }
    Ok(out)
}

fn sum(answers: &[serde_json::Value], key: &str) -> u64 {
    answers.iter().filter_map(|a| a[key].as_u64()).sum()
}

fn first_error(answers: &[serde_json::Value]) -> String {
    answers
        .iter()
        .find_map(|a| a["first_error"].as_str().map(str::to_owned))
        .map(|e| format!(" (first error: {e})"))
        .unwrap_or_default()
}

struct Servers {
    core: ServerProcess,
    edges: Vec<ServerProcess>,
}

impl Servers {
    fn mem(&mut self) -> anyhow::Result<(MemStatus, Vec<MemStatus>)> {
        self.core.check_alive()?;
        for e in &mut self.edges {
            e.check_alive()?;
        }
        Ok((
            self.core.mem()?,
            self.edges
                .iter()
                .map(|e| e.mem())
                .collect::<anyhow::Result<_>>()?,
        ))
    }

    /// Each edge's live heap (`None` where `/metrics` does not say); with `when`, also prints
    /// each edge's allocator-resident bytes next to it (one `/metrics` read per edge).
    async fn edge_heaps(&self, when: Option<&str>) -> Vec<Option<u64>> {
        let mut heaps = Vec::with_capacity(self.edges.len());
        let mut parts = Vec::new();
        for e in &self.edges {
            let figures = parley_bench::allocator_figures(&e.http_base()).await;
            if let Some((h, r)) = figures {
                parts.push(format!("{} live / {} allocator-resident", mib(h), mib(r)));
            }
            heaps.push(figures.map(|(h, _)| h));
        }
        if let Some(when) = when
            && !parts.is_empty()
        {
            println!("edge allocators {when}: {}", parts.join(" | "));
        }
        heaps
    }

    fn cpu(&self) -> anyhow::Result<(Duration, Vec<Duration>)> {
        Ok((
            self.core.cpu()?,
            self.edges
                .iter()
                .map(|e| e.cpu())
                .collect::<anyhow::Result<_>>()?,
        ))
    }
}

/// CPU so far of PostgreSQL (postmaster and backends) and nats-server, when their pids are known.
fn others_cpu(args: &RunArgs) -> (Option<Duration>, Option<Duration>) {
    (
        args.db_pid.map(parley_bench::tree_cpu),
        args.nats_pid
            .and_then(|p| parley_bench::cpu_time(&p.to_string()).ok()),
    )
}

/// `, PostgreSQL 1.2 s, NATS 0.3 s` (or in % of one core over `window` seconds).
fn others_note(
    a: &(Option<Duration>, Option<Duration>),
    b: &(Option<Duration>, Option<Duration>),
    window: Option<f64>,
) -> String {
    let fmt = |d: Duration| match window {
        Some(w) => format!("{:.0}%", d.as_secs_f64() / w * 100.0),
        None => format!("{:.2} s", d.as_secs_f64()),
    };
    let mut out = String::new();
    if let (Some(x), Some(y)) = (a.0, b.0) {
        out += &format!(", PostgreSQL {}", fmt(y.saturating_sub(x)));
    }
    if let (Some(x), Some(y)) = (a.1, b.1) {
        out += &format!(", NATS {}", fmt(y.saturating_sub(x)));
    }
    out
}

fn print_mem(label: &str, core: &MemStatus, edges: &[MemStatus]) {
    let e: Vec<String> = edges.iter().map(|m| mib(m.rss)).collect();
    println!(
        "RSS {label}: core {} | edges {} | {}",
        mib(core.rss),
        e.join(", "),
        loadavg()
    );
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let n = args.connections.max(1);
    let edges = args.edges.max(1);
    let gens = args.generators.max(1);
    let (soft, hard) = parley_bench::raise_nofile_limit()?;
    let per_edge = n.div_ceil(edges);
    let per_gen = n.div_ceil(gens);
    if per_edge as u64 + 1_000 > soft {
        bail!(
            "{per_edge} connections per edge need more than the open-files limit {soft} (hard {hard}): add edges"
        );
    }
    if per_gen as u64 + 200 > soft {
        bail!(
            "{per_gen} connections per load generator need more than the open-files limit {soft}: add generators"
        );
    }
    println!(
        "edge_scale: {} | open files limit {soft} (hard {hard}) per process | load average {}",
        parley_bench::machine_summary(),
        loadavg()
    );
    println!(
        "== topology={:?} edges={edges} connections={n} ({per_edge} per edge) generators={gens} ({per_gen} each) source addresses={} room size={} fanouts={} rate={} msgs/s",
        args.topology, args.source_addrs, args.room_size, args.fanouts, args.rate
    );

    // The servers: the role flags are the only difference between the topologies.
    let mut common: Vec<String> = [
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
    common.extend(args.server_args.iter().cloned());
    let db = ["--database-url".to_owned(), args.database_url.clone()];
    let nats = ["--nats-url".to_owned(), args.nats_url.clone()];
    let edge_nats = [
        "--nats-url".to_owned(),
        args.edge_nats_url
            .clone()
            .unwrap_or_else(|| args.nats_url.clone()),
    ];
    let (core_flags, edge_flags): (Vec<String>, Vec<String>) = match args.topology {
        Topology::All => (
            [&nats[..], &db[..], &common[..]].concat(),
            [&nats[..], &db[..], &common[..]].concat(),
        ),
        Topology::Split => (
            [
                &["--role".into(), "core".into()],
                &nats[..],
                &db[..],
                &common[..],
            ]
            .concat(),
            [
                &["--role".into(), "edge".into()],
                &edge_nats[..],
                &common[..],
            ]
            .concat(),
        ),
    };
    let core = ServerProcess::start(&args.parley, &core_flags)?;
    println!("core: {} (pid {})", core.banner, core.pid());
    let mut edge_procs = Vec::with_capacity(edges);
    for k in 0..edges {
        let e = ServerProcess::start(&args.parley, &edge_flags)?;
        println!("edge {k}: {} (pid {})", e.banner, e.pid());
        edge_procs.push(e);
    }
    let mut servers = Servers {
        core,
        edges: edge_procs,
    };

    // Setup over REST on the core.
    let rest = Rest::new(servers.core.http_base());
    let conc = args.setup_concurrency.max(1);
    let room_size = args.room_size.max(1);
    let rooms = n.div_ceil(room_size);
    let owner = "es-owner";
    let owner_token = token(owner);
    let t = Instant::now();
    let users: Vec<String> = (0..n).map(user).collect();
    let tokens: Vec<String> = users.iter().map(|u| token(u)).collect();
    let (personal, room_ids) = rest
        .create_chat_mix_channels(&users, &tokens, room_size, conc)
        .await?;
    println!(
        "created {n} personal channels and {rooms} rooms of {room_size} in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let fanout_channel = rest
        .create_channel(&owner_token, "everyone", &[])
        .await
        .context("create the fan-out channel")?;
    let added: Vec<anyhow::Result<()>> = futures::stream::iter((0..n).map(|i| {
        let (rest, tok, ch) = (rest.clone(), owner_token.clone(), fanout_channel.clone());
        async move { rest.add_member(&tok, &ch, &user(i)).await }
    }))
    .buffer_unordered(conc)
    .collect()
    .await;
    added
        .into_iter()
        .collect::<anyhow::Result<()>>()
        .context("add the users to the fan-out channel")?;
    println!(
        "added {n} members to the fan-out channel in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // The plan and the generators.
    let plan = Plan {
        edges: servers.edges.iter().map(|e| e.addr).collect(),
        connections: n,
        generators: gens,
        source_addrs: args.source_addrs.max(1),
        room_size,
        personal,
        rooms: room_ids,
        fanout_channel: fanout_channel.clone(),
        open_concurrency: args.open_concurrency.max(1),
        phase_timeout_secs: args.phase_timeout_secs,
    };
    let dir = tempfile::Builder::new().prefix("edge-scale-").tempdir()?;
    let plan_path = dir.path().join("plan.json");
    std::fs::write(&plan_path, serde_json::to_vec(&plan)?)?;
    let exe = std::env::current_exe()?;
    let mut generators = Vec::with_capacity(gens);
    for g in 0..gens {
        let mut child = tokio::process::Command::new(&exe)
            .arg("gen")
            .arg("--plan")
            .arg(&plan_path)
            .arg("--index")
            .arg(g.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("start a load generator")?;
        let stdin = child.stdin.take().context("generator stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("generator stdout")?).lines();
        generators.push(Generator {
            child,
            stdin,
            stdout,
        });
    }
    let gen_pids: Vec<u32> = generators.iter().filter_map(|g| g.child.id()).collect();
    let settle = Duration::from_secs(args.settle_secs);

    tokio::time::sleep(settle).await;
    let (core0, edges0) = servers.mem()?;
    let heap0 = servers.edge_heaps(None).await;
    print_mem("before any connection", &core0, &edges0);

    // 1. Open a quarter, then all.
    let quarter = n / 4;
    let t = Instant::now();
    let a = all(&mut generators, &format!("open {quarter}")).await?;
    println!(
        "opened {}/{quarter} connections in {:.1} s, {} failed{}",
        sum(&a, "opened"),
        t.elapsed().as_secs_f64(),
        sum(&a, "failed"),
        first_error(&a)
    );
    tokio::time::sleep(settle).await;
    let (core_q, edges_q) = servers.mem()?;
    let heap_q = servers.edge_heaps(None).await;
    print_mem("at a quarter", &core_q, &edges_q);
    let t = Instant::now();
    let a = all(&mut generators, &format!("open {n}")).await?;
    let opened = sum(&a, "opened");
    let open_secs = t.elapsed().as_secs_f64();
    println!(
        "opened {opened}/{n} connections ({:.1} s for the last three quarters), {} failed{}",
        open_secs,
        sum(&a, "failed"),
        first_error(&a)
    );
    if opened < n as u64 {
        println!("WARNING: not every connection opened; figures are per opened connection");
    }
    tokio::time::sleep(settle).await;
    let (core_idle, edges_idle) = servers.mem()?;
    let heap_idle = servers.edge_heaps(Some("authenticated idle")).await;
    print_mem("authenticated idle", &core_idle, &edges_idle);
    // Connection i is on edge i mod edges.
    let on_edge = |k: usize, upto: usize| (0..upto).filter(|i| i % edges == k).count();
    let mut idle_rows = Vec::new();
    for k in 0..edges {
        let (q, all_n) = (on_edge(k, quarter), on_edge(k, n));
        let slope = (edges_idle[k].rss as f64 - edges_q[k].rss as f64) / (all_n - q).max(1) as f64;
        let whole = (edges_idle[k].rss as f64 - edges0[k].rss as f64) / all_n.max(1) as f64;
        println!(
            "  edge {k}: {all_n} connections: {slope:.0} B per idle connection (growth from a quarter to all), {whole:.0} B including one-time costs (from none)"
        );
        if let (Some(q), Some(all)) = (heap_q[k], heap_idle[k]) {
            println!(
                "  edge {k}: live heap {:.0} B per idle connection (growth from a quarter to all)",
                (all as f64 - q as f64) / (all_n - on_edge(k, quarter)).max(1) as f64
            );
        }
        idle_rows.push((slope, whole));
    }

    // 2. Subscribe: first to the channel everyone shares, then to each one's own two.
    let t = Instant::now();
    let a = all(&mut generators, "subscribe shared").await?;
    println!(
        "subscribed {} connections to the shared channel in {:.1} s, {} failed{}",
        sum(&a, "subscribed"),
        t.elapsed().as_secs_f64(),
        sum(&a, "failed"),
        first_error(&a)
    );
    tokio::time::sleep(settle).await;
    let (core_shared, edges_shared) = servers.mem()?;
    let heap_shared = servers
        .edge_heaps(Some("subscribed to the shared channel"))
        .await;
    print_mem(
        "idle, subscribed to one shared channel",
        &core_shared,
        &edges_shared,
    );
    let mut shared_rows = Vec::new();
    for k in 0..edges {
        let all_n = on_edge(k, n);
        // The idle connection's growth (from a quarter to all, without one-time costs) plus
        // what the subscription added per connection.
        let over_idle =
            (edges_shared[k].rss as f64 - edges_idle[k].rss as f64) / all_n.max(1) as f64;
        let slope = idle_rows[k].0 + over_idle;
        println!(
            "  edge {k}: {slope:.0} B per idle subscribed connection ({over_idle:+.0} B over idle)"
        );
        if let (Some(idle), Some(sub)) = (heap_idle[k], heap_shared[k]) {
            println!(
                "  edge {k}: live heap {:+.0} B per connection over idle",
                (sub as f64 - idle as f64) / all_n.max(1) as f64
            );
        }
        shared_rows.push(slope);
    }
    let t = Instant::now();
    let a = all(&mut generators, "subscribe own").await?;
    println!(
        "subscribed {} connections to their personal channel and room in {:.1} s, {} failed{}",
        sum(&a, "subscribed"),
        t.elapsed().as_secs_f64(),
        sum(&a, "failed"),
        first_error(&a)
    );
    tokio::time::sleep(settle).await;
    let (core_sub, edges_sub) = servers.mem()?;
    let heap_sub = servers.edge_heaps(Some("subscribed")).await;
    print_mem("subscribed (3 channels each)", &core_sub, &edges_sub);
    let mut sub_rows = Vec::new();
    for k in 0..edges {
        let all_n = on_edge(k, n);
        let per = (edges_sub[k].rss as f64 - edges0[k].rss as f64) / all_n.max(1) as f64;
        let over_idle = (edges_sub[k].rss as f64 - edges_idle[k].rss as f64) / all_n.max(1) as f64;
        println!(
            "  edge {k}: {per:.0} B per subscribed connection from none ({over_idle:+.0} B over idle)"
        );
        if let (Some(none), Some(idle), Some(sub)) = (heap0[k], heap_idle[k], heap_sub[k]) {
            println!(
                "  edge {k}: live heap {:.0} B per subscribed connection from none ({:+.0} B over idle)",
                (sub as f64 - none as f64) / all_n.max(1) as f64,
                (sub as f64 - idle as f64) / all_n.max(1) as f64
            );
        }
        sub_rows.push(per);
    }

    // 3. Fan-out to every connection.
    let mut fanout_rows = Vec::new();
    for k in 0..args.fanouts {
        let (c0, e0) = servers.cpu()?;
        let x0 = others_cpu(&args);
        for g in generators.iter_mut() {
            g.send(&format!("fanout {k}")).await?;
        }
        let sent_at = epoch_us();
        let seq = rest
            .send_message(
                &owner_token,
                &fanout_channel,
                &format!("fanout-{k}"),
                &format!("fanout-{k}"),
            )
            .await?;
        let acked_at = epoch_us();
        let mut answers = Vec::new();
        for g in generators.iter_mut() {
            answers.push(g.answer().await?);
        }
        let (c1, e1) = servers.cpu()?;
        let x1 = others_cpu(&args);
        let got = sum(&answers, "count");
        let last = answers
            .iter()
            .filter_map(|a| a["last"].as_u64())
            .max()
            .unwrap_or(0);
        let first = answers
            .iter()
            .filter_map(|a| a["first"].as_u64())
            .min()
            .unwrap_or(0);
        // Median and p99 over the generators' samples.
        let mut samples: Vec<u32> = answers
            .iter()
            .filter_map(|a| a["sample"].as_array())
            .flatten()
            .filter_map(|v| v.as_u64())
            .map(|t| t.saturating_sub(acked_at).min(u64::from(u32::MAX)) as u32)
            .collect();
        samples.sort_unstable();
        let ms = |us: u64| us as f64 / 1000.0;
        println!(
            "fan-out {k} (seq {seq}): {got}/{opened} delivered; send -> commit (REST answer) {:.1} ms; commit -> first {:.1} ms, p50 {:.1} ms, p99 {:.1} ms, last {:.1} ms (send -> last {:.1} ms); CPU core {:.2} s, edges {}{}",
            ms(acked_at - sent_at),
            first as f64 / 1000.0 - acked_at as f64 / 1000.0,
            percentile(&samples, 50.0) as f64 / 1000.0,
            percentile(&samples, 99.0) as f64 / 1000.0,
            ms(last.saturating_sub(acked_at)),
            ms(last.saturating_sub(sent_at)),
            (c1 - c0).as_secs_f64(),
            e1.iter()
                .zip(&e0)
                .map(|(b, a)| format!("{:.2} s", (*b - *a).as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", "),
            others_note(&x0, &x1, None),
        );
        fanout_rows.push((
            got,
            ms(last.saturating_sub(acked_at)),
            percentile(&samples, 50.0) as f64 / 1000.0,
        ));
        tokio::time::sleep(Duration::from_secs(3)).await;
    }

    // 4. The chat mix.
    let mut mix_summary = None;
    if args.rate > 0.0 {
        let start_us = epoch_us() + 1_000_000;
        let warmup_us = args.warmup_secs * 1_000_000;
        let send_end_us = warmup_us + args.duration_secs * 1_000_000;
        let a = all(
            &mut generators,
            &format!("mix {start_us} {} {warmup_us} {send_end_us}", args.rate),
        )
        .await?;
        drop(a);
        let window_start = Duration::from_micros(start_us + warmup_us - epoch_us());
        tokio::time::sleep(window_start).await;
        let (c0, e0) = servers.cpu()?;
        let g0: Vec<Duration> = gen_pids
            .iter()
            .map(|p| parley_bench::cpu_time(&p.to_string()).unwrap_or_default())
            .collect();
        let x0 = others_cpu(&args);
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(args.duration_secs)).await;
        let (c1, e1) = servers.cpu()?;
        let x1 = others_cpu(&args);
        let g1: Vec<Duration> = gen_pids
            .iter()
            .map(|p| parley_bench::cpu_time(&p.to_string()).unwrap_or_default())
            .collect();
        let measured = t0.elapsed().as_secs_f64();
        let (core_mix, edges_mix) = servers.mem()?;
        // Drain: every send answered, then deliveries stop growing (bounded).
        let until = Instant::now() + Duration::from_secs(args.drain_secs);
        let mut last_delivered = 0;
        let mut still = 0;
        loop {
            let s = all(&mut generators, "status").await?;
            let answered = sum(&s, "acked") + sum(&s, "refused");
            let delivered = sum(&s, "delivered");
            if answered >= sum(&s, "sent") && delivered == last_delivered {
                still += 1;
            } else {
                still = 0;
            }
            last_delivered = delivered;
            if still >= 4 || Instant::now() >= until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let reports = all(&mut generators, "report").await?;
        // Merge: per-room acks, per-connection room deliveries, latencies.
        let mut room_acked = vec![0u64; plan.rooms.len()];
        for r in &reports {
            if let Some(v) = r["room_acked"].as_array() {
                for (room, c) in v.iter().enumerate() {
                    room_acked[room] += c.as_u64().unwrap_or(0);
                }
            }
        }
        let (mut lost, mut extra) = (0u64, 0u64);
        for r in &reports {
            if let Some(v) = r["received"].as_array() {
                for pair in v {
                    let i = pair[0].as_u64().unwrap_or(0) as usize;
                    let got = pair[1].as_u64().unwrap_or(0);
                    let want = room_acked[i / room_size];
                    lost += want.saturating_sub(got);
                    extra += got.saturating_sub(want);
                }
            }
        }
        let mut lat: Vec<u32> = Vec::new();
        for r in &reports {
            if let Some(path) = r["latencies"].as_str() {
                let bytes = std::fs::read(path)?;
                lat.extend(
                    bytes
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
            }
        }
        lat.sort_unstable();
        let sent = sum(&reports, "sent");
        let acked = sum(&reports, "acked");
        let gaps = sum(&reports, "gaps");
        let repeats = sum(&reports, "repeats");
        let failed = sum(&reports, "failed");
        let deliveries_window = lat.len() as f64 / measured;
        let ms = |us: u32| us as f64 / 1000.0;
        let edge_cpu: Vec<f64> = e1
            .iter()
            .zip(&e0)
            .map(|(b, a)| (*b - *a).as_secs_f64() / measured * 100.0)
            .collect();
        let gen_cpu: f64 = g1
            .iter()
            .zip(&g0)
            .map(|(b, a)| b.saturating_sub(*a).as_secs_f64())
            .sum::<f64>()
            / measured
            * 100.0;
        println!(
            "chat mix: sent {sent}, acked {acked}, refused {}; {} deliveries of messages due in the measured {measured:.1} s ({deliveries_window:.0}/s)",
            sum(&reports, "refused"),
            lat.len()
        );
        println!(
            "  latency at the receivers (receive - intended send): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            ms(percentile(&lat, 50.0)),
            ms(percentile(&lat, 90.0)),
            ms(percentile(&lat, 99.0)),
            ms(lat.last().copied().unwrap_or(0))
        );
        println!(
            "  CPU over the window (% of one core): core {:.0}%, edges {}, load generators {gen_cpu:.0}%{} | {}",
            (c1 - c0).as_secs_f64() / measured * 100.0,
            edge_cpu
                .iter()
                .map(|c| format!("{c:.0}%"))
                .collect::<Vec<_>>()
                .join(", "),
            others_note(&x0, &x1, Some(measured)),
            loadavg()
        );
        print_mem("after the chat mix window", &core_mix, &edges_mix);
        let ok = lost == 0 && gaps == 0 && repeats == 0 && failed == 0;
        println!(
            "  check: lost {lost}, extra {extra}, seq gaps {gaps}, repeats {repeats}, connections failed {failed}: {}{}",
            if ok { "OK" } else { "FAILED" },
            first_error(&reports)
        );
        mix_summary = Some(format!(
            "mix_rate={} p50={:.2}ms p99={:.2}ms lost={lost} gaps={gaps} ok={ok}",
            args.rate,
            ms(percentile(&lat, 50.0)),
            ms(percentile(&lat, 99.0))
        ));
    } else {
        let _ = all(&mut generators, "report").await?;
    }

    println!();
    println!(
        "SUMMARY edge_scale topology={:?} edges={edges} connections={opened}/{n} core_rss_before={} core_rss_subscribed={} idle_B_per_conn=[{}] idle_subscribed_B_per_conn=[{}] subscribed_3_B_per_conn=[{}] fanout_commit_to_last_ms=[{}] {}",
        args.topology,
        mib(core0.rss),
        mib(core_sub.rss),
        idle_rows
            .iter()
            .map(|(s, _)| format!("{s:.0}"))
            .collect::<Vec<_>>()
            .join(","),
        shared_rows
            .iter()
            .map(|s| format!("{s:.0}"))
            .collect::<Vec<_>>()
            .join(","),
        sub_rows
            .iter()
            .map(|s| format!("{s:.0}"))
            .collect::<Vec<_>>()
            .join(","),
        fanout_rows
            .iter()
            .map(|(got, last, _)| format!("{last:.0}({got})"))
            .collect::<Vec<_>>()
            .join(","),
        mix_summary.unwrap_or_default()
    );
    drop(generators);
    drop(servers);
    Ok(())
}

// ------------------------------------------------------------------------------------------
// A load generator
// ------------------------------------------------------------------------------------------

/// What the connections do now.
#[derive(Clone)]
enum Phase {
    Hold,
    /// Subscribe to the channel every connection is a member of (like `ws_memory`'s one
    /// channel): the memory of an idle subscribed connection.
    SubscribeShared,
    /// Then to the connection's own channels: its personal channel and its room of ten.
    SubscribeOwn,
    Mix(Arc<MixPlan>),
    Stop,
}

struct MixPlan {
    /// Wall-clock start (µs since the epoch).
    start_us: u64,
    warmup_us: u64,
    send_end_us: u64,
    /// Seconds between two messages of the whole run.
    interval: f64,
    connections: usize,
}

#[derive(Default)]
struct Counters {
    opened: AtomicUsize,
    open_failed: AtomicUsize,
    /// Connections subscribed to the shared channel.
    subscribed_shared: AtomicUsize,
    /// Connections subscribed to all three channels.
    subscribed: AtomicUsize,
    subscribe_failed: AtomicUsize,
    dropped: AtomicUsize,
    sent: AtomicU64,
    acked: AtomicU64,
    refused: AtomicU64,
    delivered: AtomicU64,
}

struct Shared {
    plan: Plan,
    counters: Counters,
    open_limit: Arc<Semaphore>,
    /// (fan-out number, receive time µs since the epoch).
    fanouts: Mutex<Vec<(u32, u64)>>,
    first_error: Mutex<Option<String>>,
    /// Acked chat-mix messages per room, counted by their senders here.
    room_acked: Vec<AtomicU64>,
}

impl Shared {
    fn note(&self, e: String) {
        if let Ok(mut f) = self.first_error.lock()
            && f.is_none()
        {
            *f = Some(e);
        }
    }
}

/// What one connection saw.
#[derive(Default)]
struct ConnResult {
    index: usize,
    latencies_us: Vec<u32>,
    personal: SeqCheck,
    room: SeqCheck,
    all: SeqCheck,
    failed: bool,
}

async fn generator(args: GenArgs) -> anyhow::Result<()> {
    let plan: Plan = serde_json::from_slice(&std::fs::read(&args.plan)?)?;
    parley_bench::raise_nofile_limit()?;
    let mine: Vec<usize> = (0..plan.connections)
        .filter(|i| i % plan.generators == args.index)
        .collect();
    let shared = Arc::new(Shared {
        counters: Counters::default(),
        open_limit: Arc::new(Semaphore::new(plan.open_concurrency)),
        fanouts: Mutex::new(Vec::new()),
        first_error: Mutex::new(None),
        room_acked: (0..plan.rooms.len()).map(|_| AtomicU64::new(0)).collect(),
        plan,
    });
    let timeout = Duration::from_secs(shared.plan.phase_timeout_secs);
    let (phase_tx, phase_rx) = watch::channel(Phase::Hold);
    let mut handles = Vec::with_capacity(mine.len());
    let mut spawned = 0usize;
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    let c = &shared.counters;
    let load = |a: &AtomicUsize| a.load(Ordering::Relaxed);
    let err = |s: &Shared| s.first_error.lock().ok().and_then(|e| e.clone());
    while let Some(line) = stdin.next_line().await? {
        let mut words = line.split_whitespace();
        let answer = match words.next() {
            Some("open") => {
                let upto: usize = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                while spawned < mine.len() && mine[spawned] < upto {
                    handles.push(tokio::spawn(connection(
                        shared.clone(),
                        mine[spawned],
                        phase_rx.clone(),
                    )));
                    spawned += 1;
                }
                wait_until(timeout, || {
                    load(&c.opened) + load(&c.open_failed) >= spawned
                })
                .await;
                json!({ "opened": load(&c.opened), "failed": load(&c.open_failed), "first_error": err(&shared) })
            }
            Some("subscribe") => {
                let (step, done) = match words.next() {
                    Some("shared") => (Phase::SubscribeShared, &c.subscribed_shared),
                    _ => (Phase::SubscribeOwn, &c.subscribed),
                };
                let _ = phase_tx.send(step);
                wait_until(timeout, || {
                    load(done) + load(&c.subscribe_failed) + load(&c.dropped) >= load(&c.opened)
                })
                .await;
                json!({ "subscribed": load(done), "failed": load(&c.subscribe_failed) + load(&c.dropped), "first_error": err(&shared) })
            }
            Some("fanout") => {
                let k: u32 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                let want = load(&c.subscribed);
                let count = |s: &Shared| {
                    s.fanouts
                        .lock()
                        .map(|f| f.iter().filter(|(x, _)| *x == k).count())
                        .unwrap_or(0)
                };
                wait_until(Duration::from_secs(120), || count(&shared) >= want).await;
                let mut times: Vec<u64> = shared
                    .fanouts
                    .lock()
                    .map(|f| f.iter().filter(|(x, _)| *x == k).map(|(_, t)| *t).collect())
                    .unwrap_or_default();
                times.sort_unstable();
                // A sample of at most 2,000 times, evenly spaced, for the coordinator's percentiles.
                let step = times.len().div_ceil(2_000).max(1);
                let sample: Vec<u64> = times.iter().step_by(step).copied().collect();
                json!({
                    "count": times.len(),
                    "first": times.first(),
                    "last": times.last(),
                    "sample": sample,
                })
            }
            Some("mix") => {
                let nums: Vec<f64> = words.filter_map(|w| w.parse().ok()).collect();
                let [start_us, rate, warmup_us, send_end_us] = nums[..] else {
                    bail!("mix needs start_us rate warmup_us send_end_us, got {line:?}");
                };
                let _ = phase_tx.send(Phase::Mix(Arc::new(MixPlan {
                    start_us: start_us as u64,
                    warmup_us: warmup_us as u64,
                    send_end_us: send_end_us as u64,
                    interval: 1.0 / rate.max(0.001),
                    connections: shared.plan.connections,
                })));
                json!({ "ok": true })
            }
            Some("status") => json!({
                "sent": c.sent.load(Ordering::Relaxed),
                "acked": c.acked.load(Ordering::Relaxed),
                "refused": c.refused.load(Ordering::Relaxed),
                "delivered": c.delivered.load(Ordering::Relaxed),
            }),
            Some("report") => {
                let _ = phase_tx.send(Phase::Stop);
                let mut results = Vec::with_capacity(handles.len());
                for h in handles.drain(..) {
                    results.push(h.await?);
                }
                let mut lat = Vec::new();
                let (mut gaps, mut repeats, mut failed) = (0u64, 0u64, 0u64);
                let mut received = Vec::with_capacity(results.len());
                for r in &results {
                    for ch in [&r.personal, &r.room, &r.all] {
                        gaps += ch.gaps;
                        repeats += ch.repeats + ch.before_ack;
                    }
                    failed += u64::from(r.failed);
                    received.push([r.index as u64, r.room.messages]);
                    lat.extend_from_slice(&r.latencies_us);
                }
                let path = args
                    .plan
                    .with_file_name(format!("latencies-{}.bin", args.index));
                let bytes: Vec<u8> = lat.iter().flat_map(|v| v.to_le_bytes()).collect();
                std::fs::write(&path, bytes)?;
                let room_acked: Vec<u64> = shared
                    .room_acked
                    .iter()
                    .map(|a| a.load(Ordering::Relaxed))
                    .collect();
                let answer = json!({
                    "sent": c.sent.load(Ordering::Relaxed),
                    "acked": c.acked.load(Ordering::Relaxed),
                    "refused": c.refused.load(Ordering::Relaxed),
                    "gaps": gaps,
                    "repeats": repeats,
                    "failed": failed,
                    "received": received,
                    "room_acked": room_acked,
                    "latencies": path,
                    "first_error": err(&shared),
                });
                out.write_all(format!("{answer}\n").as_bytes()).await?;
                out.flush().await?;
                return Ok(());
            }
            other => bail!("unknown command {other:?}"),
        };
        out.write_all(format!("{answer}\n").as_bytes()).await?;
        out.flush().await?;
    }
    Ok(())
}

async fn wait_until(timeout: Duration, cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

/// One client connection: opens, holds, subscribes, sends its share of the chat mix, and checks
/// and times what it receives, until told to stop.
async fn connection(
    shared: Arc<Shared>,
    i: usize,
    mut phase: watch::Receiver<Phase>,
) -> ConnResult {
    let plan = &shared.plan;
    let c = &shared.counters;
    let mut r = ConnResult {
        index: i,
        ..ConnResult::default()
    };
    let edge = plan.edges[i % plan.edges.len()];
    let src: IpAddr = source_addr(i, plan.source_addrs);
    let opened = {
        let _permit = shared.open_limit.acquire().await;
        tokio::time::timeout(
            Duration::from_secs(60),
            ws_connect(edge, src, &token(&user(i)), AuthMode::Subprotocol),
        )
        .await
        .map_err(|_| anyhow::anyhow!("upgrade timed out"))
        .and_then(|r| r)
    };
    let mut ws = match opened {
        Ok(ws) => {
            c.opened.fetch_add(1, Ordering::Relaxed);
            ws
        }
        Err(e) => {
            shared.note(format!("open: {e:#}"));
            c.open_failed.fetch_add(1, Ordering::Relaxed);
            r.failed = true;
            return r;
        }
    };
    let room_index = i / plan.room_size;
    let (personal, room, everyone) = (
        plan.personal[i].as_str(),
        plan.rooms[room_index].as_str(),
        plan.fanout_channel.as_str(),
    );
    let mut acks_missing = 0u8;
    let mut sub_permit = None;
    let mut mix: Option<Arc<MixPlan>> = None;
    let mut j = 0u64;
    let due = |mp: &MixPlan, j: u64| -> u64 {
        ((i as f64 + j as f64 * mp.connections as f64) * mp.interval * 1e6) as u64
    };
    loop {
        let next_due = mix.as_ref().map(|mp| (due(mp, j), mp.clone()));
        let sending = next_due.as_ref().is_some_and(|(d, mp)| *d < mp.send_end_us);
        let wait = next_due
            .as_ref()
            .map(|(d, mp)| Duration::from_micros((mp.start_us + d).saturating_sub(epoch_us())))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            biased;
            changed = phase.changed() => {
                if changed.is_err() {
                    break;
                }
                let p = phase.borrow_and_update().clone();
                match p {
                    Phase::Hold => {}
                    Phase::SubscribeShared | Phase::SubscribeOwn => {
                        sub_permit = shared.open_limit.clone().acquire_owned().await.ok();
                        let channels: &[(&str, &str)] = if matches!(p, Phase::SubscribeShared) {
                            &[("a", everyone)]
                        } else {
                            &[("p", personal), ("r", room)]
                        };
                        for (id, ch) in channels {
                            let frame = json!({ "type": "subscribe", "id": id, "channel_id": ch });
                            if ws.feed(WsMessage::Text(frame.to_string().into())).await.is_err() {
                                break;
                            }
                        }
                        if let Err(e) = ws.flush().await {
                            shared.note(format!("subscribe: {e}"));
                            c.subscribe_failed.fetch_add(1, Ordering::Relaxed);
                            r.failed = true;
                            break;
                        }
                        acks_missing = channels.len() as u8;
                    }
                    Phase::Mix(mp) => mix = Some(mp),
                    Phase::Stop => break,
                }
            }
            _ = tokio::time::sleep(wait), if sending => {
                let (d, _) = next_due.expect("sending implies a plan");
                let text = format!("t{d}.c{i}.{j}.");
                let frame = format!(
                    r#"{{"type":"message.send","id":"m{j}","channel_id":"{room}","client_msg_id":"es{i}-{j}","text":"{text}"}}"#
                );
                if let Err(e) = ws.send(WsMessage::Text(frame.into())).await {
                    shared.note(format!("send: {e}"));
                    r.failed = true;
                    break;
                }
                c.sent.fetch_add(1, Ordering::Relaxed);
                j += 1;
            }
            msg = ws.next() => {
                let t = match msg {
                    Some(Ok(WsMessage::Text(t))) => t,
                    Some(Ok(WsMessage::Close(f))) => {
                        shared.note(format!("server closed: {f:?}"));
                        c.dropped.fetch_add(1, Ordering::Relaxed);
                        r.failed = true;
                        break;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        shared.note(format!("read: {e}"));
                        c.dropped.fetch_add(1, Ordering::Relaxed);
                        r.failed = true;
                        break;
                    }
                    None => {
                        c.dropped.fetch_add(1, Ordering::Relaxed);
                        r.failed = true;
                        break;
                    }
                };
                let now = epoch_us();
                let raw = t.as_str();
                let Ok(f) = serde_json::from_str::<FrameHead>(raw) else {
                    continue;
                };
                match (f.kind, f.id) {
                    ("ack", Some(id @ ("p" | "r" | "a"))) => {
                        let seq = f.seq.unwrap_or(0);
                        match id {
                            "p" => r.personal.subscribed_at(seq),
                            "r" => r.room.subscribed_at(seq),
                            _ => r.all.subscribed_at(seq),
                        }
                        acks_missing = acks_missing.saturating_sub(1);
                        if acks_missing == 0 {
                            drop(sub_permit.take());
                            if id == "a" {
                                c.subscribed_shared.fetch_add(1, Ordering::Relaxed);
                            } else {
                                c.subscribed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    ("ack", Some(id)) if id.starts_with('m') => {
                        c.acked.fetch_add(1, Ordering::Relaxed);
                        shared.room_acked[room_index].fetch_add(1, Ordering::Relaxed);
                    }
                    ("error", id) => {
                        shared.note(format!("error frame: {raw}"));
                        match id {
                            Some("p" | "r" | "a") => {
                                c.subscribe_failed.fetch_add(1, Ordering::Relaxed);
                                r.failed = true;
                                break;
                            }
                            Some(m) if m.starts_with('m') => {
                                c.refused.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {}
                        }
                    }
                    (kind, _) => {
                        let (Some(ch), Some(seq)) = (f.channel_id, f.seq) else {
                            continue; // unread counts, presence, receipts
                        };
                        let message = kind == "message.new";
                        if ch == room {
                            r.room.observe(seq, message);
                            if message {
                                c.delivered.fetch_add(1, Ordering::Relaxed);
                                if let Some(mp) = &mix
                                    && let Some(at) = due_offset(raw)
                                    && at >= mp.warmup_us
                                {
                                    let us = now.saturating_sub(mp.start_us + at);
                                    r.latencies_us.push(us.min(u64::from(u32::MAX)) as u32);
                                }
                            }
                        } else if ch == personal {
                            r.personal.observe(seq, message);
                        } else if ch == everyone {
                            r.all.observe(seq, message);
                            if message
                                && let Some(k) = raw
                                    .find("\"text\":\"fanout-")
                                    .map(|at| &raw[at + "\"text\":\"fanout-".len()..])
                                    .and_then(|rest| rest.split('"').next())
                                    .and_then(|k| k.parse::<u32>().ok())
                                && let Ok(mut fo) = shared.fanouts.lock()
                            {
                                fo.push((k, now));
                            }
                        }
                    }
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_connection_has_one_edge_and_one_generator() {
        let (n, edges, gens) = (50_000usize, 3usize, 4usize);
        let per_edge: Vec<usize> = (0..edges)
            .map(|k| (0..n).filter(|i| i % edges == k).count())
            .collect();
        assert!(per_edge.iter().all(|&c| c <= 19_000), "{per_edge:?}");
        let per_gen: Vec<usize> = (0..gens)
            .map(|g| (0..n).filter(|i| i % gens == g).count())
            .collect();
        assert_eq!(per_gen.iter().sum::<usize>(), n);
    }
}
