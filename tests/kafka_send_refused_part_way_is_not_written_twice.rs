//! librdkafka's local queue holds fewer messages than a batch has events, so a send
//! is refused part-way through it ("queue full"): the messages already handed over
//! stay queued and land a moment later. The retry's read-back must wait for them,
//! or it finds nothing and sends them again (issue 19 f).

mod support;

use serde_json::json;
use support::backends::Kafka;
use support::*;

const TOPIC: &str = "events";
const EVENTS: usize = 60;

#[test]
fn a_batch_refused_part_way_by_a_full_producer_queue_lands_once() {
    let kafka = Kafka::start();
    kafka.create_topic(TOPIC, 1);
    let config = format!(
        "[kafka]\nbrokers = \"{}\"\ntopic = \"{TOPIC}\"\n\n[kafka.librdkafka]\n\"queue.buffering.max.messages\" = \"25\"\n",
        kafka.brokers()
    );
    let server = Server::start_with(&config, &[]);
    let ids: Vec<String> = (0..EVENTS).map(|i| format!("queued-{i}")).collect();
    let body = json!({ "batch": ids.iter().map(|id| track(id)).collect::<Vec<_>>() });
    let (status, answer) = post_json(&server, "/v1/batch", &body);
    assert_eq!(status, 200, "{answer}\n{}", server.log());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while server.metric("breakwater_spool_events{sink=\"kafka\"}") > 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the spool did not drain\n{}",
            server.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }

    // tansu is one broker: the start-up warning says what a 200 means there.
    assert!(
        server.log().contains("has a partition with 1 replica"),
        "no single-replica warning\n{}",
        server.log()
    );

    assert_each_once_in_kafka(&kafka, TOPIC, 1, &ids, &server);
}
