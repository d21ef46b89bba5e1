//! Wall-clock time and jitter, in one place so every stage reads time the same way.
//!
//! Invariant: `clock` imports nothing from the crate.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the system clock is before it).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A pseudo-random number below `bound`, for jitter (not for anything secret).
pub fn random_below(bound: u64) -> u64 {
    (uuid::Uuid::new_v4().as_u128() as u64) % bound.max(1)
}
