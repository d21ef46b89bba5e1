//! Per-source rate limits: one token bucket of events per source (per write key),
//! so one noisy producer gets `429` while every other source keeps its own budget.
//!
//! A request is admitted while its source's bucket holds any tokens and then takes
//! all its events, going into debt if it is larger than what is left; the debt is
//! paid back at the source's rate before the next request passes. So a source
//! averages its rate whatever its batch sizes, and `Retry-After` says how long the
//! debt takes to clear. Checked after the body is parsed (the event count is needed)
//! and before dedup or any sink, so a refused request costs no backend work.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{LimitsConfig, SourceConfig};

/// A source's limit: a sustained rate and the burst it may send at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EventRate {
    pub per_second: f64,
    pub burst: f64,
}

impl EventRate {
    /// `None` when `per_second` is 0 (unlimited); a burst of 0 means one second's worth.
    pub fn new(per_second: u64, burst: u64) -> Option<EventRate> {
        (per_second > 0).then_some(EventRate {
            per_second: per_second as f64,
            burst: if burst == 0 { per_second } else { burst } as f64,
        })
    }
}

/// What a refused request is told: the source's rate, and when it may send again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OverLimit {
    pub rate: EventRate,
    pub retry_after: Duration,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    fn admit(&mut self, rate: EventRate, events: usize, now: Instant) -> Result<(), OverLimit> {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.refilled = now;
        if self.tokens <= 0.0 {
            return Err(OverLimit {
                rate,
                retry_after: Duration::from_secs_f64(-self.tokens / rate.per_second),
            });
        }
        self.tokens -= events as f64;
        Ok(())
    }
}

/// Every limited source's bucket. Sources without a limit have no entry and cost
/// nothing on the hot path.
#[derive(Default)]
pub struct SourceRateLimits {
    buckets: HashMap<String, (EventRate, Mutex<Bucket>)>,
}

impl SourceRateLimits {
    /// A bucket for each source: its own `events_per_second` / `burst_events` when
    /// its `[[sources]]` entry sets them, else `[limits]`'s per-source default.
    pub fn new<'a>(
        limits: &LimitsConfig,
        configured: &[SourceConfig],
        source_names: impl IntoIterator<Item = &'a str>,
    ) -> SourceRateLimits {
        let now = Instant::now();
        let buckets = source_names
            .into_iter()
            .filter_map(|name| {
                let own = configured.iter().find(|source| source.name == name);
                let per_second = own
                    .and_then(|s| s.events_per_second)
                    .unwrap_or(limits.source_events_per_second);
                let burst = own.and_then(|s| s.burst_events).unwrap_or(limits.source_burst_events);
                let rate = EventRate::new(per_second, burst)?;
                let bucket = Bucket {
                    tokens: rate.burst,
                    refilled: now,
                };
                Some((name.to_string(), (rate, Mutex::new(bucket))))
            })
            .collect();
        SourceRateLimits { buckets }
    }

    /// The limit of `source`, if it has one.
    pub fn rate(&self, source: &str) -> Option<EventRate> {
        self.buckets.get(source).map(|(rate, _)| *rate)
    }

    /// Admits `events` for `source`, or says its rate and how long until it may
    /// send again.
    pub fn admit(&self, source: &str, events: usize) -> Result<(), OverLimit> {
        match self.buckets.get(source) {
            None => Ok(()),
            Some((rate, bucket)) => {
                bucket
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .admit(*rate, events, Instant::now())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(per_second: u64, burst: u64) -> (EventRate, Bucket) {
        let rate = EventRate::new(per_second, burst).unwrap();
        let bucket = Bucket {
            tokens: rate.burst,
            refilled: Instant::now(),
        };
        (rate, bucket)
    }

    #[test]
    fn a_burst_passes_then_debt_is_paid_back_at_the_rate() {
        let (rate, mut bucket) = bucket(100, 200);
        let start = bucket.refilled;
        assert!(bucket.admit(rate, 150, start).is_ok());
        assert!(
            bucket.admit(rate, 150, start).is_ok(),
            "50 tokens left: admitted, 100 in debt"
        );
        let wait = bucket.admit(rate, 1, start).unwrap_err().retry_after;
        assert_eq!(wait, Duration::from_secs(1), "100 events of debt at 100/s");
        assert!(bucket.admit(rate, 1, start + Duration::from_millis(500)).is_err());
        assert!(bucket.admit(rate, 1, start + Duration::from_millis(1001)).is_ok());
    }

    #[test]
    fn the_average_rate_holds_whatever_the_batch_size() {
        let (rate, mut bucket) = bucket(1_000, 0);
        let start = bucket.refilled;
        let mut admitted = 0;
        for millis in 0..10_000u64 {
            if bucket.admit(rate, 500, start + Duration::from_millis(millis)).is_ok() {
                admitted += 500;
            }
        }
        // 10 s at 1,000/s plus the first second's burst (and one batch of overshoot).
        assert!((10_000..=11_500).contains(&admitted), "{admitted}");
    }

    #[test]
    fn sources_get_their_own_limit_or_the_default_and_zero_means_unlimited() {
        let limits = LimitsConfig {
            source_events_per_second: 50,
            ..LimitsConfig::default()
        };
        let configured = vec![
            SourceConfig {
                name: "batch-jobs".into(),
                events_per_second: Some(5_000),
                burst_events: Some(20_000),
                ..SourceConfig::default()
            },
            SourceConfig {
                name: "trusted".into(),
                events_per_second: Some(0),
                ..SourceConfig::default()
            },
        ];
        let limits = SourceRateLimits::new(&limits, &configured, ["web", "batch-jobs", "trusted"]);
        assert_eq!(
            limits.rate("web"),
            Some(EventRate {
                per_second: 50.0,
                burst: 50.0
            })
        );
        assert_eq!(
            limits.rate("batch-jobs"),
            Some(EventRate {
                per_second: 5_000.0,
                burst: 20_000.0
            })
        );
        assert_eq!(limits.rate("trusted"), None);
        assert!(limits.admit("trusted", 1_000_000).is_ok());
        assert!(
            limits.admit("web", 60).is_ok(),
            "the burst, and 10 events of debt (0.2 s)"
        );
        assert!(limits.admit("web", 1).is_err());
        assert!(
            limits.admit("batch-jobs", 1).is_ok(),
            "one source's debt is not another's"
        );
    }
}
