//! The edge's metrics: one small function per thing measured, so call sites are one line.
//!
//! Recorded through the `metrics` facade; with no recorder installed (unit tests, embedders that
//! want none) every call is a no-op. The binary installs the Prometheus recorder and serves
//! `/metrics`. Labels only ever take values from fixed sets (frame types, close codes, refusal
//! reasons): never a user, channel or connection id, so the number of series stays bounded.

use std::time::Instant;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use parley_proto::{ChannelEvent, CloseCode, ErrorCode, EventBody, Principal};

/// The transport label of WebSocket connections.
const WS: &str = "websocket";

/// Help text for every metric of the edge (shown by `/metrics`).
pub fn describe() {
    describe_gauge!(
        "parley_connections",
        "Authenticated client connections open on this node, by transport."
    );
    describe_counter!(
        "parley_connections_opened_total",
        "Client connections authenticated on this node, by transport."
    );
    describe_counter!(
        "parley_connections_closed_total",
        "Client connections ended, by transport and close code (code \"none\": the peer went away without a close frame)."
    );
    describe_counter!(
        "parley_auth_failures_total",
        "Refused authentications of WebSocket connections (auth frame or subprotocol token)."
    );
    describe_counter!(
        "parley_upgrades_refused_total",
        "WebSocket upgrades refused before a connection opened, by reason."
    );
    describe_counter!(
        "parley_ws_frames_in_total",
        "WebSocket frames received from clients, by frame type (\"invalid\": not a known frame)."
    );
    describe_counter!(
        "parley_ws_frames_out_total",
        "WebSocket frames sent to clients, by frame type."
    );
    describe_counter!(
        "parley_ws_sends_total",
        "message.send requests answered, by result (ok or the error code)."
    );
    describe_histogram!(
        "parley_ws_send_ack_seconds",
        metrics::Unit::Seconds,
        "Time from a message.send frame's arrival to its ack or error being queued (includes the durable commit)."
    );
    describe_histogram!(
        "parley_fanout_seconds",
        metrics::Unit::Seconds,
        "Time from a message's commit to its event being queued for the local subscribers, one sample per event and node."
    );
    describe_histogram!(
        "parley_bus_receive_lag_seconds",
        metrics::Unit::Seconds,
        "Time from a message's commit to this node receiving its event from the bus (subscription lag)."
    );
    describe_counter!(
        "parley_bus_resyncs_total",
        "Times the bus subscription may have lost events (lag, reconnect) and every hub re-read from storage."
    );
    describe_counter!(
        "parley_bus_events_received_total",
        "Persisted channel events this node received from the bus (only channels with local subscribers)."
    );
    describe_gauge!(
        "parley_bus_subscriptions",
        "NATS subscriptions this node holds, by kind: channel (one channel), channel_bucket (every channel of one of 256 buckets), user_bucket (every user of one of 256 buckets)."
    );
    describe_counter!(
        "parley_bus_bucket_switches_total",
        "Buckets of channels that changed form, by the form taken: whole (one wildcard subscription, beyond --nats-channel-exact-max local channels) or exact (one subscription per channel)."
    );
    describe_counter!(
        "parley_bus_dropped_no_interest_total",
        "Channel messages received from the bus for a channel without local subscribers (a whole bucket brings every channel of it), dropped before decoding, by kind (event or ephemeral)."
    );
    describe_counter!(
        "parley_bus_duplicates_dropped_total",
        "Channel ephemerals received twice while a bucket changed form (both forms subscribed for a moment), dropped."
    );
    describe_counter!(
        "parley_bus_ephemerals_received_total",
        "Ephemeral events (typing, presence, receipts, user-targeted) this node received from the bus."
    );
    describe_counter!(
        "parley_membership_cache_lookups_total",
        "Membership answers looked up in the edge's cache, by result (hit: answered without asking the core)."
    );
    describe_gauge!(
        "parley_bus_topics",
        "Bus topics this node subscribes to, by kind (channel: a channel with local subscribers; user: a user with local connections)."
    );
    describe_histogram!(
        "parley_ws_send_queue_depth",
        "Frames waiting in a connection's send queue when its writer takes the next batch."
    );
    describe_counter!(
        "parley_slow_consumer_closes_total",
        "Connections closed because their send queue was full (4009)."
    );
    describe_counter!(
        "parley_rate_limited_total",
        "Requests refused by a rate limit, by limit."
    );
    describe_gauge!(
        "parley_calls_active",
        "Calls with at least one participant attached to a connection of this node."
    );
    describe_gauge!(
        "parley_call_participants",
        "Call participants attached to connections of this node."
    );
    describe_counter!(
        "parley_unread_lookups_total",
        "Unread counts read from the core because a connection could not follow them from the events it received (the first change after a subscribe, a resume, a read older than what it remembers)."
    );
}

