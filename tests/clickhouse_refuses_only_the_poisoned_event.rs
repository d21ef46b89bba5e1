//! One event ClickHouse refuses for good (a table rule: a `throwIf` column) among
//! many from several sources, grouped into the same INSERTs: only that event goes to
//! the dead-letter store; every other event, of its own request too, is inserted
//! (the refused group is halved until the refused event is found; issue 20).

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::backends::ClickHouse;
use support::*;

const SOURCES: [(&str, &str); 3] = [("web", "wk-web"), ("ios", "wk-ios"), ("backend", "wk-backend")];
const REQUESTS_PER_SOURCE: usize = 10;
const EVENTS_PER_REQUEST: usize = 100;

#[test]
fn only_the_poisoned_event_is_dead_lettered() {
    let clickhouse = ClickHouse::start();
    let mut config = format!("[clickhouse]\nurl = \"{}\"\ndatabase = \"poison\"\n", clickhouse.url());
    for (name, key) in SOURCES {
        config.push_str(&format!("\n[[sources]]\nname = \"{name}\"\nwrite_key = \"{key}\"\n"));
    }
    let server = Server::start_with(&config, &[]);
    let send = |key: &str, ids: &[String]| {
        let body = json!({ "batch": ids.iter().map(|id| track(id)).collect::<Vec<_>>() });
        let response = client()
            .post(server.url("/v1/batch"))
            .basic_auth(key, Some(""))
            .json(&body)
            .send()
            .unwrap();
        (response.status().as_u16(), response.text().unwrap())
    };
    // The table exists once the first INSERT went through; then the rule is added.
    let (status, answer) = send("wk-web", &["warm-up".to_string()]);
    assert_eq!(status, 200, "{answer}");
    clickhouse.query("ALTER TABLE poison.events ADD COLUMN rule UInt8 MATERIALIZED throwIf(message_id = 'poison')");

    // Every source's requests at once, so that they share INSERTs; one event of one
    // request is the poisoned one.
    let mut expected = 0;
    std::thread::scope(|scope| {
        let mut senders = Vec::new();
        for (name, key) in SOURCES {
            for request in 0..REQUESTS_PER_SOURCE {
                let mut ids: Vec<String> = (0..EVENTS_PER_REQUEST)
                    .map(|i| format!("{name}-{request}-{i}"))
                    .collect();
                if name == "ios" && request == 3 {
                    ids[17] = "poison".to_string();
                }
                expected += ids.len();
                senders.push(scope.spawn(move || send(key, &ids)));
            }
        }
        for sender in senders {
            let (status, answer) = sender.join().unwrap();
            assert_eq!(status, 200, "{answer}");
        }
    });
    let count = |sql: &str| -> u64 { clickhouse.query(sql).trim().parse().unwrap() };
    let deadline = Instant::now() + Duration::from_secs(20);
    while count("SELECT count() FROM poison.events WHERE message_id != 'warm-up'") < expected as u64 - 1 {
        assert!(
            Instant::now() < deadline,
            "not every good event arrived\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        count("SELECT count() FROM poison.events WHERE message_id != 'warm-up'"),
        expected as u64 - 1,
        "every event but the poisoned one, once (raw rows)"
    );
    assert_eq!(
        server.metric("breakwater_dead_letter_events_total{sink=\"clickhouse\"}"),
        1.0,
        "only the poisoned event is dead-lettered\n{}",
        server.log()
    );
    let (_, page) = admin_get(&server, "/admin/dead-letters");
    assert_eq!(page["deadLetters"][0]["messageIds"], json!(["poison"]), "{page}");
    assert_eq!(page["deadLetters"][0]["source"], "ios");
    assert!(server.metric("breakwater_clickhouse_bisected_inserts_total") > 0.0);
}
