//! Resilience policies: the operator-edited TOML that says, per dependency, how
//! long to wait, how to retry, when to trip the breaker, how much to let through,
//! how to batch and how much to spool. Owns parsing, validation (naming file, key
//! and why), the embedded default and hot reload. Calls nothing else in the crate.

pub mod reload;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::event::SinkKind;

/// The policy shipped in `policies/default.toml`, used when no file is configured.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../policies/default.toml");

/// The whole policy: one section per dependency.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Free-form label shown on `/admin/policy` and in logs.
    #[serde(default)]
    pub version: String,
    pub redis: CallPolicy,
    pub clickhouse: SinkPolicy,
    pub kafka: SinkPolicy,
    pub file: SinkPolicy,
    #[serde(default)]
    pub dead_letters: DeadLetterPolicy,
}

/// The dead-letter store (batches a sink rejected for good, kept for an operator).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterPolicy {
    /// Disk the dead letters may use. Full: the requests whose events would go there
    /// get `503 dead_letters_full` (nothing is dropped; the oldest letters are kept)
    /// until an operator requeues or purges some.
    pub max_bytes: u64,
}

impl Default for DeadLetterPolicy {
    fn default() -> Self {
        DeadLetterPolicy {
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// How calls to one dependency are made.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CallPolicy {
    /// Per-attempt deadline.
    pub timeout_ms: u64,
    pub retry: RetryPolicy,
    pub circuit_breaker: BreakerPolicy,
    #[serde(default)]
    pub rate_limit: RateLimitPolicy,
    #[serde(default)]
    pub bulkhead: BulkheadPolicy,
}

/// A sink's calls plus its batching and its spool. (The call fields repeat
/// `CallPolicy`'s because serde cannot combine `flatten` with `deny_unknown_fields`,
/// and a misspelt key must be an error.)
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SinkPolicy {
    pub timeout_ms: u64,
    pub retry: RetryPolicy,
    pub circuit_breaker: BreakerPolicy,
    #[serde(default)]
    pub rate_limit: RateLimitPolicy,
    #[serde(default)]
    pub bulkhead: BulkheadPolicy,
    pub batch: BatchPolicy,
    pub spool: SpoolPolicy,
}

impl Policy {
    /// The section of one sink.
    pub fn sink(&self, sink: SinkKind) -> &SinkPolicy {
        match sink {
            SinkKind::File => &self.file,
            SinkKind::ClickHouse => &self.clickhouse,
            SinkKind::Kafka => &self.kafka,
        }
    }
}

/// A key that was in the schema once and is refused with the reason it went.
const REMOVED_KEYS: &[(&str, &str)] = &[(
    "honour_retry_after",
    "removed: no backend breakwater calls hands a Retry-After to its client (ClickHouse's, \
     Kafka's and Redis's clients do not expose one), so it never did anything; delete the line",
)];

impl SinkPolicy {
    pub fn calls(&self) -> CallPolicy {
        CallPolicy {
            timeout_ms: self.timeout_ms,
            retry: self.retry.clone(),
            circuit_breaker: self.circuit_breaker.clone(),
            rate_limit: self.rate_limit.clone(),
            bulkhead: self.bulkhead.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    /// Sleep a random time between 0 and the backoff ("full jitter").
    Full,
    None,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retry).
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub multiplier: f64,
    pub jitter: Jitter,
    /// Retries may add at most this percentage on top of first attempts (per 10 s),
    /// so a struggling backend never sees a retry storm.
    pub budget_percent: u32,
}

impl RetryPolicy {
    /// Backoff before retry number `retry` (1-based), before jitter.
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = self.multiplier.powi(retry.saturating_sub(1) as i32);
        let millis = (self.initial_backoff_ms as f64 * factor).min(self.max_backoff_ms as f64);
        Duration::from_millis(millis as u64)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trip {
    /// Open after `consecutive_failures` failures in a row.
    Consecutive,
    /// Open when failures reach `failure_rate_percent` of the calls in the last
    /// `window_seconds` (once at least `minimum_calls` were made).
    FailureRate,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerPolicy {
    pub trip: Trip,
    pub consecutive_failures: u32,
    pub failure_rate_percent: u32,
    pub window_seconds: u64,
    pub minimum_calls: u32,
    /// How long an open breaker refuses calls before letting probes through.
    pub open_ms: u64,
    /// Calls let through while half-open; all must succeed to close.
    pub half_open_probes: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitPolicy {
    /// Calls per second; 0 = unlimited.
    #[serde(default)]
    pub calls_per_second: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BulkheadPolicy {
    /// Calls in flight at once; 0 = unlimited.
    #[serde(default)]
    pub max_concurrent: u32,
    /// How long a call waits for a free slot before failing (and spooling).
    #[serde(default = "default_bulkhead_wait")]
    pub max_wait_ms: u64,
}

fn default_bulkhead_wait() -> u64 {
    1_000
}

impl Default for BulkheadPolicy {
    fn default() -> Self {
        Self {
            max_concurrent: 0,
            max_wait_ms: default_bulkhead_wait(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchPolicy {
    pub max_events: usize,
    pub max_bytes: usize,
    pub linger_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolPolicy {
    /// Disk the sink's spool may use; past it new requests get 503.
    pub max_bytes: u64,
    /// Events per second the replayer sends once the sink is healthy again.
    pub replay_events_per_second: u32,
    /// Events per replay call (the sink's batcher may join several).
    pub replay_batch_events: usize,
}

/// What went wrong with a policy: always names the file, the key and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}: `{key}`: {why}")]
pub struct PolicyError {
    pub file: String,
    pub key: String,
    pub why: String,
}

/// A validated policy with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedPolicy {
    pub policy: Policy,
    /// File it was read from; `None` for the embedded default.
    pub path: Option<PathBuf>,
    /// SHA-256 of the file's bytes (first 16 hex digits): changes with any edit.
    pub hash: String,
}

impl LoadedPolicy {
    pub fn embedded() -> LoadedPolicy {
        parse(EMBEDDED_DEFAULT, "<embedded default>", None).expect("the embedded default policy is valid")
    }

    pub fn from_file(path: &Path) -> Result<LoadedPolicy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            file: path.display().to_string(),
            key: "-".into(),
            why: format!("cannot read: {e}"),
        })?;
        parse(&text, &path.display().to_string(), Some(path.to_path_buf()))
    }
}

/// Parses and validates policy text; `file` names it in errors.
pub fn parse(text: &str, file: &str, path: Option<PathBuf>) -> Result<LoadedPolicy, PolicyError> {
    let policy: Policy = toml::from_str(text).map_err(|e| {
        let key = e
            .span()
            .map(|span| key_at(text, span.start))
            .unwrap_or_else(|| "-".into());
        let why = REMOVED_KEYS
            .iter()
            .find(|(removed, _)| key.ends_with(removed))
            .map_or_else(|| e.message().to_string(), |(_, why)| why.to_string());
        PolicyError {
            file: file.to_string(),
            key,
            why,
        }
    })?;
    validate(&policy).map_err(|(key, why)| PolicyError {
        file: file.to_string(),
        key,
        why,
    })?;
    let digest = Sha256::digest(text.as_bytes());
    let hash = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Ok(LoadedPolicy { policy, path, hash })
}

/// The `[section]` and key on the line where a parse error points, for the message.
fn key_at(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let section = before
        .lines()
        .rev()
        .find_map(|line| line.trim().strip_prefix('[').and_then(|l| l.strip_suffix(']')))
        .unwrap_or("");
    let line = text[before.rfind('\n').map_or(0, |i| i + 1)..]
        .lines()
        .next()
        .unwrap_or("");
    let key = line.split('=').next().unwrap_or("").trim();
    match (section.is_empty(), key.is_empty() || key.starts_with('[')) {
        (true, _) => key.to_string(),
        (false, true) => section.to_string(),
        (false, false) => format!("{section}.{key}"),
    }
}

fn validate(policy: &Policy) -> Result<(), (String, String)> {
    validate_calls("redis", &policy.redis)?;
    for kind in [SinkKind::ClickHouse, SinkKind::Kafka, SinkKind::File] {
        let (name, sink) = (kind.name(), policy.sink(kind));
        validate_calls(name, &sink.calls())?;
        let fail = |key: &str, why: &str| Err((format!("{name}.{key}"), why.to_string()));
        if sink.batch.max_events == 0 {
            return fail("batch.max_events", "must be greater than 0");
        }
        if sink.batch.max_bytes == 0 {
            return fail("batch.max_bytes", "must be greater than 0");
        }
        if sink.spool.max_bytes < 1024 * 1024 {
            return fail("spool.max_bytes", "must be at least 1 MiB (1048576)");
        }
        if sink.spool.replay_events_per_second == 0 {
            return fail("spool.replay_events_per_second", "must be greater than 0");
        }
        if sink.spool.replay_batch_events == 0 {
            return fail("spool.replay_batch_events", "must be greater than 0");
        }
    }
    if policy.dead_letters.max_bytes < 1024 * 1024 {
        return Err((
            "dead_letters.max_bytes".into(),
            "must be at least 1 MiB (1048576)".into(),
        ));
    }
    Ok(())
}

fn validate_calls(name: &str, calls: &CallPolicy) -> Result<(), (String, String)> {
    let fail = |key: &str, why: String| Err((format!("{name}.{key}"), why));
    if calls.timeout_ms == 0 {
        return fail("timeout_ms", "must be greater than 0".into());
    }
    let retry = &calls.retry;
    if retry.max_attempts == 0 {
        return fail("retry.max_attempts", "must be at least 1 (the first attempt)".into());
    }
    if retry.max_backoff_ms < retry.initial_backoff_ms {
        return fail(
            "retry.max_backoff_ms",
            format!(
                "is {} but must not be below retry.initial_backoff_ms ({})",
                retry.max_backoff_ms, retry.initial_backoff_ms
            ),
        );
    }
    if !(retry.multiplier >= 1.0 && retry.multiplier.is_finite()) {
        return fail("retry.multiplier", "must be a number of at least 1.0".into());
    }
    if retry.budget_percent > 1000 {
        return fail("retry.budget_percent", "must be between 0 and 1000".into());
    }
    let breaker = &calls.circuit_breaker;
    if breaker.open_ms == 0 {
        return fail("circuit_breaker.open_ms", "must be greater than 0".into());
    }
    if breaker.half_open_probes == 0 {
        return fail("circuit_breaker.half_open_probes", "must be at least 1".into());
    }
    match breaker.trip {
        Trip::Consecutive if breaker.consecutive_failures == 0 => {
            fail("circuit_breaker.consecutive_failures", "must be at least 1".into())
        }
        Trip::FailureRate if !(1..=100).contains(&breaker.failure_rate_percent) => fail(
            "circuit_breaker.failure_rate_percent",
            "must be between 1 and 100".into(),
        ),
        Trip::FailureRate if breaker.window_seconds == 0 => {
            fail("circuit_breaker.window_seconds", "must be greater than 0".into())
        }
        Trip::FailureRate if breaker.minimum_calls == 0 => {
            fail("circuit_breaker.minimum_calls", "must be at least 1".into())
        }
        _ => Ok(()),
    }
}

/// One policy file's check result.
pub type FileCheck = (PathBuf, Result<LoadedPolicy, PolicyError>);

/// Validates every `*.toml` in `dir`; returns each file's outcome, in name order.
pub fn check_dir(dir: &Path) -> Result<Vec<FileCheck>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    Ok(files
        .into_iter()
        .map(|path| {
            let loaded = LoadedPolicy::from_file(&path);
            (path, loaded)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_and_every_shipped_policy_are_valid() {
        let loaded = LoadedPolicy::embedded();
        assert_eq!(loaded.policy.version, "default");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let results = check_dir(&dir).unwrap();
        assert!(results.len() >= 3, "default plus two alternatives");
        for (path, result) in results {
            assert!(result.is_ok(), "{}: {:?}", path.display(), result.err());
        }
    }

    #[test]
    fn errors_name_file_key_and_why() {
        let text = EMBEDDED_DEFAULT.replacen("max_backoff_ms = 2000", "max_backoff_ms = 10", 1);
        let err = parse(&text, "policies/edit.toml", None).unwrap_err().to_string();
        assert!(
            err.starts_with("policies/edit.toml: `clickhouse.retry.max_backoff_ms`"),
            "{err}"
        );
        assert!(err.contains("initial_backoff_ms"), "{err}");

        let text = EMBEDDED_DEFAULT.replacen("max_attempts = 3", "max_atempts = 3", 1);
        let err = parse(&text, "p.toml", None).unwrap_err().to_string();
        assert!(err.contains("max_atempts"), "{err}");
    }

    #[test]
    fn a_removed_key_is_refused_with_the_reason() {
        let text = EMBEDDED_DEFAULT.replacen("jitter = \"full\"", "jitter = \"full\"\nhonour_retry_after = true", 1);
        let err = parse(&text, "old.toml", None).unwrap_err().to_string();
        assert!(err.contains("honour_retry_after"), "{err}");
        assert!(err.contains("removed"), "{err}");
    }

    #[test]
    fn backoff_grows_and_caps() {
        let retry = LoadedPolicy::embedded().policy.clickhouse.retry;
        assert_eq!(retry.backoff(1), Duration::from_millis(retry.initial_backoff_ms));
        assert!(retry.backoff(2) > retry.backoff(1));
        assert_eq!(retry.backoff(30), Duration::from_millis(retry.max_backoff_ms));
    }

    #[test]
    fn any_edit_changes_the_hash() {
        let a = parse(EMBEDDED_DEFAULT, "a", None).unwrap();
        let b = parse(&format!("{EMBEDDED_DEFAULT}\n# comment\n"), "b", None).unwrap();
        assert_ne!(a.hash, b.hash);
        assert_eq!(a.policy, b.policy);
    }
}