/// Registers the series an alert or dashboard reads at 0, so they exist before their first
/// event.
pub fn init() {
    gauge!("parley_connections", "transport" => WS).increment(0.0);
    counter!("parley_slow_consumer_closes_total").absolute(0);
    counter!("parley_bus_resyncs_total").absolute(0);
    counter!("parley_bus_events_received_total").absolute(0);
    counter!("parley_bus_ephemerals_received_total").absolute(0);
    gauge!("parley_bus_topics", "kind" => "channel").increment(0.0);
    counter!("parley_membership_cache_lookups_total", "result" => "hit").absolute(0);
    counter!("parley_membership_cache_lookups_total", "result" => "miss").absolute(0);
    gauge!("parley_bus_topics", "kind" => "user").increment(0.0);
    gauge!("parley_calls_active").set(0.0);
    gauge!("parley_call_participants").set(0.0);
    counter!("parley_unread_lookups_total").absolute(0);
}

/// A connection authenticated (pair with [`connection_closed`]).
pub fn connection_opened(p: &Principal, session_id: &str) {
    gauge!("parley_connections", "transport" => WS).increment(1.0);
    counter!("parley_connections_opened_total", "transport" => WS).increment(1);
    tracing::info!(
        transport = WS,
        session_id,
        tenant = %p.tenant_id,
        user = %p.user_id,
        "connection opened"
    );
}

/// An authenticated connection ended with `code` (`None`: the peer closed or went away and
/// the server sent no code of its own).
pub fn connection_closed(p: &Principal, session_id: &str, code: Option<CloseCode>) {
    gauge!("parley_connections", "transport" => WS).decrement(1.0);
    let label = code.map(close_label).unwrap_or("none");
    counter!("parley_connections_closed_total", "transport" => WS, "code" => label).increment(1);
    let reason = code
        .map(|c| c.reason())
        .unwrap_or("closed by the client or the network");
    match code {
        Some(CloseCode::SlowConsumer) => {
            counter!("parley_slow_consumer_closes_total").increment(1);
            tracing::warn!(transport = WS, session_id, tenant = %p.tenant_id, user = %p.user_id,
                close_code = label, reason, "connection closed: slow consumer");
        }
        Some(CloseCode::RateLimitFlood) => {
            counter!("parley_rate_limited_total", "limit" => "ws_frame_flood").increment(1);
            tracing::warn!(transport = WS, session_id, tenant = %p.tenant_id, user = %p.user_id,
                close_code = label, reason, "connection closed: frame flood");
        }
        _ => tracing::info!(transport = WS, session_id, tenant = %p.tenant_id, user = %p.user_id,
            close_code = label, reason, "connection closed"),
    }
}

/// A WebSocket `auth` frame was refused (logged with its code; never the token).
pub fn auth_failed(code: ErrorCode) {
    counter!("parley_auth_failures_total", "transport" => WS).increment(1);
    tracing::info!(transport = WS, code = %code, "authentication failed");
}

