//! Dedup shared by every instance through Redis (fred): one pooled client for the
//! process, one script call (one round trip) per request for the check, one for the
//! commit.
//!
//! Every command goes through the policy's `[redis]` stack (timeout, retry,
//! breaker): with Redis down, the breaker opens and requests stop waiting for it.
//!
//! Per id, the key `<prefix>:<source>:<messageId>` (`:` and `%` in the source
//! escaped, so sources never share keys) holds the token of the request
//! that claimed it (`c:` and 24 hex digits; expires after `ttl_seconds`), and per
//! request the status key `<prefix>::claim:<token>` says what became of it: `p`
//! (being delivered; expires after `pending_ttl_ms`) or `d` (delivered; expires
//! after `ttl_seconds`). An id is therefore "mine now", "already delivered" (its
//! owner's status is `d`) or "someone else's" (`p`); an owner whose status expired
//! without `d` died mid-request, and its ids are free to claim again. One write per
//! id (the claim) and one per request (the commit), where a claim and a commit per
//! id cost Redis twice the CPU. A failed request deletes its own claims
//! (compare-and-delete) and its status, so the client's retry is free to succeed.
//! Claim and release are each one Lua script over all of a request's keys, the
//! commit one `SET`: one command for Redis to parse per request, not one per id.

use std::sync::Arc;
use std::time::Duration;

use fred::clients::Pool;
use fred::interfaces::{ClientLike, KeysInterface, LuaInterface};
use fred::prelude::{Builder, Config as FredConfig, Expiration, ReconnectPolicy, SetOptions, Value};

use crate::config::{redact_url, RedisConfig};
use crate::policy::CallPolicy;
use crate::resilience::{CallError, CallService, Resilient};
use crate::telemetry::health::DependencyHealth;
use crate::telemetry::metric;

pub const DEPENDENCY_NAME: &str = "redis";

// The scripts, each over all of a request's keys (KEYS).

/// ARGV: token, status key, pending_ttl_ms, ttl_seconds, status key prefix. Per key
/// 0 (claimed now), 1 (already delivered) or 2 (another request holds it); sets the
/// status key to `p` when anything was claimed.
const CLAIM_SCRIPT: &str = "local token, ttl, prefix = ARGV[1], ARGV[4], ARGV[5] \
local out, owners, claimed = {}, {}, false \
for i, key in ipairs(KEYS) do \
  local old = redis.call('SET', key, token, 'NX', 'GET', 'EX', ttl) \
  if not old or old == token then out[i] = 0 \
  else \
    local state = owners[old] \
    if state == nil then state = redis.call('GET', prefix .. old) or 'gone'; owners[old] = state end \
    if state == 'd' then out[i] = 1 \
    elseif state == 'p' then out[i] = 2 \
    else redis.call('SET', key, token, 'EX', ttl); out[i] = 0 end \
  end \
  if out[i] == 0 then claimed = true end \
end \
if claimed then redis.call('SET', ARGV[2], 'p', 'PX', ARGV[3]) end \
return out";
const CLAIMED: i64 = 0;
const ALREADY_SEEN: i64 = 1;
/// A status key's value once its request is delivered.
const DELIVERED: &str = "d";
/// ARGV: token, status key. Deletes each key that still holds the token (and no
/// other), then the status key.
const RELEASE_SCRIPT: &str = "local n = 0 for _, key in ipairs(KEYS) do if redis.call('GET', key) == ARGV[1] then n = n + redis.call('DEL', key) end end redis.call('DEL', ARGV[2]) return n";
/// Pause between re-checks of ids another request holds.
const HELD_RECHECK: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisDedupError {
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    #[error("{0} message ids are being delivered by another request; retry shortly")]
    HeldElsewhere(usize),
    /// The request's claims expired before its commit: another request may have
    /// claimed and delivered the same ids meanwhile.
    #[error("the request's claims expired before its commit (redis.pending_ttl_ms)")]
    ClaimsExpired,
}

