//! Rate-limited warnings: when the same problem repeats on every request (a sink
//! down, a spool full), the log gets one line per interval saying how many were
//! left out, not one line per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One warning site's budget: at most one line per `every`.
pub struct Throttle {
    every: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl Throttle {
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be written now (`n` were left out since the last
    /// one); `None` when this one is left out.
    pub fn allow(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| at.elapsed() < self.every) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(Instant::now());
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// The interval used for repeated warnings.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_of_the_rest() {
        let throttle = Throttle::new(Duration::from_millis(50));
        assert_eq!(throttle.allow(), Some(0));
        for _ in 0..99 {
            assert_eq!(throttle.allow(), None);
        }
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(throttle.allow(), Some(99));
    }
}
