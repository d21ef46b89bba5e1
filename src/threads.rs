//! Which kind of thread code runs on. The runtime's worker threads run every async
//! task; a blocking call there (a redb read or commit, an fsync) stalls every task
//! queued behind it, so such calls go to the blocking pool. `cli::runtime` marks its
//! workers, and blocking stores (the spool) check, in debug builds, that they are not
//! called on one: the tests run debug builds, so a call that slips onto a worker
//! fails them.
//!
//! Invariant: imports nothing from the crate.

use std::cell::Cell;

thread_local! {
    static RUNTIME_WORKER: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current thread as a runtime worker (from the runtime's
/// `on_thread_park`, which only workers call).
pub fn mark_runtime_worker() {
    RUNTIME_WORKER.with(|worker| worker.set(true));
}

/// Whether the current thread is a marked runtime worker.
pub fn on_runtime_worker() -> bool {
    RUNTIME_WORKER.with(Cell::get)
}

/// Debug builds: panics if a blocking `operation` runs on a runtime worker.
#[track_caller]
pub fn debug_assert_blocking_allowed(operation: &str) {
    debug_assert!(
        !on_runtime_worker(),
        "{operation} on a runtime worker thread: run it on the blocking pool (tokio::task::spawn_blocking)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_marked_threads_are_workers() {
        assert!(!on_runtime_worker());
        let marked = std::thread::spawn(|| {
            mark_runtime_worker();
            on_runtime_worker()
        });
        assert!(marked.join().unwrap());
        assert!(!on_runtime_worker(), "the mark is the thread's own");
    }

    #[test]
    #[cfg(debug_assertions)]
    fn a_blocking_call_on_a_worker_panics_in_debug_builds() {
        let outcome = std::thread::spawn(|| {
            mark_runtime_worker();
            debug_assert_blocking_allowed("a spool read");
        })
        .join();
        assert!(outcome.is_err());
    }
}
