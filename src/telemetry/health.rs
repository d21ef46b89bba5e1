//! Health of one dependency: whether its last call failed, and why. Shared by the
//! sinks, the Redis dedup and the readiness endpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Last known state of a dependency (a sink, Redis), for `/health/ready` and logs.
#[derive(Debug, Default)]
pub struct DependencyHealth {
    failing: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl DependencyHealth {
    pub fn record_success(&self, dependency: &'static str) {
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!(dependency, "dependency recovered");
        }
    }

    pub fn record_failure(&self, error: &dyn std::fmt::Display) {
        if !self.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(%error, "dependency failing");
        }
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
    }

    pub fn is_healthy(&self) -> bool {
        !self.failing.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