/// The close code as a label (a fixed set: the protocol's close codes).
fn close_label(code: CloseCode) -> &'static str {
    match code.code() {
        1000 => "1000",
        1001 => "1001",
        1002 => "1002",
        1007 => "1007",
        1008 => "1008",
        1009 => "1009",
        1011 => "1011",
        4000 => "4000",
        4001 => "4001",
        4002 => "4002",
        4003 => "4003",
        4004 => "4004",
        4005 => "4005",
        4006 => "4006",
        4007 => "4007",
        4008 => "4008",
        4009 => "4009",
        4010 => "4010",
        _ => "other",
    }
}

/// A WebSocket upgrade was refused; `reason` is one of a fixed set (origin, subprotocol, auth,
/// node_full, address_full, auth_failures, draining).
pub fn upgrade_refused(reason: &'static str) {
    counter!("parley_upgrades_refused_total", "reason" => reason).increment(1);
    if reason == "auth" {
        counter!("parley_auth_failures_total", "transport" => WS).increment(1);
    }
    if reason == "address_full" {
        counter!("parley_rate_limited_total", "limit" => "ws_connections_per_ip").increment(1);
    }
    if reason == "auth_failures" {
        counter!("parley_rate_limited_total", "limit" => "auth_failures_per_ip").increment(1);
    }
}

/// A WS frame was read, by its `type` (`"invalid"` when it could not be parsed).
pub fn frame_in_type(kind: &'static str) {
    counter!("parley_ws_frames_in_total", "type" => kind).increment(1);
}

/// A WS frame was refused by the per-connection frame budget.
pub fn frame_rate_limited() {
    counter!("parley_rate_limited_total", "limit" => "ws_frames").increment(1);
}

/// Server frame types, the label values of `parley_ws_frames_out_total`.
const OUT_TYPES: &[&str] = &[
    "welcome",
    "ack",
    "error",
    "pong",
    "presence.changed",
    "presence.batch",
    "typing",
    "read.updated",
    "unread.updated",
    "channel.added",
    "call.signal",
    "call.participant_reconnecting",
    "call.participant_reconnected",
    "message.new",
    "message.updated",
    "message.deleted",
    "member.added",
    "member.removed",
    "member.updated",
    "channel.updated",
    "channel.deleted",
    "call.started",
    "call.ended",
    "call.participant_joined",
    "call.participant_left",
    "reconnect",
];

/// A serialized server frame is being written. Its type is read from the JSON, where the server
/// writes `"type"` ahead of any client-supplied text (frames put it first, events after their
/// channel id and seq); a type outside the known set counts as `other`.
pub fn frame_out(json: &str) {
    // Once per frame written, so once per delivery: the handles are looked up in the recorder
    // once (after it is installed, at the first frame), not hashed into its registry each time.
    static COUNTERS: std::sync::OnceLock<Vec<metrics::Counter>> = std::sync::OnceLock::new();
    let counters = COUNTERS.get_or_init(|| {
        OUT_TYPES
            .iter()
            .chain(std::iter::once(&"other"))
            .map(|t| counter!("parley_ws_frames_out_total", "type" => *t))
            .collect()
    });
    counters[frame_type_index(json)].increment(1);
}

#[cfg(test)]
fn frame_type(json: &str) -> &'static str {
    OUT_TYPES
        .get(frame_type_index(json))
        .copied()
        .unwrap_or("other")
}

/// The position of the frame's type in [`OUT_TYPES`], or its length for `other`.
fn frame_type_index(json: &str) -> usize {
    const KEY: &str = "\"type\":\"";
    let head = &json.as_bytes()[..json.len().min(256)];
    let Some(at) = head.windows(KEY.len()).position(|w| w == KEY.as_bytes()) else {
        return OUT_TYPES.len();
    };
    let rest = &json[at + KEY.len()..];
    let name = rest.split('"').next().unwrap_or("");
    OUT_TYPES
        .iter()
        .position(|t| *t == name)
        .unwrap_or(OUT_TYPES.len())
}

