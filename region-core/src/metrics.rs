//! The region core's metrics: one small function per thing measured, so call sites are one line.
//!
//! Recorded through the `metrics` facade (a no-op until the binary installs its Prometheus
//! recorder). Label values come from fixed sets (storage engine, bus kind, presence status,
//! limit name): never a user, channel or tenant id.

use std::time::Duration;

use metrics::{Unit, counter, describe_counter, describe_histogram, histogram};

/// Help text for every metric of the region core.
pub fn describe() {
    describe_histogram!(
        "parley_storage_batch_size",
        "Writes committed together in one storage transaction (group commit), by engine."
    );
    describe_histogram!(
        "parley_storage_commit_seconds",
        Unit::Seconds,
        "Time to commit one batch of writes durably (SQLite: until the WAL is synced), by engine."
    );
    describe_counter!(
        "parley_storage_batch_failures_total",
        "Storage batches whose commit failed, by engine."
    );
    describe_counter!(
        "parley_storage_fast_batches_total",
        "PostgreSQL send batches sent in one message, by result: committed, or fell_back (rolled \
         back and sent through the two-round-trip path)."
    );
    describe_counter!(
        "parley_bus_publish_failures_total",
        "Committed events the bus refused to publish (receivers fill the gap from storage), by bus."
    );
    describe_counter!(
        "parley_bus_published_total",
        "Committed events published on the bus, by bus."
    );
    describe_counter!(
        "parley_presence_transitions_total",
        "Presence changes announced to channels, by new status."
    );
}

/// Registers the counters an alert or dashboard reads at 0, so they exist before their first
/// event.
pub fn init(engine: &'static str, bus: &'static str) {
    counter!("parley_storage_batch_failures_total", "engine" => engine).absolute(0);
    counter!("parley_bus_publish_failures_total", "bus" => bus).absolute(0);
    counter!("parley_bus_published_total", "bus" => bus).absolute(0);
}

/// A batch of `size` writes was settled (committed, or failed and answered) after `elapsed`.
pub fn storage_batch(engine: &'static str, size: usize, elapsed: Duration) {
    histogram!("parley_storage_batch_size", "engine" => engine).record(size as f64);
    histogram!("parley_storage_commit_seconds", "engine" => engine).record(elapsed.as_secs_f64());
}

/// A batch's commit failed.
pub fn storage_batch_failed(engine: &'static str) {
    counter!("parley_storage_batch_failures_total", "engine" => engine).increment(1);
}

/// A PostgreSQL send batch went in one message (`committed`) or was rolled back and sent
/// through the two-round-trip path.
pub fn storage_fast_batch(committed: bool) {
    let result = if committed { "committed" } else { "fell_back" };
    counter!("parley_storage_fast_batches_total", "result" => result).increment(1);
}

/// An event was published on the bus (`ok`) or the bus refused it.
pub fn bus_publish(bus: &'static str, ok: bool) {
    if ok {
        counter!("parley_bus_published_total", "bus" => bus).increment(1);
    } else {
        counter!("parley_bus_publish_failures_total", "bus" => bus).increment(1);
    }
}

/// A user's presence changed to `status` (online, away, offline).
pub fn presence_transition(status: &'static str) {
    counter!("parley_presence_transitions_total", "status" => status).increment(1);
}

/// A REST request was refused by a per-address budget: `auth_failures_per_ip` (requests without
/// a valid token) or `dev_token_per_ip` (development tokens).
pub fn address_rate_limited(limit: &'static str) {
    counter!("parley_rate_limited_total", "limit" => limit).increment(1);
}

/// A REST request was refused by the per-user request budget.
pub fn rest_rate_limited() {
    counter!("parley_rate_limited_total", "limit" => "rest_user").increment(1);
}
