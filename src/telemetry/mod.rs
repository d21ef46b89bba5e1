//! Logs and metrics. Owns the metric names (one place, so `docs/metrics.md` and the
//! code cannot drift apart), the Prometheus recorder and the log subscriber. Calls
//! nothing else in the crate.

pub mod health;
pub mod throttle;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Metric names. Labels are bounded: routes and reasons are fixed sets, sources are
/// the configured ones.
pub mod metric {
    /// HTTP requests by `route` and `status` (counter).
    pub const HTTP_REQUESTS: &str = "breakwater_http_requests_total";
    /// Time from request start to response, by `route` (histogram, seconds).
    pub const HTTP_REQUEST_DURATION: &str = "breakwater_http_request_duration_seconds";
    /// Requests refused as a whole, by `reason` (counter).
    pub const REQUESTS_REFUSED: &str = "breakwater_requests_refused_total";
    /// Open HTTP connections, WebSocket included (gauge).
    pub const HTTP_CONNECTIONS: &str = "breakwater_http_connections";
    /// Connections refused because `server.max_connections` were open (counter).
    pub const HTTP_CONNECTIONS_REFUSED: &str = "breakwater_http_connections_refused_total";
    /// TLS handshakes that failed or did not finish within the header timeout (counter).
    pub const TLS_HANDSHAKE_FAILURES: &str = "breakwater_tls_handshake_failures_total";
    /// Requests refused with 429 because their source was over its rate limit, by `source` (counter).
    pub const REQUESTS_RATE_LIMITED: &str = "breakwater_requests_rate_limited_total";
    /// Requests being processed now (gauge).
    pub const REQUESTS_IN_FLIGHT: &str = "breakwater_requests_in_flight";
    /// Events by `source`, `transport` and `outcome` = accepted | duplicate | rejected.
    pub const EVENTS: &str = "breakwater_events_total";
    /// Events refused one by one, by `source` and `reason` (counter).
    pub const EVENTS_REJECTED: &str = "breakwater_events_rejected_total";
    /// Events made durable by a sink, by `sink` (counter).
    pub const SINK_EVENTS_SENT: &str = "breakwater_sink_events_sent_total";
    /// Events left out of a sink's write because the sink wrote them for an earlier
    /// request that then failed (its resend), by `sink` (counter; `sinks/unsettled.rs`).
    pub const SINK_UNSETTLED_LEFT_OUT_EVENTS: &str = "breakwater_sink_unsettled_left_out_events_total";
    pub const SPOOL_WRITES_PAST_DEADLINE: &str = "breakwater_spool_writes_past_deadline_total";
    pub const SPOOL_WRITES_DECIDED_LATE: &str = "breakwater_spool_writes_decided_late_total";
    /// INSERTs made to find the events of a refused group (counter; `clickhouse/inserter.rs`).
    pub const CLICKHOUSE_BISECTED_INSERTS: &str = "breakwater_clickhouse_bisected_inserts_total";
    /// The memory budget (gauge, bytes; `pipeline/budget.rs`).
    pub const MEMORY_BUDGET_BYTES: &str = "breakwater_memory_budget_bytes";
    /// Bytes held in it by requests, frames and replay rounds (gauge).
    pub const MEMORY_BUDGET_HELD_BYTES: &str = "breakwater_memory_budget_held_bytes";
    /// Sink write failures, by `sink` and `kind` (counter).
    pub const SINK_ERRORS: &str = "breakwater_sink_errors_total";
    /// fsync duration of the file sink (histogram, seconds).
    pub const FILE_SINK_FSYNC_DURATION: &str = "breakwater_file_sink_fsync_duration_seconds";
    /// Requests served by one fsync of the file sink (histogram).
    pub const FILE_SINK_REQUESTS_PER_FSYNC: &str = "breakwater_file_sink_requests_per_fsync";
    /// Bytes written by the file sink (counter).
    pub const FILE_SINK_BYTES: &str = "breakwater_file_sink_written_bytes_total";
    /// File sink rotations to a new file (counter).
    pub const FILE_SINK_ROTATIONS: &str = "breakwater_file_sink_rotations_total";
    /// Ids remembered by the embedded dedup (gauge).
    pub const DEDUP_ENTRIES: &str = "breakwater_dedup_entries";
    /// Ids forgotten before their window ended because of the entry bound (counter).
    pub const DEDUP_EVICTED_EARLY: &str = "breakwater_dedup_evicted_early_total";
    /// Requests that waited for another in-flight request carrying the same id (counter).
    pub const DEDUP_WAITS: &str = "breakwater_dedup_waits_total";
    /// Redis round trips, by `operation` = claim | commit | release (counter).
    pub const REDIS_ROUND_TRIPS: &str = "breakwater_redis_round_trips_total";
    /// Failed Redis round trips, by `operation` (counter).
    pub const REDIS_ERRORS: &str = "breakwater_redis_errors_total";
    /// Requests whose Redis claims expired before their commit (counter): another
    /// request may have delivered the same ids; `redis.pending_ttl_ms` is too short.
    pub const DEDUP_CLAIMS_EXPIRED: &str = "breakwater_dedup_claims_expired_total";
    /// Requests delivered without the shared (Redis) dedup because Redis failed (counter).
    pub const DEDUP_FAIL_OPEN: &str = "breakwater_dedup_fail_open_total";
    /// Events per ClickHouse INSERT (histogram).
    pub const CLICKHOUSE_EVENTS_PER_INSERT: &str = "breakwater_clickhouse_events_per_insert";
    /// ClickHouse INSERT duration (histogram, seconds).
    pub const CLICKHOUSE_INSERT_DURATION: &str = "breakwater_clickhouse_insert_duration_seconds";
    /// Events of INSERTs of unknown outcome (timed out, connection lost mid-INSERT)
    /// remembered for a lookup before they are inserted again (counter).
    pub const CLICKHOUSE_IN_DOUBT_EVENTS: &str = "breakwater_clickhouse_in_doubt_events_total";
    /// Events of unknown outcome found in the table by that lookup and not inserted
    /// again (counter).
    pub const CLICKHOUSE_IN_DOUBT_FOUND_EVENTS: &str = "breakwater_clickhouse_in_doubt_found_events_total";
    /// Kafka client errors reported by librdkafka, by `code` (counter).
    pub const KAFKA_CLIENT_ERRORS: &str = "breakwater_kafka_client_errors_total";
    /// Kafka producers replaced because they were stuck, by `reason` = fatal | refused (counter).
    pub const KAFKA_PRODUCER_RENEWALS: &str = "breakwater_kafka_producer_renewals_total";
    /// 1 while librdkafka reports all brokers down (gauge).
    /// Events whose Kafka delivery failed after librdkafka had them (counter).
    pub const KAFKA_UNKNOWN_OUTCOME_EVENTS: &str = "breakwater_kafka_unknown_outcome_events_total";
    /// Events of unknown outcome found in the topic and left out of a replay (counter).
    pub const KAFKA_READ_BACK_FOUND_EVENTS: &str = "breakwater_kafka_read_back_found_events_total";
    /// Events of unknown outcome replayed without a read-back (counter).
    pub const KAFKA_READ_BACK_UNVERIFIED_EVENTS: &str = "breakwater_kafka_read_back_unverified_events_total";
    pub const KAFKA_ALL_BROKERS_DOWN: &str = "breakwater_kafka_all_brokers_down";
    /// Sink delivery duration per request, by `sink` (histogram, seconds).
    pub const SINK_DELIVERY_DURATION: &str = "breakwater_sink_delivery_duration_seconds";
    /// Policy reloads by `result` = applied | invalid (counter).
    pub const POLICY_RELOADS: &str = "breakwater_policy_reloads_total";
    /// Circuit breaker state by `dependency`: 0 closed, 1 open, 2 half-open (gauge).
    pub const CIRCUIT_BREAKER_STATE: &str = "breakwater_circuit_breaker_state";
    /// Breaker transitions by `dependency` and `to` (counter).
    pub const CIRCUIT_BREAKER_TRANSITIONS: &str = "breakwater_circuit_breaker_transitions_total";
    /// Retries by `dependency` (counter).
    pub const RETRIES: &str = "breakwater_retries_total";
    /// Calls refused by a rate limit or a full bulkhead, by `dependency` and `by` (counter).
    pub const CALLS_SHED: &str = "breakwater_calls_shed_total";
    /// Events appended to a sink's spool, by `sink` (counter).
    pub const SPOOL_APPENDED_EVENTS: &str = "breakwater_spool_appended_events_total";
    /// Events replayed from a sink's spool and acknowledged, by `sink` (counter).
    pub const SPOOL_REPLAYED_EVENTS: &str = "breakwater_spool_replayed_events_total";
    /// Events waiting in a sink's spool (gauge).
    pub const SPOOL_EVENTS: &str = "breakwater_spool_events";
    /// Bytes held by a sink's spool (gauge).
    pub const SPOOL_BYTES: &str = "breakwater_spool_bytes";
    /// Age of the oldest record in a sink's spool (gauge, seconds).
    pub const SPOOL_OLDEST_AGE: &str = "breakwater_spool_oldest_age_seconds";
    /// Requests refused because a spool was full, by `sink` (counter).
    pub const SPOOL_FULL: &str = "breakwater_spool_full_total";
    /// Spool records that failed their checksum and were quarantined (counter).
    pub const SPOOL_QUARANTINED: &str = "breakwater_spool_quarantined_records_total";
    /// Spool operations that failed with an I/O error, closing the file (counter).
    pub const SPOOL_IO_ERRORS: &str = "breakwater_spool_io_errors_total";
    /// Times the spool file was opened again after an I/O error (counter).
    pub const SPOOL_REOPENED: &str = "breakwater_spool_reopened_total";
    /// Events in the dead-letter store, by `sink` (counter of additions).
    pub const DEAD_LETTER_EVENTS: &str = "breakwater_dead_letter_events_total";
    /// Events refused by a full dead-letter store, by `sink` (counter).
    pub const DEAD_LETTER_REFUSED_EVENTS: &str = "breakwater_dead_letter_refused_events_total";
    /// Bytes of the dead letters stored (gauge).
    pub const DEAD_LETTER_BYTES: &str = "breakwater_dead_letter_bytes";
    /// Open WebSocket connections (gauge).
    pub const WS_CONNECTIONS: &str = "breakwater_websocket_connections";
    /// WebSocket upgrades refused, by `reason` (counter).
    pub const WS_REFUSED: &str = "breakwater_websocket_connections_refused_total";
    /// WebSocket connections closed, by `reason` (counter).
    pub const WS_CLOSED: &str = "breakwater_websocket_connections_closed_total";
    /// WebSocket frames answered, by `outcome` = ack | nack (counter).
    pub const WS_FRAMES: &str = "breakwater_websocket_frames_total";
    /// Time from reading a frame to sending its answer (histogram, seconds).
    pub const WS_ACK_DURATION: &str = "breakwater_websocket_ack_duration_seconds";
    /// Refused events written to the rejected store (counter).
    pub const REJECTED_STORE_WRITTEN: &str = "breakwater_rejected_store_written_total";
    /// Rejected-store bytes discarded by rotation, oldest first (counter).
    pub const REJECTED_STORE_DISCARDED_BYTES: &str = "breakwater_rejected_store_discarded_bytes_total";
    /// Rejected-store write failures (counter).
    pub const REJECTED_STORE_ERRORS: &str = "breakwater_rejected_store_errors_total";
    /// Always 1, with the `version` label (gauge).
    pub const BUILD_INFO: &str = "breakwater_build_info";
}