impl CallError for RedisDedupError {
    fn is_retryable(&self) -> bool {
        matches!(self, RedisDedupError::Unavailable(_))
    }
    fn timed_out(_: &'static str, after: Duration) -> Self {
        RedisDedupError::Unavailable(format!("no answer within {} ms", after.as_millis()))
    }
    fn circuit_open(_: &'static str) -> Self {
        RedisDedupError::Unavailable("circuit breaker is open".into())
    }
    fn shed(_: &'static str, why: String) -> Self {
        RedisDedupError::Unavailable(why)
    }
}

/// What one id's claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// Ours now: deliver it.
    Claimed,
    /// Already delivered: a duplicate.
    Seen,
}

/// The ids a request claimed, to commit after delivery or release after failure.
#[derive(Debug)]
pub struct Claim {
    token: Arc<str>,
    keys: Vec<String>,
}

impl Claim {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// One round trip, as the resilience stack sees it (cheap to clone for retries).
#[derive(Debug, Clone)]
pub enum RedisCommand {
    Claim { token: Arc<str>, keys: Arc<Vec<String>> },
    Commit { token: Arc<str> },
    Release { token: Arc<str>, keys: Arc<Vec<String>> },
}

/// A claim's answer per key (`None`: another request holds it), or done.
#[derive(Debug)]
pub enum RedisReply {
    Claimed(Vec<Option<ClaimOutcome>>),
    Done,
}

/// The fred side: one pool and the key settings; runs one command per call.
struct RedisClient {
    pool: Pool,
    /// `<prefix>::claim:`, followed by a token: that request's status key.
    status_prefix: String,
    ttl_seconds: i64,
    pending_ttl_ms: i64,
    health: Arc<DependencyHealth>,
}

/// The oldest Redis major version the claim script runs on: `SET … NX GET` came
/// with Redis 7.0.
pub const OLDEST_SUPPORTED_MAJOR: u64 = 7;

/// Why a Redis of this major version cannot serve as shared dedup, if it cannot.
pub fn too_old(major: Option<u64>) -> Option<String> {
    let major = major?;
    (major < OLDEST_SUPPORTED_MAJOR).then(|| {
        format!(
            "redis {major}.x cannot serve as shared dedup: its claim uses SET … NX GET, \
             which needs Redis {OLDEST_SUPPORTED_MAJOR}.0 or later"
        )
    })
}

pub struct RedisDedup {
    /// The same pool the commands use, for the server's version.
    pool: Pool,
    guard: Resilient<RedisCommand, RedisReply, RedisDedupError>,
    key_prefix: String,
    pending_wait: Duration,
    health: Arc<DependencyHealth>,
}

impl RedisDedup {
    /// Builds the pool and starts connecting in the background: a Redis that is down
    /// at start-up delays nothing. `calls` is the policy's `[redis]` section.
    pub fn connect(config: &RedisConfig, calls: &CallPolicy) -> Result<RedisDedup, String> {
        let mut fred_config =
            FredConfig::from_url(&config.url).map_err(|e| format!("redis.url {}: {e}", redact_url(&config.url)))?;
        fred_config.fail_fast = false;
        let command_timeout = Duration::from_millis(config.command_timeout_ms);
        let pool = Builder::from_config(fred_config)
            .with_performance_config(|performance| {
                performance.default_command_timeout = command_timeout;
            })
            .with_connection_config(|connection| {
                connection.connection_timeout = Duration::from_millis(config.connect_timeout_ms);
                connection.internal_command_timeout = command_timeout;
                connection.max_command_attempts = 1;
            })
            // Reconnect for ever, backing off to 2 s between attempts.
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .build_pool(config.pool_size)
            .map_err(|e| format!("redis client: {e}"))?;
        let _connections = pool.connect();
        let health = Arc::new(DependencyHealth::default());
        let client = Arc::new(RedisClient {
            pool: pool.clone(),
            status_prefix: format!("{}::claim:", config.key_prefix),
            ttl_seconds: config.ttl_seconds as i64,
            pending_ttl_ms: config.pending_ttl_ms as i64,
            health: health.clone(),
        });
        let inner = CallService::new(tower::service_fn(move |command: RedisCommand| {
            let client = client.clone();
            async move { client.execute(command).await }
        }));
        Ok(RedisDedup {
            pool,
            guard: Resilient::new(DEPENDENCY_NAME, inner, calls)?,
            key_prefix: config.key_prefix.clone(),
            pending_wait: Duration::from_millis(config.pending_wait_ms),
            health,
        })
    }

