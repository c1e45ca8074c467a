//! `parley`: serve, token, migrate.

use anyhow::Context;
use clap::Parser;
use parley::config::{Cli, Command};
use parley::server;
use parley_core::auth::DevSigningKey;
use tokio::net::TcpListener;

/// jemalloc instead of glibc's malloc. Under send load glibc's allocator took about a fifth of
/// the server's CPU (`_int_malloc`, `_int_free`, `malloc_consolidate`): every frame, message and
/// ack allocates a few small buffers on one worker thread and frees them on another. With
/// jemalloc the server's CPU per persisted message fell from about 37 to 25 µs, and idle
/// connections got smaller too; mimalloc was as fast but held about 1.2 KB more per subscribed
/// connection. Figures in docs/benchmarks.md.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Tunes jemalloc for a long-running server: a background thread returns freed pages to the
/// system even while the server is idle (otherwise purging waits for further allocations), and
/// freed pages are returned outright after the dirty decay (10 s) instead of being kept as
/// "muzzy" (`MADV_FREE`) pages, which still count in RSS, and in a container's memory, until the
/// kernel needs them. After a burst of connections RSS then comes back to the live heap: about
/// 3.4 -> 3.0-3.2 KB per idle subscribed connection at 15,000 (docs/benchmarks.md). Best effort:
/// a failed setting leaves jemalloc's default.
fn tune_allocator() {
    use tikv_jemalloc_ctl::Access;
    use tikv_jemalloc_ctl::AsName;
    let _ = b"arenas.muzzy_decay_ms\0".name().write(0isize);
    // Arenas already created keep the default they were created with.
    if let Ok(n) = tikv_jemalloc_ctl::arenas::narenas::read() {
        for i in 0..n {
            let key = format!("arena.{i}.muzzy_decay_ms\0");
            let _ = key.as_bytes().name().write(0isize);
        }
    }
    let _ = tikv_jemalloc_ctl::background_thread::write(true);
}

/// jemalloc's live heap and resident bytes, for `/metrics`.
fn allocator_stats() -> Option<(u64, u64)> {
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    let allocated = tikv_jemalloc_ctl::stats::allocated::read().ok()?;
    let resident = tikv_jemalloc_ctl::stats::resident::read().ok()?;
    Some((allocated as u64, resident as u64))
}

fn main() -> anyhow::Result<()> {
    tune_allocator();
    parley::telemetry::set_allocator_stats(allocator_stats);
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Token(args) => token(args),
            Command::Migrate(args) => {
                parley::telemetry::init_logging(parley::telemetry::LogFormat::Text);
                let storage = server::open_storage(&args).await?;
                println!("schema up to date ({})", storage.backend());
                Ok(())
            }
        }
    })
}

/// `parley token`: signs with the development key of an existing data folder, never creating
/// one (a key made here would not be the server's, and every token would fail its signature).
fn token(args: parley::config::TokenArgs) -> anyhow::Result<()> {
    let dir = std::path::absolute(&args.data_dir).unwrap_or_else(|_| args.data_dir.clone());
    let key_path = dir.join(parley_core::auth::DEV_KEY_FILE);
    let key = match DevSigningKey::load(&dir) {
        Ok(key) => key,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "no development key at {}: `parley token` signs with the key that `parley serve` \
             creates in its data folder, and {} has none. Run this command from the folder where \
             you ran `parley serve`, or pass the server's data folder with --data-dir PATH \
             (PARLEY_DATA_DIR); start the server first. A server started with \
             --jwt-hs256-secret or --jwt-public-key has no development key: sign its tokens with \
             your own key.",
            key_path.display(),
            dir.display()
        ),
        Err(e) => {
            return Err(e).with_context(|| {
                format!("cannot read the development key {}", key_path.display())
            });
        }
    };
    let token = key.sign(
        &args.user,
        &args.tenant,
        args.roles,
        args.ttl.as_secs(),
        &args.issuer,
        &args.audience,
    );
    eprintln!(
        "parley token: signed for {} with the development key {} (valid {} s); a server accepts \
         it only if it runs on that data folder",
        args.user,
        key_path.display(),
        args.ttl.as_secs()
    );
    println!("{token}");
    Ok(())
}

async fn serve(args: parley::config::ServeArgs) -> anyhow::Result<()> {
    let otlp = args
        .otlp_endpoint
        .as_ref()
        .map(|endpoint| parley::telemetry::OtlpConfig {
            endpoint: endpoint.clone(),
            sample_ratio: args.trace_sample_ratio,
        });
    let traces = parley::telemetry::init(args.log_format, otlp.as_ref())?;
    if args.role == parley::config::Role::Sfu {
        let result = parley::sfu_role::serve_sfu(&args).await;
        traces.shutdown();
        return result;
    }
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let node = server::build(&args, shutdown_rx).await?;
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    // The first stdout line is machine-readable: tests and scripts read the port from it. A
    // closed stdout (the reader went away) must not take the server down, so errors are ignored.
    let mut banner = format!(
        "parley listening on http://{addr} (storage: {}, bus: {})\n",
        node.storage_backend, node.bus_kind
    );
    if node.dev_mode {
        let dir = std::path::absolute(&args.storage.data_dir)
            .unwrap_or_else(|_| args.storage.data_dir.clone());
        banner.push_str(&format!(
            "development mode (anyone who reaches this server can sign in as anyone): open \
             http://{addr}/ to try the web client, or get a token with \
             `parley token --user alice --data-dir {}`\n",
            dir.display()
        ));
    }
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(banner.as_bytes());
        let _ = out.flush();
    }
    let edge = node.edge.clone();
    let drain_window = std::time::Duration::from_millis(args.drain_window_ms);
    let shutdown = async move {
        #[cfg(unix)]
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        #[cfg(unix)]
        let mut signal = async move || match term.as_mut() {
            Some(t) => tokio::select! {
                _ = t.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            },
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        };
        #[cfg(not(unix))]
        let mut signal = async || {
            let _ = tokio::signal::ctrl_c().await;
        };
        signal().await;
        if !drain_window.is_zero() {
            // Drain: readiness false, upgrades refused, clients told to reconnect elsewhere.
            // The window ends early once every client has left.
            tracing::info!(window_ms = drain_window.as_millis() as u64, "draining");
            edge.drain(drain_window);
            let all_left = async {
                while edge.connection_count() > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(drain_window) => {},
                _ = all_left => tracing::info!("every client left: ending the drain window"),
                _ = signal() => tracing::info!("second signal: ending the drain window early"),
            }
        }
        // In-flight sends finish and their acks are queued before the 1001 closes.
        edge.sends_settled(std::time::Duration::from_secs(5)).await;
        tracing::info!("shutting down: closing WebSockets with 1001");
        let _ = shutdown_tx.send(true);
    };
    let edge = node.edge.clone();
    let responder = node.responder;
    server::serve(listener, node.app, shutdown).await?;
    if let Some(responder) = responder {
        // A core answers the requests it took before leaving (bounded inside).
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), responder).await;
    }
    // The HTTP server's graceful shutdown does not wait for upgraded connections: give the
    // WebSockets a moment to send their 1001 close frames before the process exits.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while edge.connection_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    traces.shutdown();
    Ok(())
}
