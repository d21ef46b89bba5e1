//! The retry loop: exponential backoff, full jitter and a budget, so a struggling
//! dependency never sees a retry storm. Only retryable errors are retried.

use std::time::Duration;

use tower::retry::budget::{Budget, TpsBudget};
use tower::ServiceExt;

use super::{CallError, CallService};
use crate::clock::random_below;
use crate::policy::{Jitter, RetryPolicy};
use crate::telemetry::metric;

pub(super) async fn call_with_retries<Req, Res, E>(
    name: &'static str,
    service: &CallService<Req, Res, E>,
    request: Req,
    retry: &RetryPolicy,
    budget: &TpsBudget,
) -> Result<Res, E>
where
    Req: Clone + Send + 'static,
    E: CallError,
{
    budget.deposit();
    let mut attempt = 1;
    loop {
        let result = service.clone().oneshot(request.clone()).await;
        let error = match result {
            Ok(response) => return Ok(response),
            Err(error) => error,
        };
        if !error.is_retryable() || attempt >= retry.max_attempts || !budget.withdraw() {
            return Err(error);
        }
        let backoff = retry.backoff(attempt);
        let sleep = match retry.jitter {
            Jitter::Full => Duration::from_millis(random_below(backoff.as_millis() as u64 + 1)),
            Jitter::None => backoff,
        };
        metrics::counter!(metric::RETRIES, "dependency" => name).increment(1);
        tracing::debug!(dependency = name, attempt, %error, sleep_ms = sleep.as_millis() as u64, "retrying");
        tokio::time::sleep(sleep).await;
        attempt += 1;
    }
}
