//! One memory budget, in bytes, for everything requests, WebSocket frames and
//! replay rounds hold: from the first body byte (or the frame) until the pipeline
//! task that carries its events ends, whether or not the client is still there.
//!
//! Intake takes a hold before it reads a body (its declared length, or the most a
//! body may decompress to, times `HELD_PER_BODY_BYTE` for the parsed and normalized
//! copies) and hands it to the pipeline task; a request over the budget is refused at
//! once (`503 memory_budget`, a retryable nack on WebSocket), never queued. A replay
//! round waits for room instead: replay can always come later.
//!
//! Invariant: a hold is released exactly when what it stands for is dropped.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::telemetry::metric;

pub use crate::config::HELD_PER_BODY_BYTE;

/// The budget; cheap to clone.
#[derive(Clone)]
pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    total_kib: u32,
}

/// Room held in the budget until dropped.
pub struct BudgetHold {
    _permit: OwnedSemaphorePermit,
    kib: u32,
}

impl Drop for BudgetHold {
    fn drop(&mut self) {
        metrics::gauge!(metric::MEMORY_BUDGET_HELD_BYTES).decrement(f64::from(self.kib) * 1024.0);
    }
}

impl MemoryBudget {
    pub fn new(bytes: u64) -> MemoryBudget {
        let total_kib = bytes.div_ceil(1024).clamp(1, u64::from(u32::MAX >> 4)) as u32;
        metrics::gauge!(metric::MEMORY_BUDGET_BYTES).set(f64::from(total_kib) * 1024.0);
        MemoryBudget {
            permits: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
        }
    }

    /// Room for `bytes` now, or `None` when the budget lacks it. A hold larger than
    /// the whole budget takes the whole budget (so it can still go through alone).
    pub fn try_hold(&self, bytes: u64) -> Option<BudgetHold> {
        let kib = self.kib(bytes);
        let permit = self.permits.clone().try_acquire_many_owned(kib).ok()?;
        Some(self.held(permit, kib))
    }

    /// Room for `bytes`, waiting for it.
    pub async fn hold(&self, bytes: u64) -> BudgetHold {
        let kib = self.kib(bytes);
        let permit = self
            .permits
            .clone()
            .acquire_many_owned(kib)
            .await
            .expect("the budget's semaphore is never closed");
        self.held(permit, kib)
    }

    pub fn total_bytes(&self) -> u64 {
        u64::from(self.total_kib) * 1024
    }

    fn kib(&self, bytes: u64) -> u32 {
        bytes.div_ceil(1024).clamp(1, u64::from(self.total_kib)) as u32
    }

    fn held(&self, permit: OwnedSemaphorePermit, kib: u32) -> BudgetHold {
        metrics::gauge!(metric::MEMORY_BUDGET_HELD_BYTES).increment(f64::from(kib) * 1024.0);
        BudgetHold { _permit: permit, kib }
    }
}

/// The default budget: a quarter of the machine's memory (`MemTotal`, or the
/// cgroup's limit when lower), between 256 MiB and 4 GiB; 1 GiB when neither can be
/// read.
pub fn default_budget_bytes() -> u64 {
    const MIB: u64 = 1024 * 1024;
    let machine = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    });
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok());
    match machine.into_iter().chain(cgroup).min() {
        Some(memory) => (memory / 4).clamp(256 * MIB, 4096 * MIB),
        None => 1024 * MIB,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_are_refused_past_the_budget_and_given_back_when_dropped() {
        let budget = MemoryBudget::new(10 * 1024);
        let first = budget.try_hold(6 * 1024).unwrap();
        assert!(budget.try_hold(6 * 1024).is_none(), "over the budget");
        let small = budget.try_hold(4 * 1024).unwrap();
        drop(first);
        assert!(budget.try_hold(6 * 1024).is_some());
        drop(small);
        // Larger than the whole budget: takes all of it, alone.
        let whole = budget.try_hold(1 << 30).unwrap();
        assert!(budget.try_hold(1).is_none());
        drop(whole);
    }

    #[test]
    fn the_default_is_a_quarter_of_memory_within_bounds() {
        let bytes = default_budget_bytes();
        assert!((256 << 20..=4096 << 20).contains(&bytes), "{bytes}");
    }
}