    /// Refuses a Redis too old for the claim script (`too_old`), when it answers
    /// within `wait`. One that does not is not waited for (it is checked again at
    /// each claim that fails, and named in that error).
    pub async fn check_server(&self, wait: Duration) -> Result<(), String> {
        if tokio::time::timeout(wait, self.pool.wait_for_connect()).await.is_err() {
            tracing::warn!(
                "redis did not answer within {} ms at start-up; its version is checked once it does",
                wait.as_millis()
            );
            return Ok(());
        }
        match too_old(self.pool.next().server_version().map(|v| v.major)) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// Applies a reloaded `[redis]` policy.
    pub fn apply(&self, calls: &CallPolicy) -> Result<(), String> {
        self.guard.apply(calls)
    }

    pub fn breaker(&self) -> tower_resilience::circuitbreaker::CircuitState {
        self.guard.breaker()
    }

    pub fn health(&self) -> Arc<DependencyHealth> {
        self.health.clone()
    }

    fn key(&self, source: &str, message_id: &str) -> String {
        id_key(&self.key_prefix, source, message_id)
    }

    /// Claims `message_ids` for this request in one pipelined round trip. If another
    /// request holds some of them, this releases everything it claimed (so two
    /// requests can never hold part each and wait on each other), waits a jittered
    /// moment and tries again, for up to `pending_wait_ms`.
    pub async fn claim(
        &self,
        source: &str,
        message_ids: &[&str],
    ) -> Result<(Vec<ClaimOutcome>, Claim), RedisDedupError> {
        let token: Arc<str> = Arc::from(format!("c:{}", &uuid::Uuid::new_v4().simple().to_string()[..24]));
        let keys: Vec<String> = message_ids.iter().map(|id| self.key(source, id)).collect();
        let deadline = tokio::time::Instant::now() + self.pending_wait;
        // "Seen" is final; only the other ids are claimed again on a retry.
        let mut seen = vec![false; keys.len()];
        loop {
            let open: Vec<usize> = (0..keys.len()).filter(|i| !seen[*i]).collect();
            let command = RedisCommand::Claim {
                token: token.clone(),
                keys: Arc::new(open.iter().map(|i| keys[*i].clone()).collect()),
            };
            let answers = match self.guard.call(command).await? {
                RedisReply::Claimed(answers) => answers,
                RedisReply::Done => return Err(RedisDedupError::Unavailable("unexpected reply to a claim".into())),
            };
            let mut claim = Claim {
                token: token.clone(),
                keys: Vec::with_capacity(open.len()),
            };
            let mut held = 0;
            for (&index, answer) in open.iter().zip(answers) {
                match answer {
                    Some(ClaimOutcome::Claimed) => claim.keys.push(keys[index].clone()),
                    Some(ClaimOutcome::Seen) => seen[index] = true,
                    None => held += 1,
                }
            }
            if held == 0 {
                let outcomes = seen
                    .iter()
                    .map(|s| if *s { ClaimOutcome::Seen } else { ClaimOutcome::Claimed })
                    .collect();
                return Ok((outcomes, claim));
            }
            self.release(&claim).await;
            let pause =
                HELD_RECHECK + Duration::from_millis(crate::clock::random_below(HELD_RECHECK.as_millis() as u64));
            if tokio::time::Instant::now() + pause > deadline {
                return Err(RedisDedupError::HeldElsewhere(held));
            }
            metrics::counter!(metric::DEDUP_WAITS).increment(1);
            tokio::time::sleep(pause).await;
        }
    }

    /// Marks the claimed ids delivered. Call only once their events are durable.
    pub async fn commit(&self, claim: Claim) -> Result<(), RedisDedupError> {
        if claim.is_empty() {
            return Ok(());
        }
        self.guard
            .call(RedisCommand::Commit { token: claim.token })
            .await
            .map(|_| ())
    }

    /// Frees this request's claims (best effort: unreleased claims expire after
    /// `pending_ttl_ms`).
    pub async fn release(&self, claim: &Claim) {
        if claim.is_empty() {
            return;
        }
        let command = RedisCommand::Release {
            token: claim.token.clone(),
            keys: Arc::new(claim.keys.clone()),
        };
        if let Err(error) = self.guard.call(command).await {
            tracing::debug!(%error, keys = claim.keys.len(), "claims not released; they expire on their own");
        }
    }
}

impl RedisClient {
    async fn execute(&self, command: RedisCommand) -> Result<RedisReply, RedisDedupError> {
        let result = match command {
            RedisCommand::Claim { token, keys } => self.claim_round(&token, &keys).await.map(RedisReply::Claimed),
            RedisCommand::Commit { token } => self.commit_round(&token).await.map(|()| RedisReply::Done),
            RedisCommand::Release { token, keys } => self.release_round(&token, &keys).await.map(|()| RedisReply::Done),
        };
        match &result {
            Ok(_) => self.health.record_success(DEPENDENCY_NAME),
            Err(error) => self.health.record_failure(error),
        }
        result
    }