/// Latency buckets in seconds: 0.5 ms to 30 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
const EVENT_COUNT_BUCKETS: &[f64] = &[1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0];

/// Installs the process-wide Prometheus recorder and returns the handle `/metrics`
/// renders from.
pub fn install_metrics() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(metric::FILE_SINK_REQUESTS_PER_FSYNC.into()),
                COUNT_BUCKETS,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(metric::CLICKHOUSE_EVENTS_PER_INSERT.into()),
                EVENT_COUNT_BUCKETS,
            )
        })
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe_metrics();
    metrics::gauge!(metric::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

/// HELP text for every metric, shown on `/metrics`.
fn describe_metrics() {
    describe_intake();
    describe_sinks();
    describe_spool();
    describe_dependencies();
}

/// HTTP, WebSocket, events and the rejected store.
fn describe_intake() {
    use metric::*;
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(HTTP_REQUESTS, "HTTP requests by route and status.");
    describe_histogram!(
        HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "Time from request start to response, by route."
    );
    describe_counter!(REQUESTS_REFUSED, "Requests refused as a whole, by reason.");
    describe_gauge!(HTTP_CONNECTIONS, "Open HTTP connections, WebSocket included.");
    describe_counter!(
        HTTP_CONNECTIONS_REFUSED,
        "Connections refused with 503 because server.max_connections were open."
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "TLS handshakes that failed or did not finish within the header timeout."
    );
    describe_counter!(
        REQUESTS_RATE_LIMITED,
        "Requests refused with 429 because their source was over its rate limit, by source."
    );
    describe_gauge!(REQUESTS_IN_FLIGHT, "Requests being processed now.");
    describe_gauge!(
        MEMORY_BUDGET_BYTES,
        Unit::Bytes,
        "The memory budget for requests, frames and replay rounds."
    );
    describe_gauge!(
        MEMORY_BUDGET_HELD_BYTES,
        Unit::Bytes,
        "Bytes of the memory budget held by requests, frames and replay rounds (until their pipeline task ends)."
    );
    describe_counter!(
        EVENTS,
        "Events by source, transport and outcome (accepted, duplicate, rejected)."
    );
    describe_counter!(EVENTS_REJECTED, "Events refused one by one, by source and reason.");
    describe_gauge!(WS_CONNECTIONS, "Open WebSocket connections.");
    describe_counter!(WS_REFUSED, "WebSocket upgrades refused, by reason.");
    describe_counter!(WS_CLOSED, "WebSocket connections closed, by reason.");
    describe_counter!(WS_FRAMES, "WebSocket frames answered, by outcome (ack, nack).");
    describe_histogram!(
        WS_ACK_DURATION,
        Unit::Seconds,
        "Time from reading a WebSocket frame to sending its answer."
    );
    describe_counter!(REJECTED_STORE_WRITTEN, "Refused events written to the rejected store.");
    describe_counter!(
        REJECTED_STORE_DISCARDED_BYTES,
        Unit::Bytes,
        "Rejected-store bytes discarded by rotation."
    );
    describe_counter!(REJECTED_STORE_ERRORS, "Rejected-store write failures.");
}

/// The sinks.
fn describe_sinks() {
    use metric::*;
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(CLICKHOUSE_EVENTS_PER_INSERT, "Events per ClickHouse INSERT.");
    describe_histogram!(CLICKHOUSE_INSERT_DURATION, Unit::Seconds, "ClickHouse INSERT duration.");
    describe_counter!(
        CLICKHOUSE_IN_DOUBT_EVENTS,
        "Events of ClickHouse INSERTs of unknown outcome, looked up before they are inserted again."
    );
    describe_counter!(
        CLICKHOUSE_IN_DOUBT_FOUND_EVENTS,
        "Events of unknown outcome found in the ClickHouse table and not inserted again."
    );
    describe_counter!(
        KAFKA_CLIENT_ERRORS,
        "Kafka client errors reported by librdkafka, by code."
    );
    describe_counter!(
        KAFKA_UNKNOWN_OUTCOME_EVENTS,
        "Events whose Kafka delivery failed after librdkafka had them: maybe written; read back before replay."
    );
    describe_counter!(
        KAFKA_READ_BACK_FOUND_EVENTS,
        "Events of unknown outcome found already in the topic and left out of the replay."
    );
    describe_counter!(
        KAFKA_READ_BACK_UNVERIFIED_EVENTS,
        "Events of unknown outcome replayed without a read-back (memory bound or scan limit): may be in the topic twice."
    );
    describe_gauge!(KAFKA_ALL_BROKERS_DOWN, "1 while librdkafka reports all brokers down.");
    describe_counter!(
        KAFKA_PRODUCER_RENEWALS,
        "Kafka producers replaced because they were stuck, by reason (fatal error, or every delivery refused)."
    );
    describe_histogram!(
        SINK_DELIVERY_DURATION,
        Unit::Seconds,
        "Time a request waits for one sink to make its events durable (delivered or spooled)."
    );
    describe_counter!(SINK_EVENTS_SENT, "Events made durable by a sink.");
    describe_counter!(
        SINK_UNSETTLED_LEFT_OUT_EVENTS,
        "Events not written again by a sink: it wrote them for an earlier request that then failed, and this is its resend."
    );
    describe_counter!(SINK_ERRORS, "Sink write failures by sink and kind.");
    describe_histogram!(
        FILE_SINK_FSYNC_DURATION,
        Unit::Seconds,
        "fdatasync duration of the file sink."
    );
    describe_histogram!(
        FILE_SINK_REQUESTS_PER_FSYNC,
        "Requests made durable by one fsync of the file sink."
    );
    describe_counter!(FILE_SINK_BYTES, Unit::Bytes, "Bytes written by the file sink.");
    describe_counter!(FILE_SINK_ROTATIONS, "File sink rotations to a new file.");
}

/// Spools and dead letters.
fn describe_spool() {
    use metric::*;
    use metrics::{describe_counter, describe_gauge, Unit};
    describe_counter!(SPOOL_APPENDED_EVENTS, "Events appended to a sink's spool.");
    describe_counter!(
        SPOOL_REPLAYED_EVENTS,
        "Events replayed from a sink's spool and acknowledged."
    );
    describe_gauge!(SPOOL_EVENTS, "Events waiting in a sink's spool.");
    describe_gauge!(SPOOL_BYTES, Unit::Bytes, "Bytes held by a sink's spool.");
    describe_gauge!(
        SPOOL_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest record in a sink's spool."
    );
    describe_counter!(SPOOL_FULL, "Requests refused because a sink's spool was full.");
    describe_counter!(
        SPOOL_WRITES_PAST_DEADLINE,
        "Spool appends and dead-letter writes that outlived server.spool_write_timeout_ms: the request got 503 and the write went on (a slow or stalled disk)."
    );
    describe_counter!(
        SPOOL_WRITES_DECIDED_LATE,
        "Writes that outlived their request, by how they ended (written: the resend leaves those events out; not_written: it writes them)."
    );
    describe_counter!(
        SPOOL_QUARANTINED,
        "Spool records that failed their checksum and were quarantined."
    );
    describe_counter!(
        SPOOL_IO_ERRORS,
        "Spool operations that failed with an I/O error (a full disk, say); each closes the file for reopening."
    );
    describe_counter!(
        SPOOL_REOPENED,
        "Times the spool file was opened again after an I/O error."
    );
    describe_counter!(DEAD_LETTER_EVENTS, "Events added to the dead-letter store per sink.");
    describe_counter!(
        CLICKHOUSE_BISECTED_INSERTS,
        "INSERTs made to find the events of a group ClickHouse refused (halving it)."
    );
    describe_counter!(
        DEAD_LETTER_REFUSED_EVENTS,
        "Events a full dead-letter store refused (their requests got 503 dead_letters_full)."
    );
    describe_gauge!(
        DEAD_LETTER_BYTES,
        Unit::Bytes,
        "Bytes of the dead letters stored (cap: dead_letters.max_bytes)."
    );
}

/// Dedup, Redis, policies, resilience stacks and the build.
fn describe_dependencies() {
    use metric::*;
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        REDIS_ROUND_TRIPS,
        "Redis round trips by operation (claim, commit, release)."
    );
    describe_counter!(REDIS_ERRORS, "Failed Redis round trips by operation.");
    describe_counter!(
        DEDUP_CLAIMS_EXPIRED,
        "Requests whose Redis claims expired before their commit: another request may have delivered the same ids."
    );
    describe_counter!(
        DEDUP_FAIL_OPEN,
        "Requests delivered without shared dedup because Redis failed."
    );
    describe_gauge!(DEDUP_ENTRIES, "Message ids remembered by the embedded dedup.");
    describe_counter!(
        DEDUP_EVICTED_EARLY,
        "Ids forgotten before their window ended because of dedup.max_entries."
    );
    describe_counter!(
        DEDUP_WAITS,
        "Requests that waited for an in-flight request carrying the same id."
    );
    describe_counter!(POLICY_RELOADS, "Policy reloads by result (applied, invalid).");
    describe_gauge!(
        CIRCUIT_BREAKER_STATE,
        "Circuit breaker state per dependency: 0 closed, 1 open, 2 half-open."
    );
    describe_counter!(
        CIRCUIT_BREAKER_TRANSITIONS,
        "Circuit breaker transitions per dependency and target state."
    );
    describe_counter!(RETRIES, "Retries per dependency.");
    describe_counter!(CALLS_SHED, "Calls refused by a rate limit or a full bulkhead.");
    describe_gauge!(BUILD_INFO, "Always 1; the version label names the running build.");
}

/// Logs go to stderr; `RUST_LOG` (or `BREAKWATER_LOG`) picks the level, default info.
pub fn init_logging(format: LogFormat) {
    let filter = std::env::var("BREAKWATER_LOG")
        .ok()
        .and_then(|spec| EnvFilter::try_new(spec).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

#[cfg(test)]
mod tests {
    /// Every metric name has a HELP text (promtool requires it; the docs rely on it).
    #[test]
    fn every_metric_is_described() {
        let source = include_str!("mod.rs");
        let mut missing = Vec::new();
        for line in source.lines() {
            let Some(rest) = line.trim().strip_prefix("pub const ") else {
                continue;
            };
            let Some((name, value)) = rest.split_once(": &str = ") else {
                continue;
            };
            if !value.starts_with("\"breakwater_") {
                continue;
            }
            let described = ["describe_counter!(", "describe_gauge!(", "describe_histogram!("]
                .iter()
                .any(|macro_call| {
                    source.contains(&format!("{macro_call}{name},"))
                        || source.contains(&format!("{macro_call}\n        {name},"))
                });
            if !described {
                missing.push(name.to_string());
            }
        }
        assert!(missing.is_empty(), "metrics without a description: {missing:?}");
    }
}
