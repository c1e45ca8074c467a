//! The Redis presence store against a real Redis (`PARLEY_TEST_REDIS_URL`, started by
//! `scripts/test.sh`): several stores on one Redis play the nodes of a cluster. Each test has
//! its own key namespace and tenant, so tests running in parallel do not sweep each other.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parley_core::presence_store::{LocalPresence, PresenceStore, RedisPresenceStore, UserPresence};
use parley_proto::PresenceStatus;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TTL: Duration = Duration::from_secs(1);

fn redis_url() -> String {
    std::env::var("PARLEY_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!("PARLEY_TEST_REDIS_URL is not set: run the tests with scripts/test.sh, which starts Redis")
    })
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", ulid::Ulid::new())
}

async fn node_at(url: &str, namespace: &str) -> RedisPresenceStore {
    RedisPresenceStore::connect_with_namespace(url, namespace, TTL)
        .await
        .expect("connect to Redis")
}

async fn node(namespace: &str) -> RedisPresenceStore {
    node_at(&redis_url(), namespace).await
}

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms")
}

fn local(status: PresenceStatus, last_active_ms: u64) -> LocalPresence {
    LocalPresence {
        status,
        last_active_ms,
        last_seen_ms: None,
    }
}

fn offline(last_seen_ms: u64, last_active_ms: u64) -> LocalPresence {
    LocalPresence {
        status: PresenceStatus::Offline,
        last_active_ms,
        last_seen_ms: Some(last_seen_ms),
    }
}

async fn get_one(store: &RedisPresenceStore, tenant: &str, user: &str) -> UserPresence {
    store
        .get(tenant, &[user.to_owned()])
        .await
        .expect("get")
        .remove(0)
}

/// Sweeps of `store` reported for `tenant`, as (user, presence).
async fn sweep_for(store: &RedisPresenceStore, tenant: &str) -> Vec<(String, UserPresence)> {
    store
        .sweep()
        .await
        .expect("sweep")
        .into_iter()
        .filter(|(t, _, _)| t == tenant)
        .map(|(_, u, p)| (u, p))
        .collect()
}

#[tokio::test]
async fn a_user_online_on_one_node_is_online_on_another() {
    let ns = unique("parley-test:");
    let (a, b) = (node(&ns).await, node(&ns).await);
    assert_ne!(a.node_id(), b.node_id());
    assert_eq!(a.kind(), "redis");
    // Ids may contain `: . @ | -`.
    let tenant = unique("t:1.a@b|c-");
    let user = "u:1.x@y|z-1".to_owned();

    let t = now_ms();
    let p = a
        .set_local(&tenant, &user, local(PresenceStatus::Online, t))
        .await
        .expect("set_local");
    assert_eq!(
        (p.status, p.last_active_ms, p.last_seen_ms),
        (PresenceStatus::Online, Some(t), None)
    );
    let p = get_one(&b, &tenant, &user).await;
    assert_eq!(
        (p.status, p.last_active_ms, p.last_seen_ms),
        (PresenceStatus::Online, Some(t), None)
    );

    // Away on its only node: away everywhere.
    a.set_local(&tenant, "away-user", local(PresenceStatus::Away, t))
        .await
        .expect("set_local");
    let all = b
        .get(
            &tenant,
            &[user.clone(), "away-user".into(), "nobody".into()],
        )
        .await
        .expect("get");
    let statuses: Vec<_> = all.iter().map(|p| p.status).collect();
    assert_eq!(
        statuses,
        [
            PresenceStatus::Online,
            PresenceStatus::Away,
            PresenceStatus::Offline
        ]
    );
    assert_eq!(
        (all[2].last_active_ms, all[2].last_seen_ms),
        (None, None),
        "an unknown user"
    );

    // Separators cannot be confused: tenant `{t}:x` + user `y` is not tenant `{t}` + user `x:y`,
    // and another tenant does not see the user.
    a.set_local(
        &format!("{tenant}:x"),
        "y",
        local(PresenceStatus::Online, t),
    )
    .await
    .expect("set_local");
    assert_eq!(
        get_one(&b, &tenant, "x:y").await.status,
        PresenceStatus::Offline
    );
    assert_eq!(
        get_one(&b, &unique("other-"), &user).await.status,
        PresenceStatus::Offline
    );
    assert!(b.get(&tenant, &[]).await.expect("get").is_empty());
}

