//! breakwater-count: the exactly-once oracle of the benchmarks (not a test). Counts
//! what reached the backends after a run: ClickHouse's raw rows (stop merges first:
//! a ReplacingMergeTree merge hides a row written twice) against its distinct
//! `(source_name, message_id)`s, and Kafka's records against their distinct
//! `messageId` headers; prints one JSON object. The caller compares the distinct
//! counts with the events the load generator saw acknowledged (nothing lost) and
//! the raw counts with the distinct ones (nothing twice). Loopback backends only.
//!
//!   breakwater-count --clickhouse http://127.0.0.1:8123 --kafka 127.0.0.1:9092 --topic events

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "breakwater-count",
    version,
    about = "Counts raw and distinct events in ClickHouse and Kafka"
)]
struct Args {
    /// ClickHouse HTTP address (e.g. http://127.0.0.1:8123).
    #[arg(long)]
    clickhouse: Option<String>,
    /// ClickHouse table, as `database.table`.
    #[arg(long, default_value = "breakwater.events")]
    table: String,
    /// Kafka bootstrap servers.
    #[arg(long)]
    kafka: Option<String>,
    /// Kafka topic.
    #[arg(long, default_value = "events")]
    topic: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let counted = [
        (
            "clickhouse",
            args.clickhouse.as_ref().map(|url| count_clickhouse(url, &args.table)),
        ),
        (
            "kafka",
            args.kafka.as_ref().map(|brokers| count_kafka(brokers, &args.topic)),
        ),
    ];
    let mut report = serde_json::Map::new();
    for (backend, counts) in counted {
        match counts {
            None => {}
            Some(Ok(counts)) => {
                report.insert(backend.into(), counts);
            }
            Some(Err(error)) => {
                eprintln!("error: {backend}: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("{}", serde_json::Value::Object(report));
    ExitCode::SUCCESS
}

fn count_clickhouse(url: &str, table: &str) -> Result<serde_json::Value, String> {
    let query = format!(
        "SELECT count(), uniqExact(source_name, message_id), \
         (SELECT count() FROM (SELECT 1 FROM {table} GROUP BY source_name, message_id HAVING count() > 1)) \
         FROM {table} FORMAT TabSeparated"
    );
    let answer = reqwest::blocking::Client::new()
        .post(url)
        .body(query)
        .send()
        .and_then(|response| response.error_for_status())
        .and_then(|response| response.text())
        .map_err(|e| e.to_string())?;
    let numbers: Vec<u64> = answer
        .split_whitespace()
        .map(|n| n.parse().map_err(|_| format!("unexpected answer: {answer}")))
        .collect::<Result<_, _>>()?;
    let [raw, distinct, doubled] = numbers[..] else {
        return Err(format!("unexpected answer: {answer}"));
    };
    Ok(json!({"raw_rows": raw, "distinct_events": distinct, "events_in_more_than_one_row": doubled}))
}

/// Reads the whole topic (committed records, as a downstream consumer does).
fn count_kafka(brokers: &str, topic: &str) -> Result<serde_json::Value, String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "breakwater-count")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| e.to_string())?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len() as i32)
        .ok_or("topic not found")?;
    let mut assignment = TopicPartitionList::new();
    let mut left = HashMap::new();
    let mut watermarks = Vec::new();
    for partition in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, timeout)
            .map_err(|e| e.to_string())?;
        watermarks.push((low, high));
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .map_err(|e| e.to_string())?;
        if high > 0 {
            left.insert(partition, high);
        }
    }
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    let mut counts: HashMap<Vec<u8>, u32> = HashMap::new();
    let mut records = 0u64;
    let mut per_partition = vec![(0u64, -1i64); partitions as usize];
    let mut last_progress = Instant::now();
    // Read past the watermarks taken at the start (a broker may report them late:
    // tansu's were behind what it served) until nothing more arrives: 2 s of quiet
    // once every partition reached its watermark, 15 s before.
    loop {
        let quiet = if left.is_empty() { 2 } else { 15 };
        if last_progress.elapsed() >= Duration::from_secs(quiet) {
            break;
        }
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        last_progress = Instant::now();
        records += 1;
        if let Some((count, last)) = per_partition.get_mut(message.partition() as usize) {
            *count += 1;
            *last = message.offset();
        }
        let id = message
            .headers()
            .and_then(|headers| headers.iter().find(|h| h.key == "messageId").and_then(|h| h.value))
            .unwrap_or_default();
        *counts.entry(id.to_vec()).or_default() += 1;
        if left
            .get(&message.partition())
            .is_some_and(|high| message.offset() + 1 >= *high)
        {
            left.remove(&message.partition());
        }
    }
    Ok(json!({
        "records": records,
        "distinct_events": counts.len(),
        "events_more_than_once": counts.values().filter(|n| **n > 1).count(),
        "partitions_not_read_to_the_end": left.len(),
        "partitions": watermarks.iter().zip(&per_partition).map(|((low, high), (count, last))| {
            json!({"low": low, "high": high, "records": count, "last_offset": last})
        }).collect::<Vec<_>>(),
    }))
}
