//! Dedup shared by every instance through Redis (fred): one pooled client for the
//! process, one script call (one round trip) per request for the check, one for the
//! commit.
//!
//! Every command goes through the policy's `[redis]` stack (timeout, retry,
//! breaker): with Redis down, the breaker opens and requests stop waiting for it.
//!
//! Per id, the key `<prefix>:<source>:<messageId>` holds either a claim token (a
//! request somewhere is delivering it; expires after `pending_ttl_ms`) or `s`
//! (delivered; expires after `ttl_seconds`). Claim is `SET NX GET PX`: one command
//! says "mine now", "already delivered" or "someone else's". Commit overwrites the
//! claim with `s` only after the events are durable; a failed request deletes its
//! own claims (compare-and-delete), so the client's retry is free to succeed. Each
//! of the three runs as one Lua script over all of a request's keys: a pipeline of
//! one command per key cost Redis and the client several times more CPU.

use std::sync::Arc;
use std::time::Duration;

use fred::clients::Pool;
use fred::interfaces::{ClientLike, LuaInterface};
use fred::prelude::{Builder, Config as FredConfig, ReconnectPolicy, Value};

use crate::config::{redact_url, RedisConfig};
use crate::policy::CallPolicy;
use crate::resilience::{CallError, CallService, Resilient};
use crate::telemetry::health::DependencyHealth;
use crate::telemetry::metric;

pub const DEPENDENCY_NAME: &str = "redis";

// The scripts, each over all of a request's keys. A delivered key holds `s`.

/// Claims every key (KEYS) for the token ARGV[1] for ARGV[2] ms, unless it is held:
/// per key 0 (claimed now), 1 (already delivered) or 2 (another request holds it).
const CLAIM_SCRIPT: &str = "local out = {} for i, key in ipairs(KEYS) do local old = redis.call('SET', key, ARGV[1], 'NX', 'GET', 'PX', ARGV[2]) if not old then out[i] = 0 elseif old == 's' then out[i] = 1 else out[i] = 2 end end return out";
const CLAIMED: i64 = 0;
const ALREADY_SEEN: i64 = 1;
/// Marks every key (KEYS) delivered for ARGV[1] seconds.
const COMMIT_SCRIPT: &str = "for _, key in ipairs(KEYS) do redis.call('SET', key, 's', 'EX', ARGV[1]) end return #KEYS";
/// Deletes each key that still holds the caller's claim token (and no other).
const RELEASE_SCRIPT: &str = "local n = 0 for _, key in ipairs(KEYS) do if redis.call('GET', key) == ARGV[1] then n = n + redis.call('DEL', key) end end return n";
/// Pause between re-checks of ids another request holds.
const HELD_RECHECK: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisDedupError {
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    #[error("{0} message ids are being delivered by another request; retry shortly")]
    HeldElsewhere(usize),
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
    Commit { keys: Arc<Vec<String>> },
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
    ttl_seconds: i64,
    pending_ttl_ms: i64,
    health: Arc<DependencyHealth>,
}

pub struct RedisDedup {
    guard: Resilient<RedisCommand, RedisReply, RedisDedupError>,
    key_prefix: String,
    pending_wait: Duration,
    instance: String,
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
            pool,
            ttl_seconds: config.ttl_seconds as i64,
            pending_ttl_ms: config.pending_ttl_ms as i64,
            health: health.clone(),
        });
        let inner = CallService::new(tower::service_fn(move |command: RedisCommand| {
            let client = client.clone();
            async move { client.execute(command).await }
        }));
        Ok(RedisDedup {
            guard: Resilient::new(DEPENDENCY_NAME, inner, calls)?,
            key_prefix: config.key_prefix.clone(),
            pending_wait: Duration::from_millis(config.pending_wait_ms),
            instance: uuid::Uuid::new_v4().simple().to_string(),
            health,
        })
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
        format!("{}:{source}:{message_id}", self.key_prefix)
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
        let token: Arc<str> = Arc::from(format!("p:{}:{}", self.instance, uuid::Uuid::new_v4().simple()));
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
                HELD_RECHECK + Duration::from_millis(crate::resilience::random_below(HELD_RECHECK.as_millis() as u64));
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
            .call(RedisCommand::Commit {
                keys: Arc::new(claim.keys),
            })
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
            RedisCommand::Commit { keys } => self.commit_round(&keys).await.map(|()| RedisReply::Done),
            RedisCommand::Release { token, keys } => self.release_round(&token, &keys).await.map(|()| RedisReply::Done),
        };
        match &result {
            Ok(_) => self.health.record_success(DEPENDENCY_NAME),
            Err(error) => self.health.record_failure(error),
        }
        result
    }

    /// One script call (one round trip, one command for Redis to parse): per key,
    /// `SET key token NX GET PX pending_ttl`. `None`: another request holds the key.
    async fn claim_round(&self, token: &str, keys: &[String]) -> Result<Vec<Option<ClaimOutcome>>, RedisDedupError> {
        let answers: Result<Vec<i64>, _> = self
            .pool
            .next_connected()
            .eval(
                CLAIM_SCRIPT,
                keys.to_vec(),
                vec![token.to_string(), self.pending_ttl_ms.to_string()],
            )
            .await;
        count_round_trip("claim");
        let answers = answers.map_err(|e| unavailable("claim", e))?;
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

    /// One script call: per key, `SET key s EX ttl`.
    async fn commit_round(&self, keys: &[String]) -> Result<(), RedisDedupError> {
        let committed: Result<Value, _> = self
            .pool
            .next_connected()
            .eval(COMMIT_SCRIPT, keys.to_vec(), self.ttl_seconds.to_string())
            .await;
        count_round_trip("commit");
        committed.map(|_| ()).map_err(|e| unavailable("commit", e))
    }

    /// One script call: one round trip. (All keys in one call: standalone Redis or
    /// a single-shard setup, not Redis Cluster.)
    async fn release_round(&self, token: &str, keys: &[String]) -> Result<(), RedisDedupError> {
        let released: Result<Value, _> = self
            .pool
            .next_connected()
            .eval(RELEASE_SCRIPT, keys.to_vec(), token)
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
