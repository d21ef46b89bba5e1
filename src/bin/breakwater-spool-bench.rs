//! breakwater-spool-bench: a benchmark (not a test) of the spool on this disk, in
//! one run: (1) the disk's raw sequential write + fdatasync bandwidth, (2) spool
//! appends from concurrent writers (group-committed), as events/s, as MB/s of event
//! records made durable and of (compressed) bytes written, each also as a fraction
//! of (1), (3) replay of everything appended into the file sink (group
//! commit, fsync) through the default policy stack, as events/s. Bounded by
//! `--seconds` per phase; works in a temporary directory it deletes.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;

use breakwater::config::Config;
use breakwater::event::NormalizedEvent;
use breakwater::event::SinkBatch;
use breakwater::pipeline::assemble::build_delivery;
use breakwater::policy::LoadedPolicy;
use breakwater::spool::{encode, max_encoded_len};

/// The server's allocator (src/main.rs), so append and replay spend the CPU they
/// spend in the server (under glibc malloc a fifth of the replay's samples were
/// malloc and free).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "breakwater-spool-bench",
    about = "Spool append and replay throughput beside raw fdatasync bandwidth"
)]
struct Args {
    /// Seconds per phase.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent appenders (requests spooling at once).
    #[arg(long, default_value_t = 32)]
    writers: usize,
    /// Events per appended batch (one request's worth).
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Directory to work in (a temporary one inside it); default: the system temp dir.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Events per replay round, as the policy's `spool.replay_batch_events`.
    #[arg(long, default_value_t = 10_000)]
    replay_batch_events: usize,
}

/// ~400 bytes of event JSON, like breakwater-load's events after normalization.
fn batch(writer: usize, sequence: u64, size: usize) -> Arc<SinkBatch> {
    let events = (0..size)
        .map(|i| {
            let id = format!("b-{writer}-{sequence}-{i}");
            let json = format!(
                r#"{{"context":{{"ip":"192.0.2.10","library":{{"name":"analytics-python","version":"2.3.2"}},"locale":"de-DE"}},"event":"Product Viewed","messageId":"{id}","properties":{{"category":"outdoor","currency":"EUR","price":129.99,"product_id":"sku-{i}"}},"receivedAt":"2026-11-27T12:00:00.000Z","sourceName":"default","timestamp":"2026-11-27T12:00:00.000Z","type":"track","userId":"user-{i}"}}"#
            );
            NormalizedEvent {
                user_id: Some(format!("user-{i}")),
                anonymous_id: None,
                event_name: "Product Viewed".into(),
                timestamp_ms: 1_764_244_800_000,
                received_at_ms: 1_764_244_800_000,
                ..NormalizedEvent::fixture(&id, json.as_bytes())
            }
        })
        .collect();
    Arc::new(SinkBatch::new(Arc::from("default"), events))
}