    /// One script call: claims what is free, says what is delivered or held.
    /// `None`: another request holds the key.
    async fn claim_round(&self, token: &str, keys: &[String]) -> Result<Vec<Option<ClaimOutcome>>, RedisDedupError> {
        let answers: Result<Vec<i64>, _> = self
            .pool
            .next_connected()
            .eval(
                CLAIM_SCRIPT,
                keys.to_vec(),
                vec![
                    token.to_string(),
                    self.status_key(token),
                    self.pending_ttl_ms.to_string(),
                    self.ttl_seconds.to_string(),
                    self.status_prefix.clone(),
                ],
            )
            .await;
        count_round_trip("claim");
        let answers = answers.map_err(|e| match too_old(self.pool.next().server_version().map(|v| v.major)) {
            Some(why) => unavailable_because("claim", why),
            None => unavailable("claim", e),
        })?;
        if answers.len() != keys.len() {
            return Err(unavailable_because(
                "claim",
                format!("{} answers for {} keys", answers.len(), keys.len()),
            ));
        }
        Ok(answers
            .into_iter()
            .map(|answer| match answer {
                CLAIMED => Some(ClaimOutcome::Claimed),
                ALREADY_SEEN => Some(ClaimOutcome::Seen),
                _ => None,
            })
            .collect())
    }

    /// One `SET … XX` for the whole request: its status becomes "delivered", only if
    /// it is still there (pending). Expired, its ids may have been claimed by
    /// another request meanwhile: the commit says so instead of marking them.
    async fn commit_round(&self, token: &str) -> Result<(), RedisDedupError> {
        let committed: Result<Value, _> = self
            .pool
            .next_connected()
            .set(
                self.status_key(token),
                DELIVERED,
                Some(Expiration::EX(self.ttl_seconds)),
                Some(SetOptions::XX),
                false,
            )
            .await;
        count_round_trip("commit");
        match committed.map_err(|e| unavailable("commit", e))? {
            Value::Null => {
                metrics::counter!(metric::DEDUP_CLAIMS_EXPIRED).increment(1);
                Err(RedisDedupError::ClaimsExpired)
            }
            _ => Ok(()),
        }
    }

