//! At start-up breakwater refills its in-process dedup from the file sink's recent
//! files. That is right only while the file sink is the only sink: beside ClickHouse
//! or Kafka, a line in the file says nothing of the other sinks. A crash after the
//! file's fsync but before ClickHouse made the batch durable left the event in the
//! file only; the client's retry must then be delivered, not answered as a
//! duplicate (issue 19, finding a).

mod support;

use std::time::Duration;

use serde_json::json;
use support::backends::ClickHouse;
use support::{post_json, track, Server};

#[test]
fn a_retry_after_a_crash_between_the_file_and_clickhouse_reaches_clickhouse() {
    let clickhouse = ClickHouse::start();
    let config = format!(
        "[file_sink]\nenabled = true\n\n[clickhouse]\nurl = \"{}\"\ndatabase = \"beside_file\"\n",
        clickhouse.url()
    );
    let mut server = Server::start_with(&config, &[]);
    let (status, body) = post_json(&server, "/v1/batch", &json!({ "batch": [track("before")] }));
    assert_eq!(status, 200, "{body}");
    clickhouse.wait_for_count("beside_file.events", 1);
    server.terminate(Duration::from_secs(30));

    // What a crash between the file's fsync and ClickHouse's INSERT leaves: the
    // event in the file sink's newest file, nowhere else, and no 200 sent.
    let events_dir = server.data_dir.join("events");
    let newest = std::fs::read_dir(&events_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .max()
        .expect("a file sink file");
    let mut line = server
        .sink_events()
        .into_iter()
        .find(|event| event["messageId"] == "before")
        .expect("the first event in the file");
    line["messageId"] = json!("in-file-only");
    let mut text = std::fs::read_to_string(&newest).unwrap();
    text.push_str(&format!("{line}\n"));
    std::fs::write(&newest, text).unwrap();

    let server = server.restart();
    let (status, body) = post_json(&server, "/v1/batch", &json!({ "batch": [track("in-file-only")] }));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["duplicates"].as_u64(),
        None,
        "the retry was taken for a duplicate, so ClickHouse would never get the event: {body}"
    );
    clickhouse.wait_for_count("beside_file.events", 2);
}
