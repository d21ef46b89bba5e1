//! breakwater is killed (`kill -9`) while a batch it handed to the broker is still
//! unanswered; the broker writes it anyway. The client never got its answer and
//! resends the same request (same messageIds) to the restarted server. Sending it
//! again as new messages would put it in the topic twice (issue 19: 400 events twice
//! in an independent harness). The in-doubt marks written before the produce outlive
//! the process: the restarted server reads the topic back and leaves out what is
//! there.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use support::backends::Kafka;
use support::*;

const EVENTS: usize = 20;

#[test]
fn a_resent_batch_that_reached_kafka_before_the_crash_is_not_written_again() {
    let kafka = Kafka::start_persistent();
    kafka.create_topic("events", 2);
    let config = format!(
        "[kafka]\nbrokers = \"{}\"\ntopic = \"events\"\nmessage_timeout_ms = 20000\n\n[kafka.librdkafka]\n\"enable.idempotence\" = \"false\"\n",
        kafka.brokers()
    );
    let mut server = Server::start_with(&config, &[]);
    let batch = |round: &str| {
        let ids: Vec<String> = (0..EVENTS).map(|i| format!("{round}-e{i}")).collect();
        (
            ids.clone(),
            json!({ "batch": ids.iter().map(|id| track(id)).collect::<Vec<_>>() }),
        )
    };
    let (warm_ids, warm) = batch("warm-up");
    let (status, answer) = post_json(&server, "/v1/batch", &warm);
    assert_eq!(status, 200, "{answer}");
    std::thread::sleep(Duration::from_secs(2));

    // The broker hangs with our produce request in its socket; the request waits.
    // SAFETY: signalling a child process we started.
    unsafe { libc::kill(kafka.pid() as i32, libc::SIGSTOP) };
    let (crash_ids, crash) = batch("crash");
    send_then_kill9(&mut server, &crash);
    // The broker wakes up, reads the request and writes the batch.
    // SAFETY: as above.
    unsafe { libc::kill(kafka.pid() as i32, libc::SIGCONT) };
    std::thread::sleep(Duration::from_secs(2));

    // The client resends the unanswered request to the restarted server.
    let server = server.restart();
    let (status, answer) = post_json(&server, "/v1/batch", &crash);
    assert_eq!(status, 200, "{answer}\n{}", server.log());

    let expected: Vec<&String> = warm_ids.iter().chain(&crash_ids).collect();
    // One more than expected: a second copy is read, not cut off (when there is
    // none, the read ends after the consumer's idle limit).
    let records = kafka.read_all("events", 2, expected.len() + 1);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for record in &records {
        *counts.entry(record.headers["messageId"].clone()).or_default() += 1;
    }
    assert!(
        server.metric("breakwater_kafka_read_back_found_events_total") >= EVENTS as f64,
        "the resend was checked against the topic"
    );
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let missing: Vec<_> = expected.iter().filter(|id| !counts.contains_key(**id)).collect();
    assert!(missing.is_empty(), "missing: {missing:?}");
    assert!(
        twice.is_empty(),
        "written twice: {twice:?} (read back: {})",
        server.metric("breakwater_kafka_read_back_found_events_total")
    );
}