#[tokio::test]
async fn a_user_stays_online_until_the_last_node_lets_go() {
    let ns = unique("parley-test:");
    let (a, b) = (node(&ns).await, node(&ns).await);
    let tenant = unique("t-");
    let t = now_ms();

    a.set_local(&tenant, "u", local(PresenceStatus::Online, t))
        .await
        .expect("set_local");
    let p = b
        .set_local(&tenant, "u", local(PresenceStatus::Online, t + 5))
        .await
        .expect("set_local");
    assert_eq!(
        (p.status, p.last_active_ms),
        (PresenceStatus::Online, Some(t + 5))
    );

    let p = a
        .set_local(&tenant, "u", offline(t + 10, t + 7))
        .await
        .expect("set_local");
    assert_eq!(
        (p.status, p.last_seen_ms),
        (PresenceStatus::Online, None),
        "B still holds the user"
    );
    assert_eq!(
        get_one(&a, &tenant, "u").await.status,
        PresenceStatus::Online
    );

    // B lets go earlier than A did and with older activity: the latest of both is kept.
    let p = b
        .set_local(&tenant, "u", offline(t + 8, t + 6))
        .await
        .expect("set_local");
    assert_eq!(
        (p.status, p.last_seen_ms, p.last_active_ms),
        (PresenceStatus::Offline, Some(t + 10), Some(t + 7))
    );
    assert_eq!(get_one(&a, &tenant, "u").await, p);
    assert_eq!(get_one(&b, &tenant, "u").await, p);

    // Online again: no last_seen while online; offline again moves it.
    let p = a
        .set_local(&tenant, "u", local(PresenceStatus::Online, t + 20))
        .await
        .expect("set_local");
    assert_eq!((p.status, p.last_seen_ms), (PresenceStatus::Online, None));
    let p = a
        .set_local(&tenant, "u", offline(t + 30, t + 20))
        .await
        .expect("set_local");
    assert_eq!(
        (p.status, p.last_seen_ms, p.last_active_ms),
        (PresenceStatus::Offline, Some(t + 30), Some(t + 20))
    );

    // Nothing is left for a sweep to report.
    tokio::time::sleep(TTL + Duration::from_millis(100)).await;
    assert!(sweep_for(&b, &tenant).await.is_empty());
}

