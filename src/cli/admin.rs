//! Offline operator tools on a data directory: spool statistics, replay and purge,
//! and the dead-letter store (list, show, requeue, purge). They take the data
//! directory's lock, so they refuse to run while a server uses it (a running server
//! shows its spool at `GET /admin/spool` and replays on its own).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::runtime;
use crate::config::Config;
use crate::event::{RequestEnd, SinkKind};
use crate::pipeline::assemble::{build_delivery, check_timings};
use crate::pipeline::route::{dead_letter, SinkRoute};
use crate::policy::{LoadedPolicy, Policy};
use crate::server::lock_data_dir;
use crate::spool::{RecordKey, Spool, StoredBatch};

/// What an admin command returns to the shell.
pub type AdminResult = Result<(), String>;

/// Opens the data directory's spool for offline use (no sinks are contacted).
fn open_spool(config: &Config) -> Result<(std::fs::File, Spool), String> {
    let data_dir = &config.server.data_dir;
    let lock = lock_data_dir(data_dir).map_err(|e| e.to_string())?;
    let policy = load_policy(config)?;
    let sinks: Vec<(SinkKind, u64)> = SinkKind::ALL
        .into_iter()
        .map(|sink| (sink, policy.policy.sink(sink).spool.max_bytes))
        .collect();
    let spool = Spool::open(&data_dir.join("spool"), &sinks).map_err(|e| e.to_string())?;
    Ok((lock, spool))
}

fn load_policy(config: &Config) -> Result<LoadedPolicy, String> {
    match &config.server.policy_file {
        Some(path) => LoadedPolicy::from_file(path).map_err(|e| e.to_string()),
        None => Ok(LoadedPolicy::embedded()),
    }
}

/// Asks before a destructive step, unless `yes`. Without a terminal, refuses.
fn confirm(question: &str, yes: bool) -> AdminResult {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(format!(
            "{question}\nrefusing without a terminal to confirm; pass --yes"
        ));
    }
    print!("{question} Type 'yes' to go on: ");
    std::io::stdout().flush().ok();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| e.to_string())?;
    if answer.trim() == "yes" {
        Ok(())
    } else {
        Err("cancelled".into())
    }
}

pub fn spool_stats(config: &Config) -> AdminResult {
    runtime()?.block_on(async {
        let (_lock, spool) = open_spool(config)?;
        println!(
            "{:<12} {:>10} {:>9} {:>14} {:>14} {:>12}",
            "sink", "events", "records", "bytes", "max_bytes", "oldest_s"
        );
        for queue in spool.queues() {
            let stats = queue.stats();
            let oldest = stats
                .oldest_age_seconds
                .map(|s| format!("{s:.0}"))
                .unwrap_or_else(|| "-".into());
            println!(
                "{:<12} {:>10} {:>9} {:>14} {:>14} {:>12}",
                stats.sink, stats.events, stats.records, stats.bytes, stats.max_bytes, oldest
            );
        }
        let dead = spool.dead_letters().map_err(|e| e.to_string())?;
        let dead_events: usize = dead.iter().map(|d| d.batch.events.len()).sum();
        println!("dead letters: {} records, {dead_events} events", dead.len());
        println!(
            "quarantined records: {}",
            spool.quarantined().map_err(|e| e.to_string())?
        );
        println!("spool file: {}", spool.path().display());
        spool.close().await;
        Ok(())
    })
}

/// Delivers every spooled batch now, through the configured sinks and the same
/// policy stacks the server uses, with a progress bar; stops at the first sink
/// that is still failing.
pub fn spool_replay(config: &Config) -> AdminResult {
    runtime()?.block_on(async {
        let data_dir = config.server.data_dir.clone();
        let _lock = lock_data_dir(&data_dir).map_err(|e| e.to_string())?;
        let policy = load_policy(config)?;
        let delivery = build_delivery(config, &policy.policy, &data_dir, None).map_err(|e| e.to_string())?;
        for route in &delivery.routes {
            replay_queue(&delivery.spool, route, &policy.policy).await?;
        }
        Ok(())
    })
}