/// A message.send was answered; `error` is the error code's name, if it failed.
pub fn send_answered(started: Instant, error: Option<&'static str>) {
    counter!("parley_ws_sends_total", "result" => error.unwrap_or("ok")).increment(1);
    histogram!("parley_ws_send_ack_seconds").record(started.elapsed().as_secs_f64());
}

/// The commit time of an event, in milliseconds since the Unix epoch, when it carries one
/// (`message.new`: the message's `created_at`).
pub fn commit_time_ms(ev: &ChannelEvent) -> Option<i64> {
    let EventBody::MessageNew { message } = &ev.body else {
        return None;
    };
    let t = time::OffsetDateTime::parse(
        &message.created_at,
        &time::format_description::well_known::Rfc3339,
    )
    .ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

fn seconds_since(commit_ms: i64) -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    (now - commit_ms).max(0) as f64 / 1000.0
}

/// An event arrived from the bus.
pub fn bus_received(ev: &ChannelEvent) {
    if let Some(ms) = commit_time_ms(ev) {
        histogram!("parley_bus_receive_lag_seconds").record(seconds_since(ms));
    }
}

/// A connection read its unread count of a channel from the core.
pub fn unread_lookup() {
    counter!("parley_unread_lookups_total").increment(1);
}

/// A membership answer was looked up in the edge's cache.
pub fn membership_lookup(hit: bool) {
    let result = if hit { "hit" } else { "miss" };
    counter!("parley_membership_cache_lookups_total", "result" => result).increment(1);
}

/// A persisted event arrived from the bus.
pub fn bus_event_received() {
    counter!("parley_bus_events_received_total").increment(1);
}

/// An ephemeral event arrived from the bus.
pub fn bus_ephemeral_received() {
    counter!("parley_bus_ephemerals_received_total").increment(1);
}

/// The node took (`+1`) or dropped (`-1`) a bus topic.
pub fn interest_changed(topic: &parley_sync::Topic, by: f64) {
    let kind = match topic {
        parley_sync::Topic::Channel(_) => "channel",
        parley_sync::Topic::User { .. } => "user",
    };
    gauge!("parley_bus_topics", "kind" => kind).increment(by);
}

/// The bus asked for a resync (events may have been lost).
pub fn bus_resync() {
    counter!("parley_bus_resyncs_total").increment(1);
}

/// An event committed at `commit_ms` was queued for `copies` local subscribers: one sample per
/// event and node (not per copy: the copies are queued in one pass, at the same time, and a
/// sample per delivery cost a histogram write per delivery).
pub fn fanned_out(commit_ms: Option<i64>, copies: usize) {
    if let Some(ms) = commit_ms
        && copies > 0
    {
        histogram!("parley_fanout_seconds").record(seconds_since(ms));
    }
}

/// A connection's writer found `depth` frames queued.
pub fn send_queue_depth(depth: usize) {
    histogram!("parley_ws_send_queue_depth").record(depth as f64);
}

/// The calls with a participant on this node, and those participants.
pub fn calls_on_node(calls: usize, participants: usize) {
    gauge!("parley_calls_active").set(calls as f64);
    gauge!("parley_call_participants").set(participants as f64);
}

#[cfg(test)]
mod tests {
    use super::frame_type;

    #[test]
    fn frame_types_are_read_from_the_json_and_bounded() {
        assert_eq!(frame_type(r#"{"type":"ack","id":"1"}"#), "ack");
        assert_eq!(
            frame_type(r#"{"channel_id":"ch_1","seq":3,"type":"message.new","message":{}}"#),
            "message.new"
        );
        assert_eq!(frame_type(r#"{"type":"made.up"}"#), "other");
        assert_eq!(frame_type("not json"), "other");
    }
}
