//! `/healthz` (liveness) and `/readyz` (readiness).
//!
//! `/readyz` answers 200 only when the node can do its work: the storage answers a read, the
//! NATS bus (when configured) is connected, Redis (when configured) answers a PING, and the node
//! is not draining. Otherwise 503, naming what fails. One line of text, for people and probes:
//!
//! ```text
//! ready storage=ok nats=ok redis=ok connections=12
//! not ready storage=ok nats=unreachable redis=ok connections=12
//! not ready draining storage=ok connections=3
//! ```
//!
//! The reasons go to the log (at warn, once per change), never into the answer.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use parley_core::presence_store::PresenceStore;
use parley_core::storage::Storage;
use parley_edge::Edge;
use parley_sync::Bus;

/// How long one dependency may take to answer a readiness check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What readiness looks at.
pub struct Readiness {
    /// None on an edge (`--role edge`), which has no storage or presence store of its own.
    pub storage: Option<Arc<dyn Storage>>,
    pub bus: Arc<dyn Bus>,
    pub presence: Option<Arc<dyn PresenceStore>>,
    pub edge: Arc<Edge>,
    /// The last answer's failing components, to log changes once.
    last_failing: std::sync::Mutex<Vec<&'static str>>,
}

impl Readiness {
    pub fn new(
        storage: Option<Arc<dyn Storage>>,
        bus: Arc<dyn Bus>,
        presence: Option<Arc<dyn PresenceStore>>,
        edge: Arc<Edge>,
    ) -> Readiness {
        Readiness {
            storage,
            bus,
            presence,
            edge,
            last_failing: Default::default(),
        }
    }

    /// Checks every dependency at once and answers.
    pub async fn answer(&self) -> Response {
        let (ready, line) = self.evaluate().await;
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (status, line).into_response()
    }

    /// Evaluates readiness every `every`, so `parley_ready` and `parley_dependency_up` are
    /// current for Prometheus without a probe calling `/readyz`.
    pub fn spawn_probe(self: Arc<Self>, every: Duration) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                self.evaluate().await;
            }
        });
    }

    /// Whether the node is ready, and the line that says so; updates the readiness gauges.
    async fn evaluate(&self) -> (bool, String) {
        let storage = async {
            let Some(storage) = &self.storage else {
                return Ok(());
            };
            match tokio::time::timeout(CHECK_TIMEOUT, storage.channel("readyz", "ch_readyz")).await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
            }
        };
        let presence = async {
            let Some(presence) = &self.presence else {
                return Ok(());
            };
            match tokio::time::timeout(CHECK_TIMEOUT, presence.check()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.0),
                Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
            }
        };
        let (storage, presence) = tokio::join!(storage, presence);
        let bus = self.bus.check().map_err(|e| e.to_string());

        let mut parts: Vec<(&'static str, Result<(), String>)> = Vec::new();
        if self.storage.is_some() {
            parts.push(("storage", storage));
        }
        if self.bus.kind() == "nats" {
            parts.push(("nats", bus));
        }
        if self.presence.as_ref().is_some_and(|p| p.kind() == "redis") {
            parts.push(("redis", presence));
        }
        let draining = self.edge.is_draining();
        let failing: Vec<&'static str> = parts
            .iter()
            .filter(|(_, r)| r.is_err())
            .map(|(n, _)| *n)
            .collect();
        self.log_changes(&parts, &failing);
        let ready = failing.is_empty() && !draining;
        let mut line = String::from(if ready { "ready" } else { "not ready" });
        if draining {
            line.push_str(" draining");
        }
        for (name, r) in &parts {
            line.push_str(&format!(
                " {name}={}",
                if r.is_ok() { "ok" } else { "unreachable" }
            ));
        }
        line.push_str(&format!(" connections={}", self.edge.connection_count()));
        metrics::gauge!("parley_ready").set(if ready { 1.0 } else { 0.0 });
        metrics::gauge!("parley_draining").set(if draining { 1.0 } else { 0.0 });
        for (name, r) in &parts {
            metrics::gauge!("parley_dependency_up", "dependency" => *name).set(if r.is_ok() {
                1.0
            } else {
                0.0
            });
        }
        (ready, line)
    }

    /// Help text of the readiness gauges.
    pub fn describe() {
        metrics::describe_gauge!(
            "parley_ready",
            "1 while /readyz would answer 200 (dependencies reachable, not draining), else 0."
        );
        metrics::describe_gauge!(
            "parley_draining",
            "1 while the node drains (after SIGTERM)."
        );
        metrics::describe_gauge!(
            "parley_dependency_up",
            "1 while a configured dependency (storage, nats, redis) answers, else 0."
        );
    }

    fn log_changes(&self, parts: &[(&'static str, Result<(), String>)], failing: &[&'static str]) {
        let mut last = self.last_failing.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_slice() == failing {
            return;
        }
        for (name, r) in parts {
            match r {
                Err(e) if !last.contains(name) => {
                    tracing::warn!(component = name, error = %e, "not ready: dependency unreachable")
                }
                Ok(()) if last.contains(name) => {
                    tracing::info!(component = name, "dependency reachable again")
                }
                _ => {}
            }
        }
        *last = failing.to_vec();
    }
}