/// Replayed records are deleted: a sink waiting for their end (Kafka's in-doubt
/// journal) may close them.
fn settle(records: &[StoredBatch]) {
    for record in records {
        record.batch.end(RequestEnd::Settled);
    }
}

/// Replays one sink's queue, round by round, until it is empty or the sink fails.
async fn replay_queue(spool: &Arc<Spool>, route: &SinkRoute, policy: &Policy) -> AdminResult {
    let total = route.queue.events();
    if total == 0 {
        return Ok(());
    }
    let bar = progress(total, route.kind.name());
    let batch_events = policy.sink(route.kind).spool.replay_batch_events;
    loop {
        let records = route
            .queue
            .read_oldest(batch_events, usize::MAX)
            .map_err(|e| e.to_string())?;
        if records.is_empty() {
            break;
        }
        let mut done: Vec<RecordKey> = Vec::new();
        for record in &records {
            if let Err(error) = replay_record(spool, route, record).await {
                route.queue.remove_keys(&done).map_err(|e| e.to_string())?;
                settle(&records[..done.len()]);
                bar.abandon_with_message(format!("stopped: {error}"));
                return Err(format!("{} is still failing: {error}", route.kind.name()));
            }
            done.push(record.record_key());
            bar.inc(record.batch.events.len() as u64);
        }
        route.queue.remove_keys(&done).map_err(|e| e.to_string())?;
        settle(&records);
    }
    bar.finish_with_message("replayed");
    Ok(())
}

/// One record through the sink's stack; a batch rejected for good is dead-lettered
/// (and counts as done). Err: the sink is still failing.
async fn replay_record(spool: &Arc<Spool>, route: &SinkRoute, record: &StoredBatch) -> AdminResult {
    match route.sink.call(record.batch.clone()).await {
        Ok(()) => Ok(()),
        Err(error) if !error.is_retryable() => dead_letter(spool, route.kind, &error, record.batch.clone())
            .await
            .map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    }
}

/// Deletes spooled events (one sink's or all). They will never be delivered.
pub fn spool_purge(config: &Config, sink: Option<&str>, yes: bool) -> AdminResult {
    runtime()?.block_on(async {
        let (_lock, spool) = open_spool(config)?;
        let queues: Vec<_> = spool
            .queues()
            .iter()
            .filter(|q| sink.is_none_or(|s| s == q.sink.name()))
            .cloned()
            .collect();
        if queues.is_empty() {
            return Err(format!("no spool queue named {}", sink.unwrap_or("-")));
        }
        let events: u64 = queues.iter().map(|q| q.events()).sum();
        confirm(
            &format!("This deletes {events} spooled events; they will never be delivered."),
            yes,
        )?;
        for queue in &queues {
            let dropped = queue.purge().map_err(|e| e.to_string())?;
            println!("{}: purged {dropped} events", queue.sink);
        }
        drop(queues);
        spool.close().await;
        Ok(())
    })
}

pub fn dlq_list(config: &Config, after: Option<u64>, limit: usize) -> AdminResult {
    runtime()?.block_on(async {
        let (_lock, spool) = open_spool(config)?;
        let total = spool.dead_letter_count().map_err(|e| e.to_string())?;
        let (letters, next) = spool.dead_letter_page(after, limit.max(1)).map_err(|e| e.to_string())?;
        println!(
            "{:>6} {:<12} {:>7} {:<20} error",
            "key", "sink", "events", "rejected_at"
        );
        for letter in &letters {
            let at = chrono::DateTime::from_timestamp_millis(letter.created_at_ms)
                .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_default();
            println!(
                "{:>6} {:<12} {:>7} {:<20} {}",
                letter.key,
                letter.sink,
                letter.batch.events.len(),
                at,
                letter.error
            );
        }
        println!("{total} dead-letter records");
        if let Some(next) = next {
            println!("more: dlq list --after {next}");
        }
        spool.close().await;
        Ok(())
    })
}

