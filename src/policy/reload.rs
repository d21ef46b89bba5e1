//! Hot reload: the running policy file is polled; a change is applied once the
//! file has stopped changing for one poll interval (editors write in steps). An
//! invalid edit keeps the running policy, logs why and counts it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::{parse, LoadedPolicy};
use crate::telemetry::metric;

/// How often the file is looked at.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Starts watching `path`; the receiver always holds the policy in force.
pub fn watch_file(path: PathBuf, initial: LoadedPolicy) -> watch::Receiver<Arc<LoadedPolicy>> {
    let (sender, receiver) = watch::channel(Arc::new(initial));
    tokio::spawn(async move {
        let mut last_seen = file_digest(&path);
        let mut applied = last_seen.clone();
        loop {
            tokio::time::sleep(POLL_INTERVAL).await;
            if sender.is_closed() {
                return;
            }
            let now = file_digest(&path);
            // Debounce: act only when the content is the same as one poll ago.
            if now != last_seen {
                last_seen = now;
                continue;
            }
            if now == applied {
                continue;
            }
            applied = now.clone();
            let Some(text) = now.map(|(text, _)| text) else {
                metrics::counter!(metric::POLICY_RELOADS, "result" => "invalid").increment(1);
                tracing::error!(file = %path.display(), "policy file disappeared; keeping the running policy");
                continue;
            };
            match parse(&text, &path.display().to_string(), Some(path.clone())) {
                Ok(loaded) => {
                    metrics::counter!(metric::POLICY_RELOADS, "result" => "applied").increment(1);
                    tracing::info!(file = %path.display(), version = loaded.policy.version, hash = loaded.hash, "policy reloaded");
                    sender.send_replace(Arc::new(loaded));
                }
                Err(error) => {
                    metrics::counter!(metric::POLICY_RELOADS, "result" => "invalid").increment(1);
                    tracing::error!(%error, "invalid policy edit; keeping the running policy");
                }
            }
        }
    });
    receiver
}

fn file_digest(path: &std::path::Path) -> Option<(String, [u8; 32])> {
    let text = std::fs::read_to_string(path).ok()?;
    let digest = Sha256::digest(text.as_bytes()).into();
    Some((text, digest))
}
