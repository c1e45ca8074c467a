//! `ws_memory`: server memory per idle WebSocket connection.
//!
//! Starts the release `parley serve` as a child process, warms it up, reads its RSS, then opens N
//! authenticated idle `parley.v1` connections (phase 1), makes each subscribe to one channel
//! (phase 2), and finally closes them all (phase 3), reading the server's RSS after each phase.
//! The client runs in this process (the server is a separate process, so its RSS is what counts;
//! each process holds one descriptor per connection, so 10,000 fit the 20,000 limit of each).
//! Client sockets bind 127.0.0.2, 127.0.0.3, ... so that no (source, destination) pair runs out
//! of ephemeral ports.
//!
//! Prints figures; never passes or fails on them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use futures::{SinkExt, StreamExt};
use parley_bench::{
    AuthMode, MemStatus, Reply, Rest, ServerProcess, mib, source_addr, token, ws_connect,
};
use serde_json::json;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[derive(Debug, Parser)]
#[command(about = "Server memory per idle WebSocket connection (authenticated, then subscribed)")]
struct Args {
    /// The parley binary (release build).
    #[arg(long, default_value_os_t = parley_bench::default_parley_path())]
    parley: std::path::PathBuf,
    /// Connections to open.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    connections: usize,
    /// Client source addresses 127.0.0.2 .. 127.0.0.(1+K).
    #[arg(long, default_value_t = 4)]
    source_addrs: usize,
    /// Distinct users the connections authenticate as (in turn); all are members of every
    /// channel. Default: one user per connection (per-user state on the server shows only then).
    #[arg(long)]
    users: Option<usize>,
    /// Channels the connections subscribe to in phase 2 (connection i takes channel i mod C).
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// How connections authenticate.
    #[arg(long, value_enum, default_value_t = AuthMode::Subprotocol)]
    auth: AuthMode,
    /// Upgrades in flight at once while opening.
    #[arg(long, default_value_t = 64)]
    open_concurrency: usize,
    /// Subscribe requests in flight at once in phase 2 (a connection subscribes once).
    #[arg(long, default_value_t = 64)]
    subscribe_concurrency: usize,
    /// Connections opened, subscribed and closed before the baseline is read.
    #[arg(long, default_value_t = 200)]
    warmup_connections: usize,
    /// Pause before each RSS reading, in seconds.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// Give up on a phase after this many seconds.
    #[arg(long, default_value_t = 180)]
    phase_timeout_secs: u64,
    /// Skip phase 2 (subscribe).
    #[arg(long)]
    no_subscribe: bool,
    /// Skip phase 4 (open N idle connections again after closing all: a leak check).
    #[arg(long)]
    no_reopen: bool,
    /// Client runtime worker threads.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Extra flag passed to `parley serve` (repeatable), e.g. --server-arg=--heartbeat-interval-ms=25000.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Hold,
    Subscribe,
    Close,
}

#[derive(Default)]
struct Counters {
    opened: AtomicUsize,
    open_failed: AtomicUsize,
    subscribed: AtomicUsize,
    subscribe_failed: AtomicUsize,
    /// Closed by the server or failed while they should have stayed open.
    dropped: AtomicUsize,
    finished: AtomicUsize,
}

struct Ctx {
    server: std::net::SocketAddr,
    tokens: Vec<String>,
    channels: Vec<String>,
    source_addrs: usize,
    auth: AuthMode,
    open_limit: Semaphore,
    subscribe_limit: Arc<Semaphore>,
    counters: Counters,
    first_error: std::sync::Mutex<Option<String>>,
}

/// What every batch of connections shares.
struct Setup {
    server: std::net::SocketAddr,
    tokens: Vec<String>,
    channels: Vec<String>,
    source_addrs: usize,
    auth: AuthMode,
    open_concurrency: usize,
    subscribe_concurrency: usize,
}

impl Setup {
    /// A fresh context (counters start at zero) for one batch of connections.
    fn batch(&self) -> Arc<Ctx> {
        Arc::new(Ctx {
            server: self.server,
            tokens: self.tokens.clone(),
            channels: self.channels.clone(),
            source_addrs: self.source_addrs,
            auth: self.auth,
            open_limit: Semaphore::new(self.open_concurrency.max(1)),
            subscribe_limit: Arc::new(Semaphore::new(self.subscribe_concurrency.max(1))),
            counters: Counters::default(),
            first_error: Default::default(),
        })
    }
}