pub fn dlq_show(config: &Config, key: u64) -> AdminResult {
    runtime()?.block_on(async {
        let (_lock, spool) = open_spool(config)?;
        let letters = spool.dead_letters().map_err(|e| e.to_string())?;
        let letter = letters
            .iter()
            .find(|l| l.key == key)
            .ok_or_else(|| format!("no dead letter with key {key}"))?;
        println!(
            "sink: {}\nerror: {}\nevents: {}",
            letter.sink,
            letter.error,
            letter.batch.events.len()
        );
        for event in &letter.batch.events {
            println!("{}", String::from_utf8_lossy(&event.json));
        }
        drop(letters);
        spool.close().await;
        Ok(())
    })
}

/// What to do with selected dead letters.
#[derive(Debug, Clone, Copy)]
pub enum DeadLetterAction {
    /// Move back into the sink's spool; the server delivers them when it next runs.
    Requeue,
    /// Delete for good.
    Purge,
}

/// Applies `action` to the dead letters in `keys` (all when empty), after asking.
pub fn dlq_apply(config: &Config, keys: &[u64], action: DeadLetterAction, yes: bool) -> AdminResult {
    runtime()?.block_on(async {
        let (_lock, spool) = open_spool(config)?;
        let selection = (!keys.is_empty()).then_some(keys);
        let which = if keys.is_empty() {
            "all".to_string()
        } else {
            keys.len().to_string()
        };
        let question = match action {
            DeadLetterAction::Requeue => {
                format!("This moves {which} dead letters back into their sink's spool for another try.")
            }
            DeadLetterAction::Purge => format!("This deletes {which} dead letters for good."),
        };
        confirm(&question, yes)?;
        match action {
            DeadLetterAction::Requeue => {
                let moved = spool.requeue_dead_letters(selection).map_err(|e| e.to_string())?;
                println!("requeued {moved} events; the server replays them when it runs");
            }
            DeadLetterAction::Purge => {
                let removed = spool.purge_dead_letters(selection).map_err(|e| e.to_string())?;
                println!("deleted {removed} dead-letter records");
            }
        }
        spool.close().await;
        Ok(())
    })
}

/// Validates a policy file or every `*.toml` in a directory and prints the
/// effective policy of each valid file.
/// Validates policy files; with a server config, also their timings against it.
pub fn policy_check(target: &Path, server: Option<&Config>) -> AdminResult {
    let results: Vec<(PathBuf, Result<LoadedPolicy, crate::policy::PolicyError>)> = if target.is_dir() {
        crate::policy::check_dir(target)?
    } else {
        vec![(target.to_path_buf(), LoadedPolicy::from_file(target))]
    };
    if results.is_empty() {
        return Err(format!("no *.toml policy files in {}", target.display()));
    }
    let mut invalid = 0;
    for (path, result) in &results {
        let timing = match (result, server) {
            (Ok(loaded), Some(config)) => check_timings(config, &loaded.policy).err(),
            _ => None,
        };
        if let Some(error) = timing {
            invalid += 1;
            println!("INVALID {}: {error}", path.display());
            continue;
        }
        match result {
            Ok(loaded) => {
                println!(
                    "ok      {} (version \"{}\", hash {})",
                    path.display(),
                    loaded.policy.version,
                    loaded.hash
                );
                let effective = toml::to_string(&loaded.policy).map_err(|e| e.to_string())?;
                for line in effective.lines() {
                    println!("        {line}");
                }
            }
            Err(error) => {
                invalid += 1;
                println!("INVALID {error}");
            }
        }
    }
    if invalid > 0 {
        Err(format!("{invalid} of {} policy files are invalid", results.len()))
    } else {
        Ok(())
    }
}

fn progress(total: u64, sink: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos}/{len} events {per_sec} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(sink.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
