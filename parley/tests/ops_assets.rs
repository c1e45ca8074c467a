//! The operations assets in `ops/`: the alert rules pass `promtool check rules` and their unit
//! tests (`promtool test rules`), and every metric the rules and the Grafana dashboard name is
//! one the server really exports (scraped from the real binary after a small chat flow, and
//! linted with `promtool check metrics`).

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{Backend, ServerBuilder, Ws, token, unique};
use serde_json::{Value, json};

fn ops_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ops")
}

fn promtool() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "promtool not found: run the tests with scripts/test.sh (it installs it), or \
             apt-get install --no-install-recommends prometheus"
        )
    })
}

fn run_promtool(args: &[&str], stdin: Option<&str>) {
    let mut child = Command::new(promtool())
        .args(args)
        .current_dir(ops_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .expect("write to promtool");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    run_promtool(&["check", "rules", "alerts.yml"], None);
    run_promtool(&["test", "rules", "alerts.test.yml"], None);
}

/// Metric names (`parley_*`, `process_*`) in a PromQL expression, histogram suffixes removed.
fn metric_names(expr: &str, out: &mut BTreeSet<String>) {
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
            continue;
        }
        if (word.starts_with("parley_") || word.starts_with("process_")) && !word.contains(':') {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| word.strip_suffix(s))
                .unwrap_or(&word);
            out.insert(base.to_owned());
        }
        word.clear();
    }
}

fn referenced_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(ops_dir().join("grafana-dashboard.json")).expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            metric_names(t["expr"].as_str().expect("expr"), &mut names);
        }
    }
    let rules = std::fs::read_to_string(ops_dir().join("alerts.yml")).expect("rules");
    for line in rules.lines() {
        if !line.trim_start().starts_with('#') {
            metric_names(line, &mut names);
        }
    }
    names
}

#[tokio::test]
async fn every_metric_of_the_dashboard_and_rules_is_exported() {
    let referenced = referenced_metrics();
    assert!(referenced.len() > 20, "{referenced:?}");
    let server = ServerBuilder::new(Backend::Sqlite)
        .arg("--ws-frame-burst")
        .arg("3")
        .start();
    // A small flow that touches the labelled and histogram series.
    let (alice, bob) = (unique("alice"), unique("bob"));
    let channel = server.api(&alice).create_channel("ops", &[&bob]).await;
    let mut bob_ws = Ws::connect(&server, &token(&bob)).await;
    bob_ws.subscribe(&channel).await;
    let mut alice_ws = Ws::connect(&server, &token(&alice)).await;
    let ack = alice_ws
        .request(json!({ "type": "message.send", "channel_id": channel,
            "client_msg_id": "ops-1", "text": "hello" }))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    bob_ws.next_event().await;
    let mut flood = Ws::connect(&server, &token(&unique("flood"))).await;
    for i in 0..5 {
        flood
            .send_json(json!({ "type": "ping", "id": format!("p{i}") }))
            .await;
    }
    for _ in 0..5 {
        flood.next_json().await.expect("answer");
    }
    assert!(
        Ws::connect_raw(&server, &["parley.v1", "parley.auth.bad"])
            .await
            .is_err()
    );
    bob_ws.stream.close(None).await.expect("close");
    drop(bob_ws);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Readiness gauges: evaluated on every /readyz (and every 5 s).
    let ready = reqwest::get(server.url("/readyz")).await.expect("readyz");
    assert_eq!(ready.status(), 200);

    let text = reqwest::get(server.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let missing: Vec<&String> = referenced.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "named in ops/ but not exported by the server: {missing:?}\nexported: {exported:?}"
    );
    // The exposition itself passes promtool's lint (help text, naming, histogram buckets).
    run_promtool(&["check", "metrics"], Some(&text));
}
