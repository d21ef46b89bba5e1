//! The stop order, in one place. On SIGINT/SIGTERM:
//!
//! 1. stop accepting; readiness turns 503; WebSocket connections answer the
//!    frames they read and close with 1001;
//! 2. HTTP connections finish the request they serve (at most `shutdown_timeout`);
//! 3. WebSocket connections are waited for;
//! 4. pipeline tasks drain (requests handed over finish their writes);
//! 5. replayers and the policy applier stop: a replayer finishes the round under
//!    way (so what its sink took is deleted from the spool, not delivered again at
//!    the next start) and starts no new one; after `shutdown_timeout` what still
//!    runs is aborted (its records stay spooled: a record is deleted only after its
//!    sink acknowledged it);
//! 6. the sinks' tasks finish (batchers end once the last handle is gone).

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::intake::IntakeState;

/// How long the sinks' tasks may take to finish once everything else has.
const SINK_TASKS_TIMEOUT: Duration = Duration::from_secs(5);

/// The stop signal and the bound on each step.
pub(super) struct Shutdown {
    stop: watch::Receiver<bool>,
    timeout: Duration,
}

impl Shutdown {
    /// Waits for SIGINT/SIGTERM in the background; then marks intake as shutting
    /// down, tells WebSocket connections, and raises the stop signal.
    pub(super) fn listen(intake: Arc<IntakeState>, timeout: Duration) -> Shutdown {
        let (stop_sender, stop) = watch::channel(false);
        tokio::spawn(async move {
            wait_for_stop_signal().await;
            intake.shutting_down.store(true, Ordering::Relaxed);
            intake.websockets.begin_shutdown();
            tracing::info!("shutdown requested: no new connections; finishing in-flight requests");
            let _ = stop_sender.send(true);
        });
        Shutdown { stop, timeout }
    }

    /// Turns true on the stop signal; the listener stops accepting then.
    pub(super) fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.clone()
    }

    /// Steps 1 and 2: runs the listener until it has stopped and its connections
    /// finished, or until `timeout` after the stop signal.
    pub(super) async fn finish_serving(&self, serving: impl Future<Output = ()>) {
        let deadline = {
            let mut stop = self.stop.clone();
            let timeout = self.timeout;
            async move {
                let _ = stop.wait_for(|stopping| *stopping).await;
                tokio::time::sleep(timeout).await;
            }
        };
        tokio::select! {
            () = serving => {}
            () = deadline => tracing::warn!(timeout_ms = self.timeout.as_millis() as u64, "shutdown timeout: closing connections still open"),
        }
    }

    /// Steps 3 to 6.
    pub(super) async fn drain(
        &self,
        intake: Arc<IntakeState>,
        maintenance: Vec<JoinHandle<()>>,
        stop_maintenance: CancellationToken,
        sink_tasks: Vec<JoinHandle<()>>,
    ) {
        if !intake.websockets.wait_until_empty(self.timeout).await {
            tracing::warn!(
                open = intake.websockets.len(),
                "shutdown timeout: WebSocket connections still open"
            );
        }
        if !intake.pipeline.drain(self.timeout).await {
            tracing::warn!("shutdown timeout: some deliveries did not finish (their requests were not acknowledged)");
        }
        // The pipeline's handles on the sinks go with intake; the replayers' and the
        // policy applier's go with their tasks.
        drop(intake);
        stop_maintenance.cancel();
        let aborts: Vec<_> = maintenance.iter().map(JoinHandle::abort_handle).collect();
        let stopped = futures_util::future::join_all(maintenance);
        if tokio::time::timeout(self.timeout, stopped).await.is_err() {
            tracing::warn!("shutdown timeout: a replay round still under way was cut off (its records stay spooled)");
            for task in aborts {
                task.abort();
            }
        }
        // Every acknowledged batch is already durable; waiting for the sinks' tasks
        // just lets them finish cleanly once the last handle is gone.
        let finished = futures_util::future::join_all(sink_tasks);
        if tokio::time::timeout(SINK_TASKS_TIMEOUT, finished).await.is_err() {
            tracing::warn!("sink tasks still busy at exit");
        }
    }
}

async fn wait_for_stop_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
