//! `/healthz` is liveness; `/readyz` is not ready while a configured dependency cannot be
//! reached, and says which. The test stops real services: a private nats-server and a private
//! redis-server (so no other test loses its services), and cuts PostgreSQL off behind a proxy
//! the test owns.

mod common;

use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Backend, Server, ServerBuilder};
use tokio::net::{TcpListener, TcpStream};

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A private service process on a fixed port, killed on drop.
struct Service {
    child: Option<Child>,
    port: u16,
    start: fn(u16) -> Child,
}

impl Service {
    fn new(start: fn(u16) -> Child) -> Service {
        let port = free_port();
        let mut s = Service {
            child: None,
            port,
            start,
        };
        s.restart();
        s
    }

    fn restart(&mut self) {
        self.child = Some((self.start)(self.port));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "service on port {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

fn nats_server(port: u16) -> Child {
    let bin = std::env::var("PARLEY_NATS_SERVER_BIN").expect(
        "PARLEY_NATS_SERVER_BIN is not set: run the tests with scripts/test.sh, or \
         `eval \"$(scripts/services.sh start)\"`, which installs nats-server and sets it",
    );
    Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nats-server")
}

fn redis_server(port: u16) -> Child {
    Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect(
            "redis-server not found: run the tests with scripts/test.sh (scripts/services.sh \
             installs it), or apt-get install redis-server",
        )
}

async fn readyz(server: &Server) -> (u16, String) {
    let res = reqwest::get(server.url("/readyz")).await.expect("/readyz");
    let status = res.status().as_u16();
    (status, res.text().await.expect("body"))
}

/// Polls `/readyz` until `want` holds (up to 15 s); returns the last answer.
async fn readyz_until(server: &Server, what: &str, want: impl Fn(u16, &str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = readyz(server).await;
        if want(status, &body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never became {what}; last: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn healthz(server: &Server) {
    let res = reqwest::get(server.url("/healthz"))
        .await
        .expect("/healthz");
    assert_eq!(
        res.status(),
        200,
        "liveness does not depend on dependencies"
    );
}

#[tokio::test]
async fn readiness_names_a_stopped_nats_or_redis_and_recovers() {
    let mut nats = Service::new(nats_server);
    let mut redis = Service::new(redis_server);
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--nats-url")
        .arg(format!("nats://127.0.0.1:{}", nats.port))
        .arg("--redis-url")
        .arg(format!("redis://127.0.0.1:{}", redis.port))
        .start();

    let (status, body) = readyz(&server).await;
    assert_eq!(
        (status, body.split(" connections=").next()),
        (200, Some("ready storage=ok nats=ok redis=ok")),
        "{body}"
    );

    redis.stop();
    let body = readyz_until(&server, "not ready for redis", |s, b| {
        s == 503 && b.contains("redis=unreachable")
    })
    .await;
    assert!(body.starts_with("not ready "), "{body}");
    assert!(
        body.contains("nats=ok") && body.contains("storage=ok"),
        "{body}"
    );
    healthz(&server).await;

    nats.stop();
    let body = readyz_until(&server, "not ready for nats", |s, b| {
        s == 503 && b.contains("nats=unreachable")
    })
    .await;
    assert!(body.contains("redis=unreachable"), "{body}");
    healthz(&server).await;

    redis.restart();
    nats.restart();
    readyz_until(&server, "ready again", |s, b| {
        s == 200 && b.starts_with("ready storage=ok nats=ok redis=ok")
    })
    .await;
}

/// A TCP proxy the test can cut: while `open`, connections pass through to `upstream`; once
/// cut, existing connections are dropped and new ones refused (the listener closes).
struct Proxy {
    port: u16,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut cut_rx2 = cut_rx.clone();
            loop {
                tokio::select! {
                    _ = cut_rx2.wait_for(|c| *c) => return,
                    accepted = listener.accept() => {
                        let Ok((mut down, _)) = accepted else { return };
                        let upstream = upstream.clone();
                        let mut cut_rx = cut_rx.clone();
                        tokio::spawn(async move {
                            let Ok(mut up) = TcpStream::connect(&upstream).await else { return };
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                                _ = cut_rx.wait_for(|c| *c) => {}
                            }
                        });
                    }
                }
            }
        });
        Proxy { port, cut }
    }
}

// Multi-threaded: the proxy must run while the test blocks on the server's start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_an_unreachable_database() {
    let url = common::database_url();
    let parsed = reqwest::Url::parse(&url).expect("database url");
    let upstream = format!(
        "{}:{}",
        parsed.host_str().expect("host"),
        parsed.port().unwrap_or(5432)
    );
    let proxy = Proxy::start(upstream).await;
    let mut through = parsed.clone();
    through.set_port(Some(proxy.port)).expect("port");
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--database-url")
        .arg(through.to_string())
        .start();
    let (status, body) = readyz(&server).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("ready storage=ok"), "{body}");

    let _ = proxy.cut.send(true);
    let body = readyz_until(&server, "not ready for the database", |s, b| {
        s == 503 && b.contains("storage=unreachable")
    })
    .await;
    assert!(body.starts_with("not ready "), "{body}");
    healthz(&server).await;
}
