//! Every labelled metric series created at zero at start-up, so dashboards and
//! alerts see them before the first event of their kind (an absent series reads as
//! "no data", not 0).

use std::sync::Arc;

use crate::dedup::redis;
use crate::pipeline::SinkRoute;
use crate::sinks::SinkError;
use crate::telemetry::metric;

pub(super) fn preregister(routes: &[SinkRoute], shared_dedup: bool, sources: &[Arc<str>]) {
    for source in sources {
        metrics::counter!(metric::REQUESTS_RATE_LIMITED, "source" => source.to_string()).increment(0);
    }
    for route in routes {
        sink_series(route.kind.name());
    }
    let mut dependencies: Vec<&'static str> = routes.iter().map(|r| r.kind.name()).collect();
    if shared_dedup {
        dependencies.push(redis::DEPENDENCY_NAME);
    }
    for dependency in dependencies {
        dependency_series(dependency);
    }
    process_series();
}

fn sink_series(sink: &'static str) {
    metrics::counter!(metric::SINK_EVENTS_SENT, "sink" => sink).increment(0);
    metrics::counter!(metric::SPOOL_APPENDED_EVENTS, "sink" => sink).increment(0);
    metrics::counter!(metric::SPOOL_REPLAYED_EVENTS, "sink" => sink).increment(0);
    metrics::counter!(metric::SPOOL_FULL, "sink" => sink).increment(0);
    metrics::counter!(metric::DEAD_LETTER_EVENTS, "sink" => sink).increment(0);
    metrics::gauge!(metric::SPOOL_OLDEST_AGE, "sink" => sink).set(0.0);
    for kind in SinkError::KINDS {
        metrics::counter!(metric::SINK_ERRORS, "sink" => sink, "kind" => kind).increment(0);
    }
}

fn dependency_series(dependency: &'static str) {
    metrics::counter!(metric::RETRIES, "dependency" => dependency).increment(0);
    for to in ["open", "half_open", "closed"] {
        metrics::counter!(metric::CIRCUIT_BREAKER_TRANSITIONS, "dependency" => dependency, "to" => to).increment(0);
    }
    for by in ["rate_limit", "bulkhead"] {
        metrics::counter!(metric::CALLS_SHED, "dependency" => dependency, "by" => by).increment(0);
    }
}

fn process_series() {
    for result in ["applied", "invalid"] {
        metrics::counter!(metric::POLICY_RELOADS, "result" => result).increment(0);
    }
    for outcome in ["ack", "nack"] {
        metrics::counter!(metric::WS_FRAMES, "outcome" => outcome).increment(0);
    }
    metrics::gauge!(metric::WS_CONNECTIONS).set(0.0);
    metrics::counter!(metric::SPOOL_QUARANTINED).increment(0);
    metrics::counter!(metric::SPOOL_IO_ERRORS).increment(0);
    metrics::counter!(metric::SPOOL_REOPENED).increment(0);
    metrics::counter!(metric::DEDUP_FAIL_OPEN).increment(0);
}
