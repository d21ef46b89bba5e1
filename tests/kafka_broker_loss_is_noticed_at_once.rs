//! When every Kafka broker goes away, breakwater notices at once (librdkafka's
//! AllBrokersDown), answers 503 long before `message.timeout.ms`, shows it in
//! readiness, and delivers again once the broker is back.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::backends::Kafka;
use support::*;

#[test]
fn broker_loss_fails_fast_and_delivery_resumes_after_restart() {
    let mut kafka = Kafka::start_persistent();
    kafka.create_topic("events", 1);
    let config = format!(
        "[kafka]\nbrokers = \"{}\"\ntopic = \"events\"\nmessage_timeout_ms = 60000\n",
        kafka.brokers()
    );
    let server = Server::start_with(&config, &[]);
    let (status, body) = post_json(&server, "/v1/track", &track("before"));
    assert_eq!(status, 200, "{body}");

    kafka.kill9();
    // The first request may race the disconnect; within a few seconds requests
    // must be refused quickly (503), not after the 60 s message timeout.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut refused_in = None;
    let mut attempt = 0;
    while Instant::now() < deadline {
        attempt += 1;
        let started = Instant::now();
        let (status, body) = post_json(&server, "/v1/track", &track(&format!("during-{attempt}")));
        if status == 503 {
            assert_eq!(body["error"]["code"], "sink_unavailable", "{body}");
            refused_in = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let refused_in = refused_in.expect("requests were never refused while Kafka was down");
    assert!(
        refused_in < Duration::from_secs(5),
        "refusal took {refused_in:?}: broker loss not noticed at once"
    );
    assert_eq!(server.metric("breakwater_kafka_all_brokers_down"), 1.0);
    let (status, ready) = status_and_json(client().get(server.url("/health/ready")).send().unwrap());
    assert_eq!(status, 503);
    assert_eq!(ready["sinks"]["kafka"]["healthy"], false, "{ready}");

    kafka.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = post_json(&server, "/v1/track", &track("after"));
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "delivery did not resume after the broker came back"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let records = kafka.read_all("events", 1, 2);
    let ids: Vec<_> = records.iter().map(|r| r.payload["messageId"].clone()).collect();
    assert!(
        ids.contains(&json!("before")) && ids.contains(&json!("after")),
        "{ids:?}"
    );
    assert_eq!(server.metric("breakwater_kafka_all_brokers_down"), 0.0);
}
