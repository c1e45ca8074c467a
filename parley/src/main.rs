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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Token(args) => token(args),
            Command::Migrate(args) => {
                init_tracing();
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

/// Logs to stderr, filtered by `PARLEY_LOG` (default `info`). Whatever it says, the WebSocket
/// library logs at most at debug level: at trace it prints every frame's payload, `auth` frames
/// with their token included, and tokens are never logged.
fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, filter};
    let env = EnvFilter::try_from_env("PARLEY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let no_frames = filter::filter_fn(|meta| {
        let target = meta.target();
        let frames = target.starts_with("tungstenite") || target.starts_with("tokio_tungstenite");
        !frames || *meta.level() <= tracing::Level::DEBUG
    });
    tracing_subscriber::registry()
        .with(env)
        .with(no_frames)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
}

async fn serve(args: parley::config::ServeArgs) -> anyhow::Result<()> {
    init_tracing();
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
    let shutdown = async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        #[cfg(unix)]
        let term_recv = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let term_recv = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {},
            _ = term_recv => {},
        }
        tracing::info!("shutting down: closing WebSockets with 1001");
        let _ = shutdown_tx.send(true);
    };
    let edge = node.edge.clone();
    server::serve(listener, node.app, shutdown).await?;
    // The HTTP server's graceful shutdown does not wait for upgraded connections: give the
    // WebSockets a moment to send their 1001 close frames before the process exits.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while edge.connection_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}