impl Ctx {
    fn note_error(&self, e: String) {
        if let Ok(mut slot) = self.first_error.lock() {
            slot.get_or_insert(e);
        }
    }
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
    if (args.connections as u64) + 100 > soft {
        bail!(
            "{} connections need more than the open-files limit {soft} (hard {hard}) of this process",
            args.connections
        );
    }
    println!(
        "ws_memory: {} | open files limit {soft} (hard {hard}), inherited by the server",
        parley_bench::machine_summary()
    );
    // Setup adds every user to the channels over REST: raise the REST budget far above it.
    let mut server_args: Vec<String> =
        ["--rate-per-minute", "100000000", "--rate-burst", "1000000"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    server_args.extend(args.server_args.iter().cloned());
    let mut server = ServerProcess::start(&args.parley, &server_args)?;
    println!("server: {} (pid {})", server.banner, server.pid());
    let n_users = args.users.unwrap_or(args.connections).max(1);
    println!("{n_users} distinct users, members of every channel");
    let users: Vec<String> = (0..n_users).map(|i| format!("u{i}")).collect();
    let tokens: Vec<String> = users.iter().map(|u| token(u)).collect();
    let rest = Rest::new(server.http_base());
    let owner = token("bench-owner");
    let mut channels = Vec::new();
    for c in 0..args.channels.max(1) {
        let initial: Vec<String> = users.iter().take(99).cloned().collect();
        let id = rest
            .create_channel(&owner, &format!("bench-{c}"), &initial)
            .await?;
        let adds = futures::stream::iter(users.iter().skip(99).map(|u| {
            let (rest, owner, id) = (&rest, &owner, &id);
            async move { rest.add_member(owner, id, u).await }
        }))
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
        for a in adds {
            a?;
        }
        channels.push(id);
    }
    let setup = Setup {
        server: server.addr,
        tokens,
        channels,
        source_addrs: args.source_addrs.max(1),
        auth: args.auth,
        open_concurrency: args.open_concurrency,
        subscribe_concurrency: args.subscribe_concurrency,
    };
    let settle = Duration::from_secs(args.settle_secs);
    let timeout = Duration::from_secs(args.phase_timeout_secs);

    // Warm-up: the first connections and subscriptions touch lazily built state (runtime threads,
    // allocator arenas, SQLite read connections); keep that out of the per-connection figure.
    if args.warmup_connections > 0 {
        let warm = setup.batch();
        let (tx, rx) = watch::channel(Phase::Hold);
        for i in 0..args.warmup_connections {
            tokio::spawn(connection(warm.clone(), i, rx.clone()));
        }
        wait_for(
            &warm.counters,
            |c| done(&c.opened) + done(&c.open_failed) >= args.warmup_connections,
            timeout,
        )
        .await;
        let _ = tx.send(Phase::Subscribe);
        wait_for(
            &warm.counters,
            |c| done(&c.subscribed) + done(&c.subscribe_failed) >= done(&c.opened),
            timeout,
        )
        .await;
        let _ = tx.send(Phase::Close);
        wait_for(
            &warm.counters,
            |c| done(&c.finished) >= args.warmup_connections,
            timeout,
        )
        .await;
        if done(&warm.counters.open_failed) > 0 {
            bail!("warm-up connections failed:{}", error_note(&warm));
        }
    }
    tokio::time::sleep(settle).await;
    server.check_alive()?;
    let before = server.mem()?;
    let heap_before = parley_bench::live_heap(&server.http_base()).await;
    print_mem("baseline (after warm-up)", &before);

    // Phase 1: open N authenticated connections and hold them idle.
    let n = args.connections;
    let ctx = setup.batch();
    let (tx, rx) = watch::channel(Phase::Hold);
    let started = Instant::now();
    for i in 0..n {
        tokio::spawn(connection(ctx.clone(), i, rx.clone()));
    }
    let all_open = wait_for(
        &ctx.counters,
        |c| done(&c.opened) + done(&c.open_failed) >= n,
        timeout,
    )
    .await;
    let open_time = started.elapsed();
    let opened = done(&ctx.counters.opened);
    println!(
        "opened {opened}/{n} connections in {:.2} s ({:.0}/s){}, {} failed{}",
        open_time.as_secs_f64(),
        opened as f64 / open_time.as_secs_f64(),
        if all_open { "" } else { " (timed out)" },
        done(&ctx.counters.open_failed),
        error_note(&ctx)
    );
    tokio::time::sleep(settle).await;
    server.check_alive()?;
    let idle = server.mem()?;
    let server_sees = server_connection_count(&server).await;
    print_mem("authenticated idle", &idle);
    print_per_conn("authenticated idle", &before, &idle, opened, server_sees);
    print_heap(
        "authenticated idle",
        heap_before,
        parley_bench::live_heap(&server.http_base()).await,
        opened,
    );

    // Phase 2: each connection subscribes to one channel.
    let mut subscribed_mem = None;
    if !args.no_subscribe {
        let t = Instant::now();
        let _ = tx.send(Phase::Subscribe);
        wait_for(
            &ctx.counters,
            |c| done(&c.subscribed) + done(&c.subscribe_failed) + done(&c.dropped) >= opened,
            timeout,
        )
        .await;
        println!(
            "subscribed {}/{opened} connections to {} channel(s) in {:.2} s, {} failed{}",
            done(&ctx.counters.subscribed),
            ctx.channels.len(),
            t.elapsed().as_secs_f64(),
            done(&ctx.counters.subscribe_failed),
            error_note(&ctx)
        );
        tokio::time::sleep(settle).await;
        server.check_alive()?;
        let sub = server.mem()?;
        let server_sees = server_connection_count(&server).await;
        print_mem("authenticated + subscribed", &sub);
        print_per_conn(
            "authenticated + subscribed",
            &before,
            &sub,
            opened,
            server_sees,
        );
        print_heap(
            "authenticated + subscribed",
            heap_before,
            parley_bench::live_heap(&server.http_base()).await,
            opened,
        );
        let extra = sub.rss as i64 - idle.rss as i64;
        println!(
            "  subscribe adds {:.0} B per connection over idle",
            extra as f64 / opened.max(1) as f64
        );
        subscribed_mem = Some(sub);
    }
    let dropped = done(&ctx.counters.dropped);
    if dropped > 0 {
        println!(
            "WARNING: {dropped} connections were closed by the server while held{}",
            error_note(&ctx)
        );
    }

    // Phase 3: close them all and see how much comes back.
    let _ = tx.send(Phase::Close);
    wait_for(&ctx.counters, |c| done(&c.finished) >= n, timeout).await;
    tokio::time::sleep(settle).await;
    server.check_alive()?;
    let closed = server.mem()?;
    let server_sees = server_connection_count(&server).await;
    print_mem("after closing all", &closed);
    println!(
        "  server reports {} open",
        server_sees
            .map(|v| v.to_string())
            .unwrap_or_else(|| "?".into())
    );

    // Phase 4: open N idle connections again. Memory that was kept (not returned to the OS) but
    // is free gets reused, so RSS should barely move; growth here would point at a leak.
    let mut reopened = None;
    if !args.no_reopen {
        let again = setup.batch();
        let (tx2, rx2) = watch::channel(Phase::Hold);
        for i in 0..n {
            tokio::spawn(connection(again.clone(), n + i, rx2.clone()));
        }
        wait_for(
            &again.counters,
            |c| done(&c.opened) + done(&c.open_failed) >= n,
            timeout,
        )
        .await;
        tokio::time::sleep(settle).await;
        server.check_alive()?;
        let m = server.mem()?;
        print_mem("after reopening N idle (leak check)", &m);
        println!(
            "  reopened {}/{n}; RSS change vs after close: {:+.0} B per connection",
            done(&again.counters.opened),
            (m.rss as f64 - closed.rss as f64) / n.max(1) as f64
        );
        let _ = tx2.send(Phase::Close);
        wait_for(&again.counters, |c| done(&c.finished) >= n, timeout).await;
        reopened = Some(m);
    }

    println!();
    println!(
        "SUMMARY ws_memory connections={opened} auth={:?} channels={}",
        args.auth,
        ctx.channels.len()
    );
    println!("  RSS before            {}", mib(before.rss));
    println!(
        "  RSS idle              {}  => {:.0} B/conn",
        mib(idle.rss),
        per_conn(&before, &idle, opened)
    );
    if let Some(sub) = subscribed_mem {
        println!(
            "  RSS subscribed        {}  => {:.0} B/conn",
            mib(sub.rss),
            per_conn(&before, &sub, opened)
        );
    }
    println!(
        "  RSS after close       {}  (peak {})",
        mib(closed.rss),
        mib(closed.hwm)
    );
    if let Some(m) = reopened {
        println!(
            "  RSS reopened idle     {}  => {:+.0} B/conn vs after close",
            mib(m.rss),
            per_conn(&closed, &m, n)
        );
    }
    println!("  time to open          {:.2} s", open_time.as_secs_f64());
    Ok(())
}

fn done(a: &AtomicUsize) -> usize {
    a.load(Ordering::Relaxed)
}

/// Polls the counters until `cond` holds or `timeout` passes; returns whether it held.
async fn wait_for(c: &Counters, cond: impl Fn(&Counters) -> bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond(c) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond(c)
}

fn error_note(ctx: &Ctx) -> String {
    match ctx.first_error.lock().ok().and_then(|e| e.clone()) {
        Some(e) => format!(" (first error: {e})"),
        None => String::new(),
    }
}

fn per_conn(before: &MemStatus, after: &MemStatus, n: usize) -> f64 {
    (after.rss as f64 - before.rss as f64) / n.max(1) as f64
}

fn print_mem(label: &str, m: &MemStatus) {
    println!(
        "server RSS {label}: {} (anon {}, file {}, peak {}, {} threads)",
        mib(m.rss),
        mib(m.rss_anon),
        mib(m.rss_file),
        mib(m.hwm),
        m.threads
    );
}

fn print_per_conn(
    label: &str,
    before: &MemStatus,
    after: &MemStatus,
    n: usize,
    server_sees: Option<u64>,
) {
    println!(
        "  {label}: ({} - {}) / {n} = {:.0} B per connection (anon: {:.0} B); server reports {} open",
        mib(after.rss),
        mib(before.rss),
        per_conn(before, after, n),
        (after.rss_anon as f64 - before.rss_anon as f64) / n.max(1) as f64,
        server_sees
            .map(|v| v.to_string())
            .unwrap_or_else(|| "?".into())
    );
}

fn print_heap(label: &str, before: Option<u64>, after: Option<u64>, n: usize) {
    if let (Some(before), Some(after)) = (before, after) {
        println!(
            "  {label}: live heap ({} - {}) / {n} = {:.0} B per connection",
            mib(after),
            mib(before),
            (after as f64 - before as f64) / n.max(1) as f64
        );
    }
}

/// `/readyz` reports `ready connections=N`.
async fn server_connection_count(server: &ServerProcess) -> Option<u64> {
    let body = reqwest::get(format!("{}/readyz", server.http_base()))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    body.split("connections=").nth(1)?.trim().parse().ok()
}

/// One client connection: open, hold (answering pings), subscribe when told, close when told.
async fn connection(ctx: Arc<Ctx>, i: usize, mut phase: watch::Receiver<Phase>) {
    let c = &ctx.counters;
    let opened = {
        let _permit = ctx.open_limit.acquire().await;
        let token = &ctx.tokens[i % ctx.tokens.len()];
        tokio::time::timeout(
            Duration::from_secs(30),
            ws_connect(
                ctx.server,
                source_addr(i, ctx.source_addrs),
                token,
                ctx.auth,
            ),
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
            ctx.note_error(format!("open: {e:#}"));
            c.open_failed.fetch_add(1, Ordering::Relaxed);
            c.finished.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let mut subscribing = false;
    let mut sub_permit: Option<tokio::sync::OwnedSemaphorePermit> = None;
    loop {
        tokio::select! {
            changed = phase.changed() => {
                if changed.is_err() { break; }
                let p = *phase.borrow_and_update();
                match p {
                    Phase::Hold => {}
                    Phase::Subscribe if !subscribing => {
                        subscribing = true;
                        // Held until the ack: bounds the subscribes in flight.
                        sub_permit = ctx.subscribe_limit.clone().acquire_owned().await.ok();
                        let channel = &ctx.channels[i % ctx.channels.len()];
                        let frame = json!({ "type": "subscribe", "id": "s", "channel_id": channel });
                        if let Err(e) = ws.send(WsMessage::Text(frame.to_string().into())).await {
                            ctx.note_error(format!("subscribe send: {e}"));
                            c.subscribe_failed.fetch_add(1, Ordering::Relaxed);
                            drop(sub_permit.take());
                        }
                    }
                    Phase::Subscribe => {}
                    Phase::Close => {
                        let _ = tokio::time::timeout(Duration::from_secs(5), ws.close(None)).await;
                        // Read until the server answers the close (bounded).
                        let _ = tokio::time::timeout(Duration::from_secs(5), async {
                            while let Some(Ok(_)) = ws.next().await {}
                        }).await;
                        break;
                    }
                }
            }
            msg = ws.next() => match msg {
                Some(Ok(WsMessage::Text(t))) => {
                    if let Ok(r) = serde_json::from_str::<Reply>(t.as_str())
                        && r.id.as_deref() == Some("s")
                    {
                        drop(sub_permit.take());
                        if r.kind == "ack" {
                            c.subscribed.fetch_add(1, Ordering::Relaxed);
                        } else {
                            ctx.note_error(format!("subscribe: {t}"));
                            c.subscribe_failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Some(Ok(WsMessage::Close(f))) => {
                    ctx.note_error(format!("server closed a held connection: {f:?}"));
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    ctx.note_error(format!("held connection failed: {e}"));
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                None => {
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
    c.finished.fetch_add(1, Ordering::Relaxed);
}