    fn status_key(&self, token: &str) -> String {
        format!("{}{token}", self.status_prefix)
    }

    /// One script call: one round trip. (All keys in one call: standalone Redis or
    /// a single-shard setup, not Redis Cluster.)
    async fn release_round(&self, token: &str, keys: &[String]) -> Result<(), RedisDedupError> {
        let released: Result<Value, _> = self
            .pool
            .next_connected()
            .eval(
                RELEASE_SCRIPT,
                keys.to_vec(),
                vec![token.to_string(), self.status_key(token)],
            )
            .await;
        count_round_trip("release");
        released.map(|_| ()).map_err(|e| unavailable("release", e))
    }
}

fn unavailable(operation: &'static str, error: fred::error::Error) -> RedisDedupError {
    unavailable_because(operation, error.to_string())
}

fn unavailable_because(operation: &'static str, why: String) -> RedisDedupError {
    metrics::counter!(metric::REDIS_ERRORS, "operation" => operation).increment(1);
    RedisDedupError::Unavailable(why)
}

fn count_round_trip(operation: &'static str) {
    metrics::counter!(metric::REDIS_ROUND_TRIPS, "operation" => operation).increment(1);
}

/// An id's key: `<prefix>:<source>:<messageId>`, with `%` and `:` in the source
/// escaped (`%25`, `%3A`), so the first `:` after the prefix always ends the source
/// and two (source, messageId) pairs never share a key.
fn id_key(prefix: &str, source: &str, message_id: &str) -> String {
    let source: std::borrow::Cow<'_, str> = if source.contains([':', '%']) {
        source.replace('%', "%25").replace(':', "%3A").into()
    } else {
        source.into()
    };
    format!("{prefix}:{source}:{message_id}")
}

#[cfg(test)]
mod tests {
    use super::*;
    /// A real redis-server (the test-backends launcher): a commit whose claims have
    /// expired must say so, not mark another request's ids delivered in silence.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_after_its_claims_expired_is_refused() {
        let redis = tokio::task::spawn_blocking(breakwater_test_backends::Redis::start)
            .await
            .unwrap();
        let config = RedisConfig {
            url: redis.url(),
            pending_ttl_ms: 300,
            ..RedisConfig::default()
        };
        let calls = crate::policy::LoadedPolicy::embedded().policy.redis.clone();
        let dedup = RedisDedup::connect(&config, &calls).unwrap();
        dedup.check_server(Duration::from_secs(5)).await.unwrap();

        let (_, claim) = dedup.claim("web", &["a"]).await.unwrap();
        dedup.commit(claim).await.expect("committed in time");

        let (_, late) = dedup.claim("web", &["b"]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        let error = dedup.commit(late).await.expect_err("the claims had expired");
        assert!(matches!(error, RedisDedupError::ClaimsExpired), "{error}");
        drop(redis);
    }

    #[test]
    fn redis_older_than_7_is_refused_by_name() {
        let why = too_old(Some(6)).expect("6.x refused");
        assert!(
            why.contains("redis 6.x") && why.contains("NX GET") && why.contains("7.0"),
            "{why}"
        );
        assert_eq!(too_old(Some(7)), None);
        assert_eq!(too_old(Some(8)), None);
        // Unknown (not yet connected): not refused here; checked again later.
        assert_eq!(too_old(None), None);
    }

    #[test]
    fn ids_of_two_sources_never_share_a_key() {
        // A source name may hold `:`; the pair must still map to one key only.
        assert_ne!(id_key("bw", "a:b", "c"), id_key("bw", "a", "b:c"));
        assert_ne!(id_key("bw", "a%3Ab", "c"), id_key("bw", "a:b", "c"));
        // No id key is a status key (`<prefix>::claim:<token>`).
        assert!(!id_key("bw", "x", "y").starts_with("bw::"));
    }
}