#[tokio::test]
async fn away_on_every_node_is_away_and_online_anywhere_wins() {
    let ns = unique("parley-test:");
    let (a, b) = (node(&ns).await, node(&ns).await);
    let tenant = unique("t-");
    let t = now_ms();

    a.set_local(&tenant, "u", local(PresenceStatus::Away, t))
        .await
        .expect("set_local");
    let p = b
        .set_local(&tenant, "u", local(PresenceStatus::Online, t))
        .await
        .expect("set_local");
    assert_eq!(p.status, PresenceStatus::Online);
    let p = b
        .set_local(&tenant, "u", local(PresenceStatus::Away, t))
        .await
        .expect("set_local");
    assert_eq!(p.status, PresenceStatus::Away);
    let p = b
        .set_local(&tenant, "u", offline(t + 1, t))
        .await
        .expect("set_local");
    assert_eq!(p.status, PresenceStatus::Away, "still away on A");
    let p = a
        .set_local(&tenant, "u", local(PresenceStatus::Online, t + 2))
        .await
        .expect("set_local");
    assert_eq!(
        (p.status, p.last_active_ms),
        (PresenceStatus::Online, Some(t + 2))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_of_a_dead_node_go_offline_once() {
    let ns = unique("parley-test:");
    let (a, b, c) = (node(&ns).await, node(&ns).await, node(&ns).await);
    let tenant = unique("t-");
    let t0 = now_ms();

    a.set_local(&tenant, "only-on-a", local(PresenceStatus::Online, t0))
        .await
        .expect("set_local");
    a.set_local(&tenant, "on-both", local(PresenceStatus::Online, t0))
        .await
        .expect("set_local");
    let on_b = vec![(
        tenant.clone(),
        "on-both".to_owned(),
        local(PresenceStatus::Online, t0),
    )];
    b.set_local(&tenant, "on-both", on_b[0].2)
        .await
        .expect("set_local");
    assert!(
        sweep_for(&b, &tenant).await.is_empty(),
        "nothing has expired yet"
    );

    // A dies (stops refreshing); B keeps refreshing its user and sweeps, as `run_timers` does.
    let deadline = Instant::now() + TTL * 5;
    let mut reported = Vec::new();
    while reported.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the dead node's user was never swept"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        b.refresh(&on_b).await.expect("refresh");
        reported = sweep_for(&b, &tenant).await;
    }
    let swept_at = now_ms();
    assert_eq!(reported.len(), 1, "{reported:?}");
    let (user, p) = &reported[0];
    assert_eq!(user, "only-on-a");
    assert_eq!(
        (p.status, p.last_active_ms),
        (PresenceStatus::Offline, Some(t0))
    );
    let last_seen = p.last_seen_ms.expect("last_seen");
    assert!(
        (t0..t0 + 1_000).contains(&last_seen),
        "last seen when A last wrote: {last_seen} vs {t0}"
    );
    assert!(swept_at >= t0 + 1_000, "not before the TTL");

    // Reported once: neither B again nor another node reports it.
    b.refresh(&on_b).await.expect("refresh");
    assert!(sweep_for(&b, &tenant).await.is_empty());
    assert!(sweep_for(&c, &tenant).await.is_empty());

    // Every node reads the same.
    for store in [&b, &c] {
        let all = store
            .get(&tenant, &["only-on-a".into(), "on-both".into()])
            .await
            .expect("get");
        assert_eq!(all[0], *p);
        assert_eq!(
            all[1].status,
            PresenceStatus::Online,
            "B still holds and refreshes it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sweeps_report_each_user_once() {
    let ns = unique("parley-test:");
    let (a, b, c) = (node(&ns).await, node(&ns).await, node(&ns).await);
    let tenant = unique("t-");
    let t0 = now_ms();
    let users: Vec<(String, String, LocalPresence)> = (0..300)
        .map(|i| {
            (
                tenant.clone(),
                format!("u{i}"),
                local(PresenceStatus::Online, t0),
            )
        })
        .collect();
    a.refresh(&users).await.expect("refresh");
    assert_eq!(
        get_one(&b, &tenant, "u7").await.status,
        PresenceStatus::Online,
        "refresh alone makes users present"
    );
    drop(a);

    tokio::time::sleep(TTL + Duration::from_millis(100)).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..3 {
        let (from_b, from_c) = tokio::join!(sweep_for(&b, &tenant), sweep_for(&c, &tenant));
        for (user, p) in from_b.into_iter().chain(from_c) {
            assert_eq!(p.status, PresenceStatus::Offline);
            *counts.entry(user).or_default() += 1;
        }
    }
    assert_eq!(counts.len(), users.len(), "every user is reported");
    assert!(
        counts.values().all(|&n| n == 1),
        "each user is reported once: {counts:?}"
    );
}

/// Refreshing 1,000 users is one round trip: through a link with 25 ms of latency it takes far
/// less than the 25 s one round trip per user would, and keeps them all alive past the TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshing_a_thousand_users_is_one_round_trip() {
    const LATENCY: Duration = Duration::from_millis(25);
    let ns = unique("parley-test:");
    let proxy_url = latency_proxy(&redis_url(), LATENCY).await;
    let a = node_at(&proxy_url, &ns).await;
    let b = node(&ns).await;
    let tenant = unique("t-");
    let t0 = now_ms();
    let users: Vec<(String, String, LocalPresence)> = (0..1_000)
        .map(|i| {
            (
                tenant.clone(),
                format!("user-{i}"),
                local(PresenceStatus::Online, t0),
            )
        })
        .collect();
    let names: Vec<String> = users.iter().map(|(_, u, _)| u.clone()).collect();

    // The proxy does delay: a single round trip takes at least the latency.
    let t = Instant::now();
    a.get(&tenant, &names[..1]).await.expect("get");
    let one_round_trip = t.elapsed();
    assert!(one_round_trip >= LATENCY, "{one_round_trip:?}");

    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    while started.elapsed() < TTL * 2 {
        let t = Instant::now();
        a.refresh(&users).await.expect("refresh");
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!("one round trip: {one_round_trip:?}; slowest refresh of 1,000 users: {slowest:?}");
    assert!(
        slowest < LATENCY * 20,
        "a refresh of 1,000 users took {slowest:?} over a {LATENCY:?} link"
    );

    // Past twice the TTL since the first write, every user is still online.
    let all = b.get(&tenant, &names).await.expect("get");
    assert_eq!(all.len(), names.len());
    assert!(
        all.iter().all(|p| p.status == PresenceStatus::Online),
        "all stay alive while refreshed"
    );

    // Without refreshes they all go, and one sweep reports every one of them.
    tokio::time::sleep(TTL + Duration::from_millis(100)).await;
    let all = b.get(&tenant, &names).await.expect("get");
    assert!(all.iter().all(|p| p.status == PresenceStatus::Offline));
    let gone = sweep_for(&b, &tenant).await;
    assert_eq!(gone.len(), names.len());
}

#[tokio::test]
async fn an_unreachable_redis_is_an_error_naming_redis() {
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        RedisPresenceStore::connect(&url, TTL),
    )
    .await
    .expect("connect gives up in time");
    let err = result.err().expect("no Redis there");
    assert!(err.to_string().contains("redis"), "{err}");
}

/// A TCP proxy to the Redis of `url` that delays what the client sends by `latency`; returns
/// the URL to reach Redis through it.
async fn latency_proxy(url: &str, latency: Duration) -> String {
    // redis://[userinfo@]host:port[/db]
    let rest = url.strip_prefix("redis://").expect("a redis:// URL");
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let (userinfo, upstream) = authority
        .rsplit_once('@')
        .map_or(("", authority), |(u, h)| (u, h));
    let upstream = upstream.to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                continue;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n @ 1..) = client_read.read(&mut buf).await {
                    if tx
                        .send((Instant::now() + latency, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                while let Some((at, bytes)) = rx.recv().await {
                    tokio::time::sleep_until(at.into()).await;
                    if server_write.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            });
        }
    });
    let userinfo = if userinfo.is_empty() {
        String::new()
    } else {
        format!("{userinfo}@")
    };
    let path = if path.is_empty() {
        String::new()
    } else {
        format!("/{path}")
    };
    format!("redis://{userinfo}{addr}{path}")
}
