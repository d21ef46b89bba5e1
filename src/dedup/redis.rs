//! Dedup shared by every instance through Redis (fred): one pooled client for the
//! process, one pipelined round trip per request for the check, one for the commit.
//!
//! Per id, the key `<prefix>:<source>:<messageId>` holds either a claim token (a
//! request somewhere is delivering it; expires after `pending_ttl_ms`) or `s`
//! (delivered; expires after `ttl_seconds`). Claim is `SET NX GET PX`: one command
//! says "mine now", "already delivered" or "someone else's". Commit overwrites the
//! claim with `s` only after the events are durable; a failed request deletes its
//! own claims (compare-and-delete), so the client's retry is free to succeed.

use std::sync::Arc;
use std::time::Duration;

use fred::clients::Pool;
use fred::interfaces::{ClientLike, KeysInterface, LuaInterface};
use fred::prelude::{Builder, Config as FredConfig, Expiration, ReconnectPolicy, SetOptions, Value};

use crate::config::{redact_url, RedisConfig};
use crate::telemetry::health::DependencyHealth;
use crate::telemetry::metric;

pub const DEPENDENCY_NAME: &str = "redis";

/// Value of a key whose event is delivered.
const SEEN: &str = "s";
/// Deletes each key that still holds the caller's claim token (and no other).
const RELEASE_SCRIPT: &str = "local n = 0 for _, key in ipairs(KEYS) do if redis.call('GET', key) == ARGV[1] then n = n + redis.call('DEL', key) end end return n";
/// Pause between re-checks of ids another request holds.
const HELD_RECHECK: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum RedisDedupError {
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    #[error("{0} message ids are being delivered by another request; retry shortly")]
    HeldElsewhere(usize),
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
    token: String,
    keys: Vec<String>,
}

impl Claim {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

pub struct RedisDedup {
    pool: Pool,
    key_prefix: String,
    ttl_seconds: i64,
    pending_ttl_ms: i64,
    pending_wait: Duration,
    instance: String,
    health: Arc<DependencyHealth>,
}

impl RedisDedup {
    /// Builds the pool and starts connecting in the background: a Redis that is down
    /// at start-up delays nothing (commands fail after `command_timeout_ms`).
    pub fn connect(config: &RedisConfig) -> Result<RedisDedup, String> {
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
        Ok(RedisDedup {
            pool,
            key_prefix: config.key_prefix.clone(),
            ttl_seconds: config.ttl_seconds as i64,
            pending_ttl_ms: config.pending_ttl_ms as i64,
            pending_wait: Duration::from_millis(config.pending_wait_ms),
            instance: uuid::Uuid::new_v4().simple().to_string(),
            health: Arc::new(DependencyHealth::default()),
        })
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
        let token = format!("p:{}:{}", self.instance, uuid::Uuid::new_v4().simple());
        let keys: Vec<String> = message_ids.iter().map(|id| self.key(source, id)).collect();
        let deadline = tokio::time::Instant::now() + self.pending_wait;
        // "Seen" is final; only the other ids are claimed again on a retry.
        let mut seen = vec![false; keys.len()];
        loop {
            let open: Vec<usize> = (0..keys.len()).filter(|i| !seen[*i]).collect();
            let answers = self.claim_round(&token, open.iter().map(|i| keys[*i].as_str())).await?;
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
            let pause = HELD_RECHECK + Duration::from_millis(rand_millis(HELD_RECHECK.as_millis() as u64));
            if tokio::time::Instant::now() + pause > deadline {
                return Err(RedisDedupError::HeldElsewhere(held));
            }
            metrics::counter!(metric::DEDUP_WAITS).increment(1);
            tokio::time::sleep(pause).await;
        }
    }

    /// One pipelined `SET key token NX GET PX pending_ttl` per key. `None`: another
    /// request holds the key.
    async fn claim_round<'a>(
        &self,
        token: &str,
        keys: impl Iterator<Item = &'a str>,
    ) -> Result<Vec<Option<ClaimOutcome>>, RedisDedupError> {
        let pipeline = self.pool.next_connected().pipeline();
        for key in keys {
            let _: () = pipeline
                .set(
                    key,
                    token,
                    Some(Expiration::PX(self.pending_ttl_ms)),
                    Some(SetOptions::NX),
                    true,
                )
                .await
                .map_err(|e| self.unavailable("claim", e))?;
        }
        let replies = pipeline.try_all::<Value>().await;
        self.count_round_trip("claim");
        let mut outcomes = Vec::with_capacity(replies.len());
        for reply in replies {
            let value = reply.map_err(|e| self.unavailable("claim", e))?;
            outcomes.push(match value {
                Value::Null => Some(ClaimOutcome::Claimed),
                other if other.as_str().as_deref() == Some(SEEN) => Some(ClaimOutcome::Seen),
                _ => None,
            });
        }
        self.health.record_success(DEPENDENCY_NAME);
        Ok(outcomes)
    }

    /// Marks the claimed ids delivered. Call only once their events are durable.
    pub async fn commit(&self, claim: Claim) -> Result<(), RedisDedupError> {
        if claim.is_empty() {
            return Ok(());
        }
        let pipeline = self.pool.next_connected().pipeline();
        for key in &claim.keys {
            let _: () = pipeline
                .set(key.as_str(), SEEN, Some(Expiration::EX(self.ttl_seconds)), None, false)
                .await
                .map_err(|e| self.unavailable("commit", e))?;
        }
        let replies = pipeline.try_all::<Value>().await;
        self.count_round_trip("commit");
        for reply in replies {
            reply.map_err(|e| self.unavailable("commit", e))?;
        }
        Ok(())
    }

    /// Frees this request's claims (best effort: unreleased claims expire after
    /// `pending_ttl_ms`).
    pub async fn release(&self, claim: &Claim) {
        if claim.is_empty() {
            return;
        }
        // One script call: one round trip. (All keys in one call: standalone Redis or
        // a single-shard setup, not Redis Cluster.)
        let released: Result<Value, _> = self
            .pool
            .next_connected()
            .eval(RELEASE_SCRIPT, claim.keys.clone(), claim.token.as_str())
            .await;
        self.count_round_trip("release");
        if let Err(error) = released {
            let error = self.unavailable("release", error);
            tracing::warn!(%error, keys = claim.keys.len(), "claims not released; they expire on their own");
        }
    }

    fn unavailable(&self, operation: &'static str, error: fred::error::Error) -> RedisDedupError {
        metrics::counter!(metric::REDIS_ERRORS, "operation" => operation).increment(1);
        let error = RedisDedupError::Unavailable(error.to_string());
        self.health.record_failure(&error);
        error
    }

    fn count_round_trip(&self, operation: &'static str) {
        metrics::counter!(metric::REDIS_ROUND_TRIPS, "operation" => operation).increment(1);
    }
}

/// A pseudo-random number below `bound`, for jitter (not for anything secret).
fn rand_millis(bound: u64) -> u64 {
    let random = uuid::Uuid::new_v4().as_u128() as u64;
    random % bound.max(1)
}
