//! A batch the broker writes but never acknowledges in time. The broker is frozen
//! (SIGSTOP) while our produce request sits in its socket: the delivery times out,
//! the batch goes to the Kafka spool and the request is answered 200. On thaw the
//! broker reads the request and writes the batch anyway. Replaying it as new
//! messages would put it in the topic twice; breakwater reads the topic back before
//! it replays a batch whose outcome it does not know, and sends only what is not
//! there.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;
use support::backends::Kafka;
use support::*;

const EVENTS_PER_REQUEST: usize = 20;

#[test]
fn a_batch_written_but_not_acknowledged_is_not_replayed_twice() {
    let kafka = Kafka::start_persistent();
    kafka.create_topic("events", 2);
    let config = format!(
        "[kafka]\nbrokers = \"{}\"\ntopic = \"events\"\nmessage_timeout_ms = 2000\n\n[kafka.librdkafka]\n\"enable.idempotence\" = \"false\"\n",
        kafka.brokers()
    );
    let server = Server::start_with(&config, &[]);
    let mut acked = Vec::new();
    let send = |round: &str, acked: &mut Vec<String>| {
        let ids: Vec<String> = (0..EVENTS_PER_REQUEST).map(|i| format!("{round}-e{i}")).collect();
        let body = json!({ "batch": ids.iter().map(|id| track(id)).collect::<Vec<_>>() });
        let (status, answer) = post_json(&server, "/v1/batch", &body);
        assert_eq!(status, 200, "{round}: {answer}");
        acked.extend(ids);
    };
    send("warm-up", &mut acked);
    std::thread::sleep(Duration::from_secs(2));

    // SAFETY: signalling a child process we started.
    unsafe { libc::kill(kafka.pid() as i32, libc::SIGSTOP) };
    send("frozen", &mut acked);
    assert!(
        server.metric("breakwater_spool_events{sink=\"kafka\"}") >= EVENTS_PER_REQUEST as f64,
        "the unanswered batch was spooled"
    );
    // SAFETY: as above.
    unsafe { libc::kill(kafka.pid() as i32, libc::SIGCONT) };

    let deadline = Instant::now() + Duration::from_secs(60);
    while server.metric("breakwater_spool_events{sink=\"kafka\"}") > 0.0 {
        if let Some(panic) = kafka.broker_panic() {
            panic!("the broker panicked (a tansu defect, docs/chaos.md): {panic}");
        }
        assert!(
            Instant::now() < deadline,
            "the spool was not replayed:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    send("after", &mut acked);
    let records = kafka.read_all("events", 2, acked.len());
    let mut counts: HashMap<String, usize> = HashMap::new();
    for record in &records {
        *counts.entry(record.headers["messageId"].clone()).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).map(|(id, _)| id).collect();
    let missing: Vec<_> = acked.iter().filter(|id| !counts.contains_key(*id)).collect();
    println!(
        "{} acknowledged, {} records in Kafka, {} twice, {} missing; read back before replay: {}",
        acked.len(),
        records.len(),
        twice.len(),
        missing.len(),
        server.metric("breakwater_kafka_read_back_found_events_total")
    );
    assert!(missing.is_empty(), "missing: {missing:?}");
    assert!(twice.is_empty(), "written twice: {twice:?}");
}
