//! Keyset paging of history over 1,000 messages, on SQLite and on PostgreSQL: `before` from the
//! newest page, `after` from the start, and `around` extended both ways all visit every message
//! exactly once, in order, with `has_before`/`has_after` telling the truth on every page.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Api, Backend, Server, unique};
use serde_json::Value;

const TOTAL: u64 = 1000;
const LIMIT: u64 = 50;

/// Upper bound for each phase (sending, one paging walk).
const PHASE: Duration = Duration::from_secs(60);

/// A page of history as the test checks it.
struct Page {
    seqs: Vec<u64>,
    has_before: bool,
    has_after: bool,
}

/// Fetches one page and checks what holds for every page: ascending contiguous seqs, at most
/// `LIMIT` messages, each message the one that was sent at its seq, and flags that say exactly
/// whether older and newer messages exist.
async fn page(
    api: &Api,
    channel: &str,
    query: &str,
    sent: &BTreeMap<u64, (String, String)>,
) -> Page {
    let body = api
        .get(&format!(
            "/v1/channels/{channel}/messages?{query}&limit={LIMIT}"
        ))
        .await
        .ok();
    let msgs = body["messages"].as_array().expect("messages");
    let seqs: Vec<u64> = msgs
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect();
    assert!(!seqs.is_empty(), "{query}: empty page");
    assert!(
        seqs.len() as u64 <= LIMIT,
        "{query}: {} messages, limit {LIMIT}",
        seqs.len()
    );
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "{query}: seqs not ascending and contiguous: {seqs:?}"
    );
    for m in msgs {
        let (id, text) = &sent[&m["seq"].as_u64().expect("seq")];
        assert_eq!(
            m["id"].as_str(),
            Some(id.as_str()),
            "{query}: id at seq {}",
            m["seq"]
        );
        assert_eq!(
            m["text"].as_str(),
            Some(text.as_str()),
            "{query}: text at seq {}",
            m["seq"]
        );
    }
    let (has_before, has_after) = (flag(&body, "has_before"), flag(&body, "has_after"));
    let (first, last) = (seqs[0], seqs[seqs.len() - 1]);
    assert_eq!(
        has_before,
        first > 1,
        "{query}: has_before on a page starting at seq {first}"
    );
    assert_eq!(
        has_after,
        last < TOTAL,
        "{query}: has_after on a page ending at seq {last}"
    );
    Page {
        seqs,
        has_before,
        has_after,
    }
}

fn flag(body: &Value, name: &str) -> bool {
    body[name]
        .as_bool()
        .unwrap_or_else(|| panic!("{name} missing in {body}"))
}

/// Sends `TOTAL` messages with 20 concurrent senders (5 users); returns seq → (id, text).
async fn fill(server: &Server) -> (Api, String, BTreeMap<u64, (String, String)>) {
    let owner = unique("owner");
    let users: Vec<String> = (0..5).map(|i| unique(&format!("user{i}"))).collect();
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let reader = server.api(&owner);
    let channel = reader.create_channel("paging", &refs).await;
    let tasks: Vec<_> = (0..20)
        .map(|t| {
            let api = server.api(&users[t % users.len()]);
            let channel = channel.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for i in 0..TOTAL as usize / 20 {
                    let text = format!("task {t} message {i}");
                    let res = api.send(&channel, &format!("t{t}-{i}"), &text).await;
                    assert_eq!(res.status, 201, "{}", res.body);
                    let m = &res.body["message"];
                    out.push((
                        m["seq"].as_u64().expect("seq"),
                        (m["id"].as_str().expect("id").to_owned(), text),
                    ));
                }
                out
            })
        })
        .collect();
    let mut sent = BTreeMap::new();
    for r in tokio::time::timeout(PHASE, futures::future::join_all(tasks))
        .await
        .expect("1,000 sends within 60 s")
    {
        sent.extend(r.expect("sender task"));
    }
    assert_eq!(
        sent.keys().copied().collect::<Vec<_>>(),
        (1..=TOTAL).collect::<Vec<_>>(),
        "acked seqs are 1..=1000"
    );
    (reader, channel, sent)
}