/// Sequential writes of `chunk` bytes, each followed by fdatasync.
fn raw_fdatasync(dir: &std::path::Path, chunk: usize, seconds: u64) -> (f64, f64) {
    let path = dir.join("raw.bin");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("raw file");
    let data = vec![0x5a_u8; chunk];
    let started = Instant::now();
    let (mut bytes, mut syncs) = (0u64, 0u64);
    while started.elapsed() < Duration::from_secs(seconds) {
        file.write_all(&data).expect("write");
        file.sync_data().expect("fdatasync");
        bytes += chunk as u64;
        syncs += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    (bytes as f64 / elapsed / 1e6, syncs as f64 / elapsed)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix("breakwater-spool-bench")
        .tempdir_in(&base)
        .expect("temp dir");
    let sample = batch(0, 0, args.batch_size);
    // A batch's record uncompressed, and as stored (compressed).
    let record_bytes = max_encoded_len(&sample);
    let stored_bytes = encode(&sample, 0).len();

    // (1) Raw bandwidth, with the stored size of one append group as the chunk.
    let chunk = stored_bytes * args.writers;
    let (raw_mb_s, raw_syncs) = raw_fdatasync(work.path(), chunk, args.seconds);

    // (2) Spool appends. The file sink is the only sink; its spool queue is used directly.
    let mut config = Config::default();
    config.server.data_dir = work.path().join("data");
    let policy = LoadedPolicy::embedded();
    let delivery = build_delivery(&config, &policy.policy, &config.server.data_dir, None).expect("delivery");
    let route = delivery.routes[0].clone();
    route.queue.set_max_bytes(64 << 30);
    let appended = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let writers: Vec<_> = (0..args.writers)
        .map(|writer| {
            let queue = route.queue.clone();
            let appended = appended.clone();
            let size = args.batch_size;
            tokio::spawn(async move {
                let mut sequence = 0;
                while Instant::now() < deadline {
                    sequence += 1;
                    queue.append(batch(writer, sequence, size)).await.expect("append");
                    appended.fetch_add(size as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    let append_seconds = started.elapsed().as_secs_f64();
    let events = appended.load(Ordering::Relaxed);
    let append_events_s = events as f64 / append_seconds;
    let batches_s = events as f64 / args.batch_size as f64 / append_seconds;
    let append_mb_s = batches_s * record_bytes as f64 / 1e6;
    let stored_mb_s = batches_s * stored_bytes as f64 / 1e6;

    // (3) Replay everything appended into the file sink, through its policy stack.
    let started = Instant::now();
    let mut replayed = 0u64;
    loop {
        let records = route
            .queue
            .read_oldest(args.replay_batch_events, usize::MAX)
            .expect("read");
        if records.is_empty() {
            break;
        }
        let calls = records.iter().map(|r| route.sink.call(r.batch.clone()));
        for result in futures_util::future::join_all(calls).await {
            result.expect("replay into the file sink");
        }
        let keys: Vec<_> = records.iter().map(|r| r.record_key()).collect();
        route.queue.remove_keys(&keys).expect("remove");
        replayed += keys.iter().map(|k| k.events as u64).sum::<u64>();
    }
    let replay_seconds = started.elapsed().as_secs_f64();
    let replay_events_s = replayed as f64 / replay_seconds;
    // What the file sink wrote (and fdatasynced) while replaying: uncompressed JSON.
    let replay_written_bytes: u64 = breakwater::sinks::file::list_files(&config.server.data_dir.join("events"))
        .expect("list the file sink's files")
        .iter()
        .map(|(_, path)| std::fs::metadata(path).expect("file sink file").len())
        .sum();
    let replay_written_mb_s = replay_written_bytes as f64 / 1e6 / replay_seconds;

    let report = json!({
        "raw_fdatasync": { "chunk_bytes": chunk, "mb_per_s": raw_mb_s, "fsyncs_per_s": raw_syncs },
        "spool_append": {
            "writers": args.writers, "events_per_batch": args.batch_size,
            "record_bytes": record_bytes, "stored_record_bytes": stored_bytes,
            "events_per_s": append_events_s,
            "mb_per_s": append_mb_s, "fraction_of_raw_bandwidth": append_mb_s / raw_mb_s,
            "stored_mb_per_s": stored_mb_s, "stored_fraction_of_raw_bandwidth": stored_mb_s / raw_mb_s,
        },
        "replay_into_file_sink": {
            "events": replayed, "events_per_s": replay_events_s,
            "written_mb_per_s": replay_written_mb_s, "written_fraction_of_raw_bandwidth": replay_written_mb_s / raw_mb_s,
        },
    });
    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    eprintln!(
        "raw fdatasync {raw_mb_s:.1} MB/s ({raw_syncs:.0} syncs/s, {chunk} B chunks); spool append {append_events_s:.0} events/s = {append_mb_s:.1} MB/s of records = {:.0}% of raw, {stored_mb_s:.1} MB/s written ({record_bytes} B records stored in {stored_bytes} B) = {:.0}% of raw; replay into the file sink {replay_events_s:.0} events/s, writing {replay_written_mb_s:.1} MB/s = {:.0}% of raw",
        100.0 * append_mb_s / raw_mb_s,
        100.0 * stored_mb_s / raw_mb_s,
        100.0 * replay_written_mb_s / raw_mb_s
    );
}