/// Paging with `before` from the newest page (no anchor), with `after` from 0, and with `around`
/// 500 extended with `before`/`after` from its edges, all at limit 50: each walk sees messages
/// 1..=1000 exactly once, in order, in 20 pages, and the flags are false exactly at the ends.
async fn paging_visits_every_message_once(backend: Backend) {
    let server = Server::start(backend);
    let (api, channel, sent) = fill(&server).await;
    let all: Vec<u64> = (1..=TOTAL).collect();

    // Backwards: the newest page first, then `before` the first seq of each page.
    let walk = async {
        let mut pages = vec![page(&api, &channel, "", &sent).await];
        assert!(!pages[0].has_after, "the newest page has nothing after it");
        assert_eq!(
            pages[0].seqs,
            (TOTAL - LIMIT + 1..=TOTAL).collect::<Vec<_>>(),
            "the newest page"
        );
        while pages.last().expect("page").has_before {
            let before = pages.last().expect("page").seqs[0];
            pages.push(page(&api, &channel, &format!("before={before}"), &sent).await);
            assert!(pages.len() <= 20, "more than 20 pages going backwards");
        }
        pages
    };
    let pages = tokio::time::timeout(PHASE, walk)
        .await
        .expect("walk with before");
    assert_eq!(pages.len(), 20);
    let seen: Vec<u64> = pages
        .iter()
        .rev()
        .flat_map(|p| p.seqs.iter().copied())
        .collect();
    assert_eq!(
        seen, all,
        "walking with before sees every message once, in order"
    );

    // Forwards: `after=0`, then `after` the last seq of each page.
    let walk = async {
        let mut pages = vec![page(&api, &channel, "after=0", &sent).await];
        assert!(!pages[0].has_before, "the first page has nothing before it");
        while pages.last().expect("page").has_after {
            let after = *pages.last().expect("page").seqs.last().expect("seq");
            pages.push(page(&api, &channel, &format!("after={after}"), &sent).await);
            assert!(pages.len() <= 20, "more than 20 pages going forwards");
        }
        pages
    };
    let pages = tokio::time::timeout(PHASE, walk)
        .await
        .expect("walk with after");
    assert_eq!(pages.len(), 20);
    let seen: Vec<u64> = pages.iter().flat_map(|p| p.seqs.iter().copied()).collect();
    assert_eq!(
        seen, all,
        "walking with after sees every message once, in order"
    );

    // Around 500: half before it, the rest at or after it; then outwards from the edges.
    let walk = async {
        let middle = page(&api, &channel, "around=500", &sent).await;
        assert_eq!(
            middle.seqs,
            (475..=524).collect::<Vec<_>>(),
            "around=500 limit=50: 25 before, 25 at or after"
        );
        assert!(middle.has_before && middle.has_after);
        let mut older: Vec<Page> = Vec::new();
        let mut edge = middle.seqs[0];
        let mut more = middle.has_before;
        while more {
            let p = page(&api, &channel, &format!("before={edge}"), &sent).await;
            (edge, more) = (p.seqs[0], p.has_before);
            older.push(p);
            assert!(older.len() <= 20, "too many pages before the middle");
        }
        let mut newer: Vec<Page> = Vec::new();
        let mut edge = *middle.seqs.last().expect("seq");
        let mut more = middle.has_after;
        while more {
            let p = page(&api, &channel, &format!("after={edge}"), &sent).await;
            (edge, more) = (*p.seqs.last().expect("seq"), p.has_after);
            newer.push(p);
            assert!(newer.len() <= 20, "too many pages after the middle");
        }
        let mut seen: Vec<u64> = older
            .iter()
            .rev()
            .flat_map(|p| p.seqs.iter().copied())
            .collect();
        seen.extend(&middle.seqs);
        seen.extend(newer.iter().flat_map(|p| p.seqs.iter().copied()));
        seen
    };
    let seen = tokio::time::timeout(PHASE, walk)
        .await
        .expect("walk from around");
    assert_eq!(
        seen, all,
        "around 500 extended both ways sees every message once, in order"
    );

    // `around` at the very ends: the flags say there is nothing beyond.
    let first = page(&api, &channel, "around=1", &sent).await;
    assert_eq!(first.seqs[0], 1);
    assert!(!first.has_before && first.has_after);
    let last = page(&api, &channel, &format!("around={TOTAL}"), &sent).await;
    assert_eq!(*last.seqs.last().expect("seq"), TOTAL);
    assert!(last.has_before && !last.has_after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_visits_every_message_once_on_sqlite() {
    paging_visits_every_message_once(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_visits_every_message_once_on_postgres() {
    paging_visits_every_message_once(Backend::Postgres).await;
}
